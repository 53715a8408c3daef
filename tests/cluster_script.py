"""Trainer for the cluster tests: a 2-stage pipeline with one stage on each of two worker tasks."""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline import PipelineModel
from pipeline.dist import cluster  # noqa: E402


def make_stages() -> list[keras.Model]:
    """Two small stages with fixed initial weights."""
    keras.utils.set_random_seed(5)
    first = keras.Sequential([keras.Input((6,)), keras.layers.Dense(10, activation="tanh")], name="s0")
    second = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)], name="s1")
    return [first, second]


def make_data(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Fixed inputs and integer labels."""
    rng = np.random.default_rng(3)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, size=n).astype("int32")


def build(devices) -> PipelineModel:
    """A compiled pipeline on ``devices``."""
    model = PipelineModel(make_stages(), devices=devices, microbatches=2)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def assert_equals_local_pipeline(got, what: str) -> None:
    """``got`` (the trainer's saved ``.npz``: devices + trained weights) equals the same pipeline trained locally."""
    assert {d.split("/device")[0] for d in got["devices"]} == {
        "/job:worker/replica:0/task:0", "/job:worker/replica:0/task:1"}
    local = build("cpu")
    x, y = make_data()
    local.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    for i, v in enumerate(local.trainable_variables):
        np.testing.assert_allclose(got[f"arr_{i}"], v.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{v.path}: {what} differ from the local pipeline")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--timeout", type=float, default=20)
    parser.add_argument("--forever", action="store_true", help="keep training (for the kill test)")
    args = parser.parse_args()
    start = time.monotonic()
    try:
        spec = cluster.connect(args.cluster, timeout=args.timeout)
    except cluster.ClusterError as err:
        print(f"ClusterError after {time.monotonic() - start:.1f}s: {err}", file=sys.stderr, flush=True)
        return 2
    print("connected", flush=True)
    model = build([cluster.task_device("worker", 0), cluster.task_device("worker", 1)])
    x, y = make_data()
    try:
        with cluster.guard(spec):
            model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
            if args.out:
                np.savez(args.out, *[v.numpy() for v in model.trainable_variables],
                         devices=np.array([v.value.device for v in model.trainable_variables]))
            epoch = 0
            while args.forever:
                model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
                epoch += 1
                print(f"epoch {epoch}", flush=True)
    except cluster.ClusterError as err:
        print(f"ClusterError: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
