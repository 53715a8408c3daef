"""Checkpoints (weights, optimizer slots, step, epoch, data position in samples) independent of the topology."""

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
from pipeline.train import ckpt_format

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 after writing a checkpoint (EX_TEMPFAIL: rerun to resume)."""

log = logging.getLogger(__name__)


class Checkpointer:
    """Writes and restores topology-free checkpoints (:mod:`pipeline.train.ckpt_format`) of a pipeline.

    A checkpoint ``ckpt-<step>`` is a TensorFlow tensor bundle whose tensors are named by the model's
    own variable paths (``model/conv1/kernel``, ``optimizer/adam/conv1/kernel/momentum``, ...) plus
    ``meta/step``, ``meta/epoch``, ``meta/samples`` (the data position: training samples consumed over
    all replicas) and ``meta/global_batch``. So it restores into the same model split into other stages
    (other K, cuts, schedule, micro-batches) or trained by another number of replicas at the same
    global batch. A checkpoint that does not fit is refused before any variable is changed.

    Args:
        directory: where checkpoints are written (``RUN_DIR/checkpoints``).
        stage_models: the stage models (``[model_0, model_1, ...]``), built.
        optimizer: the optimizer, built (so its slot variables exist before a restore).
        keep: how many checkpoints to keep.
        global_batch: samples per step over all replicas (``replicas x data.batch_size``); ``None``:
            unknown (the data position is then not recorded in samples and not checked).
        replicas: the number of replicas (recorded for information).
    """

    def __init__(self, directory: str, stage_models: Sequence[Any], optimizer: Any, keep: int = 3,
                 global_batch: int | None = None, replicas: int = 1):
        self.directory = directory
        self.stage_models = list(stage_models)
        self.optimizer = optimizer
        self.keep = keep
        self.global_batch = global_batch
        self.replicas = replicas
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.steps_per_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps_per_epoch")
        self.saved_meta: dict[str, int] = {}
        """The ``meta/*`` integers of the last restored checkpoint (``replicas``, ``global_batch``, ...)."""

    @property
    def checkpoints(self) -> list[str]:
        """The kept checkpoint prefixes, oldest first."""
        return ckpt_format.listed(self.directory)

    @property
    def manager(self) -> "Checkpointer":
        """Itself (the earlier ``tf.train.CheckpointManager``'s ``.checkpoints`` list is :attr:`checkpoints`)."""
        return self

    def variables(self) -> dict[str, Any]:
        """``{checkpoint key: variable}`` of the stages and the optimizer."""
        return ckpt_format.state_variables(self.stage_models, self.optimizer)

    def save(self, step: int, epoch: int, steps_per_epoch: int) -> str:
        """Writes ``ckpt-<step>`` atomically (bundle, fsync, rename), then the state file; drops the oldest."""
        self.step.assign(step)
        self.epoch.assign(epoch)
        self.steps_per_epoch.assign(steps_per_epoch)
        os.makedirs(self.directory, exist_ok=True)
        gb = self.global_batch or 0
        meta = {"format_version": ckpt_format.FORMAT_VERSION, "step": step, "epoch": epoch,
                "steps_per_epoch": steps_per_epoch, "samples": step * gb if gb else -1, "global_batch": gb,
                "replicas": self.replicas}
        prefix = ckpt_format.write(os.path.join(self.directory, f"ckpt-{step}"),
                                   {k: v.numpy() for k, v in self.variables().items()}, meta)
        kept = [p for p in self.checkpoints if p != prefix] + [prefix]
        ckpt_format.write_state(self.directory, kept[-self.keep:])
        for old in kept[:-self.keep]:
            ckpt_format.remove(old)
        return prefix

    def restore(self, path: str, check_position: bool = False) -> int:
        """Restores one checkpoint, all or nothing; returns its global step.

        Args:
            path: the checkpoint prefix (``.../ckpt-40``).
            check_position: refuse a checkpoint written at another global batch (to resume training,
                whose data position must then be the same step; evaluation needs no such check).

        Raises:
            CheckpointError: the checkpoint does not fit the model or optimizer (names, shapes), or
                (``check_position``) was written at another global batch; nothing was restored.
            tf.errors.OpError, OSError, ValueError: the files are unreadable (missing, truncated).
        """
        saved, reader = ckpt_format.read(path)
        if "meta/format_version" not in saved:
            if ckpt_format.LEGACY_KEY in saved:
                return self._restore_legacy(path, saved)
            raise CheckpointError(f"checkpoint {path} is not a pipeline checkpoint (no meta/format_version)")
        meta = {k: int(reader.get_tensor(f"meta/{k}")) for k in ckpt_format.META if f"meta/{k}" in saved}
        if meta["format_version"] > ckpt_format.FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format version {meta['format_version']}; this pipeline "
                                  f"reads up to {ckpt_format.FORMAT_VERSION}: upgrade the pipeline package")
        if check_position:
            self._check_batch(path, meta)
        current = self.variables()
        pairs = ckpt_format.match(path, {k: v for k, v in saved.items() if not k.startswith("meta/")}, current)
        values = {key: reader.get_tensor(saved_key) for key, saved_key in pairs.items()}  # all read first
        for key, value in values.items():
            current[key].assign(value)
        self.saved_meta = meta
        self.epoch.assign(meta["epoch"])
        self.steps_per_epoch.assign(meta["steps_per_epoch"])
        self.step.assign(meta["step"])
        return meta["step"]

    def _check_batch(self, path: str, meta: dict[str, int]) -> None:
        """Refuses a checkpoint whose data position in samples is not the same step at this global batch."""
        saved_gb, samples = meta.get("global_batch", 0), meta.get("samples", -1)
        if not self.global_batch or saved_gb <= 0 or samples < 0:
            return
        if saved_gb != self.global_batch:
            replicas = max(meta.get("replicas", 1), 1)
            raise CheckpointError(
                f"checkpoint {path} was written at a global batch of {saved_gb} samples per step ({replicas} "
                f"replica(s) x {saved_gb // replicas}), this run has {self.global_batch} ({self.replicas} x "
                f"{self.global_batch // self.replicas}); the data position ({samples} samples) and the batches "
                f"that follow are only the same at the same global batch. Set data.batch_size to "
                f"{saved_gb // self.replicas if saved_gb % self.replicas == 0 else 'a value'} so that replicas x "
                f"data.batch_size = {saved_gb}, or train into a new run folder (--run-dir)")

    def _restore_legacy(self, path: str, saved: dict[str, Any]) -> int:
        """A checkpoint of the earlier format (``tf.train.Checkpoint`` of stages and optimizer), all or nothing.

        That format holds the trainable weights only as the optimizer's ordered variable list (not the
        non-trainable ones such as BatchNormalization statistics), so it restores into the same model
        whose trainable variables have the same shapes in the same order (any cuts); else it is refused.
        """
        trainable = [v for m in self.stage_models for v in m.trainable_variables]
        key = "optimizer/_trainable_variables/{}/.ATTRIBUTES/VARIABLE_VALUE"
        shapes = [tuple(saved[key.format(i)][0]) for i in range(len(saved)) if key.format(i) in saved]
        if shapes != [tuple(v.shape) for v in trainable]:
            raise CheckpointError(f"checkpoint {path} has the earlier format, which restores only into a model with "
                                  f"the same trainable variables in the same order: it holds {len(shapes)} of shapes "
                                  f"{shapes[:6]}..., the model has {len(trainable)} ({[v.path for v in trainable][:6]}"
                                  "...); nothing was restored")
        legacy = tf.train.Checkpoint(optimizer=self.optimizer, step=self.step, epoch=self.epoch,
                                     steps_per_epoch=self.steps_per_epoch)
        variables = [*self.variables().values(), self.step, self.epoch, self.steps_per_epoch]
        before = [v.numpy() for v in variables]
        try:
            legacy.restore(path).expect_partial()
        except Exception as err:  # noqa: BLE001 - put every variable back, then explain
            for v, value in zip(variables, before):
                v.assign(value)
            raise CheckpointError(f"checkpoint {path} (earlier format) could not be restored: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0]}; nothing was restored") from None
        if any(not v.trainable for m in self.stage_models for v in m.variables):
            log.warning("checkpoint %s has the earlier format, which did not hold non-trainable variables "
                        "(e.g. BatchNormalization statistics): those keep their initial values", path)
        self.saved_meta = {}
        return int(self.step.numpy())

    def restore_latest(self) -> tuple[int, str | None]:
        """Restores the newest readable checkpoint, falling back to older ones with a warning.

        Returns:
            ``(global_step, path)``, or ``(0, None)`` when there is no usable checkpoint.

        Raises:
            CheckpointError: the newest readable checkpoint does not fit the model (never skipped).
        """
        candidates = list(reversed(self.checkpoints))
        for path in candidates:
            try:
                return self.restore(path, check_position=True), path
            except CheckpointError:
                raise
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


# SLURM carries out a requeue by signalling every process of the job, and `scontrol` is one of them: it could be
# killed by the SIGTERM of the very requeue it asked for, before it reports success. It runs with SIGTERM
# ignored (a disposition `exec` keeps), so it always reports; SLURM's SIGKILL comes only KillWait seconds later.
_SCONTROL_IGNORING_TERM = 'trap "" TERM; exec scontrol requeue "$0"'


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when running under SLURM.

    Returns:
        Whether SLURM accepted the request.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        print("[pipeline] checkpoint.requeue is set but SLURM_JOB_ID is not; not requeueing", flush=True)
        return False
    result = subprocess.run(["sh", "-c", _SCONTROL_IGNORING_TERM, job], capture_output=True, text=True,
                            check=False)
    if result.returncode:
        why = result.stderr.strip() or (f"killed by {signal.Signals(-result.returncode).name}"
                                        if result.returncode < 0 else f"exit code {result.returncode}")
        print(f"[pipeline] scontrol requeue {job} failed: {why}", flush=True)
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
