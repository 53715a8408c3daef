"""Make stages: cut a Sequential or functional Keras model where any set of tensors crosses.

A *boundary* between stage i and i+1 carries every tensor made at or before the
cut (model inputs included) and used after it, as a list. A tensor used several
stages later (a U-Net skip, an attention mask, a second model input) is passed
through the stages in between: each takes it as an input and returns it as an
output, so it reaches its consumer's device and its gradient comes back the same
way (summed over consumers by the stages' tape). A Keras mask (``Embedding(
mask_zero=True)``, ``Masking``) crosses as its own bool tensor, right after the
tensor it belongs to, and the next stage re-attaches it (:class:`AttachMask`): Keras
records a mask as a graph edge only sometimes (``LSTM(x)``), other layers read it
from the tensor at run time (``MultiHeadAttention(x, x)``), so it always crosses.

The stages are rebuilt by calling the model's own layers again on new inputs, so
they share the model's layers: training the stages trains the model.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import warnings
import weakref
from typing import Any, Sequence

import keras
import tensorflow as tf

from pipeline.core import _compat
from pipeline.errors import SplitError, check_count

_DESCRIBED: "weakref.WeakKeyDictionary[keras.Model, list[CrossingTensor]]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class CrossingTensor:
    """One tensor a boundary carries."""

    producer: str
    """The layer (or model input) that made it; ``"mask of X"`` for a Keras mask."""
    shape: tuple
    """Its symbolic shape, batch axis first."""
    dtype: str
    bytes_per_sample: int | None
    """Bytes of one sample (``None`` if a non-batch axis is unknown)."""

    def __str__(self) -> str:
        size = "?" if self.bytes_per_sample is None else str(self.bytes_per_sample)
        return f"{self.producer} {self.shape} {self.dtype} ({size} B/sample)"


@dataclasses.dataclass(frozen=True)
class Boundary:
    """What crosses from stage ``index`` to stage ``index + 1``, in the order the stage returns it."""

    index: int
    tensors: tuple[CrossingTensor, ...]

    @property
    def bytes_per_sample(self) -> int | None:
        """Bytes sent per sample (``None`` if a tensor's size per sample is not known)."""
        sizes = [t.bytes_per_sample for t in self.tensors]
        return None if any(s is None for s in sizes) else int(sum(sizes))

    def __str__(self) -> str:
        size = "?" if self.bytes_per_sample is None else str(self.bytes_per_sample)
        lines = [f"stage {self.index} -> {self.index + 1}: {len(self.tensors)} tensor(s), {size} B/sample"]
        return "\n".join(lines + [f"  {t}" for t in self.tensors])


@keras.saving.register_keras_serializable(package="pipeline")
class AttachMask(keras.layers.Layer):
    """Identity on ``[x, mask]`` that returns ``x`` with ``mask`` attached as its Keras mask."""

    def __init__(self, **kwargs: Any):
        super().__init__(autocast=False, **kwargs)
        self.supports_masking = True

    def call(self, inputs: list[Any]) -> Any:
        """Returns a copy of ``inputs[0]`` (its mask is set by :meth:`compute_mask`)."""
        return tf.identity(inputs[0])

    def compute_mask(self, inputs: list[Any], previous_mask: Any = None) -> Any:
        """The carried mask, ``inputs[1]``."""
        return inputs[1]

    def compute_output_spec(self, inputs: list[Any]) -> Any:
        """Same spec as ``inputs[0]``."""
        return keras.KerasTensor(inputs[0].shape, dtype=inputs[0].dtype)


def split(model: keras.Model, cuts: Sequence[str] | None = None, num_stages: int | None = None,
          balance: str = "params", sample_input: Any = None) -> list[keras.Model]:
    """Cuts ``model`` into consecutive stages.

    The layers are taken in a topological order (the model's layer order); a cut
    after layer L ends a stage with L. Whatever crosses a cut, however many
    tensors, is carried (see the module docstring); :func:`boundaries` describes it.

    Args:
        model: a built ``keras.Sequential`` or functional ``keras.Model``.
        cuts: names of the layers that end each stage but the last.
        num_stages: instead of ``cuts``, cut into K stages: the largest stage cost
            is as small as possible (exact); among such cuts, the one sending the
            fewest bytes per sample across its boundaries.
        balance: ``"params"`` (parameter count per layer) or ``"time"``
            (measured forward+backward time per layer; needs ``sample_input``).
        sample_input: a batch used to profile layers when ``balance="time"``.

    Returns:
        K Keras models; stage i+1 takes stage i's output (a list when several
        tensors cross).

    Raises:
        SplitError: unknown cut layer, cuts out of order, a cut through a layer
            called more than once, or more stages than the model can be cut into.
    """
    if not isinstance(model, keras.Model):
        raise SplitError(f"split() needs a Keras Sequential or functional model, got {type(model).__name__}")
    if not model.built:
        raise SplitError(
            f"model {model.name!r} is not built: give it an Input (keras.Input(shape)) or call "
            "model.build(input_shape) before split()"
        )
    if (cuts is None) == (num_stages is None):
        raise SplitError("split() takes either cuts=[layer names] or num_stages=K, not both or neither")
    layers = _ordered_layers(model)
    if isinstance(model, keras.Sequential):
        if num_stages is not None:
            positions = _balanced_cuts(model, layers, list(range(len(layers))), num_stages, balance, sample_input)
        else:
            positions = _cut_positions(model, layers, list(cuts))
        return _split_sequential(model, layers, positions)
    graph = _Graph(model, layers)
    if num_stages is not None:
        positions = _balanced_cuts(model, layers, graph.node_layers, num_stages, balance, sample_input, graph)
    else:
        positions = graph.positions(list(cuts))
    return graph.build(positions)


def boundaries(stages: Sequence[keras.layers.Layer]) -> list[Boundary]:
    """Describes what crosses each boundary of ``stages`` (from :func:`split`, or any built Keras models).

    Args:
        stages: the K stages.

    Returns:
        K-1 :class:`Boundary` objects; ``print`` one to see its tensors and bytes per sample.
    """
    found = []
    for i, stage in enumerate(list(stages)[:-1]):
        tensors = _DESCRIBED.get(stage) if isinstance(stage, keras.Model) else None
        if tensors is None:
            outputs = keras.tree.flatten(stage.outputs) if getattr(stage, "outputs", None) else []
            tensors = [_describe(_compat.producer(t).name, t) for t in outputs]
        found.append(Boundary(i, tuple(tensors)))
    return found


def format_boundaries(stages: Sequence[keras.layers.Layer]) -> str:
    """:func:`boundaries` as text, one block per boundary."""
    return "\n".join(str(b) for b in boundaries(stages))


def _describe(name: str, tensor: Any) -> CrossingTensor:
    shape = tuple(tensor.shape)
    dims = shape[1:]
    size = None if any(d is None for d in dims) else int(math.prod(dims)) * tf.as_dtype(tensor.dtype).size
    return CrossingTensor(name, shape, str(tensor.dtype), size)


def _ordered_layers(model: keras.Model) -> list[keras.layers.Layer]:
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    return [op for op in model.operations if not isinstance(op, keras.layers.InputLayer)]


def _cut_positions(model: keras.Model, layers: list, cuts: list[str]) -> list[int]:
    names = [layer.name for layer in layers]
    positions = []
    for name in cuts:
        if name not in names:
            raise SplitError(
                f"cut layer {name!r} is not a layer of model {model.name!r}; its layers are: "
                f"{', '.join(names)}"
            )
        pos = names.index(name)
        if pos == len(layers) - 1:
            raise SplitError(f"cut layer {name!r} is the model's last layer: nothing would follow the cut")
        if positions and pos <= positions[-1]:
            raise SplitError(
                f"cuts must follow the model's layer order: {name!r} comes before or at "
                f"{names[positions[-1]]!r}"
            )
        positions.append(pos)
    return positions


def _split_sequential(model: keras.Sequential, layers: list, positions: list[int]) -> list[keras.Model]:
    bounds = [0] + [p + 1 for p in positions] + [len(layers)]
    stages = []
    for k in range(len(bounds) - 1):
        part = layers[bounds[k]: bounds[k + 1]]
        first = part[0]
        shape = model.inputs[0].shape if k == 0 and getattr(model, "inputs", None) else None
        if shape is None:
            prev = layers[bounds[k] - 1] if k else None
            shape = prev.output.shape if prev is not None else first.input.shape
        stage = keras.Sequential([keras.Input(shape[1:])] + part, name=f"{model.name}_stage{k}")
        stages.append(stage)
    return stages


def _kahn(calls: list[tuple[int, int]], needs: dict[tuple[int, int], set]) -> list[tuple[int, int]]:
    """Kahn's topological order of ``calls``; among the ready calls, the first in ``calls`` (the model's order).

    A heap of ready calls keyed by their position: O(n log n + edges) for models with thousands of layers.
    """
    position = {key: i for i, key in enumerate(calls)}
    users: dict[tuple[int, int], list[tuple[int, int]]] = {key: [] for key in calls}
    missing = {key: len(needs[key]) for key in calls}
    for key in calls:
        for need in needs[key]:
            users[need].append(key)
    ready = [position[key] for key in calls if not missing[key]]
    heapq.heapify(ready)
    order = []
    while ready:
        key = calls[heapq.heappop(ready)]
        order.append(key)
        for user in users[key]:
            missing[user] -= 1
            if not missing[user]:
                heapq.heappush(ready, position[user])
    return order


class _Graph:
    """The calls (nodes) of a functional model in a topological order, and what crosses after each."""

    def __init__(self, model: keras.Model, layers: list):
        self.model = model
        self.layers = layers
        calls = [(li, c) for li, layer in enumerate(layers) for c in range(_compat.call_count(layer, model))]
        made = {id(t): (li, c) for li, c in calls for t in _compat.call_outputs(layers[li], c, model)}
        needs = {key: {made[id(t)] for t in _compat.call_inputs(layers[key[0]], key[1], model) if id(t) in made}
                 for key in calls}
        self.nodes = _kahn(calls, needs)
        self.node_layers = [li for li, _ in self.nodes]
        where = {key: p for p, key in enumerate(self.nodes)}
        self.made_at = {id(t): -1 for t in model.inputs}
        self.tensors = {id(t): t for t in model.inputs}
        self.names = {id(t): f"input {_compat.producer(t).name}" for t in model.inputs}
        for key, p in where.items():
            for t in _compat.call_outputs(layers[key[0]], key[1], model):
                self.made_at[id(t)], self.tensors[id(t)] = p, t
                self.names[id(t)] = layers[key[0]].name
        end = len(self.nodes)
        self.last_use = {i: -1 for i in self.made_at}
        for p, (li, c) in enumerate(self.nodes):
            for t in _compat.call_inputs(layers[li], c, model):
                self.last_use[id(t)] = max(self.last_use[id(t)], p)
        for t in model.outputs:
            self.last_use[id(t)] = end
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for p, li in enumerate(self.node_layers):
            first.setdefault(li, p)
            last[li] = p
        self.spans = [(li, first[li], last[li]) for li in first if first[li] != last[li]]

    def crossing(self, pos: int) -> list[Any]:
        """Tensors made at or before node ``pos`` (model inputs included) and used after it."""
        ids = [i for i in self.made_at if self.made_at[i] <= pos < self.last_use[i]]
        ids.sort(key=lambda i: self.made_at[i])  # stable: inputs in model order, then outputs in call order
        return [self.tensors[i] for i in ids]

    def valid(self, pos: int) -> bool:
        """Whether a cut after node ``pos`` keeps every call of each layer in one stage."""
        return pos < len(self.nodes) - 1 and not any(a <= pos < b for _, a, b in self.spans)

    def positions(self, cuts: list[str]) -> list[int]:
        """Node positions of the cut layers, checked."""
        positions = _cut_positions(self.model, self.layers, cuts)  # names, order of layers
        result = []
        for name, lpos in zip(cuts, positions):
            calls = [p for p, li in enumerate(self.node_layers) if li == lpos]
            if len(calls) != 1:
                raise SplitError(
                    f"cut layer {name!r} is called {len(calls)} times in the model; "
                    "cut at a layer that is used once"
                )
            pos = calls[0]
            for li, a, b in self.spans:
                if a <= pos < b:
                    raise SplitError(
                        f"cannot cut after layer {name!r}: layer {self.layers[li].name!r} is called both before "
                        "and after it, and a layer's calls must stay in one stage (its weights live on one "
                        f"device); cut before {self.layers[li].name!r}'s first call or after "
                        "its last"
                    )
            if pos == len(self.nodes) - 1:
                raise SplitError(f"cut layer {name!r} is the model's last layer: nothing would follow the cut")
            if result and pos <= result[-1]:
                raise SplitError(f"cuts must follow the model's layer order: {name!r} comes before or at "
                                 f"{self.layers[self.node_layers[result[-1]]].name!r}")
            result.append(pos)
        return result

    def bytes_per_sample(self, pos: int) -> float:
        """Bytes per sample crossing after node ``pos``, unknown axes counted as 1, masks included."""
        total = 0.0
        for t in self.crossing(pos):
            for x in [t] + ([m] if (m := _compat.keras_mask(t)) is not None else []):
                total += math.prod(d or 1 for d in x.shape[1:]) * tf.as_dtype(x.dtype).size
        return total

    def build(self, positions: list[int]) -> list[keras.Model]:
        """The stage models: the model's layers called again, stage by stage, on new inputs."""
        bounds = [-1, *positions, len(self.nodes) - 1]
        stages = []
        received: list[Any] = []
        for k in range(len(bounds) - 1):
            values: dict[int, Any] = {}
            if k == 0:
                inputs = self.model.input
                values.update({id(t): t for t in self.model.inputs})
            else:
                inputs = []
                for t in received:
                    x = keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype)
                    inputs.append(x)
                    mask = _compat.keras_mask(t)
                    if mask is not None:
                        m = keras.Input(batch_shape=tuple(mask.shape), dtype=mask.dtype)
                        inputs.append(m)
                        x = AttachMask(name=f"{self.model.name}_stage{k}_mask{len(inputs) - 1}")([x, m])
                    values[id(t)] = x
            for li, c in self.nodes[bounds[k] + 1: bounds[k + 1] + 1]:
                layer = self.layers[li]
                args, kwargs = _compat.fill_call_arguments(layer, values, c, self.model)
                out = keras.tree.flatten(layer(*args, **kwargs))
                for orig, new in zip(_compat.call_outputs(layer, c, self.model), out):
                    values[id(orig)] = new
            if k == len(bounds) - 2:
                outputs = keras.tree.map_structure(lambda t: values[id(t)], self.model.output)
                described: list[CrossingTensor] = []
            else:
                received = self.crossing(bounds[k + 1])
                outputs, described = [], []
                for t in received:
                    outputs.append(values[id(t)])
                    described.append(_describe(self.names[id(t)], t))
                    if _compat.keras_mask(t) is not None:
                        mask = _compat.keras_mask(values[id(t)])
                        if mask is None:
                            raise SplitError(f"the Keras mask of {self.names[id(t)]!r} was lost rebuilding stage {k}")
                        outputs.append(mask)
                        described.append(_describe(f"mask of {self.names[id(t)]}", mask))
            if k and len(inputs) == 1:
                inputs = inputs[0]
            if isinstance(outputs, list) and len(outputs) == 1:
                outputs = outputs[0]
            stage = keras.Model(inputs, outputs, name=f"{self.model.name}_stage{k}")
            _DESCRIBED[stage] = described
            stages.append(stage)
        return stages


def _balanced_cuts(model: keras.Model, layers: list, node_layers: list[int], num_stages: int, balance: str,
                   sample_input: Any, graph: _Graph | None = None) -> list[int]:
    """Positions (in ``node_layers``) ending stages 0..K-2: exact min-max of stage cost, then fewest bytes."""
    check_count("num_stages", num_stages, error=SplitError)
    valid = [p for p in range(len(node_layers) - 1) if graph is None or graph.valid(p)]
    if num_stages - 1 > len(valid):
        shared = " (a layer called more than once keeps all its calls in one stage)" if graph and graph.spans else ""
        raise SplitError(
            f"num_stages={num_stages} needs {num_stages - 1} cuts, but model {model.name!r} can be cut at only "
            f"{len(valid)} place(s){shared}; use at most {len(valid) + 1} stages"
        )
    from pipeline.core import balance as balance_lib  # noqa: PLC0415 - heavy profiling code, only when asked

    costs = balance_lib.layer_costs(model, balance, sample_input, layers=layers)
    seen: set = set()
    node_costs = []
    for li in node_layers:  # a layer called several times is charged once, at its first call
        node_costs.append(0.0 if li in seen else costs[li])
        seen.add(li)
    # Merge each run of calls between valid cut points into one block, then partition blocks.
    blocks, block_end, cut_bytes, start = [], [], [0.0], 0
    for pos in valid + [len(node_layers) - 1]:
        blocks.append(sum(node_costs[start: pos + 1]))
        block_end.append(pos)
        start = pos + 1
    if graph is not None:
        cut_bytes += [graph.bytes_per_sample(pos) for pos in valid]
    points = balance_lib.partition_points(blocks, num_stages, cut_costs=cut_bytes if graph is not None else None)
    _warn_if_unbalanced(model, balance, balance_lib.stage_sums(blocks, points))
    return [block_end[p - 1] for p in points]


UNBALANCED = 1.5
"""A balanced split warns when its costliest stage exceeds this multiple of the mean stage cost."""


def _warn_if_unbalanced(model: keras.Model, balance: str, sums: list[float]) -> None:
    """Warns when the best split the graph allows still leaves one stage far above the mean."""
    total = sum(sums)
    if len(sums) < 2 or total <= 0 or max(sums) <= UNBALANCED * total / len(sums):
        return
    worst = max(range(len(sums)), key=sums.__getitem__)
    shares = ", ".join(f"{100 * s / total:.0f}%" for s in sums)
    warnings.warn(
        f"split({model.name!r}, num_stages={len(sums)}, balance={balance!r}): stage {worst} holds "
        f"{100 * sums[worst] / total:.0f}% of the {balance} cost (stages: {shares}; an even split would be "
        f"{100 / len(sums):.0f}% each). This is the most even split the graph allows: one block between "
        "two possible cuts is that large. Use fewer stages, another balance mode, or place that stage on "
        "the fastest device.", stacklevel=3)
