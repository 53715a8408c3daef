"""Two and three hosts in network namespaces: remote stages, lost hosts and Horovod replicas over real veths."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cluster_script  # noqa: E402
import netns  # noqa: E402
from test_replicas import assert_equals_single_process  # noqa: E402

from pipeline.dist import cluster  # noqa: E402

PORT = netns.free_port()  # per namespace; also free in the root namespace, checked not to listen there
TIMEOUT = 10.0
"""``PIPELINE_CLUSTER_TIMEOUT`` of the fault tests: a lost host must be named within it (plus slack)."""


def _env(**extra: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    env.pop("PIPELINE_CPU_DEVICES", None)
    return env


@pytest.fixture(scope="module")
def net():
    """Three hosts ``a``, ``b``, ``c`` on one private bridge, torn down after the module (also on failure)."""
    try:
        with netns.network(3) as made:
            yield made
    except netns.NetnsUnavailable as err:
        pytest.fail(f"network namespaces unavailable: {err}")


@pytest.fixture(scope="module")
def workers(net):
    """``pipeline worker`` task 0 in host a, task 1 in host b (and one in c given b's address, which must refuse).

    Module-scoped (TF starts slowly here): the tests that use it run in file order, the SIGKILL last.
    Yields (hosts string, [task 0, task 1, misplaced] processes).
    """
    a, b, c = net.hosts
    hosts = f"{a.address}:{PORT},{b.address}:{PORT}"
    procs = [net.start(host, [sys.executable, "-m", "pipeline", "worker", "--cluster", spec, "--task", str(task)],
                       env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for host, spec, task in ((a, hosts, 0), (b, hosts, 1), (c, hosts, 1))]
    for address in hosts.split(","):
        assert netns.wait_port(address, 90), f"worker at {address} did not start"
    yield hosts, procs
    for proc in procs:
        net.stop(proc)


def trainer(net, host, *args: str) -> subprocess.Popen:
    """``tests/cluster_script.py`` (two stages, one per worker task) inside ``host``."""
    return net.start(host, [sys.executable, str(HERE / "cluster_script.py"), *args], env=_env(),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(HERE.parent))


def test_harness_gives_each_host_its_address_and_removes_leftovers():
    dead = 4_000_000 + os.getpid() % 100_000  # above any pid in use here: a killed run's leftover
    subprocess.run(["ip", "netns", "add", f"pl{dead}n0a"], check=True)
    with netns.network(2) as small:
        assert f"pl{dead}n0a" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        a, b = small.hosts
        inside = subprocess.run(["ip", "-n", a.netns, "-4", "-o", "addr"], capture_output=True, text=True).stdout
        assert f"{a.address}/24" in inside and b.address not in inside
        names = (a.netns, b.netns, a.link, b.link, small.bridge)
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not [n for n in names if f"{n} " in after or f"{n}\n" in after or f": {n}" in links]


def test_harness_tears_down_when_the_test_body_fails():
    """A failure inside the block (an assertion, a crash) still removes every namespace, veth and the bridge."""
    names = ()
    with pytest.raises(RuntimeError, match="planted failure"):
        with netns.network(2) as small:
            a, b = small.hosts
            names = (a.netns, b.netns, a.link, b.link, small.bridge)
            raise RuntimeError("planted failure")
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert len(names) == 5 and not [n for n in names if f"{n} " in after or f"{n}\n" in after or f": {n}" in links]


def test_worker_refuses_the_address_of_another_host(net, workers):
    _, procs = workers
    out, _ = procs[2].communicate(timeout=90)  # task 1 started in host c: the spec says it lives at b
    assert procs[2].returncode != 0
    assert f"{net.hosts[1].address!r} is not an address of this machine" in out, out[-2000:]


def test_stages_on_two_hosts_train_like_the_local_pipeline(net, workers, tmp_path):
    hosts, _ = workers
    a, b, c = net.hosts
    for host in (a, b):  # each worker listens in its own namespace only: not on the root namespace's stack
        listening = subprocess.run(["ip", "netns", "exec", host.netns, "ss", "-Hltn", f"sport = :{PORT}"],
                                   capture_output=True, text=True).stdout
        assert listening.strip(), f"no listener on port {PORT} in {host.netns}"
    assert not netns.wait_port(f"127.0.0.1:{PORT}", 0.5)
    out = tmp_path / "w.npz"
    proc = trainer(net, c, "--cluster", hosts, "--out", str(out), "--timeout", "30")
    stdout, stderr = proc.communicate(timeout=150)
    assert proc.returncode == 0, f"trainer in {c.netns} failed:\n{stdout}\n{stderr[-3000:]}"
    cluster_script.assert_equals_local_pipeline(np.load(out), "stages on two hosts")


@pytest.mark.parametrize("fault", ["link_down", "sigkill"])  # the SIGKILL last: it ends worker b
def test_a_lost_host_is_named_within_the_timeout(net, workers, fault):
    hosts, procs = workers
    a, b, c = net.hosts
    proc = trainer(net, c, "--cluster", hosts, "--timeout", str(TIMEOUT), "--forever")
    line, deadline = "", time.monotonic() + 120
    while "epoch 1" not in line and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
    assert "epoch 1" in line, f"trainer did not start training: {proc.communicate(timeout=10)}"
    if fault == "sigkill":
        net.stop(procs[1], signal.SIGKILL)
    else:
        net.link_down(b)
    lost = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        net.stop(proc)
        pytest.fail(f"the trainer hung after {fault} of host b")
    finally:
        if fault == "link_down":
            subprocess.run(["ip", "link", "set", b.link, "up"], check=True)
    elapsed = time.monotonic() - lost
    assert proc.returncode != 0
    assert f"task /job:worker/task:1 at {b.address}:{PORT}" in stderr, stderr[-3000:]
    assert "ClusterError" in stderr
    print(f"{fault}: trainer failed naming host b after {elapsed:.1f} s (timeout {TIMEOUT:g} s): "
          f"{[line for line in stderr.splitlines() if 'ClusterError' in line][:1]}")
    assert elapsed < TIMEOUT + 15, f"took {elapsed:.1f}s to name the lost host"


def test_horovod_replicas_on_two_hosts_equal_one_process_on_doubled_batch(net, tmp_path):
    """R=2 replicas x K=2 stages, one rank per host, as plain `srun` starts them: Gloo over the veths."""
    steps, batch = 4, 8
    a, b = net.hosts[:2]
    out = tmp_path / "weights.npz"
    procs = []
    for rank, host in enumerate((a, b)):
        env = _env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_LOCALID="0",
                   SLURM_JOB_NODELIST=f"{a.netns},{b.netns}", SLURMD_NODENAME=host.netns,
                   PIPELINE_RENDEZVOUS_ADDR=a.address, PIPELINE_CPU_DEVICES="2", HOROVOD_GLOO_TIMEOUT_SECONDS="60")
        procs.append(net.start(host, [sys.executable, str(HERE / "replica_script.py"), "--out", str(out),
                                      "--steps", str(steps), "--batch", str(batch)],
                               env=env, cwd=str(HERE.parent), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True))
    results = []
    for p in procs:
        try:
            results.append(p.communicate(timeout=180))
        except subprocess.TimeoutExpired:
            for q in procs:
                net.stop(q)
            pytest.fail("Horovod ranks across namespaces hung")
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, f"rank failed:\n{stdout}\n{stderr[-3000:]}"
    sums = [line.split("weights sum")[1] for stdout, _ in results for line in stdout.splitlines()
            if "weights sum" in line]
    assert len(sums) == 2 and sums[0] == sums[1], results
    assert_equals_single_process(np.load(out), steps, batch)


def test_trainer_address_follows_the_route_to_the_workers(net):
    spec = cluster.parse_hosts(f"{net.hosts[0].address}:{PORT}")
    host, port = cluster.trainer_address(spec).rsplit(":", 1)
    assert host == net.gateway and int(port) > 0
    with pytest.raises(cluster.ClusterError, match=r"PIPELINE_CLUSTER_ADDRESS='0.0.0.0'.*concrete address"):
        cluster.trainer_address(spec, "0.0.0.0")
    assert cluster.trainer_address(spec, f"{net.gateway}:5555") == f"{net.gateway}:5555"


def test_guard_names_the_unreachable_trainer_or_task(monkeypatch):
    import tensorflow as tf

    spec = cluster.parse_hosts("10.9.9.1:8470,10.9.9.2:8470")
    monkeypatch.setitem(cluster._state, "trainer", "10.9.9.100:4000")
    back = tf.errors.UnavailableError(None, None, "Graph execution error:\n(0) UNAVAILABLE: failed to connect to all "
                                      "addresses; last error: ipv4:10.9.9.100:4000: Connection refused\n"
                                      "remote target /job:worker/replica:0/task:0/device:CPU:0")
    with pytest.raises(cluster.ClusterError, match=r"could not connect back to this trainer at 10.9.9.100:4000 "
                                                   r"\(UnavailableError: .*ipv4:10.9.9.100:4000"
                                                   r".*PIPELINE_CLUSTER_ADDRESS"):
        with cluster.guard(spec):
            raise back
    lost = tf.errors.UnavailableError(None, None, "Graph execution error:\nfrom remote target "
                                      "/job:worker/replica:0/task:0/device:CPU:0: UNAVAILABLE: failed to connect to "
                                      "all addresses; last error: ipv4:10.9.9.2:8470: Connection refused")
    with pytest.raises(cluster.ClusterError, match=r"task /job:worker/task:1 at 10.9.9.2:8470 failed or stopped "
                                                   r"answering \(UnavailableError: .*failed to connect"):
        with cluster.guard(spec):
            raise lost


def test_replicas_on_several_nodes_pick_the_interface_and_refuse_a_loopback_host_name(net, monkeypatch):
    from pipeline.dist import replicas

    env = {**os.environ, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "n1,n2", "PIPELINE_RENDEZVOUS_ADDR": net.gateway}
    env.pop("HOROVOD_GLOO_IFACE", None)
    monkeypatch.setattr(os, "environ", env)  # the function writes Horovod's variables: keep them off this process
    monkeypatch.setattr(replicas.socket, "gethostname", lambda: "localhost")
    with pytest.raises(replicas.ReplicaError, match=r"rank 1: this node's host name 'localhost' resolves to a "
                                                    r"loopback address.*cluster-network address"):
        replicas._slurm_gloo_rendezvous()
    assert env["HOROVOD_GLOO_IFACE"] == net.bridge, "the interface of the route to the rendezvous address"
    assert (env["HOROVOD_RANK"], env["HOROVOD_CROSS_SIZE"], env["HOROVOD_HOSTNAME"]) == ("1", "2", "n2")
