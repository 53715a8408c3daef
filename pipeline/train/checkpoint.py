"""Checkpoints (stage weights, optimizer, step, epoch = data position), resume with fallback, preemption signals."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import warnings
from typing import Any, Sequence

import keras
import tensorflow as tf

from pipeline.errors import CheckpointError

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 after writing a checkpoint (EX_TEMPFAIL: rerun to resume)."""

log = logging.getLogger(__name__)


class Checkpointer:
    """All stages' variables, the optimizer state, the global step and epoch, in one ``tf.train.Checkpoint``.

    The global step is also the data position: the number of batches consumed, from which
    :func:`pipeline.data.train_stream` resumes the exact batch sequence.

    Args:
        directory: where checkpoints are written (``RUN_DIR/checkpoints``).
        stage_models: the stage models (``[model_0, model_1, ...]``), built.
        optimizer: the optimizer, built (so its slot variables exist before a restore).
        keep: how many checkpoints to keep.
    """

    def __init__(self, directory: str, stage_models: Sequence[Any], optimizer: Any, keep: int = 3):
        self.directory = directory
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.steps_per_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps_per_epoch")
        self.checkpoint = tf.train.Checkpoint(
            stages=list(stage_models), optimizer=optimizer, step=self.step, epoch=self.epoch,
            steps_per_epoch=self.steps_per_epoch,
        )
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep,
                                                  step_counter=self.step)

    def save(self, step: int, epoch: int, steps_per_epoch: int) -> str:
        """Writes a checkpoint for ``step`` (TF writes data then the index, then atomically the state file)."""
        self.step.assign(step)
        self.epoch.assign(epoch)
        self.steps_per_epoch.assign(steps_per_epoch)
        return self.manager.save(checkpoint_number=step)

    def restore(self, path: str) -> int:
        """Restores one checkpoint (all objects must match); returns its global step."""
        self.checkpoint.restore(path).assert_existing_objects_matched()
        return int(self.step.numpy())

    def restore_latest(self) -> tuple[int, str | None]:
        """Restores the newest readable checkpoint, falling back to older ones with a warning.

        Returns:
            ``(global_step, path)``, or ``(0, None)`` when there is no usable checkpoint.
        """
        candidates = list(reversed(self.manager.checkpoints))
        for path in candidates:
            try:
                return self.restore(path), path
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                msg = (f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0]}); "
                       "falling back to the previous checkpoint")
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                log.warning(msg)
        if candidates:
            warnings.warn(f"no readable checkpoint in {self.directory}; starting from scratch",
                          RuntimeWarning, stacklevel=2)
        return 0, None


def find_checkpoint(path: str) -> str:
    """A checkpoint prefix from a run folder, a checkpoint folder or a prefix.

    Raises:
        CheckpointError: nothing restorable at ``path`` (a ``FileNotFoundError`` too).
    """
    for folder in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(folder):
            latest = tf.train.latest_checkpoint(folder)
            if latest:
                return latest
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise CheckpointError(f"checkpoint {path!r}: no checkpoint found (give a run folder, its checkpoints/ "
                            "folder, or a checkpoint prefix such as RUN/checkpoints/ckpt-40)")


class Preemption:
    """Turns SIGTERM/SIGUSR1 into a request to stop after the current step (install once per process)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous_handlers: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once a preemption signal arrived."""
        return self.signum is not None

    def install(self) -> "Preemption":
        """Installs the handlers (main thread only); returns ``self``."""
        for sig in self.SIGNALS:
            try:
                self.previous_handlers[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread: no preemption handling here
                log.warning("preemption signals not handled: train() runs outside the main thread")
        return self

    def uninstall(self) -> None:
        """Puts back the handlers that were there before :meth:`install`."""
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        self.previous_handlers.clear()

    def handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal API
        self.signum = signum
        print(f"\n[pipeline] received {signal.Signals(signum).name}: finishing this step, then checkpoint and "
              f"exit {PREEMPTED_EXIT_CODE}", flush=True)


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when running under SLURM; returns whether it was asked."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        print("[pipeline] checkpoint.requeue is set but SLURM_JOB_ID is not; not requeueing", flush=True)
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if result.returncode:
        print(f"[pipeline] scontrol requeue {job} failed: {result.stderr.strip()}", flush=True)
        return False
    print(f"[pipeline] requeued SLURM job {job}", flush=True)
    return True


class CheckpointCallback(keras.callbacks.Callback):
    """Keras callback: checkpoint every N steps and at each epoch end; on a preemption signal, stop.

    Args:
        checkpointer: where to save.
        steps_per_epoch: batches per epoch (to turn the global step into epoch/position).
        start_step: the global step the run starts (or resumes) at.
        every_steps: checkpoint period in steps.
        preemption: the installed :class:`Preemption`, or ``None``.
    """

    def __init__(self, checkpointer: Checkpointer, steps_per_epoch: int, start_step: int = 0,
                 every_steps: int = 100, preemption: Preemption | None = None):
        super().__init__()
        self.checkpointer = checkpointer
        self.steps_per_epoch = steps_per_epoch
        self.global_step = start_step
        self.every_steps = every_steps
        self.preemption = preemption
        self.last_saved = start_step
        self.preempted = False

    def save(self) -> str:
        """Saves now (at the current global step)."""
        self.last_saved = self.global_step
        return self.checkpointer.save(self.global_step, self.global_step // self.steps_per_epoch,
                                      self.steps_per_epoch)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Counts the step; saves on schedule; on a preemption request, saves and stops training."""
        self.global_step += 1
        if self.global_step % self.every_steps == 0:
            self.save()
        if self.preemption is not None and self.preemption.requested and not self.preempted:
            if self.last_saved != self.global_step:
                self.save()
            self.preempted = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Saves at each epoch end (unless that step was just saved)."""
        if self.last_saved != self.global_step:
            self.save()
