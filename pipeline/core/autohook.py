"""The hook through which ``PipelineModel(schedule="auto", ...)`` asks ``pipeline.perf.autoplan`` to choose.

Core may not import perf (layers core -> perf -> dist -> train -> commands), so perf registers its resolver
here at import (``import pipeline`` imports it). A model with an ``"auto"`` setting starts with a placeholder
plan (1F1B, M=1, no recompute) and resolves once, before its first step is traced: in ``fit``/``evaluate``/
``predict`` (and the ``*_on_batch`` methods) from one batch of their data, else on the first batch a step sees.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from pipeline.errors import check_count, invalid

AUTO = "auto"
DEFAULT_BUDGET = "80%"
"""The default ``memory_budget``: 80% of each device's memory."""
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
Resolver = Callable[[Any, Any, Any, bool], None]
"""``resolver(model, data, batch_size, in_step)``: measures, chooses and applies (:func:`apply`)."""

_RESOLVER: list[Resolver] = []


def set_resolver(resolver: Resolver) -> None:
    """Registers the resolver (``pipeline.perf.autoplan`` does at import)."""
    _RESOLVER[:] = [resolver]


def is_auto(value: Any) -> bool:
    """Whether a setting is the string ``"auto"`` (any case)."""
    return isinstance(value, str) and value.lower() == AUTO


@dataclasses.dataclass
class AutoSettings:
    """The settings given as ``"auto"`` (``None`` for those given explicitly) and the memory budget."""

    schedule: Any
    microbatches: Any
    recompute: Any
    memory_budget: Any


def parse_budget(value: Any) -> tuple[str, float] | None:
    """Checks a ``memory_budget``: bytes (int), ``"80%"`` of each device's memory, or ``"4GB"``/``"512MiB"``.

    Returns:
        ``("bytes", n)``, ``("percent", p)`` or None (``None``: no limit).

    Raises:
        SettingError: naming ``memory_budget``, the value and what is allowed.
    """
    allowed = ("give bytes (an integer > 0), a share of each device's memory such as '80%', a size such as "
               "'4GB' or '512MiB', or null for no limit")
    if value is None:
        return None
    if isinstance(value, bool):
        raise invalid("memory_budget", value, allowed)
    if isinstance(value, (int, float)):
        if value <= 0:
            raise invalid("memory_budget", value, allowed)
        return ("bytes", float(int(value)))
    text = str(value).strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(%|[kmgt]?i?b?)", text)
    if not match or (match.group(2) not in _UNITS and match.group(2) != "%"):
        raise invalid("memory_budget", value, allowed)
    number = float(match.group(1))
    if match.group(2) == "%":
        if not 0 < number <= 100:
            raise invalid("memory_budget", value, "a share must be > 0% and <= 100%")
        return ("percent", number)
    if number <= 0:
        raise invalid("memory_budget", value, allowed)
    return ("bytes", float(int(number * _UNITS[match.group(2)])))


def settings(schedule: Any, microbatches: Any, recompute: Any, memory_budget: Any) -> AutoSettings | None:
    """The :class:`AutoSettings` of a ``PipelineModel``'s arguments, or None when nothing is ``"auto"``."""
    if isinstance(microbatches, str) and not is_auto(microbatches):
        check_count("microbatches", microbatches, hint="Or pass 'auto' to choose M by measurement")
    if isinstance(recompute, str) and not is_auto(recompute):
        raise invalid("recompute", recompute, "give true, false, one bool per stage, or 'auto'")
    if not any(is_auto(v) for v in (schedule, microbatches, recompute)):
        return None
    parse_budget(memory_budget)
    return AutoSettings(schedule, microbatches, recompute, memory_budget)


def placeholders(schedule: Any, microbatches: Any, recompute: Any) -> tuple[Any, Any, Any]:
    """The arguments with every ``"auto"`` replaced by the plan a model runs until it resolves."""
    return ("1f1b" if is_auto(schedule) else schedule, 1 if is_auto(microbatches) else microbatches,
            False if is_auto(recompute) else recompute)


def apply(model: Any, schedule: str, microbatches: int, recompute: bool | None) -> None:
    """Gives ``model`` the chosen plan: a new executor (schedule, M) and, if given, every stage's recompute flag."""
    from pipeline.core import anybatch  # noqa: PLC0415 - TensorFlow-free at import
    from pipeline.core.executor import Executor  # noqa: PLC0415

    if recompute is not None:
        for stage in model.pipeline_stages:
            stage.recompute = bool(recompute)
    model.executor = Executor(model.pipeline_stages, schedule, microbatches)
    model.sized_executors = anybatch.SizedExecutors(model.executor)
    model.auto_settings = None


def resolve(model: Any, data: Any, batch_size: Any = None, in_step: bool = False) -> None:
    """Resolves ``model``'s ``"auto"`` settings from ``data`` if still pending (no-op otherwise).

    Raises:
        SettingError: when no resolver is registered (``pipeline.perf.autoplan`` not imported).
    """
    if getattr(model, "auto_settings", None) is None:
        return
    if not _RESOLVER:
        from pipeline.errors import SettingError  # noqa: PLC0415

        raise SettingError("schedule/microbatches/recompute='auto' needs pipeline.perf.autoplan: "
                           "import pipeline (or pipeline.perf.autoplan) before the first fit/evaluate/predict")
    _RESOLVER[0](model, data, batch_size, in_step)


def saved_config(model: Any, config: dict[str, Any]) -> dict[str, Any]:
    """``get_config`` of a model: the resolved plan once chosen, else the ``"auto"`` settings and the budget."""
    pending = getattr(model, "auto_settings", None)
    if pending is None:
        return config
    for key in ("schedule", "microbatches", "recompute"):
        if is_auto(getattr(pending, key)):
            config[key] = AUTO
    config["memory_budget"] = pending.memory_budget
    return config


class AutoMixin:
    """``fit``/``evaluate``/``predict`` and the ``*_on_batch`` methods resolve ``"auto"`` settings first."""

    def resolve_auto(self, x: Any) -> Any:
        """Chooses the ``"auto"`` settings now, from one batch ``x`` of inputs; returns the choice (or None)."""
        resolve(self, x, None, False)
        return getattr(self, "auto_choice", None)

    def fit(self, x: Any = None, y: Any = None, batch_size: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Keras ``fit``, after resolving ``"auto"`` settings from one batch of ``x``."""
        resolve(self, x, batch_size)
        return super().fit(x, y, batch_size, *args, **kwargs)  # type: ignore[misc]

    def evaluate(self, x: Any = None, y: Any = None, batch_size: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Keras ``evaluate``, after resolving ``"auto"`` settings from one batch of ``x``."""
        resolve(self, x, batch_size)
        return super().evaluate(x, y, batch_size, *args, **kwargs)  # type: ignore[misc]

    def predict(self, x: Any, batch_size: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Keras ``predict``, after resolving ``"auto"`` settings from one batch of ``x``."""
        resolve(self, x, batch_size)
        return super().predict(x, batch_size, *args, **kwargs)  # type: ignore[misc]

    def train_on_batch(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Keras ``train_on_batch``, after resolving ``"auto"`` settings from ``x``."""
        resolve(self, x)
        return super().train_on_batch(x, *args, **kwargs)  # type: ignore[misc]

    def test_on_batch(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Keras ``test_on_batch``, after resolving ``"auto"`` settings from ``x``."""
        resolve(self, x)
        return super().test_on_batch(x, *args, **kwargs)  # type: ignore[misc]

    def predict_on_batch(self, x: Any) -> Any:
        """Keras ``predict_on_batch``, after resolving ``"auto"`` settings from ``x``."""
        resolve(self, x)
        return super().predict_on_batch(x)  # type: ignore[misc]
