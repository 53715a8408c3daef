"""Issue 11, items 3 and 7: balance and split on every layer kind, splitting twice, verify on multi-input models.

Every numeric check compares against the unsplit model.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.core import balance as balance_lib
from pipeline.core.partition import split
from pipeline.core.verify import verify


def _chain(stages, x):
    for stage in stages:
        x = stage(x)
    return x


def _embedding_ops_model():
    """Token ids -> Embedding (sparse gradient) -> mask ops (keras.ops.not_equal, cast, multiply) -> Dense/relu."""
    ids = keras.Input((5,), dtype="int32", name="ids")
    emb = keras.layers.Embedding(10, 4, name="emb")(ids)
    mask = keras.ops.cast(keras.ops.not_equal(ids, 0), "float32")
    h = emb * keras.ops.expand_dims(mask, -1)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(6, name="d1")(h)
    h = keras.ops.relu(h)
    h = keras.layers.Dense(6, name="d2")(h)
    out = keras.layers.Dense(2, name="d3")(h)
    return keras.Model(ids, out)


def _ids():
    return np.random.default_rng(0).integers(0, 10, (4, 5)).astype("int32")


@pytest.mark.parametrize("balance", ["params", "time"])
def test_balance_works_with_embedding_and_direct_ops(balance):
    model = _embedding_ops_model()
    x = _ids()
    kwargs = {"sample_input": x} if balance == "time" else {}
    stages = split(model, num_stages=3, balance=balance, **kwargs)
    assert len(stages) == 3
    np.testing.assert_allclose(_chain(stages, x), model(x), rtol=1e-6, atol=1e-6)


def test_layer_costs_cover_ops_without_weights():
    model = _embedding_ops_model()
    ops = [op for op in model.operations if not isinstance(op, keras.layers.InputLayer)]
    params = balance_lib.layer_costs(model, "params", layers=ops)
    by_name = dict(zip([op.name for op in ops], params))
    assert by_name["emb"] == 40 and by_name["d1"] == 20 * 6 + 6
    assert sum(params) == model.count_params()
    assert all(c == 0 for op, c in zip(ops, params) if not getattr(op, "weights", None))
    times = balance_lib.layer_costs(model, "time", sample_input=_ids(), layers=ops, repeats=1)
    assert len(times) == len(ops) and all(t >= 0 for t in times)


def test_split_same_model_twice():
    model = _embedding_ops_model()
    x = _ids()
    first = split(model, num_stages=2)
    second = split(model, num_stages=2)
    assert [s.count_params() for s in first] == [s.count_params() for s in second]
    third = split(model, cuts=["flat", "d2"])
    assert len(third) == 3
    for stages in (first, second, third):
        np.testing.assert_allclose(_chain(stages, x), model(x), rtol=1e-6, atol=1e-6)


def test_split_a_stage_again():
    model = _embedding_ops_model()
    x = _ids()
    head, tail = split(model, cuts=["flat"])
    a, b = split(tail, cuts=["d2"])
    np.testing.assert_allclose(b(a(head(x))), model(x), rtol=1e-6, atol=1e-6)


def _two_input_model():
    a = keras.Input((3,), name="a")
    b = keras.Input((4,), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(5, name="da")(a), keras.layers.Dense(5, name="db")(b)])
    h = keras.layers.Dense(4, name="mid")(h)
    return keras.Model([a, b], keras.layers.Dense(1, name="head")(h))


class TwoIn(keras.layers.Layer):
    """An unbuilt stage taking a dict, list or tuple of two inputs."""

    def build(self, input_shape):
        first = input_shape["a"] if isinstance(input_shape, dict) else input_shape[0]
        second = input_shape["b"] if isinstance(input_shape, dict) else input_shape[1]
        self.w = self.add_weight(shape=(first[-1] + second[-1], 3), initializer="glorot_uniform")

    def call(self, inputs):
        a, b = (inputs["a"], inputs["b"]) if isinstance(inputs, dict) else inputs
        return keras.ops.matmul(keras.ops.concatenate([a, b], -1), self.w)


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
def test_verify_multi_input(kind):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(4, 4)).astype("float32")
    y = rng.normal(size=(4, 1)).astype("float32")
    x = {"list": [a, b], "tuple": (a, b), "dict": {"a": a, "b": b}}[kind]
    stages = [TwoIn(), keras.layers.Dense(1)]  # unbuilt: verify builds them from x's shapes
    report = verify(stages, x, y, "mse", microbatches=2)
    assert report.ok, str(report)
    # the same from a split functional model, against the unsplit model's loss
    model = _two_input_model()
    parts = split(model, cuts=["mid"])
    xs = [a, b] if kind != "tuple" else (a, b)
    report = verify(parts, xs, y, "mse", microbatches=2)
    assert report.ok, str(report)
    want = float(keras.losses.MeanSquaredError()(y, model([a, b])))
    assert report.loss_pipelined == pytest.approx(want, rel=1e-5)


def test_balance_time_on_plain_embedding_model():
    """No ops: the Embedding's sparse IndexedSlices gradient alone used to crash the "time" profiler."""
    ids = keras.Input((5,), dtype="int32")
    h = keras.layers.Flatten()(keras.layers.Embedding(10, 4)(ids))
    h = keras.layers.Dense(6)(h)
    model = keras.Model(ids, keras.layers.Dense(2)(h))
    x = _ids()
    stages = split(model, num_stages=2, balance="time", sample_input=x)
    np.testing.assert_allclose(_chain(stages, x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("by", ["num_stages", "cuts"])
def test_split_plain_functional_model_twice(by):
    inp = keras.Input((4,))
    h = keras.layers.Dense(5, name="l1")(inp)
    h = keras.layers.Dense(5, name="l2")(h)
    h = keras.layers.Dense(5, name="l3")(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="l4")(h))
    x = np.random.default_rng(2).normal(size=(3, 4)).astype("float32")
    kwargs = {"num_stages": 3} if by == "num_stages" else {"cuts": ["l1", "l3"]}
    for _ in range(3):
        stages = split(model, **kwargs)
        assert len(stages) == 3
        np.testing.assert_allclose(_chain(stages, x), model(x), rtol=1e-6, atol=1e-6)


def _dropout_stages():
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="a")(inp)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    h = keras.layers.Dense(8, name="b")(h)
    return split(keras.Model(inp, keras.layers.Dense(1, name="c")(h)), cuts=["drop"])


def test_verify_dropout_same_draws_at_m1():
    stages = _dropout_stages()
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(8, 6)).astype("float32"), rng.normal(size=(8, 1)).astype("float32")
    report = verify(stages, x, y, "mse", microbatches=1)
    assert report.ok, str(report)
    assert report.loss_pipelined == pytest.approx(report.loss_unsplit, rel=1e-6)
    assert "same seeded masks" in str(report)
    report = verify(stages, x, y, "mse", microbatches=2)
    assert "each micro-batch draws its own mask" in str(report)


def test_verify_tolerance_is_relative_to_the_largest_gradient(monkeypatch):
    """A float-noise difference on a near-zero gradient passes; a real error (scaled gradient) still fails."""
    from pipeline.core import verify as verify_mod
    from pipeline.core.stage import Stage

    inp = keras.Input((4,))
    h = keras.layers.Dense(4, name="big")(inp)
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(h))
    stages = split(model, cuts=["big"])
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 1)).astype("float32")
    clean = verify(stages, x, y, "mse", microbatches=2)
    assert clean.ok and clean.scale > 0
    # float noise 1e-7 of the largest gradient on a variable: per-variable relative error may be huge, yet ok
    check = verify_mod._compare(0, stages[0].trainable_variables[1], np.full((4,), 1e-7 * clean.scale + 1e-12),
                                np.full((4,), 1e-12), 1e-5 * clean.scale + 1e-6)
    assert check.close and check.max_rel > 1e3
    original = Stage.backward

    def doubled(self, microbatch, grad=None):
        return original(self, microbatch, None if grad is None else [2.0 * g for g in grad])

    monkeypatch.setattr(Stage, "backward", doubled)
    assert not verify(stages, x, y, "mse", microbatches=2).ok
    real_error = verify(stages, x, y, "mse", microbatches=2)
    assert not any("float32 rounding" in note for note in real_error.notes)  # a real error is not "noise"


def test_verify_names_float_noise_as_the_cause_of_tiny_failures(monkeypatch):
    from pipeline.core.stage import Stage

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(keras.layers.Dense(4, name="big")(inp)))
    stages = split(model, cuts=["big"])
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 1)).astype("float32")
    original = Stage.backward

    def nudged(self, microbatch, grad=None):  # a 2e-5 relative error on the cut gradient: float-noise sized
        return original(self, microbatch, None if grad is None else [g * (1 + 2e-5) for g in grad])

    monkeypatch.setattr(Stage, "backward", nudged)
    report = verify(stages, x, y, "mse", microbatches=2, rtol=1e-7, atol=0.0)
    assert not report.ok
    assert any("float32 rounding" in note and "rtol=0.0001" in note for note in report.notes), report.notes
    assert verify(stages, x, y, "mse", microbatches=2, rtol=1e-4).ok
