"""The leader's watchdog: no run stays `running` without a live runner, and no export request waits unserved.

Every WATCH_INTERVAL it looks at each running job's runner: dead (its exit status seen by the launcher, its
pid gone or reused on this host, its heartbeat expired on another; or alive on this host but silent, with no
heartbeat for a while (runner_silence): stopped or hung, it is killed), the scheduler stops what is left of the
run (SIGTERM to swift's group, grace, SIGKILL) and records the truth, from the exit status the runner wrote
next to the log when there is one, or as `failed` naming what killed the runner; a runner older than its host
(rebooted, or a container started again) died with it, with swift (killed, or no status written), and its job
goes back to the queue to resume, up to HOST_RESTART_REQUEUES times. A run that ended past its time limit was
stopped by it, whoever records it. The same for exports, and export requests (an API worker asked) get their
runner launched here (`export_watch`). Expired job records are removed. A scheduler stopping
where its runners die with it (STOP_RUNS_ON_SHUTDOWN) ends their runs through it first.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from loguru import logger
from redis.exceptions import RedisError

from application.config import Settings
from application.models.training_model import Job, JobStatus, RunnerInfo
from application.services import clock, launcher
from application.services import process_group as pg
from application.services.cluster_store import ClusterStore
from application.services.export_watch import ExportWatch
from application.services.exports import forgive_auto_export, owe_auto_export, owed_auto_exports, request_auto_export
from application.services.files import FileStore
from application.services.job_store import JobStore, TransitionRefused
from application.services.launcher import RunnerLauncher
from application.services.log_parser import RunFacts
from application.services.outbox import until_answered
from application.services.retention import Retention
from application.services.run_end import (
    Conclusion,
    checkpoint_step,
    host_went_down,
    killed_with_its_host,
    runner_lost,
    work_of,
)
from application.services.run_outputs import parse_logging_jsonl
from application.services.run_record import (
    HOST_RESTART,
    end_recorded,
    interrupt_of,
    read_run,
    record_end,
    time_limit_end,
    unrecorded_checkpoints,
)
from application.services.runner_silence import Silence

WATCH_INTERVAL = 0.5
RETENTION_EVERY = 60.0
# The stored points a fill of the loss history compares with (the newest step's are among them).
FILL_LOOKBACK = 8
# After swift's grace, how long a runner told to stop may take to record its run's end.
RECORD_GRACE = 10.0
# After swift's grace and two of its runner's ticks, how long that runner may take to kill and reap swift's group.
LOST_MARGIN_SECONDS = 1.0
# How long after a completed run's end its automatic export may stay owed before a sweep looks at it: its runner,
# alive, asks at once. One on another host, whose life only its heartbeat would tell, is given longer.
OWED_WAIT = 1.0
REMOTE_OWED_WAIT = 60.0
# What a run whose runner was never launched goes back to the queue for.
NEVER_LAUNCHED = "the stop of the scheduler that was starting it (its runner was never launched)"


def ran_to_its_end(facts: RunFacts) -> bool:
    """The log shows the trainer's end lines after its last step (ms-swift prints those lines after a crash too:
    alone, they prove nothing)."""
    p = facts.progress
    return facts.finished and p is not None and p.current_step is not None and p.max_steps is not None and \
        p.current_step >= p.max_steps  # fmt: skip


def _modified(path: Path | None) -> float | None:
    try:
        return path.lstat().st_mtime if path is not None and not path.is_symlink() else None
    except OSError:
        return None


class Watchdog:
    def __init__(
        self,
        store: JobStore,
        cluster: ClusterStore,
        launcher: RunnerLauncher,
        settings: Settings,
        fence: Callable[[], str | None],
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.launcher = launcher
        self.settings = settings
        self.fence = fence
        self.host = socket.gethostname()
        self._last_retention = 0.0
        self.files = FileStore(settings, store.r, store.keys)
        self.retention = Retention(settings, store, cluster, self.files)
        self._unreadable: set[str] = set()  # running jobs whose records this version cannot read (warned once)
        self._failing: set[str] = set()  # jobs whose step of the sweep raised (logged once)
        self._lost_since: dict[str, float] = {}  # running jobs whose records are gone: since when (monotonic)
        self.silence = Silence(cluster, launcher, settings, fence)
        # By run id: when a run with no runner yet, stamped in this host's future, was first seen.
        self._unlaunched: dict[str, float] = {}
        self.exports = ExportWatch(store, cluster, launcher, settings, self.silence, self._stop_leftovers)

    async def sweep(self) -> None:
        try:
            # Heartbeats are writes: while Redis refuses them (at its maxmemory, its disk full) none lands, and a
            # sweep that only read judged every runner hung. Refused here, this sweep counts as an outage.
            await self.cluster.check_writable()
            await self._sweep()
        except RedisError:
            # No runner could beat while Redis was away (every heartbeat key lapsed): silence counts from the
            # first sweep that reads Redis again, or a live runner was judged dead for Redis's outage.
            self.silence.clear()
            raise

    async def _sweep(self) -> None:
        ids = await self.store.ids_with_status(JobStatus.RUNNING)
        running = await self.store.get_many(ids)
        lost_now = set(ids) - {job.job_id for job in running}
        self._lost_since = {job_id: self._lost_since.get(job_id, time.monotonic()) for job_id in lost_now}
        s = self.settings
        # Its runner, finding no record, stops swift (SIGTERM, its grace, SIGKILL): its GPUs are not free before.
        # Freed at once, a job started on a GPU still held by a trainer that took its grace (review EK).
        wait = s.STOP_GRACE_SECONDS + 2 * s.RUNNER_POLL_INTERVAL + LOST_MARGIN_SECONDS
        for lost in lost_now:
            if time.monotonic() - self._lost_since[lost] < wait:
                continue
            if await self.store.forget_lost(lost):  # (its runner has stopped swift: the job is not its any more)
                logger.warning("running job {}'s record is gone (evicted by Redis, or deleted by hand): its GPUs "
                               "are free again", lost)  # fmt: skip
            elif lost not in self._unreadable:
                self._unreadable.add(lost)
                logger.warning("running job {}'s record cannot be read by this version (a value written by hand or "
                               "by another version): its runner is not watched until it is mended or the job is "
                               "deleted", lost)  # fmt: skip
        self._unreadable &= set(ids)
        beats = await self.cluster.runner_heartbeats([(job.job_id, job.run_id) for job in running])
        for job, beat in zip(running, beats, strict=True):
            if not await self._runner_alive(job, beat):
                await self._alone(job.job_id, self.runner_died(job))
        exporting = await self.store.get_many(await self.store.exporting())
        # Merge exports run by each owner now (launched, or run by a run's runner after its training).
        self.exports.count(exporting)
        for job in sorted(exporting, key=lambda j: j.export.started_at or 0.0):  # (held back: the first asked first)
            await self._alone(job.job_id, self.exports.watch(job))
        watched = {job.run_id for job in running} | {job.export.export_id for job in exporting}
        self.silence.keep_only(watched)
        self._unlaunched = {key: since for key, since in self._unlaunched.items() if key in watched}
        self.exports.keep_only(watched)
        owed = await owed_auto_exports(self.store, clock.now() - OWED_WAIT)
        for job_id, since in owed:
            await self._alone(job_id, self._owed_export(job_id, since))
        self._failing &= {job.job_id for job in (*running, *exporting)} | {job_id for job_id, _ in owed}
        self.launcher.reap()
        if time.monotonic() - self._last_retention > RETENTION_EVERY:
            self._last_retention = time.monotonic()
            await self.retention.expire_old_jobs()
            await self.files.sweep_orphans()

    async def _alone(self, job_id: str, step: Awaitable[None]) -> None:
        """One job's step of the sweep, whose failure is that job's: raised on, one run's unreadable output (a
        logging.jsonl value no number fits) stopped every sweep, and no dead runner of anyone's was noticed
        again. Redis going away still ends the sweep (`sweep`)."""
        try:
            await step
        except RedisError:
            raise
        except Exception:
            if job_id not in self._failing:  # (a traceback once, not one every sweep)
                self._failing.add(job_id)
                logger.exception("watchdog: job {} could not be looked after; the sweep goes on", job_id)
        else:
            self._failing.discard(job_id)

    async def _runner_alive(self, job: Job, beat: dict[str, Any] | None) -> bool:
        def own(b: dict[str, Any] | None) -> bool:
            return bool(b and b.get("run_id") == job.run_id)

        beating = own(beat)
        if job.runner is None:
            # Launched but not recorded yet, or never launched (the scheduler died in between).
            age = clock.now() - (job.started_at or 0)
            if age < 0:  # stamped by a scheduler whose clock is ahead of this one's: counted from first sight
                age = time.monotonic() - self._unlaunched.setdefault(job.run_id or "", time.monotonic())
            return (
                beating
                or age < launcher.RUNNER_START_GRACE
                or not await self.silence.confirmed(job.job_id, job.run_id, own)
            )
        alive = self.launcher.is_alive(job.runner)
        if alive is None:  # another host: only its heartbeat can tell
            return not await self.silence.gone(job.job_id, job.run_id, beating, own)
        return alive and not await self.silence.killed(job.job_id, job.run_id, job.runner, beating, own)

    async def runner_died(self, job: Job) -> None:
        """Stop what is left of a run whose runner is gone, and record how it ended."""
        returncode = self.launcher.exit_status(job.runner) if job.runner else None
        outcome = await self._stop_leftovers(job.pid, job.process_start_time, job.process_stamp, job.run_id)
        # What was asked of the job while its run was being stopped (a stop, a pause) decides how it ends.
        fresh = await self.store.get(job.job_id)
        if fresh is None or fresh.status != JobStatus.RUNNING or fresh.run_id != job.run_id:
            return
        job = fresh
        log_file = Path(job.log_file) if job.log_file else None
        record = (pg.read_exit_record(log_file.with_suffix(".exit.json")) if log_file else None) or {}
        code, exited_at = pg.exit_of(record)
        limit_hit = False
        if code is None:
            exited_at = None
        else:
            # What its runner acted on, should the record no longer say so (Redis back from an older snapshot).
            stop, pause, preempt_for = pg.exit_asked(record)
            asked = {"stop_requested": job.stop_requested or stop, "pause_requested": job.pause_requested or pause,
                     "preempt_for": job.preempt_for or preempt_for}  # fmt: skip
            job = job.model_copy(update=asked)
            limit_hit = pg.exit_timed_out(record)
        interrupt = interrupt_of(job.stop_requested, job.pause_requested, job.preempt_for)
        # With no exit status and no request to end it, all that is known is that the runner died.
        hung = self.silence.hung.pop(job.run_id or "", None)
        lost = runner_lost(returncode, job.runner.pid if job.runner else None, f"its {hung}" if hung else None,
                           work_of(job))  # fmt: skip
        at_cap = False
        facts, tail, checkpoints, free = await asyncio.to_thread(read_run, job, log_file, None,
                                                           self.settings.LOG_TAIL_ON_FAILURE)  # fmt: skip
        # With no exit status, only a run that got to its last step and its end lines is taken as completed (not
        # requeued, not lost): swift trains on while no runner, and no scheduler, watches it.
        finished = code is None and ran_to_its_end(facts)
        # A run of swift stopped by its time limit fails on it, as its runner would have recorded (a runner killed
        # in the limit's grace left a SIGTERM's end, recorded as a signal and retried: hunt DK): the runner wrote
        # so beside the log (then the limit outranks any request, as for the runner), or, asked nothing, it ended
        # short of its end past its limit.
        # When it ended: its exit record's time, else swift's last write to its log (not now: a run that died with
        # its host 30 minutes into a 1-hour limit, noticed hours later, failed on its limit, not requeued: review DL).
        limit, ended = job.time_limit_seconds, exited_at
        if code is None and limit is not None and interrupt is None and not limit_hit:
            written = await asyncio.to_thread(_modified, log_file)
            ended = clock.from_local(written) if written is not None else None
        past = limit is not None and job.started_at is not None and ended is not None and \
            ended - job.started_at > limit  # fmt: skip
        timed_out = time_limit_end(limit, work_of(job)) if limit is not None and code != 0 and not finished and \
            (limit_hit or (past and interrupt is None)) else None  # fmt: skip
        if timed_out is not None:
            interrupt = None
        logged = log_file is not None and await asyncio.to_thread(os.path.exists, log_file)
        if job.runner is None and job.pid is None and code is None and not logged:
            # Moved to running, then its scheduler died (or stalled: it may launch yet) before the launch: nothing
            # ran, nothing is lost, once no runner can start from its spec. Revoked for a run asked to stop or
            # pause too: its GPUs go to the next job, and a late launch would start swift on them.
            spec = pg.launch_spec(Path(job.output_dir) / "logs", job.job_id, job.run_id or "")
            if not await asyncio.to_thread(pg.revoke_launch, spec, log_file, launcher.RUNNER_START_GRACE):
                return  # a runner took it after all: the next sweep sees it
            if interrupt is None:
                job = job.model_copy(update={"preempt_for": NEVER_LAUNCHED})
                interrupt = "preempt"
        elif interrupt is None and not finished and timed_out is None and killed_with_its_host(code) and \
                job.runner and self.launcher.outlived(job.runner):  # fmt: skip
            # Its host (machine or container) went down with everything on it: as for a host that shuts down
            # in order, the job goes back to the queue to resume from its last checkpoint. Not for ever, though:
            # the run itself may be what brings its host down. (Attempts recorded before `preempted_for`
            # existed do not count.)
            before = sum(a.preempted_for == HOST_RESTART for a in job.attempts)
            if before < self.settings.HOST_RESTART_REQUEUES:
                job = job.model_copy(update={"preempt_for": HOST_RESTART})
                interrupt = "preempt"
            else:
                lost, at_cap = host_went_down(before + 1, self.settings.HOST_RESTART_REQUEUES, "this job's runs",
                                              work_of(job)), True  # fmt: skip
        # Unless the log shows the training finished, a run over that cap ends as lost, whatever swift's status.
        unexplained = (code is None and not finished) or (at_cap and not facts.finished)
        # Stamped with when the run ended, as its runner would have, not with when this scheduler noticed (hours
        # later, after a scheduler outage): the exit record's time, else swift's last write to its log for a run
        # that got to its end.
        modified = await asyncio.to_thread(_modified, log_file) if finished else None
        ended_at = exited_at or (modified and clock.from_local(modified)) or clock.now()
        override = timed_out or (lost if unexplained and interrupt is None else None)
        end = record_end(job, code, facts, tail, checkpoints, interrupt=interrupt, stop_outcome=outcome,
                         override=override, now=min(ended_at, clock.now()), keep=self.settings.LOG_TAIL_ON_FAILURE,
                         disk_free=free, backoff=self.settings.RETRY_BACKOFF_SECONDS)  # fmt: skip
        if timed_out is not None:
            end.fields["stop_outcome"] = outcome or "gone"
        # (a quantized export's own job exports nothing)
        auto_export = end.status == JobStatus.COMPLETED and self.settings.AUTO_EXPORT and job.kind != "export"
        if auto_export:  # (owed until asked for below: this scheduler may die first)
            await owe_auto_export(self.store, job.job_id)
        try:
            await self._record_end(job, end)
        except TransitionRefused:
            return  # the runner recorded the end after all, or the job went meanwhile
        finally:
            if job.runner is not None:
                self.launcher.forget(job.runner)
        logger.warning("job {}: runner {} gone; recorded {} ({})", job.job_id, job.runner.pid if job.runner else
                       None, end.status.value, end.message)  # fmt: skip
        # The end is recorded, so no later sweep sees this run again: what follows it is done here, Redis or not.
        since = await until_answered("the events", lambda: self.store.newest_event_id(job.job_id))
        for path in unrecorded_checkpoints(checkpoints, facts.run_dir, job.last_checkpoint):
            await until_answered("an event", self._saved_event(job.job_id, path, since))
        if end.event is not None:
            event = end.event
            await until_answered("an event", lambda: self.store.add_event_once(job.job_id, *event, since=since))
        # A requeued run's steps past the checkpoint it resumes from are trained again: only those up to it (they
        # were lost for good: the next run starts after them).
        upto = checkpoint_step(end.fields.get("resume_from")) if end.status == JobStatus.QUEUED else None
        if facts.run_dir and (end.status != JobStatus.QUEUED or upto is not None):
            # Only the sweep whose record of the end was taken fills in, once.
            run_dir = Path(facts.run_dir)
            await until_answered("the loss history", lambda: self._fill_history(job.job_id, run_dir, upto))
        if auto_export:
            # The automatic export its dead runner could not run: requested here, launched by the next sweep.
            await request_auto_export(self.store, self.settings, job.job_id, lambda: None)

    async def _owed_export(self, job_id: str, since: float) -> None:
        """Ask for the automatic export of a run that completed, when its runner (or the scheduler that recorded its
        end) died before asking (hunt EL: the job stayed completed, with no export and no word why)."""
        job = await self.store.get(job_id)
        if job is not None and job.status == JobStatus.RUNNING:
            # Its end not written yet: a runner retrying it through a Redis outage noted the export first (dropped
            # now, a death after the end lost the export again: review EN). A runner that dies first gets its end
            # recorded by `runner_died`, which notes the export again.
            return
        if job is None or job.status != JobStatus.COMPLETED:  # deleted, or its run ended otherwise
            await forgive_auto_export(self.store, job_id)
            return
        export = job.export
        if export is not None and (export.started_at or 0.0) >= (job.finished_at or 0.0):  # asked for since
            await forgive_auto_export(self.store, job_id)
            return
        alive = self.launcher.is_alive(job.runner) if job.runner is not None else False
        if alive or (alive is None and clock.now() - since < REMOTE_OWED_WAIT):
            return  # its runner asks for it (another host's: only time tells)
        logger.warning("job {}: its run completed, but its runner ended before asking for the automatic export: "
                       "asked for now", job_id)  # fmt: skip
        await request_auto_export(self.store, self.settings, job_id, lambda: None)

    def _saved_event(self, job_id: str, path: str, since: str | None) -> Callable[[], Awaitable[None]]:
        return lambda: self.store.add_event_once(job_id, "checkpoint_saved", f"checkpoint saved: {path}",
                                                 {"path": path}, since=since)  # fmt: skip

    async def _record_end(self, job: Job, end: Conclusion) -> None:
        """Record the end a sweep concluded; TransitionRefused when someone else recorded one first. A write whose
        answer was lost counts when Redis took it (RedisError, for the next sweep to try again, when not)."""
        try:
            await self.store.transition(job.job_id, end.status, expect=(JobStatus.RUNNING,), run_id=job.run_id,
                                        fence=self.fence(), fields=end.fields, message=end.message)  # fmt: skip
        except RedisError:
            if not await until_answered("the end of a run", lambda: end_recorded(self.store, job.job_id, job.run_id,
                                                                                 end.status, end.fields)):  # fmt: skip
                raise

    async def _fill_history(self, job_id: str, run_dir: Path, upto: int | None = None) -> None:
        """The loss points the dead runner never wrote, from the run's logging.jsonl (those up to step `upto`,
        when given): swift may have trained on (to its end) while neither its runner nor a scheduler was there to
        follow it."""
        log = await asyncio.to_thread(parse_logging_jsonl, run_dir / "logging.jsonl")
        if upto is not None:
            log.history = [point for point in log.history if point["step"] <= upto]
        stored = await self.store.history(job_id, FILL_LOOKBACK)
        last = max((p.step for p in stored), default=0)
        # A step may hold a training and an evaluation point: the one of the last step not stored yet counts too.
        have = {(p.step, p.eval_loss is None) for p in stored if p.step == last}
        if missing := [point for point in log.history if point["step"] > last or
                       (point["step"] == last and (last, point.get("eval_loss") is None) not in have)]:  # fmt: skip
            await self.store.add_history(job_id, missing)
            logger.info("job {}: {} loss points its runner did not write, from {}", job_id, len(missing), run_dir)

    async def _stop_leftovers(self, pid: int | None, start_time: float | None, stamp: str | None,
                              mark: str | None) -> str:  # fmt: skip
        """Stop what is left of a run or export whose runner died, before its end is recorded: not the leader
        alone (a trainer that ignored the SIGTERM its launcher died of would train on GPUs given to the next
        job), nor only what has a recorded pid (a runner can die between starting swift and recording it: its
        processes are found by their mark). Returns how it ended ("gone" when nothing was left)."""
        marked = await asyncio.to_thread(pg.marked_groups, mark) if mark else []
        if pid is None:
            groups, escaped = marked, []
        else:
            alive = await asyncio.to_thread(pg.run_group_alive, pid, start_time, stamp, mark)
            groups = [pid] if alive else []
            escaped = [g for g in marked if g != pid]  # in a session of its own (setsid): stopped too, not told
        grace = self.settings.STOP_GRACE_SECONDS
        outcomes = await asyncio.gather(*(pg.terminate_group(g, grace) for g in [*groups, *escaped]))
        return outcomes[0] if groups else "gone"

    async def stop_local_runs(self) -> list[str]:
        """End the runs and exports whose runners live on this host, for a scheduler stopping where they cannot
        outlive it (STOP_RUNS_ON_SHUTDOWN): SIGTERM to each runner, which stops swift (STOP_GRACE_SECONDS) and
        records the end, a training run back in the queue to resume from its last checkpoint. Returns the jobs,
        once their runners have ended (or RECORD_GRACE after the grace)."""
        stopping: dict[str, RunnerInfo] = {}
        for job in await self.store.get_many(await self.store.ids_with_status(JobStatus.RUNNING)):
            if job.runner is not None and self.launcher.terminate(job.runner):
                stopping[job.job_id] = job.runner
        for job in await self.store.get_many(await self.store.exporting()):
            runner = job.export.runner if job.export else None
            if runner is not None and self.launcher.terminate(runner):
                stopping[job.job_id] = runner
        deadline = time.monotonic() + self.settings.STOP_GRACE_SECONDS + RECORD_GRACE
        left = dict(stopping)
        while left and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            left = {job_id: r for job_id, r in left.items() if self.launcher.is_alive(r)}
        if left:
            logger.warning("runner(s) of {} still running after the grace: they end with this host", ", ".join(left))
        return list(stopping)
