"""The queue, the GPUs and the running jobs as the pure scheduler sees them, read from the store.

Both sides use it: the scheduler (with its live GPU reading, to start jobs) and the API workers (with the
reading the scheduler published, to answer "would this start now?" and "how long will it wait?").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from application.config import Settings
from application.models.training_model import Progress
from application.services.gpu_pool import gpu_states, queued_job
from application.services.job_store import JobStore, QueueMeta
from application.services.scheduler import (
    BACKFILL_DEPTH,
    GpuState,
    LinkScore,
    QueuedJob,
    RunningJob,
    Start,
    decide,
    estimate_waits,
)
from application.utils.gpu_types import GpuSnapshot

WINDOW = 256
# decide() looks at most BACKFILL_DEPTH blocked jobs deep, so reading further cannot start anything more.
MAX_WINDOW = 2 * BACKFILL_DEPTH
# Estimates simulate the queue forward: bounded so a request never pays for a whole long queue.
ESTIMATE_WINDOW = 1000


@dataclass
class ClusterView:
    snapshot: GpuSnapshot
    gpus: list[GpuState]
    running: list[RunningJob]


async def build_view(store: JobStore, snapshot: GpuSnapshot, *, reclaim: bool = False,
                     state: tuple[dict[int, str], list[str], int] | None = None) -> ClusterView:  # fmt: skip
    """GPUs with their leases, and the running jobs with their remaining time. `reclaim` (the scheduler only)
    drops leases whose job no longer runs; `state` is `JobStore.planning_state()` when already read."""
    leases, running_ids, _ = state if state is not None else await store.planning_state()
    leases = dict(leases)
    running_set = set(running_ids)
    for gpu, holder in list(leases.items()):
        if holder not in running_set:
            if reclaim:
                await store.drop_lease(gpu, holder)
            leases.pop(gpu)
    running: list[RunningJob] = []
    rows = await store.get_fields(running_ids, ["gpu_ids", "progress", "owner"])
    for job_id, (gpu_raw, progress_raw, owner_raw) in zip(running_ids, rows, strict=True):
        ids = tuple(json.loads(gpu_raw)) if gpu_raw else ()
        remaining = Progress.model_validate_json(progress_raw).remaining_seconds if progress_raw else None
        owner = json.loads(owner_raw) if owner_raw else None
        running.append(RunningJob(job_id=job_id, gpu_ids=ids, remaining_seconds=remaining, owner=owner))
    return ClusterView(snapshot, gpu_states(snapshot, leases), running)


def as_queued(job_id: str, meta: QueueMeta) -> QueuedJob:
    return queued_job(job_id, meta.priority, meta.submitted_at, meta.num_gpus, meta.gpu_ids, meta.min_gpu_memory_gb,
                      meta.estimated_duration, owner=meta.owner)  # fmt: skip


async def queued(store: JobStore, count: int, start: int = 0) -> list[QueuedJob]:
    return [as_queued(job_id, meta) for job_id, meta in await store.queue_window(start, count)]


def _rank(q: QueuedJob) -> tuple[int, int, str]:
    return (-q.priority, int(q.submitted_at * 1000), q.job_id)


class Planner:
    def __init__(self, store: JobStore, settings: Settings, link_score: LinkScore | None = None) -> None:
        self.store = store
        self.settings = settings
        self.link_score = link_score

    async def plan(
        self, view: ClusterView, extra: QueuedJob | None = None, queue_length: int | None = None
    ) -> list[Start]:
        """What a pass would start now. `extra` (a job not stored yet) is ranked among the queue."""
        queue: list[QueuedJob] = []
        size = WINDOW
        while True:
            if queue_length != 0:  # an empty queue needs no read
                queue.extend(await queued(self.store, size - len(queue), start=len(queue)))
            ranked = sorted([*queue, extra], key=_rank) if extra is not None else queue
            s = self.settings
            starts = decide(ranked, view.gpus, view.running, policy=s.QUEUE_POLICY.value, now=time.time(),
                            min_free_gb=s.GPU_MIN_FREE_MEMORY_GB, max_util=s.GPU_MAX_UTILIZATION,
                            owner_gpu_cap=s.MAX_GPUS_PER_OWNER, link_score=self.link_score)  # fmt: skip
            # Later jobs rank lower and cannot change the decisions for this prefix: look further only
            # while GPUs stay free after it.
            used = {i for s in starts for i in s.gpu_ids}
            any_free = any(g.held_by is None and g.index not in used for g in view.gpus)
            if len(queue) < size or not any_free or size >= MAX_WINDOW:
                return starts
            size = min(size * 4, MAX_WINDOW)

    async def wait_estimates(self, view: ClusterView, upto: int) -> dict[str, float | None]:
        """Wait estimates of the first `upto` queued jobs; past ESTIMATE_WINDOW nobody can tell (None)."""
        queue = await queued(self.store, min(upto, ESTIMATE_WINDOW))
        s = self.settings
        return estimate_waits(queue, view.gpus, view.running, policy=s.QUEUE_POLICY.value, now=time.time(),
                              min_free_gb=s.GPU_MIN_FREE_MEMORY_GB, max_util=s.GPU_MAX_UTILIZATION,
                              owner_gpu_cap=s.MAX_GPUS_PER_OWNER, link_score=self.link_score)  # fmt: skip
