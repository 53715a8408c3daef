"""Balancing: exact min-max contiguous partition (against brute force) and per-layer costs."""

import itertools
import random
import warnings

import keras
import numpy as np
import pytest

from pipeline.core import balance


def _brute_force(costs, k):
    n = len(costs)
    best = None
    for points in itertools.combinations(range(1, n), k - 1):
        value = max(balance.stage_sums(costs, points))
        if best is None or value < best:
            best = value
    return best


@pytest.mark.parametrize("seed", range(30))
def test_partition_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    k = rng.randint(1, n)
    costs = [rng.choice([0, 1, 2, 3, 10, 0.5]) * rng.random() for _ in range(n)]
    points = balance.partition_points(costs, k)
    assert len(points) == k - 1
    assert points == sorted(set(points)) and all(1 <= p <= n - 1 for p in points)
    assert max(balance.stage_sums(costs, points)) == pytest.approx(_brute_force(costs, k))


def test_literal_partitions():
    assert balance.partition_points([8, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [1]
    assert balance.partition_points([1, 1, 1, 1], 4) == [1, 2, 3]
    assert balance.partition_points([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == [5, 7]
    assert balance.partition_points([5], 1) == []
    assert balance.equal_count_points(9, 2) == [5]
    assert balance.equal_count_points(10, 3) == [4, 7]


def test_too_many_stages():
    with pytest.raises(ValueError, match=r"cannot cut 2 item\(s\) into 3 non-empty stages"):
        balance.partition_points([1, 2], 3)


def test_bad_stage_count():
    with pytest.raises(ValueError, match="num_stages must be an integer >= 1"):
        balance.partition_points([1, 2], 0)


def test_negative_cost():
    with pytest.raises(ValueError, match="costs must be >= 0"):
        balance.partition_points([1, -2], 1)


def _uneven_model():
    return keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(256, activation="relu", name="big"),
        keras.layers.Dense(8, name="small1"),
        keras.layers.ReLU(name="act"),
        keras.layers.Dense(8, name="small2"),
    ])


def test_param_costs():
    model = _uneven_model()
    assert balance.layer_costs(model, "params") == [16 * 256 + 256, 256 * 8 + 8, 0, 8 * 8 + 8]


def test_time_costs_sequential_and_functional():
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    seq = _uneven_model()
    costs = balance.layer_costs(seq, "time", x, repeats=2)
    assert len(costs) == 4 and all(c >= 0 and np.isfinite(c) for c in costs)
    inp = keras.Input((16,))
    h = keras.layers.Dense(32, name="a")(inp)
    out = keras.layers.Add(name="add")([h, keras.layers.Dense(32, name="b")(h)])
    func = keras.Model(inp, out)
    layers = [op for op in func.operations if not isinstance(op, keras.layers.InputLayer)]
    costs = balance.layer_costs(func, "time", x, layers=layers, device="/CPU:1", repeats=1)
    assert len(costs) == 3 and all(c >= 0 for c in costs)


def test_time_profiles_each_distinct_layer_call_once(monkeypatch):
    """Repeated blocks (same class, configuration and input shapes) are timed once and share the figure."""
    profiled = []
    real = balance._profile
    monkeypatch.setattr(balance, "_profile",
                        lambda layer, *a, **k: profiled.append(layer.name) or real(layer, *a, **k))
    model = keras.Sequential([keras.Input((16,))] + [keras.layers.Dense(16, name=f"same{i}") for i in range(3)]
                             + [keras.layers.Dense(8, name="narrow"), keras.layers.Dense(8, name="same_again")])
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    costs = balance.layer_costs(model, "time", x, repeats=1)
    # same1 and same2 repeat same0's call; "narrow" differs in width, "same_again" in its input width
    assert profiled == ["same0", "narrow", "same_again"]
    assert costs[0] == costs[1] == costs[2] and len(costs) == 5


def test_time_runs_stop_at_the_budget(monkeypatch):
    clock = iter(range(0, 1000, 1))  # every perf_counter call advances one "second"
    monkeypatch.setattr(balance.time, "perf_counter", lambda: next(clock))
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    costs = balance.layer_costs(_uneven_model(), "time", x, repeats=5)
    assert costs == [1.0, 1.0, 1.0, 1.0]
    assert next(clock) == 8  # one timed run (two clock reads) per layer: the first already exceeds TIMING_BUDGET


def test_time_needs_sample_input():
    with pytest.raises(ValueError, match="pass sample_input"):
        balance.layer_costs(_uneven_model(), "time")


def test_unknown_mode():
    with pytest.raises(ValueError, match="balance='flops' is not known; use one of params, time"):
        balance.layer_costs(_uneven_model(), "flops")


def test_split_balanced_by_params():
    from pipeline.core import partition

    stages = partition.split(_uneven_model(), num_stages=2, balance="params")
    assert [layer.name for layer in stages[0].layers] == ["big"]
    assert [layer.name for layer in stages[1].layers] == ["small1", "act", "small2"]


def _conv_heavy_model():
    """Two convolutions that take almost all the time but few weights, then a light tail heavy in weights.

    Per layer, forward + backward on 16 images of 32x32x128 (measured on a 2-core CPU): conv 120-200 ms each;
    pool, dense and output 0.6-3.5 ms each, most of it call overhead (conv1 / whole tail: 20-38x over 5 runs).
    Weights: conv 148k each, the dense 264k.
    """
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((32, 32, 128)),
        keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="conv2"),
        keras.layers.GlobalAveragePooling2D(name="pool"),
        keras.layers.Dense(2048, activation="relu", name="wide"),
        keras.layers.Dense(10, name="out"),
    ])


def test_split_balanced_by_time_isolates_the_slow_layers():
    """K=2 stages by measured time: the min-max cut puts conv1 alone (any later cut makes a stage of both
    convolutions; conv1 alone costs 20x the tail after conv2), where counting layers or weights cuts elsewhere."""
    from pipeline.core import partition

    model = _conv_heavy_model()
    x = np.random.default_rng(0).normal(size=(16, 32, 32, 128)).astype("float32")
    # Counting weights cuts after conv2, counting layers after pool: "time" has to find its own cut.
    assert _names(partition.split(model, num_stages=2, balance="params")) == [["conv1", "conv2"], ["pool", "wide", "out"]]
    assert balance.equal_count_points(5, 2) == [3]
    stages = partition.split(model, num_stages=2, balance="time", sample_input=x)
    assert _names(stages) == [["conv1"], ["conv2", "pool", "wide", "out"]]


def _names(stages):
    return [[layer.name for layer in stage.layers] for stage in stages]


def test_balanced_split_warns_when_one_stage_stays_far_above_the_mean():
    from pipeline.core import partition

    model = _uneven_model()  # "big" holds 4352 of 6480 parameters: no 3-stage cut can balance it
    with pytest.warns(UserWarning, match=r"stage 0 holds 67% of the params cost \(stages: 67%, 32%, 1%; an even "
                                         r"split would be 33% each\)"):
        partition.split(model, num_stages=3, balance="params")
    even = keras.Sequential([keras.Input((8,))] + [keras.layers.Dense(8) for _ in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        partition.split(even, num_stages=2, balance="params")  # 50% / 50%: no warning
