"""``tf.data`` input: TFDS datasets, image folders, the embedded digits set, synthetic tensors; epoch-exact streams."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from pipeline.train.config import DataConfig
from pipeline.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class Data:
    """A labelled train/test pair of unbatched, unshuffled ``(x, y)`` datasets and what they hold.

    Attributes:
        train: training examples in a fixed order.
        test: held-out examples in a fixed order.
        num_train: number of training examples (after sharding).
        num_test: number of test examples.
        input_shape: shape of one input ``x``.
        num_classes: number of labels.
        class_names: label names, index = label.
    """

    train: tf.data.Dataset
    test: tf.data.Dataset
    num_train: int
    num_test: int
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str] = field(default_factory=list)

    def shard(self, num_shards: int, index: int) -> "Data":
        """This replica's part of the training set (every ``num_shards``-th example from ``index``).

        Args:
            num_shards: number of data-parallel replicas.
            index: this replica's rank, ``0 <= index < num_shards``.
        """
        if not 0 <= index < num_shards:
            raise DataError(f"shard index {index} must be in [0, {num_shards})")
        if num_shards == 1:
            return self
        count = len(range(index, self.num_train, num_shards))
        return Data(self.train.shard(num_shards, index), self.test, count, self.num_test,
                    self.input_shape, self.num_classes, self.class_names)


def _from_arrays(x_train, y_train, x_test, y_test, num_classes: int, names: list[str]) -> Data:
    return Data(
        tf.data.Dataset.from_tensor_slices((x_train, y_train)),
        tf.data.Dataset.from_tensor_slices((x_test, y_test)),
        len(x_train), len(x_test), tuple(x_train.shape[1:]), num_classes, names,
    )


def load_digits(test_fraction: float = 0.2) -> Data:
    """The embedded digits set (scikit-learn, 1797 images of 8x8), scaled to [0, 1], split deterministically."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=0, stratify=y)
    return _from_arrays(x_tr, y_tr, x_te, y_te, 10, [str(i) for i in range(10)])


def load_synthetic(input_shape: tuple[int, ...], num_classes: int, num_samples: int, num_test_samples: int,
                   seed: int = 0) -> Data:
    """Random normal inputs whose labels are a fixed random linear function of them (so it is learnable)."""
    rng = np.random.default_rng(seed)
    n = num_samples + num_test_samples
    x = rng.standard_normal((n, *input_shape), dtype=np.float32)
    w = rng.standard_normal((int(np.prod(input_shape)), num_classes)).astype(np.float32)
    y = np.argmax(x.reshape(n, -1) @ w, axis=1).astype("int32")
    return _from_arrays(x[:num_samples], y[:num_samples], x[num_samples:], y[num_samples:], num_classes,
                        [str(i) for i in range(num_classes)])


def _decode(path: tf.Tensor, label: tf.Tensor, image_size: tuple[int, int]):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, image_size)
    return image, label


def load_image_folder(path: str, image_size: tuple[int, int], validation_fraction: float = 0.2,
                      seed: int = 0) -> Data:
    """Images in ``path/<class name>/*.png|jpg|...``; labels are the sorted sub-folder names.

    Each class is split into train and test with a seeded permutation, so the split is
    stratified and the same on every run.
    """
    if not os.path.isdir(path):
        raise DataError(f"data.path: {path!r} is not a folder; it must hold one sub-folder per class")
    classes = sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)))
    rng = np.random.default_rng(seed)
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(path, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"data.path: class folder {os.path.join(path, name)!r} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        files = [os.path.join(path, name, files[i]) for i in rng.permutation(len(files))]
        n_test = int(round(len(files) * validation_fraction)) if len(files) > 1 else 0
        for part, chunk in (("test", files[:n_test]), ("train", files[n_test:])):
            splits[part][0].extend(chunk)
            splits[part][1].extend([label] * len(chunk))

    def make(part: str) -> tf.data.Dataset:
        files, labels = splits[part]
        ds = tf.data.Dataset.from_tensor_slices((tf.constant(files, tf.string), tf.constant(labels, tf.int32)))
        return ds.map(lambda p, y: _decode(p, y, tuple(image_size)), num_parallel_calls=AUTOTUNE)

    return Data(make("train"), make("test"), len(splits["train"][0]), len(splits["test"][0]),
                (*image_size, 3), len(classes), classes)


def load_tfds(name: str, image_size: tuple[int, int], data_dir: str | None = None, train_split: str = "train",
              test_split: str | None = None, test_fraction: float = 0.2) -> Data:
    """Any TFDS image classification dataset (``as_supervised``), resized and scaled to [0, 1].

    Without ``test_split`` the last ``test_fraction`` of ``train_split`` is held out.
    """
    import tensorflow_datasets as tfds

    if test_split is None:
        cut = int(round(100 * (1 - test_fraction)))
        train_split, test_split = f"{train_split}[:{cut}%]", f"{train_split}[{cut}%:]"
    try:
        (train, test), info = tfds.load(name, split=[train_split, test_split], data_dir=data_dir,
                                        as_supervised=True, with_info=True, shuffle_files=False)
    except Exception as err:  # noqa: BLE001 - TFDS raises many kinds; re-raised explained
        raise DataError(f"data.name: TFDS dataset {name!r} (data_dir={data_dir!r}) could not be loaded: {err}. "
                        "Check the name (tfds.list_builders()) and that it is downloaded or downloadable.") from None
    label = info.features["label"] if "label" in info.features else None
    num_classes = getattr(label, "num_classes", None)
    if not num_classes:
        raise DataError(f"data.name: TFDS dataset {name!r} has no class label feature 'label'")

    def prep(image, y):
        image = tf.cast(image, tf.float32) / 255.0
        if image.shape.rank == 2:
            image = image[..., None]
        image = tf.image.resize(image, tuple(image_size))
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return image, tf.cast(y, tf.int32)

    return Data(train.map(prep, num_parallel_calls=AUTOTUNE), test.map(prep, num_parallel_calls=AUTOTUNE),
                _count(info, train_split, train), _count(info, test_split, test),
                (*image_size, 3), int(num_classes), list(getattr(label, "names", [])))


def _count(info, split: str, ds: tf.data.Dataset) -> int:
    """Examples in a TFDS split: from its metadata, else the dataset's cardinality, else by counting."""
    try:
        return int(info.splits[split].num_examples)
    except (KeyError, ValueError):
        pass
    card = int(ds.cardinality())
    if card >= 0:
        return card
    return int(ds.reduce(0, lambda n, _: n + 1))


def load(cfg: DataConfig, seed: int = 0) -> Data:
    """Loads the data a config describes (see :class:`pipeline.config.DataConfig`)."""
    if cfg.source == "digits":
        return load_digits(cfg.test_fraction)
    if cfg.source == "synthetic":
        return load_synthetic(tuple(cfg.input_shape), cfg.num_classes, cfg.num_samples, cfg.num_test_samples, seed)
    if cfg.source == "image_folder":
        return load_image_folder(cfg.path, tuple(cfg.image_size), cfg.validation_fraction, seed)
    if cfg.source == "tfds":
        return load_tfds(cfg.name, tuple(cfg.image_size), cfg.data_dir, cfg.train_split, cfg.test_split,
                         cfg.test_fraction)
    raise DataError(f"data.source: {cfg.source!r} is not a known source")


def steps_per_epoch(num_examples: int, batch_size: int, requested: int | None = None) -> int:
    """Full batches per epoch: all of them, or ``requested`` if there are that many.

    Raises:
        DataError: fewer examples than one batch, or fewer batches than requested.
    """
    available = num_examples // batch_size
    if available < 1:
        raise DataError(f"data.batch_size: {batch_size} is larger than the {num_examples} training examples")
    if requested is None:
        return available
    if requested > available:
        raise DataError(f"train.steps_per_epoch: got {requested}; the data has only {available} full batches "
                        f"of {batch_size} ({num_examples} examples). Use at most {available}.")
    return requested


def train_stream(train: tf.data.Dataset, batch_size: int, steps: int, seed: int, start_step: int = 0,
                 end_epoch: int = 1, shuffle_buffer: int = 1024) -> tf.data.Dataset:
    """The batches from global step ``start_step`` up to the end of epoch ``end_epoch - 1``.

    Epoch ``e`` is ``train`` shuffled with seed ``seed + e`` and cut into ``steps`` full batches,
    so the stream is the same on every run and resuming at a step only skips batches.

    Args:
        train: unbatched training examples in a fixed order.
        batch_size: examples per batch (the remainder of an epoch is dropped).
        steps: batches per epoch.
        seed: base shuffle seed.
        start_step: batches already consumed (the data position of a checkpoint).
        end_epoch: the stream stops at the end of this (exclusive) epoch.
        shuffle_buffer: shuffle buffer size.
    """
    first_epoch, offset = divmod(start_step, steps)

    def epoch(e: int) -> tf.data.Dataset:
        shuffled = train.shuffle(shuffle_buffer, seed=seed + e, reshuffle_each_iteration=False)
        return shuffled.batch(batch_size, drop_remainder=True).take(steps)

    stream = None
    for e in range(first_epoch, max(end_epoch, first_epoch + 1)):
        stream = epoch(e) if stream is None else stream.concatenate(epoch(e))
    return stream.skip(offset).prefetch(AUTOTUNE)


def eval_dataset(test: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Test examples in order, batched (the last batch may be smaller), prefetched."""
    return test.batch(batch_size).prefetch(AUTOTUNE)
