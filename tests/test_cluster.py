"""Stages on other TF tasks: two local workers (spawned) on loopback, trainer in a subprocess."""

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline.dist import cluster
from pipeline.dist import worker

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cluster_script  # noqa: E402
import netns  # noqa: E402


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def workers():
    """Two `pipeline worker` tasks in spawned processes; yields (hosts, processes)."""
    hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker.serve, args=(hosts, i), daemon=True) for i in range(2)]
    for p in procs:
        p.start()
    # Both listen before the trainer connects: a worker still importing TensorFlow is not a dead one.
    assert all(netns.wait_port(address, 120) for address in hosts.split(",")), f"workers {hosts} did not start"
    yield hosts, procs
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)


def trainer(*args: str) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PIPELINE_CPU_DEVICES", None)
    return subprocess.Popen([sys.executable, str(HERE / "cluster_script.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(HERE.parent))


def test_stages_on_two_workers_train_like_the_local_pipeline(workers, tmp_path):
    hosts, _ = workers
    out = tmp_path / "w.npz"
    proc = trainer("--cluster", hosts, "--out", str(out))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"remote trainer failed:\n{stdout}\n{stderr[-3000:]}"
    cluster_script.assert_equals_local_pipeline(np.load(out), "remote stages")


def test_killing_a_worker_fails_naming_it_within_the_timeout(workers):
    hosts, procs = workers
    proc = trainer("--cluster", hosts, "--timeout", "10", "--forever")
    line = ""
    deadline = time.monotonic() + 90
    while "epoch 1" not in line and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
    assert "epoch 1" in line, f"trainer did not start training: {proc.communicate(timeout=5)}"
    procs[1].kill()
    killed = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the trainer hung after a worker was killed")
    elapsed = time.monotonic() - killed
    assert proc.returncode != 0
    assert "task /job:worker/task:1" in stderr, stderr[-2000:]
    assert "ClusterError" in stderr
    assert elapsed < 10 + 15, f"took {elapsed:.1f}s"


def test_a_worker_that_never_started_is_named_at_connect(workers):
    hosts, _ = workers
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    proc = trainer("--cluster", f"{hosts.split(',')[0]},{dead}", "--timeout", "5")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"task /job:worker/task:1 at {dead}" in stderr, stderr[-2000:]


def test_wildcard_address_is_refused_unless_allowed():
    spec = cluster.parse_hosts("0.0.0.0:2222,127.0.0.1:2223")
    with pytest.raises(cluster.ClusterError, match=r"task /job:worker/task:0 has the wildcard address "
                                                   r"'0.0.0.0:2222'.*--allow-wildcard"):
        cluster.check_addresses(spec)
    cluster.check_addresses(spec, allow_wildcard=True)


def test_server_refuses_an_address_of_another_host():
    with pytest.raises(cluster.ClusterError, match=r"'192.0.2.1' is not an address of this machine"):
        cluster.start_server("127.0.0.1:1,192.0.2.1:2", task=1)


def test_bad_host_list_and_task_are_rejected():
    with pytest.raises(cluster.ClusterError, match=r"'localhost' is not host:port"):
        cluster.parse_hosts("localhost")
    with pytest.raises(cluster.ClusterError, match=r"--task 5 is not a task of job 'worker' \(it has tasks 0..1\)"):
        cluster.start_server("127.0.0.1:1,127.0.0.1:2", task=5)


def test_resolvers(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
                                    '"task": {"type": "worker", "index": 1}}')
    resolver = cluster.resolver_from("auto")
    assert resolver.cluster_spec().job_tasks("worker") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert resolver.task_id == 1
    spec = cluster.resolver_from({"worker": ["127.0.0.1:5"]}).cluster_spec()
    assert spec.job_tasks("worker") == ["127.0.0.1:5"]
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.delenv("SLURM_STEP_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(cluster.ClusterError, match=r"no cluster given"):
        cluster.resolver_from(None)


def test_guard_names_the_task():
    spec = cluster.parse_hosts("127.0.0.1:1,127.0.0.1:2")
    err = tf.errors.UnavailableError(None, None, "Additional GRPC error information from remote target "
                                     "/job:worker/replica:0/task:1/device:CPU:0 ... UNAVAILABLE: reset")
    with pytest.raises(cluster.ClusterError, match=r"task /job:worker/task:1 at 127.0.0.1:2 failed"):
        with cluster.guard(spec):
            raise err
