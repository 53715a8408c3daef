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
from pipeline.errors import SettingError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _costs(m):
    return [sim.StageCost(1.0 / m, 2.0 / m), sim.StageCost(1.0 / m, 2.0 / m)]


def _half_costs(m):
    """The same model as :func:`_costs` cut into 4 stages of half the cost."""
    return [sim.StageCost(0.5 / m, 1.0 / m)] * 4


def test_plan_table_models_devices_that_share_compute():
    """With alone costs, every M > 1 row is the shared-cores simulation; M=1 (timed alone) and equal costs are not
    changed by it, and alone costs half the loaded ones shorten every M > 1 step."""
    ms = [1, 2, 8]
    plain = planner.plan_table(_costs, ms)
    assert planner.plan_table(_costs, ms, alone_for=_costs) == plain

    def alone(m):
        return [sim.StageCost(c.forward / 2, c.backward / 2) for c in _costs(m)]

    shared = planner.plan_table(_costs, ms, alone_for=alone)
    assert [(r["schedule"], r["microbatches"]) for r in shared] == [(r["schedule"], r["microbatches"]) for r in plain]
    for row, base in zip(shared, plain):
        m = row["microbatches"]
        layout, costs = planner.placed(row["schedule"], _costs(m), m)
        if m == 1:
            assert row == base
            continue
        expected = sim.simulate(layout, costs, alone=planner.placed(row["schedule"], alone(m), m)[1]).makespan
        assert row["step"] == pytest.approx(expected, rel=1e-12)
        assert row["step"] < base["step"] - 1e-9


def test_plan_table_matches_simulator_and_formula():
    """K=2 on 2 devices, f=1, b=2 per device and step: gpipe/1f1b (M+K-1)(f+b); zb_h1 (B and W halves of 1 unit)
    M(f+b) + (K-1)(f+b-2w) for M >= K; interleaved left out (it is 1f1b with one stage per device)."""
    rows = planner.plan_table(_costs, [1, 2, 8])
    assert [(r["schedule"], r["microbatches"]) for r in rows] == [
        ("gpipe", 1), ("gpipe", 2), ("gpipe", 8), ("1f1b", 1), ("1f1b", 2), ("1f1b", 8),
        ("zb_h1", 1), ("zb_h1", 2), ("zb_h1", 8)]
    zb_step = {1: 5.0, 2: 3.5, 8: 3.125}  # M=1: F0 F0 B0 B0 W0 in a chain; M >= 2: 3 + 1/M
    for r in rows:
        k, m = 2, r["microbatches"]
        step = zb_step[m] if r["schedule"] == "zb_h1" else (m + k - 1) * 3.0 / m
        assert (r["stages"], r["devices"]) == (2, 2)
        assert r["step"] == pytest.approx(step)
        assert r["bubble"] == pytest.approx(1 - 3.0 / step)  # each device busy 3 units
        assert r["speedup"] == pytest.approx(6.0 / step)
        assert r["speedup"] == pytest.approx(r["ideal"])  # balanced stages, costs scale exactly with 1/M
        assert r["weight_assumed"] is (r["schedule"] == "zb_h1")
        assert r["deadlock"] is None
        if r["schedule"] != "zb_h1":
            assert r["ideal"] == pytest.approx(sim.ideal_speedup(k, m))
            assert r["bubble"] == pytest.approx(sim.gpipe_bubble(k, m))
        elif m > 1:
            assert r["ideal"] > sim.ideal_speedup(k, m)  # 1F1B's formula is no bound for zb_h1
    assert rows[2]["peak_in_flight"] == [8, 8] and rows[5]["peak_in_flight"] == [2, 1]
    assert rows[8]["peak_in_flight"] == [2, 2]  # alive until W: min(K, M) on every stage
    names, notes = planner.schedules_for(2, None)
    assert names == ["gpipe", "1f1b", "zb_h1"] and "interleaved_1f1b: left out, K=2 stages on 2 devices" in notes[0]
    text = planner.format_table(rows, notes)
    assert "1f1b       2/2   8     3.3750   11.1%     1.78   1.78  [2, 1]" in text
    assert "zb_h1      2/2   8     3.1250    4.0%     1.92   1.92  [2, 2]" in text
    assert planner.W_NOTE in text and planner.IDEAL_NOTE in text and notes[0] in text


def test_plan_table_on_fewer_devices_than_stages_interleaves():
    """4 stages of half the cost on D=2 devices: interleaved (V=2) idles (D-1)(f+b)/V, 1F1B's half; the other
    schedules run 2 merged stages, i.e. the table of test_plan_table_matches_simulator_and_formula."""
    rows = planner.plan_table(_half_costs, [1, 2, 4, 8], num_devices=2)
    merged = planner.plan_table(_costs, [1, 2, 4, 8])
    by = {(r["schedule"], r["microbatches"]): r for r in rows}
    assert sorted({r["schedule"] for r in rows}) == ["1f1b", "gpipe", "interleaved_1f1b", "zb_h1"]
    for r in merged:
        same = by[(r["schedule"], r["microbatches"])]
        keys = ("stages", "devices", "step", "bubble", "speedup", "ideal", "weight_assumed")
        assert {k: same[k] for k in keys} == pytest.approx({k: r[k] for k in keys})
        assert same["peak_in_flight"] == r["peak_in_flight"]
    for m in (1, 2, 4, 8):
        r = by[("interleaved_1f1b", m)]
        step = 6.0 if m == 1 else 3.0 + 1.5 / m  # M(f+b) + (D-1)(f+b)/V per device for M >= D
        assert (r["stages"], r["devices"]) == (4, 2)
        assert r["step"] == pytest.approx(step) and r["speedup"] == pytest.approx(6.0 / step)
        assert r["ideal"] == pytest.approx(r["speedup"]) and r["weight_assumed"] is False
        if m > 1:
            assert r["step"] < by[("1f1b", m)]["step"]
    assert by[("interleaved_1f1b", 4)]["peak_in_flight"] == [5, 3]
    assert planner.schedules_for(4, 2) == (["gpipe", "1f1b", "interleaved_1f1b", "zb_h1"], [
        "gpipe, 1f1b, zb_h1: one stage per device, so the model cut into 2 stages (2 consecutive stages' costs "
        "summed per device)"])
    assert planner.merge_stages([sim.StageCost(1, 2), sim.StageCost(3, 4, 1), sim.StageCost(5, 6)] * 2, 3) == [
        sim.StageCost(4, 6, 2), sim.StageCost(6, 8, None), sim.StageCost(8, 10, 4)]  # W: known or half of B, or None
    assert "interleaved_1f1b   4/2   8     3.1875" in planner.format_table(rows)


def test_plan_table_uses_given_weight_costs_and_an_ideal_of_balanced_stages():
    given = planner.plan_table(lambda m: [sim.StageCost(1.0 / m, 2.0 / m, 0.5 / m)] * 2, [4], ["zb-h1"])
    # f=1, b'=1.5, w=0.5 per device at M=4 (x1/4): 3 + (K-1)(f+b'-w)/M = 3.5
    assert [(r["schedule"], r["step"], r["weight_assumed"]) for r in given] == [("zb_h1", pytest.approx(3.5), False)]
    assert planner.W_NOTE not in planner.format_table(given)
    # Unbalanced stages (stage 1 twice stage 0): the ideal stays the balanced one, the speedup falls below it.
    rows = planner.plan_table(lambda m: [sim.StageCost(1.0 / m, 1.0 / m), sim.StageCost(2.0 / m, 2.0 / m)],
                              [4], ["gpipe", "zb_h1"])
    gpipe, zb = rows
    # Stage 1 (F and B of 0.5 each) runs 4.0 in a row, after stage 0's first F (0.25), before its last B (0.25).
    assert gpipe["step"] == pytest.approx(4.5) and gpipe["speedup"] == pytest.approx(6.0 / 4.5)
    assert gpipe["ideal"] == pytest.approx(sim.ideal_speedup(2, 4))
    balanced = planner.plan_table(lambda m: [sim.StageCost(1.5 / m, 1.5 / m)] * 2, [4], ["zb_h1"])[0]
    assert zb["ideal"] == pytest.approx(balanced["speedup"]) and zb["speedup"] < zb["ideal"]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_devices": 3}, r"num_devices \(--devices\) is 3 for 4 stage\(s\); give a divisor"),
    ({"num_devices": 8}, r"num_devices \(--devices\) is 8 for 4 stage\(s\)"),
    ({"num_devices": 0}, r"num_devices must be an integer >= 1, got 0"),
    ({"schedules": ["1f1b", "pipedream"]}, r"unknown schedule 'pipedream'; known schedules"),
])
def test_plan_table_rejects_bad_devices_and_schedules_before_simulating(kwargs, match):
    calls = []

    def costs_for(m):
        calls.append(m)
        return _half_costs(m)

    with pytest.raises(SettingError, match=match):
        planner.plan_table(costs_for, [1, 2], **kwargs)
    assert calls == [1]  # only the stage count was read
    with pytest.raises(SettingError, match="WEIGHT 3.0 exceeds BACKWARD 2.0"):
        planner.parse_costs(["1,2,3"])


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
    assert [(r["schedule"], r["microbatches"]) for r in report["rows"]] == [
        ("gpipe", 1), ("gpipe", 4), ("1f1b", 1), ("1f1b", 4), ("zb_h1", 1), ("zb_h1", 4)]
    assert "interleaved_1f1b: left out, K=2 stages on 2 devices is 1f1b" in text


@pytest.mark.parametrize("alias, name, step", [("interleaved", "interleaved_1f1b", 0.27), ("ZB-H1", "zb_h1", 0.26)])
def test_cli_accepts_schedule_aliases_and_fewer_devices(tmp_path, capsys, alias, name, step):
    """4 stages of (0.01, 0.02) s on 2 devices at M=4: interleaved 4(f+b) + (D-1)(f+b)/V with f+b=0.06 per device;
    zb_h1 on 2 merged stages (f=0.02, B and W halves of 0.02): 4(0.06) + (0.02+0.02-0.02)."""
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--costs", *["0.01,0.02"] * 4, "--devices", "2", "--microbatches", "4", "--ms", "4",
                     "--schedule", alias, "--png", str(tmp_path / "g.png"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["schedule"] == name and [r["schedule"] for r in report["rows"]] == list(sched.NAMES)
    row = next(r for r in report["rows"] if r["schedule"] == name)
    assert row["step"] == pytest.approx(step)
    # The chosen plan is the table's row: interleaved places the 4 stages on 2 devices, zb_h1 runs 2 merged stages.
    rows = [0, 1, 0, 1] if name == "interleaved_1f1b" else [0, 1]
    assert report["predicted"]["makespan"] == pytest.approx(step) and report["predicted"]["stage_rows"] == rows
    assert f"{name}, M=4: predicted step {step:.4f} s" in text
    assert "gpipe, 1f1b, zb_h1: one stage per device, so the model cut into 2 stages" in text


def test_cli_rejects_an_unknown_schedule_and_bad_devices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["plan", "--costs", "0.01,0.02", "0.01,0.02", "--schedule", "pipedream"])
    assert "argument --schedule: unknown schedule 'pipedream'; known schedules: 1f1b, gpipe" in capsys.readouterr().err
    assert cli.main(["plan", "--costs", *["0.01,0.02"] * 3, "--devices", "2", "--png", str(tmp_path / "g.png")]) == 2
    assert "num_devices (--devices) is 2 for 3 stage(s); give a divisor" in capsys.readouterr().err


def test_cli_needs_config_or_costs(capsys):
    assert cli.main(["plan"]) == 2
    assert "give a CONFIG" in capsys.readouterr().err


def _stages(first_layers=1):
    keras.utils.set_random_seed(0)
    a = keras.Sequential([keras.Input((8,))] + [keras.layers.Dense(16, activation="relu")
                                                for _ in range(first_layers)])
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
        deadline = time.monotonic() + 10  # polled, not a fixed sleep: a loaded machine may not run it for a while
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
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


def test_timing_loops_do_not_warn_of_retracing_but_user_functions_still_do():
    import logging

    import tensorflow as tf

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    tf.get_logger().addHandler(handler)
    try:
        x = np.ones((4, 8), np.float32)
        for _ in range(4):  # every call builds new loops of the same code: TensorFlow's heuristic counts retraces
            measure.measure_stage_costs(_stages(), x, repeats=1, calls=1, under_load=False)
        assert not [r for r in records if "retracing" in r]
        for size in range(1, 8):  # a user's function of changing shapes still gets TensorFlow's warning
            tf.function(lambda t: t * 2.0)(tf.ones((size,)))
        assert [r for r in records if "triggered tf.function retracing" in r]
    finally:
        tf.get_logger().removeHandler(handler)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb_h1"])
def test_profiled_timeline_has_every_action(schedule):
    x = np.random.default_rng(0).normal(size=(8, 8)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
    # Two layers in the first stage: with one, its input gradient B (ZB-H1) would have no op of its own.
    _, timeline, _ = trace.run_measured(_stages(first_layers=2), x, y, "mse", schedule, 4, steps=2)
    rows = sched.get(schedule)(2, 4)
    # Every action of the schedule was found in the trace, once (op names -> actions).
    assert sorted(str(iv.action) for iv in timeline) == sorted(str(a) for row in rows for a in row)
    # Each device finished its actions in its row's order (the executor's control-dependency chain: an action's
    # ops wait until the previous action's outputs exist). Ends, not starts: a few tiny ops that need only the
    # labels (a cast, an index offset of the loss gradient) may run before the action's turn.
    for s, row in enumerate(rows):
        finished = sorted((iv for iv in timeline if iv.action.stage == s), key=lambda iv: iv.end)
        assert [str(iv.action) for iv in finished] == [str(a) for a in row], (schedule, s)
        # ... and an action's interval starts once the one before it on the device has ended: the early ops
        # (the micro-batch's slice of the input, ran at once for every F of ZB-H1) do not stretch it back.
        for previous, action in zip(finished, finished[1:]):
            assert action.start >= previous.end, (schedule, str(previous.action), str(action.action))


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
    # Two logical CPU devices share the cores: M=2 is also timed alone, for the shared-cores simulation.
    assert sorted(measured) == [(16, False), (16, True), (32, False)]  # digits_cnn: batches of 32, M=1 or 2
    assert report["costs"] == [vars(c) for c in measured[(16, True)]]
    assert report["alone_costs"] == [vars(c) for c in measured[(16, False)]]
    assert "share this machine's cores" in text
    shared = sim.simulate(sched.one_f_one_b(2, 2), measured[(16, True)], alone=measured[(16, False)])
    assert report["predicted"] == json.loads(json.dumps(shared.summary()))
    assert report["schedule"] == "1f1b" and report["microbatches"] == 2  # the config's schedule, --microbatches
    assert sorted((r["schedule"], r["microbatches"]) for r in report["rows"]) == [
        ("1f1b", 1), ("1f1b", 2), ("gpipe", 1), ("gpipe", 2), ("zb_h1", 1), ("zb_h1", 2)]  # 2 stages, 2 devices
    assert sorted(a for a, _, _ in report["measured"]["timeline"]) == sorted(
        str(a) for row in sched.one_f_one_b(2, 2) for a in row)
    assert png.read_bytes()[:4] == b"\x89PNG"
