"""Schedules as literal tables, validation messages, in-flight bounds."""

import pytest

from pipeline.core import schedule as sched
from pipeline.core.schedule import Action, B, F


def rows(schedule):
    return [" ".join(map(str, row)) for row in schedule]


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


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_generated_schedules_are_valid_and_bounded(k, m):
    for name in ("gpipe", "1f1b"):
        schedule = sched.get(name)(k, m)
        sched.validate(schedule, m)
        order = list(sched.execution_order(schedule))
        assert len(order) == 2 * k * m
    assert sched.peak_in_flight(sched.one_f_one_b(k, m)) == [min(k - i, m) for i in range(k)]
    assert sched.peak_in_flight(sched.gpipe(k, m)) == [m] * k


def test_unknown_schedule_lists_known():
    with pytest.raises(ValueError, match=r"unknown schedule 'zigzag'; known schedules: 1f1b, gpipe"):
        sched.get("zigzag")


def test_validate_rejects_backward_before_forward():
    bad = sched.parse_table(["0B0 0F0"])
    with pytest.raises(sched.ScheduleError, match=r"backward 0B0 comes before its forward(.|\n)*stage 0: \[0B0\] 0F0"):
        sched.validate(bad)


def test_validate_rejects_missing_microbatch():
    bad = sched.parse_table(["0F0 0B0", "1F0 1B0"])
    with pytest.raises(sched.ScheduleError, match=r"stage 0 never runs 0F1 \(micro-batch 1 is missing\)"):
        sched.validate(bad, num_microbatches=2)


def test_validate_rejects_repeated_action():
    bad = sched.parse_table(["0F0 0F0 0B0"])
    with pytest.raises(sched.ScheduleError, match=r"action 0F0 is repeated on stage 0(.|\n)*\[0F0\]"):
        sched.validate(bad)


def test_validate_rejects_deadlock():
    # stage 0 needs 1B0 before it runs 0F1; stage 1 needs 0F1 before it gets to 1B0.
    bad = sched.parse_table(["0F0 0B0 0F1 0B1", "1F1 1F0 1B0 1B1"])
    with pytest.raises(sched.ScheduleError, match=r"deadlock: 0B0 waits for 1B0; 1F1 waits for 0F1"):
        sched.validate(bad)


def test_validate_rejects_action_in_wrong_row():
    bad = sched.parse_table(["0F0 1B0"])
    with pytest.raises(sched.ScheduleError, match=r"action 1B0 is in the row of stage 0"):
        sched.validate(bad)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match=r"num_microbatches must be an integer >= 1, got 0"):
        sched.gpipe(2, 0)
