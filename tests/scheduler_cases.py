"""Hand-made queues, GPU states and running jobs for the scheduler's tests (no Redis, no GPUs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from application.services.scheduler import GpuState, Policy, QueuedJob, RunningJob, decide, plan, queue_key

NOW = 1_700_000_000.0
MIN_FREE = 2.0
MAX_UTIL = 90.0


def policy_of(name: str = "backfill", **extra: object) -> Policy:
    return Policy(name=name, min_free_gb=MIN_FREE, max_util=MAX_UTIL, **extra)  # type: ignore[arg-type]


def estimate_waits(
    queue: Sequence[QueuedJob],
    gpus: Sequence[GpuState],
    running: Sequence[RunningJob],
    *,
    policy: str = "backfill",
    now: float = NOW,
    **_: object,
) -> dict[str, float | None]:
    return plan(queue, gpus, running, policy_of(policy), now).waits


def gpu(
    index: int, *, total: float = 80.0, free: float | None = None, util: float | None = 0.0, held: str | None = None
) -> GpuState:
    return GpuState(index, total, total if free is None else free, util, held)


def gpus_free(n: int) -> list[GpuState]:
    return [gpu(i) for i in range(n)]


def job(
    job_id: str,
    *,
    priority: int = 5,
    t: float = 0.0,
    n: int = 1,
    ids: tuple[int, ...] | None = None,
    mem: float | None = None,
    est: float | None = None,
) -> QueuedJob:
    return QueuedJob(job_id, priority, NOW - 1000 + t, len(ids) if ids else n, ids, mem, est)


def ordered(*jobs: QueuedJob) -> list[QueuedJob]:
    return sorted(jobs, key=queue_key)


def busy(gpus: list[GpuState], running: Sequence[RunningJob]) -> list[GpuState]:
    """The same GPUs with those of `running` marked as held by their job."""
    holder = {i: r.job_id for r in running for i in r.gpu_ids}
    return [GpuState(g.index, g.memory_usable_gb, g.memory_free_gb, g.utilization, holder.get(g.index)) for g in gpus]


def run(
    queue: Sequence[QueuedJob],
    gpus: Sequence[GpuState],
    running: Sequence[RunningJob] = (),
    *,
    policy: str = "backfill",
    link_score: Callable[[int, int], int | None] | None = None,
) -> dict[str, tuple[int, ...]]:
    starts = decide(queue, gpus, running, policy_of(policy, link_score=link_score), NOW)
    return {s.job_id: s.gpu_ids for s in starts}
