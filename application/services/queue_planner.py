"""The queue, the GPUs and the running jobs as the pure scheduler sees them, read from the store.

Both sides use it: the scheduler (with its live GPU reading, to start jobs) and the API workers (with the
reading the scheduler published, to answer "would this start now?" and "how long will it wait?").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from application.config import Settings
from application.models.job_responses import WaitEstimate
from application.models.training_model import JobStatus, PendingReason
from application.services import clock, preemption
from application.services.gpu_pool import gpu_states, queued_job
from application.services.job_codec import QueueMeta
from application.services.job_store import JobStore
from application.services.predictions import remaining_seconds
from application.services.queue_view import PlanningState
from application.services.scheduler import (
    BACKFILL_DEPTH,
    GpuState,
    Head,
    LinkScore,
    Plan,
    Policy,
    QueuedJob,
    RunningJob,
    plan,
)
from application.services.wait_reasons import Reason, format_wait
from application.utils.gpu_types import GpuSnapshot

WINDOW = 256
# plan() looks at most BACKFILL_DEPTH blocked jobs deep, so reading further cannot start anything more.
MAX_WINDOW = 2 * BACKFILL_DEPTH
# Estimates simulate the queue forward: bounded so a request never pays for a whole long queue.
ESTIMATE_WINDOW = 1000
# A forecast of more queued jobs than this is planned in a thread (about 50 us a job), one of its own: in the
# default executor it waited behind disk work (listings, checkpoints: review EC).
THREADED_PLAN_JOBS = 100
_PLANNING = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="forecast")
# Queued jobs read past the window per pass, looking for CPU-only ones (see Planner._cpu_only_past).
DEEP_PAGE = 1024


@dataclass
class ClusterView:
    snapshot: GpuSnapshot
    gpus: list[GpuState]
    running: list[RunningJob]


# A running job's fields that say its run is being ended.
ENDING = ("preempt_for", "pause_requested", "stop_requested")


def is_ending(status: str | None, asks: Sequence[str | None]) -> bool:
    """Whether a running job's stored status and asks (raw JSON, as `ENDING` names them) say its run ends: it runs
    no more (a record gone says nothing), or it was asked to stop, pause or make way."""
    return (status is not None and json.loads(status) != JobStatus.RUNNING.value) or \
        any(raw and json.loads(raw) for raw in asks)  # fmt: skip


async def build_view(store: JobStore, snapshot: GpuSnapshot, *, reclaim: bool = False,
                     state: PlanningState | None = None) -> ClusterView:  # fmt: skip
    """GPUs with their leases, and the running jobs with their remaining time. `reclaim` (the scheduler only)
    drops leases whose job no longer runs; `state` is `JobStore.planning_state()` when already read."""
    state = state if state is not None else await store.planning_state()
    leases, running_ids = dict(state.leases), list(state.running)
    running_set = set(running_ids)
    for gpu, holder in list(leases.items()):
        if holder not in running_set:
            if reclaim and await store.drop_lease(gpu, holder) is None:
                running_set.add(holder)  # (it runs there: the index had lost it, and has it again)
                running_ids.append(holder)
                continue
            leases.pop(gpu)
    running: list[RunningJob] = []
    rows = await store.get_fields(running_ids, ["status", "gpu_ids", "predicted_duration", "started_at",
                                                "time_limit_seconds", "owner", *ENDING])  # fmt: skip
    now = clock.now()
    for job_id, (status_raw, gpu_raw, predicted_raw, started_raw, limit_raw, owner_raw, *ending) in zip(
            running_ids, rows, strict=True):  # fmt: skip
        ids = tuple(json.loads(gpu_raw)) if gpu_raw else ()
        if status_raw is None:  # (its record gone, evicted or deleted by hand: its leases say what it holds)
            ids = tuple(sorted(gpu for gpu, holder in leases.items() if holder == job_id))
        predicted = json.loads(predicted_raw).get("seconds") if predicted_raw else None
        started = json.loads(started_raw) if started_raw else None
        limit = json.loads(limit_raw) if limit_raw else None
        remaining = remaining_seconds(predicted=predicted, started_at=started, time_limit=limit, now=now)
        # A run that ended since the leases were read (its end clears the asks) counts as ending: taken for a run
        # holding its GPUs and ending never, another run was preempted for a GPU already free. Its GPUs stay held
        # in this view: a start on them waits for the next pass (the end woke it), which reads the history that
        # end taught first (the runner records it before the end), and plans with the prediction it makes.
        asked = is_ending(status_raw, ending)
        if asked:
            # Asked to stop (preempted, paused, stopped): its GPUs come back now. Planned for its predicted end, a
            # preemption's first victim, back in the queue, fitted "before" the head's reservation and took
            # back the GPU it had just freed while the other victim stopped.
            remaining = 0.0
        over = limit is not None and started is not None and now - float(started) >= float(limit)
        owner = json.loads(owner_raw) if owner_raw else None
        way = json.loads(ending[0]) if ending[0] else None  # (preempt_for)
        running.append(RunningJob(job_id=job_id, gpu_ids=ids, remaining_seconds=remaining, owner=owner,
                                  started_at=float(started) if started is not None else None, ending=asked or over,
                                  making_way_for=way if isinstance(way, str) else None))  # fmt: skip
    return ClusterView(snapshot, gpu_states(snapshot, leases), running)


def as_queued(job_id: str, meta: QueueMeta) -> QueuedJob:
    return queued_job(job_id, meta.priority, meta.submitted_at, meta.num_gpus, meta.gpu_ids, meta.min_gpu_memory_gb,
                      meta.estimated_duration, owner=meta.owner, retry_at=meta.retry_at)  # fmt: skip


async def queued(store: JobStore, count: int, start: int = 0) -> list[QueuedJob]:
    return [as_queued(job_id, meta) for job_id, meta in await store.queue_window(start, count)]


def _rank(q: QueuedJob) -> tuple[int, int, str]:
    return (-q.priority, int(q.submitted_at * 1000), q.job_id)


class Planner:
    def __init__(self, store: JobStore, settings: Settings, link_score: LinkScore | None = None) -> None:
        self.store = store
        self.settings = settings
        self.policy: Policy = settings.scheduling_policy(link_score)
        self._deep = 0  # where the next look past the window for CPU-only jobs starts

    async def plan(
        self, view: ClusterView, extra: QueuedJob | None = None, queue_length: int | None = None,
        head: Head | None = None, wanted: set[str] | None = None, clocks: dict[str, float] | None = None,
        first: list[QueuedJob] | None = None,
    ) -> Plan:  # fmt: skip
        """What a pass would start now (and the queue's head). `extra` (a job not stored yet) is ranked among
        the queue; `head` is the head as kept from earlier passes (`ClusterStore.queue_head`); `wanted` are jobs
        a user asked to start, planned behind the window when they lie past it; `first`, the first WINDOW jobs
        of the queue when the caller read them already (`queued`)."""
        queue: list[QueuedJob] = []
        size = WINDOW
        while True:
            if first is not None and not queue:
                queue.extend(first)
            elif queue_length != 0:  # an empty queue needs no read
                queue.extend(await queued(self.store, size - len(queue), start=len(queue)))
            ranked = sorted([*queue, extra], key=_rank) if extra is not None else queue
            found = plan(ranked, view.gpus, view.running, self.policy, clock.now(), estimating=False, head=head,
                         clocks=clocks)  # fmt: skip
            # Later jobs rank lower and cannot change the decisions for this prefix: look further only
            # while GPUs stay free after it.
            used = {i for s in found.starts for i in s.gpu_ids}
            any_free = any(g.held_by is None and g.readable and g.index not in used for g in view.gpus)
            if len(queue) < size or not any_free or size >= MAX_WINDOW:
                break
            size = min(size * 4, MAX_WINDOW)
        # (`extra`'s own fate does not hang on CPU-only jobs: they take no GPU.)
        if extra is not None or len(queue) < size or (queue_length is not None and queue_length <= len(queue)):
            return found
        seen = {q.job_id for q in ranked}
        deep = await self._cpu_only_past(len(queue), seen)
        # A start asked for (POST .../start, auto_start) of a job past the window: a CPU-only one started only
        # when the deep page came round to it (18 passes at 20,000 queued), and never with the processor off.
        asked = [as_queued(job_id, meta) for job_id, meta in await self.store.queue_entries(
            sorted((wanted or set()) - seen - {q.job_id for q in deep}))]  # fmt: skip
        if not deep and not asked:
            return found
        behind = sorted([*deep, *asked], key=_rank)
        window = found
        found = plan([*ranked, *behind], view.gpus, view.running, self.policy, clock.now(), estimating=False,
                     head=head, clocks=clocks)  # fmt: skip
        # Planned out of queue order, behind jobs of their priority not read: none of them heads it, nor the queue
        # (its clock started ahead of 40 jobs of its priority: reviews CM, CO). The window's heads stand.
        found.head = found.head if found.head in seen else window.head
        found.heads = [h for h in found.heads if h in seen]
        return found

    async def _cpu_only_past(self, read: int, seen: set[str]) -> list[QueuedJob]:
        """The CPU-only jobs of one page of the queue past the `read` jobs planned, a further page each pass
        (round the queue, then again). They start whatever waits ahead of them, since they take no GPU; but
        while the GPUs stay busy a pass reads only its window, and one deeper in a long queue waited for ever."""
        start = max(self._deep, read)
        page = await queued(self.store, DEEP_PAGE, start=start)
        self._deep = start + len(page) if len(page) == DEEP_PAGE else 0
        return [q for q in page if q.num_gpus == 0 and not q.gpu_ids and q.job_id not in seen]

    async def forecast(self, view: ClusterView, upto: int, head: Head | None = None,
                       clocks: dict[str, float] | None = None) -> Plan:  # fmt: skip
        """The plan for the first `upto` queued jobs (waits and why each waits); past ESTIMATE_WINDOW nobody
        can tell (they get no entry). `head`, `clocks`: as the scheduler plans with them (a forecast without the
        clocks told a job held for its priority's head that it starts at the next pass: review CM)."""
        queue = await queued(self.store, min(upto, ESTIMATE_WINDOW))
        args = (queue, view.gpus, view.running, self.policy, clock.now())
        if len(queue) > THREADED_PLAN_JOBS:
            # 40-60 ms of CPU at 1,000 jobs: in the event loop it held every other request back that long (a
            # status or a queue page of a deep job); in a thread the loop takes its turns (each its own copies).
            found = await asyncio.get_running_loop().run_in_executor(
                _PLANNING, functools.partial(plan, *args, head=head, clocks=clocks))  # fmt: skip
        else:
            found = plan(*args, head=head, clocks=clocks)
        if self.settings.PREEMPTION and found.head is not None:
            await self._preempting(found, queue, view)
        return found

    async def _preempting(self, found: Plan, queue: list[QueuedJob], view: ClusterView) -> None:
        """The head's wait when preemption frees its GPUs sooner than the runs' ends would (the scheduler preempts
        for the head only, and for a job waiting on resources, not on its owner's limits)."""
        head = found.head
        reason = found.reasons.get(head) if head is not None else None
        waiting = next((q for q in queue if q.job_id == head), None)
        if waiting is None or reason is None or reason.code not in ("resources", "reservation"):
            return
        rows = await self.store.get_fields([r.job_id for r in view.running], list(preemption.FIELDS))
        now = clock.now()
        running, under_way = preemption.candidates(view.running, rows, now)
        making_way = [r.job_id for r, (*_, way) in zip(view.running, rows, strict=True)
                      if way and json.loads(way) == waiting.job_id]  # fmt: skip
        if making_way:  # (its victims' GPUs are planned as free already: the wait stands, the reason is theirs)
            found.reasons[waiting.job_id] = Reason("preemption", making_way[0], 0.0, more=len(making_way) - 1)
            return
        if under_way:  # one preemption at a time: another job's
            return
        s = self.settings
        # A run that ends by itself (its prediction or time limit) before it may be preempted makes way without it.
        ends = {r.job_id: r.remaining_seconds for r in view.running if r.remaining_seconds is not None}
        sooner = preemption.preemption_wait(waiting, view.gpus, running, min_free_gb=s.GPU_MIN_FREE_MEMORY_GB,
                                            max_util=s.GPU_MAX_UTILIZATION, min_run=s.PREEMPTION_MIN_RUN_SECONDS,
                                            now=now, ends=ends)  # fmt: skip
        if sooner is None:
            return
        wait, victims = sooner
        planned = found.waits.get(waiting.job_id)
        if planned is None or wait < planned:
            found.waits[waiting.job_id] = wait
            found.reasons[waiting.job_id] = Reason("preemption", victims[0], wait, more=len(victims) - 1)


def wait_estimate(seconds: float | None) -> WaitEstimate | None:
    return WaitEstimate(seconds=seconds, text=format_wait(seconds)) if seconds is not None else None


def pending_reason(reason: Reason | None, now: float, stopped: str | None) -> PendingReason | None:
    """What a queued job's status says of its wait: `stopped` (why no pass runs) outranks the plan's reason;
    None when the next pass should start it."""
    if stopped is not None:
        return PendingReason(code="processor_stopped", message=stopped)
    if reason is None:
        return None
    starts_at = now + reason.starts_in if reason.starts_in is not None else None
    return PendingReason(code=reason.code, message=reason.text, job_id=reason.job_id,
                         starts_at=round(starts_at, 3) if starts_at is not None else None)  # fmt: skip
