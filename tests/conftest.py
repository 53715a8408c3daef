"""Test setup: 4 logical CPU devices and the BFC CPU allocator before TensorFlow starts, determinism, fixed seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PIPELINE_CPU_DEVICES"] = "4"
# Peak memory on every processor: only TF's BFC CPU allocator keeps statistics, and TF picks it by
# itself on some processors only (pipeline.core.runtime.BFC_ENV; must be set before TensorFlow starts).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

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
