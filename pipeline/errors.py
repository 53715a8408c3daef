"""Every error the package raises for bad input or setup, in one place (the CLI prints them without a traceback).

Library modules raise these in their own words (a setting's name as the Python API spells it);
the config layer re-raises with the YAML key path (:class:`ConfigError`).
"""

from __future__ import annotations

from typing import Any


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


class CompatError(PipelineError, RuntimeError):
    """The installed Keras/TensorFlow changed an internal the pipeline relies on; the message names the versions."""


class NumericsError(PipelineError, ArithmeticError):
    """``check_numerics=True`` found NaN/Inf; ``stage``, ``microbatch``, ``tensor`` and ``kind`` say where and what."""


def invalid(setting: str, value: Any, reason: str, error: type[PipelineError] = SettingError) -> PipelineError:
    """``error("<setting>: got <value!r>; <reason>")``, keeping the parts as ``setting``, ``value``, ``reason``.

    A library names the setting as its Python API spells it (an argument name); the config layer
    re-raises the same parts under the YAML key path (:func:`pipeline.train.typed_yaml.rekey`).
    """
    err = error(f"{setting}: got {value!r}; {reason}")
    err.setting, err.value, err.reason = setting, value, reason
    return err


def check_count(name: str, value: Any, minimum: int = 1, error: type[PipelineError] = SettingError,
                hint: str = "") -> int:
    """Returns ``value`` when it is an integer (not a bool) ``>= minimum``; the one check of every count setting.

    Stages, micro-batches, devices and the config's counts all go through it (no TensorFlow needed).

    Raises:
        PipelineError: ``error`` (default :class:`SettingError`) saying ``"<name> must be an integer >= <minimum>,
            got <value!r>"`` (then ``hint``), with ``setting``/``value``/``reason`` as :func:`invalid` keeps them.
    """
    integer = isinstance(value, int) and not isinstance(value, bool)
    if integer and value >= minimum:
        return value
    err = error(f"{name} must be an integer >= {minimum}, got {value!r}" + (f". {hint}" if hint else ""))
    err.setting, err.value = name, value
    err.reason = f"must be >= {minimum}" if integer else f"must be an integer >= {minimum}"
    raise err
