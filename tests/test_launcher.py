"""The launcher: whether a runner that is gone died with its host (LocalLauncher.outlived), from real process
stamps; ended runners reaped."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from application.models.training_model import RunnerInfo
from application.services import launcher as launcher_module
from application.services import process_group as pg
from application.services.launcher import LocalLauncher
from tests.conftest import _until, job_body, make_model, wait_job


def runner(stamp: str | None, start_time: float | None = None, host: str | None = None) -> RunnerInfo:
    return RunnerInfo(host=host or socket.gethostname(), pid=424242, start_time=start_time, stamp=stamp,
                      launched_at=time.time())  # fmt: skip


def test_a_runner_of_this_boot_started_after_init_did_not_outlive_its_host() -> None:
    launcher = LocalLauncher({})
    me = pg.process_stamp(os.getpid())
    assert not launcher.outlived(runner(me, pg.process_start_time(os.getpid())))
    # Even when the clock has been stepped back since the record, so that its start time reads as older.
    assert not launcher.outlived(runner(me, time.time() - 10 * 365 * 86400))


def test_a_runner_of_an_earlier_boot_of_this_host_outlived_it() -> None:
    launcher = LocalLauncher({})
    assert launcher.outlived(runner("an-earlier-boot/123456", time.time()))


def test_a_runner_older_than_this_hosts_init_outlived_it() -> None:
    launcher = LocalLauncher({})
    init = pg.process_stamp(1)
    if init is None:
        pytest.skip("pid 1 is hidden from this process (/proc mounted with hidepid)")
    ticks = int(init.rpartition("/")[2])
    if ticks == 0:
        pytest.skip("this init started at its boot's first tick: nothing of this boot is older")
    assert launcher.outlived(runner(f"{pg.boot_id()}/{ticks - 1}"))


def test_a_runner_of_another_host_is_not_for_this_launcher_to_judge() -> None:
    launcher = LocalLauncher({})
    assert not launcher.outlived(runner("an-earlier-boot/1", 0.0, host="another-host"))


def test_a_record_without_a_stamp_falls_back_to_start_times() -> None:
    launcher = LocalLauncher({})
    host_started = pg.process_start_time(1)
    assert host_started is not None
    assert launcher.outlived(runner(None, host_started - 30))
    assert not launcher.outlived(runner(None, time.time()))


def test_a_record_whose_stamp_is_not_one_falls_back_to_start_times() -> None:
    launcher = LocalLauncher({})
    assert not launcher.outlived(runner("not-a-stamp", time.time()))
    assert not launcher.outlived(runner("/12", time.time()))


async def test_runners_that_recorded_their_own_end_are_reaped_then_forgotten(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nobody asks about a runner that recorded its own end: without reaping, each run left a zombie behind
    # in the scheduler, and its entry in the launcher for ever.
    monkeypatch.setattr(launcher_module, "FORGET_AFTER", 0.0)
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        for name in ("z1", "z2"):
            await client.post("/jobs", json=job_body(tmp_path, name, auto_start=True, training={"max_steps": 2}))
        for name in ("z1", "z2"):
            await wait_job(client, name, lambda j: j["status"] == "completed")
        launcher = client.scheduler.launcher
        pids = list(launcher.children)
        assert len(pids) == 2
        await _until(lambda: not launcher.children, timeout=10)
        assert not any(psutil.pid_exists(pid) for pid in pids)  # a zombie still has its pid


def test_the_runners_listed_are_this_deployments_with_the_grace_they_were_started_with(tmp_path: Path) -> None:
    # What a scheduler taking the lead holds starts for (a Redis that lost its data: hunt BU, review BV): processes
    # that look like runners, with the key prefix and output root they were started with.
    import subprocess

    def fake_runner(*args: str, **env: str) -> subprocess.Popen[bytes]:
        # (`sh -c` keeps its own command line while `sleep` runs: it has more to do after it)
        return subprocess.Popen(["/bin/sh", "-c", "sleep 60; :", "-m", "application.runner", *args],
                                env={"PATH": os.environ["PATH"], **env})  # fmt: skip

    output = tmp_path / "output"
    output.mkdir()
    (tmp_path / "link").symlink_to(output)
    ours = {"REDIS_KEY_PREFIX": "deploy-a", "OUTPUT_ROOT": str(output)}
    started = [
        fake_runner(
            "train-job", "r1", "--launch", "spec.json", **ours, STOP_GRACE_SECONDS="30", RUNNER_POLL_INTERVAL="1"
        ),
        fake_runner("export-job", "-", "--export", "e7", **{**ours, "OUTPUT_ROOT": str(tmp_path / "link")}),
        fake_runner("theirs", "r2", **{**ours, "REDIS_KEY_PREFIX": "deploy-b"}),
        fake_runner("elsewhere", "r3", **{**ours, "OUTPUT_ROOT": str(tmp_path)}),
    ]
    try:
        launcher = LocalLauncher({**os.environ, **ours})
        found = _until_value(lambda: sorted(launcher.runners(), key=lambda r: r.job_id), 2)
        assert [(r.job_id, r.run_id, r.export_id) for r in found] == [("export-job", "-", "e7"),
                                                                       ("train-job", "r1", None)]  # fmt: skip
        assert found[1].ends_within == 33.0 and found[0].ends_within == 1.0
    finally:
        for p in started:
            p.kill()
            p.wait()


def _until_value(read: Callable[[], list[Any]], n: int, timeout: float = 10.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    # (exactly n: while a fake runner's shell forks its `sleep`, the child has its command line and environment
    # for a moment, and the listing took it for a second runner: a CI at 9eaf02b)
    while len(got := read()) != n:
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    return got
