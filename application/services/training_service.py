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
from application.services.job_store import JobStore, TransitionRefused
from application.services.queue_processor import QueueProcessor
from application.services.scheduler import QueuedJob, format_wait
from application.services.swift_command import SwiftVersion, detect_swift_version
from application.utils.gpu_utils import GpuInventory
from application.utils.log_tail import tail_lines

HEARTBEAT_SECONDS = 5.0
HEARTBEAT_TTL = 15


def make_supervisor_id() -> str:
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{int(me.create_time() * 1000)}"


def resolve_output_dir(requested: str, root: Path) -> Path:
    """Relative paths resolve under OUTPUT_ROOT; nothing (`..`, absolute paths, symlinks) may leave it."""
    root = root.resolve()
    candidate = Path(requested)
    if any(len(part.encode()) > 255 for part in candidate.parts):
        raise Invalid(f"output_dir '{requested[:80]}...' has a folder name longer than 255 bytes: shorten it")
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if resolved == root:
        raise Invalid(f"output_dir '{requested}' is OUTPUT_ROOT itself: name a folder inside it, such as my_job")
    if root not in resolved.parents:
        raise Invalid(
            f"output_dir '{requested}' resolves to {resolved}, outside OUTPUT_ROOT ({root}): "
            "use a relative folder such as training_001"
        )
    return resolved


def local_absolute(path: str) -> str:
    """A relative path that exists here becomes absolute; hub ids (`Qwen/Qwen2.5-7B`) stay as they are."""
    p = Path(path)
    return str(p.resolve()) if not p.is_absolute() and p.exists() else path


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
        self.started_at = time.time()
        self._watchdog: asyncio.Task[None] | None = None

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

    async def shutdown(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        await self.processor.close()
        await self.runner.shutdown()
        try:
            await self.store.r.delete(self.store.keys.supervisor(self.supervisor_id))
        except Exception:  # Redis may already be gone at shutdown
            pass

    async def _heartbeat(self) -> None:
        await self.store.r.set(self.store.keys.supervisor(self.supervisor_id), str(time.time()), ex=HEARTBEAT_TTL)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self._heartbeat()
                await self.adopt_orphans()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("supervision watchdog: {}", exc)

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
        return bool(await self.store.r.exists(self.store.keys.supervisor(supervisor_id)))

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
                await self.store.update(job.job_id, {"supervisor_id": self.supervisor_id}, owner=job.supervisor_id)
            except TransitionRefused:
                continue  # another API process adopted it first
            await self.runner.adopt(job.model_copy(update={"supervisor_id": self.supervisor_id}))

    # ---- jobs ---------------------------------------------------------------------------------------

    async def create(self, req: JobCreate) -> CreateResponse:
        snapshot = await asyncio.to_thread(self.inventory.snapshot)
        reason = impossible_request(req, snapshot)
        if reason:
            raise Invalid(reason)
        output_dir = resolve_output_dir(req.output_dir, self.settings.OUTPUT_ROOT)
        # swift runs in the job's folder: a relative local path must mean what it meant to the caller here.
        model_path, data_path = local_absolute(req.model_path), local_absolute(req.data_path)
        base_id = req.job_id or job_id_from(output_dir)
        now = time.time()
        job = Job(
            job_id=base_id, status=JobStatus.PENDING, priority=req.priority, data_path=data_path,
            model_path=model_path, output_dir=str(output_dir), output_dir_requested=req.output_dir,
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
                await self.store.create(job, message=message)
                break
            except TransitionRefused as exc:
                if exc.reason == "output_dir_busy":
                    raise Conflict(
                        f"output_dir '{req.output_dir}' is in use by active job '{exc.detail}': "
                        "wait for it to end or choose another folder"
                    ) from None
                if req.job_id:
                    raise Conflict(f"job_id '{req.job_id}' is taken: choose another or leave job_id out") from None
                job.job_id = f"{base_id}-{attempt + 1}"
        else:
            raise Conflict(f"every job id from '{base_id}' to '{job.job_id}' is taken: pass a job_id")
        if job.status == JobStatus.PENDING and req.auto_start:
            started = await self.start(job.job_id)
            return CreateResponse(**started.model_dump(include={"job_id", "status", "message", "queue_position",
                                                                "estimated_wait_time"}))  # fmt: skip
        if job.status == JobStatus.QUEUED:
            position, estimate = await self._queue_info(job.job_id)
            return CreateResponse(job_id=job.job_id, status=job.status, message=message, queue_position=position,
                                  estimated_wait_time=estimate)  # fmt: skip
        return CreateResponse(job_id=job.job_id, status=job.status, message=message)

    def _as_queued(self, job: Job) -> QueuedJob:
        return queued_job(job.job_id, job.priority, job.created_at, job.num_gpus, job.gpu_ids_requested,
                          job.min_gpu_memory_gb)  # fmt: skip

    async def start(self, job_id: str) -> ActionResponse:
        job = await self.store.require(job_id)
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
                if exc.reason != "gpu_busy":
                    current = await self.store.require(job_id)
                    raise Conflict(f"job '{job_id}' is {current.status.value}: it cannot be started") from None
        try:
            await self.store.transition(job_id, JobStatus.QUEUED, expect=(JobStatus.PENDING,),
                                        message="no free GPUs at start: added to the GPU queue")  # fmt: skip
        except TransitionRefused as exc:
            raise Conflict(f"job '{job_id}' is {exc.current}: it cannot be started") from None
        position, estimate = await self._queue_info(job_id)
        return ActionResponse(job_id=job_id, status=JobStatus.QUEUED, queue_position=position,
                              estimated_wait_time=estimate,
                              message="No free GPUs now: the job was added to the GPU queue")  # fmt: skip

    async def stop(self, job_id: str) -> ActionResponse:
        job = await self.store.require(job_id)
        if job.status in (JobStatus.PENDING, JobStatus.QUEUED):
            await self._cancel(job_id, (job.status,), "cancelled before it started")
            return ActionResponse(job_id=job_id, status=JobStatus.CANCELLED, message="The job was cancelled")
        if job.status == JobStatus.RUNNING:
            try:
                await self.store.update(
                    job_id,
                    {"stop_requested": True},
                    statuses=(JobStatus.RUNNING,),
                    event=("stop_requested", "stop requested: SIGTERM to the process group", None),
                )
            except TransitionRefused as exc:
                current = JobStatus(exc.current) if exc.current else job.status
                return ActionResponse(job_id=job_id, status=current, message=f"The job already ended ({current.value})")
            # Read the pid again: the launch may have recorded it after our first read (start_training checks
            # stop_requested after recording it, so one of the two always signals the group).
            fresh = await self.store.require(job_id)
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
                    job_id, JobStatus.STOPPED, expect=(JobStatus.RUNNING,),
                    message="stopped on request ("
                    + ("killed after the grace period" if how == "killed" else "terminated") + ")",
                )  # fmt: skip
            except TransitionRefused:
                pass  # the follower recorded the end first
            final = await self.store.require(job_id)
            return ActionResponse(job_id=job_id, status=final.status, message=f"Training stopped ({how})")
        if job.export.status == ExportStatus.RUNNING:
            how = await self.runner.stop_process(job.export.pid, job.export.process_start_time)
            return ActionResponse(job_id=job_id, status=job.status, message=f"Export stopped ({how})")
        raise Conflict(f"job '{job_id}' is already {job.status.value}: nothing to stop")

    async def _await_end(self, job_id: str, timeout: float = 10.0) -> Job:
        deadline = time.monotonic() + timeout
        job = await self.store.require(job_id)
        while job.status == JobStatus.RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            job = await self.store.require(job_id)
        return job

    async def _cancel(self, job_id: str, expect: tuple[JobStatus, ...], message: str) -> None:
        try:
            await self.store.transition(job_id, JobStatus.CANCELLED, expect=expect, message=message)
        except TransitionRefused as exc:
            raise Conflict(f"job '{job_id}' is {exc.current} now: it can no longer be cancelled") from None

    async def export(self, job_id: str) -> ActionResponse:
        info = await self.runner.start_export(job_id)
        job = await self.store.require(job_id)
        if info.status == ExportStatus.FAILED:
            message = f"Export of {info.checkpoint} could not start: {info.error}"
        else:
            message = f"Export of {info.checkpoint} started"
        return ActionResponse(job_id=job_id, status=job.status, export=info, message=message)

    async def status(self, job_id: str) -> StatusResponse:
        job = await self.store.require(job_id)
        position = await self.store.queue_position(job_id) if job.status == JobStatus.QUEUED else None
        return StatusResponse(
            job_id=job.job_id, status=job.status, priority=job.priority, gpu_ids=job.gpu_ids, progress=job.progress,
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            duration_seconds=job.duration_seconds(time.time()), error_message=job.error_message, export=job.export,
            queue_position=position,
        )  # fmt: skip

    async def list_jobs(self, status: JobStatus | None, offset: int, limit: int) -> JobList:
        jobs, total = await self.store.page(status, offset, limit)
        summaries = [
            JobSummary(
                job_id=j.job_id, status=j.status, priority=j.priority, model_path=j.model_path, data_path=j.data_path,
                output_dir=j.output_dir, num_gpus=j.num_gpus, gpu_ids=j.gpu_ids, created_at=j.created_at,
                started_at=j.started_at, finished_at=j.finished_at, current_step=j.progress.current_step,
                max_steps=j.progress.max_steps, export_status=j.export.status,
            )
            for j in jobs
        ]  # fmt: skip
        nxt = offset + limit if offset + limit < total else None
        return JobList(jobs=summaries, total=total, offset=offset, limit=limit, next_offset=nxt)

    async def delete(self, job_id: str) -> None:
        await self.store.delete(job_id)
        # A follower still finishing the ended run must not write into a new job that reuses the id.
        await self.runner.forget(job_id)

    async def set_priority(self, job_id: str, priority: int) -> Job:
        job = await self.store.require(job_id)
        await self.store.reprioritize(job, priority)
        self.processor.wake()
        return await self.store.require(job_id)

    async def logs(self, job_id: str, limit: int, kind: str) -> LogsResponse:
        job = await self.store.require(job_id)
        path = job.export.log_file if kind == "export" else job.log_file
        lines = await asyncio.to_thread(tail_lines, Path(path), limit) if path else []
        return LogsResponse(job_id=job_id, log_file=path, lines=lines, count=len(lines), kind=kind)

    async def events(self, job_id: str, after: str | None, limit: int) -> EventList:
        if not await self.store.r.exists(self.store.keys.job(job_id)):
            raise JobNotFound(job_id)
        events = await self.store.events(job_id, after, limit)
        return EventList(job_id=job_id, events=events, next_after=events[-1].id if len(events) == limit else None)

    async def progress(self, job_id: str, history_limit: int) -> ProgressResponse:
        job = await self.store.require(job_id)
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
