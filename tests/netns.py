"""Test hosts in network namespaces: a bridge in the root namespace, one veth and address per host, full teardown."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

IFACE = "pleth0"
"""The interface name inside every namespace (the same in each, so ``HOROVOD_GLOO_IFACE=pleth0`` fits all)."""
_NAME_RE = re.compile(r"^pl(\d+)n\d(br|[a-c])$")
"""Names this harness gives namespaces and links: ``pl<pid>n<k><a|b|c|br>`` (k counts networks of one process)."""
_COUNTER = itertools.count()
ETC_NETNS = Path("/etc/netns")
"""Per-namespace files ``ip netns exec`` bind-mounts over ``/etc`` (here: ``hosts``)."""
_SUBNET_FIRST, _SUBNET_COUNT = 10, 200
"""Third octets tried for the private subnet ``10.213.<x>.0/24`` (one per harness, free ones only)."""


class NetnsUnavailable(RuntimeError):
    """``ip`` or root (CAP_NET_ADMIN) is missing: the namespace tests cannot run here."""


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=timeout)


def require() -> None:
    """Fails with a clear message unless ``ip`` exists and this process may create namespaces."""
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed; as root: apt-get install -y iproute2")
    if os.geteuid() != 0:
        raise NetnsUnavailable(f"network namespaces need root (CAP_NET_ADMIN); this test runs as uid {os.geteuid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Deletes namespaces and links of this harness's naming pattern whose creating process is gone."""
    removed = []
    netns = _ip("netns", "list", check=False).stdout.split("\n")
    for line in netns:
        name = line.split(" ")[0]
        m = _NAME_RE.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for folder in ETC_NETNS.glob("pl*") if ETC_NETNS.is_dir() else []:
        m = _NAME_RE.match(folder.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        ETC_NETNS.rmdir()  # only when empty
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = _NAME_RE.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def _write_hosts_files(net: Net) -> None:
    """Gives each host its own ``/etc/hosts`` (``ip netns exec`` mounts ``/etc/netns/NAME/hosts`` over it).

    Inside a host, this machine's host name resolves to that host's address (as on a real
    node), and every host's namespace name resolves to its address.
    """
    others = "".join(f"{h.address} {h.netns}\n" for h in net.hosts)
    for host in net.hosts:
        folder = ETC_NETNS / host.netns
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(f"127.0.0.1 localhost\n{host.address} {socket.gethostname()}\n{others}")


def _free_subnet(start: int) -> int:
    used = _ip("-4", "addr", "show", check=False).stdout + _ip("-4", "route", "show", check=False).stdout
    for k in range(_SUBNET_COUNT):
        x = _SUBNET_FIRST + (start + k) % _SUBNET_COUNT
        if f"10.213.{x}." not in used:
            return x
    raise NetnsUnavailable("no free 10.213.<x>.0/24 subnet (all in use)")


@dataclass
class Host:
    """One test host: a namespace, its address and the root-side end of its veth."""

    netns: str
    address: str
    link: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Starts ``argv`` inside the namespace (in its own process group, see :meth:`Net.stop`)."""
        return subprocess.Popen(self.command(argv), start_new_session=True, **kwargs)


@dataclass
class Net:
    """A bridge ``pl<pid>n<k>br`` (address ``10.213.<x>.1``) and hosts ``pl<pid>n<k>a``, ``b``, ``c`` (``.10``, ...)."""

    hosts: list[Host]
    bridge: str
    gateway: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, host: Host, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Starts a process in ``host`` that :meth:`close` kills (its whole process group)."""
        proc = host.popen(argv, **kwargs)
        self.procs.append(proc)
        return proc

    def link_down(self, host: Host) -> None:
        """Cuts ``host`` off the network (its root-side veth goes down)."""
        _ip("link", "set", host.link, "down")

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to the process group of ``proc`` (one this net started) and reaps it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def close(self) -> None:
        """Kills the processes started here, deletes the namespaces, veths, ``/etc/netns`` files and the bridge."""
        for proc in self.procs:
            if proc.poll() is None:
                self.stop(proc)
        for host in self.hosts:
            _ip("link", "del", host.link, check=False)  # deletes both veth ends
            _ip("netns", "del", host.netns, check=False)
            shutil.rmtree(ETC_NETNS / host.netns, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)
        with contextlib.suppress(OSError):
            ETC_NETNS.rmdir()  # only when empty (no other namespace's files)


def wait_port(address: str, timeout: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` s (from the root namespace)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


@contextlib.contextmanager
def network(count: int = 2) -> Iterator[Net]:
    """Creates ``count`` (2 or 3) hosts on a private bridge; tears everything down on exit (also on errors).

    Host i is namespace ``pl<pid>n<k><a|b|c>``, interface :data:`IFACE` with ``10.213.<x>.<10+i>/24``;
    the root namespace reaches them at ``10.213.<x>.1`` (the bridge).
    """
    require()
    if not 1 <= count <= 3:
        raise ValueError(f"count must be 1..3, got {count}")
    remove_leftovers()
    prefix = f"pl{os.getpid()}n{next(_COUNTER) % 10}"  # at most 15 characters with a suffix (a link name)
    x = _free_subnet(os.getpid())
    net = Net(hosts=[], bridge=f"{prefix}br", gateway=f"10.213.{x}.1")
    atexit.register(net.close)
    terminate = _raise_on_sigterm()
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for i in range(count):
            letter = "abc"[i]
            host = Host(netns=f"{prefix}{letter}", address=f"10.213.{x}.{10 + i}", link=f"{prefix}{letter}")
            net.hosts.append(host)
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.link, "type", "veth", "peer", "name", IFACE, "netns", host.netns)
            _ip("link", "set", host.link, "master", net.bridge)
            _ip("link", "set", host.link, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", IFACE)
            _ip("-n", host.netns, "link", "set", IFACE, "up")
            _ip("-n", host.netns, "route", "add", "default", "via", net.gateway)
        _write_hosts_files(net)
    except BaseException as err:
        net.close()
        atexit.unregister(net.close)
        terminate()
        if not isinstance(err, subprocess.CalledProcessError):
            raise
        raise NetnsUnavailable(f"setting up the test network failed: {' '.join(err.cmd)}: {err.stderr}") from err
    try:
        yield net
    finally:
        net.close()
        atexit.unregister(net.close)
        terminate()


def _raise_on_sigterm() -> Callable[[], None]:
    """Makes SIGTERM raise ``SystemExit`` (``finally`` tears down) unless a handler is set; returns the undo."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return lambda: None

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def free_port() -> int:
    """A TCP port number that is free now (ports are per namespace, so any free one works inside too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
