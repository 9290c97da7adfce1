"""Telling a process apart from a later one with its pid: real processes, the kernel's own records."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

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
