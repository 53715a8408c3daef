"""Pick one device per stage: GPUs, the CPU fallback (logical CPU devices), or explicit names."""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from pipeline.core.runtime import CPU_DEVICES_ENV
from pipeline.errors import DeviceError, check_count


def setup_cpu_devices(count: int) -> list[str]:
    """Splits the host CPU into ``count`` logical devices (the CPU fallback).

    Must run before TensorFlow initializes its devices (before the first op,
    tensor or variable). Calling it again with a count already satisfied is fine.

    Args:
        count: how many logical CPU devices are needed (one per stage).

    Returns:
        The names of the logical CPU devices.

    Raises:
        DeviceError: if TensorFlow already started with fewer logical CPUs.
    """
    check_count("the CPU fallback's device count", count, error=DeviceError)
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) >= count:
        return cpu_device_names()
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as err:
        have = len(tf.config.list_logical_devices("CPU"))
        if have >= count:
            return cpu_device_names()
        raise DeviceError(
            f"the CPU fallback needs {count} logical CPU devices, but TensorFlow already "
            f"initialized its devices with {have}. Create them before TensorFlow runs any op: "
            f"call pipeline.core.devices.setup_cpu_devices({count}) at the top of your script, or set "
            f"the environment variable {CPU_DEVICES_ENV}={count} before importing pipeline."
        ) from err
    return cpu_device_names()


def cpu_device_names() -> list[str]:
    """Names of the logical CPU devices (initializes TensorFlow's devices)."""
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def gpu_device_names() -> list[str]:
    """Names of the logical GPU devices."""
    return [d.name for d in tf.config.list_logical_devices("GPU")]


def _local_key(name: str) -> tuple[str, int]:
    spec = tf.DeviceSpec.from_string(name)
    return (spec.device_type or "").upper(), spec.device_index or 0


def _check_explicit(devices: Sequence[str], num_stages: int) -> list[str]:
    devices = [str(d) for d in devices]
    if devices and len(devices) < num_stages and num_stages % len(devices) == 0:
        devices = round_robin(devices, num_stages)
    if len(devices) != num_stages:
        raise DeviceError(
            f"devices lists {len(devices)} device(s) {devices} for {num_stages} stage(s); "
            "give one device per stage (a device may repeat), or D devices where D divides the "
            f"number of stages (stage s then runs on devices[s % D], as interleaved_1f1b wants)"
        )
    known = {_local_key(d.name) for d in tf.config.list_logical_devices()}
    for d in devices:
        try:
            spec = tf.DeviceSpec.from_string(d)
        except ValueError:
            raise DeviceError(
                f"device {d!r} is not a device name; use names like '/GPU:0', '/CPU:1' or "
                "'/job:worker/task:1/device:GPU:0'"
            ) from None
        if spec.job not in (None, "localhost"):
            continue  # a device of another task of a cluster; checked when connecting
        if _local_key(d) not in known:
            raise DeviceError(
                f"device {d!r} is not a device of this process; it has "
                f"{sorted(n.name for n in tf.config.list_logical_devices())}. "
                "Use one of those, or the CPU fallback (devices=None)."
            )
    return devices


def round_robin(devices: Sequence[str], num_stages: int) -> list[str]:
    """Stage s on ``devices[s % D]``: each device holds ``num_stages / D`` non-adjacent stages (virtual stages)."""
    return [devices[s % len(devices)] for s in range(num_stages)]


def resolve(num_stages: int, devices: Sequence[str] | str | None = None, virtual_stages: int = 1) -> list[str]:
    """Chooses one device per stage.

    Args:
        num_stages: K, the number of stages.
        devices: ``None``/``"auto"`` picks GPUs when there are at least K, else
            the CPU fallback when there are none; ``"cpu"`` forces the CPU
            fallback; a list gives one device string per stage (it may repeat
            a device, or name devices of other cluster tasks), or D devices
            for K stages (D divides K): stage s runs on ``devices[s % D]``.
        virtual_stages: V, stages per device for ``"auto"``/``"cpu"``/``"gpu"``: K/V
            devices are picked and stage s runs on device ``s % (K/V)``.

    Returns:
        K device names.

    Raises:
        DeviceError: more stages than devices, or an unknown device.
    """
    if devices is not None and not isinstance(devices, str):
        return _check_explicit(devices, num_stages)
    if virtual_stages != 1:
        if not isinstance(virtual_stages, int) or virtual_stages < 1 or num_stages % virtual_stages:
            raise DeviceError(
                f"virtual_stages={virtual_stages!r} does not divide the {num_stages} stage(s); use a "
                f"divisor of {num_stages} (each device then holds that many stages)")
        return round_robin(resolve(num_stages // virtual_stages, devices), num_stages)
    mode = (devices or "auto").lower()
    if mode not in ("auto", "cpu", "gpu"):
        raise DeviceError(
            f"devices={devices!r} is not understood; use 'auto', 'gpu', 'cpu' or a list of "
            "device names such as ['/GPU:0', '/GPU:1']"
        )
    if mode in ("auto", "gpu"):
        gpus = tf.config.list_physical_devices("GPU")
        if len(gpus) >= num_stages:
            return gpu_device_names()[:num_stages]
        if gpus or mode == "gpu":
            raise DeviceError(
                f"{num_stages} stages need {num_stages} GPUs, but this machine has {len(gpus)}. "
                "Use fewer stages, or pass devices=[...] explicitly (a device may hold several "
                "stages), or devices='cpu' for the CPU fallback."
            )
    return setup_cpu_devices(num_stages)[:num_stages]
