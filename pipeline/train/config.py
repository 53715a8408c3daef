"""Run configs: frozen dataclasses, strict YAML loading, errors that name the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import yaml

from pipeline.core import schedule as _schedule
from pipeline.core.balance import BALANCE_MODES
from pipeline.errors import SettingError, check_count
from pipeline.perf import autoplan
from pipeline.train import models
from pipeline.train.typed_yaml import ConfigError
from pipeline.train.typed_yaml import build as _build
from pipeline.train.typed_yaml import fail as _fail
from pipeline.train.typed_yaml import keys as _keys
from pipeline.train.typed_yaml import plain as _plain
from pipeline.train.typed_yaml import rekey as _rekey

SOURCES = ("digits", "tfds", "image_folder", "synthetic")
SCHEDULES = tuple(sorted(_schedule.NAMES))
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "nadam")
LOSSES = (
    "sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy",
    "mean_squared_error", "mse", "mean_absolute_error", "mae", "huber",
)
METRICS = (
    "accuracy", "sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy",
    "sparse_top_k_categorical_accuracy", "top_k_categorical_accuracy", "mae", "mse",
)
UNEVEN_POLICIES = ("allow", "forbid")
BATCHNORM_MODES = ("microbatch", "deferred", "frozen")
"""The modes of :data:`pipeline.core.batchnorm.MODES` (kept TensorFlow-free here; a test checks they agree)."""


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build.

    Attributes:
        name: a zoo name from :mod:`pipeline.train.models`, or ``"package.module:function"``.
        args: keyword arguments for the model function.
    """

    name: str = "digits_cnn"
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitConfig:
    """How the model is cut into stages: ``cuts`` (layer names) or ``num_stages`` balanced by ``balance``."""

    cuts: tuple[str, ...] = ()
    num_stages: int | None = None
    balance: str = "params"

    @property
    def stages(self) -> int:
        """K, the number of stages this split makes."""
        return self.num_stages if self.num_stages else len(self.cuts) + 1


@dataclass(frozen=True)
class PipelineConfig:
    """Devices, micro-batches and schedule of the pipeline."""

    devices: str | tuple[str, ...] = "auto"
    microbatches: int | str = 1
    """M, or ``auto``: chosen (with ``schedule``/``recompute`` if auto too) by measurement and simulation."""
    schedule: str = "1f1b"
    recompute: bool | str = False
    """Recompute every stage's activations in backward (less memory, one more forward), or ``auto``."""
    loop: bool = False
    """With ``schedule: gpipe`` and ``recompute: true``: the step as tick loops (build time independent of M)."""
    memory_budget: int | str | None = "80%"
    """For ``auto``: per device, bytes, a share of its memory (``"80%"``) or a size (``"4GB"``); null: no limit."""
    uneven_microbatches: str = "allow"
    batchnorm: str = "microbatch"
    """BatchNormalization in a step: ``microbatch`` (ghost batches), ``deferred`` (moving statistics once
    per step from the whole mini-batch) or ``frozen`` (inference mode); see :mod:`pipeline.core.batchnorm`."""
    replicas: int | None = None
    """R, data-parallel copies of this pipeline (one process each, started by ``horovodrun -np R`` or ``srun``;
    each drives the stage devices above). Checked against the launcher at start; null: whatever it started."""


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer name, learning rate and extra keyword arguments."""

    name: str = "adam"
    learning_rate: float = 0.001
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    """Input data; which fields apply depends on ``source`` (see ``SOURCE_KEYS``).

    Three disjoint sets: *train* (what the optimizer sees), *validation* (``validation_split`` of the
    training examples, carved out before training; Keras' ``validation_data``, the ``val_*`` figures of
    each epoch, used to choose epochs and settings) and *test* (held out by the source: ``test_fraction``,
    ``test_split`` or ``num_test_samples``; evaluated once, after training: ``test_metrics.json``).

    Attributes:
        source: ``digits``, ``tfds``, ``image_folder`` or ``synthetic``.
        batch_size: examples per training step (the global batch of one pipeline replica).
        shuffle_buffer: shuffle buffer of the training stream.
        validation_split: fraction of the training examples held out as the validation set, in
            ``[0, 1)``; the same examples on every run with the same ``seed`` (a seeded choice), and
            the same whether ``train.validate`` is on or off. 0: no validation set, no ``val_*``.
        name, data_dir, train_split, test_split: the TFDS dataset and its splits (``tfds``).
        image_size: ``[height, width]`` images are resized to (``tfds``, ``image_folder``).
        path: a folder with one sub-folder of images per class (``image_folder``).
        input_shape, num_classes, num_samples, num_test_samples: the random tensors (``synthetic``).
        test_fraction: the share held out as the test set (``digits``; ``image_folder``, per class;
            ``tfds`` without ``test_split``).
    """

    source: str = "digits"
    batch_size: int = 32
    shuffle_buffer: int = 1024
    validation_split: float = 0.1
    # tfds
    name: str | None = None
    data_dir: str | None = None
    train_split: str = "train"
    test_split: str | None = None
    # tfds / image_folder
    image_size: tuple[int, ...] | None = None
    # image_folder
    path: str | None = None
    # synthetic
    input_shape: tuple[int, ...] | None = None
    num_classes: int = 10
    num_samples: int = 256
    num_test_samples: int = 64
    # digits / image_folder / tfds without test split
    test_fraction: float = 0.2


COMMON_DATA_KEYS = ("source", "batch_size", "shuffle_buffer", "validation_split")
SOURCE_KEYS = {
    "digits": ("test_fraction",),
    "tfds": ("name", "data_dir", "train_split", "test_split", "image_size", "test_fraction"),
    "image_folder": ("path", "image_size", "test_fraction"),
    "synthetic": ("input_shape", "num_classes", "num_samples", "num_test_samples"),
}


@dataclass(frozen=True)
class TrainConfig:
    """How long to train: epochs, optional steps per epoch, validation after each epoch, per-step loss log.

    ``validate``: metrics on the validation set (``data.validation_split``) after each epoch, ``val_*``;
    the test set is evaluated once, after training, either way.
    """

    epochs: int = 1
    steps_per_epoch: int | None = None
    validate: bool = True
    verbose: int = 1
    log_steps: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint policy: every N steps (and each epoch end), how many to keep, requeue on preemption."""

    enabled: bool = True
    every_steps: int = 100
    keep: int = 3
    requeue: bool = False


@dataclass(frozen=True)
class Config:
    """A whole run config (the YAML file's top level)."""

    name: str = "run"
    run_dir: str | None = None
    seed: int = 0
    deterministic: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: str = "sparse_categorical_crossentropy"
    from_logits: bool = False
    metrics: tuple[str, ...] = ("accuracy",)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able data (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


# ------------------------------------------------------------------ validation

def _choice(path: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise _fail(path, value, f"allowed: {', '.join(map(str, allowed))}")


def _positive(path: str, value: Any, minimum: int = 1) -> None:
    if value is None:
        return
    try:
        check_count(path, value, minimum)
    except SettingError as err:
        raise _rekey(err, path) from None


def _fraction(path: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise _fail(path, value, "must be a fraction strictly between 0 and 1")


def _check_model(cfg: Config) -> None:
    name = cfg.model.name
    if ":" in name:
        module, _, func = name.partition(":")
        if not re.fullmatch(r"[A-Za-z_][\w.]*", module) or not re.fullmatch(r"[A-Za-z_]\w*", func):
            raise _fail("model.name", name, "a custom model is written 'package.module:function'")
        return
    if name not in models.ZOO:
        raise _fail("model.name", name, f"allowed: {', '.join(sorted(models.ZOO))} or 'package.module:function'")
    allowed_args = models.arguments(models.ZOO[name][0])
    for key, value in cfg.model.args.items():
        if key not in allowed_args:
            raise _fail(f"model.args.{key}", value, f"not an argument of model {name!r}; it takes: "
                        f"{', '.join(allowed_args)}")
    cut_points = models.cut_points(name, **cfg.model.args)
    for i, cut in enumerate(cfg.split.cuts):
        if cut not in cut_points:
            raise _fail(f"split.cuts[{i}]", cut,
                        f"not a layer of model {name!r}; its cut points are: {', '.join(cut_points)}")
    if cfg.split.num_stages and cfg.split.num_stages > len(cut_points) + 1:
        raise _fail("split.num_stages", cfg.split.num_stages,
                    f"model {name!r} can be cut into at most {len(cut_points) + 1} stages")


def _check_split(cfg: Config) -> None:
    s = cfg.split
    if s.cuts and s.num_stages is not None:
        raise ConfigError(f"split: give either cuts ({list(s.cuts)!r}) or num_stages ({s.num_stages!r}), not both")
    _positive("split.num_stages", s.num_stages)
    _choice("split.balance", s.balance, BALANCE_MODES)
    if len(set(s.cuts)) != len(s.cuts):
        raise _fail("split.cuts", list(s.cuts), "each cut layer may appear once")
    devices = cfg.pipeline.devices
    if isinstance(devices, tuple) and len(devices) != s.stages:
        raise _fail("pipeline.devices", list(devices), f"give one device per stage ({s.stages} stages), or auto/cpu/gpu")
    if isinstance(devices, str) and devices not in ("auto", "cpu", "gpu"):
        raise _fail("pipeline.devices", devices, "allowed: auto, cpu, gpu, or a list of device names")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    _choice("data.source", d.source, SOURCES)
    _positive("data.batch_size", d.batch_size)
    _positive("data.shuffle_buffer", d.shuffle_buffer)
    defaults = DataConfig()
    allowed = set(COMMON_DATA_KEYS) | set(SOURCE_KEYS[d.source])
    for f in dataclasses.fields(DataConfig):
        if f.name not in allowed and getattr(d, f.name) != getattr(defaults, f.name):
            users = [s for s, keys in SOURCE_KEYS.items() if f.name in keys]
            raise _fail(f"data.{f.name}", getattr(d, f.name),
                        f"not used with source {d.source!r} (only with: {', '.join(users)}); "
                        f"keys for {d.source!r}: {', '.join(sorted(allowed))}")
    _fraction("data.test_fraction", d.test_fraction)
    if not 0.0 <= d.validation_split < 1.0:
        raise _fail("data.validation_split", d.validation_split,
                    "must be a fraction >= 0 and < 1 (0: no validation set)")
    if d.image_size is not None and (len(d.image_size) != 2 or min(d.image_size) < 1):
        raise _fail("data.image_size", list(d.image_size), "expected [height, width], both >= 1")
    if d.source == "tfds" and not d.name:
        raise _fail("data.name", d.name, "source tfds needs a TFDS dataset name, e.g. cats_vs_dogs")
    if d.source in ("tfds", "image_folder") and d.image_size is None:
        raise _fail("data.image_size", None, f"source {d.source} needs image_size: [height, width]")
    if d.source == "image_folder":
        if not d.path:
            raise _fail("data.path", d.path, "source image_folder needs path: a folder with one sub-folder per class")
        if not os.path.isdir(d.path):
            raise _fail("data.path", d.path, "the folder does not exist; it must hold one sub-folder per class")
        classes = [e for e in os.listdir(d.path) if os.path.isdir(os.path.join(d.path, e))]
        if len(classes) < 2:
            raise _fail("data.path", d.path, f"found {len(classes)} class sub-folder(s); need at least 2")
    if d.source == "synthetic":
        if not d.input_shape or min(d.input_shape) < 1:
            raise _fail("data.input_shape", d.input_shape, "source synthetic needs input_shape, e.g. [32, 32, 3]")
        _positive("data.num_classes", d.num_classes, 2)
        _positive("data.num_samples", d.num_samples)
        _positive("data.num_test_samples", d.num_test_samples)
        if d.num_samples < d.batch_size:
            raise _fail("data.num_samples", d.num_samples, f"must be >= data.batch_size ({d.batch_size})")


def _check_pipeline(cfg: Config) -> None:
    p = cfg.pipeline
    try:  # "auto" settings and the memory budget (pipeline.perf.autoplan)
        autoplan.check_settings("auto", p.microbatches, p.recompute, p.memory_budget)
    except SettingError as err:
        raise _rekey(err, f"pipeline.{err.setting}") from None
    _choice("pipeline.schedule", p.schedule, (*SCHEDULES, "auto"))
    _choice("pipeline.batchnorm", p.batchnorm, BATCHNORM_MODES)
    _choice("pipeline.uneven_microbatches", p.uneven_microbatches, UNEVEN_POLICIES)
    _positive("pipeline.replicas", p.replicas)
    if isinstance(p.microbatches, str):  # auto
        return
    _positive("pipeline.microbatches", p.microbatches)
    if p.microbatches > cfg.data.batch_size:
        raise _fail("pipeline.microbatches", p.microbatches,
                    f"must be <= data.batch_size ({cfg.data.batch_size})")
    if p.uneven_microbatches == "forbid" and cfg.data.batch_size % p.microbatches:
        raise _fail("data.batch_size", cfg.data.batch_size,
                    f"must be divisible by pipeline.microbatches ({p.microbatches}) because "
                    "pipeline.uneven_microbatches is 'forbid'")


def validate(cfg: Config) -> Config:
    """Checks values and their combinations; returns ``cfg`` or raises :class:`ConfigError`.

    Raises:
        ConfigError: naming the key path, the value and what is allowed.
    """
    if not re.fullmatch(r"[\w.-]+", cfg.name):
        raise _fail("name", cfg.name, "use letters, digits, '_', '-', '.' (it names the run folder)")
    _positive("seed", cfg.seed, 0)
    _check_split(cfg)
    _check_model(cfg)
    _check_data(cfg)
    _check_pipeline(cfg)
    _choice("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    if cfg.optimizer.learning_rate <= 0:
        raise _fail("optimizer.learning_rate", cfg.optimizer.learning_rate, "must be > 0")
    _choice("loss", cfg.loss, LOSSES)
    for i, metric in enumerate(cfg.metrics):
        _choice(f"metrics[{i}]", metric, METRICS)
    _positive("train.epochs", cfg.train.epochs)
    _positive("train.steps_per_epoch", cfg.train.steps_per_epoch)
    _choice("train.verbose", cfg.train.verbose, (0, 1, 2))
    _positive("checkpoint.every_steps", cfg.checkpoint.every_steps)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    return cfg


# ------------------------------------------------------------------ loading

def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``key.sub=value`` overrides (values parsed as YAML) to raw config data.

    Raises:
        ConfigError: an override without ``=`` or one that walks into a non-mapping.
    """
    raw = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.sub=value, e.g. --set train.epochs=3")
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise _fail(".".join(parts[: i + 1]), child, f"is not a mapping, cannot set {key}")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = _parse_value(text)
    return raw


def from_dict(raw: Any, overrides: Sequence[str] = ()) -> Config:
    """Builds and validates a :class:`Config` from plain data (e.g. parsed YAML).

    Raises:
        ConfigError: unknown keys, wrong types or impossible values.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _fail("<top level>", raw, f"expected a mapping with keys {_keys(Config)}")
    raw = apply_overrides(dict(raw), overrides)
    data = raw.get("data")
    if isinstance(data, Mapping) and "validation_fraction" in data:
        raise _fail("data.validation_fraction", data["validation_fraction"],
                    "renamed: the test share is data.test_fraction; data.validation_split is the share of the "
                    "training set held out for validation")
    return validate(_build(Config, raw, ""))


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML run config (``yaml.safe_load``), applies overrides and validates it.

    Args:
        path: the YAML file.
        overrides: ``key.sub=value`` strings (values parsed as YAML).

    Returns:
        The validated, frozen :class:`Config`.

    Raises:
        ConfigError: the file is missing or not YAML, or any value is not acceptable.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass a YAML file such as configs/digits_cnn.yaml")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return from_dict(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def dump(cfg: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML (what the run actually used)."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
