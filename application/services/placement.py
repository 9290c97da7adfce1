"""Where a queued job stands, as its answers tell it: its position, its estimated wait and why it waits (the
create, start and resume answers, GET .../status, /queue/{id}/status)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from application.models.job_responses import WaitEstimate
from application.models.training_model import PendingReason
from application.services import clock
from application.services.cluster_store import ClusterStore
from application.services.job_store import JobStore
from application.services.queue_planner import ESTIMATE_WINDOW, ClusterView, Planner, pending_reason, wait_estimate
from application.services.scheduler import Head
from application.services.wait_reasons import Reason

# How far past a job's position its forecast reads (a plan of that many more queued jobs costs little).
CREATES_AT_ONCE = 32


@dataclass(frozen=True, slots=True)
class QueueInfo:
    position: int | None
    estimate: WaitEstimate | None
    reason: PendingReason | None


NOT_QUEUED = QueueInfo(None, None, None)


def stopped_because(enabled: bool, leading: bool, held: str | None = None) -> str | None:
    """Why no pass starts queued jobs now, or None. `held`: why the scheduler holds every start for a moment (after
    a Redis restart): the GPUs then look free, and a job that would take them waits all the same."""
    if not leading:
        return "no scheduler is running: queued jobs start when one does (python start.py)"
    if held:
        return held
    if not enabled:
        return "the queue processor is stopped: POST /queue/processor/start (or start the job explicitly)"
    return None


@dataclass(frozen=True, slots=True)
class PassState:
    """Whether passes start queued jobs: the processor's switch, a leading scheduler, and a hold of every start."""

    enabled: bool
    leading: bool
    held: str | None

    @property
    def stopped(self) -> str | None:
        return stopped_because(self.enabled, self.leading, self.held)


class Placement:
    def __init__(self, store: JobStore, cluster: ClusterStore, planner: Planner,
                 view: Callable[[], Awaitable[ClusterView]]) -> None:  # fmt: skip
        self.store = store
        self.cluster = cluster
        self.planner = planner
        self.view = view

    async def pass_state(self) -> PassState:
        (enabled, _), leader, (held, why) = await asyncio.gather(
            self.cluster.processor_switch(), self.cluster.leader(), self.cluster.starts_held()
        )
        return PassState(enabled, leader is not None, why if held > 0 else None)

    async def processor_stopped(self) -> str | None:
        """Why no pass will start queued jobs (the switch is off, no scheduler leads, or starts are held), or None."""
        return (await self.pass_state()).stopped

    async def queue_info(self, job_id: str) -> QueueInfo:
        """Where a queued job stands: its position, its estimated wait and why it waits."""
        position, stopped = await asyncio.gather(self.store.queue_position(job_id), self.processor_stopped())
        return await self.placed(job_id, position, stopped)

    async def placed(self, job_id: str, position: int | None, stopped: str | None, view: ClusterView | None = None,
                     head: Head | None = None, clocks: dict[str, float] | None = None) -> QueueInfo:  # fmt: skip
        """`queue_info` once the position and the processor's state are known (and the view, when read)."""
        for again in (False, True):
            if position is None:  # (started or gone meanwhile)
                return NOT_QUEUED
            if position > ESTIMATE_WINDOW or stopped is not None:
                # The estimate simulates the queue ahead: past this many nobody can tell, and while no pass runs
                # (no scheduler, or its switch is off) no wait can be told at all.
                reason = pending_reason(Reason("priority"), clock.now(), stopped)
                return QueueInfo(position, None, reason)
            if view is None:
                fresh, head, clocks = await asyncio.gather(self.view(), self.cluster.queue_head(),
                                                           self.store.head_clocks())  # fmt: skip
                view = fresh
            # A little past its position: jobs submitted before it but stored a moment later (creates under way
            # at once) move it back, and the plan of the first `position` jobs then no longer holds it.
            forecast = await self.planner.forecast(view, position + CREATES_AT_ONCE, head, clocks)
            if again or job_id in forecast.reasons or any(s.job_id == job_id for s in forecast.starts):
                break
            # More of them than that moved it back past the part of the queue the forecast read: where it stands
            # now.
            position = await self.store.queue_position(job_id)
        return QueueInfo(position, wait_estimate(forecast.waits.get(job_id)),
                         pending_reason(forecast.reasons.get(job_id), clock.now(), stopped))  # fmt: skip

    async def queued_message(self, reason: PendingReason | None) -> str:
        """What a start (or resume) that queued its job answers."""
        if await self.cluster.leader() is None:
            return "No scheduler is running: the job is queued and starts when one does (python start.py)"
        if reason is None or reason.code == "resources":
            return "No free GPUs now: the job was added to the GPU queue"
        # (a CPU-only job held by its owner's limit was told "No free GPUs now")
        return f"The job was added to the GPU queue: {reason.message}"
