"""``pipeline`` with a fault injected for the kill/resume tests: SIGKILL right after training step N.

    python tests/kill_script.py N train CONFIG [--set key=value ...]

Adds a Keras callback to every ``PipelineModel.fit`` of the run, after the run's own callbacks (so
step N's log line and any checkpoint due at step N are written first); it kills this process with
SIGKILL (no clean-up, like ``kill -9`` or a lost node) once N training steps have run in this process,
which for a fresh run is global step N. The rest of the arguments go to ``pipeline.cli.main``.
"""

import os
import signal
import sys

import keras

from pipeline.cli import main
from pipeline.core.model import PipelineModel


class KillAfterStep(keras.callbacks.Callback):
    """SIGKILLs this process at the end of its ``steps``-th training step (counted over every ``fit``)."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps, self.done = steps, 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.done += 1
        if self.done >= self.steps:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def install(steps: int) -> None:
    """Makes every ``PipelineModel.fit`` in this process run :class:`KillAfterStep` last."""
    killer = KillAfterStep(steps)
    fit = PipelineModel.fit

    def fit_then_kill(self, *args, callbacks=None, **kwargs):
        return fit(self, *args, callbacks=[*(callbacks or []), killer], **kwargs)

    PipelineModel.fit = fit_then_kill


if __name__ == "__main__":
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit(f"usage: {sys.argv[0]} STEPS COMMAND [ARGS...]  (e.g. 7 train configs/digits_cnn.yaml)")
    install(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
