"""Pipeline-parallel training for TensorFlow 2 and Keras 3 (the public names load lazily, on first use).

``import pipeline`` imports nothing heavy and writes no environment; the one documented exception: with
``PIPELINE_CPU_DEVICES=K`` set, it starts TensorFlow and creates K logical CPU devices (tests, CPU runs).
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.core import runtime as _runtime

_PUBLIC = {
    "PipelineModel": ("pipeline.core.model", "PipelineModel"),
    "Stage": ("pipeline.core.stage", "Stage"),
    "split": ("pipeline.core.partition", "split"),
    "verify": ("pipeline.core.verify", "verify"),
    "schedules": ("pipeline.core.schedule", None),
    "devices": ("pipeline.core.devices", None),
    "simulate": ("pipeline.perf.simulate", None),
    "load_config": ("pipeline.train.config", "load_config"),
    "PipelineError": ("pipeline.errors", "PipelineError"),
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Loads a public name on first use (``pipeline.PipelineModel``, ``pipeline.split``, ...)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    module_name, attr = _PUBLIC[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_PUBLIC))


_runtime.cpu_devices_from_env()
