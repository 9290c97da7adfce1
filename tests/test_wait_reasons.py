"""How a wait is written, and the words of each reason a queued job waits for."""

from __future__ import annotations

import math

import pytest

from application.services.wait_reasons import Reason, format_wait


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5.0, "less than a minute"),
        (0.0, "less than a minute"),
        (59.9, "less than a minute"),
        (60.0, "about 1 min"),
        (300.0, "about 5 min"),
        (329.0, "about 5 min"),
        (3569.0, "about 59 min"),
        (3599.0, "about 1 h"),
        (4800.0, "about 1 h 20 min"),
        (7200.0, "about 2 h"),
        (86400.0, "about 1 d"),
        (2 * 86400.0 + 3 * 3600.0 + 100.0, "about 2 d 3 h"),
    ],
)
def test_format_wait(seconds: float, text: str) -> None:
    assert format_wait(seconds) == text


def test_format_wait_rejects_infinity() -> None:
    with pytest.raises(ValueError):
        format_wait(math.inf)


def test_reason_texts_name_the_job_and_when() -> None:
    assert Reason("resources").text == "not enough free GPUs"
    assert (
        Reason("reservation", "big", None).text == "GPUs held for big, whose start depends on a run of unknown length"
    )
    assert Reason("reservation", "big", 30).text == "GPUs held for big, which should start within a minute"
    assert Reason("reservation", "big", 600).text == "GPUs held for big, which should start in about 10 min"
    assert Reason("preemption", "low", 0, more=2).text.startswith("lower-priority run low and 2 more will make way")
    assert Reason("preemption", "low", 300).text.endswith("(PREEMPTION_MIN_RUN_SECONDS), in 5 min")
