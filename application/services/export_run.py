"""A runner's export: `swift export` of one checkpoint, from its launch to its recorded end.

The runner (`run_agent.Runner`) runs it after a completed run (the automatic export) or when a scheduler launched
it for a requested one; the job read, the heartbeat and the waits are the runner's. As for a run, swift's exit
status is written beside the export's log before anything else, so that a scheduler can record the end of an
export whose runner died. An export cut short by its host's shutdown is put back to run again from the start.
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from application.models.training_model import ExportInfo, ExportStatus
from application.services import clock
from application.services import process_group as pg
from application.services.disk_space import free_bytes
from application.services.exports import export_escape, merged_path, run_again, while_running
from application.services.input_checks import InputGuards
from application.services.log_parser import SwiftLogParser
from application.services.outbox import until_answered
from application.services.run_end import export_error
from application.services.run_record import HOST_SHUTDOWN
from application.services.swift_command import swift_env
from application.utils.log_files import is_linked, linked_log, open_in_place
from application.utils.log_tail import STORED_LINE_CHARS, read_from, tail_lines

if TYPE_CHECKING:
    from application.services.run_agent import Runner

RERUN_MARK = b"---- swift-api: this export runs again from the start; above is the output of its run cut short ----\n"


def rerun_mark(log_file: Path) -> int:
    """Where this run's output will start in the export's log. Each export has a log of its own, so one already
    there is the output of a run its host cut short: it stays, above a line that says so."""
    if not os.path.lexists(log_file):
        return 0
    with open_in_place(log_file, "r") as fh:  # (not through a link its owner made: that is refused)
        size = os.fstat(fh.fileno()).st_size
        fh.seek(max(0, size - 1))
        ends_a_line = size == 0 or fh.read(1) == b"\n"
    with open_in_place(log_file, "a") as out:
        out.write(RERUN_MARK if ends_a_line else b"\n" + RERUN_MARK)
        return out.tell()


class ExportRun:
    """One export of the runner's job, by its export id."""

    def __init__(self, runner: Runner, export_id: str) -> None:
        self.runner = runner
        self.export_id = export_id

    async def run(self, prepared: ExportInfo | None = None) -> int:
        export_id, runner, settings = self.export_id, self.runner, self.runner.settings
        info = prepared
        if info is None:
            job = await runner.job()
            if job is None or job.export.export_id != export_id or job.export.status != ExportStatus.RUNNING:
                logger.info("export {} of {} is not this runner's to run: leaving", export_id, runner.job_id)
                return 0
            claimed = await self._claim()
            if claimed is None:
                logger.info("export {} of {} is another runner's: leaving", export_id, runner.job_id)
                return 0
            info = claimed
        await runner.tick("export", export_id)
        assert info.command and info.log_file
        log_file = Path(info.log_file)
        job_dir = log_file.parent.parent
        # As for a run: swift's status is on disk before anything else, so that a scheduler can record the
        # export's end if this runner dies before it does.
        exit_file = log_file.with_suffix(".exit.json")
        target = Path(info.output_dir) if info.output_dir else Path(f"{info.checkpoint}-merged")
        # Asked for a while ago (no scheduler ran, or its host went down): a symlink may lead out of the folder since.
        # So may the base model's folder (swift export loads it to merge into).
        escape = await InputGuards.of(settings, runner.store).moved(await runner.job(), base_model=True)
        escape = escape or await asyncio.to_thread(export_escape, job_dir, target, settings.OUTPUT_ROOT)
        try:
            if escape:
                raise OSError(escape)
            exit_file.unlink(missing_ok=True)
            start = rerun_mark(log_file)
            proc = pg.Child(pg.spawn(info.command, swift_env(None, info.export_id), job_dir, log_file))
        except OSError as exc:
            linked = linked_log(log_file)
            error = escape or (linked if is_linked(exc) else f"could not start swift: {exc}")
            failed = info.model_copy(update={"status": ExportStatus.FAILED, "error": error,
                                             "finished_at": clock.now()})  # fmt: skip
            await self._write_export(failed, ("export_failed", failed.error or "", None), final=True)
            return 1
        info = info.model_copy(update={"pid": proc.pid, "process_start_time": pg.process_start_time(proc.pid),
                                       "process_stamp": pg.process_stamp(proc.pid)})  # fmt: skip
        await self._write_export(info, None)
        stopping: asyncio.Task[tuple[str, float]] | None = None
        asked = False  # to stop by its user (or the export is no longer this one): not by the host's shutdown
        while True:
            exited = await runner.wait(proc, settings.RUNNER_POLL_INTERVAL)
            tick = await runner.tick("export", export_id)
            asked = asked or (tick is not None and (tick.export_stop_requested or tick.export_id != export_id))
            if (asked or runner.terminated.is_set()) and stopping is None and not exited:
                stopping = asyncio.create_task(pg.end_group(proc.pid, settings.STOP_GRACE_SECONDS))
            if exited:
                break
        async with runner.beats("export", export_id):
            if stopping is not None:
                await stopping
            await asyncio.to_thread(pg.kill_marked, export_id, proc.pid, pg.KILL_WAIT_SECONDS)
            code = proc.ended_with
            if unwritten := pg.write_exit_file(exit_file, code):
                logger.warning("job {}: the export's exit status not written beside its log: {}", runner.job_id,
                               unwritten)  # fmt: skip
            parser = SwiftLogParser(root=str(job_dir))
            data, _ = await asyncio.to_thread(read_from, log_file, start, 16 * 1024 * 1024, in_place=True)
            parser.feed(data)
            parser.flush()
            tail = await asyncio.to_thread(functools.partial(tail_lines, log_file, settings.LOG_TAIL_ON_FAILURE,
                                                             line_chars=STORED_LINE_CHARS, in_place=True))  # fmt: skip
            merged = parser.merged_path or merged_path(info)
            update: dict[str, Any] = {"exit_code": code, "finished_at": clock.now()}
            event: tuple[str, str, dict[str, Any]]
            if code == 0:
                update |= {"status": ExportStatus.COMPLETED, "path": merged}
                event = ("export_completed", f"merged model written to {merged}", {"path": merged})
            elif stopping is not None and not asked:  # its host goes down
                message = (
                    f"export of {info.checkpoint} interrupted by {HOST_SHUTDOWN}: it runs again once a scheduler leads"
                )
                await self._write_export(
                    run_again(info), ("export_interrupted", message, {"checkpoint": info.checkpoint})
                )
                return 0
            elif asked:
                update |= {"status": ExportStatus.STOPPED, "error": "export stopped on request"}
                event = ("export_stopped", "export stopped on request", {})
            else:
                error = export_error(code, tail, await asyncio.to_thread(free_bytes, job_dir))
                update |= {"status": ExportStatus.FAILED, "error": error}
                event = ("export_failed", f"export failed: {error}", {"log_tail": tail[-10:]})
            await self._write_export(info.model_copy(update=update), event, final=True)
        return 0

    async def _claim(self) -> ExportInfo | None:
        """Record this runner as the export's, unless another runner already is: a scheduler whose record of a
        launch failed (Redis) launches it again, and two swift exports would write one folder. None then."""
        me, export_id, store, job_id = self.runner.info, self.export_id, self.runner.store, self.runner.job_id

        def mine(now: ExportInfo) -> dict[str, Any] | None:
            return {"export": now.model_copy(update={"runner": me})} if now.runner is None or \
                now.runner.is_process(me) else None  # fmt: skip

        before = await until_answered("the export's runner", lambda: while_running(store, job_id, export_id, mine))
        return before.model_copy(update={"runner": me}) if before is not None else None

    async def _write_export(self, info: ExportInfo, event: tuple[str, str, dict[str, Any] | None] | None,
                            final: bool = False) -> None:  # fmt: skip
        """Write this export's state while it is still the job's current export and runs (retrying through
        outages). Not over an end a scheduler recorded meanwhile (it judged this runner dead: its heartbeat went
        stale on another host), nor twice: one end, one event, one webhook."""
        # The end and the way out of the watched exports in one step: a new request may follow at once. A retry
        # after a lost answer finds the export no longer running and writes nothing.
        await until_answered("the export", lambda: while_running(
            self.runner.store, self.runner.job_id, info.export_id, lambda _: {"export": info}, event=event,
            exporting=False if final else None, notify=f"export_{info.status.value}" if final else None))  # fmt: skip
