"""Issue 11, items 1-2: cuts that any set of tensors crosses (skips, masks, second inputs), compared with the unsplit model."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import pipeline
from pipeline.core import balance as balance_lib
from pipeline.core.partition import boundaries, format_boundaries, split
from pipeline.errors import SettingError, SplitError
from pipeline.perf import planner


def _unet() -> keras.Model:
    """Conv down x2, bottleneck, up x2 with Concatenate skips (8x8x1 -> 8x8x1)."""
    x = keras.Input((8, 8, 1), name="img")
    c1 = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(x)
    c2 = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(keras.layers.MaxPooling2D(name="p1")(c1))
    b = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="b")(keras.layers.MaxPooling2D(name="p2")(c2))
    u2 = keras.layers.Concatenate(name="cat2")([keras.layers.UpSampling2D(name="u2")(b), c2])
    c3 = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c3")(u2)
    u1 = keras.layers.Concatenate(name="cat1")([keras.layers.UpSampling2D(name="u1")(c3), c1])
    c4 = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c4")(u1)
    return keras.Model(x, keras.layers.Conv2D(1, 1, name="out")(c4), name="unet")


def _transformer() -> keras.Model:
    """Token ids -> Embedding -> 2 encoder blocks with an explicit padding attention mask -> masked mean -> Dense."""
    ids = keras.Input((6,), dtype="int32", name="ids")
    pad = keras.ops.not_equal(ids, 0)
    attn = keras.ops.logical_and(keras.ops.expand_dims(pad, 1), keras.ops.expand_dims(pad, 2))
    x = keras.layers.Embedding(12, 8, name="emb")(ids)
    for i in range(2):
        a = keras.layers.MultiHeadAttention(2, 4, name=f"mha{i}")(x, x, attention_mask=attn)
        x = keras.layers.LayerNormalization(name=f"ln{i}a")(keras.layers.Add(name=f"add{i}a")([x, a]))
        f = keras.layers.Dense(8, name=f"ff{i}b")(keras.layers.Dense(16, activation="relu", name=f"ff{i}a")(x))
        x = keras.layers.LayerNormalization(name=f"ln{i}b")(keras.layers.Add(name=f"add{i}b")([x, f]))
    weight = keras.ops.expand_dims(keras.ops.cast(keras.ops.not_equal(ids, 0), "float32"), -1)
    pooled = keras.ops.sum(x * weight, axis=1) / keras.ops.maximum(keras.ops.sum(weight, axis=1), 1.0)
    return keras.Model(ids, keras.layers.Dense(3, name="head")(pooled), name="encoder")


def _lstm() -> keras.Model:
    ids = keras.Input((6,), dtype="int32", name="ids")
    h = keras.layers.Embedding(12, 4, mask_zero=True, name="emb")(ids)
    h = keras.layers.LSTM(5, name="lstm")(h)
    return keras.Model(ids, keras.layers.Dense(3, name="head")(h), name="masked_lstm")


def _masked_attention() -> keras.Model:
    ids = keras.Input((6,), dtype="int32", name="ids")
    h = keras.layers.Embedding(12, 4, mask_zero=True, name="emb")(ids)
    h = keras.layers.MultiHeadAttention(2, 2, name="mha")(h, h)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(ids, keras.layers.Dense(3, name="head")(h), name="masked_attention")


def _two_inputs() -> keras.Model:
    img, tab = keras.Input((6, 6, 1), name="img"), keras.Input((3,), name="tab")
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(img)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv2")(h)
    h = keras.layers.Dense(8, activation="relu", name="dense")(keras.layers.Flatten(name="flat")(h))
    h = keras.layers.Concatenate(name="join")([h, tab])
    return keras.Model([img, tab], keras.layers.Dense(2, name="head")(h), name="two_inputs")


def _dict_inputs() -> keras.Model:
    """Dict inputs and dict outputs: the tabular input is used late, the image output early."""
    img, tab = keras.Input((6, 6, 1), name="img"), keras.Input((3,), name="tab")
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(img)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(8, activation="relu", name="dense")(keras.layers.Flatten(name="flat")(h))
    h = keras.layers.Concatenate(name="join")([h, tab])
    outputs = {"cls": keras.layers.Dense(2, name="cls")(h), "aux": keras.layers.Dense(1, name="aux")(pooled)}
    return keras.Model({"img": img, "tab": tab}, outputs, name="dict_inputs")


def _ids(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 12, (n, 6)).astype("int32")
    for i in range(n):  # padding at the end, of varying length (row 0 has none)
        ids[i, 6 - i % 4:] = 0
    return ids


def _data(name: str, n: int):
    rng = np.random.default_rng(1)
    if name == "unet":
        x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
        return x, np.tanh(x)
    if name == "two_inputs":
        return [rng.normal(size=(n, 6, 6, 1)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")], \
            rng.integers(0, 2, n).astype("int32")
    if name == "dict_inputs":
        return ({"img": rng.normal(size=(n, 6, 6, 1)).astype("float32"), "tab": rng.normal(size=(n, 3)).astype("float32")},
                {"cls": rng.integers(0, 2, n).astype("int32"), "aux": rng.normal(size=(n, 1)).astype("float32")})
    return _ids(n), rng.integers(0, 3, n).astype("int32")


BUILD = {"unet": _unet, "encoder": _transformer, "masked_lstm": _lstm, "masked_attention": _masked_attention,
         "two_inputs": _two_inputs, "dict_inputs": _dict_inputs}
LOSS = {"unet": "mse", "dict_inputs": {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                       "aux": "mse"}}


def _fit_both(name: str, m: int, schedule: str, cuts=None, num_stages=None, balance="params", steps=3, batch=4,
              extra=0, recompute=False, loop=False):
    """Fits the pipeline and the unsplit model from the same weights; returns both weight lists and losses."""
    model, reference = BUILD[name](), BUILD[name]()
    reference.set_weights(model.get_weights())
    x, y = _data(name, steps * batch + extra)  # extra < batch: a last, smaller batch
    sample = keras.tree.map_structure(lambda t: t[:batch], x) if balance == "time" else None
    stages = split(model, cuts=cuts, num_stages=num_stages, balance=balance, sample_input=sample)
    piped = pipeline.PipelineModel(stages, devices="cpu", microbatches=m, schedule=schedule, recompute=recompute,
                                   loop=loop)
    loss = LOSS.get(name, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weights = {"cls": 1.0, "aux": 0.5} if isinstance(loss, dict) else None
    piped.compile(keras.optimizers.SGD(0.2), loss, loss_weights=weights)
    reference.compile(keras.optimizers.SGD(0.2), loss, loss_weights=weights)
    got = piped.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0).history["loss"]
    want = reference.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(model.get_weights(), BUILD[name]().get_weights()))
    return stages, piped, x


def _chain(stages, x):
    for stage in stages:
        x = stage(x)
    return x


def test_unet_cut_at_the_bottleneck_trains_like_the_unsplit_model():
    stages, piped, x = _fit_both("unet", 2, "1f1b", cuts=["b"])
    (boundary,) = boundaries(stages)
    assert [t.producer for t in boundary.tensors] == ["c1", "c2", "b"]
    np.testing.assert_allclose(piped.predict(x, batch_size=4, verbose=0), _chain(stages, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,m,schedule", [(2, 4, "gpipe"), (3, 2, "1f1b"), (4, 4, "1f1b")])
def test_unet_balanced_into_k_stages_trains_like_the_unsplit_model(k, m, schedule):
    stages, _, _ = _fit_both("unet", m, schedule, num_stages=k)
    assert len(stages) == k
    assert sum(s.count_params() for s in stages) == _unet().count_params()


@pytest.mark.parametrize("name,cuts,batch,extra", [("unet", ["b"], 8, 2), ("encoder", ["ln0b"], 9, 3)])
def test_looped_gpipe_carries_skips_masks_and_ids_with_uneven_and_short_batches(name, cuts, batch, extra, monkeypatch):
    """GPipe with every stage recomputed runs as tick loops (pipeline.core.looped): several tensors cross
    the cut through its TensorArrays; batches of 8 and 9 at M=6 have uneven micro-batches (2, 2, 1, 1, 1, 1
    and 2, 2, 2, 1, 1, 1); the last batch (extra < M samples) runs one sample at a time."""
    from pipeline.core import looped

    runs = []
    real = looped.LoopedGPipe.train
    monkeypatch.setattr(looped.LoopedGPipe, "train", lambda self, *a, **kw: runs.append(1) or real(self, *a, **kw))
    _fit_both(name, 6, "gpipe", cuts=cuts, batch=batch, extra=extra, recompute=True, loop=True)
    assert runs  # the looped step was built (not the unrolled one)


def test_unet_k4_by_params_keeps_every_stage_under_40_percent():
    model = _unet()
    stages = split(model, num_stages=4, balance="params")
    shares = [s.count_params() / model.count_params() for s in stages]
    assert max(shares) <= 0.40, shares
    x, _ = _data("unet", 2)
    np.testing.assert_allclose(_chain(stages, x), model(x), rtol=1e-6, atol=1e-6)


def test_transformer_cut_mid_model_carries_the_attention_mask_and_the_ids():
    stages, piped, x = _fit_both("encoder", 2, "gpipe", cuts=["ln0b"])
    (boundary,) = boundaries(stages)  # block 1 needs the ids (for the pooling weights) and the attention mask
    assert [(t.producer, t.shape, t.dtype) for t in boundary.tensors] == [
        ("input ids", (None, 6), "int32"), ("logical_and", (None, 6, 6), "bool"), ("ln0b", (None, 6, 8), "float32")]
    np.testing.assert_allclose(piped.predict(x, batch_size=4, verbose=0), _chain(stages, x), rtol=1e-5, atol=1e-6)


def test_masked_lstm_cut_between_embedding_and_lstm_trains_like_the_unsplit_model():
    stages, piped, x = _fit_both("masked_lstm", 2, "1f1b", cuts=["emb"], extra=1)  # last batch 1 < M
    (boundary,) = boundaries(stages)
    assert [(t.producer, t.dtype, t.bytes_per_sample) for t in boundary.tensors] == [
        ("input ids", "int32", 24), ("emb", "float32", 6 * 4 * 4), ("mask of emb", "bool", 6)]
    # a batch smaller than M runs one sample at a time
    np.testing.assert_allclose(piped.predict(x[:1], verbose=0), _chain(stages, x[:1]), rtol=1e-5, atol=1e-6)


def test_mask_read_at_run_time_crosses_the_cut_and_is_re_attached():
    # MultiHeadAttention(x, x) reads x's Keras mask from the tensor: it is no edge of the graph
    stages, _, x = _fit_both("masked_attention", 2, "gpipe", cuts=["emb"])
    ids, emb, mask = stages[0](x)
    np.testing.assert_array_equal(mask, x != 0)
    with_mask = stages[1]([ids, emb, mask])
    without = stages[1]([ids, emb, tf.ones_like(mask)])
    assert np.abs(with_mask - without).max() > 1e-3


def test_two_input_model_cut_inside_the_image_branch_passes_the_tabular_input_through():
    stages, piped, x = _fit_both("two_inputs", 2, "gpipe", cuts=["conv1", "flat"])
    first, second = boundaries(stages)
    assert [t.producer for t in first.tensors] == ["input tab", "conv1"]
    assert [t.producer for t in second.tensors] == ["input tab", "flat"]
    report = pipeline.verify(stages, x, _data("two_inputs", 12)[1], keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), microbatches=2, schedule="1f1b", devices="cpu")
    assert report.ok and report.max_abs < 1e-6, str(report)


@pytest.mark.parametrize("cuts,num_stages", [(["conv1", "dense"], None), (None, 3)])
def test_dict_inputs_and_outputs_through_split(cuts, num_stages):
    stages, piped, x = _fit_both("dict_inputs", 2, "1f1b", cuts=cuts, num_stages=num_stages, extra=1)
    assert set(piped.predict(x, verbose=0)) == {"cls", "aux"}
    assert any("input tab" in [t.producer for t in b.tensors] for b in boundaries(stages))


BALANCED = [(name, k, balance, m, schedule)
            for name, rows in {"encoder": [(2, "time", 2, "1f1b"), (3, "params", 4, "gpipe"), (4, "time", 4, "1f1b")],
                               "two_inputs": [(2, "params", 4, "gpipe"), (3, "time", 2, "1f1b"),
                                              (4, "params", 2, "gpipe")],
                               "masked_lstm": [(2, "params", 2, "gpipe"), (3, "time", 4, "1f1b")]}.items()
            for k, balance, m, schedule in rows]


@pytest.mark.parametrize("name,k,balance,m,schedule", BALANCED,
                         ids=[f"{n}-K{k}-{b}-M{m}-{s}" for n, k, b, m, s in BALANCED])
def test_balanced_splits_of_masked_and_multi_input_models_train_like_the_unsplit_model(name, k, balance, m, schedule):
    stages, _, _ = _fit_both(name, m, schedule, num_stages=k, balance=balance)
    assert len(stages) == k


def test_boundary_description_lists_tensors_and_bytes_per_sample():
    stages = split(_unet(), cuts=["b"])
    (boundary,) = boundaries(stages)
    assert [(t.producer, t.shape, t.dtype, t.bytes_per_sample) for t in boundary.tensors] == [
        ("c1", (None, 8, 8, 8), "float32", 2048), ("c2", (None, 4, 4, 8), "float32", 512),
        ("b", (None, 2, 2, 8), "float32", 128)]
    assert boundary.bytes_per_sample == 2688
    text = format_boundaries(stages)
    assert "stage 0 -> 1: 3 tensor(s), 2688 B/sample" in text and "c2 (None, 4, 4, 8) float32 (512 B/sample)" in text
    x, _ = _data("unet", 4)
    sent = planner.boundary_bytes(stages, x[:2])
    assert sent == [2 * 2688]


def test_too_many_stages_says_how_many_are_possible():
    model = _unet()
    with pytest.raises(SplitError, match=r"num_stages=40 needs 39 cuts, .* use at most \d+ stages") as err:
        split(model, num_stages=40)
    most = int(re.search(r"use at most (\d+) stages", str(err.value)).group(1))
    assert most == len([op for op in model.operations if not isinstance(op, keras.layers.InputLayer)])
    stages = split(model, num_stages=most)
    x, _ = _data("unet", 2)
    np.testing.assert_allclose(_chain(stages, x), model(x), rtol=1e-6, atol=1e-6)


def test_a_shared_layer_keeps_its_calls_in_one_stage():
    x = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    h = keras.layers.Dense(4, name="mid")(shared(x))
    model = keras.Model(x, keras.layers.Dense(2, name="head")(shared(h)))
    with pytest.raises(SplitError, match=r"cannot cut after layer 'mid': layer 'shared' is called both before"):
        split(model, cuts=["mid"])
    with pytest.raises(SplitError, match=r"can be cut at only 1 place\(s\) \(a layer called more than once"):
        split(model, num_stages=3)
    stages = split(model, num_stages=2)
    data = np.ones((2, 4), "float32")
    np.testing.assert_allclose(_chain(stages, data), model(data), rtol=1e-6)


def test_partition_points_breaks_ties_by_the_fewest_cut_costs():
    costs = [1, 1, 1, 1]
    assert balance_lib.partition_points(costs, 2) == [2]
    assert balance_lib.partition_points(costs, 2, cut_costs=[0, 5, 9, 1]) == [2]
    assert balance_lib.partition_points([1, 1, 1, 1, 4], 2, cut_costs=[0, 1, 1, 9, 1]) == [4]
    assert balance_lib.partition_points([2, 1, 1, 2], 2, cut_costs=[0, 1, 1, 1]) == [2]
    assert balance_lib.partition_points([1, 0, 0, 1], 2, cut_costs=[0, 5, 1, 5]) == [2]


def test_stages_whose_boundaries_do_not_match_are_refused_before_any_compute():
    three_out = split(_unet(), cuts=["b"])[0]
    one_in = split(_unet(), cuts=["cat1"])[1]
    with pytest.raises(SettingError, match=r"stage 1 \('unet_stage1'\) takes 1 tensor\(s\) \[\(None, 8, 8, 12\)\], "
                                           r"but stage 0 \('unet_stage0'\) returns 3 tensor\(s\)"):
        pipeline.PipelineModel([three_out, one_in], devices="cpu")
