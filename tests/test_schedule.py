"""Schedules as literal tables in device rows, validation messages, in-flight bounds, generators and names."""

import pytest

from pipeline.core import schedule as sched
from pipeline.core.schedule import Action, B, F, W
from pipeline.errors import ScheduleError, SettingError


def rows(schedule):
    return [" ".join(map(str, row)) for row in schedule]


def assert_complete(schedule, num_stages, m):
    """Pure-Python check: every stage runs F and B once per micro-batch, W once per micro-batch iff split."""
    placed = sched.stage_rows(schedule)
    assert len(placed) == num_stages
    for s in range(num_stages):
        actions = [a for row in schedule for a in row if a.stage == s]
        assert all(a in schedule[placed[s]] for a in actions)
        ops = (F, B, W) if sched.uses_weight_split(schedule, s) else (F, B)
        assert sorted(actions) == sorted(Action(s, op, j) for op in ops for j in range(m)), (s, actions)


def test_action_prints_and_parses():
    action = Action(1, F, 0)
    assert str(action) == "1F0"
    assert Action.parse("1F0") == action
    assert Action.parse("12B7") == Action(12, B, 7)
    with pytest.raises(ValueError, match=r"cannot parse action 'X1'.*<stage><F\|B\|W><microbatch>"):
        Action.parse("X1")


def test_gpipe_table():
    assert rows(sched.gpipe(2, 3)) == [
        "0F0 0F1 0F2 0B0 0B1 0B2",
        "1F0 1F1 1F2 1B0 1B1 1B2",
    ]


def test_one_f_one_b_table():
    assert rows(sched.one_f_one_b(3, 4)) == [
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",
        "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3",
        "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3",
    ]


def test_one_f_one_b_fewer_microbatches_than_stages():
    assert rows(sched.one_f_one_b(4, 2)) == [
        "0F0 0F1 0B0 0B1",
        "1F0 1F1 1B0 1B1",
        "2F0 2F1 2B0 2B1",
        "3F0 3B0 3F1 3B1",
    ]


def test_interleaved_table_two_devices_four_stages():
    # Megatron's order: groups of D=2 micro-batches through chunk 0 (stages 0, 1), then chunk 1 (2, 3).
    schedule = sched.interleaved_1f1b(4, 4, num_devices=2)
    assert rows(schedule) == [
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
    ]
    assert sched.stage_rows(schedule) == [0, 1, 0, 1]
    assert sched.peak_in_flight(schedule) == [5, 3]
    assert sched.stage_peak_in_flight(schedule) == [4, 3, 2, 1]
    assert sched.split_stages(schedule) == [False] * 4


def test_zb_h1_table():
    # Stage i runs W of micro-batch j right after B of j+i; the rest at the end.
    schedule = sched.zb_h1(3, 4)
    assert rows(schedule) == [
        "0F0 0F1 0F2 0B0 0W0 0F3 0B1 0W1 0B2 0W2 0B3 0W3",
        "1F0 1F1 1B0 1F2 1B1 1W0 1F3 1B2 1W1 1B3 1W2 1W3",
        "2F0 2B0 2F1 2B1 2F2 2B2 2W0 2F3 2B3 2W1 2W2 2W3",
    ]
    assert sched.split_stages(schedule) == [True, True, True]
    assert sched.uses_weight_split(schedule, 1) and not sched.uses_weight_split(sched.one_f_one_b(3, 4), 1)


def test_every_generator_is_complete_valid_and_bounded():
    checked = 0
    for k in (1, 2, 3, 4, 6):
        for m in (1, 2, 3, 4, 5, 8, 16):
            for name in ("gpipe", "1f1b", "zb_h1", "interleaved_1f1b"):
                schedule = sched.get(name)(k, m)
                assert schedule == sched.get(name)(k, m, k)  # one device per stage: the same
                sched.validate(schedule, m)
                assert_complete(schedule, k, m)
                assert sched.stage_rows(schedule) == list(range(k))
                assert len(list(sched.execution_order(schedule))) == (3 if name == "zb_h1" else 2) * k * m
                checked += 1
            assert sched.peak_in_flight(sched.one_f_one_b(k, m)) == [min(k - i, m) for i in range(k)]
            assert sched.peak_in_flight(sched.gpipe(k, m)) == [m] * k
            # ZB-H1: 1F1B's stage-0 peak min(K, M), now on every stage (stage i holds i more than 1F1B).
            assert sched.peak_in_flight(sched.zb_h1(k, m)) == [min(k, m)] * k
            assert sched.interleaved_1f1b(k, m) == sched.one_f_one_b(k, m)
    assert checked == 5 * 7 * 4


def test_interleaved_valid_for_many_devices_chunks_and_microbatches():
    checked = 0
    for d in (1, 2, 3, 4, 5):
        for v in (1, 2, 3, 4):
            for m in range(1, 4 * d + 2):
                schedule = sched.interleaved_1f1b(d * v, m, num_devices=d)
                assert len(schedule) == d
                sched.validate(schedule, m)
                assert_complete(schedule, d * v, m)
                assert sched.stage_rows(schedule) == [s % d for s in range(d * v)]
                # Groups of floor(M/D) as equal as possible, larger first; G the first one's size.
                g = m if m < d else -(-m // (m // d))
                warmup = [min(m * v, 2 * (d - 1 - r) + (v - 1) * g + 1) for r in range(d)]
                assert sched.peak_in_flight(schedule) == (warmup if v > 1 else [min(d - r, m) for r in range(d)])
                inference = sched.forward_only(d * v, m, num_devices=d)
                sched.validate(inference, m)
                assert sched.stage_rows(inference) == [s % d for s in range(d * v)]
                checked += 1
    assert checked == 4 * sum(4 * d + 1 for d in (1, 2, 3, 4, 5))


def test_interleaved_groups_when_d_does_not_divide_m():
    # M=5 on D=2 devices: groups of 3 and 2 micro-batches, each through chunk 0 then chunk 1.
    # Warm-up on device 0: 2(D-1) + (V-1)*3 = 5 forwards, then 1F1B.
    assert rows(sched.interleaved_1f1b(4, 5, num_devices=2)) == [
        "0F0 0F1 0F2 2F0 2F1 2F2 2B0 0F3 2B1 0F4 2B2 2F3 0B0 2F4 0B1 0B2 2B3 2B4 0B3 0B4",
        "1F0 1F1 1F2 3F0 3B0 3F1 3B1 3F2 3B2 1F3 1B0 1F4 1B1 3F3 1B2 3F4 3B3 3B4 1B3 1B4",
    ]


def test_interleaved_refuses_stages_that_do_not_fill_the_devices():
    with pytest.raises(SettingError, match=r"num_stages a multiple of num_devices: got num_stages=6, num_devices=4"):
        sched.interleaved_1f1b(6, 4, num_devices=4)
    with pytest.raises(SettingError, match=r"num_devices must be an integer >= 1, got 0"):
        sched.interleaved_1f1b(4, 4, num_devices=0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb_h1"])
def test_one_stage_per_device_schedules_refuse_other_device_counts(name):
    with pytest.raises(SettingError, match=rf"schedule '{name}' runs one stage per device: num_devices must equal "
                                           r"num_stages \(4\), got num_devices=2\. .*schedule='interleaved_1f1b'"):
        sched.get(name)(4, 4, 2)


def test_names_and_aliases():
    assert sched.NAMES == ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")
    for alias in ("interleaved", "interleaved-1f1b", "Interleaved_1F1B"):
        assert sched.get(alias) is sched.interleaved_1f1b
    for alias in ("zbh1", "zero_bubble", "zb-h1", "ZB_H1"):
        assert sched.get(alias) is sched.zb_h1
        assert sched.canonical_name(alias) == "zb_h1"
    assert sched.get("one-f-one-b") is sched.one_f_one_b


def test_unknown_schedule_lists_known():
    with pytest.raises(ValueError, match=r"unknown schedule 'zigzag'; known schedules: "
                                         r"1f1b, gpipe, interleaved_1f1b, zb_h1"):
        sched.get("zigzag")


def test_render_names_devices_and_parse_round_trips():
    schedule = sched.interleaved_1f1b(4, 2, num_devices=2)
    text = sched.render(schedule, mark=Action(3, F, 0))
    assert text.splitlines()[0].startswith("device 0:  0F0  0F1  2F0")
    assert "[3F0]" in text.splitlines()[1]
    assert sched.parse_table(rows(schedule)) == schedule


def test_validate_rejects_backward_before_forward():
    bad = sched.parse_table(["0B0 0F0"])
    with pytest.raises(ScheduleError, match=r"backward 0B0 comes before its forward on device 0(.|\n)*"
                                            r"device 0: \[0B0\] 0F0"):
        sched.validate(bad)


def test_validate_rejects_missing_microbatch():
    bad = sched.parse_table(["0F0 0B0", "1F0 1B0"])
    with pytest.raises(ScheduleError, match=r"stage 0 never runs 0F1 \(micro-batch 1 is missing\)"):
        sched.validate(bad, num_microbatches=2)


def test_validate_rejects_missing_weight_step_on_a_split_stage():
    bad = sched.parse_table(["0F0 0F1 0B0 0W0 0B1"])
    with pytest.raises(ScheduleError, match=r"stage 0 never runs 0W1"):
        sched.validate(bad)


def test_validate_rejects_weight_before_backward():
    bad = sched.parse_table(["0F0 0W0 0B0"])
    with pytest.raises(ScheduleError, match=r"weight step 0W0 comes before its backward on device 0"):
        sched.validate(bad)


def test_validate_rejects_repeated_action():
    bad = sched.parse_table(["0F0 0F0 0B0"])
    with pytest.raises(ScheduleError, match=r"action 0F0 is repeated on device 0(.|\n)*\[0F0\]"):
        sched.validate(bad)


def test_validate_rejects_deadlock():
    # stage 0 needs 1B0 before it runs 0F1; stage 1 needs 0F1 before it gets to 1B0.
    bad = sched.parse_table(["0F0 0B0 0F1 0B1", "1F1 1F0 1B0 1B1"])
    with pytest.raises(ScheduleError, match=r"deadlock: device 0 at 0B0 waits for 1B0; "
                                            r"device 1 at 1F1 waits for 0F1"):
        sched.validate(bad)


def test_validate_rejects_deadlock_between_stages_of_one_device():
    # Device 0 runs stages 0 and 2: it starts 2F0 before 0F0, which stage 2 needs (through stage 1).
    bad = sched.parse_table(["2F0 0F0 2B0 0B0", "1F0 1B0"])
    with pytest.raises(ScheduleError, match=r"deadlock: device 0 at 2F0 waits for 1F0; device 1 at 1F0 waits for "
                                            r"0F0(.|\n)*device 0: \[2F0\]"):
        sched.validate(bad)
    order, blocked = sched.walk(bad)
    assert order == [] and blocked == [Action(2, F, 0), Action(1, F, 0)]


def test_validate_rejects_a_stage_on_two_devices():
    bad = sched.parse_table(["0F0 1B0", "1F0 0B0"])
    with pytest.raises(ScheduleError, match=r"stage 1 has actions on device 0 and device 1; every stage runs on "
                                            r"exactly one device"):
        sched.validate(bad)


def test_validate_rejects_a_stage_without_actions():
    bad = sched.parse_table(["0F0 0B0", "2F0 2B0"])
    with pytest.raises(ScheduleError, match=r"stage 1 has no actions"):
        sched.stage_rows(bad)


def test_two_stages_on_one_device_in_a_valid_order():
    table = sched.parse_table(["0F0 2F0 2B0 0B0", "1F0 1B0"])
    sched.validate(table)
    assert sched.stage_rows(table) == [0, 1, 0]
    assert [str(a) for a in sched.execution_order(table)] == ["0F0", "1F0", "2F0", "2B0", "1B0", "0B0"]
    assert sched.peak_in_flight(table) == [2, 1]


def test_sizes_are_checked():
    with pytest.raises(ValueError, match=r"num_microbatches must be an integer >= 1, got 0"):
        sched.gpipe(2, 0)
    with pytest.raises(ValueError, match=r"num_stages must be an integer >= 1, got 0"):
        sched.zb_h1(0, 2)


def test_validate_rejects_an_empty_schedule():
    with pytest.raises(ScheduleError, match=r"invalid schedule: it has no actions"):
        sched.validate([[], []])
