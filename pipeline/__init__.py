"""Pipeline-parallel training for TensorFlow 2 and Keras 3 (the public names load lazily, on first use).

``import pipeline`` imports nothing heavy and writes no environment; the one documented exception: with
``PIPELINE_CPU_DEVICES=K`` set, it starts TensorFlow and creates K logical CPU devices (tests, CPU runs).
Once Keras and TensorFlow are imported (before or after this package), ``pipeline.core.model`` is imported
too, so ``keras.models.load_model`` finds ``PipelineModel`` in a ``.keras`` file without custom_objects.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from pipeline.core import runtime as _runtime
from pipeline.perf import autoplan as _autoplan  # noqa: F401 - registers the "auto" resolver (pure Python)

_PUBLIC = {
    "PipelineModel": ("pipeline.core.model", "PipelineModel"),
    "Stage": ("pipeline.core.stage", "Stage"),
    "split": ("pipeline.core.partition", "split"),
    "boundaries": ("pipeline.core.partition", "boundaries"),
    "format_boundaries": ("pipeline.core.partition", "format_boundaries"),
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


class _RegisterWithKeras(importlib.abc.MetaPathFinder):
    """Imports ``pipeline.core.model`` once ``keras`` and ``tensorflow`` have both finished importing (each
    imports the other part-way), so ``keras.models.load_model`` finds ``PipelineModel`` (registered as
    ``"pipeline>PipelineModel"``) without custom_objects."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        """The other finders' spec of ``keras``/``tensorflow``, its loader noting when the module is done."""
        if name not in _WATCHED:
            return None
        spec = next((found for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec")
                     for found in [finder.find_spec(name, path, target)] if found is not None), None)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                _register_when_ready(name)

            spec.loader.exec_module = exec_module  # this spec's loader instance only
        return spec


_WATCHED = ("keras", "tensorflow")
_READY: set[str] = set()


def _register_when_ready(finished: str | None = None) -> None:
    """Imports ``pipeline.core.model`` (its class registers with Keras) once Keras and TF are both imported."""
    if finished:
        _READY.add(finished)
    if not _READY.issuperset(_WATCHED) or "pipeline.core.model" in sys.modules:
        return
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterWithKeras)]
    try:
        importlib.import_module("pipeline.core.model")
    except Exception as err:  # noqa: BLE001 - importing keras must not fail because of this package
        warnings.warn(f"pipeline could not register PipelineModel with Keras ({err}); import "
                      "pipeline.core.model before keras.models.load_model", stacklevel=2)


_runtime.cpu_devices_from_env()
_READY.update(name for name in _WATCHED if name in sys.modules)
if _READY.issuperset(_WATCHED):  # Keras and TF already imported: register PipelineModel now
    _register_when_ready()
elif not any(isinstance(f, _RegisterWithKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithKeras())
