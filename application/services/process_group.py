"""Starting, watching and stopping one process group: a swift run, or a runner.

A swift run starts in its own session (so it leads its own process group) with an explicit environment,
stdout+stderr to its log file. Stopping is SIGTERM to the whole group, a grace period, then SIGKILL: swift
is a launcher whose trainer is a child (and torchrun's workers grandchildren), so signalling one pid would
leave the trainer running. `ProcessLookupError` means already gone. A pid is only trusted together with its
stamp (boot id and start tick), so a reused pid is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from application.runner import CLAIMED, STARTED
from application.services import clock
from application.utils.log_files import open_in_place, replace_in_place

START_TIME_TOLERANCE = 0.5
# The environment variable that names the run (its run id, or an export's id) in swift and its children.
RUN_MARK = "SWIFT_API_RUN"


def process_start_time(pid: int) -> float | None:
    """When the process started, in Unix seconds: for people. Its stamp (below) is what tells it apart."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


@functools.cache
def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_stamp(pid: int) -> str | None:
    """Which process `pid` is, exactly: this boot's id and the clock tick the process started at. A start time
    in Unix seconds moves with the clock (the kernel's boot time moves when NTP or a person steps the clock),
    so a live process could look like another one; ticks since boot never change, and a boot id never repeats."""
    boot = boot_id()
    if not boot:  # without it, ticks of two boots would compare as if of one
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22, counted after the (comm) field
    except (OSError, ValueError, IndexError):
        return None
    return f"{boot}/{ticks}"


def stamp_boot(stamp: str) -> str | None:
    """The boot a stamp is of; None when it is not a stamp."""
    boot, _, ticks = stamp.rpartition("/")
    return boot if boot and ticks.isdigit() else None


def started_before(stamp: str, other: str) -> bool | None:
    """Whether the process of `stamp` started before the one of `other`; None when they are of different boots
    (the other boot's are all older or all newer; which came first is not in the stamps) or not stamps."""
    boot, other_boot = stamp_boot(stamp), stamp_boot(other)
    if boot is None or boot != other_boot:
        return None
    return int(stamp.rpartition("/")[2]) < int(other.rpartition("/")[2])


def is_alive(pid: int | None, start_time: float | None, stamp: str | None = None) -> bool:
    """True when `pid` is the same process we started (a reused pid has another stamp). Without a stamp (a record
    older than stamps), its start time must match, which a step of the clock since can defeat."""
    if not pid:
        return False
    return _is_ours(pid, start_time, stamp, zombie=False)


def _is_ours(pid: int, start_time: float | None, stamp: str | None, *, zombie: bool) -> bool:
    try:
        p = psutil.Process(pid)
        if not zombie and p.status() == psutil.STATUS_ZOMBIE:
            return False
        if stamp is not None:
            return process_stamp(pid) == stamp
        return start_time is None or abs(p.create_time() - start_time) < START_TIME_TOLERANCE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def run_group_alive(pgid: int | None, start_time: float | None, stamp: str | None, run: str | None) -> bool:
    """Is anything left of the run `run` whose process group `pgid` led (its leader started at `start_time`
    with `stamp`)? The leader, or members still in its group after the leader exited (a trainer that ignored
    the SIGTERM its launcher died of), known by the run's mark in their environment (RUN_MARK, inherited from
    the leader): a group id is a number that another session can have once the run's group ended, on this
    host or in the pid namespace of another. Scans every process: call it in a thread."""
    if not pgid or pgid <= 1:
        return False
    if is_alive(pgid, start_time, stamp):
        return True
    if not run:
        return False  # a run started before runs were marked: its leader is all that can be known
    if psutil.pid_exists(pgid) and not _is_ours(pgid, start_time, stamp, zombie=True):
        return False  # while a group has members, its id is no other process's pid: this is another group
    needle = _needle(run)
    return any(_marked(pid, run, needle) for pid in group_members(pgid))


def marked_groups(run: str) -> list[int]:
    """The process groups of whatever is left of the run `run`, known by its mark alone: for a run whose runner
    died after it started swift but before it recorded swift's pid. Scans every process: call it in a thread."""
    pids = [int(name) for name in os.listdir(_PROC) if name.isdigit()] if _RAW else psutil.pids()
    groups = set()
    needle = _needle(run)
    for pid in pids:
        if _marked(pid, run, needle):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                groups.add(os.getpgid(pid))
    return sorted(g for g in groups if g > 1)


_PROC = "/proc"
# How long what is left of a run is waited for once killed: its GPUs' memory comes back only once its exit is
# through, and the run's end frees them.
KILL_WAIT_SECONDS = 10.0
_RAW = os.path.isfile(f"{_PROC}/self/environ")  # (Linux: elsewhere psutil reads environments its own way)


def _needle(run: str) -> bytes:
    return f"\0{RUN_MARK}={run}\0".encode()


def _marked(pid: int, run: str, needle: bytes) -> bool:
    if _RAW:
        # The environment a process started with, searched as it lies in /proc: psutil parses each into a dict,
        # and a scan of every process took 6 ms on a quiet 2-core box, 11-20 ms under load (1.7 this way). A
        # runner makes one before it records its run's end, so a hand-over waited for it.
        try:
            with open(f"{_PROC}/{pid}/environ", "rb") as fh:
                return needle in b"\0" + fh.read() + b"\0"
        except OSError:  # (gone, a kernel thread, another user's)
            return False
    try:
        return psutil.Process(pid).environ().get(RUN_MARK) == run
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
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


def read_exit(path: Path) -> tuple[int | None, float | None]:
    """The exit status the run's group leader recorded, and when (None, None without a readable record)."""
    code, at = exit_of(read_exit_record(path) or {})
    return (None, None) if code is None else (code, at)


def exit_of(record: dict[str, Any]) -> tuple[int | None, float | None]:
    """An exit record's status and its time, each None when it holds none."""
    try:
        code: int | None = int(record["exit_code"])
    except (KeyError, ValueError, TypeError):
        code = None
    at = record.get("finished_at")
    return code, float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None


def write_exit_file(path: Path, code: int, asked: dict[str, Any] | None = None, at: float | None = None,
                    about: dict[str, Any] | None = None) -> str | None:  # fmt: skip
    """Write swift's exit status beside its log, for a watchdog to read should the runner die before it records
    the end; None, or why it could not (a full disk): the runner records the end in Redis all the same. A runner
    that died of it lost swift's own error ("No space left on device") to a "runner exited with code 1".

    `asked`: what the run was asked to end for (stop, pause, preempt_for), or its time limit (time_limit), as the
    runner acted on it: a Redis back from an older snapshot no longer says so, and the run was retried or failed
    instead of stopped; a runner killed in the limit's grace left only a SIGTERM's end.
    `about`: which job it was a run of (its `job_created_at`), and its `run_dir`, for a record that Redis lost
    (`run_logs.unknown_runs`)."""
    record: dict[str, Any] = {"exit_code": code, "finished_at": at or clock.now(), "pid": os.getpid(), **(about or {})}
    if asked:
        record["asked"] = asked
    try:
        replace_in_place(path, json.dumps(record).encode())
    except OSError as exc:
        return f"{exc.strerror or exc} ({path})"
    return None


def read_exit_record(path: Path) -> dict[str, Any] | None:
    """The whole exit record beside a run's log, or None without a readable one."""
    try:
        with open_in_place(path) as fh:  # (a link its owner made is no record of this run)
            data = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_exit_asked(path: Path) -> tuple[bool, bool, str | None]:
    """What the runner wrote in the exit record that the run was asked to end for: (stop, pause, preempt_for)."""
    return exit_asked(read_exit_record(path) or {})


def exit_asked(record: dict[str, Any]) -> tuple[bool, bool, str | None]:
    """`read_exit_asked` of a record already read."""
    asked = record.get("asked")
    if not isinstance(asked, dict):
        return False, False, None
    preempt_for = asked.get("preempt_for")
    return asked.get("stop") is True, asked.get("pause") is True, \
        preempt_for if isinstance(preempt_for, str) and preempt_for else None  # fmt: skip


def exit_timed_out(record: dict[str, Any]) -> bool:
    """Whether the runner wrote in the exit record (read) that the run's time limit stopped it."""
    asked = record.get("asked")
    return isinstance(asked, dict) and asked.get("time_limit") is True


def launch_spec(log_dir: Path, job_id: str, run_id: str) -> Path:
    """The file a run's runner starts swift from (one per run: see runner._early_start)."""
    return log_dir / f"{job_id}.{run_id[:12]}.launch.json"


def revoke_launch(spec: Path, log_file: Path | None, grace: float) -> bool:
    """Make sure no runner starts the run of `spec` from now on: True when none can (the spec removed, or never
    written), False when a runner took it (the run was launched: its pid or log follows). A claim older than
    `grace` with no log is a runner that died taking it."""
    try:
        spec.unlink()
        return True
    except FileNotFoundError:
        pass
    claimed = Path(f"{spec}{CLAIMED}")
    try:
        age = time.time() - claimed.stat().st_mtime
    except FileNotFoundError:
        # Never written, or taken and swift starting or started: SPEC.claimed becomes SPEC.started once swift's log
        # exists, which goes once swift runs (so read in that order).
        return not (Path(f"{spec}{STARTED}").exists() or (log_file is not None and log_file.exists()))
    if age < grace:
        return False
    try:
        claimed.unlink()  # (a runner that stalled holding it starts nothing: its rename to .started fails)
    except FileNotFoundError:
        return False  # it went on to start swift just now
    return True


def spawn(argv: list[str], env: Mapping[str, str], cwd: Path, log_file: Path, *,
          fresh: bool = False) -> subprocess.Popen[bytes]:  # fmt: skip
    """Start `argv` in a new session, stdout+stderr to `log_file` (emptied first when `fresh`).

    A plain Popen, not an asyncio transport: garbage-collecting an asyncio subprocess transport kills a child
    that still runs, and a runner must outlive the scheduler that spawned it.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open_in_place(log_file, "w" if fresh else "a") as log:  # (not through a link the job's owner made)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=str(cwd),
                                env=dict(env), start_new_session=True)  # fmt: skip


class Child:
    """A process we started, whose exit the event loop hears at once (one thread waits on it)."""

    def __init__(self, popen: subprocess.Popen[bytes], started_at: float | None = None) -> None:
        self.popen = popen
        self.pid = popen.pid
        # Wall-clock start: psutil's create_time rests on a boot time with one-second resolution.
        self.started_at = started_at or time.time()
        self._waiter: asyncio.Future[int] | None = None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def ended_with(self) -> int:
        """The exit status of a child known to have ended."""
        code = self.popen.poll()
        assert code is not None
        return code

    async def wait(self) -> int:
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().run_in_executor(None, self.popen.wait)
        return await asyncio.shield(self._waiter)


def signal_group(pgid: int | None, sig: int) -> bool:
    # killpg(0) is our own group and 1 is init: a run's group is never either (a missing pid must not get here).
    if not pgid or pgid <= 1 or pgid == os.getpgrp():
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
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
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while await _members(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(poll)
    return "killed"


async def end_group(pgid: int, grace: float) -> tuple[str, float]:
    """`terminate_group`'s outcome, and when the group was gone: the run's end, when its GPUs came back."""
    outcome = await terminate_group(pgid, grace)
    return outcome, clock.now()


def kill_marked(run: str, pgid: int | None = None, wait: float = 0.0, poll: float = 0.05) -> None:
    """Kill what is left of the run `run` anywhere, known by its mark, and of its group `pgid`: after the leader
    exits, nothing of the run may survive (orphaned dataloader workers, a stray trainer, a child that called
    setsid() and held its GPU after the run ended). With `wait`, return once none of it is left, or after that
    many seconds: a SIGKILLed process holds its memory, a GPU's too, until its exit is through (a second for a
    large one), and the run's end, written next, frees its GPUs (the next job started on them beside a dying
    trainer: hunt EL). Scans every process: call it in a thread."""
    mine = os.getpgrp()
    left = {g for g in (*marked_groups(run), pgid) if g and g > 1 and g != mine}
    deadline = time.monotonic() + wait
    while left:
        for group in left:
            signal_group(group, signal.SIGKILL)
        if wait <= 0:
            return
        left = {g for g in left if _group_lives(g)}
        if not left or time.monotonic() >= deadline:
            return
        time.sleep(poll)


def _group_lives(pgid: int) -> bool:
    """Whether a process of the group is left, an exited one not yet reaped aside: one signal, and a scan only
    while the group has members (a zombie's memory is free)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return bool(group_members(pgid))
