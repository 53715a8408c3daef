"""A two-node SLURM for tests: slurmctld in the root namespace, one slurmd per network-namespace host."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import netns

SLURM_LOCAL = Path(os.environ.get("SLURM_LOCAL_SH", Path(__file__).resolve().parents[2] / "shared" / "slurm_local.sh"))
"""The shared single-node SLURM script (installs slurm-wlm and munge); used only when they are missing."""
CONF = """ClusterName=plnet
SlurmctldHost={ctl_name}({ctl_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldPort={ctl_port}
SlurmdPort=6818
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
InactiveLimit=0
KillWait=5
MinJobAge=300
{nodes}
PartitionName=net Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _munge_ok() -> bool:
    try:
        made = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=False)
        return made.returncode == 0 and subprocess.run(["unmunge"], input=made.stdout, capture_output=True,
                                                       timeout=10, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@contextlib.contextmanager
def _munge(folder: Path) -> Iterator[None]:
    """Reuses a running munged, else starts one (as user munge) and stops it (by its pid) afterwards."""
    if _munge_ok():
        yield
        return
    if not Path("/etc/munge/munge.key").is_file():
        raise netns.NetnsUnavailable(f"no /etc/munge/munge.key: run {SLURM_LOCAL} start once (it makes one)")
    for path, mode in (("/run/munge", 0o755), ("/var/lib/munge", 0o700), ("/var/log/munge", 0o700)):
        os.makedirs(path, exist_ok=True)
        shutil.chown(path, "munge", "munge")
        os.chmod(path, mode)
    pidfile = folder / "munged.pid"
    subprocess.run(["start-stop-daemon", "--start", "--background", "--make-pidfile", "--pidfile", str(pidfile),
                    "--chuid", "munge:munge", "--exec", "/usr/sbin/munged", "--", "--foreground"],
                   check=True, timeout=30)
    deadline = time.monotonic() + 10
    while not _munge_ok() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        yield
    finally:
        # Called after our slurmctld stopped: another slurmctld (../shared/slurm_local.sh's) may now use it.
        others = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, timeout=10, check=False).stdout
        if not others.strip():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().strip()), 15)


def sinfo(env: dict) -> str:
    """``sinfo`` of the test cluster: one ``node state`` line per node."""
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=env,
                          timeout=20, check=False).stdout


@contextlib.contextmanager
def cluster(net: netns.Net, hosts: list[netns.Host], cpus: int = 2) -> Iterator[dict]:
    """slurmctld here, one slurmd in each of ``hosts`` (node name = namespace name, NodeAddr = its address).

    Yields the environment (``SLURM_CONF``) for ``sbatch``/``squeue``; cancels the jobs and stops
    every daemon it started on exit.
    """
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "munge") if shutil.which(t) is None
               and not Path(f"/usr/sbin/{t}").exists()] + [k for k in ("/etc/munge/munge.key",) if not Path(k).exists()]
    if missing:  # the shared single-node script installs SLURM and munge and makes the key (as tests/test_slurm.py)
        if not SLURM_LOCAL.is_file():
            raise netns.NetnsUnavailable(f"{missing} missing and no {SLURM_LOCAL} to install them")
        subprocess.run(["bash", str(SLURM_LOCAL), "start"], check=True, timeout=900, capture_output=True)
    folder = Path(tempfile.mkdtemp(prefix="plslurm"))
    (folder / "state").mkdir()
    nodes = "\n".join(f"NodeName={h.netns} NodeAddr={h.address} CPUs={cpus} RealMemory=2000 State=UNKNOWN"
                      for h in hosts)
    conf = folder / "slurm.conf"
    conf.write_text(CONF.format(ctl_name=socket.gethostname(), ctl_addr=net.gateway, ctl_port=netns.free_port(),
                                dir=folder, nodes=nodes))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []
    try:
        with _munge(folder), _stopped(daemons, net, env):
            daemons.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(conf)], env=env, start_new_session=True,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for host in hosts:
                (folder / "spool" / host.netns).mkdir(parents=True)
                # Not `ip netns exec` (it mounts a fresh /sys, without the cgroup file systems slurmd needs):
                # the host's network namespace, a private mount namespace, and the host's own /etc/hosts.
                hosts_file = netns.ETC_NETNS / host.netns / "hosts"
                argv = ["nsenter", f"--net=/var/run/netns/{host.netns}", "unshare", "--mount", "sh", "-c",
                        f"mount --bind {hosts_file} /etc/hosts && exec slurmd -D -N {host.netns} -f {conf}"]
                daemons.append(subprocess.Popen(argv, env=env, start_new_session=True,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                net.procs.append(daemons[-1])
            deadline = time.monotonic() + 60
            while sinfo(env).split().count("idle") < len(hosts):
                if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                    logs = "".join(p.read_text()[-1500:] for p in folder.glob("*.log"))
                    raise AssertionError(f"the two-node SLURM did not come up: {sinfo(env)!r}\n{logs}")
                time.sleep(0.5)
            yield env
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _stopped(daemons: list[subprocess.Popen], net: netns.Net, env: dict) -> Iterator[None]:
    """On exit: cancels the test cluster's jobs, then stops ``daemons`` (TERM, then KILL), before munged goes."""
    try:
        yield
    finally:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env, timeout=20,
                              check=False).stdout.split() if daemons else []
        if jobs:
            subprocess.run(["scancel", *jobs], env=env, timeout=20, check=False)
            time.sleep(2)
        for daemon in daemons:
            net.stop(daemon, 15)
            if daemon.poll() is None:
                net.stop(daemon)
