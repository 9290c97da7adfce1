"""Starting, watching and stopping one swift process group.

Each run starts `application.runner` in a new session (so it leads its own process group) with an
explicit environment, stdout+stderr to the log file. Stopping is SIGTERM to the whole group, a grace
period, then SIGKILL: swift is a launcher whose trainer is a child (and torchrun's workers grandchildren),
so signalling one pid would leave the trainer running. `ProcessLookupError` means already gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from application.config import PROJECT_ROOT

START_TIME_TOLERANCE = 0.5
# Children this process launched and has not yet seen exit (they outlive an API shutdown by design;
# a test harness that ends the event loop reaps them first).
CHILDREN: dict[int, asyncio.subprocess.Process] = {}


@dataclass
class RunningProcess:
    pid: int
    start_time: float
    exit_file: Path
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)
    # False for a re-attached run whose leader was already gone: its pid may be someone else's by now,
    # so nothing is ever signalled on its behalf.
    verified: bool = True
    run_id: str | None = None  # the job's run this process belongs to

    @property
    def pgid(self) -> int:
        return self.pid  # the runner leads its own session and group


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


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_alive(pid: int | None, start_time: float | None) -> bool:
    """True when `pid` is the same process we started (a reused pid has another start time)."""
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return start_time is None or abs(p.create_time() - start_time) < START_TIME_TOLERANCE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def group_members(pgid: int) -> list[int]:
    members = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                members.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def read_exit_file(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def launch(argv: list[str], env: Mapping[str, str], cwd: Path, log_file: Path) -> RunningProcess:
    """Start `argv` under the runner; raises OSError when it cannot start at all."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    exit_file = log_file.with_suffix(".exit.json")
    exit_file.unlink(missing_ok=True)
    runner_env = dict(env)
    runner_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(log_file, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "application.runner", str(exit_file), "--", *argv,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
            cwd=str(cwd), env=runner_env, start_new_session=True,
        )  # fmt: skip
    start = process_start_time(proc.pid) or time.time()
    CHILDREN[proc.pid] = proc
    return RunningProcess(proc.pid, start, exit_file, proc)


async def wait_exit(run: RunningProcess, poll_interval: float) -> int | None:
    """Wait for the run to end and return the command's exit code (None when nobody recorded it).

    Our own child is awaited (instant); a re-attached one (started by an API process that died) is polled.
    """
    if run.proc is not None:
        await run.proc.wait()
        CHILDREN.pop(run.pid, None)
    else:
        while is_alive(run.pid, run.start_time):
            await asyncio.sleep(poll_interval)
    code = read_exit_file(run.exit_file)
    if code is None and run.proc is not None and run.proc.returncode is not None:
        rc = run.proc.returncode
        code = rc if rc < 128 else -(rc - 128)
    return code


def signal_group(pgid: int | None, sig: int) -> bool:
    # killpg(0) is our own group and 1 is init: a job's group is never either (a missing pid must not get here).
    if not pgid or pgid <= 1 or pgid == os.getpgrp():
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


async def _members(pgid: int) -> list[int]:
    # A full process scan: off the event loop, it grows with the host's process count.
    return await asyncio.to_thread(group_members, pgid)


async def terminate_group(pgid: int, grace: float, poll: float = 0.05) -> str:
    """SIGTERM the group, wait up to `grace` seconds, then SIGKILL. Returns how it ended."""
    if not signal_group(pgid, signal.SIGTERM):
        return "gone"
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not await _members(pgid):
            return "terminated"
        await asyncio.sleep(poll)
    if not await _members(pgid):
        return "terminated"
    signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while await _members(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(poll)
    return "killed"


async def wait_group_gone(pgid: int, timeout: float, poll: float = 0.05) -> bool:
    """Wait (sending nothing) up to `timeout` seconds for every member of the group to exit."""
    deadline = time.monotonic() + timeout
    while await _members(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True


def kill_leftovers(pgid: int) -> None:
    """After the leader exits, nothing of the job may survive (orphaned dataloader workers, a stray trainer)."""
    signal_group(pgid, signal.SIGKILL)
