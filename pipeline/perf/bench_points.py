"""Benchmark points that train (one per process): step time, peak memory, overhead, balanced splits.

Run by :mod:`pipeline.perf.bench` in fresh processes (threads and logical devices fixed before TensorFlow
starts); each returns a JSON-friendly dictionary::

    point {"kind": "step", "mode": "pipeline", "m": 8, ...} -> {"step": 0.13, "tf_peak_mb": 48.5, ...}
"""

from __future__ import annotations

import resource
from typing import Any

from pipeline.perf import simulate as sim
from pipeline.perf.measure import step_peak_mb
from pipeline.perf.overhead import measure_step_overhead, time_fit_step


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mlp(width: int, layers: int, name: str, in_dim: int | None = None, out_dim: int | None = None) -> Any:
    """``layers`` x Dense(width, relu) named ``<name>_d<i>`` (plus Dense(out_dim) ``<name>_out``), built."""
    import keras

    body = [keras.layers.Dense(width, activation="relu", name=f"{name}_d{i}") for i in range(layers)]
    if out_dim is not None:
        body.append(keras.layers.Dense(out_dim, name=f"{name}_out"))
    return keras.Sequential([keras.Input((in_dim or width,))] + body, name=name)


def point_step(p: dict[str, Any]) -> dict[str, Any]:
    """One training configuration: median step time, peak RSS, optionally the simulator's prediction."""
    import keras
    import numpy as np

    from pipeline.core.model import PipelineModel

    keras.utils.set_random_seed(0)
    width, layers, batch, k = p["width"], p["layers"], p["batch"], p.get("k", 2)
    in_dim, out_dim = p.get("in_dim"), p.get("out_dim")
    parts = [mlp(width, layers, f"s{i}", in_dim if i == 0 else None, out_dim if i == k - 1 else None)
             for i in range(k)]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, in_dim or width)).astype("float32")
    y = rng.normal(size=(batch, out_dim or width)).astype("float32")
    if p["mode"] == "keras":
        model = keras.Sequential([keras.Input((in_dim or width,))] + [l for part in parts for l in part.layers])
    else:
        model = PipelineModel(parts, microbatches=p["m"], schedule=p.get("schedule", "1f1b"),
                              recompute=p.get("recompute", False))
    model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse")
    result = {"step": time_fit_step(model, x, y, p["steps"])}
    result["rss_mb"] = peak_rss_mb()
    result["tf_peak_mb"] = step_peak_mb(lambda: model.fit(x, y, batch_size=batch, epochs=1, verbose=0,
                                                               shuffle=False))
    from pipeline.core import microbatch as mb_lib
    from pipeline.core import schedule as sched
    from pipeline.perf.measure import contention_factor, measure_stage_costs
    from pipeline.perf.trace import run_measured

    if p.get("predict_memory") and p["mode"] == "pipeline":
        result["predicted_peak_mb"] = _predicted_peak_mb(model, x, p)

    if p.get("efficiency") and p["mode"] == "pipeline":
        def work(inp: Any) -> float:
            return sum(c.forward + c.backward
                       for c in measure_stage_costs(model.stages, inp, repeats=3, under_load=False))

        # Same work cut into M pieces: small matmuls re-read the weights per piece and run less efficiently.
        result["efficiency"] = work(x) / (p["m"] * work(mb_lib.split(x, p["m"])[0]))
    if p.get("predict"):
        micro = mb_lib.split(x, p["m"])[0]
        rows = sched.get(p.get("schedule", "1f1b"))(k, p["m"])
        costs = measure_stage_costs(model.stages, micro, repeats=8, calls=5)
        alone = measure_stage_costs(model.stages, micro, repeats=8, calls=5, under_load=False)
        step_overhead = measure_step_overhead(model, x, y, steps=p["steps"], calls=5)
        result["makespan"] = sim.simulate(rows, costs).makespan
        result["makespan_alone"] = sim.simulate(rows, alone).makespan
        result["overhead"] = step_overhead
        result["predicted"] = result["makespan"] + step_overhead
        result["contention"] = contention_factor(model.stages, micro, repeats=8, calls=5)
        result["costs"] = [[c.forward, c.backward] for c in costs]
        result["costs_alone"] = [[c.forward, c.backward] for c in alone]
        _, timeline, threads = run_measured(model.stages, x, y, "mse", p.get("schedule", "1f1b"), p["m"], steps=2)
        span = max(iv.end for iv in timeline)
        result["profile"] = {"span": span, "overlap": threads["overlap"],
                             "overlap_fraction": threads["overlap"] / span if span else 0.0,
                             "busy_fraction": [b / span for b in threads["threads"].values()] if span else []}
    return result


def _predicted_peak_mb(model: Any, x: Any, p: dict[str, Any]) -> float:
    """The planner's memory estimate of the point's plan (:func:`pipeline.perf.autoplan.device_peaks`),
    summed over its devices: the logical CPU devices share the one allocator whose peak is measured."""
    from pipeline.core import microbatch as mb_lib
    from pipeline.core import schedule as sched
    from pipeline.perf import autoplan, autoplan_measure

    name = p.get("schedule", "1f1b")
    profile = autoplan_measure.memory_profile(model.stages, x, model.optimizer,
                                              with_split=autoplan.splits_backward(name))
    rows = mb_lib.sizes(len(x), p["m"])[0]
    plan = sched.get(name)(p.get("k", 2), p["m"])
    return sum(autoplan.device_peaks(plan, profile, rows, p.get("recompute", False))) / 2**20


def overhead(p: dict[str, Any]) -> dict[str, Any]:
    """PipelineModel(K=1, M=1) vs keras fit of the same model on the same data, alternating."""
    import keras
    import numpy as np

    from pipeline.core.model import PipelineModel

    width, layers, batch = p["width"], p["layers"], p["batch"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, width)).astype("float32")
    y = rng.normal(size=(batch, width)).astype("float32")
    keras.utils.set_random_seed(0)
    plain = mlp(width, 2 * layers, "plain")
    keras.utils.set_random_seed(0)
    piped = PipelineModel([mlp(width, 2 * layers, "piped")], microbatches=1)
    models = {"keras": plain, "pipeline": piped}
    for model in models.values():
        model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse")
    times: dict[str, list[float]] = {"keras": [], "pipeline": []}
    for _ in range(max(2, p["steps"])):
        for name, model in models.items():
            times[name].append(time_fit_step(model, x, y, steps=8, calls=1))
    # Interleaved fits; the fastest of each is the least disturbed by other load on the machine.
    return {name: float(min(v)) for name, v in times.items()}


def _uneven_layers(width: int) -> list[tuple[int, int]]:
    """(units, repeat) of an uneven model: two wide layers first, then many narrow ones."""
    return [(width, 2), (width // 8, 10)]


def balance_point(p: dict[str, Any]) -> dict[str, Any]:
    """Step time of an uneven model cut into 2 stages by equal layer count or by profiled time."""
    import keras
    import numpy as np

    from pipeline.core import balance
    from pipeline.core.model import PipelineModel
    from pipeline.core.partition import split

    keras.utils.set_random_seed(0)
    width = p["uneven_width"]
    layers = [keras.layers.Dense(units, activation="relu", name=f"l{i}_{j}")
              for i, (units, repeat) in enumerate(_uneven_layers(width)) for j in range(repeat)]
    model = keras.Sequential([keras.Input((width,))] + layers + [keras.layers.Dense(16, name="out")])
    batch = p["batch"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, width)).astype("float32")
    y = rng.normal(size=(batch, 16)).astype("float32")
    if p["split"] == "time":
        stages = split(model, num_stages=2, balance="time", sample_input=x[: batch // p["m"]])
    else:
        names = [layer.name for layer in model.layers]
        cut = balance.equal_count_points(len(names), 2)[0]
        stages = split(model, cuts=[names[cut - 1]])
    pipe = PipelineModel(stages, microbatches=p["m"])
    pipe.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse")
    step = time_fit_step(pipe, x, y, p["steps"])
    from pipeline.core import microbatch as mb_lib
    from pipeline.core import schedule as sched
    from pipeline.perf.measure import measure_stage_costs

    costs = measure_stage_costs(pipe.stages, mb_lib.split(x, p["m"])[0], repeats=4, under_load=False)
    predicted = sim.simulate(sched.one_f_one_b(2, p["m"]), costs).makespan
    return {"step": step, "stage_layers": [len(s.layers) for s in stages], "predicted": predicted,
            "stage_costs": [c.forward + c.backward for c in costs]}
