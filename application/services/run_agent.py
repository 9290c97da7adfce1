"""What a runner does (`application/runner.py` is its entry): own one run of a job from launch to its recorded end.

The scheduler launches it detached, in its own session, with an explicit environment (see `launcher`). It
starts `swift sft` (or `swift export`) in a session of its own, reads its log as it grows, and writes
progress, loss history, checkpoints, events and the final status to Redis itself, fenced by the run id
(an export, `export_run`, by its export id). It beats a heartbeat, honours stop requests (SIGTERM to swift's group, a
grace, SIGKILL), runs the automatic export after a successful run, and keeps every update through a Redis
outage until Redis answers again (`outbox`). No API or scheduler process needs to be alive for any of this.

When swift exits the runner first writes the exit status next to the log, so a scheduler that finds the
runner dead can still record the truth. A run that is no longer this runner's (deleted, or taken over) is
stopped, and the runner leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from loguru import logger
from redis.exceptions import RedisError

from application.config import Settings, SettingsError, load_settings
from application.models.training_model import (
    ExportInfo,
    Job,
    JobStatus,
    RunnerInfo,
)
from application.services import clock
from application.services import process_group as pg
from application.services.cluster_store import ClusterStore, RunnerTick
from application.services.export_run import ExportRun
from application.services.exports import owe_auto_export, request_auto_export
from application.services.heartbeat import beating
from application.services.job_store import JobStore
from application.services.keys import Keys
from application.services.log_follower import READ_BUDGET, LogFollower
from application.services.log_parser import SwiftLogParser
from application.services.outbox import Orphaned, Outbox
from application.services.predictions import format_limit
from application.services.redis_service import REDIS_AWAY, create_client, redis_url
from application.services.run_end import work_of
from application.services.run_history import RunHistory
from application.services.run_logs import exit_about
from application.services.run_record import Asked, read_run, record_end, run_ended_for
from application.services.swift_command import swift_env
from application.utils.log_files import allow_moved_root, is_linked, linked_log
from application.utils.logger import setup_logging

START_ATTEMPTS_SECONDS = 60.0
LOADED = time.monotonic()  # (about when this runner started: it loads this module first)
# A run's start on Redis's clock this far from its time counted here is a step of that clock (a launch's few seconds
# are not; NTP slews offsets under 128 ms rather than step them).
RESTAMP_SECONDS = 30.0


def me() -> RunnerInfo:
    pid = os.getpid()
    return RunnerInfo(host=socket.gethostname(), pid=pid, start_time=pg.process_start_time(pid),
                      stamp=pg.process_stamp(pid), launched_at=clock.now())  # fmt: skip


class Runner:
    def __init__(self, settings: Settings, store: JobStore, cluster: ClusterStore, job_id: str, run_id: str) -> None:
        self.settings = settings
        self.store = store
        self.cluster = cluster
        self.job_id = job_id
        self.run_id = run_id
        self.beaten: set[str] = set()  # the run and export ids this runner beat for (their keys are dropped at its end)
        self.info = me()
        self.terminated = asyncio.Event()  # SIGTERM/SIGINT to the runner itself: the host is going down

    # ---- shared -------------------------------------------------------------------------------------

    async def job(self, patient: bool = False) -> Job | None:
        """The job, waiting out a Redis that is not up yet (the runner may start while it restarts): for
        START_ATTEMPTS_SECONDS, or, `patient` (swift already runs), until it answers or the runner is told to end,
        as it would mid-run (a runner that gave up left swift training unwatched, and its end recorded lost)."""
        deadline = time.monotonic() + START_ATTEMPTS_SECONDS
        warned = 0.0
        while True:
            try:
                return await self.store.get(self.job_id)
            except RedisError as exc:
                if (not patient and time.monotonic() > deadline) or self.terminated.is_set():
                    raise
                if time.monotonic() - warned > 60:
                    warned = time.monotonic()
                    # (A refused password is an answer: "does not answer" sent its operator to the wrong place.)
                    said = "does not answer yet" if isinstance(exc, REDIS_AWAY) else "refuses this runner's read"
                    logger.warning("Redis {} ({}); retrying", said, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.terminated.wait(), 1.0)

    async def tick(self, kind: str, ident: str) -> RunnerTick | None:
        self.beaten.add(ident)
        beat = {"run_id": self.run_id, "kind": kind, "id": ident, "host": self.info.host, "pid": self.info.pid,
                "at": clock.now()}  # fmt: skip
        try:
            return await self.cluster.runner_tick(self.job_id, beat, self.settings.RUNNER_HEARTBEAT_TTL)
        except RedisError:
            return None

    def beats(self, kind: str, ident: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Beat in the background meanwhile: swift's stop grace, reading a long run's logging.jsonl or a slow Redis
        may last past the few heartbeat TTLs after which the scheduler kills a silent runner as hung."""
        return beating(lambda: self.tick(kind, ident), self.settings.RUNNER_POLL_INTERVAL)

    async def wait(self, proc: pg.Child, timeout: float) -> bool:
        """Sleep until the process exits, the runner is told to go, or `timeout`; True when it exited."""
        waiters = {asyncio.ensure_future(proc.wait()), asyncio.ensure_future(self.terminated.wait())}
        _, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return proc.returncode is not None

    # ---- training -----------------------------------------------------------------------------------

    async def train(self, early: pg.Child | OSError | None = None) -> int:
        """Follow the training run to its recorded end. `early`: swift as the entry already started it (from the
        launch spec the scheduler wrote), so a GPU handed over waits for no import of ours."""
        job = await self._own_run(early)
        if not isinstance(job, Job):
            return job
        await self.tick("train", self.run_id)  # at once: the first look at the log is a poll interval away
        outbox = Outbox(self.store, self.job_id, self.run_id)
        launched = job.runner.launched_at if job.runner else self.info.launched_at
        outbox.set(runner=self.info.model_copy(update={"launched_at": launched, "ready_at": clock.now()}))
        log_file = Path(job.log_file or Path(job.output_dir) / "logs" / f"{job.job_id}.train.log")
        exit_file = log_file.with_suffix(".exit.json")
        proc = await self._start_swift(job, early, outbox, log_file, exit_file)
        if proc is None:
            return 1
        # A process that already ended (an instant failure) has no start time left to read: the launch's is close.
        start_time = pg.process_start_time(proc.pid) or time.time()
        where = f"GPUs {job.gpu_ids}" if job.gpu_ids else "the CPU"
        outbox.set(pid=proc.pid, process_start_time=start_time, process_stamp=pg.process_stamp(proc.pid))
        outbox.event("process_started", f"swift started (pid {proc.pid}) on {where}",
                     {"pid": proc.pid, "at": clock.from_local(proc.started_at)})  # fmt: skip
        parser = SwiftLogParser(started_at=clock.from_local(start_time), root=job.output_dir)
        if job.progress.current_step:
            # A resumed run: swift's bar starts again at 0 until the first new step; from the checkpoint's step
            # (set at the start) only later steps count, or the job showed 0% all through the data skip.
            parser.resume_from(job.progress)
        started_at = job.started_at or clock.now()
        # The run's time so far as the shared clock tells it (its launch included), unless that is further than a
        # step from what this runner has lived (a step of Redis's clock between the scheduler's stamp and this
        # runner's first reading is no run time), then this host's monotonic clock: a step (its host's NTP, a VM
        # resumed) that a later reading took fired a limit an hour early, or left a run going an hour past it
        # (hunt DT).
        since, age = clock.now() - started_at, time.monotonic() - LOADED
        ran = Elapsed(since if abs(since - age) <= RESTAMP_SECONDS else age)
        follow = LogFollower(log_file, parser, outbox, started_at, job.time_limit_seconds, job.checkpoints)
        stopping: asyncio.Task[tuple[str, float]] | None = None
        asked = Asked()
        timed_out = orphaned = False
        limit = job.time_limit_seconds
        behind = recorded = False
        ended_at = 0.0
        while True:
            exited = await self.wait(proc, 0 if behind else self.settings.RUNNER_POLL_INTERVAL)
            if exited and not recorded:
                about = exit_about(job, parser.run_dir)
                limited = {"time_limit": True} if timed_out else None
                if unwritten := pg.write_exit_file(exit_file, proc.ended_with, limited, about=about):
                    logger.warning("job {}: swift's exit status not written beside its log: {}", self.job_id, unwritten)
                recorded, ended_at = True, clock.now()  # (the end's time: Redis may keep the runner long after)
            behind = follow.read(READ_BUDGET)
            tick = await self.tick("train", self.run_id)
            if tick is not None and (tick.run_id != self.run_id or tick.status != JobStatus.RUNNING.value) and \
                    not orphaned:  # fmt: skip
                orphaned = True
                self._say_orphaned(tick)
            if tick is not None:
                asked.take(tick.stop_requested, tick.pause_requested, tick.preempt_for)
            interrupt = asked.interrupt
            if abs(drift := clock.now() - started_at - ran.seconds()) > RESTAMP_SECONDS:
                # Redis's clock stepped since the run started: its start moves with it, so that the time its limit
                # leaves (status, the planner, a watchdog's judgement of a dead runner) stays what it is (review DU).
                started_at += drift
                outbox.set(started_at=started_at)
                follow.started_at = started_at
            if limit is not None and not exited and not timed_out and stopping is None and interrupt is None and \
                    ran.seconds() > limit:  # fmt: skip
                timed_out = True  # Slurm's TIMEOUT: the run had the time it asked for
                outbox.event("time_limit", f"time limit of {format_limit(limit)} reached: stopping the run",
                             {"time_limit_seconds": limit})  # fmt: skip
            wanted = interrupt or timed_out or orphaned or self.terminated.is_set()
            if wanted and stopping is None and not exited:
                reason = (f"{interrupt} requested" if interrupt else "time limit" if timed_out
                          else "runner told to stop" if not orphaned else "orphaned")  # fmt: skip
                logger.info("{}: SIGTERM to swift's process group {}", reason, proc.pid)
                stopping = asyncio.create_task(pg.end_group(proc.pid, self.settings.STOP_GRACE_SECONDS))
            try:
                await outbox.flush()
            except Orphaned:
                if not orphaned:  # (a write refused before a heartbeat saw it: said all the same)
                    self._say_orphaned(await self.tick("train", self.run_id))
                orphaned = True
            if exited and not behind:
                break
        async with self.beats("train", self.run_id):
            if stopping is not None:
                # swift's launcher goes at the SIGTERM; its trainer, holding the GPUs, may take the whole grace.
                outcome, gone_at = await stopping
                ended_at = max(ended_at, gone_at)
            else:
                outcome = None
            # Nothing may outlive the run: what is left in swift's group (orphaned dataloader workers, a stray
            # trainer) dies at once; what left the group for a session of its own is found by the run's mark.
            pg.signal_group(proc.pid, signal.SIGKILL)
            code = proc.ended_with
            follow.read()
            follow.flush()
            if orphaned:
                await asyncio.to_thread(pg.kill_marked, self.run_id, proc.pid, pg.KILL_WAIT_SECONDS)
                logger.info("job {} run {} is not this runner's any more: end not recorded", self.job_id, self.run_id)
                return 0
            # The scan for marked leftovers beside the reading of the run's files: both are done before the end is
            # written (nothing of the run holds its GPUs once it says they are free), and a hand-over waited for
            # each in turn.
            # (Each awaited to its end, even when the other fails: a failed read must not end the runner while the
            # scan still runs.)
            got, scanned = await asyncio.gather(
                asyncio.to_thread(read_run, job, log_file, parser.facts(), self.settings.LOG_TAIL_ON_FAILURE),
                asyncio.to_thread(pg.kill_marked, self.run_id, proc.pid, pg.KILL_WAIT_SECONDS), return_exceptions=True,
            )  # fmt: skip
            if isinstance(scanned, BaseException):
                raise scanned
            if isinstance(got, BaseException):
                raise got
            facts, tail, checkpoints, free = got
            # swift's launcher dies at the first SIGTERM while its trainer may take the whole grace to go: a stop or
            # pause asked meanwhile was accepted (the job was still running) and must decide the end, not be lost.
            # Read last, just before the end is computed and written (a request in between is answered with the
            # end as recorded).
            tick = await self.tick("train", self.run_id)
            if tick is not None and tick.run_id == self.run_id:
                asked.take(tick.stop_requested, tick.pause_requested, tick.preempt_for)
            interrupt, preempt_for, override = run_ended_for(
                asked, code, timed_out=timed_out, limit=limit, told_to_end=self.terminated.is_set(), work=work_of(job)
            )
            if recorded and (interrupt is not None or facts.run_dir):  # (its run folder: known once the log is read)
                ended_for = None if interrupt is None else {"stop": interrupt == "stop", "pause": interrupt == "pause",
                                                            "preempt_for": preempt_for}  # fmt: skip
                if override is not None and timed_out:
                    ended_for = {"time_limit": True}
                if unwritten := pg.write_exit_file(exit_file, code, ended_for, at=ended_at,
                                                   about=exit_about(job, facts.run_dir)):  # fmt: skip
                    logger.warning("job {}: what the run was asked to end for not written: {}", self.job_id, unwritten)
            end = record_end(job.model_copy(update={"preempt_for": preempt_for}), code, facts, tail, checkpoints,
                             interrupt=interrupt, override=override,
                             stop_outcome=outcome if stopping is not None else None, now=ended_at,
                             keep=self.settings.LOG_TAIL_ON_FAILURE, disk_free=free,
                             backoff=self.settings.RETRY_BACKOFF_SECONDS)  # fmt: skip
            if timed_out and override is not None:
                end.fields["stop_outcome"] = outcome or "gone"
            if end.event is not None:
                outbox.event(*end.event)
            first_run = not job.attempts or job.attempts[-1].resumed_from is None
            training = job.kind != "export"  # a quantized export's run teaches no training speed, exports nothing
            took = (job, ran.seconds(), facts.progress, facts.train_runtime)
            # Before the end is written: the end frees the GPUs and wakes the scheduler, whose pass should already
            # predict the jobs waiting behind this one from what it just took.
            history = RunHistory(self.store.r, self.store.keys)
            learnt = end.status != JobStatus.COMPLETED or not (first_run and training) or await history.learn(*took)
            auto_export = end.status == JobStatus.COMPLETED and self.settings.AUTO_EXPORT and training
            if auto_export:  # (owed until asked for: this runner may die between the end and the ask)
                await owe_auto_export(self.store, self.job_id)
            recorded = await outbox.finish(end.status, end.fields, end.message)
            if recorded and not learnt:  # (refused before: Redis, which took the end, takes it now; hunt CI)
                await history.learn(*took)
        if recorded and auto_export:
            # A runner told to end (its host shuts down) leaves the export to the next scheduler to lead.
            await self._auto_export(here=not self.terminated.is_set())
        return 0

    def _say_orphaned(self, tick: RunnerTick | None) -> None:
        """Deleted, ended or taken over by another run: this run must not go on. Said as a warning, with what
        Redis holds: after a flush or a restore this log is the only one that names the run (hunt CW)."""
        status, run = (tick.status or "no such job", tick.run_id) if tick is not None else ("nothing readable", None)
        logger.warning("job {} run {}: Redis records {} (its run: {}), not this run: stopping it; its end is not "
                       "recorded (the job deleted, or Redis lost its data or went back to an older state)",
                       self.job_id, self.run_id, status, run)  # fmt: skip

    async def _own_run(self, early: pg.Child | OSError | None) -> Job | int:
        """The job, when this run is its to run; else the runner's exit status (swift, if the entry started it,
        stopped)."""
        try:
            job = await self.job(patient=isinstance(early, pg.Child))
        except RedisError as exc:
            if not isinstance(early, pg.Child):
                raise
            # Told to end before Redis came back: nobody could record the run, so it must not train on unwatched.
            logger.error("job {} run {}: Redis never answered ({}); stopping swift", self.job_id, self.run_id, exc)
            await pg.terminate_group(early.pid, self.settings.STOP_GRACE_SECONDS)
            return 1
        if job is None or job.status != JobStatus.RUNNING or job.run_id != self.run_id or not job.command:
            logger.info("job {} run {} is not this runner's to run (it is {}): leaving", self.job_id, self.run_id,
                        job.status.value if job else "gone")  # fmt: skip
            if isinstance(early, pg.Child):
                await pg.terminate_group(early.pid, self.settings.STOP_GRACE_SECONDS)
            return 0
        return job

    async def _start_swift(self, job: Job, early: pg.Child | OSError | None, outbox: Outbox, log_file: Path,
                           exit_file: Path) -> pg.Child | None:  # fmt: skip
        """swift, as the entry started it or started now; None when it could not start (the job failed)."""
        assert job.command  # (`_own_run` runs only a job with one)
        try:
            if isinstance(early, OSError):
                raise early
            if early is None:
                exit_file.unlink(missing_ok=True)
                Path(job.output_dir).mkdir(parents=True, exist_ok=True)
                early = pg.Child(
                    pg.spawn(job.command, swift_env(job.env, self.run_id), Path(job.output_dir), log_file, fresh=True)
                )
            return early
        except OSError as exc:
            if is_linked(exc):
                error, kind = linked_log(log_file), "output_dir"
            else:
                # The server's setup, not the job's: the user is told whose it is, the operator's log says so.
                error, kind = f"could not start swift ({job.command[0]}): {exc}; the server's operator must set " \
                    "SWIFT_BIN or run ./install_all.sh", "launch"  # fmt: skip
                logger.error("job {}: {}", self.job_id, error)
            fields = {"error_message": error, "error_code": kind, "finished_at": clock.now()}
            await outbox.finish(JobStatus.FAILED, fields, f"{work_of(job)} failed: {error}")
            return None

    async def _auto_export(self, here: bool) -> None:
        """Record the automatic export of the run that completed: run by this runner (`here`), or requested, for
        a scheduler to launch a runner for it (this one was told to end)."""

        def runner() -> RunnerInfo | None:
            return self.info if here and not self.terminated.is_set() else None

        info = await request_auto_export(self.store, self.settings, self.job_id, runner)
        if info is not None and info.runner == self.info:
            # Even when told to end meanwhile: the export then leaves itself to the next scheduler (`export`).
            await self.export(info.export_id or "", prepared=info)

    async def export(self, export_id: str, prepared: ExportInfo | None = None) -> int:
        return await ExportRun(self, export_id).run(prepared)


async def _main(args: argparse.Namespace, settings: Settings, early: pg.Child | OSError | None) -> int:
    client = create_client(settings, redis_url(settings))
    await clock.sync(client)  # (Redis not answering yet: this host's clock until it does)
    keys = Keys(settings.REDIS_KEY_PREFIX)
    store = JobStore(client, keys, events_max=settings.EVENTS_MAX_PER_JOB, history_max=settings.LOSS_HISTORY_LIMIT)
    runner = Runner(settings, store, ClusterStore(client, keys), args.job_id, args.run_id)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.terminated.set)
    try:
        if args.export:
            return await runner.export(args.export)
        return await runner.train(early)
    finally:
        with contextlib.suppress(RedisError):
            await runner.cluster.drop_runner_heartbeats(args.job_id, runner.beaten)
        await client.aclose()


def run(args: argparse.Namespace, early: tuple[subprocess.Popen[bytes], float] | OSError | None) -> int:
    """The runner after its entry parsed the arguments (and, for a training run, already started swift)."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"swift-api runner: {exc}", file=sys.stderr)
        if isinstance(early, tuple):
            pg.signal_group(early[0].pid, signal.SIGKILL)  # nobody could record it: it must not run unwatched
        return 2
    setup_logging(settings.LOG_LEVEL, None)
    allow_moved_root(settings.OUTPUT_ROOT)
    logger.info("runner {} for job {} ({}) started", os.getpid(), args.job_id,
                f"export {args.export}" if args.export else f"run {args.run_id}")  # fmt: skip
    child = pg.Child(*early) if isinstance(early, tuple) else early
    return asyncio.run(_main(args, settings, child))


class Elapsed:
    """Seconds since a start: `before` at creation, then this process's monotonic clock."""

    __slots__ = ("_before", "_since")

    def __init__(self, before: float) -> None:
        self._before, self._since = max(0.0, before), time.monotonic()

    def seconds(self) -> float:
        return self._before + (time.monotonic() - self._since)
