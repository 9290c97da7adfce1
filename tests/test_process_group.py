"""Telling a process apart from a later one with its pid: real processes, the kernel's own records."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from application.services import process_group as pg


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_process_is_known_by_its_stamp_whatever_the_clock_did_since(sleeper: subprocess.Popen[bytes]) -> None:
    stamp = pg.process_stamp(sleeper.pid)
    started = pg.process_start_time(sleeper.pid)
    assert stamp is not None and started is not None
    assert stamp.startswith(pg.boot_id() + "/") and pg.boot_id()
    # The clock was stepped 5 s since the record: the start time read now no longer matches it; the stamp does.
    assert pg.is_alive(sleeper.pid, started + 5, stamp)
    assert pg.is_alive(sleeper.pid, started, stamp)
    # The same pid with another stamp is another process (a reused pid, or one of another boot).
    assert not pg.is_alive(sleeper.pid, started, f"{pg.boot_id()}/1")
    assert not pg.is_alive(sleeper.pid, started, "another-boot/" + stamp.rpartition("/")[2])


def test_a_process_that_ended_is_not_alive(sleeper: subprocess.Popen[bytes]) -> None:
    stamp = pg.process_stamp(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    assert pg.process_stamp(sleeper.pid) is None
    assert not pg.is_alive(sleeper.pid, None, stamp)


def test_which_process_started_first(sleeper: subprocess.Popen[bytes]) -> None:
    init, child = pg.process_stamp(1), pg.process_stamp(sleeper.pid)
    if init is None:
        pytest.skip("pid 1 is hidden from this process (/proc mounted with hidepid)")
    assert child is not None
    assert pg.started_before(init, child) is True
    assert pg.started_before(child, init) is False
    # Stamps of two boots cannot be ordered by their ticks; what is not a stamp cannot be ordered at all.
    assert pg.started_before("another-boot/1", child) is None
    assert pg.started_before("1700000000.5", child) is None and pg.started_before("/5", child) is None
    assert pg.stamp_boot(child) == pg.boot_id() and pg.stamp_boot("garbage") is None


def _leader_leaving_a_child(pid_file: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A leader (in its own session, as runs start) that leaves a child behind in its group and exits."""
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "open(sys.argv[1], 'w').write(str(p.pid))")  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code, str(pid_file)], start_new_session=True, env=env)


def _gone(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pg.group_members(pgid):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_run_group_is_alive_while_a_member_marked_with_the_run_outlives_its_leader(tmp_path: Path) -> None:
    leader = _leader_leaving_a_child(tmp_path / "child.pid", {**os.environ, pg.RUN_MARK: "run-1"})
    stamp, started = pg.process_stamp(leader.pid), pg.process_start_time(leader.pid)
    try:
        assert leader.wait(30) == 0 and (tmp_path / "child.pid").read_text()
        assert not pg.is_alive(leader.pid, started, stamp)  # the leader is gone (reaped) ...
        assert pg.run_group_alive(leader.pid, started, stamp, "run-1")  # ... its child is not
        # Another run's mark, or none (a run started before runs were marked): not that run's group.
        assert not pg.run_group_alive(leader.pid, started, stamp, "run-2")
        assert not pg.run_group_alive(leader.pid, started, stamp, None)
        _gone(leader.pid)
        assert not pg.run_group_alive(leader.pid, started, stamp, "run-1")
        assert not pg.run_group_alive(None, None, None, "run-1") and not pg.run_group_alive(1, None, None, "run-1")
    finally:
        _gone(leader.pid)


def test_the_groups_marked_with_a_run_are_those_of_its_exact_mark() -> None:
    # Found by its mark alone (a process that left the run's group by setsid()), read as each environment lies
    # in /proc: the mark first or last in it counts; a longer mark, or a value that holds the mark, does not.
    clean = {k: v for k, v in os.environ.items() if k != pg.RUN_MARK}
    envs = {"first": {pg.RUN_MARK: "run-1", **clean}, "last": {**clean, pg.RUN_MARK: "run-1"},
            "longer": {**clean, pg.RUN_MARK: "run-10"},
            "inside": {**clean, "OTHER": f"{pg.RUN_MARK}=run-1"}}  # fmt: skip
    procs = {name: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env,
                                    start_new_session=True) for name, env in envs.items()}  # fmt: skip
    try:
        assert pg.marked_groups("run-1") == sorted([procs["first"].pid, procs["last"].pid])
        assert pg.marked_groups("run-10") == [procs["longer"].pid]
        assert pg.marked_groups("run-") == []
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_a_group_that_has_a_runs_old_number_is_not_that_run(tmp_path: Path) -> None:
    # Its leader has the pid of an ended run's leader (another stamp) ...
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                             env={**os.environ, pg.RUN_MARK: "run-1"})  # fmt: skip
    try:
        assert pg.group_members(other.pid) == [other.pid]
        assert not pg.run_group_alive(other.pid, None, f"{pg.boot_id()}/1", "run-1")
        assert pg.run_group_alive(other.pid, None, pg.process_stamp(other.pid), None)
    finally:
        other.kill()
        other.wait()
    # ... or its leader exited too, leaving members that are not the run's: left alone.
    leader = _leader_leaving_a_child(tmp_path / "child.pid", {k: v for k, v in os.environ.items() if k != pg.RUN_MARK})
    try:
        assert leader.wait(30) == 0 and pg.group_members(leader.pid)
        assert not pg.run_group_alive(leader.pid, None, "another-boot/5", "run-1")
    finally:
        _gone(leader.pid)


def test_killing_what_is_left_of_a_run_returns_once_it_is_gone(tmp_path: Path) -> None:
    # The runner writes the run's end, which frees its GPUs, after this: it returned at the SIGKILL while a large
    # process was still on its way out (its memory, a GPU's, not yet free), and the next job started on its GPU
    # (hunt EL). One process in the run's group, one that left it but carries the run's mark; 256 MB each: their
    # exits take a while (about 50 ms here).
    big = "import time; b = b'\\x01' * (256 << 20); open({!r}, 'w').write('x'); time.sleep(600)"
    in_group = subprocess.Popen([sys.executable, "-c", big.format(str(tmp_path / "a"))], start_new_session=True)
    marked = subprocess.Popen([sys.executable, "-c", big.format(str(tmp_path / "b"))], start_new_session=True,
                              env={**os.environ, pg.RUN_MARK: "run-9"})  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ((tmp_path / "a").exists() and (tmp_path / "b").exists()):
            assert time.monotonic() < deadline, "the processes never filled their memory"
            time.sleep(0.02)
        pg.kill_marked("run-9", in_group.pid, wait=10)
        assert pg.group_members(in_group.pid) == [] and pg.group_members(marked.pid) == []
    finally:
        for proc in (in_group, marked):
            proc.kill()
            proc.wait()
