"""Checkpoints: full state round trip, corrupt-latest fallback, bit-exact resume after SIGKILL, preemption signals."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from pipeline.errors import CheckpointError
from pipeline.train.checkpoint import PREEMPTED_EXIT_CODE, Checkpointer, find_checkpoint, requeue_slurm_job
from pipeline.core.model import PipelineModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_cnn.yaml")
KILL_SCRIPT = os.path.join(ROOT, "tests", "kill_script.py")  # `pipeline` that SIGKILLs itself after step N
SMALL = ["model.args={filters: 4, hidden: 16}", "train.log_steps=true", "train.verbose=0", "train.validate=false"]


def tiny_pipeline():
    m0 = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh")])
    m1 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    pipe = PipelineModel([m0, m1], devices="cpu", microbatches=2)
    pipe.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    pipe.build((None, 3))
    pipe.optimizer.build(pipe.trainable_variables)
    return pipe, [m0, m1]


def state(pipe):
    return [v.numpy().copy() for v in pipe.trainable_variables + pipe.optimizer.variables]


def fit_steps(pipe, steps):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4 * steps, 3)), rng.standard_normal((4 * steps, 2))
    pipe.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)


def test_round_trip_restores_weights_optimizer_and_position(tmp_path):
    pipe, stages = tiny_pipeline()
    ckpt = Checkpointer(str(tmp_path), stages, pipe.optimizer, keep=2)
    fit_steps(pipe, 3)
    saved = state(pipe)
    ckpt.save(step=3, epoch=1, steps_per_epoch=2)
    fit_steps(pipe, 2)
    assert any(not np.array_equal(a, b) for a, b in zip(saved, state(pipe)))
    step, path = ckpt.restore_latest()
    assert (step, int(ckpt.epoch.numpy()), int(ckpt.steps_per_epoch.numpy())) == (3, 1, 2)
    assert path.endswith("ckpt-3")
    for a, b in zip(saved, state(pipe)):
        np.testing.assert_array_equal(a, b)


def test_no_checkpoint_starts_at_zero(tmp_path):
    pipe, stages = tiny_pipeline()
    assert Checkpointer(str(tmp_path), stages, pipe.optimizer).restore_latest() == (0, None)


def test_keeps_only_the_last_n(tmp_path):
    pipe, stages = tiny_pipeline()
    ckpt = Checkpointer(str(tmp_path), stages, pipe.optimizer, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, 0, 10)
    assert [os.path.basename(p) for p in ckpt.manager.checkpoints] == ["ckpt-2", "ckpt-3"]


def test_corrupt_latest_falls_back_to_previous(tmp_path):
    pipe, stages = tiny_pipeline()
    ckpt = Checkpointer(str(tmp_path), stages, pipe.optimizer, keep=3)
    fit_steps(pipe, 1)
    ckpt.save(1, 0, 10)
    good = state(pipe)
    fit_steps(pipe, 1)
    latest = ckpt.save(2, 0, 10)
    with open(latest + ".data-00000-of-00001", "r+b") as f:  # a partial write
        f.truncate(10)
    fresh_pipe, fresh_stages = tiny_pipeline()
    fresh = Checkpointer(str(tmp_path), fresh_stages, fresh_pipe.optimizer, keep=3)
    with pytest.warns(RuntimeWarning, match=r"checkpoint .*ckpt-2 is unreadable .*falling back to the previous"):
        step, path = fresh.restore_latest()
    assert step == 1 and path.endswith("ckpt-1")
    for a, b in zip(good, state(fresh_pipe)):
        np.testing.assert_array_equal(a, b)


def test_missing_index_falls_back(tmp_path):
    pipe, stages = tiny_pipeline()
    ckpt = Checkpointer(str(tmp_path), stages, pipe.optimizer)
    ckpt.save(1, 0, 10)
    os.remove(ckpt.save(2, 0, 10) + ".index")
    with pytest.warns(RuntimeWarning, match=r"ckpt-2 is unreadable"):
        assert ckpt.restore_latest()[0] == 1


def test_find_checkpoint(tmp_path):
    pipe, stages = tiny_pipeline()
    Checkpointer(str(tmp_path / "checkpoints"), stages, pipe.optimizer).save(5, 0, 10)
    assert find_checkpoint(str(tmp_path)).endswith("ckpt-5")
    assert find_checkpoint(str(tmp_path / "checkpoints" / "ckpt-5")).endswith("ckpt-5")
    with pytest.raises(CheckpointError, match=r"checkpoint '.*nowhere': no checkpoint found"):
        find_checkpoint(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------ real processes

def run_train(run_dir, *overrides, kill_after=None, env=None, **popen):
    launcher = ["-m", "pipeline"] if kill_after is None else [KILL_SCRIPT, str(kill_after)]
    cmd = [sys.executable, *launcher, "train", CONFIG, "--run-dir", str(run_dir)]
    for item in (*SMALL, *overrides):
        cmd += ["--set", item]
    full_env = {**os.environ, "PIPELINE_CPU_DEVICES": "2", "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def step_losses(run_dir):
    """The last logged loss of each step (a resumed run logs the redone steps again)."""
    losses = {}
    with open(os.path.join(run_dir, "steps.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            losses[row["step"]] = row["loss"]
    return losses


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    args = ("train.epochs=2", "train.steps_per_epoch=8", "checkpoint.every_steps=3")
    straight = run_train(tmp_path / "a", *args)
    killed = run_train(tmp_path / "b", *args, kill_after=7)
    out_a, _ = straight.communicate(timeout=240)
    out_b, _ = killed.communicate(timeout=240)
    assert straight.returncode == 0, out_a
    assert killed.returncode == -signal.SIGKILL, out_b
    assert max(step_losses(tmp_path / "b")) == 7  # died right after step 7; last checkpoint is step 6
    resumed = run_train(tmp_path / "b", *args)
    out_c, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out_c
    assert "resumed from" in out_c and "ckpt-6 at step 6 (epoch 1, batch 6 of 8)" in out_c
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert [b[s] for s in range(7, 17)] == [a[s] for s in range(7, 17)]  # bit-identical floats


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_and_exits(tmp_path, sig):
    proc = run_train(tmp_path, "train.epochs=50", "checkpoint.every_steps=1000")
    steps = tmp_path / "steps.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if steps.exists() and len(steps.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before the signal"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    last = max(step_losses(tmp_path))
    assert f"received {signal.Signals(sig).name}" in out
    assert f"preempted at step {last}: checkpoint written" in out
    assert find_checkpoint(str(tmp_path)).endswith(f"ckpt-{last}")
    assert last < 50 * 44


def _fake_scontrol(tmp_path, monkeypatch, body):
    """Puts an `scontrol` on PATH that records its arguments, then runs ``body`` (sh)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/asked"\n{body}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")


def test_requeue_survives_the_sigterm_of_its_own_requeue(tmp_path, monkeypatch, capsys):
    # SLURM requeues by signalling every process of the job, scontrol included, and may do so before scontrol
    # has reported success (seen in CI: "scontrol requeue 2 failed: " although the job was requeued).
    _fake_scontrol(tmp_path, monkeypatch, "kill -TERM $$\nsleep 0.2\nexit 0")
    assert requeue_slurm_job() is True
    assert (tmp_path / "asked").read_text().split() == ["requeue", "42"]
    assert "[pipeline] requeued SLURM job 42" in capsys.readouterr().out


def test_requeue_refused_by_slurm_is_reported(tmp_path, monkeypatch, capsys):
    _fake_scontrol(tmp_path, monkeypatch, 'echo "Requested operation is presently disabled" >&2\nexit 1')
    assert requeue_slurm_job() is False
    assert "scontrol requeue 42 failed: Requested operation is presently disabled" in capsys.readouterr().out


def test_requeue_killed_is_reported_with_the_signal(tmp_path, monkeypatch, capsys):
    _fake_scontrol(tmp_path, monkeypatch, "kill -KILL $$")
    assert requeue_slurm_job() is False
    assert "scontrol requeue 42 failed: killed by SIGKILL" in capsys.readouterr().out
