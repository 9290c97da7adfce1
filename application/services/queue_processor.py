"""The queue processor: in the leading scheduler, it starts queued jobs the moment their GPUs are free.

It wakes at once on anything that may let a job start (a job queued, ended or re-prioritised, a lease
released: the store publishes those on one channel) and every QUEUE_POLL_INTERVAL seconds to notice GPUs
freed by processes outside the system. The decision is `scheduler.decide`, a pure function; this module
reads its inputs, starts what it returns (the status change, fenced by the leader lock, then the runner)
and publishes the GPU reading for the API workers.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shlex
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from application.config import Settings
from application.exceptions import Unavailable
from application.models.training_model import Attempt, Job, JobStatus, Progress
from application.services import clock, preemption
from application.services import process_group as pg
from application.services.checkpoints import first_resumable, newest_checkpoint, weights_only
from application.services.cluster_store import ClusterStore
from application.services.disk_space import disk_state, launch_error, whole_disk, write_refused
from application.services.gpu_pool import queued_job
from application.services.input_checks import InputGuards
from application.services.job_store import JobStore, TransitionRefused
from application.services.launcher import RunnerLauncher
from application.services.lost_replies import landed, never_sent
from application.services.metrics import record_scheduling_latency
from application.services.path_sandbox import Guard, escaped_output_root, relinked_input
from application.services.quant_exports import export_job_escape
from application.services.queue_planner import WINDOW as PREDICTION_WINDOW
from application.services.queue_planner import ClusterView, Planner, build_view
from application.services.redis_service import REDIS_AWAY
from application.services.refusals import Refusal
from application.services.run_end import checkpoint_step, work_of
from application.services.run_history import RunHistory
from application.services.run_logs import log_name, run_log, unknown_runs
from application.services.scheduler import Start, next_head
from application.services.swift_command import (
    GPU_VARIABLES,
    SERVER_VARIABLES,
    SwiftVersion,
    build_env,
    build_sft_command,
    visible_env,
)
from application.utils.gpu_utils import GpuInventory
from application.utils.log_files import replace_in_place


class PathMoved(OSError):
    """The job's output folder or one of its inputs leads elsewhere since its create: the run does not start."""

    def __init__(self, why: str, code: str) -> None:
        super().__init__(why)
        self.code = code


def _write_spec(path: Path, spec: dict[str, object], output_root: Path, inputs: list[tuple[str, str, bool]],
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
    if os.path.realpath(path.parent) != str(path.parent):
        # (the runs' logs and records would be written wherever it leads: another owner's folder, say)
        raise PathMoved(f"the job's logs folder {path.parent} is a symbolic link: the server writes a job's logs only "
                        "in its own folder; replace it with a folder", "output_dir")  # fmt: skip
    replace_in_place(path, json.dumps(spec).encode())  # (a full disk left an empty temp file in the logs folder)
    return path


# How long no run starts once one could not be launched for OUTPUT_ROOT's disk, and then while it stays so.
DISK_HOLD_SECONDS = 30.0


def _resume_point(job: Job) -> tuple[str | None, bool]:
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


@dataclass
class PassStats:
    """This leader's passes; written to the store after each one for /queue/processor/status."""

    passes: int = 0
    jobs_started: int = 0
    last_pass_at: float | None = None
    last_pass_ms: float | None = None
    last_started: list[str] = field(default_factory=list)
    last_error: str | None = None
    last_error_at: float | None = None


# What a path that no file can ever be made in raises: the job's folder, not the disk, is at fault.
_UNUSABLE_PATH = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP})


class QueueProcessor:
    def __init__(
        self,
        store: JobStore,
        cluster: ClusterStore,
        inventory: GpuInventory,
        settings: Settings,
        launcher: RunnerLauncher,
        fence: Callable[[], str | None],
        version: Callable[[], Awaitable[SwiftVersion]],
        scheduler_id: str,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.inventory = inventory
        self.settings = settings
        self._inputs = InputGuards.of(settings, store)  # where a job's inputs may lead at its run
        self._input_roots = self._inputs.roots
        self.launcher = launcher
        self.fence = fence
        self.version = version
        self.scheduler_id = scheduler_id
        self.planner = Planner(store, settings, inventory.link_score)
        self.history = RunHistory(store.r, store.keys)
        self._history_seen = -1
        self.stats = PassStats()
        self._lock = asyncio.Lock()
        self._disk_held = False  # starts are held for OUTPUT_ROOT's disk: it is looked at before each start

    async def view(self) -> ClusterView:
        snapshot = await asyncio.to_thread(self.inventory.snapshot)
        await self.cluster.put_gpu_snapshot(snapshot.to_dict())
        return await build_view(self.store, snapshot, reclaim=True)

    async def run_pass(self, only: set[str] | None = None, wanted: set[str] | None = None) -> list[str]:
        """Start every queued job that fits now (or, given `only`, those of them); `only` and `wanted` (jobs a
        user asked to start) are planned even when they lie past the planned window."""
        async with self._lock:
            started_at = time.perf_counter()
            await self.refresh_predictions()
            view = await self.view()
            starts: list[Start] = []
            head_id: str | None = None
            if await self.store.queue_length():
                head = await self.cluster.queue_head()
                asked = (only or set()) | (wanted or set())
                found = await self.planner.plan(view, head=head, wanted=asked)
                # A head found again keeps the clock it started before (`next_head`), and is planned with it: as
                # a young head, one pass let jobs of its priority take the GPUs it had waited for.
                back = found.head is not None and (head is None or head[0] != found.head)
                since = await self.cluster.head_since(found.head) if back and found.head else None
                kept = next_head(head, found.head, clock.now(), since)
                if since is not None and kept is not None:
                    found = await self.planner.plan(view, head=kept, wanted=asked)
                starts = found.starts
                head_id = found.head
                if kept != head and kept is not None:
                    await self.cluster.set_queue_head(kept)
            started: list[str] = []
            for start in starts:
                if only is not None and start.job_id not in only:
                    continue
                try:
                    job = await self.store.get(start.job_id)
                except ValueError as exc:  # (pydantic's ValidationError): a record this version cannot read
                    await self._unreadable(start.job_id, exc)
                    continue
                if job is None and await self.store.forget_lost(start.job_id):
                    logger.warning("queued job {}'s record is gone (evicted by Redis, or deleted by hand): dropped "
                                   "from the queue", start.job_id)  # fmt: skip
                if job is None or job.status != JobStatus.QUEUED:
                    continue
                try:
                    if await self.start_run(job, list(start.gpu_ids)):
                        started.append(start.job_id)
                except TransitionRefused as exc:
                    # The job or one of its GPUs changed under us, or we no longer lead: the next pass decides.
                    logger.debug("start of {} refused: {}", start.job_id, exc.reason.value)
                if self._disk_held:
                    break  # (none starts while OUTPUT_ROOT's disk takes no file: the next try is the hold's)
            # (nor is a run stopped for a head that cannot start: its checkpoint would go to that full disk)
            if self.settings.PREEMPTION and head_id is not None and not started and only is None and \
                    not self._disk_held:  # fmt: skip
                await self.preempt(head_id, view)
            s = self.stats
            s.passes += 1
            s.jobs_started += len(started)
            s.last_pass_at = clock.now()
            s.last_pass_ms = (time.perf_counter() - started_at) * 1000
            if started:
                s.last_started = started
                logger.info("queue pass started {}", ", ".join(started))
            await self.cluster.record_pass(s.__dict__)
            return started

    async def _unreadable(self, job_id: str, exc: ValueError) -> None:
        """A queued job whose stored record cannot be read (written by hand, or by a version that let a bad value
        through) fails alone: raised out of the pass, it stopped every start behind it, pass after pass."""
        error = f"its stored record cannot be read ({str(exc).splitlines()[0][:300]}): delete it and create it again"
        logger.error("queued job {}: {}", job_id, error)
        try:
            await self.store.transition(job_id, JobStatus.FAILED, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                        fields={"error_message": error, "error_code": "unreadable"},
                                        message=f"training failed: {error}")  # fmt: skip
        except TransitionRefused:
            pass
        except Exception:  # (the record may defeat the transition too: the pass must still go on)
            logger.exception("queued job {} could not be failed", job_id)

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
        await self._hold_for_disk(why)
        before = {name: getattr(job, name) for name in started}
        await self.store.transition(job.job_id, JobStatus.QUEUED, expect=(JobStatus.RUNNING,), run_id=run_id,
                                    fields={**before, "queued_at": job.queued_at, "started_at": job.started_at},
                                    message=f"not started, back in its place in the queue: OUTPUT_ROOT's disk is "
                                            f"{why}")  # fmt: skip

    async def _hold_for_disk(self, why: str) -> None:
        self._disk_held = True
        await self.cluster.hold_starts(f"no run starts: OUTPUT_ROOT's disk is {why}: free space on it (or make it "
                                       "writable), and the waiting jobs start by themselves (looked at every "
                                       f"{DISK_HOLD_SECONDS:g} s)", DISK_HOLD_SECONDS)  # fmt: skip
        logger.warning("no run starts for {:g} s: OUTPUT_ROOT's disk is {}", DISK_HOLD_SECONDS, why)

    async def _recorded(self, job_id: str, run_id: str) -> bool:
        return bool(await self.store.get_field(job_id, "run_id") == run_id)

    async def preempt(self, head_id: str, view: ClusterView) -> list[str]:
        """PREEMPTION=on: ask the runs of lower priority that hold what the head of the queue needs to make way
        (see `preemption`). One preemption at a time: none while an earlier one is still under way."""
        # Whether a run is ending (asked to stop or pause, or past its time limit) and when it started come with
        # the view; what only preemption needs is read here.
        rows = await self.store.get_fields([r.job_id for r in view.running], list(preemption.FIELDS))
        now = clock.now()
        candidates, under_way = preemption.candidates(view.running, rows, now)
        if under_way:
            return []
        job = await self.store.get(head_id)
        if job is None or job.status != JobStatus.QUEUED or job.stop_requested or job.pause_requested:
            return []  # (one asked to stop or pause is taken out of the queue by its start, not run)
        s = self.settings
        waiting = queued_job(job.job_id, job.priority, job.created_at, job.num_gpus, job.gpu_ids_requested,
                             job.min_gpu_memory_gb)  # fmt: skip
        ends = {r.job_id: r.remaining_seconds for r in view.running if r.remaining_seconds is not None}
        victims = preemption.choose_victims(waiting, view.gpus, candidates, min_free_gb=s.GPU_MIN_FREE_MEMORY_GB,
                                            max_util=s.GPU_MAX_UTILIZATION, min_run=s.PREEMPTION_MIN_RUN_SECONDS,
                                            now=now, ends=ends)  # fmt: skip
        asked = []
        for victim in victims or []:
            try:
                await self.store.update(victim, {"preempt_for": head_id}, statuses=(JobStatus.RUNNING,), event=(
                    "preemption_requested", f"preempted for {head_id} (priority {job.priority}): the run stops, "
                    "goes back to the queue and resumes from its last checkpoint", {"by": head_id}))  # fmt: skip
            except TransitionRefused:
                continue  # it ended meanwhile: its GPUs come back anyway (and it was not preempted)
            asked.append(victim)
        if asked:
            await self.store.add_event(head_id, "preempting", f"preempting {', '.join(asked)} (lower priority) "
                                       "for their GPUs", {"victims": asked})  # fmt: skip
            logger.info("preempting {} for {}", ", ".join(asked), head_id)
        return victims or []

    async def refresh_predictions(self) -> int:
        """Jobs queued before anything was known of their kind get a prediction once a run teaches one (the
        history grew since the last look). Only the head of the queue: a pass never plans past it."""
        version = await self.history.version()
        if version == self._history_seen:
            return 0
        self._history_seen = version
        # Read and written in one round trip each, and predicted once per kind of job (the history's version is
        # the cache's key): one by one, it was three round trips for each of up to 256 jobs after a run's end.
        window = await self.store.queue_window(0, PREDICTION_WINDOW)
        predictions = {}
        for job in await self.store.get_many(job_id for job_id, meta in window if meta.estimated_duration is None):
            prediction = await self.history.predict(job, version)
            if prediction.seconds is not None:
                predictions[job.job_id] = prediction
        found = await self.store.set_predictions(predictions)
        if found:
            logger.info("{} queued job(s) got a predicted duration from the runs just recorded", found)
        return found

    async def start_run(self, job: Job, gpu_ids: list[int]) -> bool:
        """Move a queued job to running on `gpu_ids` (leases taken in the same step) and launch its runner. A job
        that ran before resumes from its checkpoint (`resume_from`, else the newest of its checkpoints still on
        disk) or, with none, starts again from the beginning; its loss history keeps the steps before it."""
        if job.stop_requested:
            # A stop (or pause) accepted as the last run ended and went back to the queue (a retry, a preemption:
            # its runner had read its flags just before it came): honoured here, not undone by a new run.
            to = JobStatus.STOPPED if await asyncio.to_thread(newest_checkpoint, job) else JobStatus.CANCELLED
            await self.store.transition(job.job_id, to, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                        message="stopped on request as its last run ended: not run again")  # fmt: skip
            return False
        if job.pause_requested:
            message = f"paused on request as its last run ended: resumes from {job.resume_from or 'the beginning'}"
            await self.store.transition(job.job_id, JobStatus.PAUSED, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                        fields={"pause_requested": False}, message=message)  # fmt: skip
            return False
        if self._disk_held:
            # Looked at before a run is started and given back again: two events a try on the job at the head, for
            # as long as the disk stays full (review BZ).
            if refused := await asyncio.to_thread(write_refused, self.settings.OUTPUT_ROOT):
                await self._hold_for_disk(await asyncio.to_thread(disk_state, refused, self.settings.OUTPUT_ROOT))
                return False
            self._disk_held = False
        version = await self.version()
        log_dir = Path(job.output_dir) / "logs"
        number = len(job.attempts) + 1
        try:
            resume, weights_only = await asyncio.to_thread(_resume_point, job) if job.attempts else (None, False)
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
                return False
            error = f"its output folder cannot be used: {exc}"
            await self.store.transition(job.job_id, JobStatus.FAILED, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                        fields={"error_message": error, "error_code": "output_dir"},
                                        message=f"{work_of(job)} failed: {error}")  # fmt: skip
            return False
        if forgotten:
            last = forgotten[-1]
            how = f"ended with {last.outcome}" if last.outcome else "its end not recorded"
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.started_at))
            error = (f"its folder holds {len(forgotten)} run(s) of it that its record did not know (the last: logs/"
                     f"{Path(last.log_file or '').name}, {how} at {when}): Redis came back from an older state. Not "
                     "run again: those runs' files are in its folder (their logs: GET .../logs?attempt=N); create a "
                     "new job to train again")  # fmt: skip
            await self.store.transition(job.job_id, JobStatus.FAILED, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                        fields={"error_message": error, "error_code": "unknown_run",
                                                "attempts": [*job.attempts, *forgotten]},
                                        message=f"{work_of(job)} failed: {error}")  # fmt: skip
            return False
        # A link made in a model or data folder since its create (to another owner's checkpoint, out of the roots),
        # or media a data file names since, had the run read what they lead to (a hunt). Before its GPUs are
        # taken: a Redis too slow to tell whose folder a path leads into leaves the job queued.
        inputs, guard = await self._inputs.of_run(job)
        try:
            moved = await self._inputs.folders_moved(job, inputs, guard)
        except Unavailable as exc:
            logger.warning("job {} not started: its folders' links could not be checked ({})", job.job_id, exc.detail)
            return False
        if moved:
            await self.store.transition(job.job_id, JobStatus.FAILED, expect=(JobStatus.QUEUED,), fence=self.fence(),
                                        fields={"error_message": moved, "error_code": "input_path"},
                                        message=f"{work_of(job)} failed: {moved}")  # fmt: skip
            return False
        step = checkpoint_step(resume)
        argv = build_sft_command(self.settings.SWIFT_BIN, job, version, resume_from=resume, weights_only=weights_only)
        gpu_env = build_env({}, gpu_ids, master_port=free_port() if len(gpu_ids) > 1 else None)
        env = visible_env(gpu_env)
        where = f"GPUs {gpu_ids}" if gpu_ids else "CPU"
        run_id = uuid.uuid4().hex
        now = clock.now()
        attempt = Attempt(number=number, run_id=run_id, started_at=now, resumed_from=resume, first_step=step,
                          gpu_ids=gpu_ids, log_file=str(log_file))  # fmt: skip
        total = job.progress.max_steps
        progress = Progress(current_step=step, max_steps=total,
                            percentage=round(100.0 * step / total, 2) if step is not None and total else None,
                            ) if resume else Progress()  # fmt: skip
        fields: dict[str, Any] = {
                "gpu_ids": gpu_ids, "command": argv, "command_line": shlex.join(argv), "env": env,
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
        started = self.store.transition(
            job.job_id, JobStatus.RUNNING, expect=(JobStatus.QUEUED,), acquire_gpus=gpu_ids, fence=self.fence(),
            fields=fields, message=f"started on {where}" + (f", resuming from {resume}" if resume else
                                             " from the beginning" if job.attempts else ""),
            data={"gpu_ids": gpu_ids, "attempt": attempt.number, "resumed_from": resume}, now=now,
        )  # fmt: skip
        # Its reply lost, the run may be recorded all the same (lost_replies): then it is launched, not left holding
        # its GPUs, runner-less, until the watchdog gave it up as never launched.
        try:
            await started
        except TransitionRefused as exc:
            # (refused as running already: by its own first run, when a dropped connection's retry sent it again;
            # any other refusal, a stop that came first say, costs no look)
            if exc.current != JobStatus.RUNNING.value or not await self._recorded(job.job_id, run_id):
                raise
        except REDIS_AWAY as exc:
            if never_sent(exc) or not await landed(lambda: self._recorded(job.job_id, run_id)):
                raise
        if job.attempts:
            # The steps past the checkpoint it resumes from are logged again: dropped once the run is recorded, not
            # before (a stop or a dequeue that came first cut the history of a job that never ran again). No run
            # writes yet: its runner is launched below.
            try:
                await self.store.trim_history(job.job_id, step)
            except REDIS_AWAY as exc:
                logger.warning("job {}: its loss points past step {} not dropped ({}): the run logs them again",
                               job.job_id, step, exc)  # fmt: skip
        try:
            await record_scheduling_latency(self.cluster, max(0.0, now - (job.queued_at or job.created_at)))
        except REDIS_AWAY as exc:  # a figure for /metrics: the run is recorded and is launched all the same (hunt BH)
            logger.warning("job {}: its scheduling latency not recorded ({})", job.job_id, exc)
        try:
            # One spec per run: a scheduler that stalled here and lost its lead must not launch from, or
            # overwrite, the spec of the run its successor started instead (the runner checks the run id too).
            spec = await asyncio.to_thread(_write_spec, pg.launch_spec(log_dir, job.job_id, run_id), {
                "run_id": run_id, "argv": argv, "env": {**gpu_env, pg.RUN_MARK: run_id},
                "unset": [*GPU_VARIABLES, *SERVER_VARIABLES],
                "cwd": job.output_dir, "log_file": str(log_file), "exit_file": str(log_file.with_suffix(".exit.json")),
            }, self.settings.OUTPUT_ROOT, inputs, self._input_roots,
                job if job.kind == "export" else None)  # fmt: skip
            try:  # still this scheduler's run to start: no trainer of a run given up on reaches a GPU
                await self._still_ours(job.job_id, run_id)
            except TransitionRefused as exc:
                spec.unlink(missing_ok=True)
                logger.warning("job {} run {} not launched: {}", job.job_id, run_id, exc)
                return False
            runner = await self.launcher.launch(job.job_id, run_id, log_dir, spec=spec)
        except OSError as exc:
            if not isinstance(exc, PathMoved) and await asyncio.to_thread(whole_disk, exc, self.settings.OUTPUT_ROOT):
                await self._wait_for_disk(job, run_id, fields, exc)
                return False
            error = (
                str(exc)
                if isinstance(exc, PathMoved)
                else launch_error(exc, log_dir, "resume the job" if job.checkpoints else "create the job again")
            )
            code = exc.code if isinstance(exc, PathMoved) else "launch"
            # The attempt ends here too: left open, the job's page showed it running beside a failed job.
            ended = attempt.model_copy(update={"finished_at": clock.now(), "outcome": "failed", "error_code": code,
                                               "error_message": error})  # fmt: skip
            await self.store.transition(job.job_id, JobStatus.FAILED, expect=(JobStatus.RUNNING,), run_id=run_id,
                                        fields={"error_message": error, "error_code": code,
                                                "attempts": [*job.attempts, ended]},
                                        message=f"{work_of(job)} failed: {error}")  # fmt: skip
            return False
        try:
            await self.store.update(job.job_id, {"runner": runner}, run_id=run_id, statuses=(JobStatus.RUNNING,))
        except TransitionRefused as exc:
            # Given up meanwhile (this scheduler stalled before the launch): its runner starts nothing.
            if exc.reason == Refusal.OTHER_RUN:
                logger.warning("job {} run {} was given up before its runner started", job.job_id, run_id)
                return False
            # (else it ended already: a run that fails at once)
        return True
