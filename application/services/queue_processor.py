"""The queue processor: one asyncio task that starts queued jobs the moment their GPUs are free.

It wakes at once on anything that may let a job start (a job queued, ended or re-prioritised, a lease
released: the store publishes those on one channel, so every API process on the Redis hears them) and
every QUEUE_POLL_INTERVAL seconds to notice GPUs freed by processes outside the system. The decision
itself is `scheduler.decide`, a pure function; this module only does the I/O around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from redis.exceptions import RedisError

from application.config import Settings
from application.models.training_model import Job, JobStatus, Progress
from application.services.gpu_pool import gpu_states, queued_job
from application.services.job_store import JobStore, QueueMeta, TransitionRefused
from application.services.scheduler import (
    BACKFILL_DEPTH,
    GpuState,
    QueuedJob,
    RunningJob,
    Start,
    decide,
    estimate_waits,
)
from application.utils.gpu_utils import GpuInventory, GpuSnapshot

WINDOW = 256
# decide() looks at most BACKFILL_DEPTH blocked jobs deep, so reading further cannot start anything more.
MAX_WINDOW = 2 * BACKFILL_DEPTH
# Estimates simulate the queue forward: bounded so a request never pays for a whole long queue.
ESTIMATE_WINDOW = 1000


@dataclass
class ProcessorStats:
    """This API process's passes (the on/off switch itself is shared in Redis)."""

    passes: int = 0
    jobs_started: int = 0
    last_pass_at: float | None = None
    last_pass_ms: float | None = None
    last_started: list[str] = field(default_factory=list)
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass
class ClusterView:
    snapshot: GpuSnapshot
    gpus: list[GpuState]
    running: list[RunningJob]


class QueueProcessor:
    def __init__(
        self,
        store: JobStore,
        inventory: GpuInventory,
        settings: Settings,
        start_job: Callable[[Job, list[int]], Awaitable[None]],
    ) -> None:
        self.store = store
        self.inventory = inventory
        self.settings = settings
        self.start_job = start_job
        self.stats = ProcessorStats()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------------

    # The task lives as long as the API process; the on/off switch is one flag in Redis, so stopping the
    # processor stops automatic starts in every API process on this Redis, not only the one that was asked.

    def launch(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.create_task(self._loop(), name="queue-processor")
        self._listener = asyncio.create_task(self._listen(), name="queue-wakeups")
        self.wake()

    async def set_enabled(self, on: bool) -> bool:
        """Switch automatic starts on or off; returns whether that changed anything."""
        changed = await self.store.set_processor_switch(on)
        if not on:
            async with self._lock:
                pass  # a pass already under way in this process ends before the caller hears "stopped"
        return changed

    async def switch(self) -> tuple[bool, float | None]:
        return await self.store.processor_switch()

    async def close(self) -> bool:
        if self._task is None:
            return False
        tasks = [t for t in (self._task, self._listener) if t is not None]
        self._task = self._listener = None
        # Under the pass lock, so a pass is never cut short (a job moved to running whose swift never starts).
        # Cancel until the tasks are done: asyncio.wait_for in 3.11 and redis-py's pubsub read can swallow a
        # cancellation that coincides with their result, and one swallowed request used to hang this call
        # while the processor went on starting jobs.
        async with self._lock:
            while pending := [t for t in tasks if not t.done()]:
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=0.5)
        await asyncio.gather(*tasks, return_exceptions=True)
        return True

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        while True:
            try:
                async for _ in self.store.wakeups():
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: the poll interval still drives passes
                logger.warning("queue wake-up listener: {}; retrying", exc)
                await asyncio.sleep(1.0)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.QUEUE_POLL_INTERVAL)
            self._wake.clear()
            try:
                if (await self.switch())[0]:
                    await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one bad pass kill the processor
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self.stats.last_error_at = time.time()
                logger.exception("queue pass failed")
                await asyncio.sleep(min(1.0, self.settings.QUEUE_POLL_INTERVAL))

    # ---- one pass -----------------------------------------------------------------------------------

    async def view(self) -> ClusterView:
        snapshot = await asyncio.to_thread(self.inventory.snapshot)
        leases = await self.store.leases()
        running_ids = await self.store.ids_with_status(JobStatus.RUNNING)
        running_set = set(running_ids)
        for gpu, holder in list(leases.items()):
            if holder not in running_set:
                # A lease whose job is no longer running (its process is gone): reclaim it.
                await self.store.drop_lease(gpu, holder)
                leases.pop(gpu)
        running: list[RunningJob] = []
        rows = await self.store.get_fields(running_ids, ["gpu_ids", "progress", "owner"])
        for job_id, (gpu_raw, progress_raw, owner_raw) in zip(running_ids, rows, strict=True):
            ids = tuple(json.loads(gpu_raw)) if gpu_raw else ()
            remaining = Progress.model_validate_json(progress_raw).remaining_seconds if progress_raw else None
            owner = json.loads(owner_raw) if owner_raw else None
            running.append(RunningJob(job_id=job_id, gpu_ids=ids, remaining_seconds=remaining, owner=owner))
        return ClusterView(snapshot, gpu_states(snapshot, leases), running)

    def _policy_kwargs(self) -> dict[str, Any]:
        return {
            "min_free_gb": self.settings.GPU_MIN_FREE_MEMORY_GB,
            "max_util": self.settings.GPU_MAX_UTILIZATION,
            "owner_gpu_cap": self.settings.MAX_GPUS_PER_OWNER,
        }

    async def queued(self, count: int, start: int = 0) -> list[QueuedJob]:
        entries = await self.store.queue_window(start, count)
        return [_as_queued(job_id, meta) for job_id, meta in entries]

    async def plan(self, view: ClusterView, extra: QueuedJob | None = None) -> list[Start]:
        """What a pass would start now. `extra` (a pending job asking to start) is ranked among the queue."""
        queue: list[QueuedJob] = []
        size = WINDOW
        while True:
            more = await self.queued(size - len(queue), start=len(queue))
            queue.extend(more)
            ranked = sorted([*queue, extra], key=_rank) if extra is not None else queue
            starts = decide(
                ranked, view.gpus, view.running, policy=self.settings.QUEUE_POLICY.value, now=time.time(),
                link_score=self.inventory.link_score, **self._policy_kwargs(),
            )  # fmt: skip
            # Later jobs rank lower and cannot change the decisions for this prefix: look further only
            # while GPUs stay free after it.
            used = {i for s in starts for i in s.gpu_ids}
            any_free = any(g.held_by is None and g.index not in used for g in view.gpus)
            if len(queue) < size or not any_free or size >= MAX_WINDOW:
                return starts
            size = min(size * 4, MAX_WINDOW)

    async def run_pass(self) -> list[str]:
        async with self._lock:
            started_at = time.perf_counter()
            view = await self.view()
            starts = await self.plan(view) if await self.store.queue_length() else []
            started: list[str] = []
            for start in starts:
                job = await self.store.get(start.job_id)
                if job is None or job.status != JobStatus.QUEUED:
                    continue
                try:
                    await self.start_job(job, list(start.gpu_ids))
                    started.append(start.job_id)
                except TransitionRefused as exc:
                    # Another API process took the job or one of its GPUs first: the next pass chooses again.
                    logger.debug("start of {} refused: {}", start.job_id, exc.reason)
                except RedisError:
                    raise
            self.stats.passes += 1
            self.stats.jobs_started += len(started)
            self.stats.last_pass_at = time.time()
            self.stats.last_pass_ms = (time.perf_counter() - started_at) * 1000
            if started:
                self.stats.last_started = started
                logger.info("queue pass started {}", ", ".join(started))
            return started

    async def wait_estimates(self, view: ClusterView, upto: int) -> dict[str, float | None]:
        """Wait estimates of the first `upto` queued jobs; past ESTIMATE_WINDOW nobody can tell (None)."""
        queue = await self.queued(min(upto, ESTIMATE_WINDOW))
        return estimate_waits(queue, view.gpus, view.running, now=time.time(), policy=self.settings.QUEUE_POLICY.value,
                               link_score=self.inventory.link_score, **self._policy_kwargs())  # fmt: skip


def _rank(q: QueuedJob) -> tuple[int, int, str]:
    return (-q.priority, int(q.submitted_at * 1000), q.job_id)


def _as_queued(job_id: str, meta: QueueMeta) -> QueuedJob:
    return queued_job(job_id, meta.priority, meta.submitted_at, meta.num_gpus, meta.gpu_ids, meta.min_gpu_memory_gb,
                      meta.estimated_duration, owner=meta.owner)  # fmt: skip
