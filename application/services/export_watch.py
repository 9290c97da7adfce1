"""The leader's watch over exports: each requested one gets its runner launched (an owner's merges held to
MAX_RUNNING_PER_OWNER), and one whose runner died is stopped and recorded, from the exit status its runner wrote
when there is one; an export cut short by its host's restart runs again (`Watchdog` sweeps it with the runs)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from application.config import Settings
from application.models.training_model import ExportInfo, ExportStatus, Job, RunnerInfo
from application.services import clock, launcher
from application.services import process_group as pg
from application.services.cluster_store import ClusterStore
from application.services.disk_space import launch_error
from application.services.exports import merged_path, run_again, while_running
from application.services.job_store import JobStore, TransitionRefused
from application.services.log_parser import SwiftLogParser
from application.services.run_end import host_went_down, killed_with_its_host, popen_signal, signal_text
from application.services.run_record import HOST_RESTART
from application.services.runner_silence import Silence
from application.utils.log_tail import tail_lines


def merged_by_swift(log_file: Path, expected: str) -> bool:
    """swift export's own last lines say it merged into `expected` (blocking: reads the log's tail)."""
    parser = SwiftLogParser()
    parser.feed(("\n".join(tail_lines(log_file, 20, in_place=True)) + "\n").encode())
    return parser.merged_path == expected


class ExportWatch:
    def __init__(self, store: JobStore, cluster: ClusterStore, launcher: launcher.RunnerLauncher, settings: Settings,
                 silence: Silence, stop_leftovers: Callable[[int | None, float | None, str | None, str | None],
                                                            Awaitable[str | None]]) -> None:  # fmt: skip
        self.store = store
        self.cluster = cluster
        self.launcher = launcher
        self.settings = settings
        self.silence = silence
        self.stop_leftovers = stop_leftovers
        # By export id: when this scheduler launched a runner for it whose record Redis did not take.
        self._launched: dict[str, float] = {}
        self._exports_run: Counter[str] = Counter()  # by owner: merge exports running (this sweep's count)
        self._held_back: set[str | None] = set()  # export ids waiting for their owner's MAX_RUNNING_PER_OWNER

    def count(self, exporting: Iterable[Job]) -> None:
        """This sweep's merge exports run by each owner now (launched, or run by a run's runner after its
        training)."""
        self._exports_run = Counter(j.owner for j in exporting if j.owner is not None and (
            j.export.runner is not None or j.export.export_id in self._launched))  # fmt: skip

    def keep_only(self, watched: set[str | None]) -> None:
        self._launched = {key: at for key, at in self._launched.items() if key in watched}
        self._held_back &= watched

    async def watch(self, job: Job) -> None:
        info = job.export
        if info.status != ExportStatus.RUNNING:
            await self.store.forget_idle_export(job.job_id)
            return
        if info.runner is None:
            if job.export_stop_requested:  # stopped before any scheduler launched it: it is not run at all
                stopped = info.model_copy(update={"status": ExportStatus.STOPPED, "finished_at": clock.now(),
                                                  "error": "export stopped on request before it started"})  # fmt: skip
                await self._write_export(job.job_id, info.export_id, stopped,
                                         ("export_stopped", stopped.error or "", None), runner=None,
                                         done=True)  # fmt: skip
                return
            launched = self._launched.get(info.export_id or "")
            if launched is None or time.monotonic() - launched > launcher.RUNNER_START_GRACE:
                # (one launched already, whose record Redis did not take, may be about to take it itself)
                if launched is None and await self._held_by_cap(job):
                    return
                await self._launch_export(job, info)
            return
        runner = info.runner
        alive = self.launcher.is_alive(runner)
        if alive is not False:
            beat = await self.cluster.runner_heartbeat(job.job_id, info.export_id)

            def own(b: dict[str, Any] | None) -> bool:
                return bool(b and b.get("id") == info.export_id)

            beating = own(beat)
            if alive is None:
                alive = not await self.silence.gone(job.job_id, info.export_id, beating, own)
            else:
                alive = not await self.silence.killed(job.job_id, info.export_id, runner, beating, own)
        if alive:
            return
        # Read again: the runner may have recorded its end, handed the export back (its host going down) or been
        # asked to stop since this sweep's read.
        fresh = await self.store.get(job.job_id)
        if fresh is None or fresh.export.export_id != info.export_id or fresh.export.status != ExportStatus.RUNNING \
                or fresh.export.runner != runner:  # fmt: skip
            return
        job, info = fresh, fresh.export
        await self.stop_leftovers(info.pid, info.process_start_time, info.process_stamp, info.export_id)
        code = pg.read_exit(Path(info.log_file).with_suffix(".exit.json"))[0] if info.log_file else None
        if code is None and info.log_file and not job.export_stop_requested and \
                await asyncio.to_thread(merged_by_swift, Path(info.log_file), merged_path(info)):  # fmt: skip
            code = 0  # swift finished the merge while no runner was left to record it (Redis was down, say)
        status = ExportStatus.STOPPED if job.export_stop_requested else ExportStatus.FAILED
        hung = self.silence.hung.pop(info.export_id or "", None)
        error: str | None = "export stopped on request" if job.export_stop_requested else \
            f"the export's {hung}" if hung else \
            f"the export's runner {self._how_it_ended(runner)} before recording its end"  # fmt: skip
        if not job.export_stop_requested and killed_with_its_host(code) and self.launcher.outlived(runner):
            if info.host_restarts < self.settings.HOST_RESTART_REQUEUES:
                message = f"export of {info.checkpoint} interrupted by {HOST_RESTART}: it runs again"
                await self._write_export(job.job_id, info.export_id, run_again(info, host_restart=True),
                                         ("export_interrupted", message, {"checkpoint": info.checkpoint}),
                                         runner=runner)  # fmt: skip
                return  # the next sweep launches it
            limit = self.settings.HOST_RESTART_REQUEUES
            error = host_went_down(info.host_restarts + 1, limit, "this export").error_message
            code = None
        update: dict[str, Any] = {}
        if code == 0:  # its runner died after swift's success, before it recorded it
            status, error = ExportStatus.COMPLETED, None
            update["path"] = merged_path(info)
        ended = info.model_copy(update={"status": status, "error": error, "finished_at": clock.now(),
                                        "exit_code": code, **update})  # fmt: skip
        await self._write_export(job.job_id, info.export_id, ended, (f"export_{status.value}", error or "", None),
                                 runner=runner, done=True)  # fmt: skip

    async def _held_by_cap(self, job: Job) -> bool:
        """Whether the job's export waits for its owner's merge exports to number fewer than MAX_RUNNING_PER_OWNER
        (each merge runs on this host's CPU and memory: one owner could run one per finished job at once); else
        it counts as one of them from now on."""
        cap, owner = self.settings.MAX_RUNNING_PER_OWNER, job.owner
        if not cap or owner is None or job.export.auto:  # (a run's own, launched again: part of the run)
            return False
        if self._exports_run[owner] >= cap:
            if job.export.export_id not in self._held_back:
                self._held_back.add(job.export.export_id)
                why = f"the export waits: '{owner}' runs {cap} already (MAX_RUNNING_PER_OWNER={cap})"
                with contextlib.suppress(TransitionRefused):  # (deleted meanwhile)
                    await self.store.add_event(job.job_id, "export_waiting", why, {"cap": cap})
            return True
        self._exports_run[owner] += 1
        return False

    def _how_it_ended(self, runner: RunnerInfo) -> str:
        """What this scheduler saw of a runner's end (only the one that started it sees its exit status)."""
        code = self.launcher.exit_status(runner)
        sig = popen_signal(code)
        if sig is not None:
            return f"was {signal_text(sig)}"
        return f"exited with code {code}" if code is not None else f"died (pid {runner.pid})"

    async def _launch_export(self, job: Job, info: ExportInfo) -> None:
        logs = Path(job.output_dir) / "logs"
        try:
            runner = await self.launcher.launch(job.job_id, job.run_id or "-", logs, export_id=info.export_id)
        except OSError as exc:
            failed = info.model_copy(update={"status": ExportStatus.FAILED, "finished_at": clock.now(),
                                             "error": launch_error(exc, logs, "export again", "export")})  # fmt: skip
            await self._write_export(job.job_id, info.export_id, failed, ("export_failed", failed.error or "", None),
                                     runner=None, done=True)  # fmt: skip
            return
        self._launched[info.export_id or ""] = time.monotonic()
        await self._record_export_runner(job.job_id, info.export_id, runner)
        self._launched.pop(info.export_id or "", None)

    async def _record_export_runner(self, job_id: str, export_id: str | None, runner: RunnerInfo) -> None:
        """Add the runner to the export's record as it is now: the runner may already have written its pid, or
        even its end (a quick export, a scheduler stalled after the launch), which a copy read before the
        launch would undo (a completed export back to running, for good). Not over another runner that took
        it (launched by an earlier sweep whose record failed): this one then leaves by itself."""
        await while_running(self.store, job_id, export_id, lambda now: {"export": now.model_copy(
            update={"runner": runner})} if now.runner is None or now.runner.is_process(runner) else None)  # fmt: skip

    async def _write_export(self, job_id: str, export_id: str | None, info: ExportInfo,
                            event: tuple[str, str, dict[str, Any] | None] | None, *, runner: RunnerInfo | None,
                            done: bool = False) -> bool:  # fmt: skip
        """Record `info` while that export still runs with `runner`, the runner (or none) it was judged by;
        False when its runner recorded its end or handed it back meanwhile, a new export replaced it, or the
        job is gone (nothing written then: not over a newer record, not twice)."""
        wrote = await while_running(self.store, job_id, export_id,
                                    lambda now: {"export": info} if now.runner == runner else None, event=event,
                                    exporting=False if done else None,
                                    notify=f"export_{info.status.value}" if done else None)  # fmt: skip
        return wrote is not None
