"""``PipelineError``: the base of every error that reports bad input (printed without a traceback by the CLI)."""


class PipelineError(Exception):
    """Bad input or setup, explained: the setting, the value received, what is allowed, how to fix it."""


class SettingError(PipelineError, ValueError):
    """A setting has a value that is not allowed (the message names setting, value and what is allowed)."""
