"""The queue's one order: priority 10 first, then the earliest submission, as a Redis sorted-set score (the
store's scripts and the scheduler's in-memory queues compare the same numbers)."""

from __future__ import annotations

import math

PRIORITY_MIN = 0
PRIORITY_MAX = 10

# Milliseconds get their own decimal band below the priority band. 1e13 ms is the year 2286, so the
# timestamp can never carry into the priority digit, and the largest score (priority 0) is about 1.1e14,
# far below 2**53: every score is an exact integer in a double and Redis compares them exactly.
_PRIORITY_STRIDE_MS = 10**13
_MAX_SUBMITTED_AT = _PRIORITY_STRIDE_MS / 1000


def queue_score(priority: int, submitted_at: float) -> float:
    """Sorted-set score: ZRANGE ascending gives priority 10 first, then earliest submission (ms)."""
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(f"priority must be {PRIORITY_MIN}-{PRIORITY_MAX}, got {priority}")
    if not 0 <= submitted_at < _MAX_SUBMITTED_AT:
        raise ValueError(f"submitted_at must be a Unix time in [0, {_MAX_SUBMITTED_AT:.0f}), got {submitted_at}")
    # floor of a product is monotonic in submitted_at, so FIFO order survives the rounding to ms; two
    # submissions in the same millisecond fall back to job-id order, like any other score tie.
    return float((PRIORITY_MAX - priority) * _PRIORITY_STRIDE_MS + math.floor(submitted_at * 1000))


def score_priority(score: float) -> int:
    """Inverse of `queue_score` for the priority."""
    return PRIORITY_MAX - int(score) // _PRIORITY_STRIDE_MS


def score_submitted_at(score: float) -> float:
    """Inverse of `queue_score` for the submission time, to the millisecond."""
    return (int(score) % _PRIORITY_STRIDE_MS) / 1000
