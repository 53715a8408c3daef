"""Pipeline-parallel training for TensorFlow 2 and Keras 3."""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of progress output

from pipeline import devices as _devices  # noqa: E402

_devices._setup_from_env()  # PIPELINE_CPU_DEVICES=K: create K logical CPUs before TF starts

from pipeline import schedule as schedules  # noqa: E402
from pipeline import simulate  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.model import PipelineModel  # noqa: E402
from pipeline.partition import split  # noqa: E402
from pipeline.stage import Stage  # noqa: E402
from pipeline.verify import verify  # noqa: E402

__all__ = ["PipelineModel", "Stage", "load_config", "schedules", "simulate", "split", "verify"]
__version__ = "0.1.0"
