"""Creating a job (POST /jobs): the checks made before it is stored (limits, GPUs, ms-swift arguments, paths, the
data set and model: a job that could not start is refused now, not after its wait), its record stored under a free
id, and the answer that says where it stands (started with `auto_start`, or its place and wait in the queue)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from application.auth import Caller
from application.exceptions import Conflict, Invalid, JobNotFound, Unavailable
from application.models.job_request import JobCreate, TrainingParams
from application.models.job_responses import CreateResponse
from application.models.training_model import Job, JobStatus
from application.services import clock
from application.services.cluster_store import CreateContext
from application.services.dataset_rows import data_needs
from application.services.folder_owners import folder_arg, foreign_output_dir
from application.services.gpu_pool import gpu_states, impossible_request, never_free, queued_job
from application.services.idempotency import claim_lost
from application.services.job_store import Claim, Refusal, TransitionRefused
from application.services.lost_replies import created_anyway, own_create
from application.services.path_sandbox import all_of, real_output_root
from application.services.placement import stopped_because
from application.services.preflight import CheckedRequest, check_request, check_swift_request, runs_inline
from application.services.queue_planner import ESTIMATE_WINDOW, ClusterView, build_view
from application.services.redis_service import REDIS_AWAY
from application.services.scheduler import QueuedJob, gpu_is_free
from application.services.swift_arguments import DATA_ARGUMENTS, require_usable_swift
from application.services.webhook_addresses import refuse_undeliverable
from application.utils.gpu_types import GpuSnapshot, snapshot_of

if TYPE_CHECKING:
    from application.services.training_service import TrainingService

# Ids tried from one output folder's name (`<name>`, `<name>-2`, ... `<name>-999`) before the create asks for a
# job_id.
MAX_ID_TRIES = 999
# The id a create's job is planned under before it is stored (no job id can start with a space).
NEW_JOB = " new job"


def job_id_from(output_dir: Path) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", output_dir.name).lstrip("._-")[:100]
    return base or "job"


async def create(svc: TrainingService, req: JobCreate, caller: Caller, claim: Claim | None) -> CreateResponse:
    """`claim`: the request's Idempotency-Key claim, which must still hold when the job is stored."""
    # One round trip: the caller's limits, what the scheduler published, and what a plan needs.
    ctx = await svc.limits.read(caller)
    snapshot = snapshot_of(ctx.snapshot)
    _refuse_at_once(svc, req, caller, snapshot, ctx)
    job, folder, uploads = await _checked_job(svc, req, caller, ctx)
    fits, view = await _fits(svc, job, snapshot, ctx)
    if not fits:
        job.status = JobStatus.QUEUED
        job.queued_at = job.created_at
    message = "Training job created" if fits else "Training job created and added to the GPU queue"
    position = await _store(svc, job, req, caller, message, uploads=uploads, folder=folder, claim=claim)
    if job.status == JobStatus.PENDING and req.auto_start:
        return await _auto_start(svc, job, caller)
    if job.status == JobStatus.QUEUED:
        return await _queued_answer(svc, job, position, message, snapshot, ctx, view)
    return CreateResponse(job_id=job.job_id, status=job.status, message=message,
                          predicted_duration=job.predicted_duration)  # fmt: skip


def _refuse_at_once(svc: TrainingService, req: JobCreate, caller: Caller, snapshot: GpuSnapshot,
                    ctx: CreateContext) -> None:  # fmt: skip
    """What the request alone, with what the scheduler published, says it can never do here."""
    s = svc.settings
    reason = impossible_request(req, snapshot) if snapshot.taken_at else None
    if reason:
        raise Invalid(reason)
    if snapshot.taken_at and (setting := never_free(snapshot, s.GPU_MIN_FREE_MEMORY_GB, req.num_gpus)):
        raise Unavailable(setting)
    cap = s.MAX_GPUS_PER_OWNER
    if cap and caller.name is not None and req.num_gpus > cap:
        raise Invalid(f"num_gpus={req.num_gpus} is more than one owner may hold (MAX_GPUS_PER_OWNER={cap})")
    require_usable_swift(ctx.swift)
    # Even one of the operator's URLs: let through, it told a user who guessed one that it was (hunt DF).
    if req.webhook_url and not s.WEBHOOK_ALLOW_PRIVATE:
        refuse_undeliverable(req.webhook_url)


async def _checked_job(svc: TrainingService, req: JobCreate, caller: Caller,
                       ctx: CreateContext) -> tuple[Job, dict[str, Any], list[str]]:  # fmt: skip
    """The job as it would be stored, its inputs checked; with its folder's entry and the uploads it names."""
    data_path, extra = await svc.files.with_upload_paths(req.data_path, req.training.extra_arguments, caller)
    swift = await svc.swift_info(ctx.swift)
    arguments = check_swift_request(req, extra, swift, pending=ctx.swift is None)
    # Paths, data set and model are checked before the job takes a queue slot: a job that cannot start
    # fails now, not after its wait. Disk work, so in a thread unless it is only an lstat or two.
    # A key's owner may not use another owner's job folders (folder_owners); an admin, or everyone on a
    # server without keys, may.
    output_root = real_output_root(svc.settings.OUTPUT_ROOT)
    guard = await svc.store.folders.guard(output_root, caller, indexed=ctx.folders_indexed)
    check = functools.partial(
        check_request, data_path, req.model_path, req.output_dir, model_type=req.training.model_type,
        template=req.training.template, settings=svc.settings, info=swift,
        needs=data_needs(req.kind, req.rlhf_type), arguments=arguments,
        guard=all_of(guard, svc.files.upload_guard(caller)),
    )  # fmt: skip
    # Inline, no path but the output folder's is looked at: the guard is never called.
    inline = runs_inline(data_path, req.model_path, arguments, output_on_local_disk=svc.output_on_local_disk,
                         roots=svc.root_names)  # fmt: skip
    checked = check() if inline else await svc.checks.run(caller.name, check)
    # Uploads named by their path are recorded with the job (another owner's is refused: their folder also
    # lies inside DATA_ROOTS).
    data_sets = [checked.data_path, *(v for n in DATA_ARGUMENTS for v in _as_list(checked.arguments.get(n)))]
    uploads = svc.files.uploads_named([v for v in data_sets if isinstance(v, str)], caller)
    job = _job(req, caller, checked, owner_checked=guard is not None, extra=bool(extra))
    job.predicted_duration = await svc.history.predict(job, ctx.history_version)
    job.queued_prediction = job.predicted_duration if job.predicted_duration.seconds is not None else None
    folder = folder_arg(checked.output_dir, output_root, caller.name)
    folder["check"] = guard is not None
    folder["is_file"] = checked.output_is_file
    return job, folder, uploads


def _job(req: JobCreate, caller: Caller, checked: CheckedRequest, *, owner_checked: bool, extra: bool) -> Job:
    training = req.training
    if extra:  # stored converted (or left out, for a null): what the command is built from
        named = req.training.model_dump(include=set(TrainingParams.model_fields))
        training = TrainingParams.model_validate({**named, **checked.arguments})
    now = clock.now()
    return Job(
        job_id=req.job_id or job_id_from(checked.output_dir), status=JobStatus.PENDING, priority=req.priority,
        owner=caller.name, owner_checked=owner_checked,
        data_path=checked.data_path, model_path=checked.model_path, output_dir=str(checked.output_dir),
        output_dir_requested=req.output_dir, dataset_rows=checked.dataset.rows if checked.dataset else None,
        num_gpus=req.num_gpus, gpu_ids_requested=req.gpu_ids, min_gpu_memory_gb=req.min_gpu_memory_gb,
        kind=req.kind, rlhf_type=req.rlhf_type, training=training, created_at=now, updated_at=now,
        time_limit_seconds=req.time_limit_seconds, max_retries=req.max_retries, webhook_url=req.webhook_url,
    )  # fmt: skip


async def _fits(svc: TrainingService, job: Job, snapshot: GpuSnapshot,
                ctx: CreateContext) -> tuple[bool, ClusterView | None]:  # fmt: skip
    """Would a pass start this job now (and the view it planned on, when it needed one)? Cheap when the
    answer is plainly no (not enough free GPUs), or plainly yes (a CPU-only job: every pass starts those)."""
    k = len(job.gpu_ids_requested or ()) or job.num_gpus
    if k == 0:
        return True, None
    s = svc.settings
    free = [
        g
        for g in gpu_states(snapshot, ctx.leases)
        if gpu_is_free(g, min_free_gb=s.GPU_MIN_FREE_MEMORY_GB, max_util=s.GPU_MAX_UTILIZATION)
    ]
    if len(free) < k:
        return False, None
    view = await build_view(svc.store, snapshot, state=ctx.planning_state)
    # Planned under an id no job can have: the id derived from output_dir may still be another job's (the store
    # then gives this one `-2`, ...), and a pass never starts a job under the id of one that runs or waits.
    candidate = dataclasses.replace(_queued(job), job_id=NEW_JOB)
    found = await svc.planner.plan(view, extra=candidate, queue_length=ctx.queue_length, head=ctx.head,
                                   clocks=ctx.clocks)  # fmt: skip
    return any(s.job_id == NEW_JOB for s in found.starts), view


async def _store(svc: TrainingService, job: Job, req: JobCreate, caller: Caller, message: str, *,
                 uploads: list[str], folder: dict[str, Any], claim: Claim | None) -> int | None:  # fmt: skip
    """Stores the job under its id, or the next free one made from its folder's name; its queue position."""
    base_id = job.job_id
    for attempt in range(1, MAX_ID_TRIES + 1):
        try:
            return await svc.store.create(job, message=message, actor=caller.actor,
                                          max_waiting=svc.limits.max_waiting, uploads=uploads,
                                          folder=folder, claim=claim)  # fmt: skip
        except REDIS_AWAY as exc:  # (it may have been stored all the same: looked for)
            return await created_anyway(svc.store, job, exc)
        except TransitionRefused as exc:
            if exc.reason == Refusal.EXISTS and await own_create(svc.store, job):
                return await svc.store.queue_position(job.job_id) if job.status == JobStatus.QUEUED else None
            await _refused(svc, exc, req, caller)
            job.job_id = f"{base_id}-{attempt + 1}"
    raise Conflict(f"every job id from '{base_id}' to '{base_id}-{MAX_ID_TRIES}' is taken: pass a job_id")


async def _refused(svc: TrainingService, exc: TransitionRefused, req: JobCreate, caller: Caller) -> None:
    """The store's refusal as the client's error; returns only for an id taken that the create may change."""
    if exc.reason == Refusal.WAITING_CAP:
        raise svc.limits.over_cap(caller.name, int(exc.detail or 0)) from None
    if exc.reason == Refusal.CLAIM_LOST:
        raise claim_lost() from None
    if exc.reason == Refusal.UPLOAD_GONE:
        raise Invalid(f"uploaded file '{exc.detail}' was deleted while this job was being created: "
                      "upload it again (POST /files)") from None  # fmt: skip
    if exc.reason == Refusal.FOREIGN_FOLDER:
        raise foreign_output_dir(req.output_dir) from None
    if exc.reason == Refusal.OUTPUT_IS_FILE:
        raise Invalid(f"output_dir '{req.output_dir}' is a file, or lies under one: name a folder (one "
                      "that does not exist yet is made)") from None  # fmt: skip
    if exc.reason == Refusal.OUTPUT_DIR_BUSY:
        holder = exc.detail if caller.owns(await svc.store.get_field(exc.detail or "", "owner")) else None
        raise Conflict(
            f"output_dir '{req.output_dir}' is in use by "
            + (f"active job '{holder}'" if holder else "another active job")
            + ": wait for it to end or choose another folder"
        ) from None
    if req.job_id:
        raise Conflict(f"job_id '{req.job_id}' is taken: choose another or leave job_id out") from None


async def _auto_start(svc: TrainingService, job: Job, caller: Caller) -> CreateResponse:
    try:
        started = await svc.start(job.job_id, caller, gpus_checked=True)
    except (JobNotFound, Conflict, *REDIS_AWAY):
        # A delete or a stop of the job came between its create and its start, or Redis lost the start's
        # answer: the create stands, answered as the job is now (or, Redis still away, as it was made).
        with contextlib.suppress(*REDIS_AWAY):
            return await _overtaken(svc, job)
        return CreateResponse(job_id=job.job_id, status=job.status, predicted_duration=job.predicted_duration,
                              message=f"Training job created; Redis did not say whether it started: look "
                              f"(GET .../jobs/{job.job_id}), and start it (POST .../start) if it is still "
                              "pending")  # fmt: skip
    return CreateResponse(**started.model_dump(include={"job_id", "status", "message", "queue_position",
                                                        "estimated_wait_time", "pending_reason", "gpu_ids"}),
                          predicted_duration=job.predicted_duration)  # fmt: skip


async def _overtaken(svc: TrainingService, job: Job) -> CreateResponse:
    now = await svc.store.get(job.job_id)
    if now is None or now.created_at != job.created_at:  # (its id freed, and perhaps taken again)
        status, message = job.status, "Training job created, then deleted before it could start"
    elif now.status == JobStatus.PENDING:  # (its start lost a race with a change of its priority)
        status, message = now.status, "Training job created; it did not start: start it with POST .../start"
    else:
        status, message = now.status, f"Training job created, then {now.status.value} before it could start"
    return CreateResponse(job_id=job.job_id, status=status, message=message, predicted_duration=job.predicted_duration)


async def _queued_answer(svc: TrainingService, job: Job, position: int | None, message: str, snapshot: GpuSnapshot,
                         ctx: CreateContext, view: ClusterView | None) -> CreateResponse:  # fmt: skip
    # What the create read already is the view a forecast needs (its leases and running jobs are from
    # a moment ago; the queue is read again, with this job in it).
    stopped = stopped_because(ctx.processor_enabled, ctx.leader is not None, ctx.starts_held)
    forecast = stopped is None and position is not None and position <= ESTIMATE_WINDOW
    try:
        if forecast and view is None:
            view = await build_view(svc.store, snapshot, state=ctx.planning_state)
        info = await svc.placement.placed(job.job_id, position, stopped, view, ctx.head, ctx.clocks)
    except REDIS_AWAY:
        # The job is stored: a 503 "may have been carried out" for it had the retry refused as a second job
        # in its folder. Answered without the estimate, which GET .../queue/{id} gives.
        return CreateResponse(job_id=job.job_id, status=job.status, queue_position=position,
                              predicted_duration=job.predicted_duration,
                              message=f"{message}; Redis did not answer for its wait estimate: see GET "
                              f".../queue/{job.job_id}/status")  # fmt: skip
    return CreateResponse(job_id=job.job_id, status=job.status, message=message, queue_position=info.position,
                          estimated_wait_time=info.estimate, pending_reason=info.reason,
                          predicted_duration=job.predicted_duration)  # fmt: skip


def _queued(job: Job) -> QueuedJob:
    return queued_job(job.job_id, job.priority, job.created_at, job.num_gpus, job.gpu_ids_requested,
                      job.min_gpu_memory_gb, job.predicted_duration.seconds, owner=job.owner)  # fmt: skip


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]
