"""Make stages: cut a Sequential or functional Keras model at single-tensor boundaries.

The stages share the model's layers, so training the stages trains the model.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras

from pipeline.core import _compat
from pipeline.errors import SplitError, check_count


def split(model: keras.Model, cuts: Sequence[str] | None = None, num_stages: int | None = None,
          balance: str = "params", sample_input: Any = None) -> list[keras.Model]:
    """Cuts ``model`` into consecutive stages.

    Args:
        model: a built ``keras.Sequential`` or functional ``keras.Model``.
        cuts: names of the layers that end each stage but the last; the output
            of each must be the only tensor crossing that point.
        num_stages: instead of ``cuts``, cut into K stages balanced by ``balance``.
        balance: ``"params"`` (parameter count per layer) or ``"time"``
            (measured forward+backward time per layer; needs ``sample_input``).
        sample_input: a batch used to profile layers when ``balance="time"``.

    Returns:
        K Keras models; stage i+1 takes stage i's output.

    Raises:
        SplitError: unknown cut layer, cuts out of order, or a cut that more
            than one tensor crosses (naming those tensors).
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
    if num_stages is not None:
        cuts = _balanced_cuts(model, layers, num_stages, balance, sample_input)
    positions = _cut_positions(model, layers, list(cuts))
    if isinstance(model, keras.Sequential):
        return _split_sequential(model, layers, positions)
    return _split_functional(model, layers, positions)


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


def _crossing(model: keras.Model, layers: list, pos: int) -> list[Any]:
    """Tensors produced at or before layer ``pos`` (or model inputs) used after it."""
    index = {id(layer): i for i, layer in enumerate(layers)}
    crossing: list[Any] = []
    for layer in layers[pos + 1:]:
        for tensor in _compat.call_inputs(layer, model=model):
            producer = _compat.producer(tensor)
            if index.get(id(producer), -1) <= pos and all(tensor is not t for t in crossing):
                crossing.append(tensor)
    return crossing


def _split_functional(model: keras.Model, layers: list, positions: list[int]) -> list[keras.Model]:
    boundaries = []
    for pos in positions:
        layer = layers[pos]
        calls = _compat.call_count(layer, model)
        if calls != 1:
            raise SplitError(
                f"cut layer {layer.name!r} is called {calls} times in the model; "
                "cut at a layer that is used once"
            )
        outs = _compat.call_outputs(layer, model=model)
        if len(outs) != 1:
            raise SplitError(
                f"cannot cut after layer {layer.name!r}: it returns {len(outs)} tensors; a cut carries "
                "exactly one tensor today. Cut after a layer with one output."
            )
        out = outs[0]
        crossing = _crossing(model, layers, pos)
        others = [t for t in crossing if t is not out]
        if others:
            described = ", ".join(
                f"{_compat.producer(t).name} output {tuple(t.shape)}" for t in others
            )
            raise SplitError(
                f"cannot cut after layer {layer.name!r}: its output is not the only tensor crossing "
                f"that point; also crossing: {described}. Cut before or after the block those "
                "tensors belong to (e.g. after the residual Add)."
            )
        boundaries.append(out)
    ins = [model.inputs] + boundaries
    outs = boundaries + [model.outputs]
    stages = []
    for k, (i, o) in enumerate(zip(ins, outs)):
        i = i[0] if isinstance(i, list) and len(i) == 1 else i
        o = o[0] if isinstance(o, list) and len(o) == 1 else o
        stages.append(keras.Model(i, o, name=f"{model.name}_stage{k}"))
    return stages


def _balanced_cuts(model: keras.Model, layers: list, num_stages: int, balance: str,
                   sample_input: Any) -> list[str]:
    check_count("num_stages", num_stages, error=SplitError)
    candidates = _valid_cut_positions(model, layers)
    if num_stages - 1 > len(candidates):
        raise SplitError(
            f"num_stages={num_stages} needs {num_stages - 1} cuts, but model {model.name!r} has only "
            f"{len(candidates)} single-tensor boundaries; use at most {len(candidates) + 1} stages"
        )
    from pipeline.core import balance as balance_lib  # noqa: PLC0415 - heavy profiling code, only when asked

    costs = balance_lib.layer_costs(model, balance, sample_input, layers=layers)
    # Merge each run of layers between valid cut points into one block, then partition blocks.
    blocks, block_end, start = [], [], 0
    for pos in candidates + [len(layers) - 1]:
        blocks.append(sum(costs[start: pos + 1]))
        block_end.append(pos)
        start = pos + 1
    points = balance_lib.partition_points(blocks, num_stages)  # block index each stage 1.. starts at
    return [layers[block_end[p - 1]].name for p in points]


def _valid_cut_positions(model: keras.Model, layers: list) -> list[int]:
    if isinstance(model, keras.Sequential):
        return list(range(len(layers) - 1))
    valid = []
    for pos, layer in enumerate(layers[:-1]):
        if _compat.call_count(layer, model) != 1:
            continue
        crossing = _crossing(model, layers, pos)
        outs = _compat.call_outputs(layer, model=model)
        if len(crossing) == 1 and len(outs) == 1 and crossing[0] is outs[0]:
            valid.append(pos)
    return valid
