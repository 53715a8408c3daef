"""Balanced stages: per-layer costs (parameters or profiled time) and an exact min-max contiguous partition.

:func:`partition_points` splits a row of costs into K contiguous non-empty blocks
so that the largest block sum is as small as possible (dynamic programming,
exact, O(K n^2)). An equal-layer-count split is far off when one layer dominates::

    costs:        8 1 1 1 1 1 1 1 1     K=2
    equal layers: [8 1 1 1 1] [1 1 1 1]      slowest stage 12
    exact:        [8] [1 1 1 1 1 1 1 1]      slowest stage  8
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

from pipeline.errors import SettingError, check_count

BALANCE_MODES = ("params", "time")
TIMING_BUDGET = 0.2
"""Seconds of timed runs per distinct layer call for ``balance="time"``, after its warm-up."""


def partition_points(costs: Sequence[float], num_stages: int,
                     cut_costs: Sequence[float] | None = None) -> list[int]:
    """Exact contiguous partition of ``costs`` into ``num_stages`` blocks minimizing the largest block.

    Among optimal partitions, the one whose cuts come earliest is returned, so
    the result is deterministic. With ``cut_costs`` the tie between optimal
    partitions is broken by the smallest sum of the costs of the cuts made
    (e.g. bytes sent across each boundary); the largest block stays optimal.

    Args:
        costs: non-negative cost per item (layer or block of layers), in order.
        num_stages: K, the number of non-empty blocks.
        cut_costs: optional, ``cut_costs[i]`` is the cost of cutting before item
            i (``cut_costs[0]`` is unused); same length as ``costs``.

    Returns:
        The K-1 indices at which blocks 1..K-1 start (strictly increasing, in
        ``1..len(costs)-1``); block k is ``costs[points[k-1]:points[k]]``.

    Raises:
        SettingError: if K < 1, K > len(costs) or a cost is negative.
    """
    n = len(costs)
    check_count("num_stages", num_stages)
    if num_stages > n:
        raise SettingError(f"cannot cut {n} item(s) into {num_stages} non-empty stages; use at most {n} stages")
    if any(c < 0 for c in costs):
        raise SettingError(f"costs must be >= 0, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: the smallest max-block of costs[:i] cut into k blocks; cut[k][i]: where block k starts.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12 * max(1.0, abs(value)):
                    best[k][i], cut[k][i] = value, j
    if cut_costs is not None:
        _fewest_cut_costs(prefix, num_stages, best[num_stages][n], list(cut_costs), cut)
    points, i = [], n
    for k in range(num_stages, 1, -1):
        i = cut[k][i]
        points.append(i)
    return points[::-1]


def _fewest_cut_costs(prefix: list[float], num_stages: int, limit: float, cut_costs: list[float],
                      cut: list[list[int]]) -> None:
    """Refills ``cut`` with the partition of smallest total cut cost among those whose blocks stay <= ``limit``."""
    n, inf = len(prefix) - 1, float("inf")
    if len(cut_costs) != n or any(c < 0 for c in cut_costs):
        raise SettingError(f"cut_costs must be {n} non-negative numbers, one per item; got {cut_costs}")
    bound = limit + 1e-9 * max(1.0, abs(limit))
    total = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    total[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                if prefix[i] - prefix[j] > bound or total[k - 1][j] == inf:
                    continue
                value = total[k - 1][j] + (cut_costs[j] if j else 0.0)
                if value < total[k][i] - 1e-12 * max(1.0, abs(value)):
                    total[k][i], cut[k][i] = value, j


def stage_sums(costs: Sequence[float], points: Sequence[int]) -> list[float]:
    """The cost of each block for the cut ``points`` returned by :func:`partition_points`."""
    bounds = [0, *points, len(costs)]
    return [float(sum(costs[a:b])) for a, b in zip(bounds, bounds[1:])]


def equal_count_points(num_items: int, num_stages: int) -> list[int]:
    """Cut points giving every block the same number of items (the first blocks one more if uneven)."""
    base, extra = divmod(num_items, num_stages)
    points, at = [], 0
    for k in range(num_stages - 1):
        at += base + (1 if k < extra else 0)
        points.append(at)
    return points


def layer_costs(model: Any, mode: str, sample_input: Any = None, layers: Sequence[Any] | None = None,
                device: str | None = None, repeats: int = 5) -> list[float]:
    """The cost of each layer of ``model``, for balancing stages.

    Args:
        model: a built Keras Sequential or functional model.
        mode: ``"params"`` (number of weights of the layer) or ``"time"``
            (median seconds of one forward + backward of the layer on its real
            input, profiled in a ``tf.function`` on ``device``).
        sample_input: a batch (as for ``model(sample_input)``); required for ``"time"``.
        layers: the layers, in order (default: the model's layers without InputLayers).
        device: where to profile (default: the current default device).
        repeats: timed runs per layer after one warm-up, at most; the median is
            kept. Runs stop early once they have taken ``TIMING_BUDGET`` seconds
            (a layer that takes 0.1 s is timed twice, not five times).

    Returns:
        One non-negative float per layer.

    Raises:
        SettingError: unknown ``mode``, or ``"time"`` without ``sample_input``.
    """
    import keras

    if layers is None:
        layers = [layer for layer in (model.layers if isinstance(model, keras.Sequential) else model.operations)
                  if not isinstance(layer, keras.layers.InputLayer)]
    if mode == "params":
        # Operations that are not layers (keras.ops calls such as relu, not_equal) have no weights.
        return [float(sum(int(_size(w.shape)) for w in getattr(layer, "weights", ()))) for layer in layers]
    if mode != "time":
        raise SettingError(f"balance={mode!r} is not known; use one of {', '.join(BALANCE_MODES)}")
    if sample_input is None:
        raise SettingError('balance="time" profiles every layer on a real batch: pass sample_input=<a batch>')
    import contextlib

    import tensorflow as tf

    scope = tf.device(device) if device else contextlib.nullcontext()
    timed: dict[Any, float] = {}  # one measurement per distinct computation (see _signature)
    costs = []
    with scope:
        calls = _layer_calls(model, list(layers), sample_input)
        for layer, (args, kwargs) in zip(layers, calls):
            key = _signature(layer, args, kwargs)
            if key not in timed:
                timed[key] = _profile(layer, args, kwargs, repeats)
            costs.append(timed[key])
    return costs


def _size(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _layer_calls(model: Any, layers: list[Any], sample_input: Any) -> list[tuple[tuple, dict]]:
    """The concrete ``(args, kwargs)`` each layer is called with when the model runs on ``sample_input``."""
    import keras
    import tensorflow as tf

    from pipeline.core import _compat

    if isinstance(model, keras.Sequential):
        calls, x = [], tf.convert_to_tensor(sample_input) if not isinstance(sample_input, (dict, list, tuple)) \
            else sample_input
        for layer in layers:
            calls.append(((x,), {}))
            x = layer(x)
        return calls
    needed: dict[int, Any] = {}
    for layer in layers:
        for t in _compat.call_inputs(layer, call=0, model=model):
            needed.setdefault(id(t), t)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    probe = keras.Model(inputs, list(needed.values()))
    values = probe(sample_input)
    values = values if isinstance(values, (list, tuple)) else [values]
    table = {key: v for key, v in zip(needed, values)}
    return [_compat.fill_call_arguments(layer, table, call=0, model=model) for layer in layers]


def _signature(layer: Any, args: tuple, kwargs: dict) -> Any:
    """What fixes a layer call's cost: its class, configuration without the name, and its input shapes.

    Layers that repeat a block (ResNet50: 176 layers, 47 distinct calls at 32x32) are
    timed once; a layer whose configuration cannot be read is its own key.
    """
    import json

    import tensorflow as tf

    try:
        config = {k: v for k, v in layer.get_config().items() if k != "name"}
        described = json.dumps(config, sort_keys=True, default=repr)
    except Exception:  # noqa: BLE001 - an unreadable config only disables reuse for this layer
        return ("layer", id(layer))
    values = tuple(
        (tuple(t.shape), t.dtype.name) if isinstance(t, tf.Tensor) else repr(t)
        for t in tf.nest.flatten((args, kwargs))
    )
    keys = tuple(sorted(kwargs))
    return type(layer).__qualname__, described, values, keys


def _profile(layer: Any, args: tuple, kwargs: dict, repeats: int) -> float:
    """Median seconds of forward + backward (input and weight gradients) of one layer."""
    import tensorflow as tf

    from pipeline.core import _compat

    inputs = [t for t in tf.nest.flatten((args, kwargs)) if isinstance(t, tf.Tensor) and t.dtype.is_floating]
    variables = list(getattr(layer, "trainable_variables", ()))
    if _compat.accepts_training(layer):
        kwargs = {**kwargs, "training": True}

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = layer(*args, **kwargs)
        targets = [t for t in tf.nest.flatten(y) if t.dtype.is_floating]
        grads = tape.gradient(targets, inputs + variables) if targets and (inputs or variables) else []
        # An Embedding's weight gradient is sparse (IndexedSlices): make it a dense tensor to return it.
        return [tf.convert_to_tensor(g) for g in grads if g is not None] + targets

    step()  # trace and warm up
    times = []
    while len(times) < max(1, repeats) and sum(times) < TIMING_BUDGET:
        start = time.perf_counter()
        out = step()
        if out:
            out[0].numpy()  # wait for the device (asynchronous on GPUs)
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))
