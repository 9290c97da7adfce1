"""Runs a job's `swift sft` and `swift export` and follows them to the end.

One follower task per running process: it reads the log as it grows (bounded chunks), stores progress,
loss history and checkpoints, and when the process exits records the true final status. Jobs whose
follower died with its API process are adopted again (same pid and start time) by `adopt`.
"""

from __future__ import annotations

import asyncio
import shlex
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from loguru import logger

from application.config import Settings
from application.exceptions import Conflict, JobNotFound
from application.models.training_model import (
    ExportInfo,
    ExportStatus,
    Job,
    JobStatus,
    Progress,
)
from application.services import process_supervisor as ps
from application.services.job_store import SCHEDULER, JobStore, Refusal, TransitionRefused
from application.services.log_parser import SwiftLogParser, extract_error
from application.services.run_outputs import find_checkpoints, parse_logging_jsonl
from application.services.swift_command import (
    SwiftVersion,
    build_env,
    build_export_command,
    build_sft_command,
    visible_env,
)
from application.utils.log_tail import read_from, tail_lines

CHUNK = 4 * 1024 * 1024
ENDED_WITH_SWIFT = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        base_env: dict[str, str],
        version: Callable[[], Awaitable[SwiftVersion]],
        supervisor_id: str,
    ) -> None:
        self.store = store
        self.settings = settings
        self.base_env = base_env
        self.version = version
        self.supervisor_id = supervisor_id
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._starting: set[str] = set()  # between the status change and the follower: not an orphan

    # ---- training -----------------------------------------------------------------------------------

    async def start_training(self, job: Job, gpu_ids: list[int]) -> None:
        """Move a pending/queued job to running on `gpu_ids` and start swift.

        The status change takes the GPU leases in the same atomic step; raises TransitionRefused when the
        job is no longer startable or a GPU was taken meanwhile.
        """
        self._starting.add(job.job_id)
        try:
            await self._start_training(job, gpu_ids)
        finally:
            self._starting.discard(job.job_id)

    async def _start_training(self, job: Job, gpu_ids: list[int]) -> None:
        version = await self.version()
        argv = build_sft_command(self.settings.SWIFT_BIN, job, version)
        env = build_env(self.base_env, gpu_ids, master_port=_free_port() if len(gpu_ids) > 1 else None)
        log_file = Path(job.output_dir) / "logs" / f"{job.job_id}.train.log"
        where = f"GPUs {gpu_ids}" if gpu_ids else "CPU"
        run_id = uuid.uuid4().hex
        await self.store.transition(
            job.job_id,
            JobStatus.RUNNING,
            expect=(JobStatus.PENDING, JobStatus.QUEUED),
            acquire_gpus=gpu_ids,
            fields={
                "gpu_ids": gpu_ids, "command": argv, "command_line": shlex.join(argv), "env": visible_env(env),
                "swift_version": version.version, "log_file": str(log_file), "log_offset": 0,
                "supervisor_id": self.supervisor_id, "stop_requested": False, "pid": None,
                "process_start_time": None, "exit_code": None, "error_message": None, "progress": Progress(),
                "run_id": run_id,
            },
            message=f"started on {where}",
            data={"gpu_ids": gpu_ids},
        )  # fmt: skip
        try:
            Path(job.output_dir).mkdir(parents=True, exist_ok=True)
            run = await ps.launch(argv, env, Path(job.output_dir), log_file)
        except OSError as exc:
            await self._end(job.job_id, JobStatus.FAILED, {
                "error_message": f"could not start swift ({argv[0]}): {exc}; set SWIFT_BIN or run ./install_all.sh",
            }, "swift could not be started", run_id)  # fmt: skip
            return
        run.run_id = run_id
        # From here on a follower must exist whatever happens, or the job would stay running unwatched.
        self._spawn(f"{job.job_id}:train", self._follow_training(job.job_id, run, log_file, 0))
        try:
            await self.store.update(
                job.job_id,
                {"pid": run.pid, "process_start_time": run.start_time},
                statuses=(JobStatus.RUNNING,),
                run_id=run_id,
                event=("process_started", f"swift started (pid {run.pid}) on {where}", {"pid": run.pid}),
            )
            stop_now = bool(await self.store.get_field(job.job_id, "stop_requested"))
        except TransitionRefused:
            stop_now = True  # stopped (or deleted) between the status change and the launch
        if stop_now:
            await ps.terminate_group(run.pgid, self.settings.STOP_GRACE_SECONDS)

    async def _follow_training(self, job_id: str, run: ps.RunningProcess, log_file: Path, offset: int) -> None:
        parser = SwiftLogParser()
        exit_task = asyncio.create_task(ps.wait_exit(run, self.settings.SUPERVISOR_POLL_INTERVAL))
        try:
            while True:
                await asyncio.wait({exit_task}, timeout=self.settings.SUPERVISOR_POLL_INTERVAL)
                offset = await self._consume(job_id, log_file, parser, offset, run.run_id)
                if exit_task.done():
                    break
        except asyncio.CancelledError:
            exit_task.cancel()
            raise
        code = exit_task.result()
        if await self.store.get_field(job_id, "stop_requested"):
            # The launcher dies on SIGTERM at once, but the trainer it leaves may still be in its grace period:
            # the stop's SIGTERM -> STOP_GRACE_SECONDS -> SIGKILL applies to it (this wait is only a backstop).
            await ps.wait_group_gone(run.pgid, self.settings.STOP_GRACE_SECONDS + 2)
        if run.verified:
            ps.kill_leftovers(run.pgid)
        offset = await self._consume(job_id, log_file, parser, offset, run.run_id)
        parser.flush()  # a last line with no newline after it
        await self._finish_training(job_id, code, parser, log_file, run.run_id)

    async def _consume(
        self, job_id: str, log_file: Path, parser: SwiftLogParser, offset: int, run_id: str | None
    ) -> int:
        """Parse what the log gained since `offset` and store it; returns the new offset."""
        progress: Progress | None = None
        history: list[dict[str, Any]] = []
        saved: list[str] = []
        while True:
            data, new_offset = await asyncio.to_thread(read_from, log_file, offset, CHUNK)
            if not data:
                break
            offset = new_offset
            result = parser.feed(data)
            progress = result.progress or progress
            history.extend(result.history)
            saved.extend(result.checkpoints_saved)
            if len(data) < CHUNK:
                break
        if progress is None and not history and not saved:
            return offset
        fields: dict[str, Any] = {"log_offset": offset}
        if progress is not None:
            fields["progress"] = progress
        if parser.run_dir:
            fields["run_dir"] = parser.run_dir
        if parser.last_checkpoint or saved:
            fields["last_checkpoint"] = parser.last_checkpoint or saved[-1]
        if parser.best_checkpoint:
            fields["best_checkpoint"] = parser.best_checkpoint
        if parser.train_loss is not None:
            fields["train_loss"] = parser.train_loss
        if parser.train_runtime is not None:
            fields["train_runtime"] = parser.train_runtime
        try:
            await self.store.update(job_id, fields, run_id=run_id)
            await self.store.append_history(job_id, history)
            for path in saved:
                await self.store.add_event(job_id, "checkpoint_saved", f"checkpoint saved: {path}", {"path": path})
        except TransitionRefused:
            pass  # deleted (or another run of a re-created job): nothing of ours to record
        return offset

    async def _finish_training(
        self, job_id: str, code: int | None, parser: SwiftLogParser, log_file: Path, run_id: str | None
    ) -> None:
        job = await self.store.get(job_id)
        if job is None or (run_id is not None and job.run_id != run_id):
            return  # deleted, or re-created under the same id: this run's end is not that job's
        tail = await asyncio.to_thread(tail_lines, log_file, self.settings.LOG_TAIL_ON_FAILURE)
        checkpoints = await asyncio.to_thread(find_checkpoints, Path(job.output_dir))
        if job.run_dir:
            checkpoints = [c for c in checkpoints if c.startswith(job.run_dir)] or checkpoints
        run_dir = parser.run_dir or job.run_dir
        # swift's own record in the run folder fills what the followed log missed (a re-attached follower
        # starts from where the previous one stopped reading).
        summary = await asyncio.to_thread(parse_logging_jsonl, Path(run_dir) / "logging.jsonl") if run_dir else None
        fields: dict[str, Any] = {
            "exit_code": code,
            "checkpoints": checkpoints,
            "last_checkpoint": parser.last_checkpoint
            or (summary.last_checkpoint if summary else None)
            or job.last_checkpoint
            or next(reversed(checkpoints), None),
            "best_checkpoint": parser.best_checkpoint or (summary.best_checkpoint if summary else None)
            or job.best_checkpoint,
        }  # fmt: skip
        train_loss = parser.train_loss if parser.train_loss is not None else (summary.train_loss if summary else None)
        runtime = (
            parser.train_runtime if parser.train_runtime is not None else (summary.train_runtime if summary else None)
        )
        if train_loss is not None:
            fields["train_loss"] = train_loss
        if runtime is not None:
            fields["train_runtime"] = runtime
        finished_in_log = (
            runtime is not None or parser.last_checkpoint is not None or bool(summary and summary.finished)
        )
        if code == 0:  # it finished on its own before (or as) the stop arrived: the run is complete
            status, message = JobStatus.COMPLETED, "training completed"
        elif job.stop_requested:
            status, message = JobStatus.STOPPED, "stopped on request"
        elif code is None and finished_in_log:
            status, message = JobStatus.COMPLETED, "training completed"
        else:
            status = JobStatus.FAILED
            if code is None:
                error = "the swift process ended while no API process was watching it and left no exit status"
            elif (sig := ps.exit_signal(code)) is not None:
                # A signal says more than the last step dict before it (the OOM killer leaves no traceback).
                error = (
                    f"swift was {ps.signal_text(sig)}"
                    if code < 0
                    else f"swift exited with code {code}: it was {ps.signal_text(sig)}"
                )
                if (found := extract_error(tail)) is not None:
                    error += f"; last error in the log: {found}"
            else:
                last = next((line for line in reversed(tail) if line.strip()), "")
                error = extract_error(tail) or f"swift exited with code {code}" + (f": {last}" if last else "")
            fields["error_message"] = error
            fields["log_tail"] = tail
            message = f"training failed: {error}"
        if status != JobStatus.FAILED and status != JobStatus.COMPLETED:
            fields["log_tail"] = tail
        ended = await self._end(job_id, status, fields, message, run_id)
        if ended and status == JobStatus.COMPLETED and self.settings.AUTO_EXPORT and job.training.train_type != "full":
            try:
                await self.start_export(job_id, auto=True)
            except Conflict as exc:
                await self.store.add_event(job_id, "export_skipped", f"automatic export skipped: {exc.detail}")

    async def _end(
        self, job_id: str, status: JobStatus, fields: dict[str, Any], message: str, run_id: str | None
    ) -> bool:
        try:
            await self.store.transition(
                job_id, status, expect=(JobStatus.RUNNING,), fields=fields, message=message, run_id=run_id
            )
            return True
        except TransitionRefused:
            # Someone ended it first (a stop request): keep their status, add what we learned.
            try:
                await self.store.update(
                    job_id, {k: v for k, v in fields.items() if k != "error_message"}, run_id=run_id
                )
            except TransitionRefused:
                pass
            return False

    # ---- export -------------------------------------------------------------------------------------

    async def start_export(self, job_id: str, *, auto: bool = False, checkpoint: str | None = None,
                           actor: str = SCHEDULER) -> ExportInfo:  # fmt: skip
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.status not in ENDED_WITH_SWIFT:
            raise Conflict(
                f"job '{job_id}' is {job.status.value}: export needs a finished training run "
                "(completed, stopped or failed with a checkpoint)"
            )
        if job.export.status == ExportStatus.RUNNING:
            raise Conflict(f"an export of job '{job_id}' is already running: wait for it to end")
        if job.training.train_type == "full":
            raise Conflict(f"job '{job_id}' trained the full model: there is no LoRA adapter to merge")
        if checkpoint is None:
            on_disk = await asyncio.to_thread(find_checkpoints, Path(job.output_dir))
            checkpoint = job.last_checkpoint if job.last_checkpoint and Path(job.last_checkpoint).is_dir() else None
            checkpoint = checkpoint or (on_disk[-1] if on_disk else None)
        if checkpoint is None or not Path(checkpoint).is_dir():
            raise Conflict(f"job '{job_id}' has no checkpoint yet: nothing to export")
        merged = f"{checkpoint}-merged"
        exist_ok = Path(merged).exists()  # a second export of one checkpoint needs --exist_ok true
        argv = build_export_command(self.settings.SWIFT_BIN, checkpoint, exist_ok=exist_ok)
        log_file = Path(job.output_dir) / "logs" / f"{job_id}.export.log"
        info = ExportInfo(status=ExportStatus.RUNNING, checkpoint=checkpoint, command=argv, log_file=str(log_file),
                          started_at=time.time())  # fmt: skip
        # In the set first: a crash right after the status change still leaves the export findable (a stale
        # entry is dropped by the next adoption sweep).
        await self.store.mark_exporting(job_id, True)
        self._starting.add(job_id)
        try:
            return await self._launch_export(job_id, job, info, argv, log_file, auto, checkpoint, actor)
        finally:
            self._starting.discard(job_id)

    async def _launch_export(
        self,
        job_id: str,
        job: Job,
        info: ExportInfo,
        argv: list[str],
        log_file: Path,
        auto: bool,
        checkpoint: str,
        actor: str,
    ) -> ExportInfo:
        try:
            await self.store.update(
                job_id,
                {"export": info, "supervisor_id": self.supervisor_id},
                statuses=ENDED_WITH_SWIFT,
                refuse_export=(ExportStatus.RUNNING,),
                event=("export_started", f"{'automatic ' if auto else ''}export of {checkpoint} started",
                       {"checkpoint": checkpoint, "auto": auto}),
                actor=actor,
            )  # fmt: skip
        except TransitionRefused as exc:
            await self.store.mark_exporting(job_id, False)
            if exc.reason == Refusal.EXPORT_STATE:
                raise Conflict(f"an export of job '{job_id}' is already running: wait for it to end") from None
            raise Conflict(f"job '{job_id}' is {exc.current}: it cannot export now") from None
        # Merging runs on the CPU: the training GPUs are already released to the queue.
        env = build_env(self.base_env, [])
        try:
            run = await ps.launch(argv, env, Path(job.output_dir), log_file)
        except OSError as exc:
            info = info.model_copy(update={"status": ExportStatus.FAILED, "error": f"could not start swift: {exc}",
                                           "finished_at": time.time()})  # fmt: skip
            await self.store.update(job_id, {"export": info}, event=("export_failed", info.error or "", None))
            await self.store.mark_exporting(job_id, False)
            return info
        info = info.model_copy(update={"pid": run.pid, "process_start_time": run.start_time})
        self._spawn(f"{job_id}:export", self._follow_export(job_id, run, info))
        await self.store.update(job_id, {"export": info})
        return info

    async def _follow_export(self, job_id: str, run: ps.RunningProcess, info: ExportInfo) -> None:
        code = await ps.wait_exit(run, self.settings.SUPERVISOR_POLL_INTERVAL)
        if run.verified:
            ps.kill_leftovers(run.pgid)
        log_file = Path(info.log_file or "")
        parser = SwiftLogParser()
        data, _ = await asyncio.to_thread(read_from, log_file, 0, 16 * 1024 * 1024)
        parser.feed(data)
        parser.flush()
        tail = await asyncio.to_thread(tail_lines, log_file, self.settings.LOG_TAIL_ON_FAILURE)
        merged = parser.merged_path or f"{info.checkpoint}-merged"
        update: dict[str, Any] = {"exit_code": code, "finished_at": time.time()}
        event: tuple[str, str, dict[str, Any]]
        if code == 0 or (code is None and parser.merged_path):
            update |= {"status": ExportStatus.COMPLETED, "path": merged}
            event = ("export_completed", f"merged model written to {merged}", {"path": merged})
        elif code is not None and code < 0:
            update |= {"status": ExportStatus.STOPPED, "error": f"export stopped by signal {-code}"}
            event = ("export_stopped", str(update["error"]), {})
        else:
            error = extract_error(tail) or f"swift export exited with code {code}"
            update |= {"status": ExportStatus.FAILED, "error": error}
            event = ("export_failed", f"export failed: {error}", {"log_tail": tail[-10:]})
        try:
            await self.store.update(job_id, {"export": info.model_copy(update=update)}, event=event)
        except TransitionRefused:
            pass
        await self.store.mark_exporting(job_id, False)

    # ---- stop, adopt, shutdown ----------------------------------------------------------------------

    async def stop_process(self, pid: int | None, start_time: float | None) -> str:
        if pid and ps.is_alive(pid, start_time):
            return await ps.terminate_group(pid, self.settings.STOP_GRACE_SECONDS)
        # The leader is gone (its follower kills stragglers); a reused pid must never be signalled.
        return "gone"

    async def adopt(self, job: Job) -> None:
        """Follow a job whose follower died with another API process (same pid and start time)."""
        if job.status == JobStatus.RUNNING:
            if job.pid is None or job.log_file is None:
                await self._end(job.job_id, JobStatus.FAILED, {
                    "error_message": "the API stopped before swift was started; create the job again",
                }, "swift was never started", job.run_id)  # fmt: skip
                return
            log_file = Path(job.log_file)
            alive = ps.is_alive(job.pid, job.process_start_time)
            run = ps.RunningProcess(job.pid, job.process_start_time or 0.0, log_file.with_suffix(".exit.json"),
                                    verified=alive, run_id=job.run_id)  # fmt: skip
            logger.info("Re-attached job {} (pid {}, alive={})", job.job_id, job.pid, alive)
            await self.store.add_event(job.job_id, "reattached", f"followed again by API process {self.supervisor_id}")
            self._spawn(f"{job.job_id}:train", self._follow_training(job.job_id, run, log_file, job.log_offset))
        elif job.export.status == ExportStatus.RUNNING:
            if job.export.pid is None or not job.export.log_file:
                failed = job.export.model_copy(update={
                    "status": ExportStatus.FAILED, "finished_at": time.time(),
                    "error": "the API stopped before swift export was started; export again",
                })  # fmt: skip
                await self.store.update(
                    job.job_id, {"export": failed}, event=("export_failed", failed.error or "", None)
                )
                await self.store.mark_exporting(job.job_id, False)
                return
            log_file = Path(job.export.log_file)
            alive = ps.is_alive(job.export.pid, job.export.process_start_time)
            run = ps.RunningProcess(job.export.pid, job.export.process_start_time or 0.0,
                                    log_file.with_suffix(".exit.json"), verified=alive)  # fmt: skip
            self._spawn(f"{job.job_id}:export", self._follow_export(job.job_id, run, job.export))

    async def forget(self, job_id: str) -> None:
        tasks = [t for k, t in self.tasks.items() if k.startswith(f"{job_id}:")]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def following(self, job_id: str) -> bool:
        return job_id in self._starting or any(
            k.startswith(f"{job_id}:") and not t.done() for k, t in self.tasks.items()
        )

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(self._guard(name, coro), name=name)
        self.tasks[name] = task
        task.add_done_callback(lambda t: self.tasks.pop(name, None) if self.tasks.get(name) is t else None)

    async def _guard(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("follower {} crashed", name)

    async def wait_idle(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=timeout)

    async def shutdown(self) -> None:
        """Stop following (the swift processes go on; the next API process re-attaches them)."""
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
