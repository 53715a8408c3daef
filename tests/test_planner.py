"""Planner: table of schedules x M, cost parsing, stage-cost measurement, stamped real timelines, CLI."""

import json
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline import cli
from pipeline.perf import measure, planner
from pipeline.perf import trace
from pipeline.core import schedule as sched
from pipeline.perf import simulate as sim
from pipeline.core.stage import Stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _costs(m):
    return [sim.StageCost(1.0 / m, 2.0 / m), sim.StageCost(1.0 / m, 2.0 / m)]


def test_plan_table_matches_simulator_and_formula():
    rows = planner.plan_table(_costs, [1, 2, 8])
    assert [(r["schedule"], r["microbatches"]) for r in rows] == [
        ("gpipe", 1), ("gpipe", 2), ("gpipe", 8), ("1f1b", 1), ("1f1b", 2), ("1f1b", 8)]
    for r in rows:
        k, m = 2, r["microbatches"]
        assert r["step"] == pytest.approx((m + k - 1) * 3.0 / m)
        assert r["bubble"] == pytest.approx(sim.gpipe_bubble(k, m))
        assert r["speedup"] == pytest.approx(r["ideal"])  # costs scale exactly with 1/M
        assert r["deadlock"] is None
    assert rows[2]["peak_in_flight"] == [8, 8] and rows[5]["peak_in_flight"] == [2, 1]
    assert "1f1b       8" in planner.format_table(rows)


def test_plan_table_adds_the_step_overhead_to_every_step():
    plain = planner.plan_table(_costs, [1, 4])
    rows = planner.plan_table(_costs, [1, 4], overhead=0.5)
    for row, base in zip(rows, plain):
        assert row["step"] == pytest.approx(base["step"] + 0.5)
        assert row["bubble"] == pytest.approx(base["bubble"])  # idle time of the stage actions only
    # Unsplit baseline 6.0 s + 0.5 s; 1F1B at M=4: 3.75 s + 0.5 s.
    assert rows[3]["speedup"] == pytest.approx(6.5 / 4.25)


def test_cli_overhead_option(tmp_path, capsys):
    assert cli.main(["plan", "--costs", "0.01,0.02", "0.01,0.02", "--microbatches", "4", "--ms", "4",
                     "--overhead", "0.05", "--png", str(tmp_path / "g.png")]) == 0
    assert "1f1b, M=4: predicted step 0.2000 s (stage actions 0.1500 s + overhead 0.0500 s)" in capsys.readouterr().out


def test_parse_costs():
    assert planner.parse_costs(["0.1,0.2", "1,2,0.5"]) == [sim.StageCost(0.1, 0.2), sim.StageCost(1, 2, 0.5)]


@pytest.mark.parametrize("bad", ["0.1", "a,b", "0.1,-2", "1,2,3,4"])
def test_parse_costs_rejects(bad):
    with pytest.raises(ValueError, match=r"--costs entry 0 is .*give FORWARD,BACKWARD seconds"):
        planner.parse_costs([bad])


def test_cli_with_costs_writes_png_and_json(tmp_path, capsys):
    png, out = tmp_path / "g.png", tmp_path / "plan.json"
    code = cli.main(["plan", "--costs", "0.01,0.02", "0.01,0.02", "--microbatches", "4", "--ms", "1,4",
                     "--schedule", "gpipe", "--png", str(png), "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "gpipe, M=4: predicted step 0.1500 s (stage actions 0.1500 s + overhead 0.0000 s), bubble 20.0%" in text
    assert "device 1: |" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    report = json.loads(out.read_text())
    assert report["predicted"]["makespan"] == pytest.approx(0.15)
    assert len(report["rows"]) == 4


def test_cli_needs_config_or_costs(capsys):
    assert cli.main(["plan"]) == 2
    assert "give a CONFIG" in capsys.readouterr().err


def _stages():
    keras.utils.set_random_seed(0)
    a = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu")])
    b = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4)])
    stages = [Stage(a, "/CPU:0", 0, 2), Stage(b, "/CPU:1", 1, 2)]
    for s in stages:
        s.place()
    return stages


def test_measure_stage_costs_per_run_forward_and_backward(monkeypatch):
    """The real loops run; scripted timings of their calls pin what is made of them."""
    calls = []
    scripted = iter([0.4, 1.0, 0.6, 0.5])  # per stage: F loop, then F+B loop (seconds per call of 2 runs)

    def scripted_time(fn, repeats):
        calls.append(repeats)
        measure.wait_for(fn())  # the stage's compiled loop really runs on its device
        return next(scripted)

    monkeypatch.setattr(measure, "median_time", scripted_time)
    costs = measure.measure_stage_costs(_stages(), np.ones((4, 8), np.float32), repeats=2, calls=3)
    assert calls == [3, 3, 3, 3]
    # Per run: forward = F loop / repeats; backward = (F+B loop - F loop) / repeats, never below 0.
    assert costs == [sim.StageCost(pytest.approx(0.2), pytest.approx(0.3)), sim.StageCost(pytest.approx(0.3), 0.0)]


def test_load_runs_the_other_stages_only_inside_the_block():
    calls = []

    def run():
        calls.append(time.perf_counter())
        time.sleep(0.001)

    with measure.StageLoad([run]):
        time.sleep(0.05)
        inside = len(calls)
    after = len(calls)
    time.sleep(0.02)
    assert inside >= 2  # started before the block body, kept running during it
    assert len(calls) == after  # stopped (and joined) when the block ended
    with measure.StageLoad([]):  # one stage: nothing to load, no thread
        pass


@pytest.mark.timeout(60)
def test_load_raises_a_failing_stage_instead_of_hanging():
    def broken():
        raise RuntimeError("stage 1 failed")

    with pytest.raises(RuntimeError, match="stage 1 failed"):
        with measure.StageLoad([broken, lambda: time.sleep(0.001)]):
            pass


@pytest.mark.parametrize("under_load", [True, False])
def test_costs_under_load_time_each_stage_beside_the_others(monkeypatch, under_load):
    loads = []
    real_load = measure.StageLoad

    def recording_load(runs):
        loads.append(len(runs))
        return real_load(runs)

    monkeypatch.setattr(measure, "StageLoad", recording_load)
    x = np.ones((4, 8), np.float32)
    costs = measure.measure_stage_costs(_stages(), x, repeats=2, calls=1, under_load=under_load)
    assert len(costs) == 2
    assert loads == ([1, 1] if under_load else [0, 0])  # K=2: the other stage runs while each is timed


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_profiled_timeline_has_every_action(schedule):
    x = np.random.default_rng(0).normal(size=(8, 8)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
    _, timeline, _ = trace.run_measured(_stages(), x, y, "mse", schedule, 4, steps=2)
    rows = sched.get(schedule)(2, 4)
    # Every action of the schedule was found in the trace, once (op names -> actions).
    assert sorted(str(iv.action) for iv in timeline) == sorted(str(a) for row in rows for a in row)
    # Each device started its actions in its row's order (the executor's control-dependency chain; the trace
    # reader only moves a start to when the other stage's input arrived, never within a stage).
    for s, row in enumerate(rows):
        started = sorted((iv for iv in timeline if iv.action.stage == s), key=lambda iv: iv.start)
        assert [str(iv.action) for iv in started] == [str(a) for a in row], (schedule, s)


def test_op_names_map_to_actions():
    assert trace._action_of("act1F0/sequential/dense/MatMul") == "1F0"
    assert trace._action_of("gradient_tape/act1F0/sequential/dense/MatMul/MatMul_1") == "1B0"
    assert trace._action_of("act0B3/add_2") == "0B3"
    assert trace._action_of("gradient_tape/act2B1/x") == "2B1"
    assert trace._action_of("sequential/dense/MatMul") is None


def test_cli_with_a_config_measures_overhead_costs_and_a_real_timeline(tmp_path, capsys, monkeypatch):
    from pipeline.perf import overhead as overhead_lib

    overheads, measured = [], {}
    real_overhead, real_costs = overhead_lib.measure_step_overhead, measure.measure_stage_costs

    def spy_overhead(model, *args, **kwargs):
        overheads.append((model, real_overhead(model, *args, **kwargs)))
        return overheads[-1][1]

    def spy_costs(stages, x, *args, under_load=True, **kwargs):
        costs = real_costs(stages, x, *args, under_load=under_load, **kwargs)
        assert len(stages) == 2
        measured[(int(x.shape[0]), under_load)] = costs
        return costs

    monkeypatch.setattr(overhead_lib, "measure_step_overhead", spy_overhead)
    monkeypatch.setattr(measure, "measure_stage_costs", spy_costs)
    png, out = tmp_path / "plan.png", tmp_path / "plan.json"
    code = cli.main(["plan", str(CONFIGS / "digits_cnn.yaml"), "--ms", "1,2", "--microbatches", "2", "--measure",
                     "--steps", "1", "--repeats", "1", "--png", str(png), "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "step overhead" in text and "measured stage actions" in text
    report = json.loads(out.read_text())
    # The overhead in the plan is the one measured on the config's pipeline (not a default).
    assert [type(model).__name__ for model, _ in overheads] == ["PipelineModel"]
    assert report["overhead"] == overheads[0][1]
    # Stage costs: M=1 timed one stage at a time, M=2 with the other stage busy; the report shows M=2's.
    assert sorted(measured) == [(16, True), (32, False)]  # digits_cnn: batches of 32, cut into M=1 or 2
    assert report["costs"] == [vars(c) for c in measured[(16, True)]]
    assert report["schedule"] == "1f1b" and report["microbatches"] == 2  # the config's schedule, --microbatches
    assert sorted((r["schedule"], r["microbatches"]) for r in report["rows"]) == [
        ("1f1b", 1), ("1f1b", 2), ("gpipe", 1), ("gpipe", 2)]
    assert sorted(a for a, _, _ in report["measured"]["timeline"]) == sorted(
        str(a) for row in sched.one_f_one_b(2, 2) for a in row)
    assert png.read_bytes()[:4] == b"\x89PNG"
