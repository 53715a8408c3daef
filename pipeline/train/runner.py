"""Run a YAML config with ``PipelineModel.fit`` into a run folder: build, train with resume, restore."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.errors import DataError, SettingError, SplitError
from pipeline.train.config import Config, dump
from pipeline.train.typed_yaml import fail, rekey


@contextlib.contextmanager
def _under_key(section: str, *value: Any, **paths: str) -> Iterator[None]:
    """Re-raises a library's error, which names its own argument, as a ConfigError under the YAML key path.

    The argument ``setting`` of the error goes under ``paths[setting]`` when given, else ``<section>.<setting>``;
    an error that names no setting goes under ``section`` (with ``value``, the config's value there, if given).
    """
    try:
        yield
    except (SettingError, DataError, SplitError) as err:
        setting = getattr(err, "setting", None)
        if setting is None:
            raise rekey(err, section, *value) from None
        raise rekey(err, paths.get(setting, f"{section}.{setting}")) from None


# ------------------------------------------------------------------ building blocks

def _loss(cfg: Config) -> Any:
    import keras

    classes = {
        "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
        "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
        "binary_crossentropy": keras.losses.BinaryCrossentropy,
    }
    if cfg.loss in classes:
        return classes[cfg.loss](from_logits=cfg.from_logits)
    return keras.losses.get(cfg.loss)


def _optimizer(cfg: Config) -> Any:
    import keras

    return keras.optimizers.get({"class_name": cfg.optimizer.name,
                                 "config": {"learning_rate": cfg.optimizer.learning_rate, **cfg.optimizer.args}})


def _batch_loss_metric(loss: Any) -> Any:
    import keras

    class BatchLoss(keras.metrics.Metric):
        """The loss of the last batch alone (recomputed from its merged outputs), not a running mean."""

        def __init__(self, name: str = "batch_loss", **kwargs: Any):
            super().__init__(name=name, **kwargs)
            self.value = self.add_variable(shape=(), initializer="zeros", name="value")

        def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
            self.value.assign(keras.ops.cast(loss(y_true, y_pred, sample_weight), self.value.dtype))

        def result(self) -> Any:
            return self.value

    return BatchLoss()


@dataclass
class Built:
    """Everything a config builds: the data, the full model, its stages, the pipeline, the checkpointer."""

    data: Any
    model: Any
    stages: list
    pipeline: Any
    checkpointer: Any
    devices: list


def build(cfg: Config, run_dir: str, shard: tuple[int, int] = (1, 0)) -> Built:
    """Seeds, devices, data, model, split, compiled ``PipelineModel`` and its checkpointer (nothing restored).

    Args:
        cfg: a validated config.
        run_dir: the run folder (checkpoints go to ``run_dir/checkpoints``).
        shard: ``(num_shards, index)`` of this data-parallel replica (``data`` stays whole: each replica takes
            its elements of every shuffled epoch in :func:`pipeline.train.data.train_stream`).
    """
    from pipeline.core import devices as devices_lib  # TensorFlow starts here

    devices_arg = list(cfg.pipeline.devices) if isinstance(cfg.pipeline.devices, tuple) else cfg.pipeline.devices
    from pipeline.dist import cluster

    cluster.connect_from_env()  # PIPELINE_CLUSTER: stages on other hosts' devices (docs/scale_out.md)
    device_names = devices_lib.resolve(cfg.split.stages, devices_arg)  # before any TF op (CPU fallback)

    import keras
    import tensorflow as tf

    from pipeline.train import data as data_lib
    from pipeline.train import models
    from pipeline.train.checkpoint import Checkpointer
    from pipeline.core.model import PipelineModel
    from pipeline.core.partition import split

    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    with _under_key("data"):
        data = data_lib.load(cfg.data, cfg.seed)
    with _under_key("model"):
        model = models.build(cfg.model.name, data.input_shape, data.num_classes, **cfg.model.args)
    if cfg.split.cuts:
        with _under_key("split.cuts", list(cfg.split.cuts)):
            stages = split(model, cuts=list(cfg.split.cuts))
    elif cfg.split.stages > 1:
        sample = next(iter(data.train.batch(cfg.data.batch_size)))[0] if cfg.split.balance == "time" else None
        with _under_key("split.num_stages", cfg.split.num_stages, num_stages="split.num_stages"):
            stages = split(model, num_stages=cfg.split.stages, balance=cfg.split.balance, sample_input=sample)
    else:
        stages = [model]
    pipe = PipelineModel(stages, devices=device_names, microbatches=cfg.pipeline.microbatches,
                         schedule=cfg.pipeline.schedule, batchnorm=cfg.pipeline.batchnorm,
                         recompute=cfg.pipeline.recompute, memory_budget=cfg.pipeline.memory_budget,
                         loop=cfg.pipeline.loop, name=f"pipeline_{cfg.name}")
    loss = _loss(cfg)
    metrics = list(cfg.metrics) + ([_batch_loss_metric(loss)] if cfg.train.log_steps else [])
    pipe.compile(optimizer=_optimizer(cfg), loss=loss, metrics=metrics)
    pipe.build((None, *data.input_shape))
    pipe.optimizer.build(pipe.trainable_variables)
    if pipe.auto_settings is not None:  # schedule/microbatches/recompute: auto, chosen on one real batch
        from pipeline.dist import replicas
        from pipeline.perf import autoplan_measure

        sample = next(iter(data.train.batch(cfg.data.batch_size, drop_remainder=True)))[0]
        with _under_key("pipeline"):
            autoplan_measure.resolve_for_run(pipe, sample, run_dir, write=replicas.is_chief(),
                                             divisible=cfg.pipeline.uneven_microbatches == "forbid")
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), stages, pipe.optimizer, cfg.checkpoint.keep,
                                global_batch=shard[0] * cfg.data.batch_size, replicas=shard[0])
    return Built(data, model, stages, pipe, checkpointer, device_names)


def _tensorboard(log_dir: str) -> list:
    """Keras' TensorBoard callback, or none (with a note) when the tensorboard package is missing."""
    import importlib.util

    import keras

    if importlib.util.find_spec("tensorboard") is None:
        print("[pipeline] note: TensorBoard logs skipped (the tensorboard package is not installed: "
              "pip install tensorboard)", flush=True)
        return []
    return [keras.callbacks.TensorBoard(log_dir, update_freq="epoch")]


def _metrics_callback(path: str, batch_size: int) -> Any:
    import keras

    class MetricsFile(keras.callbacks.Callback):
        """Appends one JSON line per epoch: epoch, loss, metrics, samples/s, seconds per step."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start, self.steps = time.perf_counter(), 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.steps += 1
            self.end = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = self.end - self.start  # training steps only, not validation
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
                   "steps": self.steps, "samples_per_s": self.steps * batch_size / max(seconds, 1e-9),
                   "time_per_step_s": seconds / max(self.steps, 1)}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    return MetricsFile()


PAUSE_ENV = "PIPELINE_PAUSE_AT_STEP"
"""Set by ``pipeline resume-check`` for the run it kills: after logging this global step, the run stops itself
(SIGSTOP) so that the SIGKILL lands there and not some steps later (before that step's checkpoint)."""


def _steps_callback(path: str, start_step: int) -> Any:
    import keras

    pause_at = int(os.environ.get(PAUSE_ENV) or 0)

    class StepsFile(keras.callbacks.Callback):
        """Appends one JSON line per step: global step and that step's loss (``batch_loss``)."""

        def __init__(self) -> None:
            super().__init__()
            self.step = start_step

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.step += 1
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, "loss": float(logs["batch_loss"])}) + "\n")
            if self.step == pause_at:
                os.kill(os.getpid(), signal.SIGSTOP)  # resume-check's SIGKILL follows

    return StepsFile()


# ------------------------------------------------------------------ commands

def run_dir_for(cfg: Config, override: str | None) -> str:
    """The run folder: ``--run-dir``, else the config's ``run_dir``, else ``runs/<name>``."""
    return override or cfg.run_dir or os.path.join("runs", cfg.name)


def train(cfg: Config, run_dir: str, shard: tuple[int, int] = (1, 0), reducer: Any = None) -> int:
    """Trains ``cfg`` into ``run_dir``, resuming from its latest checkpoint; returns the exit code.

    Returns:
        0 when training finished, :data:`pipeline.checkpoint.PREEMPTED_EXIT_CODE` when a
        SIGTERM/SIGUSR1 stopped it after a checkpoint.
    """
    from pipeline.train.checkpoint import Preemption

    preemption = Preemption().install()  # before TensorFlow starts its work
    try:
        return _train(cfg, run_dir, shard, reducer, preemption)
    finally:
        preemption.uninstall()


def _train(cfg: Config, run_dir: str, shard: tuple[int, int], reducer: Any, preemption: Any) -> int:
    from pipeline.dist import replicas  # data-parallel replicas (Horovod), see docs/scale_out.md
    from pipeline.train.checkpoint import PREEMPTED_EXIT_CODE, CheckpointCallback, requeue_slurm_job

    chief = replicas.is_chief()  # only rank 0 writes the config copy, logs, metrics and checkpoints
    if cfg.pipeline.replicas is not None and cfg.pipeline.replicas != replicas.size():
        raise fail("pipeline.replicas", cfg.pipeline.replicas,
                   f"but {replicas.size()} replica process(es) were started (backend {replicas.backend()}); start "
                   f"{cfg.pipeline.replicas} (`horovodrun -np {cfg.pipeline.replicas} ...`, `srun --ntasks "
                   f"{cfg.pipeline.replicas}` with PIPELINE_REPLICAS=horovod) or set pipeline.replicas to null")
    os.makedirs(run_dir, exist_ok=True)
    if chief:
        dump(cfg, os.path.join(run_dir, "config.yaml"))
    b = build(cfg, run_dir, shard)
    if reducer is not None:
        b.pipeline.gradient_reducer = reducer
    if replicas.size() > 1:
        b.checkpointer = replicas.ChiefWriter(b.checkpointer)

    import keras

    from pipeline.train import data as data_lib

    with _under_key("data", requested="train.steps_per_epoch"):
        spe = data_lib.steps_per_epoch(b.data.num_train // shard[0], cfg.data.batch_size, cfg.train.steps_per_epoch)
    start, path = b.checkpointer.restore_latest() if cfg.checkpoint.enabled else (0, None)
    if path:
        saved_spe = int(b.checkpointer.steps_per_epoch.numpy())
        if saved_spe and saved_spe != spe:
            print(f"[pipeline] warning: checkpoint has {saved_spe} steps per epoch, config now {spe}; "
                  "the data position is recomputed with the new value", flush=True)
        print(f"[pipeline] resumed from {path} at step {start} (epoch {start // spe + 1}, "
              f"batch {start % spe} of {spe})", flush=True)
        saved = b.checkpointer.saved_meta  # the topology may differ: docs/scale_out.md (checkpoints)
        if saved.get("samples", -1) >= 0:
            print(f"[pipeline] data position {saved['samples']} samples, written by {saved['replicas']} replica(s) "
                  f"at {saved['global_batch']} samples per step", flush=True)
    total = spe * cfg.train.epochs
    print(f"[pipeline] run folder {run_dir}: {len(b.stages)} stages on {b.devices}, "
          f"{b.pipeline.microbatches} micro-batches, schedule {b.pipeline.executor.schedule_name}, "
          f"{spe} steps/epoch x {cfg.train.epochs} epochs; {b.data.num_train} training, "
          f"{b.data.num_validation} validation, {b.data.num_test} test examples", flush=True)
    if cfg.train.validate and b.data.validation is None:
        print("[pipeline] note: no validation set (data.validation_split is 0), so no val_* figures; "
              "the test set is evaluated once, after training", flush=True)
    ckpt_cb = CheckpointCallback(b.checkpointer, spe, start, cfg.checkpoint.every_steps,
                                 preemption) if cfg.checkpoint.enabled else None
    # Replicas first: broadcast rank 0's state, agree on stopping (a signal on any rank), average logs.
    callbacks = replicas.callbacks(lambda: preemption.requested,
                                   lambda: setattr(preemption, "signum", preemption.signum or signal.SIGTERM))
    if chief:
        callbacks += _tensorboard(os.path.join(run_dir, "tensorboard"))
        callbacks.append(_metrics_callback(os.path.join(run_dir, "metrics.jsonl"), cfg.data.batch_size))
    if cfg.train.log_steps and chief:
        callbacks.append(_steps_callback(os.path.join(run_dir, "steps.jsonl"), start))
    if ckpt_cb is not None:
        callbacks.append(ckpt_cb)
    # Validation (val_*, each epoch) on the validation set; the test set only once, after training.
    validation = (data_lib.eval_dataset(b.data.validation, cfg.data.batch_size)
                  if cfg.train.validate and b.data.validation is not None else None)
    epoch, offset = divmod(start, spe)
    # A resumed run first finishes its partial epoch (fewer steps), then runs whole epochs.
    phases = ([(epoch, spe - offset)] if offset else []) + ([(epoch + bool(offset), spe)]
                                                          if epoch + bool(offset) < cfg.train.epochs else [])
    for first, steps in phases:
        last = first + 1 if steps != spe else cfg.train.epochs
        stream = data_lib.train_stream(b.data.train, cfg.data.batch_size, spe, cfg.seed, start_step=first * spe
                                       + (spe - steps), end_epoch=last, shuffle_buffer=cfg.data.shuffle_buffer,
                                       shard=shard)  # replica r: elements r mod R of each shuffled epoch
        b.pipeline.fit(stream, epochs=last, initial_epoch=first, steps_per_epoch=steps, validation_data=validation,
                       callbacks=callbacks, verbose=cfg.train.verbose, shuffle=False)
        if ckpt_cb is not None and ckpt_cb.preempted:
            if cfg.checkpoint.requeue:
                requeue_slurm_job()
            print(f"[pipeline] preempted at step {ckpt_cb.global_step}: checkpoint written to "
                  f"{b.checkpointer.directory}; rerun the same command to resume", flush=True)
            return PREEMPTED_EXIT_CODE
    if start >= total:
        print(f"[pipeline] already trained: step {start} of {total}", flush=True)
    results = b.pipeline.evaluate(data_lib.eval_dataset(b.data.test, cfg.data.batch_size), verbose=0,
                                  return_dict=True)
    results = {k: float(v) for k, v in results.items() if k != "batch_loss"}
    if not chief:
        return 0
    with open(os.path.join(run_dir, "test_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    b.model.save(os.path.join(run_dir, "model.keras"))
    print("[pipeline] test " + ", ".join(f"{k}: {v:.4f}" for k, v in results.items()), flush=True)
    return 0


def restore(cfg: Config, run_dir: str, checkpoint: str | None = None) -> Built:
    """Builds ``cfg`` and restores its latest checkpoint (or ``checkpoint``: a run folder, folder or prefix)."""
    from pipeline.train.checkpoint import find_checkpoint

    b = build(cfg, run_dir)
    path = find_checkpoint(checkpoint or run_dir)
    step = b.checkpointer.restore(path)
    print(f"[pipeline] restored {path} (step {step})", file=sys.stderr, flush=True)
    return b
