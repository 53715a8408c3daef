"""Pipeline replicas under a real ``horovodrun --gloo -np 2``: equal to one process on the doubled batch."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline.dist import replicas

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "replica_script.py"
sys.path.insert(0, str(HERE))
import replica_script  # noqa: E402


def _require_horovod() -> None:
    if importlib.util.find_spec("horovod") is None:
        pytest.fail(
            "Horovod is not installed in this Python; CI installs it with "
            f"`bash launch/install_horovod.sh {sys.executable}` (these tests must really run it)"
        )


def horovodrun(np_: int, *args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``horovodrun --gloo -np N`` on loopback with this Python."""
    _require_horovod()
    cmd = [sys.executable, "-m", "horovod.runner.launch", "--gloo", "-np", str(np_),
           "-H", f"localhost:{np_}", "--network-interfaces", "lo", *args]
    full_env = {**os.environ, "PIPELINE_CPU_DEVICES": "2", "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=str(HERE.parent))


def test_two_replicas_equal_one_process_on_doubled_batch(tmp_path):
    steps, batch = 4, 8
    out = tmp_path / "weights.npz"
    run = horovodrun(2, sys.executable, str(SCRIPT), "--out", str(out), "--steps", str(steps),
                     "--batch", str(batch))
    assert run.returncode == 0, f"horovodrun failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    sums = [line.split("weights sum")[1] for line in run.stdout.splitlines() if "weights sum" in line]
    assert len(sums) == 2 and sums[0] == sums[1], f"replicas disagree: {run.stdout}"
    assert_equals_single_process(np.load(out), steps, batch)


def assert_equals_single_process(got, steps: int, batch: int, data_steps: int | None = None) -> None:
    """One process, same initial weights as rank 0, batch 2*batch of the same data in the same order."""
    model = replica_script.build(seed=100)
    x, y = replica_script.make_data((data_steps or steps) * batch * 2)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2 * batch).take(steps)
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    for i, v in enumerate(model.trainable_variables):
        np.testing.assert_allclose(got[f"arr_{i}"], v.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=f"variable {v.path} differs from single-process training")
    np.testing.assert_allclose(got["loss"], history.history["loss"], rtol=1e-5)


def test_one_rank_asking_to_stop_stops_all_at_the_same_step(tmp_path):
    out = tmp_path / "weights.npz"
    run = horovodrun(2, sys.executable, str(SCRIPT), "--out", str(out), "--steps", "6", "--stop", "1:2")
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "rank 0 steps 2" in run.stdout and "rank 1 steps 2" in run.stdout, run.stdout
    assert_equals_single_process(np.load(out), steps=2, batch=8, data_steps=6)


def test_plain_srun_with_gloo_rendezvous_equals_one_process(tmp_path):
    """Two tasks as `srun` starts them (SLURM_* variables, no horovodrun): rank 0 serves the rendezvous."""
    _require_horovod()
    steps, batch = 4, 8
    out = tmp_path / "weights.npz"
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_NNODES": "1",
               "SLURM_LOCALID": str(rank), "PIPELINE_RENDEZVOUS_PORT": str(port),
               "PIPELINE_CPU_DEVICES": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--steps", str(steps),
                                       "--batch", str(batch)], env=env, cwd=str(HERE.parent),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=180) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, f"srun-style rank failed:\n{stdout}\n{stderr[-3000:]}"
    assert_equals_single_process(np.load(out), steps, batch)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_backend_is_none():
    assert replicas.init("auto") == "none"
    assert (replicas.rank(), replicas.size(), replicas.is_chief()) == (0, 1, True)
    assert replicas.reducer() is None
    assert replicas.agree(True) and not replicas.agree(False)
    data = np.arange(10)
    assert replicas.shard(data) is data
    np.testing.assert_array_equal(replicas.shard(data, 1, 3), [1, 4, 7])


def test_shards_form_the_global_batches():
    ds = tf.data.Dataset.range(12)
    global_batches = [set(b.numpy()) for b in ds.batch(4)]
    shards = [list(replicas.shard(ds, r, 2).batch(2)) for r in range(2)]
    for step, expected in enumerate(global_batches):
        assert set(shards[0][step].numpy()) | set(shards[1][step].numpy()) == expected


def test_unknown_backend_is_rejected():
    with pytest.raises(replicas.ReplicaError, match=r"backend 'mpi' is not one of"):
        replicas.init("mpi")


# ------------------------------------------------------------------ the runner with 2 ranks

RUN_ARGS = ["--set", "train.epochs=2", "--set", "train.steps_per_epoch=6", "--set", "checkpoint.every_steps=4",
            "--set", "train.verbose=0", "--set", "train.validate=false"]


def train_2_ranks(run_dir, *extra: str, kill_after: int | None = None) -> subprocess.CompletedProcess:
    """``pipeline train`` on 2 ranks; with ``kill_after`` every rank SIGKILLs itself after that step."""
    launcher = ["-m", "pipeline"] if kill_after is None else [str(HERE / "kill_script.py"), str(kill_after)]
    return horovodrun(2, sys.executable, *launcher, "train", "configs/digits_cnn.yaml",
                      "--run-dir", str(run_dir), *RUN_ARGS, *extra)


def checkpoint_values(run_dir) -> dict:
    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert path, f"no checkpoint in {run_dir}"
    return {name: tf.train.load_variable(path, name) for name, _ in tf.train.list_variables(path)
            if "OBJECT_GRAPH" not in name}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run = train_2_ranks(run_dir)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run_dir


def test_runner_with_2_ranks_writes_once_and_resumes_after_a_kill(uninterrupted, tmp_path):
    assert (uninterrupted / "test_metrics.json").exists() and (uninterrupted / "model.keras").exists()
    rows = (uninterrupted / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2, "only rank 0 writes the metrics file (one row per epoch)"

    killed = train_2_ranks(tmp_path, kill_after=7)
    assert killed.returncode != 0, "the fault injection should have killed the ranks at step 7"
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-6")
    resumed = train_2_ranks(tmp_path)
    assert resumed.returncode == 0, f"{resumed.stdout[-3000:]}\n{resumed.stderr[-3000:]}"
    assert "resumed from" in resumed.stdout and "at step 6" in resumed.stdout
    want, got = checkpoint_values(uninterrupted), checkpoint_values(tmp_path)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
