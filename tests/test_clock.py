"""One clock across hosts: an API role on a host whose clock is two minutes off the scheduler's host still
shows true ages, durations and waits, and holds the per-owner caps with the others (services/clock.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ApiServer, job_body, wait_for

SKEWED = str(ROOT / "tests" / "skewed_clock")
STEPPED = str(ROOT / "tests" / "stepped_clock")


def _api_off_by(server_factory: Callable[..., ApiServer], leader: ApiServer, seconds: float) -> ApiServer:
    return server_factory(prefix=leader.prefix, role="api", env={
        "PYTHONPATH": SKEWED, "SWIFT_API_TEST_CLOCK_SKEW": str(seconds), "STREAMS_PER_OWNER": "1"})  # fmt: skip


def test_api_roles_on_hosts_whose_clocks_are_off_show_true_ages_durations_and_waits_and_share_the_caps(
    server_factory: Callable[..., ApiServer], workspace: Path
) -> None:
    # Each compared the times other hosts wrote with its own clock: ahead, it called a live scheduler's GPU
    # reading 120 s old and took an owner's last stream (cutting the other host's off); behind, it showed a
    # running job's duration and a queued job's wait as negative (hunt).
    leader = server_factory(env={"SIMULATED_GPUS": "1x80", "STREAMS_PER_OWNER": "1"})
    ahead, behind = _api_off_by(server_factory, leader, 120), _api_off_by(server_factory, leader, -120)
    assert "this host's clock is +120." in ahead.server_log() and "is -120." in behind.server_log()
    for api in (ahead, behind):
        gpus = api.http.get("/health").json()["scheduler"]["gpu_reading_age_seconds"]
        assert 0 <= gpus < 30, gpus
        assert api.http.get("/gpus").json().get("error") is None
    before = time.time()
    r = behind.create(**job_body(workspace, "hog", auto_start=True, hang_after_steps=1))
    assert r.status_code == 201, r.text
    assert abs(behind.job("hog")["created_at"] - before) < 30  # stamped on the shared clock, not 120 s back
    leader.wait_status("hog", "running")
    r = behind.create(**job_body(workspace, "next", auto_start=True, training={"max_steps": 2}))
    assert r.status_code == 201 and r.json()["status"] == "queued", r.text
    for api in (ahead, behind):
        duration = api.http.get("/jobs/hog/status").json()["duration_seconds"]
        assert 0 <= duration < 60, duration
        waited = api.http.get("/queue/next/status").json()["waited_seconds"]
        assert 0 <= waited < 60, waited
    # One stream per owner over every host: the one ahead may not take a second, nor end the first.
    with httpx.Client(base_url=leader.base, timeout=30) as first, \
            first.stream("GET", "/jobs/hog/events/stream") as held:  # fmt: skip
        assert held.status_code == 200
        wait_for(lambda: ahead.http.get("/jobs/hog/events/stream", timeout=5).status_code == 429,
                 timeout=10, what="the host ahead to count the stream held elsewhere")  # fmt: skip
        assert leader.http.post("/jobs/hog/stop").status_code == 200
        lines = [line for line in held.iter_lines() if line.startswith("data:")]
        assert any('"stopped"' in line for line in lines), lines[-5:]


async def test_the_clock_counts_on_from_redis_time_and_keeps_its_anchor_while_redis_is_away(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from application.services.clock import Clock

    clock = Clock()
    assert abs(clock.now() - time.time()) < 0.01  # (no reading yet: this host's clock)
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await clock.sync(client)
        seconds, micros = await client.time()
        assert abs(clock.now() - (seconds + micros / 1e6)) < 0.05  # (one host here: the same clock)
        assert abs(clock.from_local(1000.0) - 1000.0) < 0.05
        # One file time is one shared time from read to read, and in every API worker (it moved by microseconds,
        # and each worker's by its own: hunt CP, review CV): on one host, the file's own time.
        assert {clock.from_local(1796528218.3985605) for _ in range(2000)} == {1796528218.3985605}
    finally:
        await client.aclose()
    away = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        anchored = clock.now()
        assert not await clock.sync(away)
        assert 0 <= clock.now() - anchored < 5  # the anchor stands
    finally:
        await away.aclose()


async def test_a_process_started_while_redis_was_away_takes_redis_time_once_it_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its first reading failed, and nothing read again: it stayed on its own clock for good (review, hunt).
    import asyncio

    import redis.asyncio as aioredis

    from application.services import clock as clock_module
    from application.services.embedded_redis import find_redis_server
    from tests.conftest import free_port

    monkeypatch.setattr(clock_module, "RETRY_SECONDS", 0.1)
    clock = clock_module.Clock()
    port = free_port()
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    binary = find_redis_server()
    assert binary
    server: asyncio.subprocess.Process | None = None
    try:
        assert not await clock.sync(client) and not clock.anchored
        argv = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
        server = await asyncio.create_subprocess_exec(binary, *argv, stdout=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not clock.anchored:
            assert time.monotonic() < deadline, "the clock never read Redis's time once Redis answered"
            clock.now()  # (what reads again, in the background, once due)
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
        if server is not None:
            server.kill()
            await server.wait()


def test_a_step_of_redis_clock_mid_run_neither_fires_the_time_limit_early_nor_goes_unsaid(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path
) -> None:
    # Redis's clock stepped an hour ahead mid-run (its host's NTP, a VM resumed): the runner, reading it, stopped a
    # run with a 10-minute limit at once, a step back left one going an hour past it, and nothing said the clock
    # had moved (hunt DT). The limit counts the run's time on the runner's monotonic clock.
    step = tmp_path / "redis-step"
    step.write_text("0")
    server = server_factory(env={"PYTHONPATH": f"{STEPPED}:{ROOT}", "SWIFT_API_TEST_REDIS_STEP_FILE": str(step),
                                 "SWIFT_API_TEST_CLOCK_RESYNC": "0.5"})  # fmt: skip
    r = server.create(**job_body(workspace, "limited", auto_start=True, time_limit=8, hang_after_steps=1))
    assert r.status_code == 201, r.text
    running = server.wait_status("limited", "running")
    began = time.monotonic()
    # (once its runner has read the clock and the log: the step comes mid-run)
    wait_for(lambda: server.job("limited")["progress"]["current_step"], what="the run's first step")
    step.write_text("3600")
    runner_log = Path(running["output_dir"]) / "logs" / "limited.runner.log"
    wait_for(lambda: "Redis's clock moved +3600." in runner_log.read_text(), timeout=15, what="the runner to say")
    server_log = tmp_path / f"server-{server.port}.log"  # (the API's and the scheduler's)
    # (the API reads the clock again when a request asks it the time: a status does)
    wait_for(lambda: server.http.get("/jobs/limited/status").status_code == 200 and
             server_log.read_text().count("Redis's clock moved +3600.") >= 2, what="the API and scheduler")  # fmt: skip
    # Its start moved with the clock: the time its limit leaves is what it was, not 0 (review DU).
    wait_for(lambda: 0 < server.http.get("/jobs/limited/status").json()["time_limit_left_seconds"] < 8,
             timeout=5, what="the run's start to have moved with the clock")  # fmt: skip
    done = server.wait_status("limited", "failed", timeout=30)
    assert done["error_code"] == "time_limit", done
    assert time.monotonic() - began > 5, "the time limit fired at the step"


async def test_a_slow_reading_of_redis_time_is_no_step_of_its_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # An anchor is as good as half its round trip: a first reading slow on a busy loop, then a quick one, was
    # logged as "Redis's clock moved +1.3 s" (review DU).
    import asyncio

    from loguru import logger

    from application.services import clock as clock_module

    class Redis:
        delay = 3.0

        async def time(self) -> tuple[int, int]:
            await asyncio.sleep(self.delay)  # (answered at the end of the round trip)
            now = time.time()
            return int(now), int((now % 1) * 1e6)

    monkeypatch.setattr(clock_module, "SAMPLES", 1)
    said: list[str] = []
    sink = logger.add(lambda m: said.append(str(m)), level="WARNING")
    try:
        clock, client = clock_module.Clock(), Redis()
        assert await clock.sync(client)
        client.delay = 0.0
        assert await clock.sync(client)
    finally:
        logger.remove(sink)
    assert not [m for m in said if "clock moved" in m], said
