"""A small model zoo for configs: named Keras models with named cut points (no TensorFlow at import)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

from pipeline.errors import invalid


def digits_cnn(input_shape: Sequence[int] = (8, 8, 1), num_classes: int = 10, filters: int = 32,
               hidden: int = 128) -> Any:
    """A small CNN for 8x8 digits: convs (``conv1``, ``conv2``, ``pool``, ``flatten``), dense head.

    Cut at ``flatten`` for two stages: convolutions, then the dense head.
    """
    import keras
    from keras import layers

    inputs = keras.Input(tuple(input_shape), name="image")
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(2 * filters, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(hidden, activation="relu", name="dense1")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def small_cnn(input_shape: Sequence[int] = (64, 64, 3), num_classes: int = 2, width: int = 32,
              blocks: int = 3) -> Any:
    """A plain CNN for pictures: ``block1..blockN`` (conv, conv, max-pool), ``pool`` (global average), head."""
    import keras
    from keras import layers

    inputs = keras.Input(tuple(input_shape), name="image")
    x = inputs
    for i in range(1, blocks + 1):
        ch = width * 2 ** (i - 1)
        x = layers.Conv2D(ch, 3, padding="same", activation="relu", name=f"block{i}_conv1")(x)
        x = layers.Conv2D(ch, 3, padding="same", activation="relu", name=f"block{i}_conv2")(x)
        x = layers.MaxPooling2D(2, name=f"block{i}")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(width * 2, activation="relu", name="dense1")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def resnet_small(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10, width: int = 16,
                 blocks: int = 3) -> Any:
    """A small residual network: ``stem``, residual ``block1..blockN`` (each halves the size), ``pool``, head.

    Every ``block{i}`` output is a single tensor, so any of them is a valid cut point.
    """
    import keras
    from keras import layers

    inputs = keras.Input(tuple(input_shape), name="image")
    x = layers.Conv2D(width, 3, padding="same", activation="relu", name="stem")(inputs)
    for i in range(1, blocks + 1):
        ch = width * 2 ** (i - 1)
        shortcut = layers.Conv2D(ch, 1, strides=2, name=f"block{i}_proj")(x)
        y = layers.Conv2D(ch, 3, strides=2, padding="same", activation="relu", name=f"block{i}_conv1")(x)
        y = layers.Conv2D(ch, 3, padding="same", name=f"block{i}_conv2")(y)
        x = layers.Add(name=f"block{i}_add")([shortcut, y])
        x = layers.Activation("relu", name=f"block{i}")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="resnet_small")


def mlp(input_shape: Sequence[int] = (64,), num_classes: int = 10, hidden: Sequence[int] = (128, 128, 128)) -> Any:
    """A multi-layer perceptron: ``flatten``, ``dense1..denseN``, ``probs``."""
    import keras
    from keras import layers

    inputs = keras.Input(tuple(input_shape), name="features")
    x = layers.Flatten(name="flatten")(inputs)
    for i, units in enumerate(hidden, start=1):
        x = layers.Dense(units, activation="relu", name=f"dense{i}")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="mlp")


def _blocks(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(1, n + 1)]


ZOO: dict[str, tuple[Callable[..., Any], Callable[..., list[str]]]] = {
    "digits_cnn": (digits_cnn, lambda **a: ["conv1", "conv2", "pool", "flatten", "dense1"]),
    "small_cnn": (small_cnn, lambda blocks=3, **a: _blocks("block", blocks) + ["pool", "dense1"]),
    "resnet_small": (resnet_small, lambda blocks=3, **a: ["stem"] + _blocks("block", blocks) + ["pool"]),
    "mlp": (mlp, lambda hidden=(128, 128, 128), **a: ["flatten"] + _blocks("dense", len(hidden))),
}
"""name -> (builder(input_shape, num_classes, **args), cut_points(**args))."""


def arguments(func: Callable[..., Any]) -> list[str]:
    """The keyword arguments a model function takes besides ``input_shape`` and ``num_classes``."""
    import inspect

    params = inspect.signature(func).parameters
    return [p for p in params if p not in ("input_shape", "num_classes")
            and params[p].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def cut_points(name: str, **args: Any) -> list[str]:
    """The layer names a zoo model may be cut after (known without building the model)."""
    return ZOO[name][1](**args)


def resolve(name: str) -> Callable[..., Any]:
    """The model function for a zoo name or ``"package.module:function"``.

    Raises:
        SettingError: (setting ``name``) the module or function cannot be found.
    """
    if name in ZOO:
        return ZOO[name][0]
    module_name, _, func_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise invalid("name", name, f"cannot import module {module_name!r} ({err})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise invalid("name", name, f"module {module_name!r} has no function {func_name!r}")
    return func


def build(name: str, input_shape: Sequence[int], num_classes: int, **args: Any) -> Any:
    """Builds a model: ``fn(input_shape=..., num_classes=..., **args)`` returning a Keras model.

    Raises:
        SettingError: (setting ``name``) unknown function, or it did not return a Keras model; (setting
            ``args``) the function does not take these arguments.
    """
    import keras

    func = resolve(name)
    try:
        model = func(input_shape=tuple(input_shape), num_classes=num_classes, **args)
    except TypeError as err:
        raise invalid("args", dict(args), f"{name!r} cannot be called with them ({err}); "
                      f"it takes input_shape, num_classes and: {', '.join(arguments(func))}") from None
    if not isinstance(model, keras.Model):
        raise invalid("name", name, f"it returned a {type(model).__name__}, not a Keras model")
    return model
