"""``tf.data`` input: TFDS datasets, image folders, the embedded digits set, synthetic tensors; epoch-exact streams.

Every source gives three disjoint sets: train, validation (a seeded share of the training examples,
:func:`hold_out`) and test (held out by the source). Errors name the loaders' arguments; the runner
re-raises them under the config's key paths.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from pipeline.errors import DataError, invalid
from pipeline.train.config import SOURCES, DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class Data:
    """Labelled train, validation and test sets of unbatched, unshuffled ``(x, y)`` examples, and what they hold.

    Attributes:
        train: training examples in a fixed order.
        test: held-out test examples in a fixed order (evaluated once, after training).
        num_train: number of training examples (after sharding).
        num_test: number of test examples.
        input_shape: shape of one input ``x``.
        num_classes: number of labels.
        class_names: label names, index = label.
        validation: validation examples in a fixed order (carved out of the training set), or ``None``.
        num_validation: number of validation examples (0 without a validation set).
    """

    train: tf.data.Dataset
    test: tf.data.Dataset
    num_train: int
    num_test: int
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    validation: tf.data.Dataset | None = None
    num_validation: int = 0

    def shard(self, num_shards: int, index: int) -> "Data":
        """This replica's part of the training set (:func:`pipeline.dist.replicas.shard`).

        The validation and test sets stay whole on every replica.

        Args:
            num_shards: number of data-parallel replicas.
            index: this replica's rank, ``0 <= index < num_shards``.
        """
        from pipeline.dist import replicas

        train = replicas.shard(self.train, index, num_shards)
        if train is self.train:
            return self
        return dataclasses.replace(self, train=train, num_train=replicas.shard_size(self.num_train, index, num_shards))


def hold_out(examples: tf.data.Dataset, count: int, fraction: float, seed: int = 0
             ) -> tuple[tf.data.Dataset, tf.data.Dataset | None, int, int]:
    """Splits ``count`` examples into a training and a validation set.

    The validation set is ``round(count * fraction)`` examples chosen by a permutation seeded with
    ``seed`` (the same on every run); both sets keep the examples' order. Call it before an expensive
    ``map`` (decoding images): each set then decodes only its own examples.

    Returns:
        ``(train, validation, num_train, num_validation)``; ``validation`` is ``None`` when it is empty.
    """
    n_val = int(round(count * fraction))
    if n_val == 0:
        return examples, None, count, 0
    chosen = np.zeros(count, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(count)[:n_val]] = True
    chosen = tf.constant(chosen)

    def in_validation(i: tf.Tensor, example: Any) -> tf.Tensor:
        return tf.gather(chosen, i)

    def in_train(i: tf.Tensor, example: Any) -> tf.Tensor:
        return tf.logical_not(tf.gather(chosen, i))

    def drop_index(i: tf.Tensor, example: Any) -> Any:
        return example

    indexed = examples.enumerate()
    # A filter hides the count from tf.data; it is known (Keras then sees where an epoch of evaluation ends).
    validation = indexed.filter(in_validation).map(drop_index).apply(tf.data.experimental.assert_cardinality(n_val))
    train = indexed.filter(in_train).map(drop_index).apply(tf.data.experimental.assert_cardinality(count - n_val))
    return train, validation, count - n_val, n_val


def _assemble(train: tf.data.Dataset, num_train: int, test: tf.data.Dataset, num_test: int,
              input_shape: tuple[int, ...], num_classes: int, class_names: list[str], validation_split: float,
              seed: int, prepare: Callable[[Any, Any], Any] | None = None) -> Data:
    """:class:`Data` from raw train and test examples: the validation set held out, then ``prepare`` mapped."""
    train, validation, num_train, num_val = hold_out(train, num_train, validation_split, seed)

    def ready(ds: tf.data.Dataset | None) -> tf.data.Dataset | None:
        return ds if ds is None or prepare is None else ds.map(prepare, num_parallel_calls=AUTOTUNE)

    return Data(ready(train), ready(test), num_train, num_test, tuple(input_shape), num_classes, class_names,
                ready(validation), num_val)


def _from_arrays(x_train, y_train, x_test, y_test, num_classes: int, names: list[str], validation_split: float,
                 seed: int) -> Data:
    return _assemble(tf.data.Dataset.from_tensor_slices((x_train, y_train)), len(x_train),
                     tf.data.Dataset.from_tensor_slices((x_test, y_test)), len(x_test), tuple(x_train.shape[1:]),
                     num_classes, names, validation_split, seed)


def load_digits(test_fraction: float = 0.2, validation_split: float = 0.0, seed: int = 0) -> Data:
    """The embedded digits set (scikit-learn, 1797 images of 8x8), scaled to [0, 1].

    The test set is a fixed stratified ``test_fraction`` (the same for every seed); the validation set
    is ``validation_split`` of the rest, chosen with ``seed``.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=0, stratify=y)
    return _from_arrays(x_tr, y_tr, x_te, y_te, 10, [str(i) for i in range(10)], validation_split, seed)


def load_synthetic(input_shape: tuple[int, ...], num_classes: int, num_samples: int, num_test_samples: int,
                   seed: int = 0, validation_split: float = 0.0) -> Data:
    """Random normal inputs whose labels are a fixed random linear function of them (so it is learnable).

    ``num_samples`` training examples (``validation_split`` of them held out for validation) and
    ``num_test_samples`` test examples.
    """
    rng = np.random.default_rng(seed)
    n = num_samples + num_test_samples
    x = rng.standard_normal((n, *input_shape), dtype=np.float32)
    w = rng.standard_normal((int(np.prod(input_shape)), num_classes)).astype(np.float32)
    y = np.argmax(x.reshape(n, -1) @ w, axis=1).astype("int32")
    return _from_arrays(x[:num_samples], y[:num_samples], x[num_samples:], y[num_samples:], num_classes,
                        [str(i) for i in range(num_classes)], validation_split, seed)


def _decode(path: tf.Tensor, label: tf.Tensor, image_size: tuple[int, int]):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, image_size)
    return image, label


def load_image_folder(path: str, image_size: tuple[int, int], test_fraction: float = 0.2,
                      seed: int = 0, validation_split: float = 0.0) -> Data:
    """Images in ``path/<class name>/*.png|jpg|...``; labels are the sorted sub-folder names.

    Each class is split into train and test (``test_fraction``) with a seeded permutation, so the split
    is stratified and the same on every run; ``validation_split`` of the training images are held out
    for validation.
    """
    if not os.path.isdir(path):
        raise invalid("path", path, "not a folder; it must hold one sub-folder per class", DataError)
    classes = sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)))
    rng = np.random.default_rng(seed)
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(path, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise invalid("path", path, f"class folder {os.path.join(path, name)!r} holds no images "
                          f"({', '.join(IMAGE_EXTENSIONS)})", DataError)
        files = [os.path.join(path, name, files[i]) for i in rng.permutation(len(files))]
        n_test = int(round(len(files) * test_fraction)) if len(files) > 1 else 0
        for part, chunk in (("test", files[:n_test]), ("train", files[n_test:])):
            splits[part][0].extend(chunk)
            splits[part][1].extend([label] * len(chunk))

    def paths(part: str) -> tf.data.Dataset:
        files, labels = splits[part]
        return tf.data.Dataset.from_tensor_slices((tf.constant(files, tf.string), tf.constant(labels, tf.int32)))

    return _assemble(paths("train"), len(splits["train"][0]), paths("test"), len(splits["test"][0]),
                     (*image_size, 3), len(classes), classes, validation_split, seed,
                     prepare=lambda p, y: _decode(p, y, tuple(image_size)))


def load_tfds(name: str, image_size: tuple[int, int], data_dir: str | None = None, train_split: str = "train",
              test_split: str | None = None, test_fraction: float = 0.2, validation_split: float = 0.0,
              seed: int = 0) -> Data:
    """Any TFDS image classification dataset (``as_supervised``), resized and scaled to [0, 1].

    Without ``test_split`` the last ``test_fraction`` of ``train_split`` is held out as the test set;
    ``validation_split`` of the training examples are held out for validation (chosen with ``seed``).
    """
    import tensorflow_datasets as tfds

    if test_split is None:
        cut = int(round(100 * (1 - test_fraction)))
        train_split, test_split = f"{train_split}[:{cut}%]", f"{train_split}[{cut}%:]"
    try:
        (train, test), info = tfds.load(name, split=[train_split, test_split], data_dir=data_dir,
                                        as_supervised=True, with_info=True, shuffle_files=False)
    except Exception as err:  # noqa: BLE001 - TFDS raises many kinds; re-raised explained
        raise invalid("name", name, f"the TFDS dataset (data_dir={data_dir!r}) could not be loaded: {err}. "
                      "Check the name (tfds.list_builders()) and that it is downloaded or downloadable.",
                      DataError) from None
    label = info.features["label"] if "label" in info.features else None
    num_classes = getattr(label, "num_classes", None)
    if not num_classes:
        raise invalid("name", name, "the TFDS dataset has no class label feature 'label'", DataError)

    def prep(image, y):
        image = tf.cast(image, tf.float32) / 255.0
        if image.shape.rank == 2:
            image = image[..., None]
        image = tf.image.resize(image, tuple(image_size))
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return image, tf.cast(y, tf.int32)

    return _assemble(train, _count(info, train_split, train), test, _count(info, test_split, test),
                     (*image_size, 3), int(num_classes), list(getattr(label, "names", [])), validation_split, seed,
                     prepare=prep)


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
    """Loads the data a config describes (see :class:`pipeline.train.config.DataConfig`).

    Raises:
        DataError: naming the loader's argument, which is the ``DataConfig`` field of the same name.
    """
    if cfg.source == "digits":
        return load_digits(cfg.test_fraction, cfg.validation_split, seed)
    if cfg.source == "synthetic":
        return load_synthetic(tuple(cfg.input_shape), cfg.num_classes, cfg.num_samples, cfg.num_test_samples, seed,
                              cfg.validation_split)
    if cfg.source == "image_folder":
        return load_image_folder(cfg.path, tuple(cfg.image_size), cfg.test_fraction, seed, cfg.validation_split)
    if cfg.source == "tfds":
        return load_tfds(cfg.name, tuple(cfg.image_size), cfg.data_dir, cfg.train_split, cfg.test_split,
                         cfg.test_fraction, cfg.validation_split, seed)
    raise invalid("source", cfg.source, f"allowed: {', '.join(SOURCES)}", DataError)


def steps_per_epoch(num_examples: int, batch_size: int, requested: int | None = None) -> int:
    """Full batches per epoch: all of them, or ``requested`` if there are that many.

    Raises:
        DataError: (setting ``batch_size``) fewer examples than one batch, or (setting ``requested``)
            fewer batches than requested.
    """
    available = num_examples // batch_size
    if available < 1:
        raise invalid("batch_size", batch_size, f"larger than the {num_examples} training examples", DataError)
    if requested is None:
        return available
    if requested > available:
        raise invalid("requested", requested, f"the data has only {available} full batches of {batch_size} "
                      f"({num_examples} examples). Use at most {available}.", DataError)
    return requested


def train_stream(train: tf.data.Dataset, batch_size: int, steps: int, seed: int, start_step: int = 0,
                 end_epoch: int = 1, shuffle_buffer: int = 1024, shard: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
    """The batches from global step ``start_step`` up to the end of epoch ``end_epoch - 1``.

    Epoch ``e`` is ``train`` shuffled with seed ``seed + e`` and cut into ``steps`` full batches,
    so the stream is the same on every run and resuming at a step only skips batches. With
    ``shard = (R, r)`` replica ``r`` takes the elements ``i = r mod R`` of the *shuffled* epoch, so
    step ``s`` of the R replicas covers the same samples as step ``s`` of one process at batch
    ``R * batch_size`` (a checkpoint resumes exactly with another R at the same global batch).

    Args:
        train: unbatched training examples in a fixed order.
        batch_size: examples per batch (the remainder of an epoch is dropped).
        steps: batches per epoch.
        seed: base shuffle seed.
        start_step: batches already consumed (the data position of a checkpoint).
        end_epoch: the stream stops at the end of this (exclusive) epoch.
        shuffle_buffer: shuffle buffer size.
        shard: ``(number of replicas, this replica's rank)``; ``batch_size`` is per replica.
    """
    from pipeline.dist import replicas

    first_epoch, offset = divmod(start_step, steps)

    def epoch(e: int) -> tf.data.Dataset:
        shuffled = train.shuffle(shuffle_buffer, seed=seed + e, reshuffle_each_iteration=False)
        shuffled = replicas.shard(shuffled, shard[1], shard[0])  # after the shuffle: independent of R
        return shuffled.batch(batch_size, drop_remainder=True).take(steps)

    stream = None
    for e in range(first_epoch, max(end_epoch, first_epoch + 1)):
        stream = epoch(e) if stream is None else stream.concatenate(epoch(e))
    return stream.skip(offset).prefetch(AUTOTUNE)


def eval_dataset(examples: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Validation or test examples in order, batched (the last batch may be smaller), prefetched."""
    return examples.batch(batch_size).prefetch(AUTOTUNE)
