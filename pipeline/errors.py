"""Every error the package raises for bad input or setup, in one place (the CLI prints them without a traceback).

Library modules raise these in their own words (a setting's name as the Python API spells it);
the config layer re-raises with the YAML key path (:class:`ConfigError`).
"""


class PipelineError(Exception):
    """Bad input or setup, explained: the setting, the value received, what is allowed, how to fix it."""


class SettingError(PipelineError, ValueError):
    """A setting has a value that is not allowed (the message names setting, value and what is allowed)."""


class ConfigError(PipelineError, ValueError):
    """A config value is not acceptable; the message names key path, value and what is allowed."""


class ScheduleError(PipelineError, ValueError):
    """A schedule that cannot run correctly; the message shows the grid."""


class SplitError(PipelineError, ValueError):
    """A model cannot be cut as asked; the message names the layer and the reason."""


class RecomputeError(PipelineError, ValueError):
    """A stage cannot be recomputed; the message says why and what to do."""


class DeviceError(PipelineError, RuntimeError):
    """Devices cannot be set up as asked; the message says how to fix it."""


class DataError(PipelineError, ValueError):
    """The data cannot be loaded as configured; the message says what was found and what is needed."""


class CheckpointError(PipelineError, FileNotFoundError):
    """No checkpoint where one was asked for; the message says what to give instead."""


class MeasureError(PipelineError, RuntimeError):
    """A measurement cannot be made as asked (too few steps, no trace, a figure this machine does not report)."""


class ClusterError(PipelineError, RuntimeError):
    """The cluster is misconfigured or a task stopped answering; the message names the task."""


class ReplicaError(PipelineError, RuntimeError):
    """Replicas cannot be set up as asked; the message says how to fix it."""
