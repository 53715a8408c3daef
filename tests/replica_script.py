"""Run under ``horovodrun``: each rank trains a 2-stage pipeline replica; rank 0 saves the weights."""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PIPELINE_CPU_DEVICES", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from modelzoo import two_stage_mlp  # noqa: E402
from pipeline import PipelineModel
from pipeline.dist import replicas  # noqa: E402


def make_stages(seed: int) -> list[keras.Model]:
    """Two small stages; the seed decides the initial weights."""
    return two_stage_mlp(6, (12, 8), 8, 3, seed, names=("stage0", "stage1"))


def make_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The global dataset, the same on every rank."""
    rng = np.random.default_rng(7)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, size=n).astype("int32")


def build(seed: int, reducer=None, microbatches: int = 2) -> PipelineModel:
    """A compiled 2-stage pipeline on the first two logical CPU devices."""
    model = PipelineModel(make_stages(seed), devices="cpu", microbatches=microbatches,
                          gradient_reducer=reducer)
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.build((None, 6))
    return model


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="per-replica batch size")
    parser.add_argument("--stop", default=None, metavar="RANK:STEP",
                        help="rank RANK alone asks to stop after STEP steps (agreement test)")
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()
    if replicas.init("horovod") != "horovod":
        print("replica_script: Horovod backend not active", file=sys.stderr)
        return 3
    r, n = replicas.rank(), replicas.size()
    # Every rank starts from different weights: the broadcast must make them equal rank 0's.
    model = build(seed=100 + r, reducer=replicas.reducer())
    x, y = make_data(args.steps * args.batch * n)
    ds = replicas.shard(tf.data.Dataset.from_tensor_slices((x, y))).batch(args.batch)
    steps = {"done": 0}
    stop_rank, stop_step = (int(v) for v in args.stop.split(":")) if args.stop else (-1, -1)

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps["done"] += 1

    def should_stop() -> bool:
        return r == stop_rank and steps["done"] >= stop_step

    history = model.fit(ds, epochs=1, verbose=0, shuffle=False,
                        callbacks=[Count(), *replicas.callbacks(should_stop)])
    print(f"rank {r} steps {steps['done']}", flush=True)
    if replicas.is_chief():
        np.savez(args.out, *[v.numpy() for v in model.trainable_variables],
                 loss=np.array(history.history["loss"]))
    print(f"rank {r}/{n} done, weights sum {sum(float(np.sum(v.numpy())) for v in model.trainable_variables):.6f}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
