"""Cluster addresses: host:port parsing, wildcard refusal, own-host checks, reachability, the trainer's address."""

from __future__ import annotations

import ipaddress
import os
import re
import socket

import tensorflow as tf

from pipeline.errors import ClusterError

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")
"""Host names that mean "every interface" (an IPv6 host may be bracketed: ``[::]``), see :func:`is_wildcard`."""
ADDRESS_ENV = "PIPELINE_CLUSTER_ADDRESS"
"""Environment variable: the address (``host`` or ``host:port``) the workers reach the trainer at."""


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def is_wildcard(host: str) -> bool:
    """Whether ``host`` means "every interface" (one of :data:`WILDCARD_HOSTS`, brackets ignored)."""
    return host.strip("[]") in WILDCARD_HOSTS


def check_addresses(spec: tf.train.ClusterSpec, allow_wildcard: bool = False) -> None:
    """Refuses wildcard addresses in a cluster spec unless ``allow_wildcard``.

    The servers have no authentication; every task must be named by a concrete
    address (a private interface, or loopback for one host).

    Raises:
        ClusterError: naming the task and its address.
    """
    for job in spec.jobs:
        for task, address in enumerate(spec.job_tasks(job)):
            host, _ = _split_address(address)
            if is_wildcard(host) and not allow_wildcard:
                raise ClusterError(
                    f"task /job:{job}/task:{task} has the wildcard address {address!r}; TF gRPC "
                    "servers have no authentication, so name the interface each task serves on "
                    "(e.g. 127.0.0.1:2222 or a private-network address), or pass "
                    "--allow-wildcard if you really want to accept connections from anywhere"
                )


def _is_local_host(host: str) -> bool:
    """Whether ``host`` resolves to an address of this machine (it can be bound to)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, _, _, _, addr in infos:
        ip = addr[0]
        if ipaddress.ip_address(ip.split("%")[0]).is_loopback:
            return True
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((ip, 0))
                return True
            except OSError:
                continue
    return False


def _reachable(address: str, timeout: float) -> bool:
    host, port = _split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def route_source(host: str, port: int) -> str:
    """The local address this host's routing table uses to reach ``host`` (no packet is sent).

    Raises:
        ClusterError: ``host`` does not resolve or no route leads to it.
    """
    try:
        family, _, _, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(target)  # UDP connect: a route lookup only
            return str(sock.getsockname()[0])
    except OSError as err:
        raise ClusterError(f"no route from this host to {host}:{port}: {err}") from err


def trainer_address(spec: tf.train.ClusterSpec, address: str | None = None) -> str:
    """The ``host:port`` the workers reach the trainer (job ``localhost``) at.

    Workers fetch tensors from the trainer (its inputs, its variables), so the trainer
    must serve on an address they can reach: TensorFlow's own default,
    ``localhost:<port>``, only works when every task runs on this host. By default the
    trainer takes the local address its routes use towards the first task, and a free
    port on it.

    Args:
        spec: the cluster spec (without the trainer).
        address: ``host`` or ``host:port`` to use instead (default ``$PIPELINE_CLUSTER_ADDRESS``).

    Returns:
        ``"host:port"`` (IPv6 hosts bracketed).

    Raises:
        ClusterError: the override is a wildcard or not an address of this machine, or no free port.
    """
    address = address or os.environ.get(ADDRESS_ENV) or ""
    port = 0
    if address:
        with_port = re.fullmatch(r"(\[[^\]]*\]|[^:]*):(\d+)", address)
        host, port = ((with_port.group(1), int(with_port.group(2))) if with_port else (address, 0))
        host = host.strip("[]")
        if is_wildcard(host) or not _is_local_host(host):
            raise ClusterError(f"{ADDRESS_ENV}={address!r}: the trainer's address must be a concrete address of "
                               "this machine that the workers can reach (e.g. its private-network address)")
    else:
        jobs = [j for j in spec.jobs if j != "localhost"]
        first_host, first_port = _split_address(spec.job_tasks(jobs[0])[0])
        host = route_source(first_host, first_port)
    if not port:
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        except OSError as err:
            raise ClusterError(f"the trainer cannot take a port on {host}: {err}; set {ADDRESS_ENV}=host:port") from err
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def interface_of(address: str) -> str | None:
    """The name of the local network interface that holds ``address`` (``None`` if none does)."""
    import psutil  # noqa: PLC0415 - a Horovod dependency; only replicas need interface names

    for name, entries in psutil.net_if_addrs().items():
        if any(entry.address.split("%")[0] == address for entry in entries):
            return name
    return None
