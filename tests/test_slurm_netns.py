"""``slurm/stages_multinode.sbatch`` for real on a two-node SLURM whose nodes are network namespaces."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import netns  # noqa: E402
import slurm_lock  # noqa: E402
import slurm_netns  # noqa: E402

RUN = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=4", "--set", "train.validate=false",
       "--set", "train.verbose=0", "--set", "checkpoint.every_steps=1000"]


def checkpoint_values(run_dir: Path) -> dict:
    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert path, f"no checkpoint in {run_dir}"
    return {name: tf.train.load_variable(path, name) for name, _ in tf.train.list_variables(path)
            if "OBJECT_GRAPH" not in name}


@pytest.fixture(scope="module")
def slurm():
    """Two SLURM nodes (namespaces a and b, slurmd in each), slurmctld here; yields (net, SLURM_CONF env)."""
    with slurm_lock.exclusive(), netns.network(2) as net, slurm_netns.cluster(net, net.hosts) as env:
        yield net, env


def _env(**extra: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    env.pop("PIPELINE_CPU_DEVICES", None)
    return env


def _local(run_dir: Path, *args: str) -> subprocess.Popen:
    """The reference: ``pipeline train`` in one process on two logical CPU devices (runs beside the job)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "configs/digits_cnn.yaml", "--run-dir",
                             str(run_dir), "--set", "pipeline.devices=cpu", *RUN, *args], cwd=ROOT,
                            env=_env(PIPELINE_CPU_DEVICES="2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _sbatch(env: dict, out: Path, *args: str) -> str:
    job = subprocess.run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                          f"--output={out}", "--time=10", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=400)
    text = out.read_text() if out.exists() else ""
    assert job.returncode == 0, f"sbatch failed ({job.stderr}):\n{text[-4000:]}"
    return text


def _assert_same_checkpoints(local: subprocess.Popen, local_dir: Path, remote_dir: Path, replicas: int = 1) -> None:
    local_out, _ = local.communicate(timeout=300)
    assert local.returncode == 0, local_out[-3000:]
    want, got = checkpoint_values(local_dir), checkpoint_values(remote_dir)
    if "meta/replicas" in want:  # the topology the checkpoint was written by: R differs on purpose
        assert (int(want.pop("meta/replicas")), int(got.pop("meta/replicas"))) == (1, replicas)
    assert want.keys() == got.keys() and len(want) > 4
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{name}: the two SLURM nodes differ from the local run")


def test_stages_multinode_sbatch_on_two_slurm_nodes_equals_the_local_run(slurm, tmp_path):
    net, slurm_env = slurm
    env = _env(PYTHON=sys.executable, CONFIG="configs/digits_cnn.yaml", PORT=str(netns.free_port()),
               PIPELINE_CLUSTER_TIMEOUT="60", SLURM_CONF=slurm_env["SLURM_CONF"])
    local_dir, remote_dir = tmp_path / "local", tmp_path / "remote"
    local = _local(local_dir)
    try:
        text = _sbatch(env, tmp_path / "job.out", "slurm/stages_multinode.sbatch", "--run-dir", str(remote_dir), *RUN)
        nodes = [h.netns for h in net.hosts]
        assert f"cluster: {nodes[0]}:{env['PORT']},{nodes[1]}:{env['PORT']}" in text, text[-3000:]
        assert "/job:worker/replica:0/task:1/device:CPU:0" in text
        for task, node in enumerate(nodes):  # each worker on its own node, named by its node name
            assert f"serving /job:worker/task:{task} at {node}:{env['PORT']}" in text, text[-3000:]
        _assert_same_checkpoints(local, local_dir, remote_dir)
    finally:
        if local.poll() is None:
            local.kill()


def test_replicas_sbatch_r2_k2_on_two_slurm_nodes_equals_one_process_on_the_doubled_batch(slurm, tmp_path):
    """Data x pipeline: 2 replicas (one per node, Gloo between the namespaces) x 2 stages, per-replica batch 16."""
    _, slurm_env = slurm
    env = _env(PIPELINE_PYTHON=sys.executable, PIPELINE_CPU_DEVICES="2", SLURM_CONF=slurm_env["SLURM_CONF"],
               PIPELINE_RUN_DIR=str(tmp_path / "remote"))
    local_dir, remote_dir = tmp_path / "local", tmp_path / "remote"
    local = _local(local_dir, "--set", "data.batch_size=32")
    try:
        text = _sbatch(env, tmp_path / "job.out", "slurm/replicas.sbatch", "configs/digits_cnn.yaml",
                       "--set", "pipeline.replicas=2", "--set", "pipeline.devices=cpu", "--set", "data.batch_size=16",
                       *RUN)
        assert "2 replicas on" in text, text[-3000:]
        _assert_same_checkpoints(local, local_dir, remote_dir, replicas=2)
    finally:
        if local.poll() is None:
            local.kill()
