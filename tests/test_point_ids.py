"""Progress stream ids (`<run>.<step>-<k>`): which run logged a point, and what a reconnecting client holds."""

from __future__ import annotations

import json

import pytest

from application.models.training_model import LossPoint
from application.services.point_ids import (
    BARE_STEP,
    BEFORE_ANY,
    could_have_sent,
    format_id,
    keys_of,
    parse_id,
    rewind_to,
    run_starts,
)


def points(*steps: int) -> list[LossPoint]:
    return [LossPoint(step=s) for s in steps]


def test_each_point_is_keyed_by_the_run_that_logged_it() -> None:
    # Run 1 logged 1-17 and was paused; run 2 resumed from checkpoint-10 (its points after 10 replaced run 1's)
    # and failed at 22; run 3 resumed from checkpoint-20 and logged an evaluation point beside step 30's.
    starts = run_starts(json.dumps([{"first_step": None}, {"first_step": 10}, {"first_step": 20}]))
    assert starts == [0, 10, 20]
    keys = keys_of(points(9, 10, 11, 20, 21, 30, 30), starts)
    assert [format_id(k) for k in keys] == ["1.9-0", "1.10-0", "2.11-0", "2.20-0", "3.21-0", "3.30-0", "3.30-1"]
    assert keys == sorted(keys)  # the order they were logged in
    assert keys_of(points(1, 2), run_starts(None)) == [(1, 1, 0), (1, 2, 0)]  # a job never run (or stored so)


@pytest.mark.parametrize(("raw", "key"), [
    ("2.11-0", (2, 11, 0)), ("2.11", (2, 11, BARE_STEP)),
    ("15-0", (2, 15, 0)), ("5-1", (1, 5, 1)), ("5", (1, 5, BARE_STEP)),  # as sent before runs were named
    (None, BEFORE_ANY), ("", BEFORE_ANY), ("x", BEFORE_ANY), ("1.2.3", BEFORE_ANY), ("-1", BEFORE_ANY),
    ("²", BEFORE_ANY), ("1." + "9" * 19, BEFORE_ANY),
])  # fmt: skip
def test_a_last_event_id_is_read_as_the_point_it_names(raw: str | None, key: tuple[int, int, int]) -> None:
    assert parse_id(raw, [0, 10]) == key


def test_an_id_of_an_earlier_run_may_name_a_point_since_dropped_but_not_one_of_the_run_going_now() -> None:
    top = (2, 14, 0)  # run 2 resumed after step 10 and is at 14
    assert could_have_sent((1, 17, 0), top, runs=2)  # run 1 got to 17 before its pause: 11-17 were dropped
    assert could_have_sent((1, 17, 0), (1, 10, 0), runs=2)  # run 2 has logged nothing yet
    assert could_have_sent((2, 14, 0), top, runs=2) and could_have_sent((2, 14, BARE_STEP), top, runs=2)
    assert not could_have_sent((2, 15, 0), top, runs=2) and not could_have_sent((2, 14, 1), top, runs=2)
    assert not could_have_sent((3, 1, 0), top, runs=2) and not could_have_sent((0, 1, 0), top, runs=2)
    assert not could_have_sent((1, 1, 0), BEFORE_ANY, runs=0)  # a job that never ran has sent nothing


def test_a_client_is_told_to_drop_only_steps_it_holds_that_a_later_run_logs_again() -> None:
    starts = [0, 10, 20]
    assert rewind_to((1, 17, 0), (2, 11, 0), starts) == 10
    # Run 2 (from 10) logged nothing before run 3 started from an older run's checkpoint-20: 11-20 are gone too.
    assert rewind_to((1, 25, 0), (3, 21, 0), starts) == 10
    assert rewind_to((2, 25, 0), (3, 21, 0), starts) == 20
    assert rewind_to((1, 8, 0), (2, 11, 0), starts) is None  # it holds nothing after the checkpoint
    assert rewind_to((2, 12, 0), (2, 13, 0), starts) is None and rewind_to(BEFORE_ANY, (2, 11, 0), starts) is None
