"""How a run ended, from what is known when it is over: a pure function, so every case has a unit test.

The runner calls it when swift exits; the scheduler calls it for a run whose runner died (from the exit file
the runner left, or from nothing at all).
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field, replace
from typing import Any

from application.models.training_model import Attempt, Job, JobStatus
from application.services.disk_space import DISK_FULL_BYTES, room
from application.services.log_parser import RunFacts
from application.services.scheduler import RETRY_BACKOFF_CAP
from application.services.swift_errors import extract_error, root_cause
from application.services.wait_reasons import format_wait


@dataclass(frozen=True)
class RunEnd:
    status: JobStatus
    message: str
    error_message: str | None = None
    error_code: str | None = None


def work_of(job: Job) -> str:
    """What a job's run is called in its end messages: an export job's is no training."""
    return "export" if job.kind == "export" else "training"


def exit_signal(code: int | None) -> int | None:
    """The signal that ended a process: a negative status (Popen), 128+N (shells, torchrun) or 256-N (a Python
    launcher passing its child's -N to sys.exit, as swift's cli/main.py does)."""
    if code is None:
        return None
    if code < 0:
        sig = -code
    elif 128 < code <= 128 + 64:
        sig = code - 128
    elif 256 - 64 <= code < 256:
        sig = 256 - code
    else:
        return None
    try:
        signal.Signals(sig)
    except ValueError:
        return None
    return sig


def popen_signal(code: int | None) -> int | None:
    """The signal that ended a process this one started and waited for (Popen: a negative status). Unlike
    `exit_signal`, a positive code is the process's own: a runner's is never a child's signal passed on."""
    return exit_signal(code) if code is not None and code < 0 else None


def signal_text(sig: int) -> str:
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    hint = "; often the kernel's OOM killer" if sig == signal.SIGKILL else ""
    return f"killed by signal {sig} ({name}{hint})"


def disk_full(free: int | None, error: str, export: bool = False) -> str | None:
    """The error of a failed run (an `export`'s) whose folder's disk is (all but) full, its log's error after it;
    None when it is not (`free`: the bytes free there at its end, None when not known)."""
    if free is None or free >= DISK_FULL_BYTES:
        return None
    again = "export again" if export else "resume the job if it saved a checkpoint, else create it again"
    return (f"the disk of the job's output folder is full ({room(free)}), which cuts what swift writes there short, "
            f"its log too: free space on it (OUTPUT_ROOT), then {again}; {error}")  # fmt: skip


def final_status(exit_code: int | None, stop_requested: bool, facts: RunFacts, log_tail: list[str],
                 work: str = "training", disk_free: int | None = None) -> RunEnd:  # fmt: skip
    """The status a finished run gets; `work` names the run in its messages ("export" for an export job's);
    `disk_free`: the bytes free on its folder's disk when it ended.

    * exit 0: completed, even if a stop arrived as it finished on its own;
    * a stop was requested: stopped (with no exit status, a log that reached its end is no proof of success:
      ms-swift writes its last lines in a `finally`, after a crash too; stopped can still be resumed);
    * no exit status (nobody saw it end) but the trainer reached its last lines: completed;
    * anything else: failed, with the trainer's own error when the log has one, else what ended it.
    """
    if exit_code == 0:
        return RunEnd(JobStatus.COMPLETED, f"{work} completed")
    if stop_requested:
        return RunEnd(JobStatus.STOPPED, "stopped on request")
    if exit_code is None and facts.finished:
        return RunEnd(JobStatus.COMPLETED, f"{work} completed")
    found = extract_error(log_tail)
    if exit_code is None:
        error = found or "the swift process ended unwatched and left no exit status"
        return RunEnd(JobStatus.FAILED, f"{work} failed: {error}", error, "lost")
    sig = exit_signal(exit_code)
    if sig is not None:
        # A signal says more than the last step dict before it (the OOM killer leaves no traceback).
        error = f"swift was {signal_text(sig)}" if exit_code < 0 else \
            f"swift exited with code {exit_code}: it was {signal_text(sig)}"  # fmt: skip
        if found is not None:
            error += f"; last error in the log: {found}"
        return RunEnd(JobStatus.FAILED, f"{work} failed: {error}", error, "signal")
    cause = root_cause(log_tail)
    if cause is not None and cause[1] < 0:
        # A multi-GPU run: torchrun exits 1 whatever ended the rank that failed first; a signal (the OOM killer)
        # is worth a retry as it is for a single process.
        rank, code = cause
        error = f"training process (rank {rank}) was {signal_text(-code)}"
        return RunEnd(JobStatus.FAILED, f"{work} failed: {error}", error, "signal")
    # (Not a rule of ====, nor a bare exception name with nothing after it.)
    last = next((line for line in reversed(log_tail) if _WORDS.search(line)), "")
    error = found or f"swift exited with code {exit_code}" + (f": {last}" if last else "")
    if full := disk_full(disk_free, error, export=work == "export"):
        return RunEnd(JobStatus.FAILED, f"{work} failed: {full}", full, "disk_full")
    return RunEnd(JobStatus.FAILED, f"{work} failed: {error}", error, "exit_code")


def export_error(exit_code: int, log_tail: list[str], disk_free: int | None) -> str:
    """Why a `swift export` that nobody asked to end failed: its log's error, else what ended it (a signal nobody
    here sent: the OOM killer, as for a training run); its disk first when that is full."""
    found = extract_error(log_tail)
    sig = exit_signal(exit_code)  # -9, or 137 / 247 from a launcher whose worker the signal hit
    error = found or (f"swift export was {signal_text(sig)}" if sig is not None and exit_code < 0 else
                      f"swift export exited with code {exit_code}: it was {signal_text(sig)}" if sig is not None
                      else f"swift export exited with code {exit_code}")  # fmt: skip
    return (disk_full(disk_free, error, export=True) if sig is None else None) or error


def runner_lost(returncode: int | None, pid: int | None, killed_for: str | None = None,
                work: str = "training") -> RunEnd:  # fmt: skip
    """A run whose runner died before it could record the end (the scheduler stops what is left of it), or was
    killed by the scheduler `killed_for` this reason."""
    sig = popen_signal(returncode)
    if killed_for is not None:
        error = killed_for
    elif sig is not None:
        error = f"runner {signal_text(sig)}"
    elif returncode is not None:
        error = (f"runner exited with code {returncode} before recording the end of the run (why is in its own log, "
                 "logs/<job_id>.runner.log in the job's output folder)")  # fmt: skip
    else:
        # Only a runner's parent learns how it ended.
        error = (
            f"the runner (pid {pid}) died without recording the end of the run (how it died is known only "
            "to the scheduler that started it, which has stopped or restarted since, or runs on another host)"
        )
    return RunEnd(JobStatus.FAILED, f"{work} failed: {error}", error, "runner_lost")


def host_went_down(times: int, limit: int, what: str, work: str = "training") -> RunEnd:
    """A run whose host went down under it once more than HOST_RESTART_REQUEUES lets it go back to the queue."""
    error = (f"its host went down under {what} {times} time(s) (HOST_RESTART_REQUEUES={limit}): it may be what "
             "brings the host down (host memory, a driver fault), so it is not run again")  # fmt: skip
    return RunEnd(JobStatus.FAILED, f"{work} failed: {error}", error, "host_restarts")


# ---- what the end of a run means for the job: pause, preemption, retries ---------------------------------

RETRYABLE_CODES = frozenset({"signal", "runner_lost", "lost"})
_WORDS = re.compile(r"[A-Za-z0-9]")
_OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "out of memory")
_CHECKPOINT_STEP = re.compile(r"checkpoint-(\d+)$")


def checkpoint_step(path: str | None) -> int | None:
    """The global step a checkpoint folder was saved at (swift names them checkpoint-<step>)."""
    m = _CHECKPOINT_STEP.search(path.rstrip("/")) if path else None
    return int(m.group(1)) if m else None


def is_oom(error: str | None) -> bool:
    return error is not None and any(marker in error for marker in _OOM_MARKERS)


def retryable(end: RunEnd, last_step: int | None, previous: Attempt | None) -> bool:
    """Would running again from the last checkpoint likely help? A signal (the OOM killer, node trouble) or a
    lost runner or host: yes. A CUDA out-of-memory error: once, not at the same step twice. Anything else
    the run printed as an error (a bad argument, a missing data set) would only repeat."""
    if end.status != JobStatus.FAILED:
        return False
    if end.error_code in RETRYABLE_CODES:
        return True
    if end.error_code == "exit_code" and is_oom(end.error_message):
        return not (previous is not None and is_oom(previous.error_message) and previous.last_step == last_step)
    return False


@dataclass(frozen=True)
class Conclusion:
    """The job's next status after a run, the fields to write with it, and what to tell."""

    status: JobStatus
    message: str
    fields: dict[str, Any]
    event: tuple[str, str, dict[str, Any]] | None = None
    # Raw values the record must still hold for it to be written (`JobStore.transition`'s `unchanged`).
    unchanged: dict[str, str] = field(default_factory=dict)


def honoured_ask(job: Job, checkpoint: bool) -> Conclusion | None:
    """What a queued job asked to stop or pause as its last run ended (a retry, a preemption: its runner had read
    its flags just before the ask came) rests as, before any new run; None when neither was asked. A stop asked as
    well as a pause wins (review DY). `checkpoint`: whether it left one (a stop of a job that did is resumable).
    Written only while the ask still holds: a caller's copy read before the job rested so and was resumed (which
    clears it) would undo the resume."""
    if job.stop_requested:
        to = JobStatus.STOPPED if checkpoint else JobStatus.CANCELLED
        return Conclusion(to, "stopped on request as its last run ended", {}, unchanged={"stop_requested": "true"})
    if job.pause_requested:
        message = f"paused on request as its last run ended: resumes from {job.resume_from or 'the beginning'}"
        return Conclusion(JobStatus.PAUSED, message, {"pause_requested": False, "retry_at": None},
                          unchanged={"pause_requested": "true"})  # fmt: skip
    return None


def retry_wait(backoff: float, retry: int) -> float:
    """How long retry number `retry` (1 for the first) waits before it may start: `backoff` (RETRY_BACKOFF_SECONDS),
    doubled at each retry after the first, at most RETRY_BACKOFF_CAP."""
    return min(RETRY_BACKOFF_CAP, backoff * 2.0 ** min(retry - 1, 32))


def conclude(job: Job, end: RunEnd, *, interrupt: str | None, checkpoint: str | None, last_step: int | None,
             run_dir: str | None, now: float, backoff: float = 0.0) -> Conclusion:  # fmt: skip
    """What a run's end means, given how it ended (`end`), why it was interrupted (`interrupt`: "stop", "pause",
    "preempt" or None) and the checkpoint a next run would resume from.

    A run that completed is completed whatever else was asked. A pause rests the job as `paused`; a preemption
    puts it back in the queue (its original submission time keeps its place); a retryable failure with
    retries left does the same, to start no sooner than `retry_wait(backoff, ...)` after `now`; both resume from
    `checkpoint` (from the start when there is none).
    """
    attempts = [a.model_copy() for a in job.attempts]
    current = attempts[-1] if attempts else None
    previous = attempts[-2] if len(attempts) > 1 else None
    step_at = checkpoint_step(checkpoint)
    where = f"{checkpoint} (step {step_at})" if checkpoint else "the beginning (no checkpoint yet)"
    fields: dict[str, Any] = {"pause_requested": False, "preempt_for": None}
    status, message, outcome = end.status, end.message, end.status.value
    event: tuple[str, str, dict[str, Any]] | None = None
    lost = _lost(last_step, step_at)
    resume: dict[str, Any] = {"resume_from": checkpoint, "resume_step": step_at, "lost_steps": lost}
    if end.status == JobStatus.COMPLETED:
        pass
    elif interrupt == "pause":
        status, outcome = JobStatus.PAUSED, "paused"
        message = f"paused: resumes from {where}" + _lost_text(lost, checkpoint)
        event = ("paused", message, resume)
    elif interrupt == "preempt":
        status, outcome = JobStatus.QUEUED, "preempted"
        message = f"preempted for {job.preempt_for}: back in the queue, resumes from {where}"
        message += _lost_text(lost, checkpoint)
        event = ("preempted", message, {**resume, "by": job.preempt_for})
    elif interrupt is None and job.retries < job.max_retries and retryable(end, last_step, previous):
        status, outcome = JobStatus.QUEUED, "retried"
        fields["retries"] = job.retries + 1
        wait = retry_wait(backoff, job.retries + 1)
        fields["retry_at"] = now + wait if wait > 0 else None
        after = f", starts again in {format_wait(wait).removeprefix('about ')} at the earliest" if wait > 0 else ""
        message = (f"attempt {len(attempts)} failed ({end.error_message}); retry {job.retries + 1} of "
                   f"{job.max_retries}: back in the queue{after}, resumes from {where}")  # fmt: skip
        event = ("retry", message, {**resume, "error_code": end.error_code, "attempt": len(attempts),
                                    "retry_at": fields["retry_at"]})  # fmt: skip
    elif interrupt is None and end.status == JobStatus.FAILED and job.max_retries and \
            (why := _not_retried(job, end, last_step, previous)):  # fmt: skip
        # A job given retries says why this failure ends it (hunt DK: only swift's error was shown).
        end = replace(end, error_message=f"{end.error_message} ({why})")
        message = f"{message} ({why})"
    if status == JobStatus.QUEUED:
        # A pause asked after the run's end was read stays asked: the next pass pauses the job, not runs it.
        del fields["pause_requested"]
    if status in (JobStatus.PAUSED, JobStatus.QUEUED):
        fields["resume_from"] = checkpoint
        fields["gpu_ids"] = []  # it holds none now (the attempt keeps where it ran)
    else:
        fields["error_message"] = end.error_message
        fields["error_code"] = end.error_code
    if current is not None:
        current.finished_at = now
        current.outcome = outcome
        current.error_code = end.error_code
        current.error_message = end.error_message
        current.preempted_for = job.preempt_for if outcome == "preempted" else None
        current.run_dir = run_dir or current.run_dir
        current.last_step = last_step
        fields["attempts"] = attempts
    return Conclusion(status, message, fields, event)


def _not_retried(job: Job, end: RunEnd, last_step: int | None, previous: Attempt | None) -> str | None:
    if retryable(end, last_step, previous):
        spent = "its retry is" if job.max_retries == 1 else f"its {job.max_retries} retries are"
        return f"not retried: {spent} used up" if job.retries >= job.max_retries else None
    if end.error_code == "exit_code" and is_oom(end.error_message):
        return f"not retried: out of GPU memory at step {last_step} again" if last_step is not None else \
            "not retried: out of GPU memory at the same step again"  # fmt: skip
    if end.error_code == "time_limit":
        return "not retried: a time limit is never retried"
    if end.error_code == "exit_code":
        return "not retried: an error the run printed would only repeat"
    return None  # (a full disk, a host that went down too often: their messages say what to do)


def _lost(last_step: int | None, checkpoint_step: int | None) -> int | None:
    if last_step is None:
        return None
    return max(0, last_step - (checkpoint_step or 0))


def _lost_text(lost: int | None, checkpoint: str | None) -> str:
    if not lost:
        return ""
    after = "after it" if checkpoint else "so far"
    return f"; the step trained {after} is lost" if lost == 1 else f"; the {lost} steps trained {after} are lost"


def killed_with_its_host(code: int | None) -> bool:
    """An exit status that fits a host going down with everything on it: none (the runner died first), or swift
    killed by SIGKILL (the runner saw that and wrote it down before it was killed too)."""
    return code is None or exit_signal(code) == signal.SIGKILL
