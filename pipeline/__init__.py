"""Pipeline-parallel training for TensorFlow 2 and Keras 3."""

from pipeline import devices as _devices

_devices._setup_from_env()  # PIPELINE_CPU_DEVICES=K: create K logical CPUs before TF starts

from pipeline import schedule as schedules  # noqa: E402
from pipeline.model import PipelineModel  # noqa: E402
from pipeline.stage import Stage  # noqa: E402

__all__ = ["PipelineModel", "Stage", "schedules"]
__version__ = "0.1.0"
