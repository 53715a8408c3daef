"""Bench section "build": first-step time, peak RSS and graph size of a pipelined step as M grows.

Each point runs in a fresh process (:func:`pipeline.perf.bench.run_point`), so the first ``fit`` call
holds all of the tracing and graph optimization, and the process's peak RSS is the point's own::

    point {"kind": "build", "m": 64, ...} -> {"first": 31.2, "rss_mb": 1012, "step": 0.05, "ops": 81234, ...}
    section: first(M=64) / first(M=4), RSS growth M=4 -> 64, steady step per sample M=64 / M=4
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

from pipeline.perf.bench_points import mlp, peak_rss_mb

# The model: 6 x Dense(64) per stage, 1F1B; K=2 logical CPUs on this 2-core machine (--build-k).
FULL = {"build_k": 2, "build_ms": [4, 16, 64], "build_modes": ["1f1b", "looped", "gpipe_unrolled"],
        "build_width": 64, "build_layers": 6, "build_batch": 256,
        "build_steps": 4, "resnet": False, "resnet_batch": 32, "resnet_ms": [1, 16],
        "loop_steady": [(512, 2048, 16), (512, 2048, 64), (256, 1024, 16), (256, 1024, 64)]}
QUICK = {"build_k": 2, "build_ms": [1, 6], "build_modes": ["1f1b", "looped"],
         "build_width": 16, "build_layers": 2, "build_batch": 8,
         "build_steps": 2, "resnet": False, "resnet_batch": 4, "resnet_ms": [1, 2],
         "loop_steady": [(16, 16, 8)]}
"""``loop_steady``: (width, batch, M) points where the looped and the unrolled GPipe + recompute steps are timed
alternately in one process (``build_layers`` Dense layers per stage), from work-heavy ticks to light ones."""


def _graph_ops(graph: Any) -> int:
    """Ops of ``graph`` plus the nodes of every function in its library (nested ``tf.function`` bodies)."""
    graph_def = graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


def _count_hook(model: Any) -> dict[str, Any]:
    """Records the graph the executor builds its step in, and the unrolled actions (``Executor.action_hook``)."""
    import tensorflow as tf

    seen: dict[str, Any] = {"graph": None, "actions": 0}

    def hook(action: Any) -> None:
        seen["actions"] += 1

    executor = getattr(model, "executor", None)
    if executor is not None and hasattr(executor, "action_hook"):
        executor.action_hook = hook
        train = executor.train

        def recording_train(*args: Any, **kwargs: Any) -> Any:
            if seen["graph"] is None and not tf.executing_eagerly():
                seen["graph"] = tf.compat.v1.get_default_graph()
            return train(*args, **kwargs)

        executor.train = recording_train
    return seen


def _resnet(p: dict[str, Any]) -> tuple[Any, Any, Any, str]:
    import keras
    import numpy as np

    from pipeline.core.partition import split

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    stages = split(model, num_stages=p["k"])
    batch = p["batch"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch).astype("int32")
    return stages, x, y, "sparse_categorical_crossentropy"


def _dense(p: dict[str, Any]) -> tuple[Any, Any, Any, str]:
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    width = p["width"]
    stages = [mlp(width, p["layers"], f"s{i}") for i in range(p["k"])]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(p["batch"], width)).astype("float32")
    y = rng.normal(size=(p["batch"], width)).astype("float32")
    return stages, x, y, "mse"


def build_point(p: dict[str, Any]) -> dict[str, Any]:
    """First ``fit`` call (trace + one step), peak RSS, steady step and traced ops of one (model, M).

    ``p``: ``model`` ("dense" or "resnet"), ``k``, ``m``, ``batch``, ``width``/``layers`` (dense),
    ``steps`` (steady-state steps per timed fit; 0 skips the steady step), ``inline`` (trace the step
    with the stage functions inlined, :func:`pipeline.core.traced.inlined`).
    """
    import keras
    import tensorflow as tf

    from pipeline.core import traced
    from pipeline.core.model import PipelineModel
    from pipeline.perf.overhead import time_fit_step

    stages, x, y, loss = (_resnet if p["model"] == "resnet" else _dense)(p)
    model = PipelineModel(stages, microbatches=p["m"], schedule=p.get("schedule", "1f1b"),
                          recompute=p.get("recompute", False), loop=p.get("loop", False))
    model.compile(optimizer=keras.optimizers.SGD(1e-4), loss=loss)
    seen = _count_hook(model)
    rss_before = peak_rss_mb()
    data = tf.data.Dataset.from_tensors((x, y))
    # "inline": the stage functions pasted into the step graph (what a profiled run does), to compare.
    with traced.inlined() if p.get("inline") else contextlib.nullcontext():
        start = time.perf_counter()
        model.fit(data, epochs=1, verbose=0, shuffle=False)
        first = time.perf_counter() - start
    result: dict[str, Any] = {"first": first, "rss_mb": peak_rss_mb(), "rss_before_mb": rss_before,
                              "actions": seen["actions"]}
    ops = _graph_ops(seen["graph"]) if seen["graph"] is not None else None
    result["ops"] = ops
    result["ops_per_microbatch"] = ops / p["m"] if ops is not None else None
    steps = p.get("steps", 0)
    result["step"] = time_fit_step(model, x, y, steps, calls=2) if steps else None
    return result


def loop_steady_point(p: dict[str, Any]) -> dict[str, Any]:
    """The looped and the unrolled GPipe + recompute steps of one model, timed alternately in one process.

    Returns ``{"looped": s, "unrolled": s, "ratio": looped / unrolled}``, each the best of ``rounds``
    alternations (the same load for both)."""
    import keras

    from pipeline.core.model import PipelineModel
    from pipeline.perf.overhead import time_fit_step

    stages, x, y, loss = _dense(p)
    models = {}
    for loop in (True, False):
        model = PipelineModel(stages, microbatches=p["m"], schedule="gpipe", recompute=True, loop=loop)
        model.compile(optimizer=keras.optimizers.SGD(1e-4), loss=loss)
        time_fit_step(model, x, y, 1, calls=1)  # traced here
        models["looped" if loop else "unrolled"] = model
    times: dict[str, list[float]] = {"looped": [], "unrolled": []}
    for _ in range(p.get("rounds", 3)):
        for name, model in models.items():
            times[name].append(time_fit_step(model, x, y, p["steps"]))
    best = {name: min(values) for name, values in times.items()}
    return {**best, "ratio": best["looped"] / best["unrolled"]}


MODES = {
    "1f1b": ({"schedule": "1f1b"}, "1F1B, unrolled actions (2*K*M in the step graph)"),
    "looped": ({"schedule": "gpipe", "recompute": True, "loop": True},
               "GPipe + recompute as tick loops (loop=True, pipeline.core.looped)"),
    "gpipe_unrolled": ({"schedule": "gpipe", "recompute": True},
                       "GPipe + recompute, unrolled actions (the looped step's reference)"),
}
"""The step builds the build section compares: name -> (point settings, description)."""


def _sweep(mode: str, base: dict[str, Any], ms: list[int], rounds: int, log: Callable[[str], None],
           run_point: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """One build mode at every M: the best of ``rounds`` processes per M, and the M-growth ratios."""
    settings, description = MODES[mode]
    log(f"  {mode}: {description}")
    rows = []
    for m in ms:
        runs = [run_point({**base, **settings, "m": m}) for _ in range(max(1, rounds))]
        best = min(runs, key=lambda r: r["first"])
        steady = [r["step"] for r in runs if r["step"] is not None]
        row = {"m": m, "first": best["first"], "firsts": [r["first"] for r in runs],
               "rss_mb": min(r["rss_mb"] for r in runs), "step": min(steady) if steady else None,
               "ops": best["ops"], "ops_per_microbatch": best["ops_per_microbatch"], "actions": best["actions"]}
        rows.append(row)
        ops = "n/a" if row["ops"] is None else f"{row['ops']} ({row['ops_per_microbatch']:.0f} per micro-batch)"
        log(f"    M={m:<3} first fit {row['first']:7.2f} s (runs: " + ", ".join(f"{t:.2f}" for t in row["firsts"])
            + f")  peak RSS {row['rss_mb']:6.0f} MB  steady step "
            + ("n/a" if row["step"] is None else f"{row['step']:.4f} s") + f"  traced ops {ops}")
    lo, hi = rows[0], rows[-1]
    res: dict[str, Any] = {"rows": rows, "first_ratio": hi["first"] / lo["first"],
                           "rss_growth": hi["rss_mb"] / lo["rss_mb"] - 1}
    log(f"    first-step ratio M={hi['m']} / M={lo['m']}: {res['first_ratio']:.2f} (target <= 2.0)")
    log(f"    peak RSS growth M={lo['m']} -> M={hi['m']}: {res['rss_growth']:+.1%} (target < +15%)")
    if lo["step"] and hi["step"]:
        res["step_ratio"] = hi["step"] / lo["step"]  # same batch at every M: per sample = per step
        log(f"    steady step M={hi['m']} / M={lo['m']} (same batch, so also per sample): {res['step_ratio']:.2f}")
    return res


def section_build(cfg: dict[str, Any], out: dict[str, Any], log: Callable[[str], None],
                  run_point: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Runs the "build" section: the dense model in each of ``cfg["build_modes"]`` at each M of
    ``cfg["build_ms"]``; the looped step's steady step against its unrolled reference; ResNet50 if
    ``cfg["resnet"]``."""
    k, ms = cfg["build_k"], cfg["build_ms"]
    base = {"kind": "build", "model": "dense", "k": k, "width": cfg["build_width"], "layers": cfg["build_layers"],
            "batch": cfg["build_batch"], "steps": cfg["build_steps"], "threads": [1, 2], "devices": k}
    log(f"build: first fit call (trace + one step) and peak RSS per process, K={k}, "
        f"{cfg['build_layers']} x Dense({cfg['build_width']}) per stage, batch {cfg['build_batch']} ...")
    modes = {mode: _sweep(mode, base, ms, cfg["rounds"], log, run_point) for mode in cfg["build_modes"]}
    res: dict[str, Any] = {"k": k, "modes": modes}
    if "looped" in modes and "gpipe_unrolled" in modes:
        pairs = zip(modes["looped"]["rows"], modes["gpipe_unrolled"]["rows"])
        res["looped_step_ratio"] = {a["m"]: a["step"] / b["step"] for a, b in pairs if a["step"] and b["step"]}
        log("  steady step, looped / unrolled GPipe + recompute (same run): " + ", ".join(
            f"M={m} {r:.2f}" for m, r in res["looped_step_ratio"].items()))
    res["loop_steady"] = []
    for width, batch, m in cfg.get("loop_steady", []):
        r = run_point({**base, "kind": "loop_steady", "width": width, "batch": batch, "m": m})
        res["loop_steady"].append({"width": width, "batch": batch, "m": m, **r})
        log(f"  steady step, looped / unrolled GPipe + recompute, alternated in one process, {cfg['build_layers']} x "
            f"Dense({width}) per stage, batch {batch}, M={m} ({batch // m} rows per micro-batch): "
            f"{r['looped']:.4f} / {r['unrolled']:.4f} s = {r['ratio']:.2f}")
    if cfg.get("resnet"):
        rbase = {"kind": "build", "model": "resnet", "k": 4, "batch": cfg["resnet_batch"], "steps": 0,
                 "threads": [0, 0], "devices": 4}
        log(f"build: ResNet50 (32x32x3, batch {cfg['resnet_batch']}) split into K=4 stages, first fit call ...")
        rrows = []
        for m in cfg["resnet_ms"]:
            r = run_point({**rbase, "m": m})
            rrows.append({"m": m, **r})
            log(f"  M={m:<3} first fit {r['first']:7.2f} s  peak RSS {r['rss_mb']:6.0f} MB  traced ops "
                + ("n/a" if r["ops"] is None else f"{r['ops']} ({r['ops_per_microbatch']:.0f} per micro-batch)"))
        res["resnet"] = {"rows": rrows, "first_ratio": rrows[-1]["first"] / rrows[0]["first"],
                         "rss_growth": rrows[-1]["rss_mb"] / rrows[0]["rss_mb"] - 1}
        log(f"  ResNet50 first-step ratio M={rrows[-1]['m']} / M={rrows[0]['m']}: "
            f"{res['resnet']['first_ratio']:.2f} (target <= 2.0); peak RSS growth {res['resnet']['rss_growth']:+.1%}")
    out["build"] = res
