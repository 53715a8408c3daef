"""Topology-free checkpoints: resuming with other stages, cuts, M or replicas equals an unbroken run; misfit refused."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.core.model import PipelineModel
from pipeline.core.partition import split
from pipeline.errors import CheckpointError
from pipeline.train import ckpt_format, models
from pipeline.train.checkpoint import Checkpointer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
B, STEPS, AT = 8, 6, 3


def digits_like(head="dense1", hidden=16):
    """``digits_cnn`` (filters 4) with the dense layer's name and width chosen."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(hidden, activation="relu", name=head)(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="probs")(x))


def make(cuts, microbatches=2, schedule="1f1b", seed=0, **kw):
    keras.utils.set_random_seed(seed)
    stages = split(digits_like(**kw), cuts=cuts)
    pipe = PipelineModel(stages, devices="cpu", microbatches=microbatches, schedule=schedule)
    pipe.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    pipe.build((None, 8, 8, 1))
    pipe.optimizer.build(pipe.trainable_variables)
    return pipe, stages


def data():
    rng = np.random.default_rng(7)
    return rng.random((STEPS * B, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, STEPS * B).astype("int32")


def train(pipe, first, last):
    x, y = data()
    return [pipe.fit(x[s * B:(s + 1) * B], y[s * B:(s + 1) * B], batch_size=B, verbose=0,
                     shuffle=False).history["loss"][0] for s in range(first, last)]


def values(ckpt):
    return {k: v.numpy().copy() for k, v in ckpt.variables().items()}


@pytest.fixture(scope="module")
def reference():
    pipe, stages = make(["flatten"])
    losses = train(pipe, 0, STEPS)
    return losses, {v.path: v.numpy() for s in stages for v in s.variables}


@pytest.fixture
def saved(tmp_path):
    """A K=2 run checkpointed after step AT, and the values it saved."""
    pipe, stages = make(["flatten"])
    train(pipe, 0, AT)
    ckpt = Checkpointer(str(tmp_path), stages, pipe.optimizer, global_batch=B)
    ckpt.save(AT, 0, STEPS)
    return str(tmp_path), values(ckpt)


@pytest.mark.parametrize("cuts, m, schedule, rtol", [
    (["flatten"], 2, "1f1b", 0.0),                    # same topology: bit-identical
    (["conv1", "conv2", "dense1"], 4, "gpipe", 1e-5),  # K=2 -> K=4, other cuts, M and schedule
], ids=["same-topology", "K2-to-K4"])
def test_resume_on_another_topology_continues_the_run(reference, saved, cuts, m, schedule, rtol):
    ref_losses, ref_weights = reference
    directory, before = saved
    pipe, stages = make(cuts, microbatches=m, schedule=schedule, seed=99)  # other initial weights
    ckpt = Checkpointer(directory, stages, pipe.optimizer, global_batch=B)
    step, path = ckpt.restore_latest()
    assert (step, os.path.basename(path)) == (AT, f"ckpt-{AT}") and len(stages) == len(cuts) + 1
    restored = values(ckpt)
    assert restored.keys() == before.keys()
    for key in before:  # weights and every Adam slot, keyed by the model's paths
        np.testing.assert_array_equal(restored[key], before[key], err_msg=key)
    assert int(pipe.optimizer.iterations.numpy()) == AT
    assert np.abs(restored["optimizer/adam/dense1/kernel/velocity"]).max() > 0  # real slot state carried over
    losses = train(pipe, AT, STEPS)
    np.testing.assert_allclose(losses, ref_losses[AT:], rtol=rtol, atol=0)
    for s in stages:
        for v in s.variables:
            want = ref_weights[v.path]  # 1e-5 of the tensor's scale (Adam amplifies rounding in tiny gradients)
            np.testing.assert_allclose(v.numpy(), want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=v.path)
    if rtol == 0:
        assert losses == ref_losses[AT:]


@pytest.mark.parametrize("kw, message", [
    ({"head": "hidden"}, r"In the model, not in the checkpoint \(6\): model/hidden/bias, model/hidden/kernel, "
                         r"optimizer/adam/hidden/bias/momentum.*In the checkpoint, not in the model \(6\): "
                         r"model/dense1/bias, model/dense1/kernel"),
    ({"hidden": 12}, r"Shape or dtype differs for 9 variable\(s\): model/dense1/bias \(checkpoint \[16\] float32, "
                     r"model \[12\] float32\)"),
], ids=["renamed-layer", "other-sizes"])
def test_a_checkpoint_that_does_not_fit_is_refused_untouched(saved, kw, message):
    directory, _ = saved
    pipe, stages = make(["conv2"], seed=5, **kw)
    ckpt = Checkpointer(directory, stages, pipe.optimizer, global_batch=B)
    before = values(ckpt)
    with pytest.raises(CheckpointError, match=rf"ckpt-{AT} does not fit this model; nothing was restored.*{message}"):
        ckpt.restore_latest()
    for key, value in values(ckpt).items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"{key} was changed by a refused restore")


def test_other_global_batch_is_refused_for_training_but_evaluates(saved):
    directory, before = saved
    pipe, stages = make(["flatten"], seed=5)
    ckpt = Checkpointer(directory, stages, pipe.optimizer, global_batch=2 * B, replicas=2)
    untouched = values(ckpt)
    with pytest.raises(CheckpointError, match=r"global batch of 8 samples per step \(1 replica\(s\) x 8\), this run "
                                              r"has 16 \(2 x 8\).*Set data.batch_size to 4"):
        ckpt.restore_latest()
    assert all(np.array_equal(v, untouched[k]) for k, v in values(ckpt).items())
    assert ckpt.restore(os.path.join(directory, f"ckpt-{AT}")) == AT  # evaluation: no data position needed
    assert all(np.array_equal(v, before[k]) for k, v in values(ckpt).items())


def test_format_files_atomic_and_listed(saved):
    directory, before = saved
    names = sorted(os.listdir(directory))
    assert names == ["checkpoint", f"ckpt-{AT}.data-00000-of-00001", f"ckpt-{AT}.index"], names  # no temp files
    prefix = os.path.join(directory, f"ckpt-{AT}")
    assert tf.train.latest_checkpoint(directory) == prefix
    listed = dict(tf.train.list_variables(prefix))
    assert listed["model/dense1/kernel"] == [128, 16] and listed["optimizer/adam/conv1/kernel/momentum"] == [3, 3, 1, 4]
    meta = {k: int(tf.train.load_variable(prefix, f"meta/{k}")) for k in ckpt_format.META}
    assert meta == {"format_version": 1, "step": AT, "epoch": 0, "steps_per_epoch": STEPS, "samples": AT * B,
                    "global_batch": B, "replicas": 1}
    with open(prefix + ".tmp99.index", "wb") as f:  # a write killed half-way leaves only a temporary name
        f.write(b"garbage")
    pipe, stages = make(["flatten"], seed=5)
    assert Checkpointer(directory, stages, pipe.optimizer, global_batch=B).restore_latest()[0] == AT


def test_earlier_format_still_restores_and_refuses_other_models(tmp_path):
    pipe, stages = make(["flatten"])
    train(pipe, 0, 2)
    old = tf.train.Checkpoint(stages=stages, optimizer=pipe.optimizer, step=tf.Variable(2, dtype=tf.int64),
                              epoch=tf.Variable(0, dtype=tf.int64), steps_per_epoch=tf.Variable(6, dtype=tf.int64))
    path = tf.train.CheckpointManager(old, str(tmp_path), max_to_keep=3).save(checkpoint_number=2)  # as before
    want = {v.path: v.numpy() for s in stages for v in s.variables}
    slots = [v.numpy() for v in pipe.optimizer.variables]
    other, other_stages = make(["conv2", "dense1"], seed=5)  # other cuts: same variables in the same order
    assert Checkpointer(str(tmp_path), other_stages, other.optimizer).restore(path) == 2
    for s in other_stages:
        for v in s.variables:
            np.testing.assert_array_equal(v.numpy(), want[v.path])
    for a, b in zip(other.optimizer.variables, slots):
        np.testing.assert_array_equal(a.numpy(), b)
    wider, wider_stages = make(["flatten"], seed=5, hidden=12)
    ckpt = Checkpointer(str(tmp_path), wider_stages, wider.optimizer)
    untouched = values(ckpt)
    with pytest.raises(CheckpointError, match=r"earlier format, which restores only into a model with the same "
                                              r"trainable variables.*nothing was restored"):
        ckpt.restore(path)
    assert all(np.array_equal(v, untouched[k]) for k, v in values(ckpt).items())


# ------------------------------------------------------------------ R=2 -> R=1 with real Horovod ranks

SMALL = ["model.args={filters: 4, hidden: 16}", "train.log_steps=true", "train.verbose=0", "train.validate=false",
         "train.epochs=2", "train.steps_per_epoch=4", "checkpoint.every_steps=1", "checkpoint.keep=20"]


def pipeline_train(run_dir, batch, *launcher):
    args = ["train", "configs/digits_cnn.yaml", "--run-dir", str(run_dir)]
    for item in (*SMALL, f"data.batch_size={batch}"):
        args += ["--set", item]
    return [*launcher, *args]


def losses(run_dir):
    with open(os.path.join(run_dir, "steps.jsonl"), encoding="utf-8") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def bundle(prefix):
    return {name: tf.train.load_variable(prefix, name) for name, _ in tf.train.list_variables(prefix)}


def _summed_in_halves(want: np.ndarray) -> float:
    """Absolute tolerance for R=2 x B against 1 x 2B: the gradient is summed in another order, and Adam's step
    amplifies that rounding in tiny gradients up to about 1e-5 of the tensor's scale (never below 1e-7)."""
    return max(1e-7, 1e-5 * float(np.abs(want).max()))


def test_two_replicas_resume_as_one_at_the_same_global_batch(tmp_path):
    sys.path.insert(0, HERE)
    from test_replicas import horovodrun

    env = {**os.environ, "PIPELINE_CPU_DEVICES": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}
    one = subprocess.Popen([sys.executable, *pipeline_train(tmp_path / "one", 2 * B, "-m", "pipeline")], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    two = horovodrun(2, sys.executable, *pipeline_train(tmp_path / "two", B, os.path.join(HERE, "kill_script.py"),
                                                        "5"))
    out_one, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out_one[-3000:]
    assert two.returncode != 0 and tf.train.latest_checkpoint(str(tmp_path / "two" / "checkpoints")).endswith("ckpt-5")
    at5 = bundle(str(tmp_path / "two" / "checkpoints" / "ckpt-5"))
    assert (at5["meta/replicas"], at5["meta/global_batch"], at5["meta/samples"]) == (2, 2 * B, 5 * 2 * B)
    ref5 = bundle(str(tmp_path / "one" / "checkpoints" / "ckpt-5"))
    for name in (n for n in ref5 if not n.startswith("meta/")):  # 2 replicas x B trained like 1 x 2B
        np.testing.assert_allclose(at5[name], ref5[name], rtol=1e-5, atol=_summed_in_halves(ref5[name]), err_msg=name)
    resumed = subprocess.run([sys.executable, *pipeline_train(tmp_path / "two", 2 * B, "-m", "pipeline")], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "ckpt-5 at step 5 (epoch 2, batch 1 of 4)" in resumed.stdout
    assert "data position 80 samples, written by 2 replica(s) at 16 samples per step" in resumed.stdout
    want, got = dict(losses(tmp_path / "one")), losses(tmp_path / "two")
    after = [(s, loss) for s, loss in got[-3:]]
    assert [s for s, _ in after] == [6, 7, 8]
    np.testing.assert_allclose([loss for _, loss in after], [want[s] for s, _ in after], rtol=1e-5)
    final, ref = bundle(str(tmp_path / "two" / "checkpoints" / "ckpt-8")), bundle(str(tmp_path / "one" / "checkpoints"
                                                                                     / "ckpt-8"))
    assert final.keys() == ref.keys()
    for name in ref:
        np.testing.assert_allclose(final[name], ref[name], rtol=1e-5, atol=_summed_in_halves(ref[name]), err_msg=name)
