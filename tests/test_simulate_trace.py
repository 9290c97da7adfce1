"""The simulator's textbook EASY backfill (the replay target's yardstick), on cases worked by hand."""

from __future__ import annotations

from application.services.scheduler import QueuedJob, Start
from benchmarks.simulate_trace import easy


def q(job_id: str, gpus: int, at: float = 0.0) -> QueuedJob:
    return QueuedJob(job_id, 5, at, gpus, None, None, None)


def started(starts: list[Start]) -> list[str]:
    return [s.job_id for s in starts]


def test_jobs_start_in_order_while_they_fit() -> None:
    queue = [q("a", 2), q("b", 2), q("c", 1)]
    starts = easy(queue, [0, 1, 2, 3], [], {"a": 10, "b": 10, "c": 10}, now=0)
    assert started(starts) == ["a", "b"]
    assert sorted(i for s in starts for i in s.gpu_ids) == [0, 1, 2, 3]  # no GPU given twice


def test_a_job_behind_the_head_backfills_only_if_it_ends_by_the_shadow_time() -> None:
    # 2 GPUs free, 2 busy until t=10: the head (4 GPUs) starts at 10 with no GPU to spare.
    running = [((0, 1), 10.0)]
    runtime = {"head": 50, "short": 10, "long": 11}
    assert started(easy([q("head", 4), q("long", 2)], [2, 3], running, runtime, now=0)) == []
    assert started(easy([q("head", 4), q("short", 2)], [2, 3], running, runtime, now=0)) == ["short"]


def test_extra_gpus_at_the_shadow_time_may_be_used_by_long_jobs() -> None:
    # The head needs 3 of the 4 GPUs free at t=10: one is extra, so one long 1-GPU job may start, not two;
    # a short one still may.
    running = [((0, 1), 10.0)]
    runtime = {"head": 50, "long1": 100, "long2": 100, "short": 5}
    queue = [q("head", 3), q("long1", 1), q("long2", 1), q("short", 1)]
    assert started(easy(queue, [2, 3], running, runtime, now=0)) == ["long1", "short"]


def test_other_blocked_jobs_hold_nothing() -> None:
    # Unlike the server's backfill, the second blocked job ("wide2") reserves nothing: a long job behind it
    # may take the GPUs it would wait for, as long as the head is not delayed.
    running = [((0, 1, 2), 10.0)]
    runtime = {"head": 5, "wide2": 5, "long": 100}
    queue = [q("head", 3), q("wide2", 4), q("long", 1)]
    # The head needs 3 of the 4 free at t=10: one extra GPU, which the long job takes.
    assert started(easy(queue, [3], running, runtime, now=0)) == ["long"]
