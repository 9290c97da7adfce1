"""A runner's automatic export when Redis loses the answer to its record (a real Redis behind tests/redis_proxy.py,
the fake swift): the record Redis took stands, run by whom it names, and no skip that never happened is told."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from application.models.training_model import Attempt, ExportStatus, JobStatus
from application.services import process_group as pg
from application.services import run_agent
from application.services.cluster_store import ClusterStore
from application.services.job_store import JobStore
from application.services.keys import Keys
from application.services.redis_service import create_client
from application.services.run_agent import Runner
from tests.conftest import _until, kill_processes_under, settings_for
from tests.redis_proxy import RedisProxy
from tests.test_job_store import make_job, require


@pytest.fixture
async def completed(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[RedisProxy, Runner, JobStore]]:
    """A LoRA run that completed with a checkpoint on disk; its runner, whose Redis is behind a proxy; a store
    straight to Redis."""
    proxy = RedisProxy(redis_url)
    settings = settings_for(proxy.url, tmp_path, REDIS_RETRIES=0, REDIS_SOCKET_TIMEOUT=1, REDIS_CONNECT_TIMEOUT=1)
    keys = Keys(settings.REDIS_KEY_PREFIX)
    runners, direct = create_client(settings, proxy.url), aioredis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(direct, keys)
    output = settings.OUTPUT_ROOT / "j"
    run_dir = output / "v0-20261203-000000"
    (run_dir / "checkpoint-5").mkdir(parents=True)
    (run_dir / "checkpoint-5" / "adapter_config.json").write_text("{}")  # (a LoRA checkpoint: exportable)
    (run_dir / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"weights")
    now = time.time()
    job = make_job("j", JobStatus.COMPLETED).model_copy(update={
        "run_id": "run1", "output_dir": str(output), "run_dir": str(run_dir), "finished_at": now,
        "last_checkpoint": str(run_dir / "checkpoint-5"),
        "attempts": [Attempt(number=1, run_id="run1", started_at=now - 60, finished_at=now, outcome="completed",
                             run_dir=str(run_dir))],
    })  # fmt: skip
    await store.create(job, message="created", actor="t")
    try:
        yield proxy, Runner(settings, JobStore(runners, keys), ClusterStore(runners, keys), "j", "run1"), store
    finally:
        kill_processes_under(tmp_path)  # a swift export a failed test left waiting
        proxy.close()
        await runners.aclose()
        await direct.aclose()


async def event_types(store: JobStore) -> list[str]:
    return [e.type for e in await store.events("j", None, 100)]


async def test_an_export_left_to_the_next_scheduler_whose_record_lost_its_answer_is_not_told_skipped(
    completed: tuple[RedisProxy, Runner, JobStore],
) -> None:
    proxy, runner, store = completed
    runner.terminated.set()  # its host goes down: the export is requested, for a scheduler to run
    proxy.cut_after(rb"export_started", lose_reply=True, down_seconds=1.0)
    await asyncio.wait_for(runner._auto_export(here=True), 30)
    assert proxy.fired.is_set()
    job = await require(store, "j")
    assert job.export.status == ExportStatus.RUNNING and job.export.auto and job.export.runner is None
    events = await event_types(store)
    assert events.count("export_started") == 1 and "export_skipped" not in events, events


async def test_an_export_whose_runner_is_told_to_end_while_redis_is_away_is_left_to_the_next_scheduler(
    completed: tuple[RedisProxy, Runner, JobStore],
) -> None:
    proxy, runner, store = completed
    proxy.cut_after(rb"export_started", lose_reply=True, down_seconds=1.0)
    exporting = asyncio.create_task(runner._auto_export(here=True))
    await _until(proxy.fired.is_set)  # Redis took the export as this runner's, and its answer is lost
    runner.terminated.set()  # then its host goes down, while it waits for Redis to come back
    await asyncio.wait_for(exporting, 30)
    job = await require(store, "j")
    assert job.export.status == ExportStatus.RUNNING and job.export.runner is None  # a scheduler's to run again
    assert job.export.command is not None and job.export.command[-2:] == ["--exist_ok", "true"]
    events = await event_types(store)
    assert events.count("export_started") == 1 and "export_skipped" not in events, events
    assert "export_interrupted" in events


async def test_an_export_whose_end_redis_took_but_whose_answer_was_lost_ends_once(
    completed: tuple[RedisProxy, Runner, JobStore],
) -> None:
    proxy, runner, store = completed
    proxy.cut_after(rb"export_completed", lose_reply=True, down_seconds=1.0)
    await asyncio.wait_for(runner._auto_export(here=True), 60)
    assert proxy.fired.is_set()
    job = await require(store, "j")
    assert job.export.status == ExportStatus.COMPLETED and job.export.path, job.export
    events = await event_types(store)
    assert events.count("export_completed") == 1 and events.count("export_started") == 1, events


async def test_a_runner_whose_redis_is_away_at_its_start_waits_for_it_while_swift_runs(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # swift starts from the launch spec before the runner reads Redis: a runner that gave up after
    # START_ATTEMPTS_SECONDS died, swift trained on unwatched, and its end (exit 0) was recorded as a lost runner.
    monkeypatch.setattr(run_agent, "START_ATTEMPTS_SECONDS", 0.2)
    proxy = RedisProxy(redis_url)
    settings = settings_for(proxy.url, tmp_path, REDIS_RETRIES=0, REDIS_SOCKET_TIMEOUT=1, REDIS_CONNECT_TIMEOUT=1,
                            AUTO_EXPORT=False)  # fmt: skip
    keys = Keys(settings.REDIS_KEY_PREFIX)
    runners, direct = create_client(settings, proxy.url), aioredis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(direct, keys)
    try:
        for run_id, told_to_end in (("run-waits", False), ("run-ended", True)):
            output = settings.OUTPUT_ROOT / run_id
            log_file = output / "logs" / "s.train.log"
            log_file.parent.mkdir(parents=True)
            command = ["sh", "-c", "echo trained; exit 0" if not told_to_end else "sleep 60"]
            job = make_job(run_id, JobStatus.RUNNING).model_copy(update={
                "run_id": run_id, "output_dir": str(output), "log_file": str(log_file), "command": command,
                "started_at": time.time(), "attempts": [Attempt(number=1, run_id=run_id, started_at=time.time())],
            })  # fmt: skip
            await store.create(job, message="created", actor="t")
            proxy.down_for(3.0)
            swift = pg.Child(pg.spawn(command, {**os.environ, pg.RUN_MARK: run_id}, output, log_file))
            runner = Runner(settings, JobStore(runners, keys), ClusterStore(runners, keys), run_id, run_id)
            training = asyncio.create_task(runner.train(swift))
            if told_to_end:  # (its host going down before Redis is back: swift stopped, not left unwatched)
                runner.terminated.set()
                assert await asyncio.wait_for(training, 30) == 1 and swift.returncode is not None
                assert (await require(store, run_id)).status == JobStatus.RUNNING  # for the watchdog to record
            else:
                await asyncio.wait_for(training, 30)
                done = await require(store, run_id)
                assert done.status == JobStatus.COMPLETED and done.exit_code == 0, done
    finally:
        kill_processes_under(tmp_path)
        proxy.close()
        await runners.aclose()
        await direct.aclose()


async def test_a_runner_whose_reading_of_the_run_fails_ends_only_once_the_marked_scan_is_done(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scan for marked leftovers goes out beside read_run: read_run failing must not end the runner (its
    # heartbeats dropped, its Redis closed) while the scan still runs.
    done: list[str] = []

    def failing_read(*_: object) -> None:
        raise RuntimeError("unreadable run")

    def slow_kill(run: str, *_: object) -> None:
        time.sleep(0.5)
        done.append(run)

    monkeypatch.setattr(run_agent, "read_run", failing_read)
    monkeypatch.setattr(pg, "kill_marked", slow_kill)
    settings = settings_for(redis_url, tmp_path, AUTO_EXPORT=False)
    keys = Keys(settings.REDIS_KEY_PREFIX)
    client = create_client(settings, redis_url)
    store = JobStore(client, keys)
    try:
        output = settings.OUTPUT_ROOT / "r"
        log_file = output / "logs" / "s.train.log"
        log_file.parent.mkdir(parents=True)
        command = ["sh", "-c", "echo trained; exit 0"]
        job = make_job("r", JobStatus.RUNNING).model_copy(update={
            "run_id": "r", "output_dir": str(output), "log_file": str(log_file), "command": command,
            "started_at": time.time(), "attempts": [Attempt(number=1, run_id="r", started_at=time.time())],
        })  # fmt: skip
        await store.create(job, message="created", actor="t")
        swift = pg.Child(pg.spawn(command, {**os.environ, pg.RUN_MARK: "r"}, output, log_file))
        with pytest.raises(RuntimeError, match="unreadable run"):
            await asyncio.wait_for(Runner(settings, store, ClusterStore(client, keys), "r", "r").train(swift), 30)
        assert done == ["r"]
    finally:
        kill_processes_under(tmp_path)
        await client.aclose()
