"""Simulator: GPipe formula, literal timelines, idle time, in-flight peaks, deadlocks, Gantt output."""

import pytest

from pipeline.core import schedule as sched
from pipeline.perf import plot
from pipeline.perf import simulate as sim


@pytest.mark.parametrize("generator", [sched.gpipe, sched.one_f_one_b])
@pytest.mark.parametrize("k,m", [(1, 1), (2, 1), (2, 8), (3, 4), (4, 16), (5, 3)])
def test_uniform_costs_match_gpipe_formula(generator, k, m):
    f, b = 1.0, 2.0
    result = sim.simulate(generator(k, m), [(f, b)] * k)
    assert result.ok
    assert result.makespan == pytest.approx((m + k - 1) * (f + b))
    assert result.bubble == pytest.approx(sim.gpipe_bubble(k, m))
    assert result.busy == pytest.approx([m * (f + b)] * k)
    assert sum(result.idle) == pytest.approx(k * (k - 1) * (f + b))


def test_literal_timeline_gpipe_k2_m2():
    result = sim.simulate(sched.gpipe(2, 2), [(1, 2), (1, 2)])
    got = [(str(iv.action), iv.start, iv.end) for iv in result.timeline]
    assert got == [
        ("0F0", 0, 1),
        ("0F1", 1, 2), ("1F0", 1, 2),
        ("1F1", 2, 3),
        ("1B0", 3, 5),
        ("0B0", 5, 7), ("1B1", 5, 7),
        ("0B1", 7, 9),
    ]
    assert result.makespan == 9
    assert result.idle == [3, 3]


def test_literal_table_with_uneven_costs_and_transfer():
    table = sched.parse_table(["0F0 0F1 0B0 0B1", "1F0 1B0 1F1 1B1"])
    result = sim.simulate(table, [(1, 1), (2, 3)], transfer=0.5)
    ends = {str(iv.action): iv.end for iv in result.timeline}
    # 1F0 starts at 1 + 0.5; 1B0 right after; 0B0 waits for 1B0 + 0.5.
    assert ends["1F0"] == 3.5
    assert ends["1B0"] == 6.5
    assert ends["1F1"] == 8.5
    assert ends["0B0"] == 8.0
    assert ends["1B1"] == 11.5
    assert ends["0B1"] == 13.0
    assert result.makespan == 13.0


def test_peak_in_flight_1f1b_bounded_gpipe_grows():
    assert sim.simulate(sched.one_f_one_b(4, 32), [(1, 2)] * 4).peak_in_flight == [4, 3, 2, 1]
    assert sim.simulate(sched.gpipe(4, 32), [(1, 2)] * 4).peak_in_flight == [32] * 4


def test_split_backward_costs_and_release_at_w():
    table = sched.parse_table(["0F0 0F1 0B0 0W0 0B1 0W1", "1F0 1F1 1B0 1W0 1B1 1W1"])
    costs = [sim.StageCost(1, 4, weight=1), sim.StageCost(1, 4)]
    result = sim.simulate(table, costs)
    durations = {str(iv.action): iv.duration for iv in result.timeline}
    assert durations["0B0"] == 3 and durations["0W0"] == 1
    assert durations["1B0"] == 2 and durations["1W0"] == 2
    assert result.peak_in_flight == [2, 2]


def test_deadlock_is_reported_not_raised():
    table = sched.parse_table(["0B0 0F0", "1F0 1B0"])
    result = sim.simulate(table, [(1, 1), (1, 1)])
    assert not result.ok
    assert [str(a) for a in result.blocked] == ["0B0", "1F0"]
    assert "0B0 waits for 1B0" in result.deadlock
    assert "1F0 waits for 0F0" in result.deadlock


def test_callable_costs_and_mapping_costs():
    table = sched.gpipe(2, 2)
    by_callable = sim.simulate(table, lambda a: 1.0 if a.op is sched.F else 2.0)
    by_mapping = sim.simulate(table, [{"forward": 1, "backward": 2}] * 2)
    assert by_callable.makespan == by_mapping.makespan == 9


def test_wrong_number_of_costs():
    with pytest.raises(ValueError, match=r"costs for 1 stage\(s\) but the schedule has 2"):
        sim.simulate(sched.gpipe(2, 2), [(1, 2)])


def test_bad_cost_shape():
    with pytest.raises(ValueError, match=r"give \(forward, backward\)"):
        sim.simulate(sched.gpipe(1, 1), [(1,)])


def test_negative_cost():
    with pytest.raises(ValueError, match="negative"):
        sim.simulate(sched.gpipe(1, 1), [(1, -2)])


def test_ideal_speedup():
    assert sim.ideal_speedup(2, 8) == pytest.approx(16 / 9)
    assert sim.ideal_speedup(1, 5) == 1


def test_ascii_and_png_gantt(tmp_path):
    result = sim.simulate(sched.one_f_one_b(2, 4), [(1, 2)] * 2)
    text = sim.ascii_gantt(result.timeline, 2, width=60)
    assert text.splitlines()[0].startswith("device 0: |F0")
    assert "B3" in text.splitlines()[1]
    path = plot.gantt(str(tmp_path / "g.png"), [("predicted", result.timeline), ("measured", result.timeline)],
                     2, title="t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_module_docstring_diagram():
    result = sim.simulate(sched.gpipe(2, 4), [(1, 2)] * 2)
    starts = {str(iv.action): iv.start for iv in result.timeline}
    assert [starts[f"0B{j}"] for j in range(4)] == [7, 9, 11, 13]
    assert [starts[f"1B{j}"] for j in range(4)] == [5, 7, 9, 11]
    assert result.makespan == 15 and result.bubble == pytest.approx(1 / 5)


def test_shared_compute_literal_timeline_gpipe_k2_m2():
    # Alone F=1, B=2; with the other device busy, twice that. 0F1 and 1F0 run together at half speed.
    result = sim.simulate(sched.gpipe(2, 2), [(2, 4), (2, 4)], alone=[(1, 2), (1, 2)])
    got = [(str(iv.action), iv.start, iv.end) for iv in result.timeline]
    assert got == [
        ("0F0", 0, 1),
        ("0F1", 1, 3), ("1F0", 1, 3),
        ("1F1", 3, 4),
        ("1B0", 4, 6),
        ("0B0", 6, 10), ("1B1", 6, 10),
        ("0B1", 10, 12),
    ]
    assert result.busy == [9, 9]


def test_shared_compute_changes_speed_when_the_other_device_starts_or_stops():
    table = sched.parse_table(["0F0 0F1 0B1 0B0", "1F0 1B0 1F1 1B1"])
    result = sim.simulate(table, [(8, 8), (1, 1)], alone=[(4, 4), (1, 1)])
    ends = {str(iv.action): iv.end for iv in result.timeline}
    assert ends["0F0"] == 4
    # 0F1 runs from 4: at 1/8 of its work per unit while 1F0 (4-5) and 1B0 (5-6) run, then alone at 1/4.
    assert ends["1F0"] == 5 and ends["1B0"] == 6
    assert ends["0F1"] == pytest.approx(6 + (1 - 2 / 8) * 4)


@pytest.mark.parametrize("name,k,devices", [("gpipe", 3, None), ("1f1b", 4, None), ("zb_h1", 3, None),
                                            ("interleaved_1f1b", 4, 2)])
def test_shared_compute_with_equal_costs_is_the_plain_simulation(name, k, devices):
    rows = sched.get(name)(k, 5, devices) if devices else sched.get(name)(k, 5)
    costs = [sim.StageCost(0.3 + 0.1 * i, 0.7 + 0.2 * (i % 2), 0.2) for i in range(k)]
    plain = sim.simulate(rows, costs, transfer=0.05)
    shared = sim.simulate(rows, costs, transfer=0.05, alone=costs)
    assert [(iv.action, iv.row) for iv in shared.timeline] == [(iv.action, iv.row) for iv in plain.timeline]
    assert [iv.start for iv in shared.timeline] == pytest.approx([iv.start for iv in plain.timeline])
    assert shared.makespan == pytest.approx(plain.makespan)
    assert shared.busy == pytest.approx(plain.busy)
    # Loaded costs twice the alone ones: strictly between the all-alone figure and the all-loaded one.
    doubled = [sim.StageCost(2 * c.forward, 2 * c.backward, 2 * c.weight) for c in costs]
    both = sim.simulate(rows, doubled, alone=costs).makespan
    assert plain.makespan < both < sim.simulate(rows, doubled).makespan


def test_shared_compute_deadlock_is_reported_not_raised():
    table = sched.parse_table(["0F0 0B0", "1B0 1F0"])  # 1B0 before its own forward: never runs
    result = sim.simulate(table, [(1, 1), (1, 1)], alone=[(1, 1), (1, 1)])
    assert not result.ok and result.blocked
