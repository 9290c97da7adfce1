"""TrainingService: the thin coordinator behind the job endpoints, in the (stateless) API workers.

API workers start no process and run no background task: they read and write the store, and ask the
scheduler for what needs process control through it (a job queued wakes the leader; a stop is a flag the
run's runner acts on; an export is a request the leader's watchdog launches). Policy lives elsewhere:
scheduling in `scheduler` (pure, shared with the scheduler through `queue_planner`), a create in `job_create`
(its checks in `preflight`), a start in `job_start`, stops, pauses and resumes in `run_control`, state in
`job_store`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from application.auth import Caller
from application.config import Settings
from application.exceptions import JobNotFound, NotFound, refused
from application.models.job_request import JobCreate
from application.models.job_responses import (
    ActionResponse,
    CreateResponse,
    EventList,
    LogsResponse,
    ProgressResponse,
    StatusResponse,
)
from application.models.training_model import ExportStatus, Job, JobStatus
from application.services import clock, job_create, job_start
from application.services.check_pool import CheckPool
from application.services.checkpoints import newest_checkpoint
from application.services.cluster_store import ClusterStore
from application.services.exports import EXPORT_LIST, exports_as_they_stand, settle
from application.services.files import FileStore
from application.services.index_pages import cursor_text, one_way
from application.services.job_store import Claim, JobStore, Refusal, TransitionRefused, joined
from application.services.limits import CreateLimits
from application.services.path_sandbox import root_names
from application.services.placement import NOT_QUEUED, Placement
from application.services.point_ids import POINTS_PER_STEP, format_id, keys_of
from application.services.queue_planner import ClusterView, Planner, build_view
from application.services.run_history import RunHistory
from application.services.swift_info import SwiftInfo
from application.utils.filesystems import on_local_disk
from application.utils.gpu_types import GpuSnapshot, snapshot_of
from application.utils.log_tail import page_lines

# How much longer than its grace a stop waits for the runner to end the run (a start waits START_WAIT_SECONDS).
STOP_EXTRA_SECONDS = 10.0


class TrainingService:
    def __init__(self, settings: Settings, store: JobStore, cluster: ClusterStore) -> None:
        self.settings = settings
        self.store = store
        self.cluster = cluster
        self.limits = CreateLimits(settings, store.keys, cluster)
        self.planner = Planner(store, settings)
        self.history = RunHistory(store.r, store.keys)
        self.started = time.monotonic()  # (uptime: a step of the wall clock made it negative or a day long)
        self._swift: tuple[str, SwiftInfo | None] | None = None
        # Read here, at start-up, so that no request makes this filesystem call (README "Benchmarks").
        self.output_on_local_disk = on_local_disk(settings.OUTPUT_ROOT)
        self.root_names = root_names([*settings.data_roots(), *settings.model_roots()])
        self.checks = CheckPool()  # the disk checks of creates and uploads
        self.files = FileStore(settings, store.r, store.keys, self.checks)
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

    async def created_stamp(self, job_id: str) -> str:
        """The job's creation time as stored ('None' when there is no job): which job an id names now."""
        return str((await self.store.get_fields([job_id], ["created_at"]))[0][0])

    async def job(self, job_id: str) -> Job:
        """The job whoever may see it (for actions already authorized)."""
        return await self._job(job_id)

    async def _job(self, job_id: str) -> Job:
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def create(self, req: JobCreate, caller: Caller, claim: Claim | None = None) -> CreateResponse:
        """`claim`: the request's Idempotency-Key claim, which must still hold when the job is stored (`job_create`)."""
        return await job_create.create(self, req, caller, claim)

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
        now = clock.now()
        left = None
        if job.status == JobStatus.RUNNING and job.time_limit_seconds and job.started_at is not None:
            left = round(max(0.0, job.started_at + job.time_limit_seconds - now), 3)
        return StatusResponse(
            job_id=job.job_id, status=job.status, priority=job.priority, num_gpus=job.num_gpus, gpu_ids=job.gpu_ids,
            progress=job.progress,
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            duration_seconds=job.duration_seconds(now), error_message=job.error_message, time_limit_left_seconds=left,
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
