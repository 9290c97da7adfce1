"""TrainingService: the thin coordinator behind the job endpoints, in the (stateless) API workers.

API workers start no process and run no background task: they read and write the store, and ask the
scheduler for what needs process control through it (a job queued wakes the leader; a stop is a flag the
run's runner acts on; an export is a request the leader's watchdog launches). Policy lives elsewhere:
scheduling in `scheduler` (pure, shared with the scheduler through `queue_planner`), the checks before a
job is stored in `preflight`, state in `job_store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from application.auth import Caller
from application.config import Settings
from application.exceptions import Conflict, Invalid, JobNotFound, NotFound, Unavailable, refused
from application.models.job_request import JobCreate, TrainingParams
from application.models.job_responses import (
    ActionResponse,
    CreateResponse,
    EventList,
    LogsResponse,
    ProgressResponse,
    StatusResponse,
)
from application.models.training_model import ExportStatus, Job, JobStatus
from application.services import clock, job_start
from application.services.checkpoints import newest_checkpoint
from application.services.cluster_store import ClusterStore, CreateContext
from application.services.dataset_rows import data_needs
from application.services.exports import EXPORT_LIST, exports_as_they_stand, settle
from application.services.files import FileStore
from application.services.folder_owners import folder_arg, foreign_output_dir
from application.services.gpu_pool import gpu_states, impossible_request, never_free, queued_job
from application.services.idempotency import claim_lost
from application.services.index_pages import cursor_text, one_way
from application.services.job_store import Claim, JobStore, Refusal, TransitionRefused, joined
from application.services.limits import CreateLimits
from application.services.lost_replies import created_anyway, own_create
from application.services.path_sandbox import all_of, real_output_root
from application.services.placement import NOT_QUEUED, Placement, stopped_because
from application.services.point_ids import POINTS_PER_STEP, format_id, keys_of
from application.services.preflight import check_request, check_swift_request, runs_inline
from application.services.queue_planner import (
    ESTIMATE_WINDOW,
    ClusterView,
    Planner,
    build_view,
)
from application.services.redis_service import REDIS_AWAY
from application.services.run_history import RunHistory
from application.services.scheduler import QueuedJob, gpu_is_free
from application.services.swift_arguments import DATA_ARGUMENTS, require_usable_swift
from application.services.swift_info import SwiftInfo
from application.services.webhooks import refuse_undeliverable
from application.utils.filesystems import on_local_disk
from application.utils.gpu_types import GpuSnapshot, snapshot_of
from application.utils.log_tail import page_lines

# How much longer than its grace a stop waits for the runner to end the run (a start waits START_WAIT_SECONDS).
STOP_EXTRA_SECONDS = 10.0


def job_id_from(output_dir: Path) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", output_dir.name).lstrip("._-")[:100]
    return base or "job"


class TrainingService:
    def __init__(self, settings: Settings, store: JobStore, cluster: ClusterStore) -> None:
        self.settings = settings
        self.store = store
        self.cluster = cluster
        self.limits = CreateLimits(settings, store.keys, cluster)
        self.planner = Planner(store, settings)
        self.history = RunHistory(store.r, store.keys)
        self.started_at = time.time()
        self._swift: tuple[str, SwiftInfo | None] | None = None
        # Read here, at start-up, so that no request makes this filesystem call (README "Benchmarks").
        self.output_on_local_disk = on_local_disk(settings.OUTPUT_ROOT)
        self.files = FileStore(settings, store.r, store.keys)
        self.placement = Placement(store, cluster, self.planner, self.view)

    # ---- what the scheduler published ---------------------------------------------------------------

    async def gpu_snapshot(self) -> GpuSnapshot:
        return snapshot_of(await self.cluster.gpu_snapshot())

    async def view(self, snapshot: GpuSnapshot | None = None) -> ClusterView:
        return await build_view(self.store, snapshot or await self.gpu_snapshot())

    async def swift_info(self, meta: dict[str, Any] | None) -> SwiftInfo | None:
        """The installed ms-swift's argument and model registry as the scheduler probed it: the big probe is read
        again only when the scheduler publishes a new one (its stamp in `meta` changes)."""
        if meta is None:
            return None
        stamp = str(meta.get("stamp"))
        if self._swift is None or self._swift[0] != stamp:
            probe = await self.cluster.swift_probe() if meta.get("probed") else None
            self._swift = (stamp, SwiftInfo.from_json(probe) if probe else None)
        return self._swift[1]

    async def _fits(self, job: Job, snapshot: GpuSnapshot, ctx: CreateContext) -> tuple[bool, ClusterView | None]:
        """Would a pass start this job now (and the view it planned on, when it needed one)? Cheap when the
        answer is plainly no (not enough free GPUs), or plainly yes (a CPU-only job: every pass starts those)."""
        k = len(job.gpu_ids_requested or ()) or job.num_gpus
        if k == 0:
            return True, None
        s = self.settings
        free = [
            g
            for g in gpu_states(snapshot, ctx.leases)
            if gpu_is_free(g, min_free_gb=s.GPU_MIN_FREE_MEMORY_GB, max_util=s.GPU_MAX_UTILIZATION)
        ]
        if len(free) < k:
            return False, None
        view = await build_view(self.store, snapshot, state=ctx.planning_state)
        found = await self.planner.plan(view, extra=_queued(job), queue_length=ctx.queue_length, head=ctx.head,
                                        clocks=ctx.clocks)  # fmt: skip
        return any(s.job_id == job.job_id for s in found.starts), view

    # ---- jobs ---------------------------------------------------------------------------------------

    async def require(self, job_id: str, caller: Caller) -> Job:
        """The job, if this caller may see it; another owner's job is as missing as a deleted one."""
        job = await self.store.get(job_id)
        if job is None or not caller.owns(job.owner):
            raise JobNotFound(job_id)
        return job

    async def own_ids(self, job_ids: Iterable[str], caller: Caller) -> set[str]:
        """Those of `job_ids` (a page's few) that the caller may open: pages link only to those."""
        ids = sorted(set(job_ids))
        if caller.is_admin:
            return set(ids)
        rows = await self.store.get_fields(ids, ["owner"])
        return {i for i, (owner,) in zip(ids, rows, strict=True) if owner and caller.owns(json.loads(owner))}

    async def job(self, job_id: str) -> Job:
        """The job whoever may see it (for actions already authorized)."""
        return await self._job(job_id)

    async def _job(self, job_id: str) -> Job:
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def create(self, req: JobCreate, caller: Caller, claim: Claim | None = None) -> CreateResponse:
        """`claim`: the request's Idempotency-Key claim, which must still hold when the job is stored."""
        # One round trip: the caller's limits, what the scheduler published, and what a plan needs.
        ctx = await self.limits.read(caller)
        snapshot, meta = snapshot_of(ctx.snapshot), ctx.swift
        reason = impossible_request(req, snapshot) if snapshot.taken_at else None
        if reason:
            raise Invalid(reason)
        if snapshot.taken_at and (setting := never_free(snapshot, self.settings.GPU_MIN_FREE_MEMORY_GB, req.num_gpus)):
            raise Unavailable(setting)
        cap = self.settings.MAX_GPUS_PER_OWNER
        if cap and caller.name is not None and req.num_gpus > cap:
            raise Invalid(f"num_gpus={req.num_gpus} is more than one owner may hold (MAX_GPUS_PER_OWNER={cap})")
        require_usable_swift(meta)
        # (A URL of the operator's own is posted to as theirs, unchecked.)
        if req.webhook_url and not self.settings.WEBHOOK_ALLOW_PRIVATE and \
                req.webhook_url not in self.settings.webhook_urls():  # fmt: skip
            refuse_undeliverable(req.webhook_url)
        data_path, extra = await self.files.with_upload_paths(req.data_path, req.training.extra_arguments, caller)
        swift = await self.swift_info(meta)
        arguments = check_swift_request(req, extra, swift, pending=meta is None)
        # Paths, data set and model are checked before the job takes a queue slot: a job that cannot start
        # fails now, not after its wait. Disk work, so in a thread unless it is only an lstat or two.
        # A key's owner may not use another owner's job folders (folder_owners); an admin, or everyone on a
        # server without keys, may.
        output_root = real_output_root(self.settings.OUTPUT_ROOT)
        guard = await self.store.folders.guard(output_root, caller, indexed=ctx.folders_indexed)
        check = functools.partial(
            check_request, data_path, req.model_path, req.output_dir, model_type=req.training.model_type,
            template=req.training.template, settings=self.settings, info=swift,
            needs=data_needs(req.kind, req.rlhf_type), arguments=arguments,
            guard=all_of(guard, self.files.upload_guard(caller)),
        )  # fmt: skip
        # Inline, no path but the output folder's is looked at: the guard is never called.
        inline = runs_inline(data_path, req.model_path, arguments, output_on_local_disk=self.output_on_local_disk)
        checked = check() if inline else await asyncio.to_thread(check)
        # Uploads named by their path are recorded with the job (another owner's is refused: their folder also
        # lies inside DATA_ROOTS).
        data_sets = [checked.data_path, *(v for n in DATA_ARGUMENTS for v in _as_list(checked.arguments.get(n)))]
        uploads = self.files.uploads_named([v for v in data_sets if isinstance(v, str)], caller)
        training = req.training
        if extra:  # stored converted (or left out, for a null): what the command is built from
            named = req.training.model_dump(include=set(TrainingParams.model_fields))
            training = TrainingParams.model_validate({**named, **checked.arguments})
        base_id = req.job_id or job_id_from(checked.output_dir)
        now = clock.now()
        job = Job(
            job_id=base_id, status=JobStatus.PENDING, priority=req.priority, owner=caller.name,
            owner_checked=guard is not None,
            data_path=checked.data_path, model_path=checked.model_path, output_dir=str(checked.output_dir),
            output_dir_requested=req.output_dir, dataset_rows=checked.dataset.rows if checked.dataset else None,
            num_gpus=req.num_gpus, gpu_ids_requested=req.gpu_ids, min_gpu_memory_gb=req.min_gpu_memory_gb,
            kind=req.kind, rlhf_type=req.rlhf_type, training=training, created_at=now, updated_at=now,
            time_limit_seconds=req.time_limit_seconds, max_retries=req.max_retries, webhook_url=req.webhook_url,
        )  # fmt: skip
        job.predicted_duration = await self.history.predict(job, ctx.history_version)
        job.queued_prediction = job.predicted_duration if job.predicted_duration.seconds is not None else None
        fits, view = await self._fits(job, snapshot, ctx)
        if not fits:
            job.status = JobStatus.QUEUED
            job.queued_at = now
        message = "Training job created" if fits else "Training job created and added to the GPU queue"
        folder = folder_arg(checked.output_dir, output_root, caller.name)
        folder["check"] = guard is not None
        folder["is_file"] = checked.output_is_file
        for attempt in range(1, 1000):
            try:
                position = await self.store.create(job, message=message, actor=caller.actor,
                                                   max_waiting=self.limits.max_waiting, uploads=uploads,
                                                   folder=folder, claim=claim)  # fmt: skip
                break
            except REDIS_AWAY as exc:  # (it may have been stored all the same: looked for)
                position = await created_anyway(self.store, job, exc)
                break
            except TransitionRefused as exc:
                if exc.reason == Refusal.EXISTS and await own_create(self.store, job):
                    position = await self.store.queue_position(job.job_id) if job.status == JobStatus.QUEUED else None
                    break
                if exc.reason == Refusal.WAITING_CAP:
                    raise self.limits.over_cap(caller.name, int(exc.detail or 0)) from None
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
                    holder = exc.detail if caller.owns(await self.store.get_field(exc.detail or "", "owner")) else None
                    raise Conflict(
                        f"output_dir '{req.output_dir}' is in use by "
                        + (f"active job '{holder}'" if holder else "another active job")
                        + ": wait for it to end or choose another folder"
                    ) from None
                if req.job_id:
                    raise Conflict(f"job_id '{req.job_id}' is taken: choose another or leave job_id out") from None
                job.job_id = f"{base_id}-{attempt + 1}"
        else:
            raise Conflict(f"every job id from '{base_id}' to '{job.job_id}' is taken: pass a job_id")
        if job.status == JobStatus.PENDING and req.auto_start:
            try:
                started = await self.start(job.job_id, caller, gpus_checked=True)
            except (JobNotFound, Conflict, *REDIS_AWAY):
                # A delete or a stop of the job came between its create and its start, or Redis lost the start's
                # answer: the create stands, answered as the job is now (or, Redis still away, as it was made).
                with contextlib.suppress(*REDIS_AWAY):
                    return await self._overtaken(job)
                return CreateResponse(job_id=job.job_id, status=job.status, predicted_duration=job.predicted_duration,
                                      message=f"Training job created; Redis did not say whether it started: look "
                                      f"(GET .../jobs/{job.job_id}), and start it (POST .../start) if it is still "
                                      "pending")  # fmt: skip
            return CreateResponse(**started.model_dump(include={"job_id", "status", "message", "queue_position",
                                                                "estimated_wait_time", "pending_reason"}),
                                  predicted_duration=job.predicted_duration)  # fmt: skip
        if job.status == JobStatus.QUEUED:
            # What the create read already is the view a forecast needs (its leases and running jobs are from
            # a moment ago; the queue is read again, with this job in it).
            stopped = stopped_because(ctx.processor_enabled, ctx.leader is not None, ctx.starts_held)
            forecast = stopped is None and position is not None and position <= ESTIMATE_WINDOW
            try:
                if forecast and view is None:
                    view = await build_view(self.store, snapshot, state=ctx.planning_state)
                info = await self.placement.placed(job.job_id, position, stopped, view, ctx.head, ctx.clocks)
            except REDIS_AWAY:
                # The job is stored: a 503 "may have been carried out" for it had the retry refused as a second job
                # in its folder (hunt BH). Answered without the estimate, which GET .../queue/{id} gives.
                return CreateResponse(job_id=job.job_id, status=job.status, queue_position=position,
                                      predicted_duration=job.predicted_duration,
                                      message=f"{message}; Redis did not answer for its wait estimate: see GET "
                                      f".../queue/{job.job_id}/status")  # fmt: skip
            return CreateResponse(job_id=job.job_id, status=job.status, message=message, queue_position=info.position,
                                  estimated_wait_time=info.estimate, pending_reason=info.reason,
                                  predicted_duration=job.predicted_duration)  # fmt: skip
        return CreateResponse(job_id=job.job_id, status=job.status, message=message,
                              predicted_duration=job.predicted_duration)  # fmt: skip

    async def _overtaken(self, job: Job) -> CreateResponse:
        now = await self.store.get(job.job_id)
        if now is None or now.created_at != job.created_at:  # (its id freed, and perhaps taken again)
            status, message = job.status, "Training job created, then deleted before it could start"
        elif now.status == JobStatus.PENDING:  # (its start lost a race with a change of its priority)
            status, message = now.status, "Training job created; it did not start: start it with POST .../start"
        else:
            status, message = now.status, f"Training job created, then {now.status.value} before it could start"
        return CreateResponse(
            job_id=job.job_id, status=status, message=message, predicted_duration=job.predicted_duration
        )

    async def start(self, job_id: str, caller: Caller, *, gpus_checked: bool = False) -> ActionResponse:
        """A pending job joins the queue at its place (priority, submission time) and the scheduler starts it
        when its GPUs are free: at once when they are now (`job_start`)."""
        return await job_start.start(self, job_id, caller, gpus_checked=gpus_checked)

    async def leave_queue(self, job: Job, message: str, caller: Caller) -> JobStatus:
        """A waiting job taken out: cancelled, or stopped when it ran before and left a checkpoint (resumed,
        preempted, retried: POST .../resume goes on from it, as for a paused job that is stopped)."""
        to = JobStatus.CANCELLED
        ran = job.status == JobStatus.QUEUED and bool(job.attempts)
        if ran and await asyncio.to_thread(newest_checkpoint, job) is not None:
            to, message = JobStatus.STOPPED, "stopped while it waited to run again"
        # (a stop or a start in between: the caller reads the job again, or says it changed)
        await self.store.transition(job.job_id, to, expect=(job.status,), message=message, actor=caller.actor,
                                    created_at=job.created_at)  # fmt: skip
        return to

    async def status(self, job_id: str, caller: Caller) -> StatusResponse:
        job = await self.require(job_id, caller)
        info = await self.placement.queue_info(job_id) if job.status == JobStatus.QUEUED else NOT_QUEUED
        return StatusResponse(
            job_id=job.job_id, status=job.status, priority=job.priority, gpu_ids=job.gpu_ids, progress=job.progress,
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            duration_seconds=job.duration_seconds(clock.now()), error_message=job.error_message,
            error_code=job.error_code, export=job.export, queue_position=info.position,
            estimated_wait_time=info.estimate, pending_reason=info.reason, time_limit_seconds=job.time_limit_seconds,
            predicted_duration=job.predicted_duration,
        )  # fmt: skip

    async def list_jobs(self, status: JobStatus | None, owner: str | None, offset: int, limit: int,
                        caller: Caller, cursor: str | None = None) -> str:  # fmt: skip
        """A page of JobSummary as JSON text, assembled from what is stored (see job_summaries): by
        offset, or after a cursor (index_pages); every page with a next one names that one's cursor."""
        after = one_way(offset, cursor)
        if not caller.is_admin:
            if owner not in (None, caller.name):  # a filter matching none of what this key may see
                return (f'{{"jobs":[],"total":0,"offset":{offset},"limit":{limit},"next_offset":null,'
                        '"next_cursor":null}')  # fmt: skip
            owner = caller.name
        total, ids, nxt_cursor = await self.store.page(status, owner, offset, limit, after)
        page = await self.store.summaries.page_json(ids)
        nxt = offset + limit if offset + limit < total and after is None else None
        shown = "null" if nxt_cursor is None else json.dumps(cursor_text(nxt_cursor))
        return (
            f'{{"jobs":{page},"total":{total},"offset":{offset},"limit":{limit},'
            f'"next_offset":{"null" if nxt is None else nxt},"next_cursor":{shown}}}'
        )

    async def job_json(self, job_id: str, caller: Caller) -> str:
        """The whole job as JSON text, as stored (the job page)."""
        found = await self.store.job_json(job_id)
        if found is None or not caller.owns(found[0]):
            raise JobNotFound(job_id)
        fields = found[1]
        if '"job_id":"' in fields.get("exports", ""):  # (cheap: most jobs have no quantized export)
            # A quantized export's record says running until it is settled: how its job stands, as GET .../exports
            # says. Only the export list is decoded, and only the export jobs said to run are read.
            exports = EXPORT_LIST.validate_json(fields["exports"])
            if any(e.job_id and e.status == ExportStatus.RUNNING for e in exports):
                exports = await exports_as_they_stand(self.store, job_id, exports)
                fields["exports"] = EXPORT_LIST.dump_json(exports).decode()
        return joined(fields)

    async def delete(self, job_id: str, caller: Caller) -> None:
        try:
            job = await self.require(job_id, caller)
        except JobNotFound:
            # A record gone while its entries stay (evicted, or deleted by hand) was listed for good and could not
            # be deleted (hunt CI): its entries go now. (Nothing, while the record exists.)
            await self.store.forget_lost(job_id)
            raise
        await settle(self.store, job)
        try:
            await self.store.delete(job_id, self.files.uploads_of(job), created_at=job.created_at,
                                    actor=caller.actor)  # fmt: skip
        except TransitionRefused as exc:
            if exc.reason == Refusal.EXPORT_STATE:
                detail = ("job '{id}' is exporting its model: wait for the export to end, or stop it (POST "
                          ".../jobs/{id}/stop), then delete it")  # fmt: skip
            else:
                detail = "job '{id}' is running: stop it first (POST .../jobs/{id}/stop), then delete it"
            raise refused(job_id, exc, detail) from None
        await self.cluster.release_export_targets(job)

    async def set_priority(self, job_id: str, priority: int, caller: Caller) -> Job:
        job = await self.require(job_id, caller)
        if priority == job.priority and job.status in (JobStatus.PENDING, JobStatus.QUEUED):
            return job  # (it was an event "priority changed from 2 to 2")
        try:
            await self.store.reprioritize(job, priority, actor=caller.actor)
        except TransitionRefused as exc:
            raise refused(job_id, exc, "job '{id}' is {status}: only a pending or queued job's priority can change"
                          ) from None  # fmt: skip
        return await self._job(job_id)

    async def logs(
        self, job_id: str, limit: int, kind: str, caller: Caller, attempt: int | None = None
    ) -> LogsResponse:
        job = await self.require(job_id, caller)
        if attempt is not None and kind == "export":
            # (it was ignored: the newest export's log answered for any attempt; a 404 as for a run it never had,
            # the schema cannot say that the two do not go together)
            raise NotFound(f"job '{job_id}' has no export attempt {attempt}: attempt counts its training runs "
                           "(kind=train), and kind=export is the current export's log: leave attempt out")  # fmt: skip
        path = job.export.log_file if kind == "export" else job.log_file
        if attempt is not None and kind == "train":
            if not 1 <= attempt <= len(job.attempts):
                runs = f"its runs are 1 to {len(job.attempts)}" if job.attempts else "it has not run yet"
                raise NotFound(f"job '{job_id}' has no attempt {attempt}: {runs}")
            path = job.attempts[attempt - 1].log_file
        lines = await asyncio.to_thread(page_lines, Path(path), limit) if path else []
        return LogsResponse(job_id=job_id, log_file=path, lines=lines, count=len(lines), kind=kind)

    async def events(self, job_id: str, after: str | None, limit: int, caller: Caller) -> EventList:
        await self.require(job_id, caller)
        events, dropped = await self.store.events_page(job_id, after, limit)
        return EventList(job_id=job_id, events=events, next_after=events[-1].id if len(events) == limit else None,
                         dropped_before=dropped)  # fmt: skip

    async def progress(self, job_id: str, history_limit: int, caller: Caller) -> ProgressResponse:
        job = await self.require(job_id, caller)
        # A few points more than asked: the newest point's id counts every point at its step (a training and an
        # evaluation point share one), also when the history asked for is shorter.
        read = await self.store.history(job_id, history_limit + POINTS_PER_STEP)
        keys = keys_of(read, [a.first_step or 0 for a in job.attempts])
        return ProgressResponse(
            job_id=job_id, status=job.status, progress=job.progress, history=read[-history_limit:] if history_limit
            else [], checkpoints=job.checkpoints, last_checkpoint=job.last_checkpoint, train_loss=job.train_loss,
            train_runtime=job.train_runtime, stream_id=format_id(keys[-1]) if keys else None,
        )  # fmt: skip


def _queued(job: Job) -> QueuedJob:
    return queued_job(job.job_id, job.priority, job.created_at, job.num_gpus, job.gpu_ids_requested,
                      job.min_gpu_memory_gb, job.predicted_duration.seconds, owner=job.owner)  # fmt: skip


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]
