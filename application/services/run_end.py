"""How a run ended, from what is known when it is over: a pure function, so every case has a unit test.

The runner calls it when swift exits; the scheduler calls it for a run whose runner died (from the exit file
the runner left, or from nothing at all).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from application.models.training_model import JobStatus
from application.services.log_parser import RunFacts, extract_error


@dataclass(frozen=True)
class RunEnd:
    status: JobStatus
    message: str
    error_message: str | None = None
    error_code: str | None = None


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


def signal_text(sig: int) -> str:
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    hint = "; often the kernel's OOM killer" if sig == signal.SIGKILL else ""
    return f"killed by signal {sig} ({name}{hint})"


def final_status(exit_code: int | None, stop_requested: bool, facts: RunFacts, log_tail: list[str]) -> RunEnd:
    """The status a finished run gets.

    * exit 0: completed, even if a stop arrived as it finished on its own;
    * a stop was requested: stopped;
    * no exit status (nobody saw it end) but the trainer reached its last lines: completed;
    * anything else: failed, with the trainer's own error when the log has one, else what ended it.
    """
    if exit_code == 0:
        return RunEnd(JobStatus.COMPLETED, "training completed")
    if stop_requested:
        return RunEnd(JobStatus.STOPPED, "stopped on request")
    if exit_code is None and facts.finished:
        return RunEnd(JobStatus.COMPLETED, "training completed")
    found = extract_error(log_tail)
    if exit_code is None:
        error = found or "the swift process ended unwatched and left no exit status"
        return RunEnd(JobStatus.FAILED, f"training failed: {error}", error, "lost")
    sig = exit_signal(exit_code)
    if sig is not None:
        # A signal says more than the last step dict before it (the OOM killer leaves no traceback).
        error = f"swift was {signal_text(sig)}" if exit_code < 0 else \
            f"swift exited with code {exit_code}: it was {signal_text(sig)}"  # fmt: skip
        if found is not None:
            error += f"; last error in the log: {found}"
        return RunEnd(JobStatus.FAILED, f"training failed: {error}", error, "signal")
    last = next((line for line in reversed(log_tail) if line.strip()), "")
    error = found or f"swift exited with code {exit_code}" + (f": {last}" if last else "")
    return RunEnd(JobStatus.FAILED, f"training failed: {error}", error, "exit_code")


def runner_lost(returncode: int | None, pid: int | None) -> RunEnd:
    """A run whose runner died before it could record the end (the scheduler stops what is left of it)."""
    sig = exit_signal(returncode)
    if sig is not None:
        error = f"runner {signal_text(sig)}"
    elif returncode is not None:
        error = f"runner exited with code {returncode} before recording the end of the run"
    else:
        error = f"the runner (pid {pid}) died without recording the end of the run"
    return RunEnd(JobStatus.FAILED, f"training failed: {error}", error, "runner_lost")
