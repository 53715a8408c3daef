"""Simulator with one clock per device: interleaved 1F1B and ZB-H1 against the 1F1B formulas, Gantt rows per device."""

import json

import pytest

from pipeline import cli
from pipeline.core import schedule as sched
from pipeline.perf import plot
from pipeline.perf import simulate as sim

F_COST, B_COST = 1.0, 2.0


def test_interleaved_v2_halves_the_1f1b_idle_time():
    for d in (2, 3, 4):
        for m in (d, 2 * d, 4 * d):
            one = sim.simulate(sched.one_f_one_b(d, m), [(F_COST, B_COST)] * d)
            assert one.makespan == pytest.approx((m + d - 1) * (F_COST + B_COST))
            # The same layers cut in 2D stages, two per device: each stage costs half.
            inter = sim.simulate(sched.interleaved_1f1b(2 * d, m, num_devices=d), [(F_COST / 2, B_COST / 2)] * (2 * d))
            assert inter.ok and inter.num_devices == d and inter.num_stages == 2 * d
            assert inter.stage_rows == [s % d for s in range(2 * d)]
            assert inter.busy == pytest.approx([m * (F_COST + B_COST)] * d)
            assert inter.makespan == pytest.approx(m * (F_COST + B_COST) + (d - 1) * (F_COST + B_COST) / 2)
            assert inter.idle == pytest.approx([i / 2 for i in one.idle])
            # The bubble fraction (idle over device-time): (D-1)/(2M+D-1) against 1F1B's (D-1)/(M+D-1).
            assert inter.bubble == pytest.approx((d - 1) / (2 * m + d - 1))
            assert inter.bubble / one.bubble == pytest.approx((m + d - 1) / (2 * m + d - 1))  # -> 1/2 as M grows


def test_interleaved_v3_divides_the_idle_time_by_three():
    d, v, m = 2, 3, 8
    one = sim.simulate(sched.one_f_one_b(d, m), [(F_COST, B_COST)] * d)
    inter = sim.simulate(sched.interleaved_1f1b(d * v, m, num_devices=d), [(F_COST / v, B_COST / v)] * (d * v))
    assert inter.idle == pytest.approx([i / v for i in one.idle])


def test_zb_h1_with_equal_f_b_w_has_a_third_of_the_1f1b_bubble():
    for k in (2, 3, 4, 6):
        for m in (k, 2 * k, 16):
            one = sim.simulate(sched.one_f_one_b(k, m), [sim.StageCost(1, 2)] * k)
            zb = sim.simulate(sched.zb_h1(k, m), [sim.StageCost(1, 2, weight=1)] * k)  # F = B = W = 1
            assert zb.ok
            assert one.makespan == 3 * (m + k - 1)
            assert zb.makespan == 3 * m + (k - 1)
            assert zb.idle == pytest.approx([i / 3 for i in one.idle])
            assert zb.makespan < one.makespan
            assert zb.peak_in_flight == [min(k, m)] * k
            assert max(zb.peak_in_flight) == max(one.peak_in_flight)


@pytest.mark.parametrize("f,b,w", [(1, 3, 1), (2, 3, 1), (1, 2, 0.5), (1, 2, 1)])
def test_zb_h1_makespan_formula(f, b, w):
    # f: forward, b: full backward, w: its weight half (B costs b - w); docstring formula with B = b - w.
    for k in (2, 3, 4):
        m = 2 * k
        zb = sim.simulate(sched.zb_h1(k, m), [sim.StageCost(f, b, w)] * k)
        assert zb.makespan == pytest.approx(m * (f + b) + (k - 1) * (f + (b - w) - w))


def test_transfer_only_between_devices():
    # All three stages on one device: no copies, the device never idles.
    one_device = sim.simulate(sched.interleaved_1f1b(3, 2, num_devices=1), [(1, 2)] * 3, transfer=5.0)
    assert one_device.busy == [18.0] and one_device.makespan == 18.0 and one_device.idle == [0.0]
    two = sim.simulate(sched.interleaved_1f1b(4, 2, num_devices=2), [(1, 2)] * 4, transfer=0.5)
    starts = {str(iv.action): iv.start for iv in two.timeline}
    assert starts["1F0"] == 1.5 and starts["2F0"] >= 3.0  # 0F0 -> 1F0 and 1F0 -> 2F0 each cross devices


def test_device_rows_in_timeline_summary_and_gantt(tmp_path):
    result = sim.simulate(sched.interleaved_1f1b(4, 2, num_devices=2), [(1, 2)] * 4)
    assert {(str(iv.action), iv.row) for iv in result.timeline} >= {("2F0", 0), ("3B1", 1), ("0B1", 0)}
    assert result.summary()["stage_rows"] == [0, 1, 0, 1]
    assert len(result.busy) == 2 and len(result.peak_in_flight) == 2
    text = sim.ascii_gantt(result.timeline, 2, width=60)
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("device 0: |F0") and lines[1].startswith("device 1: |")
    assert "=" in lines[1]  # stage 3's bars (odd stages) are filled with '='
    path = plot.gantt(str(tmp_path / "i.png"), [("predicted", result.timeline)], 2, title="interleaved")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_measured_intervals_without_device_use_the_stage_row():
    iv = sim.Interval(sched.Action(1, sched.F, 0), 0.0, 1.0)
    assert iv.row == 1 and sim.Interval(iv.action, 0.0, 1.0, 0).row == 0


def test_deadlock_between_devices_is_reported_not_raised():
    table = sched.parse_table(["2F0 0F0 2B0 0B0", "1F0 1B0"])
    result = sim.simulate(table, [(1, 1)] * 3)
    assert not result.ok and result.blocked == [sched.Action(2, sched.F, 0), sched.Action(1, sched.F, 0)]
    assert "device 0 at 2F0 waits for 1F0" in result.deadlock


def test_costs_are_per_stage_not_per_device():
    with pytest.raises(ValueError, match=r"costs for 2 stage\(s\) but the schedule has 4"):
        sim.simulate(sched.interleaved_1f1b(4, 2, num_devices=2), [(1, 2)] * 2)


def test_schedule_gallery_draws_every_schedule_on_the_same_devices(tmp_path):
    charts = plot.schedule_gallery(str(tmp_path))
    assert list(charts) == list(sched.NAMES)
    for path, _ in charts.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    figures = {name: (r.makespan, r.idle, r.peak_in_flight) for name, (_, r) in charts.items()}
    # K=2 devices, M=4, F=1 and B=2 per micro-batch and device (the table in docs/performance.md).
    assert figures == {
        "gpipe": (15.0, [3.0, 3.0], [4, 4]),
        "1f1b": (15.0, [3.0, 3.0], [2, 1]),
        "interleaved_1f1b": (13.5, [1.5, 1.5], [5, 3]),
        "zb_h1": (13.0, [1.0, 1.0], [2, 2]),
    }


def test_interleaved_reaches_the_divided_bubble_for_every_m_from_d():
    # Uniform stages, M not a multiple of D included: idle per device (D-1)(f+b)/V, never more than 1F1B's.
    for d in (2, 3, 4):
        for v in (2, 3):
            for m in range(1, 3 * d + 2):
                inter = sim.simulate(sched.interleaved_1f1b(d * v, m, num_devices=d),
                                     [(F_COST / v, B_COST / v)] * (d * v))
                one = sim.simulate(sched.one_f_one_b(d, m), [(F_COST, B_COST)] * d)
                assert inter.makespan <= one.makespan + 1e-9
                if m >= d:
                    assert inter.makespan == pytest.approx(m * 3 + (d - 1) * 3 / v)


def test_plan_cli_draws_interleaved_on_fewer_devices(tmp_path, capsys):
    png, report = tmp_path / "il.png", tmp_path / "il.json"
    assert cli.main(["plan", "--costs", *["0.005,0.01"] * 4, "--microbatches", "4", "--ms", "4",
                     "--schedule", "interleaved_1f1b", "--devices", "2", "--png", str(png),
                     "--json", str(report)]) == 0
    out = capsys.readouterr().out
    # 4 stages of (5, 10) ms on 2 devices, M=4: 4 * 30 ms + (2-1) * 30 ms / 2 = 135 ms.
    assert "interleaved_1f1b, M=4: predicted step 0.1350 s" in out
    gantt = [line for line in out.splitlines() if line.startswith("device ")]
    assert len(gantt) == 2 and "f0=" in gantt[0]  # device 0's second stage (stage 2) drawn lowercase
    predicted = json.loads(report.read_text())["predicted"]
    assert predicted["stage_rows"] == [0, 1, 0, 1] and predicted["peak_in_flight"] == [5, 3]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 1F1B runs one stage per device: on 2 devices the plan is for the model cut into 2 stages of (10, 20) ms,
    # (M + K - 1) * 30 ms = 150 ms, and says so.
    assert cli.main(["plan", "--costs", *["0.005,0.01"] * 4, "--microbatches", "4", "--schedule", "1f1b",
                     "--devices", "2", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "1f1b, M=4: predicted step 0.1500 s" in out
    assert "one stage per device, so the model cut into 2 stages" in out
