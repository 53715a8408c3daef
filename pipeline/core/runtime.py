"""Start TensorFlow as the project needs it: quiet C++ start-up lines, CPU allocator statistics, logical CPUs.

TensorFlow decides some things once, when it starts: whether its CPU allocator keeps statistics (only the
BFC allocator does, and TensorFlow picks it by itself on some processors and not on others), and how many
logical CPU devices exist. Everything here must run before the first ``import tensorflow`` to take effect.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Any

CPU_DEVICES_ENV = "PIPELINE_CPU_DEVICES"
"""Environment variable: how many logical CPU devices ``import pipeline`` creates (the documented exception)."""

BFC_ENV = "TF_CPU_ALLOCATOR_USE_BFC"
"""TensorFlow's switch for the BFC CPU allocator, the one that keeps peak-memory statistics on every processor."""

START_UP_NOISE = re.compile("|".join([
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.",
    r"Unable to register (cuDNN|cuFFT|cuBLAS) factory",
    r"computation placer already registered",
    r"oneDNN custom operations are on",
]))
"""Lines TensorFlow prints while starting on any machine; none of them reports a problem of the user's."""

NO_GPU_NOISE = re.compile(r"cuda_platform\.cc:\d+\] failed call to cuInit")
"""The CUDA probe's error line: noise only where no NVIDIA driver is installed."""


def tensorflow_started() -> bool:
    """Whether TensorFlow is imported in this process (then start-up settings no longer apply)."""
    return "tensorflow" in sys.modules


def has_nvidia_driver() -> bool:
    """Whether this machine has an NVIDIA kernel driver (then a failed ``cuInit`` is a real error)."""
    return os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")


def is_noise(line: str, gpu_driver: bool) -> bool:
    """Whether a line TensorFlow printed at start-up is known noise (never a real error of the user's)."""
    return bool(START_UP_NOISE.search(line) or (not gpu_driver and NO_GPU_NOISE.search(line)))


def start_tensorflow_quietly() -> Any:
    """Imports TensorFlow and lists its devices with its C++ start-up lines filtered.

    TensorFlow's start-up lines go to file descriptor 2 before its log level applies (``TF_CPP_MIN_LOG_LEVEL``
    cannot hide them). They are captured while TensorFlow starts, and every line that is not known noise
    (:data:`START_UP_NOISE`; the failed CUDA probe only on a machine without an NVIDIA driver) is printed
    again, so real errors still show.

    Returns:
        The ``tensorflow`` module.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if tensorflow_started():
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe runs here
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
    gpu_driver = has_nvidia_driver()
    kept = [line for line in text.splitlines() if line.strip() and not is_noise(line, gpu_driver)]
    if kept:
        print("\n".join(kept), file=sys.stderr, flush=True)
    return tf


def cpu_devices_from_env() -> None:
    """Creates ``PIPELINE_CPU_DEVICES`` logical CPU devices when that variable is set (imports TensorFlow then).

    Raises:
        DeviceError: when the value is not a whole number, or TensorFlow started with fewer devices.
    """
    value = os.environ.get(CPU_DEVICES_ENV)
    if not value:
        return
    from pipeline.core import devices
    from pipeline.errors import DeviceError

    try:
        count = int(value)
    except ValueError:
        raise DeviceError(f"{CPU_DEVICES_ENV}={value!r} must be a whole number of logical CPU devices") from None
    devices.setup_cpu_devices(count)
