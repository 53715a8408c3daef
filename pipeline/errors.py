"""``PipelineError``: the base of every error that reports bad input (printed without a traceback by the CLI)."""


class PipelineError(Exception):
    """Bad input or setup, explained: the setting, the value received, what is allowed, how to fix it."""
