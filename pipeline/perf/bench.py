"""``pipeline bench``: overhead, speedup, memory, Jacobian-vs-VJP, simulator and balancing ratios from one run.

Every figure is a ratio against a baseline measured in the same run; every
point runs in its own process (threads and logical devices are fixed before
TensorFlow starts; peak RSS is per process). This module is the only place
with Jacobian code: the hand-written Jacobian chain rule is measured here to
show why the trainer uses one VJP per stage instead.

    bench (no TensorFlow) --spawn--> worker(point) --JSON line--> bench --> table + JSON file
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from pipeline.core import runtime
from pipeline.core import schedule as sched
from pipeline.perf import bench_build, bench_overlap, bench_schedules
from pipeline.perf import bench_points as points
from pipeline.perf import simulate as sim

# The overhead/speedup model is compute-bound with cache-resident weights (8 x Dense(256) per stage,
# 2048-row batch): logical CPU devices share the memory bus, so a memory-bound model (e.g. Dense(1024),
# 4 MB per weight) measures the bus, not the pipeline (two busy threads ran 1.3-1.5x slower each here);
# GPUs each have their own memory. docs/performance.md shows both.
FULL = {"width": 256, "layers": 8, "batch": 2048, "steps": 6, "rounds": 2,
        "ms": [1, 2, 4, 8, 16], "mem_ms": [4, 8, 16, 32], "mem_micro": 256, "mem_width": 512,
        "cnn_batch": 4, "uneven_width": 1536, "balance_batch": 512}
QUICK = {"width": 64, "layers": 2, "batch": 32, "steps": 2, "rounds": 1,
         "ms": [1, 2], "mem_ms": [2, 4], "mem_micro": 4, "mem_width": 64,
         "cnn_batch": 2, "uneven_width": 64, "balance_batch": 32}
FULL.update(bench_build.FULL, **bench_overlap.FULL, **bench_schedules.FULL)  # sizes of sections with own modules
QUICK.update(bench_build.QUICK, **bench_overlap.QUICK, **bench_schedules.QUICK)


# ----------------------------------------------------------------------------- worker side (TensorFlow)

def _cnn_parts(batch: int) -> tuple[Any, Any, Any, Any]:
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    part0 = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.Conv2D(8, 3, activation="relu")], name="part0")
    part1 = keras.Sequential([keras.Input((12, 12, 8)), keras.layers.Flatten(), keras.layers.Dense(10)],
                             name="part1")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch).astype("int32")
    return part0, part1, x, y


def _jacobian(p: dict[str, Any]) -> dict[str, Any]:
    """Gradients of a two-part CNN three ways: one tape, VJP chain, hand-written Jacobian chain rule."""
    import keras
    import tensorflow as tf

    part0, part1, x, y = _cnn_parts(p["cnn_batch"])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = part0.trainable_variables + part1.trainable_variables

    def one_tape():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, part1(part0(x)))
        return tape.gradient(loss, variables)

    def vjp_chain():
        with tf.GradientTape() as tape0:
            h = part0(x)
        with tf.GradientTape() as tape1:
            tape1.watch(h)
            loss = loss_fn(y, part1(h))
        g_h, *g1 = tape1.gradient(loss, [h] + part1.trainable_variables)
        g0 = tape0.gradient(h, part0.trainable_variables, output_gradients=g_h)
        return g0 + g1

    def jacobian_chain():
        with tf.GradientTape(persistent=True) as tape0:
            h = part0(x)
        with tf.GradientTape() as tape1:
            tape1.watch(h)
            loss = loss_fn(y, part1(h))
        g_h, *g1 = tape1.gradient(loss, [h] + part1.trainable_variables)
        g0 = []
        for v in part0.trainable_variables:
            jac = tape0.jacobian(h, v)  # shape h.shape + v.shape: one backward per element of h
            g0.append(tf.tensordot(g_h, jac, axes=len(h.shape)))
        del tape0
        return g0 + g1

    fn = {"tape": one_tape, "vjp": vjp_chain, "jacobian": jacobian_chain}[p["method"]]
    reference = [g.numpy() for g in one_tape()]
    base_rss = points.peak_rss_mb()
    start = time.perf_counter()
    grads = fn()
    elapsed = time.perf_counter() - start
    error = max(float(abs(g.numpy() - r).max()) for g, r in zip(grads, reference))
    return {"time": elapsed, "rss_mb": points.peak_rss_mb(), "rss_before_mb": base_rss, "max_error": error}


POINTS = {"step": points.point_step, "overhead": points.overhead, "jacobian": _jacobian,
          "balance": points.balance_point, "build": bench_build.build_point,
          "loop_steady": bench_build.loop_steady_point,
          "overlap": bench_overlap.overlap_point, "schedule": bench_schedules.schedule_point}
SECTION_HOOKS: dict[str, Any] = {}
"""Sections of higher layers, ``hook(cfg, out, log)``, registered at their import (pipeline.commands.bench_auto:
"auto", which builds YAML configs; its points and sizes go into ``POINTS``/``FULL``/``QUICK`` too)."""


def worker(spec: str) -> None:
    """Runs one point in this (fresh) process and prints its result as one JSON line."""
    p = json.loads(spec)
    intra, inter = p.get("threads", [0, 0])
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    from pipeline.core import devices

    devices.setup_cpu_devices(p.get("devices", 2))
    result = POINTS[p["kind"]](p)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver side (no TensorFlow)

def run_point(point: dict[str, Any], timeout: float = 1800, module: str = "pipeline.perf.bench") -> dict[str, Any]:
    """Runs ``point`` in a fresh Python process and returns its result dictionary.

    Args:
        point: the point's settings (``kind`` names its function in ``POINTS``).
        timeout: seconds before the worker is stopped.
        module: the module the worker runs as ``python -m <module> --worker`` (one that fills ``POINTS``).

    Raises:
        RuntimeError: with the worker's last output lines if it failed.
    """
    intra, inter = point.get("threads", [0, 0])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS=str(intra),
               TF_NUM_INTEROP_THREADS=str(inter))
    env[runtime.BFC_ENV] = "true"  # peak memory statistics on every processor (see runtime.BFC_ENV)
    env.pop("PIPELINE_CPU_DEVICES", None)  # the worker creates its devices after setting threads
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(point)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
    raise RuntimeError(f"bench point {point} failed (exit {proc.returncode}):\n{tail}")


def _best(point: dict[str, Any], rounds: int, key: str = "step") -> dict[str, Any]:
    """The run with the smallest ``key`` over ``rounds`` processes (the least disturbed by other load)."""
    runs = [run_point(point) for _ in range(max(1, rounds))]
    return min(runs, key=lambda r: r[key])


SECTIONS = ("overhead", "speedup", "memory", "jacobian", "balance", "schedules", "build", "overlap", "auto")


def run(cfg: dict[str, Any], log: Any = print, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Runs every section of the benchmark.

    Args:
        cfg: sizes (``FULL`` or ``QUICK``).
        log: where progress lines go.
        sections: which parts to run (default: all of ``SECTIONS``).

    Returns:
        The results, JSON-serializable.
    """
    base = {"kind": "step", "width": cfg["width"], "layers": cfg["layers"], "batch": cfg["batch"],
            "steps": cfg["steps"]}
    out: dict[str, Any] = {"config": cfg}

    if "overhead" in sections:
        _section_overhead(cfg, base, out, log)
    if "speedup" in sections:
        _section_speedup(cfg, base, out, log)
    if "memory" in sections:
        _section_memory(cfg, out, log)
    if "jacobian" in sections:
        _section_jacobian(cfg, out, log)
    if "balance" in sections:
        _section_balance(cfg, out, log)
    if "schedules" in sections:
        bench_schedules.section_schedules(cfg, out, log, lambda point: run_point(point))
    if "build" in sections:
        bench_build.section_build(cfg, out, log, lambda point: run_point(point))
    if "overlap" in sections:
        bench_overlap.section_overlap(cfg, out, log, lambda point: run_point(point))
    if "auto" in sections and "auto" in SECTION_HOOKS:
        SECTION_HOOKS["auto"](cfg, out, log)
    elif "auto" in sections:
        log("auto: skipped here (the section builds YAML configs: `pipeline bench --sections auto` runs it)")
    return out


def _section_overhead(cfg: dict[str, Any], base: dict[str, Any], out: dict[str, Any], log: Any) -> None:
    log("overhead: PipelineModel(K=1, M=1) vs keras fit ...")
    o = run_point({**base, "kind": "overhead", "threads": [0, 0], "devices": 1})
    out["overhead"] = {**o, "ratio": o["pipeline"] / o["keras"]}
    log(f"  keras {o['keras']:.4f} s/step, pipeline {o['pipeline']:.4f} s/step, ratio {out['overhead']['ratio']:.3f}")


def _section_speedup(cfg: dict[str, Any], base: dict[str, Any], out: dict[str, Any], log: Any) -> None:
    log("speedup: K=2 (1 intra-op thread, 2 inter-op threads) vs unsplit on 1 thread ...")
    rounds = cfg["rounds"]
    single = _best({**base, "mode": "keras", "k": 2, "threads": [1, 1]}, rounds)
    both = _best({**base, "mode": "keras", "k": 2, "threads": [2, 1]}, rounds)
    inter = _best({**base, "mode": "keras", "k": 2, "threads": [1, 2]}, rounds)
    rows = []
    for m in cfg["ms"]:
        r = _best({**base, "mode": "pipeline", "k": 2, "m": m, "threads": [1, 2], "predict": m == 8,
                   "efficiency": True}, rounds)
        speedup = single["step"] / r["step"]
        ideal = sim.ideal_speedup(2, m)
        rows.append({"m": m, "step": r["step"], "speedup": speedup, "ideal": ideal, "of_ideal": speedup / ideal,
                     "efficiency": r.get("efficiency"),
                     **({key: r[key] for key in ("predicted", "makespan", "makespan_alone", "overhead",
                                                 "contention", "costs", "costs_alone", "profile")}
                        if "predicted" in r else {})})
        log(f"  M={m:<3} step {r['step']:.4f} s  speedup {speedup:.2f}  ideal {ideal:.2f}  ({speedup / ideal:.0%} of ideal)"
            f"  micro-batch efficiency {r.get('efficiency', float('nan')):.2f}")
    out["speedup"] = {"single_thread_step": single["step"], "two_intra_threads_step": both["step"],
                      "two_intra_threads_speedup": single["step"] / both["step"],
                      "two_inter_threads_step": inter["step"],
                      "two_inter_threads_speedup": single["step"] / inter["step"], "rows": rows}
    log(f"  unsplit on 1 thread {single['step']:.4f} s; unsplit with 2 intra-op threads {both['step']:.4f} s "
        f"(speedup {single['step'] / both['step']:.2f}, reference line); unsplit with 1 intra-op and 2 "
        f"inter-op threads {inter['step']:.4f} s (speedup {single['step'] / inter['step']:.2f}: independent ops "
        "inside one step, e.g. the two matmuls of a Dense backward)")
    for row in rows:
        if "predicted" in row:
            parallel = 2 / row["contention"]
            out["machine"] = {"contention": row["contention"], "parallel_speedup": parallel,
                              "efficiency_m8": row["efficiency"], "profile_m8": row["profile"]}
            log(f"machine: both stages at once run {row['contention']:.2f}x slower than one alone, i.e. two "
                f"threads give {parallel:.2f}x (2.00 on two free cores); M={row['m']} micro-batches do the "
                f"step's work at {row['efficiency']:.2f} of the whole batch's efficiency")
            prof = row["profile"]
            log(f"profile K=2 M={row['m']}: ops of both devices ran at the same time for "
                f"{prof['overlap_fraction']:.0%} of the step; threads busy "
                + ", ".join(f"{b:.0%}" for b in prof["busy_fraction"]))
            out["simulator"] = {"m": row["m"], "predicted": row["predicted"], "makespan": row["makespan"],
                                "overhead": row["overhead"], "measured": row["step"],
                                "ratio": row["predicted"] / row["step"],
                                "ratio_stages_alone": (row["makespan_alone"] + row["overhead"]) / row["step"]}
            log(f"simulator: K=2 M={row['m']} measured {row['step']:.4f} s; predicted {row['predicted']:.4f} s "
                f"(ratio {row['predicted'] / row['step']:.2f}) = simulated makespan {row['makespan']:.4f} s "
                f"from stage costs measured under load + step overhead {row['overhead']:.4f} s measured at M=1; "
                f"with stage costs measured alone {row['makespan_alone'] + row['overhead']:.4f} s "
                f"(ratio {out['simulator']['ratio_stages_alone']:.2f})")


MEMORY_RECOMPUTE = {"zb_h1": (False,), "interleaved_1f1b": ()}
"""Recompute settings of the memory section per schedule (default both): zb_h1 (held until W) without recompute
only, whose trade-off the 1f1b rows show; interleaved_1f1b none, with K=2 stages on 2 devices it is 1f1b."""


def _section_memory(cfg: dict[str, Any], out: dict[str, Any], log: Any) -> None:
    log("memory: peak RSS per process, fixed micro-batch, K=2 ...")
    mem = []
    for schedule in sched.NAMES:
        if schedule == "interleaved_1f1b":
            log(f"  {schedule}: skipped, K=2 stages on 2 devices run it as 1f1b (it needs fewer devices than stages)")
        for recompute in MEMORY_RECOMPUTE.get(schedule, (False, True)):
            for m in cfg["mem_ms"]:
                point = {"kind": "step", "mode": "pipeline", "k": 2, "m": m, "schedule": schedule,
                         "recompute": recompute, "width": cfg["mem_width"], "layers": cfg["layers"] * 2,
                         "batch": cfg["mem_micro"] * m, "in_dim": 8, "out_dim": 8, "steps": 1,
                         "threads": [1, 2], "predict_memory": True}
                r = run_point(point)
                mem.append({"schedule": schedule, "recompute": recompute, "m": m, "rss_mb": r["rss_mb"],
                            "tf_peak_mb": r["tf_peak_mb"], "predicted_peak_mb": r["predicted_peak_mb"],
                            "step": r["step"]})
                peak = "not available" if r["tf_peak_mb"] is None else f"{r['tf_peak_mb']:7.1f} MB"
                log(f"  {schedule:<5} recompute={str(recompute):<5} M={m:<3} TF peak during a step "
                    f"{peak} (planner's estimate {r['predicted_peak_mb']:7.1f} MB), process peak RSS "
                    f"{r['rss_mb']:.0f} MB, step {r['step']:.3f} s")
    out["memory"] = {"rows": mem, "growth": _growth(mem, cfg["mem_ms"], "tf_peak_mb"),
                     "rss_growth": _growth(mem, cfg["mem_ms"], "rss_mb")}
    if any(r["tf_peak_mb"] is None for r in mem):
        log("  TF step peak: not available, TensorFlow's CPU allocator keeps no statistics in this process; "
            "start it with TF_CPU_ALLOCATOR_USE_BFC=true")
    for key, g in out["memory"]["growth"].items():
        log(f"  {key}: M={cfg['mem_ms'][0]} -> M={cfg['mem_ms'][-1]}: TF step peak {g:+.1%}, "
            f"process peak RSS {out['memory']['rss_growth'][key]:+.1%}")


def _section_jacobian(cfg: dict[str, Any], out: dict[str, Any], log: Any) -> None:
    log("Jacobian chain rule vs VJP on a two-part CNN ...")
    jac = {}
    for method in ("tape", "vjp", "jacobian"):
        jac[method] = run_point({"kind": "jacobian", "method": method, "cnn_batch": cfg["cnn_batch"],
                                 "threads": [0, 0], "devices": 1})
        log(f"  {method:<8} {jac[method]['time']:.3f} s, peak RSS {jac[method]['rss_mb']:.0f} MB "
            f"(+{jac[method]['rss_mb'] - jac[method]['rss_before_mb']:.0f} MB), "
            f"max |grad error| {jac[method]['max_error']:.2e}")
    out["jacobian"] = {**jac, "time_ratio": jac["jacobian"]["time"] / jac["vjp"]["time"]}


def _section_balance(cfg: dict[str, Any], out: dict[str, Any], log: Any) -> None:
    log("balance: time-balanced vs equal-layer split of an uneven model (K=2, M=8) ...")
    rounds = cfg["rounds"]
    m = 8 if cfg["balance_batch"] >= 8 else 2
    bal = {}
    for kind in ("equal", "time"):
        bal[kind] = _best({"kind": "balance", "split": kind, "uneven_width": cfg["uneven_width"], "m": m,
                           "batch": cfg["balance_batch"], "steps": cfg["steps"], "threads": [1, 2]}, rounds)
        log(f"  {kind:<5} split, layers per stage {bal[kind]['stage_layers']}: step {bal[kind]['step']:.4f} s; "
            "stage F+B per micro-batch " + ", ".join(f"{c * 1e3:.2f} ms" for c in bal[kind]["stage_costs"])
            + f"; simulator (stages alone) {bal[kind]['predicted']:.4f} s")
    out["balance"] = {**bal, "speedup": bal["equal"]["step"] / bal["time"]["step"],
                      "predicted_speedup": bal["equal"]["predicted"] / bal["time"]["predicted"]}
    log(f"  time-balanced is {out['balance']['speedup']:.2f}x the equal-layer split measured, "
        f"{out['balance']['predicted_speedup']:.2f}x predicted on devices that do not share cores")


def _growth(rows: list[dict[str, Any]], ms: list[int], key: str) -> dict[str, float]:
    growth = {}
    for schedule, recompute in dict.fromkeys((r["schedule"], r["recompute"]) for r in rows):  # as run, in order
        sel = {r["m"]: r[key] for r in rows if r["schedule"] == schedule and r["recompute"] == recompute}
        name = f"{schedule}{' +recompute' if recompute else ''}"
        growth[name] = sel[ms[-1]] / sel[ms[0]] - 1 if sel[ms[0]] and sel[ms[-1]] is not None else float("nan")
    return growth


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
