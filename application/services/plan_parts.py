"""The parts of a scheduling plan: what `scheduler.plan` reads (queued jobs, GPU states, running jobs, the policy)
and what it returns (starts, waits and reasons, the head), and the queue's order over them. Plain data: no Redis,
no I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass, field

from application.services.queue_order import queue_score
from application.services.timeline import LinkScore
from application.services.wait_reasons import Reason


@dataclass(frozen=True, slots=True)
class QueuedJob:
    job_id: str
    priority: int
    submitted_at: float
    num_gpus: int
    gpu_ids: tuple[int, ...] | None
    min_gpu_memory_gb: float | None
    estimated_duration: float | None
    owner: str | None = None
    retry_at: float | None = None  # a retried run: not started, nor planned for, before then


@dataclass(frozen=True, slots=True)
class GpuState:
    index: int
    memory_usable_gb: float  # what an idle GPU offers a job (total less the driver's reservation)
    memory_free_gb: float
    # None when the backend cannot tell (simulated GPUs); counted as idle so such GPUs stay usable.
    utilization: float | None
    held_by: str | None
    readable: bool = True  # False: its reading failed (GpuInfo.error): never free, but still there


@dataclass(frozen=True, slots=True)
class RunningJob:
    job_id: str
    gpu_ids: tuple[int, ...]
    remaining_seconds: float | None
    owner: str | None = None
    started_at: float | None = None
    # Asked to stop, pause or make way, or past its time limit (its runner stops it): its GPUs come back anyway.
    ending: bool = False
    making_way_for: str | None = None  # preempted for this queued job


@dataclass(frozen=True, slots=True)
class Start:
    job_id: str
    gpu_ids: tuple[int, ...]


def queue_key(job: QueuedJob) -> tuple[float, str]:
    """Sort key giving exactly the Redis queue order, for callers that build a queue in memory."""
    return (queue_score(job.priority, job.submitted_at), job.job_id)


def gpu_is_free(gpu: GpuState, *, min_free_gb: float, max_util: float) -> bool:
    """Not held by one of our jobs, and other processes leave enough memory and compute."""
    if gpu.held_by is not None or not gpu.readable:
        return False
    if gpu.memory_free_gb < min_free_gb:
        return False
    return gpu.utilization is None or gpu.utilization <= max_util


# ------------------------------------------------------------------------------------------ the planner

RETRY_BACKOFF_CAP = 600.0  # the longest wait of a retry, however many came before it

# How many blocked jobs backfill plans around in one pass. Past this many, free GPUs nobody reserved are
# held back rather than risk delaying a blocked job the pass never looked at. Like Slurm's bf_max_job_test,
# it bounds a pass's cost on a long queue of jobs that cannot start.
BACKFILL_DEPTH = 500


@dataclass(frozen=True)
class Policy:
    """How a pass decides. `starvation_seconds` 0: every reservation binds at once (plain backfill)."""

    name: str = "backfill"
    min_free_gb: float = 2.0
    max_util: float = 90.0
    owner_gpu_cap: int = 0
    owner_run_cap: int = 0
    starvation_seconds: float = 0.0
    link_score: LinkScore | None = None

    def __post_init__(self) -> None:
        if self.name not in ("strict", "backfill"):
            raise ValueError(f"policy must be 'strict' or 'backfill', got {self.name!r}")


@dataclass(slots=True)
class Plan:
    starts: list[Start]
    waits: dict[str, float | None]
    reasons: dict[str, Reason]
    # The first job that waits with a reservation: the head whose wait the starvation rule counts.
    head: str | None = None
    # The first of each priority (the head among them): each priority's head whose wait that rule counts.
    heads: list[str] = field(default_factory=list)


# (job id, since when): the queue's head as the scheduler last saw it, for the starvation rule.
Head = tuple[str, float]


def next_head(stored: Head | None, found: str | None, now: float, since: float | None = None) -> Head | None:
    """The head to keep after a pass that found `found` (None: the pass did not look that far). `since`: when
    `found` first became the head in its present stint in the queue, if it was before (the caller keeps that per
    job: a job briefly ahead of it, a higher priority one say, restarted its clock, and it could wait for ever). A
    time in the future (stored by a scheduler on a host whose clock is ahead) counts from now: kept, it made the
    head's reservation soft for the skew besides QUEUE_STARVATION_SECONDS."""
    if stored is not None and stored[1] > now:
        stored = (stored[0], now)
    if found is None or (stored is not None and stored[0] == found):
        return stored
    return (found, now if since is None else min(since, now))
