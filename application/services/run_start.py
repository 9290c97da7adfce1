"""Starting one run of a queued job, for the queue processor: the last checks (runs its record does not know,
links made in its folders since its create), its record (the status change, fenced by the leader lock, with its
GPUs' leases), its spec and its runner's launch; and the hold on starts while OUTPUT_ROOT's disk takes no file.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import shlex
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from application.config import Settings
from application.exceptions import Unavailable
from application.models.training_model import Attempt, Job, JobStatus, Progress
from application.services import clock
from application.services import process_group as pg
from application.services.checkpoints import first_resumable, newest_checkpoint, weights_only
from application.services.cluster_store import ClusterStore
from application.services.disk_space import disk_state, disk_trouble, launch_error, start_refused, whole_disk
from application.services.input_checks import InputGuards
from application.services.job_store import JobStore, TransitionRefused
from application.services.launcher import RunnerInfo, RunnerLauncher
from application.services.lost_replies import landed, never_sent
from application.services.metrics import record_scheduling_latency
from application.services.path_sandbox import Guard, escaped_output_root, relinked_input
from application.services.quant_exports import export_job_escape
from application.services.redis_service import REDIS_AWAY
from application.services.refusals import Refusal
from application.services.run_end import checkpoint_step, honoured_ask, work_of
from application.services.run_logs import log_name, run_log, unknown_runs
from application.services.run_outputs import job_checkpoints
from application.services.swift_command import (
    GPU_VARIABLES,
    SERVER_VARIABLES,
    SwiftVersion,
    build_env,
    build_sft_command,
    visible_env,
)
from application.utils.log_files import in_place, replace_in_place


class PathMoved(OSError):
    """The job's output folder or one of its inputs leads elsewhere since its create: the run does not start."""

    def __init__(self, why: str, code: str) -> None:
        super().__init__(why)
        self.code = code


def write_spec(path: Path, spec: dict[str, object], output_root: Path, inputs: list[tuple[str, str, bool]],
               roots: tuple[tuple[Path, ...], tuple[Path, ...], tuple[Path, ...], Guard],
               export_job: Job | None = None) -> Path:  # fmt: skip
    # The paths were sandboxed when the job was created; a symlink made since must not take this run's files
    # (its log, its checkpoints) outside the root or into another job's folder, nor have it read what lies
    # outside DATA_ROOTS and MODEL_ROOTS (or another owner's files), so check again before the first write.
    # An export job's folders first: its own lies in its parent's exports/, whose link it would blame on itself.
    escaped = export_job_escape(export_job, output_root) if export_job is not None else None
    escaped = escaped or escaped_output_root(Path(str(spec["cwd"])), output_root)
    if escaped:
        raise PathMoved(escaped, "output_dir")
    relinked = relinked_input(inputs, *roots)
    if relinked:
        raise PathMoved(relinked, "input_path")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not in_place(str(path.parent)):
        # (the runs' logs and records would be written wherever it leads: another owner's folder, say)
        raise PathMoved(f"the job's logs folder {path.parent} is a symbolic link: the server writes a job's logs only "
                        "in its own folder; replace it with a folder", "output_dir")  # fmt: skip
    replace_in_place(path, json.dumps(spec).encode())  # (a full disk left an empty temp file in the logs folder)
    return path


# How long no run starts for OUTPUT_ROOT's disk after it was last found so: the processor's rounds wait for it,
# then look again (30 s left a freed disk unused for that long: review CF).
DISK_HOLD_SECONDS = 5.0
LOOK_SECONDS = 1.0
LOOK_EVERY_SECONDS = 1.0


def resume_point(job: Job) -> tuple[str | None, bool]:
    """The checkpoint a job that ran before resumes from (the one asked for, else its newest still on disk), and
    whether it holds only weights (saved with save_only_model: no optimizer or scheduler state)."""
    candidates = [job.resume_from, *reversed(job.checkpoints)] if job.resume_from else list(reversed(job.checkpoints))
    found = first_resumable(candidates)
    if found is None:
        return None, False
    return found, weights_only(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A step's own figures, kept for a run that resumes from the step its job stood at.
_STEP_FIGURES = ("epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "token_acc")

# What a path that no file can ever be made in raises: the job's folder, not the disk, is at fault.
_UNUSABLE_PATH = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP})


@dataclass(frozen=True)
class _Run:
    """One run as `RunStarter.start` records and launches it."""

    run_id: str
    now: float
    gpu_ids: list[int]
    resume: str | None
    step: int | None
    argv: list[str]
    gpu_env: dict[str, str]
    attempt: Attempt
    fields: dict[str, Any]
    log_dir: Path
    log_file: Path


class RunStarter:
    def __init__(
        self,
        store: JobStore,
        cluster: ClusterStore,
        settings: Settings,
        launcher: RunnerLauncher,
        fence: Callable[[], str | None],
        version: Callable[[], Awaitable[SwiftVersion]],
        scheduler_id: str,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.settings = settings
        self._inputs = InputGuards.of(settings, store)  # where a job's inputs may lead at its run
        self._input_roots = self._inputs.roots
        self.launcher = launcher
        self.fence = fence
        self.version = version
        self.scheduler_id = scheduler_id
        self.disk_held = False  # starts are held for OUTPUT_ROOT's disk: it is looked at before each start
        self._disk_said: str | None = None  # how the disk stood when last logged
        self._look: asyncio.Future[str | None] | None = None
        self._looked_at = -math.inf  # (monotonic) when the last look began

    async def start(self, job: Job, gpu_ids: list[int]) -> bool:
        """Move a queued job to running on `gpu_ids` (leases taken in the same step) and launch its runner. A job
        that ran before resumes from its checkpoint (`resume_from`, else the newest of its checkpoints still on
        disk) or, with none, starts again from the beginning; its loss history keeps the steps before it."""
        if not await self._startable(job):
            return False
        version = await self.version()
        log_dir = Path(job.output_dir) / "logs"
        found = await self._resume_and_log(job, log_dir)
        if found is None:
            return False
        inputs = await self._inputs_unmoved(job)
        if inputs is None:
            return False
        run = self._run(job, gpu_ids, version, log_dir, *found)
        await self._record(job, run)
        await self._after_record(job, run)
        runner = await self._launch(job, run, inputs)
        await self._note_latency(job, run)  # (once launched: /metrics' figure is no hand-over's round trip)
        if runner is None:
            return False
        try:
            await self.store.update(job.job_id, {"runner": runner}, run_id=run.run_id, statuses=(JobStatus.RUNNING,))
        except TransitionRefused as exc:
            # Given up meanwhile (this scheduler stalled before the launch): its runner starts nothing.
            if exc.reason == Refusal.OTHER_RUN:
                logger.warning("job {} run {} was given up before its runner started", job.job_id, run.run_id)
                return False
            # (else it ended already: a run that fails at once)
        return True

    async def _startable(self, job: Job) -> bool:
        """False for a stop or pause asked as its last run ended (honoured here), or while OUTPUT_ROOT's disk
        stays full."""
        if await self.honour_asks(job):
            return False
        if self.disk_held:
            # Looked at before a run is started and given back again: two events a try on the job at the head, for
            # as long as the disk stays full (review BZ).
            if why := await asyncio.to_thread(start_refused, self.settings.OUTPUT_ROOT):
                await self.hold_for_disk(why)
                return False
            self.disk_held = False
        return True

    async def honour_asks(self, job: Job) -> bool:
        """Whether the queued job was asked to stop or pause as its last run ended, and is now stopped (cancelled
        without a checkpoint) or paused. Raises TransitionRefused when it changed meanwhile."""
        checkpoint = job.stop_requested and await asyncio.to_thread(newest_checkpoint, job) is not None
        asked = honoured_ask(job, checkpoint)
        if asked is None:
            return False
        await self.store.transition(job.job_id, asked.status, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                    created_at=job.created_at, fields=asked.fields, message=asked.message,
                                    unchanged=asked.unchanged)  # fmt: skip
        return True

    async def _resume_and_log(self, job: Job, log_dir: Path) -> tuple[str | None, bool, Path] | None:
        """The checkpoint the run resumes from, whether it holds only weights, and the run's log file; None when
        the job is not started (left queued, or failed here)."""
        number = len(job.attempts) + 1
        try:
            resume, weights_only = await asyncio.to_thread(resume_point, job) if job.attempts else (None, False)
            log_file = await asyncio.to_thread(run_log, log_dir, job.job_id, number)
            # (only where a run's log name was taken: a deleted job's, or one of a run the record does not know)
            skipped = log_file.name != log_name(job.job_id, number)
            forgotten = await asyncio.to_thread(unknown_runs, job, log_dir) if skipped else []
        except OSError as exc:
            # This job's folder, not the pass: raised on, it stopped every start behind it, pass after pass. A
            # path no file can ever be made in fails the job; anything else (a disk or mount that may come back)
            # leaves it queued for the next pass.
            if exc.errno not in _UNUSABLE_PATH:
                logger.warning("job {} not started: its output folder cannot be read now ({})", job.job_id, exc)
                return None
            error = f"its output folder cannot be used: {exc}"
            await self.store.transition(job.job_id, JobStatus.FAILED, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                        created_at=job.created_at,
                                        fields={"error_message": error, "error_code": "output_dir"},
                                        message=f"{work_of(job)} failed: {error}")  # fmt: skip
            return None
        if forgotten:
            await self._forgotten(job, forgotten)
            return None
        return resume, weights_only, log_file

    async def _inputs_unmoved(self, job: Job) -> list[tuple[str, str, bool]] | None:
        """The run's inputs, or None when one leads elsewhere since the create (the job failed) or Redis could
        not tell (left queued)."""
        # A link made in a model or data folder since its create (to another owner's checkpoint, out of the roots),
        # or media a data file names since, had the run read what they lead to (a hunt). Before its GPUs are
        # taken: a Redis too slow to tell whose folder a path leads into leaves the job queued.
        inputs, guard = await self._inputs.of_run(job)
        try:
            moved = await self._inputs.folders_moved(job, inputs, guard)
        except Unavailable as exc:
            logger.warning("job {} not started: its folders' links could not be checked ({})", job.job_id, exc.detail)
            return None
        if moved:
            await self.store.transition(job.job_id, JobStatus.FAILED, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                        created_at=job.created_at,
                                        fields={"error_message": moved, "error_code": "input_path"},
                                        message=f"{work_of(job)} failed: {moved}")  # fmt: skip
            return None
        return inputs

    def _run(self, job: Job, gpu_ids: list[int], version: SwiftVersion, log_dir: Path, resume: str | None,
             weights_only: bool, log_file: Path) -> _Run:  # fmt: skip
        step = checkpoint_step(resume)
        argv = build_sft_command(self.settings.SWIFT_BIN, job, version, resume_from=resume, weights_only=weights_only)
        gpu_env = build_env({}, gpu_ids, master_port=free_port() if len(gpu_ids) > 1 else None)
        run_id = uuid.uuid4().hex
        now = clock.now()
        attempt = Attempt(number=len(job.attempts) + 1, run_id=run_id, started_at=now, resumed_from=resume,
                          first_step=step, gpu_ids=gpu_ids, log_file=str(log_file))  # fmt: skip
        total = job.progress.max_steps
        # The figures of the step it goes on from, where the last run stopped right there (paused after its last
        # checkpoint): a run that trains no step more showed none at its end (hunt CY).
        kept = job.progress.model_dump(include=set(_STEP_FIGURES)) if step == job.progress.current_step else {}
        progress = Progress(current_step=step, max_steps=total,
                            percentage=round(100.0 * step / total, 2) if step is not None and total else None,
                            **kept) if resume else Progress()  # fmt: skip
        fields: dict[str, Any] = {
                "gpu_ids": gpu_ids, "command": argv, "command_line": shlex.join(argv), "env": visible_env(gpu_env),
                "swift_version": version.version, "log_file": str(log_file),
                "log_offset": 0, "stop_requested": False, "stop_outcome": None, "pid": None, "process_stamp": None,
                "process_start_time": None, "exit_code": None, "error_message": None, "error_code": None,
                "progress": progress, "run_id": run_id, "runner": None, "scheduled_by": self.scheduler_id,
                "attempts": [*job.attempts, attempt], "resume_from": resume, "pause_requested": False,
                "preempt_for": None, "finished_at": None, "log_tail": None, "last_checkpoint_at": None,
                # This run's folder is not known until swift names it: the last run's would be taken for its own
                # (its attempt recorded with it; its logging.jsonl read as this run's end).
                "run_dir": None,
        }  # fmt: skip
        return _Run(run_id, now, gpu_ids, resume, step, argv, gpu_env, attempt, fields, log_dir, log_file)

    async def _record(self, job: Job, run: _Run) -> None:
        """The job running this run, its GPUs leased in the same step."""
        where = f"GPUs {run.gpu_ids}" if run.gpu_ids else "CPU"
        started = self.store.transition(
            job.job_id, JobStatus.RUNNING, expect=(JobStatus.QUEUED,), acquire_gpus=run.gpu_ids, fence=self.fence(),
            # Only the job read: one deleted meanwhile and created again under its id (by another owner, perhaps)
            # would run this one's command, on this one's data, into this one's folder.
            created_at=job.created_at,
            fields=run.fields, message=f"started on {where}" + (f", resuming from {run.resume}" if run.resume else
                                                 " from the beginning" if job.attempts else ""),
            data={"gpu_ids": run.gpu_ids, "attempt": run.attempt.number, "resumed_from": run.resume}, now=run.now,
        )  # fmt: skip
        # Its reply lost, the run may be recorded all the same (lost_replies): then it is launched, not left holding
        # its GPUs, runner-less, until the watchdog gave it up as never launched.
        try:
            await started
        except TransitionRefused as exc:
            # (refused as running already: by its own first run, when a dropped connection's retry sent it again;
            # any other refusal, a stop that came first say, costs no look)
            if exc.current != JobStatus.RUNNING.value or not await self._recorded(job.job_id, run.run_id):
                raise
        except REDIS_AWAY as exc:
            if never_sent(exc) or not await landed(lambda: self._recorded(job.job_id, run.run_id)):
                raise

    async def _after_record(self, job: Job, run: _Run) -> None:
        if job.attempts:
            # The steps past the checkpoint it resumes from are logged again: dropped once the run is recorded, not
            # before (a stop or a dequeue that came first cut the history of a job that never ran again). No run
            # writes yet: its runner is launched below.
            try:
                await self.store.trim_history(job.job_id, run.step)
            except REDIS_AWAY as exc:
                logger.warning("job {}: its loss points past step {} not dropped ({}): the run logs them again",
                               job.job_id, run.step, exc)  # fmt: skip

    async def _note_latency(self, job: Job, run: _Run) -> None:
        try:
            await record_scheduling_latency(self.cluster, max(0.0, run.now - (job.queued_at or job.created_at)))
        except REDIS_AWAY as exc:  # a figure for /metrics: the run is recorded and is launched all the same (hunt BH)
            logger.warning("job {}: its scheduling latency not recorded ({})", job.job_id, exc)

    async def _launch(self, job: Job, run: _Run, inputs: list[tuple[str, str, bool]]) -> RunnerInfo | None:
        """The runner launched (what the launcher says of it), or None when the run was given up, or its launch
        failed (the job failed, or back in the queue while the disk is full)."""
        try:
            # One spec per run: a scheduler that stalled here and lost its lead must not launch from, or
            # overwrite, the spec of the run its successor started instead (the runner checks the run id too).
            spec = await asyncio.to_thread(write_spec, pg.launch_spec(run.log_dir, job.job_id, run.run_id), {
                "run_id": run.run_id, "argv": run.argv, "env": {**run.gpu_env, pg.RUN_MARK: run.run_id},
                "unset": [*GPU_VARIABLES, *SERVER_VARIABLES], "cwd": job.output_dir, "log_file": str(run.log_file),
                "exit_file": str(run.log_file.with_suffix(".exit.json")),
            }, self.settings.OUTPUT_ROOT, inputs, self._input_roots,
                job if job.kind == "export" else None)  # fmt: skip
            try:  # still this scheduler's run to start: no trainer of a run given up on reaches a GPU
                await self._still_ours(job.job_id, run.run_id)
            except TransitionRefused as exc:
                spec.unlink(missing_ok=True)
                logger.warning("job {} run {} not launched: {}", job.job_id, run.run_id, exc)
                return None
            return await self.launcher.launch(job.job_id, run.run_id, run.log_dir, spec=spec)
        except OSError as exc:
            if not isinstance(exc, PathMoved) and await asyncio.to_thread(whole_disk, exc, self.settings.OUTPUT_ROOT):
                await self._wait_for_disk(job, run.run_id, run.fields, exc)
                return None
            error = (
                str(exc)
                if isinstance(exc, PathMoved)
                else launch_error(exc, run.log_dir, "resume the job" if job.checkpoints else "create the job again")
            )
            code = exc.code if isinstance(exc, PathMoved) else "launch"
            # The attempt ends here too: left open, the job's page showed it running beside a failed job.
            ended = run.attempt.model_copy(update={"finished_at": clock.now(), "outcome": "failed", "error_code": code,
                                                   "error_message": error})  # fmt: skip
            await self.store.transition(job.job_id, JobStatus.FAILED, expect=(JobStatus.RUNNING,), run_id=run.run_id,
                                        fields={"error_message": error, "error_code": code,
                                                "attempts": [*job.attempts, ended]},
                                        message=f"{work_of(job)} failed: {error}")  # fmt: skip
            return None

    async def _still_ours(self, job_id: str, run_id: str) -> None:
        """TransitionRefused unless the job still runs this run and this scheduler still leads. It writes nothing
        but its check, so a lost reply is asked again: one dropped connection left a recorded run unlaunched,
        holding its GPUs until the watchdog gave it up (hunt BH)."""
        for attempt in range(3):
            try:
                await self.store.update(job_id, {}, statuses=(JobStatus.RUNNING,), run_id=run_id, fence=self.fence())
                return
            except REDIS_AWAY:
                if attempt == 2:
                    raise

    async def _wait_for_disk(self, job: Job, run_id: str, started: dict[str, Any], exc: OSError) -> None:
        """Back to its place in the queue, as it was before this launch, and no run starts while OUTPUT_ROOT's
        disk is full or read-only: the operator's to mend, and each job that came to the head meanwhile failed at
        its launch in turn (hunt BW)."""
        why = await asyncio.to_thread(disk_state, exc, self.settings.OUTPUT_ROOT)
        await self.hold_for_disk(why)
        # But a stop or pause asked for since the run was recorded: the next pass honours it (it was undone).
        before = {name: getattr(job, name) for name in started if name not in ("stop_requested", "pause_requested")}
        await self.store.transition(job.job_id, JobStatus.QUEUED, expect=(JobStatus.RUNNING,), run_id=run_id,
                                    fields={**before, "queued_at": job.queued_at, "started_at": job.started_at},
                                    message=f"not started, back in its place in the queue: OUTPUT_ROOT's disk is "
                                            f"{why}")  # fmt: skip

    async def look_at_disk(self) -> None:
        """Each round of the queue processor, jobs waiting or not, the processor on or off: OUTPUT_ROOT's disk full
        or read-only holds the starts before a run fails on it, and /health says so (it said healthy over a full
        disk while no job waited: hunt BW). One look at a time, waited for a second at most: a disk that does not
        answer (a hung NFS mount) must not stop the rounds, nor take a thread a round (review CF). At most one a
        second, not a thread's hop in each pass of a chain of hand-overs under load (a launch the disk refuses in
        between puts its job back in its place: `_wait_for_disk`)."""
        now = time.monotonic()
        if (self._look is not None and not self._look.done()) or now - self._looked_at < LOOK_EVERY_SECONDS:
            return  # (the last look's answer stands: a hold it set lasts DISK_HOLD_SECONDS)
        self._looked_at = now
        self._look = asyncio.ensure_future(asyncio.to_thread(disk_trouble, self.settings.OUTPUT_ROOT))
        try:
            why = await asyncio.wait_for(asyncio.shield(self._look), LOOK_SECONDS)
        except TimeoutError:
            return
        if why is None:
            self._disk_said = None
        else:
            await self.hold_for_disk(why)

    async def _forgotten(self, job: Job, forgotten: list[Attempt]) -> None:
        """Redis came back from an older state in which the job waited, and its folder holds runs of it since: not
        run again, failed with those runs as its attempts and their checkpoints as its own (a resume, or an
        export, goes on from them: they were listed, yet a resume found none, hunt CR)."""
        runs = [*job.attempts, *forgotten]
        run_dirs = [a.run_dir for a in runs] + [job.run_dir]
        # (no run folder known: every checkpoint in its folder would be listed, a deleted job's among them)
        found = await asyncio.to_thread(job_checkpoints, job.output_dir, run_dirs) if any(run_dirs) else []
        checkpoints = [*job.checkpoints, *(c for c in found if c not in job.checkpoints)]
        last = forgotten[-1]
        how = f"ended with {last.outcome}" if last.outcome else "its end not recorded"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.started_at))
        then = ("resume it from its newest checkpoint (POST .../resume), or export one (GET .../checkpoints)"
                if checkpoints else "create a new job to train again")  # fmt: skip
        error = (
            f"its folder holds {len(forgotten)} run(s) of it that its record did not know (the last: logs/"
            f"{Path(last.log_file or '').name}, {how} at {when}): Redis came back from an older state. Not "
            f"run again: those runs' files are in its folder (their logs: GET .../logs?attempt=N); {then}"
        )
        logger.warning("job {} not started: {}", job.job_id, error)
        await self.store.transition(job.job_id, JobStatus.FAILED, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                    created_at=job.created_at,
                                    fields={"error_message": error, "error_code": "unknown_run", "attempts": runs,
                                            "checkpoints": checkpoints,
                                            "last_checkpoint": checkpoints[-1] if checkpoints else job.last_checkpoint},
                                    message=f"{work_of(job)} failed: {error}")  # fmt: skip

    async def hold_for_disk(self, why: str) -> None:
        self.disk_held = True
        await self.cluster.hold_starts(f"no run starts: OUTPUT_ROOT's disk is {why}: free space on it (or make it "
                                       "writable), and the waiting jobs start by themselves (looked at before "
                                       "each start)", DISK_HOLD_SECONDS)  # fmt: skip
        kind = why.split(" (")[0]  # (once, not at each pass or try, while it stays full)
        if kind != self._disk_said:
            self._disk_said = kind
            logger.warning("no run starts: OUTPUT_ROOT's disk is {}", why)

    async def _recorded(self, job_id: str, run_id: str) -> bool:
        return bool(await self.store.get_field(job_id, "run_id") == run_id)
