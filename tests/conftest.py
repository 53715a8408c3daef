"""Test setup: 4 logical CPU devices and the BFC CPU allocator before TensorFlow starts, determinism, fixed seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PIPELINE_CPU_DEVICES"] = "4"

from pipeline.core import runtime  # noqa: E402  (imports no TensorFlow)

runtime.enable_cpu_memory_stats()  # peak memory on every processor (TF picks BFC on some only)

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import pipeline  # noqa: E402,F401  (creates the logical CPU devices)

tf.config.experimental.enable_op_determinism()


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()
