"""What the end of a run writes to its job, for the runner that watched it and for the scheduler that found its
runner dead: one path, so a pause, a preemption or a retry ends the same way whoever records it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from application.models.training_model import Job, JobStatus
from application.services.checkpoints import first_resumable
from application.services.disk_space import free_bytes
from application.services.job_store import JobStore
from application.services.log_parser import RunFacts
from application.services.path_sandbox import RealFolder
from application.services.predictions import format_limit
from application.services.run_end import Conclusion, RunEnd, checkpoint_step, conclude, final_status, work_of
from application.services.run_outputs import job_checkpoints, parse_logging_jsonl
from application.utils.log_tail import STORED_LINE_CHARS, tail_lines


def interrupt_of(stop: bool, pause: bool, preempt_for: str | None) -> str | None:
    """Why a run was asked to end early, the strongest first: a stop ends the job, a pause rests it, a
    preemption sends it back to the queue."""
    return "stop" if stop else "pause" if pause else "preempt" if preempt_for else None


# What a run stopped because its runner was told to end (SIGTERM) was preempted for.
HOST_SHUTDOWN = "the shutdown of its host"
# What the runs of a host that started again since their runners did were preempted for.
HOST_RESTART = "the restart of its host"


@dataclass
class Asked:
    """What a run was asked to end for, as its runner read it: a request, once seen, stays."""

    stop: bool = False
    pause: bool = False
    preempt_for: str | None = None

    def take(self, stop: bool, pause: bool, preempt_for: str | None) -> None:
        self.stop = self.stop or stop
        self.pause = self.pause or pause
        self.preempt_for = self.preempt_for or preempt_for

    @property
    def interrupt(self) -> str | None:
        return interrupt_of(self.stop, self.pause, self.preempt_for)


def run_ended_for(asked: Asked, code: int | None, *, timed_out: bool, limit: int | None, told_to_end: bool,
                  work: str) -> tuple[str | None, str | None, RunEnd | None]:  # fmt: skip
    """(interrupt, preempt_for, override) of a run that ended with `code`: what it was asked to end for, and an
    end its exit status cannot tell. Its time limit, when it stopped the run, outranks any request; a runner told
    to end (`told_to_end`: its host goes down) sends the run back to the queue, as Slurm requeues after a node
    failure, to resume from its last checkpoint."""
    if timed_out and code != 0 and limit is not None:
        # (a pause, preemption or stop asked during its grace does not turn the end into a rest: a preempted run
        # came back with a fresh limit, again and again)
        return None, None, time_limit_end(limit, work)
    if told_to_end and code != 0 and asked.interrupt is None:
        return "preempt", HOST_SHUTDOWN, None
    return asked.interrupt, asked.preempt_for, None


def time_limit_end(limit: int, work: str) -> RunEnd:
    """The end of a run its time limit stopped (whoever records it: its runner, or a watchdog)."""
    spelled = format_limit(limit) + ("" if limit < 60 else f" ({limit} s)")
    error = (f"the run exceeded its time limit of {spelled} and was stopped: "
             "raise time_limit or shorten the run (max_steps, num_epochs)")  # fmt: skip
    return RunEnd(JobStatus.FAILED, f"{work} failed: {error}", error, "time_limit")


# How far back a failed run's log is searched for its error: torchrun adds ~7 lines per rank and its own
# traceback after the trainer's (an 8-GPU run's error sat 90 lines from the end).
ERROR_SCAN_LINES = 400


class RunRead(NamedTuple):
    """What `read_run` found of a run."""

    facts: RunFacts
    tail: list[str]  # the log's last lines
    checkpoints: list[str]  # of all the job's runs
    disk_free: int | None  # bytes free on the disk of the job's folder


def read_run(job: Job, log_file: Path | None, facts: RunFacts | None, tail: int) -> RunRead:
    """What a run left (blocking: call it in a thread): what its log said (`facts`, or what the job recorded),
    merged with its logging.jsonl; the log's last lines (at least `tail`, ERROR_SCAN_LINES to search for the
    error: `record_end` keeps `tail`); the checkpoints of all the job's runs; the bytes free on their disk."""
    lines = tail_lines(log_file, max(tail, ERROR_SCAN_LINES), line_chars=STORED_LINE_CHARS, in_place=True) if log_file \
        else []  # fmt: skip
    watched = facts is not None
    if facts is None:
        # No one read the end of the log (its runner died): what the job recorded is from before then, so the
        # run's logging.jsonl comes first, and the last checkpoint is the one it names or the newest on disk.
        # The recorded one won, and an export merged a checkpoint from a quarter of the training.
        facts = RunFacts(run_dir=job.run_dir, train_loss=job.train_loss, train_runtime=job.train_runtime)
    if facts.run_dir:
        logged = parse_logging_jsonl(Path(facts.run_dir) / "logging.jsonl",
                                     job.attempts[-1].first_step if job.attempts else None)  # fmt: skip
        # The trainer writes it: a checkpoint it names out of the job's folder is not the job's (as in its log).
        folder = RealFolder(job.output_dir)
        if logged.last_checkpoint and not folder.holds(logged.last_checkpoint):
            logged.last_checkpoint = None
        if logged.best_checkpoint and not folder.holds(logged.best_checkpoint):
            logged.best_checkpoint = None
        facts = facts.merged(logged) if watched else logged.merged(facts)
    run_dirs = [a.run_dir for a in job.attempts[:-1]] + [facts.run_dir or job.run_dir]
    # A run that ended before swift named its folder made none: the checkpoints there are an earlier job's
    # (a folder is free again once its job ended), and a resume from them would train on its weights.
    checkpoints = job_checkpoints(Path(job.output_dir), run_dirs) if any(run_dirs) else []
    return RunRead(facts, lines, checkpoints, free_bytes(job.output_dir))


def unrecorded_checkpoints(checkpoints: list[str], run_dir: str | None, last_recorded: str | None) -> list[str]:
    """The checkpoints a run saved after the last one its runner recorded, which died before it read them: those
    in the run's folder past that one's step (all of it when the runner recorded none there). Their events
    ("checkpoint saved") were missing while GET .../checkpoints listed them."""
    if not run_dir:
        return []
    folder = Path(run_dir)
    after = checkpoint_step(last_recorded) if last_recorded and Path(last_recorded).parent == folder else None
    return [c for c in checkpoints if Path(c).parent == folder and (after is None or (checkpoint_step(c) or 0) > after)]


def record_end(
    job: Job, code: int | None, facts: RunFacts, tail: list[str], checkpoints: list[str], *,
    interrupt: str | None, stop_outcome: str | None, override: RunEnd | None, now: float, keep: int | None = None,
    disk_free: int | None = None, backoff: float = 0.0,
) -> Conclusion:  # fmt: skip
    """The job's next status and every field to write with it. `override`: an end the exit status cannot tell
    (a time limit, a runner terminated or lost); `keep`: how many of the `tail` lines to store with a failure;
    `disk_free`: the bytes free on the disk of the job's folder (`read_run`); `backoff`: RETRY_BACKOFF_SECONDS."""
    end = override or final_status(code, interrupt is not None, facts, tail, work_of(job), disk_free)
    fields: dict[str, Any] = {
        "exit_code": code, "checkpoints": checkpoints, "run_dir": facts.run_dir or job.run_dir,
        "last_checkpoint": facts.last_checkpoint or next(reversed(checkpoints), None),
        "best_checkpoint": facts.best_checkpoint,
    }  # fmt: skip
    if facts.progress is not None:
        fields["progress"] = facts.progress
    if facts.train_loss is not None:
        fields["train_loss"] = facts.train_loss
    if facts.train_runtime is not None:
        fields["train_runtime"] = facts.train_runtime
    if end.status != JobStatus.COMPLETED:
        fields["log_tail"] = tail[-keep:] if keep else tail
    if interrupt is not None:
        fields["stop_outcome"] = stop_outcome or "gone"
    last_step = facts.progress.current_step if facts.progress else None
    if last_step is None and job.progress.current_step is not None:
        last_step = job.progress.current_step
    # The next run resumes from the newest checkpoint still on disk, of this run or an earlier one: one swift
    # can resume from (a folder cut before its trainer_state.json was written is not).
    resume = first_resumable(reversed(checkpoints))
    c = conclude(job, end, interrupt=interrupt, checkpoint=resume, last_step=last_step, run_dir=fields["run_dir"],
                 now=now, backoff=backoff)  # fmt: skip
    if c.status.is_terminal():
        # When the run ended, not when Redis took the write (after an outage the runner rode out, say).
        fields["finished_at"] = now
    if c.status != JobStatus.COMPLETED:
        # swift's last estimate of the time left was for a run that is over: a failed or paused job showed "33s".
        progress = facts.progress or job.progress
        fields["progress"] = progress.model_copy(update={"remaining_time": None, "remaining_seconds": None})
    return replace(c, fields={**fields, **c.fields})


def end_time(fields: Mapping[str, Any]) -> float | None:
    """When the run ended, as the fields of its recorded end say (`record_end`): its attempt's end, else the job's."""
    attempts = fields.get("attempts")
    value = getattr(attempts[-1], "finished_at", None) if attempts else fields.get("finished_at")
    return float(value) if value is not None else None


async def end_recorded(store: JobStore, job_id: str, run_id: str | None, status: JobStatus,
                       fields: Mapping[str, Any]) -> bool:  # fmt: skip
    """Whether this end, the one in `fields`, stands recorded as `status` (RedisError when Redis does not answer):
    after a write whose answer was lost, Redis took it or not. Not the same status for the same run written by
    someone else meanwhile (the runner and a scheduler that judged it dead both record ends): an end is this
    writer's when it has this writer's end time."""
    [(found, stored_run, attempts, finished_at)] = await store.get_fields(
        [job_id], ["status", "run_id", "attempts", "finished_at"]
    )
    if found is None or json.loads(found) != status.value or stored_run is None or json.loads(stored_run) != run_id:
        return False
    ours = end_time(fields)
    if ours is None:  # (an end without a time: only its status and run tell it)
        return True
    kept = json.loads(attempts) if attempts else []
    return (kept[-1].get("finished_at") if kept else json.loads(finished_at) if finished_at else None) == ours
