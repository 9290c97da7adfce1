"""The queue processor: in the leading scheduler, it starts queued jobs the moment their GPUs are free.

It wakes at once on anything that may let a job start (a job queued, ended or re-prioritised, a lease
released: the store publishes those on one channel) and every QUEUE_POLL_INTERVAL seconds to notice GPUs
freed by processes outside the system. The decision is `scheduler.plan` (through `queue_planner.Planner`), a
pure function; this module reads its inputs, starts what it returns (`run_start`: the status change, fenced by
the leader lock, then the runner) and publishes the GPU reading for the API workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from loguru import logger

from application.config import Settings
from application.models.training_model import Job, JobStatus
from application.services import clock, preemption
from application.services.cluster_store import ClusterStore
from application.services.gpu_pool import queued_job
from application.services.job_store import JobStore, TransitionRefused
from application.services.launcher import RunnerLauncher
from application.services.queue_planner import WINDOW, ClusterView, Planner, as_queued, build_view, is_ending, queued
from application.services.queue_view import PlanningState
from application.services.run_history import RunHistory
from application.services.run_start import RunStarter
from application.services.scheduler import QueuedJob, Start, next_head
from application.services.swift_command import SwiftVersion
from application.utils.gpu_reader import GpuReader
from application.utils.gpu_types import GpuSnapshot, snapshot_of
from application.utils.gpu_utils import GpuInventory


@dataclass
class PassStats:
    """This leader's passes; written to the store after each one for /queue/processor/status."""

    passes: int = 0
    jobs_started: int = 0
    last_pass_at: float | None = None
    last_pass_ms: float | None = None
    last_started: list[str] = field(default_factory=list)
    last_error: str | None = None
    last_error_at: float | None = None


class QueueProcessor:
    def __init__(
        self,
        store: JobStore,
        cluster: ClusterStore,
        inventory: GpuInventory,
        settings: Settings,
        launcher: RunnerLauncher,
        fence: Callable[[], str | None],
        version: Callable[[], Awaitable[SwiftVersion]],
        scheduler_id: str,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.inventory = inventory
        self.reader = GpuReader(inventory)
        self._remembered = False
        self.settings = settings
        self.fence = fence
        # (the fence looked up at each use: a test stands in for a lead lost by setting this one)
        self.starter = RunStarter(store, cluster, settings, launcher, lambda: self.fence(), version, scheduler_id)
        self.planner = Planner(store, settings, inventory.link_score)
        self.history = RunHistory(store.r, store.keys)
        self._history_seen = -1
        self.stats = PassStats()
        self.retry_due: float | None = None  # the first retry's end of backoff the last pass planned around
        self._lock = asyncio.Lock()

    async def view(self) -> ClusterView:
        """The GPU reading, published, and what a pass plans on; made each round, a pass or not (the processor off,
        starts held), as is the look at OUTPUT_ROOT's disk."""
        return await self._built(*await self._read())

    async def _read(self) -> tuple[GpuSnapshot, PlanningState]:
        await self.starter.look_at_disk()
        if not self._remembered:
            self.reader.remember(snapshot_of(await self.cluster.gpu_snapshot()))
            self._remembered = True
        # (each part in parallel with what does not need it: a pass's round trips wait their turns in a Redis busy
        # with the API's requests, and those before a start are a hand-over's latency)
        snapshot, state = await asyncio.gather(self.reader.read(), self.store.planning_state())
        return snapshot, state

    async def _built(self, snapshot: GpuSnapshot, state: PlanningState) -> ClusterView:
        _, view = await asyncio.gather(self.cluster.put_gpu_snapshot(snapshot.to_dict()),
                                       build_view(self.store, snapshot, reclaim=True, state=state))  # fmt: skip
        return view

    async def _view_and_window(self) -> tuple[ClusterView, list[QueuedJob], int]:
        """`view`, the queue's window and its length. The window is read after the state, with its history
        version, beside the view's last reads: see `JobStore.planning_state`."""
        snapshot, state = await self._read()
        view, window = await asyncio.gather(self._built(snapshot, state),
                                            self._predicted_window(state.history_version))  # fmt: skip
        return view, window, state.queue_length

    async def run_pass(self, only: set[str] | None = None, wanted: set[str] | None = None) -> list[str]:
        """Start every queued job that fits now (or, given `only`, those of them); `only` and `wanted` (jobs a
        user asked to start) are planned even when they lie past the planned window."""
        async with self._lock:
            started_at = time.perf_counter()
            # (in parallel, as in `view`)
            (view, window, length), head, clocks = await asyncio.gather(
                self._view_and_window(), self.cluster.queue_head(), self.store.head_clocks(),
            )  # fmt: skip
            starts: list[Start] = []
            head_id: str | None = None
            # The heads' clocks: their round trips are no hand-over's (see `marking`).
            marks: list[Callable[[], Awaitable[None]]] = []
            self.retry_due = None
            if length:
                asked = (only or set()) | (wanted or set())
                # A head found again keeps the clock it started before (`clocks`, `next_head`), and is planned
                # with it: as a young head, one pass let jobs of its priority take the GPUs it had waited for.
                found = await self.planner.plan(view, head=head, wanted=asked, clocks=clocks, first=window)
                kept = next_head(head, found.head, clock.now(), clocks.get(found.head) if found.head else None)
                starts = found.starts
                head_id = found.head
                backoffs = [r.starts_in for r in found.reasons.values() if r.code == "retry_backoff" and r.starts_in]
                self.retry_due = clock.now() + min(backoffs) if backoffs else None
                await self._asked_while_backing_off([i for i, r in found.reasons.items() if r.code == "retry_backoff"])
                if kept != head and kept is not None:
                    # (only while the clock read for it stands: one a priority change forgot since is not put back)
                    marks.append(functools.partial(self.cluster.set_queue_head, kept, clocks.get(kept[0])))
                marks.append(functools.partial(self.store.mark_heads, [h for h in found.heads if h not in clocks],
                                               clock.now()))  # fmt: skip
            # The heads' clocks go out now, beside the starts, not after them: a priority change or a dequeue
            # made while the starts went on forgot a head's clock (`forget_head`), and a write after them put
            # the old one back (its time at the head of another priority: at once hard there). Awaited
            # whatever the starts did: a pass that failed at a start left them unwritten.
            marking = asyncio.gather(*(mark() for mark in marks))
            try:
                started: list[str] = []
                for start in starts:
                    if only is not None and start.job_id not in only:
                        continue
                    try:
                        job = await self.store.get(start.job_id)
                    except ValueError as exc:  # (pydantic's ValidationError): a record this version cannot read
                        await self._unreadable(start.job_id, exc)
                        continue
                    if job is None and await self.store.forget_lost(start.job_id):
                        logger.warning("queued job {}'s record is gone (evicted by Redis, or deleted by hand): dropped "
                                       "from the queue", start.job_id)  # fmt: skip
                    if job is None or job.status != JobStatus.QUEUED:
                        continue
                    try:
                        if await self.start_run(job, list(start.gpu_ids)):
                            started.append(start.job_id)
                    except TransitionRefused as exc:
                        # The job or one of its GPUs changed under us, or we no longer lead: the next pass decides.
                        logger.debug("start of {} refused: {}", start.job_id, exc.reason.value)
                    if self.starter.disk_held:
                        break  # (none starts while OUTPUT_ROOT's disk takes no file: the next try is the hold's)
                # (nor is a run stopped for a head that cannot start: its checkpoint would go to that full disk)
                if self.settings.PREEMPTION and head_id is not None and not started and only is None and \
                        not self.starter.disk_held:  # fmt: skip
                    await self.preempt(head_id, view)
            except BaseException:
                await asyncio.gather(marking, return_exceptions=True)
                raise
            await marking
            s = self.stats
            s.passes += 1
            s.jobs_started += len(started)
            s.last_pass_at = clock.now()
            s.last_pass_ms = (time.perf_counter() - started_at) * 1000
            if started:
                s.last_started = started
                logger.info("queue pass started {}", ", ".join(started))
            await self.cluster.record_pass(s.__dict__)
            return started

    async def _predicted_window(self, history_version: int) -> list[QueuedJob]:
        """The queue's first WINDOW jobs, read once the jobs that a run's end taught a prediction have it."""
        window = await self.refresh_predictions(history_version)
        return await queued(self.store, WINDOW) if window is None else window

    async def _asked_while_backing_off(self, job_ids: list[str]) -> None:
        """Retries waiting out their backoff that were asked to stop or pause as their run ended are stopped or
        paused now, not when the backoff ends (review DU: paused up to 10 minutes late)."""
        if not job_ids:
            return
        rows = await self.store.get_fields(job_ids, ["stop_requested", "pause_requested"])
        for job_id, flags in zip(job_ids, rows, strict=True):
            if "true" not in flags:
                continue
            job = None
            with contextlib.suppress(ValueError):  # (a record it cannot read fails when it would start)
                job = await self.store.get(job_id)
            if job is not None and job.status == JobStatus.QUEUED:
                with contextlib.suppress(TransitionRefused):  # (it changed meanwhile: the next pass sees it)
                    await self.starter.honour_asks(job)

    async def _unreadable(self, job_id: str, exc: ValueError) -> None:
        """A queued job whose stored record cannot be read (written by hand, or by a version that let a bad value
        through) fails alone: raised out of the pass, it stopped every start behind it, pass after pass."""
        error = f"its stored record cannot be read ({str(exc).splitlines()[0][:300]}): delete it and create it again"
        logger.error("queued job {}: {}", job_id, error)
        try:
            await self.store.transition(job_id, JobStatus.FAILED, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                        fields={"error_message": error, "error_code": "unreadable"},
                                        message=f"training failed: {error}")  # fmt: skip
        except TransitionRefused:
            pass
        except Exception:  # (the record may defeat the transition too: the pass must still go on)
            logger.exception("queued job {} could not be failed", job_id)

    async def preempt(self, head_id: str, view: ClusterView) -> list[str]:
        """PREEMPTION=on: ask the runs of lower priority that hold what the head of the queue needs to make way
        (see `preemption`). One preemption at a time: none while an earlier one is still under way."""
        # Whether a run is ending (asked to stop or pause, or past its time limit) and when it started come with
        # the view; what only preemption needs is read here, with whether each run is ending now: the queue's
        # window, which named the head, can be newer than the view (read beside it, after more round trips), so
        # a pause asked, or a run ended, since the view made another run the victim for GPUs coming back anyway.
        n = len(preemption.FIELDS)
        now_fields = [*preemption.FIELDS, "status", "pause_requested", "stop_requested"]  # (+ preempt_for in FIELDS)
        rows = await self.store.get_fields([r.job_id for r in view.running], now_fields)
        # (a record gone says here that its run ends: deleted since the view, it had ended first; counted as going
        # on, it held GPUs that were free, and another run was preempted for them: review EJ)
        ending = {r.job_id for r, row in zip(view.running, rows, strict=True)
                  if row[n] is None or is_ending(row[n], row[n + 1:])}  # fmt: skip
        running = [dataclasses.replace(r, ending=True) if r.job_id in ending else r for r in view.running]
        now = clock.now()
        candidates, under_way = preemption.candidates(running, [row[:n] for row in rows], now)
        if under_way:
            return []
        job = await self.store.get(head_id)
        if job is None or job.status != JobStatus.QUEUED or job.stop_requested or job.pause_requested:
            return []  # (one asked to stop or pause is taken out of the queue by its start, not run)
        s = self.settings
        waiting = queued_job(job.job_id, job.priority, job.created_at, job.num_gpus, job.gpu_ids_requested,
                             job.min_gpu_memory_gb)  # fmt: skip
        ends = {r.job_id: r.remaining_seconds for r in view.running if r.remaining_seconds is not None}
        victims = preemption.choose_victims(waiting, view.gpus, candidates, min_free_gb=s.GPU_MIN_FREE_MEMORY_GB,
                                            max_util=s.GPU_MAX_UTILIZATION, min_run=s.PREEMPTION_MIN_RUN_SECONDS,
                                            now=now, ends=ends)  # fmt: skip
        asked = []
        for victim in victims or []:
            try:
                await self.store.update(victim, {"preempt_for": head_id}, statuses=(JobStatus.RUNNING,), event=(
                    "preemption_requested", f"preempted for {head_id} (priority {job.priority}): the run stops, "
                    "goes back to the queue and resumes from its last checkpoint (from the beginning without one)",
                    {"by": head_id}))  # fmt: skip
            except TransitionRefused:
                continue  # it ended meanwhile: its GPUs come back anyway (and it was not preempted)
            asked.append(victim)
        if asked:
            await self.store.add_event(head_id, "preempting", f"preempting {', '.join(asked)} (lower priority) "
                                       "for their GPUs", {"victims": asked})  # fmt: skip
            logger.info("preempting {} for {}", ", ".join(asked), head_id)
        return victims or []

    async def refresh_predictions(self, version: int) -> list[QueuedJob] | None:
        """Jobs queued before anything was known of their kind get a prediction once a run teaches one (the
        history grew since the last look). Only the head of the queue: a pass never plans past it. The window
        it read, as the pass plans it, when every job in it had a prediction already (read again, it was one
        more round trip on the way from a run's end to the next start); else None: read again after the round
        trips that predicted, it leaves out a job that left the queue meanwhile (review EG)."""
        if version == self._history_seen:
            return None
        self._history_seen = version
        # Read and written in one round trip each, and predicted once per kind of job (the history's version is
        # the cache's key): one by one, it was three round trips for each of up to 256 jobs after a run's end.
        window = await self.store.queue_window(0, WINDOW)
        unknown = [job_id for job_id, meta in window if meta.estimated_duration is None]
        if not unknown:
            return [as_queued(job_id, meta) for job_id, meta in window]
        predictions = {}
        for job in await self.store.get_many(unknown):
            prediction = await self.history.predict(job, version)
            if prediction.seconds is not None:
                predictions[job.job_id] = prediction
        if found := await self.store.set_predictions(predictions):
            logger.info("{} queued job(s) got a predicted duration from the runs just recorded", found)
        return None

    async def start_run(self, job: Job, gpu_ids: list[int]) -> bool:
        """Start a run of `job` on `gpu_ids` (see `RunStarter.start`)."""
        return await self.starter.start(job, gpu_ids)
