"""TrainingService: the thin coordinator behind the job endpoints.

Policy lives elsewhere: scheduling in `scheduler` (pure) and `queue_processor`, processes in
`job_runner`/`process_supervisor`, parsing in `log_parser`, GPUs in `utils.gpu_utils`, state in `job_store`.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from pathlib import Path

import psutil
from loguru import logger

from application.auth import Caller
from application.config import Settings
from application.exceptions import Conflict, Invalid, JobNotFound
from application.models.training_model import (
    ActionResponse,
    CreateResponse,
    EventList,
    ExportStatus,
    Job,
    JobCreate,
    JobList,
    JobStatus,
    JobSummary,
    LogsResponse,
    ProgressResponse,
    StatusResponse,
    WaitEstimate,
)
from application.services import process_supervisor as ps
from application.services.gpu_pool import impossible_request, queued_job
from application.services.job_runner import JobRunner
from application.services.job_store import JobStore, Refusal, TransitionRefused
from application.services.limits import CreateLimits
from application.services.preflight import check_request
from application.services.queue_processor import QueueProcessor
from application.services.scheduler import QueuedJob, format_wait
from application.services.swift_command import SwiftVersion, detect_swift_version
from application.services.swift_info import SwiftInfo, probe
from application.utils.gpu_utils import GpuInventory
from application.utils.log_tail import tail_lines

HEARTBEAT_SECONDS = 5.0
HEARTBEAT_TTL = 15


def make_supervisor_id() -> str:
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{int(me.create_time() * 1000)}"


def job_id_from(output_dir: Path) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", output_dir.name).lstrip("._-")[:100]
    return base or "job"


class TrainingService:
    def __init__(self, settings: Settings, store: JobStore, inventory: GpuInventory) -> None:
        self.settings = settings
        self.store = store
        self.inventory = inventory
        self.supervisor_id = make_supervisor_id()
        self._version: SwiftVersion | None = None
        self._version_lock = asyncio.Lock()
        self.runner = JobRunner(store, settings, dict(os.environ), self.swift_version, self.supervisor_id)
        self.processor = QueueProcessor(store, inventory, settings, self.runner.start_training)
        self.limits = CreateLimits(settings, store)
        self.started_at = time.time()
        self._watchdog: asyncio.Task[None] | None = None
        self.swift_info: SwiftInfo | None = None
        self._probe: asyncio.Task[None] | None = None

    async def swift_version(self) -> SwiftVersion:
        async with self._version_lock:
            if self._version is None:
                self._version = await asyncio.to_thread(
                    detect_swift_version, self.settings.SWIFT_BIN, self.settings.SWIFT_VERSION
                )
            return self._version

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def startup(self) -> None:
        await self._heartbeat()
        await self.adopt_orphans()
        self.processor.launch()
        await self.processor.set_enabled(self.settings.QUEUE_PROCESSOR_AUTOSTART)
        self._watchdog = asyncio.create_task(self._watch(), name="supervision-watchdog")
        self._probe = asyncio.create_task(self._probe_swift(), name="swift-probe")

    async def _probe_swift(self) -> None:
        version = await self.swift_version()
        self.swift_info = await asyncio.to_thread(probe, self.settings.SWIFT_BIN, version.version,
                                                  self.settings.DATA_DIR / "swift-probe")  # fmt: skip

    async def shutdown(self) -> None:
        for task in (self._watchdog, self._probe):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.processor.close()
        await self.runner.shutdown()
        try:
            await self.store.drop_heartbeat(self.supervisor_id)
        except Exception:  # Redis may already be gone at shutdown
            pass

    async def _heartbeat(self) -> None:
        await self.store.heartbeat(self.supervisor_id, HEARTBEAT_TTL)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self._heartbeat()
                await self.adopt_orphans()
                await self.expire_old_jobs()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("supervision watchdog: {}", exc)

    async def expire_old_jobs(self, batch: int = 100) -> list[str]:
        """Delete the records of jobs that ended more than JOB_RETENTION_DAYS ago (their files stay)."""
        days = self.settings.JOB_RETENTION_DAYS
        if days <= 0:
            return []
        removed = []
        for job_id in await self.store.expired(time.time() - days * 86400, batch):
            try:
                await self.store.delete(job_id)
                removed.append(job_id)
            except TransitionRefused:
                continue  # exporting right now, or gone already: the next sweep sees it again
        if removed:
            logger.info("removed {} job record(s) older than {} days: {}", len(removed), days, ", ".join(removed))
        return removed

    async def _supervisor_alive(self, supervisor_id: str | None) -> bool:
        if not supervisor_id:
            return False
        if supervisor_id == self.supervisor_id:
            return True
        host, _, rest = supervisor_id.partition(":")
        if host == socket.gethostname():
            pid_s, _, ctime_ms = rest.partition(":")
            try:
                return ps.is_alive(int(pid_s), int(ctime_ms) / 1000)
            except ValueError:
                return False
        return await self.store.heartbeat_alive(supervisor_id)

    async def adopt_orphans(self) -> None:
        """Follow running jobs and exports whose API process died; never leave a job running without a watcher."""
        ids = await self.store.ids_with_status(JobStatus.RUNNING) + await self.store.exporting()
        for job in await self.store.get_many(dict.fromkeys(ids)):
            if self.runner.following(job.job_id):
                continue
            exporting = job.export.status == ExportStatus.RUNNING
            if job.status != JobStatus.RUNNING and not exporting:
                await self.store.mark_exporting(job.job_id, False)
                continue
            # Ours but unfollowed (its follower crashed, e.g. on a Redis outage) is an orphan too.
            if job.supervisor_id != self.supervisor_id and await self._supervisor_alive(job.supervisor_id):
                continue
            try:
                await self.store.update(job.job_id, {"supervisor_id": self.supervisor_id}, supervisor=job.supervisor_id)
            except TransitionRefused:
                continue  # another API process adopted it first
            await self.runner.adopt(job.model_copy(update={"supervisor_id": self.supervisor_id}))

    # ---- jobs ---------------------------------------------------------------------------------------

    async def require(self, job_id: str, caller: Caller) -> Job:
        """The job, if this caller may see it; another owner's job is as missing as a deleted one."""
        job = await self.store.get(job_id)
        if job is None or not caller.owns(job.owner):
            raise JobNotFound(job_id)
        return job

    async def create(self, req: JobCreate, caller: Caller) -> CreateResponse:
        await self.limits.check(caller)
        snapshot = await asyncio.to_thread(self.inventory.snapshot)
        reason = impossible_request(req, snapshot)
        if reason:
            raise Invalid(reason)
        cap = self.settings.MAX_GPUS_PER_OWNER
        if cap and caller.name is not None and req.num_gpus > cap:
            raise Invalid(f"num_gpus={req.num_gpus} is more than one owner may hold (MAX_GPUS_PER_OWNER={cap})")
        # Paths, data set and model are checked before the job takes a queue slot: a job that cannot start
        # fails now, not after its wait. Disk work, so in a thread.
        checked = await asyncio.to_thread(
            check_request, req.data_path, req.model_path, req.output_dir, model_type=req.training.model_type,
            template=req.training.template, settings=self.settings, info=self.swift_info,
        )  # fmt: skip
        base_id = req.job_id or job_id_from(checked.output_dir)
        now = time.time()
        job = Job(
            job_id=base_id, status=JobStatus.PENDING, priority=req.priority, owner=caller.name,
            data_path=checked.data_path, model_path=checked.model_path, output_dir=str(checked.output_dir),
            output_dir_requested=req.output_dir, dataset_rows=checked.dataset.rows if checked.dataset else None,
            num_gpus=req.num_gpus, gpu_ids_requested=req.gpu_ids, min_gpu_memory_gb=req.min_gpu_memory_gb,
            training=req.training, created_at=now, updated_at=now,
        )  # fmt: skip
        view = await self.processor.view()
        fits = any(s.job_id == job.job_id for s in await self.processor.plan(view, extra=self._as_queued(job)))
        if not fits:
            job.status = JobStatus.QUEUED
            job.queued_at = now
        message = "Training job created" if fits else "Training job created and added to the GPU queue"
        for attempt in range(1, 1000):
            try:
                await self.store.create(job, message=message, actor=caller.actor)
                break
            except TransitionRefused as exc:
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
            started = await self.start(job.job_id, caller)
            return CreateResponse(**started.model_dump(include={"job_id", "status", "message", "queue_position",
                                                                "estimated_wait_time"}))  # fmt: skip
        if job.status == JobStatus.QUEUED:
            position, estimate = await self._queue_info(job.job_id)
            return CreateResponse(job_id=job.job_id, status=job.status, message=message, queue_position=position,
                                  estimated_wait_time=estimate)  # fmt: skip
        return CreateResponse(job_id=job.job_id, status=job.status, message=message)

    def _as_queued(self, job: Job) -> QueuedJob:
        return queued_job(job.job_id, job.priority, job.created_at, job.num_gpus, job.gpu_ids_requested,
                          job.min_gpu_memory_gb, owner=job.owner)  # fmt: skip

    async def start(self, job_id: str, caller: Caller) -> ActionResponse:
        job = await self.require(job_id, caller)
        if job.status == JobStatus.QUEUED:
            self.processor.wake()
            position, estimate = await self._queue_info(job_id)
            return ActionResponse(job_id=job_id, status=job.status, queue_position=position,
                                  estimated_wait_time=estimate,
                                  message="The job is queued: it starts by itself when its GPUs are free")  # fmt: skip
        if job.status != JobStatus.PENDING:
            raise Conflict(
                f"job '{job_id}' is {job.status.value}: only a pending job can be started"
                + ("" if job.status == JobStatus.RUNNING else "; create a new job to train again")
            )
        view = await self.processor.view()
        starts = await self.processor.plan(view, extra=self._as_queued(job))
        mine = next((s for s in starts if s.job_id == job_id), None)
        if mine is not None:
            try:
                await self.runner.start_training(job, list(mine.gpu_ids))
                where = f"GPUs {list(mine.gpu_ids)}" if mine.gpu_ids else "the CPU"
                return ActionResponse(job_id=job_id, status=JobStatus.RUNNING, gpu_ids=list(mine.gpu_ids),
                                      message=f"Training started on {where}")  # fmt: skip
            except TransitionRefused as exc:
                if exc.reason != Refusal.GPU_BUSY:
                    raise Conflict(f"job '{job_id}' is {exc.current}: it cannot be started") from None
        try:
            await self.store.transition(job_id, JobStatus.QUEUED, expect=(JobStatus.PENDING,), actor=caller.actor,
                                        message="no free GPUs at start: added to the GPU queue")  # fmt: skip
        except TransitionRefused as exc:
            raise Conflict(f"job '{job_id}' is {exc.current}: it cannot be started") from None
        position, estimate = await self._queue_info(job_id)
        return ActionResponse(job_id=job_id, status=JobStatus.QUEUED, queue_position=position,
                              estimated_wait_time=estimate,
                              message="No free GPUs now: the job was added to the GPU queue")  # fmt: skip

    async def stop(self, job_id: str, caller: Caller) -> ActionResponse:
        job = await self.require(job_id, caller)
        if job.status in (JobStatus.PENDING, JobStatus.QUEUED):
            await self.cancel(job_id, (job.status,), "cancelled before it started", caller)
            return ActionResponse(job_id=job_id, status=JobStatus.CANCELLED, message="The job was cancelled")
        if job.status == JobStatus.RUNNING:
            try:
                await self.store.update(
                    job_id,
                    {"stop_requested": True},
                    statuses=(JobStatus.RUNNING,),
                    event=("stop_requested", "stop requested: SIGTERM to the process group", None),
                    actor=caller.actor,
                )
            except TransitionRefused as exc:
                current = JobStatus(exc.current) if exc.current else job.status
                return ActionResponse(job_id=job_id, status=current, message=f"The job already ended ({current.value})")
            # Read the pid again: the launch may have recorded it after our first read (start_training checks
            # stop_requested after recording it, so one of the two always signals the group).
            fresh = await self._job(job_id)
            how = await self.runner.stop_process(fresh.pid, fresh.process_start_time)
            if (
                how == "gone"
                and fresh.log_file
                and ps.read_exit_file(Path(fresh.log_file).with_suffix(".exit.json")) == 0
            ):
                # It had already finished on its own: its follower records `completed` (and exports).
                final = await self._await_end(job_id)
                return ActionResponse(job_id=job_id, status=final.status, message="The job had already finished")
            try:
                await self.store.transition(
                    job_id, JobStatus.STOPPED, expect=(JobStatus.RUNNING,), actor=caller.actor,
                    message="stopped on request ("
                    + ("killed after the grace period" if how == "killed" else "terminated") + ")",
                )  # fmt: skip
            except TransitionRefused:
                pass  # the follower recorded the end first
            final = await self._job(job_id)
            return ActionResponse(job_id=job_id, status=final.status, message=f"Training stopped ({how})")
        if job.export.status == ExportStatus.RUNNING:
            how = await self.runner.stop_process(job.export.pid, job.export.process_start_time)
            return ActionResponse(job_id=job_id, status=job.status, message=f"Export stopped ({how})")
        raise Conflict(f"job '{job_id}' is already {job.status.value}: nothing to stop")

    async def _job(self, job_id: str) -> Job:
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def _await_end(self, job_id: str, timeout: float = 10.0) -> Job:
        deadline = time.monotonic() + timeout
        job = await self._job(job_id)
        while job.status == JobStatus.RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            job = await self._job(job_id)
        return job

    async def cancel(self, job_id: str, expect: tuple[JobStatus, ...], message: str, caller: Caller) -> None:
        try:
            await self.store.transition(job_id, JobStatus.CANCELLED, expect=expect, message=message,
                                        actor=caller.actor)  # fmt: skip
        except TransitionRefused as exc:
            raise Conflict(f"job '{job_id}' is {exc.current} now: it can no longer be cancelled") from None

    async def export(self, job_id: str, caller: Caller) -> ActionResponse:
        await self.require(job_id, caller)
        info = await self.runner.start_export(job_id, actor=caller.actor)
        job = await self._job(job_id)
        if info.status == ExportStatus.FAILED:
            message = f"Export of {info.checkpoint} could not start: {info.error}"
        else:
            message = f"Export of {info.checkpoint} started"
        return ActionResponse(job_id=job_id, status=job.status, export=info, message=message)

    async def status(self, job_id: str, caller: Caller) -> StatusResponse:
        job = await self.require(job_id, caller)
        position = await self.store.queue_position(job_id) if job.status == JobStatus.QUEUED else None
        return StatusResponse(
            job_id=job.job_id, status=job.status, priority=job.priority, gpu_ids=job.gpu_ids, progress=job.progress,
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            duration_seconds=job.duration_seconds(time.time()), error_message=job.error_message, export=job.export,
            queue_position=position,
        )  # fmt: skip

    async def list_jobs(self, status: JobStatus | None, owner: str | None, offset: int, limit: int,
                        caller: Caller) -> JobList:  # fmt: skip
        if not caller.is_admin:
            owner = caller.name
        ids, total = await self.store.page_ids(status, owner, offset, limit)
        jobs = await self.store.get_many(ids)
        summaries = [
            JobSummary(
                job_id=j.job_id, status=j.status, priority=j.priority, owner=j.owner, model_path=j.model_path,
                data_path=j.data_path,
                output_dir=j.output_dir, num_gpus=j.num_gpus, gpu_ids=j.gpu_ids, created_at=j.created_at,
                started_at=j.started_at, finished_at=j.finished_at, current_step=j.progress.current_step,
                max_steps=j.progress.max_steps, export_status=j.export.status,
            )
            for j in jobs
        ]  # fmt: skip
        nxt = offset + limit if offset + limit < total else None
        return JobList(jobs=summaries, total=total, offset=offset, limit=limit, next_offset=nxt)

    async def delete(self, job_id: str, caller: Caller) -> None:
        await self.require(job_id, caller)
        try:
            await self.store.delete(job_id)
        except TransitionRefused as exc:
            if exc.reason == Refusal.MISSING:
                raise JobNotFound(job_id) from None
            if exc.reason == Refusal.EXPORT_STATE:
                raise Conflict(
                    f"job '{job_id}' is exporting its model: wait for the export to end, then delete it"
                ) from None
            raise Conflict(
                f"job '{job_id}' is running: stop it first (POST .../jobs/{job_id}/stop), then delete it"
            ) from None
        # A follower still finishing the ended run must not write into a new job that reuses the id.
        await self.runner.forget(job_id)

    async def set_priority(self, job_id: str, priority: int, caller: Caller) -> Job:
        job = await self.require(job_id, caller)
        try:
            await self.store.reprioritize(job, priority, actor=caller.actor)
        except TransitionRefused as exc:
            if exc.reason == Refusal.MISSING:
                raise JobNotFound(job_id) from None
            raise Conflict(
                f"job '{job_id}' is {exc.current}: only a pending or queued job's priority can change"
            ) from None
        self.processor.wake()
        return await self._job(job_id)

    async def logs(self, job_id: str, limit: int, kind: str, caller: Caller) -> LogsResponse:
        job = await self.require(job_id, caller)
        path = job.export.log_file if kind == "export" else job.log_file
        lines = await asyncio.to_thread(tail_lines, Path(path), limit) if path else []
        return LogsResponse(job_id=job_id, log_file=path, lines=lines, count=len(lines), kind=kind)

    async def events(self, job_id: str, after: str | None, limit: int, caller: Caller) -> EventList:
        await self.require(job_id, caller)
        events = await self.store.events(job_id, after, limit)
        return EventList(job_id=job_id, events=events, next_after=events[-1].id if len(events) == limit else None)

    async def progress(self, job_id: str, history_limit: int, caller: Caller) -> ProgressResponse:
        job = await self.require(job_id, caller)
        history = await self.store.history(job_id, history_limit)
        return ProgressResponse(
            job_id=job_id, status=job.status, progress=job.progress, history=history, checkpoints=job.checkpoints,
            last_checkpoint=job.last_checkpoint, train_loss=job.train_loss, train_runtime=job.train_runtime,
        )  # fmt: skip

    async def _queue_info(self, job_id: str) -> tuple[int | None, WaitEstimate | None]:
        position = await self.store.queue_position(job_id)
        if position is None:
            return None, None
        view = await self.processor.view()
        waits = await self.processor.wait_estimates(view, position)
        seconds = waits.get(job_id)
        return position, (WaitEstimate(seconds=seconds, text=format_wait(seconds)) if seconds is not None else None)
