"""The topology-free checkpoint format: variables keyed by their model paths in a TF tensor bundle, atomic writes."""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from pipeline.errors import CheckpointError

FORMAT_VERSION = 1
"""Written as ``meta/format_version``; a reader refuses a newer version."""
META = ("format_version", "step", "epoch", "steps_per_epoch", "samples", "global_batch", "replicas")
"""The ``meta/<name>`` int64 scalars of a checkpoint (``samples``/``global_batch``: -1/0 when unknown)."""
LEGACY_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
"""Present in the checkpoints of the earlier, per-stage ``tf.train.Checkpoint`` format."""
SHOWN = 8
"""How many mismatching names an error lists (then "... and N more")."""

_NUMBERED = re.compile(r"^(.*?)_(\d+)$")


def _strip_number(part: str) -> str:
    """``adam_1`` -> ``adam``: Keras numbers auto-named objects per process."""
    m = _NUMBERED.match(part)
    return m.group(1) if m else part


def state_variables(stage_models: Sequence[Any], optimizer: Any) -> dict[str, Any]:
    """Every variable a checkpoint holds, keyed by a name independent of the stages, cuts and replicas.

    Model variables are ``model/<variable.path>`` (for stages made by :func:`pipeline.split`, the paths
    of the original model's layers). Optimizer variables are ``optimizer/<optimizer>/<variable.path>/<slot>``
    for a slot of a model variable (Keras names a slot ``<path with _ for />_<slot>``), else
    ``optimizer/<optimizer>/<name>``; ``<optimizer>`` is the optimizer's name without Keras' ``_N`` number.

    Raises:
        CheckpointError: two variables would get the same key (layers with the same name).
    """
    keys: dict[str, Any] = {}
    seen: set[int] = set()

    def add(key: str, variable: Any) -> None:
        if key in keys and keys[key] is not variable:
            raise CheckpointError(f"two variables have the checkpoint key {key!r}; a checkpoint keys variables "
                                  "by their paths, so give the layers (or optimizers) unique names")
        keys[key] = variable

    model_paths: list[str] = []
    for model in stage_models:
        for v in model.variables:
            if id(v) not in seen:
                seen.add(id(v))
                add(f"model/{v.path}", v)
                model_paths.append(v.path)
    flat = sorted(((p.replace("/", "_") + "_", p) for p in model_paths), key=lambda t: -len(t[0]))
    for v in (optimizer.variables if optimizer is not None else []):
        owner, _, name = v.path.rpartition("/")
        owner = "/".join(_strip_number(p) for p in owner.split("/")) if owner else ""
        slot = next(((path, name[len(prefix):]) for prefix, path in flat if name.startswith(prefix)), None)
        tail = f"{slot[0]}/{slot[1]}" if slot else name
        add("optimizer/" + (f"{owner}/{tail}" if owner else tail), v)
    return keys


# ------------------------------------------------------------------ matching a checkpoint to a model

def _canonical(key: str) -> tuple[str, tuple[int, ...]]:
    """The key without Keras' auto-numbers (``dense_3/kernel`` -> ``dense/kernel``) and those numbers."""
    parts = [_NUMBERED.match(p) for p in key.split("/")]
    name = "/".join(m.group(1) if m else p for m, p in zip(parts, key.split("/")))
    return name, tuple(int(m.group(2)) if m else 0 for m in parts)


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def match(path: str, saved: Mapping[str, tuple[tuple[int, ...], Any]], current: Mapping[str, Any]) -> dict[str, str]:
    """Pairs every current key with a saved key: by equal key, else (all or nothing) by auto-numbered name.

    A model built twice in one process gets other automatic layer names (``dense_2`` for ``dense``);
    when the keys differ only in such numbers, the n-th ``dense*`` of the checkpoint goes to the n-th of
    the model (by number). Anything else that differs is refused.

    Args:
        path: the checkpoint (for messages).
        saved: ``{key: (shape, dtype)}`` of the checkpoint's variables.
        current: ``{key: variable}`` of the model and optimizer.

    Returns:
        ``{current key: saved key}``.

    Raises:
        CheckpointError: names, shapes or dtypes that do not fit, listed; nothing has been restored.
    """
    if set(saved) == set(current):
        pairs = {k: k for k in current}
    else:
        groups: dict[str, list[list[tuple[tuple[int, ...], str]]]] = {}
        for side, keys in enumerate((saved, current)):
            for key in keys:
                name, numbers = _canonical(key)
                groups.setdefault(name, [[], []])[side].append((numbers, key))
        if any(len(a) != len(b) for a, b in groups.values()):
            missing, unexpected = set(current) - set(saved), set(saved) - set(current)
            raise CheckpointError(
                f"checkpoint {path} does not fit this model; nothing was restored. "
                f"In the model, not in the checkpoint ({len(missing)}): {_listing(missing) or '-'}. "
                f"In the checkpoint, not in the model ({len(unexpected)}): {_listing(unexpected) or '-'}. "
                "A checkpoint restores into the same model and optimizer (same layer names); the stages, cuts, "
                "schedule, micro-batches and replicas may differ. Rename the layers back, or train into a new "
                "run folder (--run-dir)")
        pairs = {c: s for a, b in groups.values() for (_, s), (_, c) in zip(sorted(a), sorted(b))}
    wrong = [f"{c} (checkpoint {list(saved[s][0])} {saved[s][1].name}, model {list(current[c].shape)} "
             f"{tf.as_dtype(current[c].dtype).name})" for c, s in sorted(pairs.items())
             if tuple(saved[s][0]) != tuple(current[c].shape) or tf.as_dtype(current[c].dtype) != saved[s][1]]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not fit this model; nothing was restored. Shape or dtype "
                              f"differs for {len(wrong)} variable(s): {_listing(wrong)}. Build the model with the "
                              "same sizes (model.args) as the run that wrote it")
    return pairs


# ------------------------------------------------------------------ files

def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(prefix: str, values: Mapping[str, Any], meta: Mapping[str, int]) -> str:
    """Writes one checkpoint bundle atomically: a temporary prefix, fsync, then rename into ``prefix``.

    Args:
        prefix: e.g. ``RUN/checkpoints/ckpt-40`` (files ``.index`` and ``.data-00000-of-00001``).
        values: ``{key: variable or array}``.
        meta: the :data:`META` integers.
    """
    tmp = f"{prefix}.tmp{os.getpid()}"
    names = [f"meta/{k}" for k in META] + sorted(values)
    tensors = [np.int64(meta.get(k, -1)) for k in META] + [np.asarray(values[k]) for k in sorted(values)]
    with tf.device("/CPU:0"):
        tf.raw_ops.SaveV2(prefix=tmp, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    data = sorted(glob.glob(glob.escape(tmp) + ".data-*"))
    for name in (*data, tmp + ".index"):
        _fsync(name)
    for name in data:  # the data first: an index is only ever next to its complete data
        os.replace(name, prefix + name[len(tmp):])
    os.replace(tmp + ".index", prefix + ".index")
    _fsync(os.path.dirname(prefix) or ".")
    return prefix


def read(prefix: str) -> tuple[dict[str, tuple[tuple[int, ...], Any]], Any]:
    """``({key: (shape, dtype)}, reader)`` of a checkpoint bundle (raises TF/OS errors if unreadable)."""
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    return {k: (tuple(s), dtypes[k]) for k, s in reader.get_variable_to_shape_map().items()}, reader


def write_state(directory: str, prefixes: Sequence[str]) -> None:
    """Writes the ``checkpoint`` state file (``tf.train.latest_checkpoint`` reads it) atomically."""
    names = [os.path.relpath(p, directory) for p in prefixes]
    text = f'model_checkpoint_path: "{names[-1]}"\n' + "".join(f'all_model_checkpoint_paths: "{n}"\n' for n in names)
    path = os.path.join(directory, "checkpoint")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(directory)


def listed(directory: str) -> list[str]:
    """The checkpoint prefixes the state file lists, oldest first (absolute paths)."""
    state = tf.train.get_checkpoint_state(directory) if os.path.isdir(directory) else None
    if state is None:
        return []
    paths = [os.path.join(directory, p) for p in state.all_model_checkpoint_paths]
    latest = os.path.join(directory, state.model_checkpoint_path)
    return [p for p in paths if p != latest] + [latest]


def remove(prefix: str) -> None:
    """Deletes one checkpoint's files."""
    for name in glob.glob(glob.escape(prefix) + ".data-*") + glob.glob(glob.escape(prefix) + ".index"):
        os.remove(name)
