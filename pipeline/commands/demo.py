"""``pipeline demo``: a CNN split in two (convolutions | head) trained on the embedded digits."""

from __future__ import annotations

import argparse
import time
from typing import Any


def digits_split(seed: int = 0) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """The handwritten digits scikit-learn ships (8x8, 10 classes), scaled to [0, 1], 80/20 split."""
    import numpy as np
    from sklearn.datasets import load_digits  # noqa: PLC0415 - only the demo needs scikit-learn

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def two_part_cnn() -> tuple[Any, Any]:
    """``model_0`` (convolutions) and ``model_1`` (dense head) for 8x8x1 digits."""
    import keras

    model_0 = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
    ], name="model_0")
    model_1 = keras.Sequential([
        keras.Input((4, 4, 32)),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ], name="model_1")
    return model_0, model_1


def run(args: argparse.Namespace) -> int:
    """Trains the two-part CNN pipelined, prints accuracy and the verify report."""
    import keras

    import pipeline
    from pipeline.core import devices

    devices.resolve(2, args.devices)  # the CPU fallback must come before any TF op
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = digits_split(args.seed)
    model_0, model_1 = two_part_cnn()
    model = pipeline.PipelineModel([model_0, model_1], devices=args.devices,
                                   microbatches=args.microbatches, schedule=args.schedule)
    print(f"stages: {', '.join(f'{s.layer.name} on {s.device}' for s in model.stages)}; "
          f"{args.microbatches} micro-batches, schedule {args.schedule}")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(args.learning_rate), loss, metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=1)
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    print(f"test accuracy: {accuracy:.4f} after {args.epochs} epochs "
          f"({time.perf_counter() - start:.1f} s)")
    report = pipeline.verify(model, x_test[:64], y_test[:64], loss)
    print(report)
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    """Adds ``pipeline demo``."""
    parser = subparsers.add_parser("demo", help="train a two-part CNN on the embedded digits (CPU is fine)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--devices", default="auto", help="auto, cpu, gpu (default: auto)")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)
