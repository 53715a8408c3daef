"""Data sources (digits, synthetic, image folder, TFDS mock) and the epoch-exact, resumable batch stream."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from pipeline.errors import SettingError
from pipeline.train import data
from pipeline.train.config import DataConfig


def labels(ds):
    return [y.numpy().tolist() for _, y in ds]


def test_digits_split_is_fixed_and_stratified():
    a, b = data.load_digits(), data.load_digits()
    assert (a.num_train, a.num_test, a.input_shape, a.num_classes) == (1437, 360, (8, 8, 1), 10)
    ya = np.array([y for _, y in a.test.as_numpy_iterator()])
    yb = np.array([y for _, y in b.test.as_numpy_iterator()])
    np.testing.assert_array_equal(ya, yb)
    assert np.bincount(ya).min() >= 35  # every class is in the test set
    x, _ = next(iter(a.train))
    assert x.dtype == tf.float32 and 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0


def test_synthetic_shapes_and_learnable_labels():
    d = data.load_synthetic((4, 4, 2), 3, 40, 10, seed=5)
    assert (d.num_train, d.num_test, d.input_shape, d.num_classes) == (40, 10, (4, 4, 2), 3)
    x, y = next(iter(d.train.batch(40)))
    assert x.shape == (40, 4, 4, 2) and set(y.numpy().tolist()) <= {0, 1, 2}
    again = data.load_synthetic((4, 4, 2), 3, 40, 10, seed=5)
    np.testing.assert_array_equal(next(iter(again.train.batch(40)))[0].numpy(), x.numpy())


def write_pictures(root, classes=("cat", "dog"), per_class=5, size=(12, 10)):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir()
        for i in range(per_class):
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            pixels[..., c] = 255  # class-coloured
            ext = "png" if i % 2 else "jpg"
            encoded = tf.io.encode_png(pixels) if ext == "png" else tf.io.encode_jpeg(pixels)
            tf.io.write_file(str(folder / f"img{i}.{ext}"), encoded)
        (folder / "notes.txt").write_text("not an image")
    return root


def test_image_folder(tmp_path):
    root = write_pictures(tmp_path)
    d = data.load_image_folder(str(root), (6, 7), test_fraction=0.2)
    assert d.class_names == ["cat", "dog"] and d.num_classes == 2
    assert (d.num_train, d.num_test) == (8, 2)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in d.train])
    assert all(x.shape == (6, 7, 3) and x.dtype == np.float32 and x.max() <= 1.0 for x in xs)
    assert sorted(ys) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sorted(labels(d.test)) == [0, 1]
    assert labels(data.load_image_folder(str(root), (6, 7)).train) == list(ys)  # same split every time


def test_image_folder_empty_class(tmp_path):
    write_pictures(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"class folder .*empty' holds no images \(\.png"):
        data.load_image_folder(str(tmp_path), (6, 6))


def test_tfds_by_name_with_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        d = data.load(DataConfig(source="tfds", name="cats_vs_dogs", image_size=(16, 16), data_dir=str(tmp_path)))
        assert d.num_classes == 2 and d.class_names == ["cat", "dog"] and d.input_shape == (16, 16, 3)
        assert (d.num_train, d.num_validation) == (11, 1)  # data.validation_split 0.1 of the 12
        x, y = next(iter(data.train_stream(d.train, 4, 2, seed=0)))
        assert x.shape == (4, 16, 16, 3) and y.dtype == tf.int32


def test_tfds_unknown_name(tmp_path):
    with pytest.raises(data.DataError, match=r"name: got 'no_such_set_xyz'; the TFDS dataset .* could not be loaded"):
        data.load_tfds("no_such_set_xyz", (8, 8), data_dir=str(tmp_path))


def test_stream_epochs_are_reshuffled_and_fixed():
    d = data.load_synthetic((2,), 2, 64, 8, seed=1)
    a = labels(data.train_stream(d.train, 8, 4, seed=3, end_epoch=2))
    b = labels(data.train_stream(d.train, 8, 4, seed=3, end_epoch=2))
    assert len(a) == 8 and a == b
    assert a[:4] != a[4:]  # a different order each epoch


@pytest.mark.parametrize("start", [1, 3, 4, 6])
def test_stream_resume_skips_exactly(start):
    d = data.load_synthetic((2,), 2, 64, 8, seed=1)
    full = [x.numpy().tolist() for x, _ in data.train_stream(d.train, 8, 4, seed=3, end_epoch=3)]
    resumed = [x.numpy().tolist() for x, _ in data.train_stream(d.train, 8, 4, seed=3, start_step=start,
                                                                 end_epoch=3)]
    assert resumed == full[start:]


def test_stream_drops_partial_batches():
    d = data.load_synthetic((2,), 2, 30, 8)
    assert [len(y) for y in labels(data.train_stream(d.train, 8, 3, seed=0))] == [8, 8, 8]


def test_steps_per_epoch():
    assert data.steps_per_epoch(100, 32) == 3
    assert data.steps_per_epoch(100, 32, 2) == 2
    with pytest.raises(data.DataError, match=r"requested: got 5; the data has only 3 full batches") as err:
        data.steps_per_epoch(100, 32, 5)
    assert (err.value.setting, err.value.value) == ("requested", 5)  # the runner re-raises it as train.steps_per_epoch
    with pytest.raises(data.DataError, match=r"batch_size: got 64; larger than the 10 training examples"):
        data.steps_per_epoch(10, 64)


def test_shards_partition_the_training_set():
    d = data.load_synthetic((1,), 2, 10, 4)
    parts = [d.shard(3, i) for i in range(3)]
    assert [p.num_train for p in parts] == [4, 3, 3]
    seen = sorted(float(x[0]) for p in parts for x, _ in p.train)
    assert seen == sorted(float(x[0]) for x, _ in d.train)
    with pytest.raises(SettingError, match=r"shard index 3 must be in \[0, 3\)"):
        d.shard(3, 3)


def test_eval_dataset_keeps_every_example():
    d = data.load_synthetic((1,), 2, 10, 7)
    assert [len(y) for y in labels(data.eval_dataset(d.test, 4))] == [4, 3]


def xs(ds):
    """The examples' inputs as sorted bytes (a multiset to compare sets of examples)."""
    return sorted(x.numpy().tobytes() for x, _ in ds)


def test_hold_out_is_a_seeded_disjoint_split_in_order():
    ds = tf.data.Dataset.from_tensor_slices((np.arange(20, dtype=np.float32), np.zeros(20, np.int32)))
    train, val, n_train, n_val = data.hold_out(ds, 20, 0.25, seed=3)
    assert (n_train, n_val) == (15, 5)
    t, v = [float(x) for x, _ in train], [float(x) for x, _ in val]
    assert len(t) == 15 and len(v) == 5 and t == sorted(t) and v == sorted(v)  # each keeps the order
    assert sorted(t + v) == list(range(20))
    again = data.hold_out(ds, 20, 0.25, seed=3)[1]
    assert [float(x) for x, _ in again] == v  # the same examples on every run with this seed
    assert [float(x) for x, _ in data.hold_out(ds, 20, 0.25, seed=4)[1]] != v
    same, none, n, zero = data.hold_out(ds, 20, 0.0)
    assert same is ds and none is None and (n, zero) == (20, 0)


def test_validation_comes_from_train_and_the_test_set_stays_fixed():
    plain = data.load_digits()
    d = data.load(DataConfig(source="digits", validation_split=0.1), seed=0)
    assert (d.num_train, d.num_validation, d.num_test) == (1293, 144, 360)
    assert len(list(d.train)) == 1293 and len(list(d.validation)) == 144
    np.testing.assert_array_equal(xs(d.test), xs(plain.test))  # the test set does not depend on the validation split
    assert sorted(xs(d.train) + xs(d.validation)) == xs(plain.train)  # train and validation split the training set
    other_seed = data.load(DataConfig(source="digits", validation_split=0.1), seed=1)
    assert xs(other_seed.validation) != xs(d.validation)
    assert xs(other_seed.test) == xs(d.test)


def test_image_folder_validation_split(tmp_path):
    root = write_pictures(tmp_path, per_class=10)
    d = data.load_image_folder(str(root), (6, 7), test_fraction=0.2, validation_split=0.25, seed=0)
    assert (d.num_train, d.num_validation, d.num_test) == (12, 4, 4)
    assert len(labels(d.train)) == 12 and len(labels(d.validation)) == 4
    x, _ = next(iter(d.validation))
    assert x.shape == (6, 7, 3)  # decoded after the split


def test_synthetic_validation_split():
    d = data.load_synthetic((2,), 2, 40, 10, seed=5, validation_split=0.1)
    assert (d.num_train, d.num_validation, d.num_test) == (36, 4, 10)
    assert d.shard(2, 1).num_validation == 4 and d.shard(2, 1).num_train == 18  # validation stays whole
