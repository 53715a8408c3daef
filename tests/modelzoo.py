"""Small models for the tests: a CNN, a functional model with a residual block, a two-stage MLP."""

import keras
import numpy as np

CNN_CUTS = {1: [], 2: ["flatten"], 3: ["conv_b", "flatten"], 4: ["conv_a", "conv_b", "dense_a"]}
RESIDUAL_CUTS = {1: [], 2: ["add"], 3: ["add", "d3"], 4: ["add", "d3", "d4"]}


def cnn() -> keras.Model:
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv_a"),
        keras.layers.Conv2D(6, 3, activation="tanh", name="conv_b"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(16, activation="relu", name="dense_a"),
        keras.layers.Dense(10, name="logits"),
    ], name="cnn")


def residual() -> keras.Model:
    inp = keras.Input((12,))
    h1 = keras.layers.Dense(16, activation="tanh", name="d1")(inp)
    h2 = keras.layers.Dense(16, activation="tanh", name="d2")(h1)
    res = keras.layers.Add(name="add")([h1, h2])
    h3 = keras.layers.Dense(16, activation="relu", name="d3")(res)
    h4 = keras.layers.Dense(8, activation="tanh", name="d4")(h3)
    out = keras.layers.Dense(10, name="logits")(h4)
    return keras.Model(inp, out, name="residual")


BUILDERS = {"cnn": (cnn, CNN_CUTS, (8, 8, 1)), "residual": (residual, RESIDUAL_CUTS, (12,))}


def data(kind: str, n: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = BUILDERS[kind][2]
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = rng.integers(0, 10, size=n).astype("int32")
    return x, y


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def two_stage_mlp(inputs: int, hidden: tuple[int, int], cut: int, outputs: int, seed: int = 0,
                  names: tuple[str, str] = ("a", "b")) -> list[keras.Model]:
    """Two Sequential stages: inputs -> hidden[0] (tanh) -> cut (relu) | cut -> hidden[1] (tanh) -> outputs."""
    keras.utils.set_random_seed(seed)
    first = keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(hidden[0], activation="tanh"),
                              keras.layers.Dense(cut, activation="relu")], name=names[0])
    second = keras.Sequential([keras.Input((cut,)), keras.layers.Dense(hidden[1], activation="tanh"),
                               keras.layers.Dense(outputs)], name=names[1])
    return [first, second]


def stateful_mlp(seed: int = 0) -> list[keras.Model]:
    """Two stages with BatchNorm (moving statistics) and Dropout (seed state): 12 -> 16 | 16 -> 10."""
    keras.utils.set_random_seed(seed)
    a = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                          keras.layers.Activation("relu"), keras.layers.Dropout(0.3)], name="a")
    b = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16, activation="tanh"),
                          keras.layers.Dropout(0.2), keras.layers.Dense(10)], name="b")
    return [a, b]
