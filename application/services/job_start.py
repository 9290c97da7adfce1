"""Starting a pending or queued job (POST .../start, and a create's `auto_start`): the checks that it can ever
start on these GPUs, its move to the queue, a scheduling pass made for it, and the answer that says where it
stands once that pass is over."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

from application.auth import Caller
from application.exceptions import Conflict, JobNotFound, refused
from application.models.job_responses import ActionResponse
from application.models.training_model import Job, JobStatus
from application.services import clock
from application.services.checkpoints import newest_checkpoint
from application.services.gpu_pool import impossible
from application.services.job_store import TransitionRefused
from application.services.owner_caps import beyond_gpu_cap
from application.services.redis_service import REDIS_AWAY, may_have_run
from application.services.wait_reasons import Reason
from application.utils.gpu_types import NO_READING

if TYPE_CHECKING:
    from application.services.training_service import TrainingService

START_WAIT_SECONDS = 5.0


async def start(svc: TrainingService, job_id: str, caller: Caller, *, gpus_checked: bool = False) -> ActionResponse:
    job = await svc.require(job_id, caller)
    if job.status not in (JobStatus.PENDING, JobStatus.QUEUED):
        raise await not_startable(job)
    # The GPUs may have changed since its create checked them, or since it was queued (a restart with fewer):
    # it would wait for ever. Refused whatever the queue processor's state, which a queued job's reason shows
    # before this. (`gpus_checked`: by the create this start follows.)
    snapshot = NO_READING if gpus_checked else await svc.gpu_snapshot()
    never = impossible(job.num_gpus, job.gpu_ids_requested, job.min_gpu_memory_gb, snapshot) \
        if snapshot.taken_at else None  # fmt: skip
    if never:
        raise Conflict(f"job '{job_id}' can never start here: {never}. Delete it and create it again with a request "
                       "these GPUs meet")  # fmt: skip
    if capped := beyond_gpu_cap(job.num_gpus, job.owner, svc.settings.MAX_GPUS_PER_OWNER):
        raise Conflict(f"job '{job_id}' can never start: {capped}")
    if job.status == JobStatus.PENDING:
        try:
            await svc.store.transition(job_id, JobStatus.QUEUED, expect=(JobStatus.PENDING,), actor=caller.actor,
                                       message="start requested: queued for the scheduler",
                                       created_at=job.created_at)  # fmt: skip
        except TransitionRefused as exc:
            if exc.current not in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
                raise refused(job_id, exc, "job '{id}' is {status} now: it cannot be started") from None
            # Another start queued it first (a retried request, a colleague), and its pass may have started it
            # already (a pending job has never run: only a start since this one's read did that). Answered as
            # that start is, not a 409 that says it cannot be started.
            return await answer_start(svc, job_id, job.created_at)
    # An explicit start, of a pending or a queued job: the leader makes a pass for it now, even with the processor
    # switched off or the job deep in a long queue (a wake-up alone started neither).
    try:
        if await svc.cluster.leader() is not None:
            await svc.cluster.request_pass(uuid.uuid4().hex, START_WAIT_SECONDS, only=[job_id])
    except REDIS_AWAY as exc:
        if not may_have_run(exc):  # (a request that never went out: with the processor off, none would start it)
            raise
        # Asked for, its answer lost: the pass starts it all the same; answered as the job stands.
    return await answer_start(svc, job_id, job.created_at, just_queued=job.status == JobStatus.PENDING)


async def answer_start(svc: TrainingService, job_id: str, created_at: float,
                       just_queued: bool = False) -> ActionResponse:  # fmt: skip
    """Where a started job stands now, read again: running, queued (where, and why it waits), over already, or
    failed to launch; cancelled meanwhile is a 409 (it was answered "queued"), deleted meanwhile a 404."""
    job = await svc.job(job_id)
    if job.created_at != created_at:  # (its id taken again since: not this start's job)
        raise JobNotFound(job_id)
    if job.status == JobStatus.RUNNING:
        where = f"GPUs {job.gpu_ids}" if job.gpu_ids else "the CPU"
        return ActionResponse(job_id=job_id, status=job.status, gpu_ids=job.gpu_ids,
                              message=f"Training started on {where}")  # fmt: skip
    if job.status == JobStatus.FAILED:
        said = f": {job.error_message}" if job.error_message else ""
        return ActionResponse(job_id=job_id, status=job.status, message=f"The job is {job.status.value}{said}")
    if job.status == JobStatus.COMPLETED:  # (a short run, over before this answer read it: not a 409)
        return ActionResponse(job_id=job_id, status=job.status, message="Training started and has completed")
    if job.status != JobStatus.QUEUED:
        raise await not_startable(job)
    info = await svc.placement.queue_info(job_id)
    message = "The job is queued: it starts by itself when its GPUs are free"
    if just_queued:
        message = await svc.placement.queued_message(info.reason)
    elif info.reason is not None and info.reason.code == "processor_stopped":
        state = await svc.placement.pass_state()
        message = f"The job is queued: {info.reason.message}"
        backoff = job.retry_at - clock.now() if job.retry_at is not None else 0.0
        if backoff > 0:
            # Its backoff is what a start waits for first, not its GPUs (review DW: "when its GPUs are free").
            message += f"; and {Reason('retry_backoff', starts_in=backoff).text}"
        elif state.leading and not state.held and not state.enabled:
            # Not "it starts by itself": no pass does while the switch is off, and the pass made for this start
            # (which starts a job whatever the switch) did not start it.
            message = (
                "The job is queued and could not start now; nothing starts it by itself while the queue "
                "processor is stopped: POST /queue/processor/start, or start it again when its GPUs are free"
            )
    elif info.reason is not None and info.reason.code == "retry_backoff":  # (a start does not cut it short)
        message = f"The job is queued: {info.reason.message}"
    elif info.reason is not None and info.reason.code == "never":
        # Not started, as a pending job that can never start is not (409): this start changed nothing.
        # (Unless the operator's setting is why: the job starts by itself once it is lowered.)
        cannot = "cannot start while" if "GPU_MIN_FREE_MEMORY_GB" in info.reason.message else "can never start here:"
        raise Conflict(f"job '{job_id}' is queued but {cannot} {info.reason.message}")
    return ActionResponse(job_id=job_id, status=job.status, queue_position=info.position,
                          estimated_wait_time=info.estimate, pending_reason=info.reason,
                          message=message)  # fmt: skip


async def not_startable(job: Job) -> Conflict:
    job_id = job.job_id
    hint = ""
    if job.status == JobStatus.PAUSED:
        hint = f"; resume it with POST .../jobs/{job_id}/resume"
    elif job.status in (JobStatus.STOPPED, JobStatus.FAILED):
        # (as the resume decides: offered only when it would be taken)
        if await asyncio.to_thread(newest_checkpoint, job):
            hint = f"; resume it from its last checkpoint with POST .../jobs/{job_id}/resume, or create a new job"
        else:
            hint = "; it left no checkpoint to resume from: create a new job"
        hint += " to train again"
    elif job.status != JobStatus.RUNNING:
        hint = "; create a new job to train again"
    return Conflict(f"job '{job_id}' is {job.status.value}: only a pending job can be started{hint}")
