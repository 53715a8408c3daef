"""Bench section "auto" (``pipeline bench --sections auto``): is the plan ``auto`` picks the fastest one measured?

For each config (configs/digits_cnn.yaml, configs/resnet_synthetic.yaml) one process resolves ``auto``
(:mod:`pipeline.perf.autoplan`, the runner's path), then other processes time candidates one by one with
real ``fit`` steps (:func:`pipeline.perf.overhead.time_fit_step`, the median gap between batch ends), in
``auto_rounds`` interleaved rounds, keeping each candidate's fastest round::

    resolve point -> choice + table        candidates point (every candidate, or a reduced set) -> step times
                                           (all built once, then timed in interleaved rounds)
    section: measured(chosen) / min(measured over the set)    (target <= 1.05)

It builds YAML configs (the train layer), so it lives in the commands layer and registers itself with
:mod:`pipeline.perf.bench` at import (its points run in ``python -m pipeline.commands.bench_auto --worker``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any, Callable

from pipeline.perf import bench

AUTO_SETTINGS = ["pipeline.schedule=auto", "pipeline.microbatches=auto", "pipeline.recompute=auto"]
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
FULL = {"auto_configs": ["digits_cnn", "resnet_synthetic"], "auto_reduced": {"digits_cnn": 6, "resnet_synthetic": 6},
        "auto_steps": 4, "auto_rounds": 3}
"""``auto_reduced``: configs whose candidates are too many to time all: the best N predicted plus, for every
M, the best predicted candidate of that M (so every M is measured at least once)."""
QUICK = {"auto_configs": ["digits_cnn"], "auto_reduced": {"digits_cnn": 3}, "auto_steps": 2, "auto_rounds": 1,
         "auto_refine": {"top": 2, "within": 100.0, "steps": 1, "rounds": 1}}
"""``auto_refine.within`` is wide so that the quick run always times its ``top`` finalists: with the default
(0.5), a plan predicted more than 1.5x ahead of all others is trusted untimed (seen on a CI machine: digits_cnn
at M=1 predicted 0.0015 s, the next 0.0024 s), and the timing path would go unchecked."""


def _load(name: str, overrides: list[str]) -> Any:
    from pipeline.train.config import load_config

    return load_config(os.path.join(_CONFIGS, f"{name}.yaml"), ["checkpoint.enabled=false", *overrides])


def resolve_point(p: dict[str, Any]) -> dict[str, Any]:
    """Worker: resolves ``auto`` for config ``p["config"]`` as ``pipeline train`` would; returns the choice."""
    from pipeline.perf import autoplan_measure
    from pipeline.train import runner

    start = time.perf_counter()
    default = autoplan_measure.REFINE
    autoplan_measure.REFINE = {**default, **(p.get("refine") or {})}  # QUICK: fewer, shorter timed finalists
    try:
        built = runner.build(_load(p["config"], AUTO_SETTINGS), tempfile.mkdtemp(prefix="pipeline-bench-auto-"))
    finally:
        autoplan_measure.REFINE = default
    choice = built.pipeline.auto_choice
    return {**choice.to_dict(), "resolve_s": time.perf_counter() - start, "devices": built.devices}


def candidates_point(p: dict[str, Any]) -> dict[str, Any]:
    """Worker: times ``fit`` steps of each candidate ``[schedule, M, recompute]`` of ``p["candidates"]``.

    Every candidate is built (and its step traced) once; then ``p["rounds"]`` rounds time them in turn,
    each candidate's fastest round kept (other work on the machine only ever adds time).
    """
    from pipeline.perf.overhead import time_fit_step
    from pipeline.train import runner

    models = {}
    for schedule, m, recompute in p["candidates"]:
        cfg = _load(p["config"], [f"pipeline.schedule={schedule}", f"pipeline.microbatches={m}",
                                  f"pipeline.recompute={str(recompute).lower()}"])
        built = runner.build(cfg, tempfile.mkdtemp(prefix="pipeline-bench-auto-"))
        x, y = next(iter(built.data.train.batch(cfg.data.batch_size, drop_remainder=True)))[:2]
        time_fit_step(built.pipeline, x, y, 1, calls=1)  # trace and warm up
        models[_key(schedule, m, recompute)] = (built.pipeline, x, y)
    steps: dict[str, float] = {}
    for _ in range(max(1, p["rounds"])):
        for key, (model, x, y) in models.items():
            step = time_fit_step(model, x, y, p["steps"], calls=2)
            steps[key] = min(step, steps.get(key, step))
    return {"steps": steps}


def _key(schedule: str, m: int, recompute: bool) -> str:
    return f"{schedule} M={m}" + (" recompute" if recompute else "")


def _reduced(table: list[dict[str, Any]], top: int | None) -> list[dict[str, Any]]:
    """Every fitting candidate, or the best ``top`` predicted plus the best predicted of every M."""
    fitting = [c for c in table if c["fits"]]
    if top is None:
        return fitting
    chosen = fitting[:top]
    for m in sorted({c["microbatches"] for c in fitting}):
        best = next(c for c in fitting if c["microbatches"] == m)
        if best not in chosen:
            chosen.append(best)
    return chosen


def section_auto(cfg: dict[str, Any], out: dict[str, Any], log: Callable[[str], None],
                 run_point: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Resolves ``auto`` per config, times the candidates one by one, prints measured(chosen) / best measured."""
    log("auto: schedule/microbatches/recompute chosen by measurement + simulation vs every candidate timed ...")
    results = {}
    for name in cfg["auto_configs"]:
        devices = len(_load(name, []).split.cuts) + 1
        base = {"config": name, "threads": [1, 2], "devices": devices}
        resolved = run_point({**base, "kind": "auto_resolve", "refine": cfg.get("auto_refine")})
        set_ = _reduced(resolved["table"], cfg["auto_reduced"].get(name))
        label = "every fitting candidate" if cfg["auto_reduced"].get(name) is None else (
            f"reduced set: the best {cfg['auto_reduced'][name]} predicted + the best predicted of every M")
        second = resolved["runner_up"]
        log(f"  {name}: chose {_key(resolved['schedule'], resolved['microbatches'], resolved['recompute'])} "
            f"(predicted {resolved['predicted_step']:.4f} s; runner-up "
            f"{_key(second['schedule'], second['microbatches'], second['recompute'])} {second['step']:.4f} s) in {resolved['resolve_s']:.0f} s; timing {len(set_)} of "
            f"{len(resolved['table'])} candidates ({label})")
        point = {**base, "kind": "auto_candidates", "steps": cfg["auto_steps"], "rounds": cfg["auto_rounds"],
                 "candidates": [[c["schedule"], c["microbatches"], c["recompute"]] for c in set_]}
        measured = run_point(point)["steps"]
        chosen = _key(resolved["schedule"], resolved["microbatches"], resolved["recompute"])
        best = min(measured, key=measured.get)
        ratio = measured[chosen] / measured[best]
        for c in set_:
            key = _key(c["schedule"], c["microbatches"], c["recompute"])
            log(f"    {key:<28} predicted {c['step']:.4f} s  measured {measured[key]:.4f} s"
                + ("  <- chosen" if key == chosen else "") + ("  <- best measured" if key == best else ""))
        log(f"  {name}: chosen measured {measured[chosen]:.4f} s / best measured {measured[best]:.4f} s ({best}) = "
            f"{ratio:.3f} (target <= 1.05)")
        results[name] = {"choice": chosen, "best_measured": best, "ratio": ratio, "measured": measured,
                         "predicted": {_key(c["schedule"], c["microbatches"], c["recompute"]): c["step"]
                                       for c in set_}, "set": label, "resolved": resolved}
    out["auto"] = results


def _run_point(point: dict[str, Any]) -> dict[str, Any]:
    return bench.run_point(point, module="pipeline.commands.bench_auto")


bench.POINTS.update(auto_resolve=resolve_point, auto_candidates=candidates_point)
bench.FULL.update(FULL)
bench.QUICK.update(QUICK)
bench.SECTION_HOOKS["auto"] = lambda cfg, out, log: section_auto(cfg, out, log, _run_point)

if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    bench.worker(sys.argv[2])
