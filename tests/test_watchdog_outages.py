"""The scheduler's watchdog through a Redis that fails at an exact moment (a real Redis behind
tests/redis_proxy.py, real processes): a live runner is not judged dead for an outage, an end whose answer was
lost still gets what follows it, and an export launched twice runs once."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from application.config import Settings
from application.models.training_model import Attempt, ExportStatus, JobStatus, RunnerInfo
from application.services import process_group as pg
from application.services.cluster_store import ClusterStore
from application.services.embedded_redis import EmbeddedRedis
from application.services.export_run import RERUN_MARK
from application.services.exports import prepare_export, put_export
from application.services.job_store import JobStore
from application.services.keys import Keys
from application.services.launcher import LocalLauncher
from application.services.redis_service import create_client
from application.services.run_agent import Runner
from application.services.watchdog import Watchdog
from tests.conftest import gated_swift, kill_processes_under, settings_for, until
from tests.redis_proxy import RedisProxy
from tests.test_job_store import make_job, require


@dataclass
class Cut:
    proxy: RedisProxy
    settings: Settings
    keys: Keys
    cut: aioredis.Redis  # through the proxy
    direct: aioredis.Redis

    def store(self, through_proxy: bool = False) -> JobStore:
        return JobStore(self.cut if through_proxy else self.direct, self.keys)

    def watchdog(self, launcher: object, through_proxy: bool = False) -> Watchdog:
        client = self.cut if through_proxy else self.direct
        return Watchdog(JobStore(client, self.keys), ClusterStore(client, self.keys), launcher,  # type: ignore[arg-type]
                        self.settings, fence=lambda: None)  # fmt: skip


@pytest.fixture
async def cut(redis_url: str, tmp_path: Path) -> AsyncIterator[Cut]:
    proxy = RedisProxy(redis_url)
    settings = settings_for(proxy.url, tmp_path, REDIS_RETRIES=0, REDIS_SOCKET_TIMEOUT=1, REDIS_CONNECT_TIMEOUT=1,
                            RUNNER_HEARTBEAT_TTL=1, RUNNER_POLL_INTERVAL=0.1, AUTO_EXPORT=True)  # fmt: skip
    c = Cut(proxy, settings, Keys(settings.REDIS_KEY_PREFIX), create_client(settings, proxy.url),
            aioredis.Redis.from_url(redis_url, decode_responses=True))  # fmt: skip
    try:
        yield c
    finally:
        kill_processes_under(tmp_path)  # a swift export a failed test left waiting
        proxy.close()
        await c.cut.aclose()
        await c.direct.aclose()


async def sweeps(watchdog: Watchdog) -> bool:
    """One sweep; False while Redis is away."""
    try:
        await watchdog.sweep()
    except RedisError:
        return False
    return True


def dead_runner() -> RunnerInfo:
    """A runner of this host that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = pg.process_start_time(proc.pid)
    proc.wait()
    return RunnerInfo(host=socket.gethostname(), pid=proc.pid, start_time=started, launched_at=time.time() - 30)


class Unlaunched(LocalLauncher):
    """This host's launcher, but a launch only says where a runner would be."""

    def __init__(self) -> None:
        super().__init__(os.environ)
        self.launched: list[str | None] = []

    async def launch(self, job_id: str, run_id: str, log_dir: Path, *, export_id: str | None = None,
                     spec: Path | None = None) -> RunnerInfo:  # fmt: skip
        self.launched.append(export_id)
        return RunnerInfo(host="another-host", pid=4000 + len(self.launched), launched_at=time.time())


async def test_a_run_whose_recorded_end_lost_its_answer_still_gets_its_automatic_export(cut: Cut) -> None:
    # Its runner died after swift exited 0 (the exit file says so); the sweep's record of the end is taken by
    # Redis, whose answer is lost: no later sweep sees the run again, so this one must go on.
    store = cut.store()
    output = cut.settings.OUTPUT_ROOT / "k"
    run_dir = output / "v0-20261203-000000"
    (run_dir / "checkpoint-5").mkdir(parents=True)
    (run_dir / "checkpoint-5" / "adapter_config.json").write_text("{}")  # (a LoRA checkpoint: exportable)
    (run_dir / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"weights")
    log = output / "logs" / "k.train.log"
    log.parent.mkdir(parents=True)
    log.write_text("training\n")
    pg.write_exit_file(log.with_suffix(".exit.json"), 0)
    await store.create(make_job("k").model_copy(update={"output_dir": str(output), "log_file": str(log)}),
                       message="created", actor="t")  # fmt: skip
    await store.transition("k", JobStatus.RUNNING, fields={
        "run_id": "run1", "runner": dead_runner(), "run_dir": str(run_dir),
        "attempts": [Attempt(number=1, run_id="run1", started_at=time.time() - 30, run_dir=str(run_dir))],
    })  # fmt: skip
    cut.proxy.cut_after(rb"status_completed", lose_reply=True, down_seconds=1.0)
    launcher = Unlaunched()
    await asyncio.wait_for(cut.watchdog(launcher, through_proxy=True).sweep(), 30)
    assert cut.proxy.fired.is_set()
    job = await require(store, "k")
    assert job.status == JobStatus.COMPLETED
    # Requested, and launched by the same sweep's look at the exports.
    assert job.export.status == ExportStatus.RUNNING and job.export.auto
    assert launcher.launched == [job.export.export_id]
    types = [e.type for e in await store.events("k", None, 100)]
    assert types.count("status_completed") == 1 and types.count("export_started") == 1, types
    assert "export_skipped" not in types, types


async def test_a_runner_on_another_host_is_not_judged_dead_for_a_redis_outage(cut: Cut) -> None:
    store, cluster = cut.store(), ClusterStore(cut.direct, cut.keys)
    run_id = uuid.uuid4().hex
    await store.create(make_job("r"), message="created", actor="t")
    remote = RunnerInfo(host="another-host", pid=4242, launched_at=time.time())
    await store.transition("r", JobStatus.RUNNING, fields={"run_id": run_id, "runner": remote})
    watchdog = cut.watchdog(Unlaunched(), through_proxy=True)
    beat = {"run_id": run_id, "kind": "run", "id": run_id, "host": "another-host", "pid": 4242, "at": time.time()}
    await cluster.runner_tick("r", beat, 1)
    await watchdog.sweep()
    # Redis goes away for longer than the heartbeat's TTL: the runner's key lapses while it cannot beat.
    cut.proxy.cut_after(rb"ZRANGE", lose_reply=True, down_seconds=1.5)
    assert not await sweeps(watchdog)
    silent_since = time.monotonic()
    await until(lambda: sweeps(watchdog))
    assert await cluster.runner_heartbeat("r", run_id) is None
    assert (await require(store, "r")).status == JobStatus.RUNNING  # its silence counts from Redis's return

    async def lost() -> bool:
        await watchdog.sweep()
        return (await require(store, "r")).status != JobStatus.RUNNING

    # One that stays silent is lost once three TTLs have passed since the scheduler first missed it.
    await until(lost, 15)
    job = await require(store, "r")
    assert time.monotonic() - silent_since >= 3 and job.status == JobStatus.FAILED, job.error_message


async def test_a_runner_is_not_judged_hung_while_redis_refuses_writes(own_redis: EmbeddedRedis,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    """A Redis at its maxmemory (noeviction), or with a full disk, answers reads and refuses writes: no runner's
    heartbeat landed, and the watchdog, which only reads, killed every training as hung after 30 s."""
    settings = settings_for(own_redis.url, tmp_path, RUNNER_HEARTBEAT_TTL=1, RUNNER_POLL_INTERVAL=0.1)
    keys = Keys(settings.REDIS_KEY_PREFIX)
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        store, cluster = JobStore(client, keys), ClusterStore(client, keys)
        watchdog = Watchdog(store, cluster, Unlaunched(), settings, fence=lambda: None)
        run_id = uuid.uuid4().hex
        await store.create(make_job("r"), message="created", actor="t")
        remote = RunnerInfo(host="another-host", pid=4242, launched_at=time.time())
        await store.transition("r", JobStatus.RUNNING, fields={"run_id": run_id, "runner": remote})
        beat = {"run_id": run_id, "kind": "run", "id": run_id, "host": "another-host", "pid": 4242, "at": time.time()}
        await cluster.runner_tick("r", beat, 1)
        await watchdog.sweep()
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", "1")
        with pytest.raises(RedisError, match="maxmemory"):
            await cluster.runner_tick("r", beat, 1)  # the runner's beats are refused from now on
        refused_until = time.monotonic() + 3 * settings.RUNNER_HEARTBEAT_TTL + 2
        while time.monotonic() < refused_until:
            assert not await sweeps(watchdog)  # (it says why: Redis refuses writes)
            await asyncio.sleep(0.2)
        await client.config_set("maxmemory", "0")
        await cluster.runner_tick("r", beat, 1)  # beating again
        assert await sweeps(watchdog)
        assert (await require(store, "r")).status == JobStatus.RUNNING
    finally:
        await client.aclose()


class TaskLauncher:
    """Runners as tasks of this process (each its own pid in its record), on another host: a launch that a gate
    may hold back, as a runner waiting for Redis is."""

    pids = itertools.count(5000)

    def __init__(self, cut: Cut, gate: asyncio.Event | None = None) -> None:
        self.cut, self.gate = cut, gate
        self.tasks: list[asyncio.Task[int]] = []
        self.runners: list[RunnerInfo] = []

    async def launch(self, job_id: str, run_id: str, log_dir: Path, *, export_id: str | None = None,
                     spec: Path | None = None) -> RunnerInfo:  # fmt: skip
        runner = Runner(self.cut.settings, self.cut.store(), ClusterStore(self.cut.direct, self.cut.keys), job_id,
                        run_id)  # fmt: skip
        runner.info = runner.info.model_copy(update={"host": "another-host", "pid": next(TaskLauncher.pids)})
        self.runners.append(runner.info)

        async def run() -> int:
            if self.gate is not None:
                await self.gate.wait()
            return await runner.export(export_id or "")

        self.tasks.append(asyncio.create_task(run()))
        return runner.info

    def is_alive(self, runner: RunnerInfo) -> bool | None:
        return None  # another host: its heartbeat tells

    def reap(self) -> None:
        pass

    def forget(self, runner: RunnerInfo) -> None:
        pass

    def exit_status(self, runner: RunnerInfo) -> int | None:
        return None

    def terminate(self, runner: RunnerInfo) -> bool:
        return False

    def kill(self, runner: RunnerInfo) -> bool:
        return False

    def outlived(self, runner: RunnerInfo) -> bool:
        return False


async def test_an_export_launched_again_after_its_record_was_lost_runs_once(cut: Cut, tmp_path: Path) -> None:
    wrapper, swift_gate = gated_swift(tmp_path)
    cut.settings.SWIFT_BIN = str(wrapper)
    store = cut.store()
    output = cut.settings.OUTPUT_ROOT / "x"
    run_dir = output / "v0-20261203-000000"
    (run_dir / "checkpoint-5").mkdir(parents=True)
    (run_dir / "checkpoint-5" / "adapter_config.json").write_text("{}")  # (a LoRA checkpoint: exportable)
    (run_dir / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"weights")
    await store.create(make_job("x", JobStatus.COMPLETED).model_copy(update={
        "run_id": "run1", "output_dir": str(output), "run_dir": str(run_dir), "finished_at": time.time(),
    }), message="created", actor="t")  # fmt: skip
    info = await asyncio.to_thread(prepare_export, await require(store, "x"), cut.settings, auto=False)
    await put_export(store, "x", info, exporting=True)
    # The leader launches a runner (held back, as by a Redis that is away), and Redis fails as it records it.
    held = asyncio.Event()
    first = TaskLauncher(cut, held)
    leader = cut.watchdog(first, through_proxy=True)
    cut.proxy.cut_after(rb"(?s)HMGET.{0,200}export", lose_reply=True, down_seconds=1.0)
    assert not await sweeps(leader)
    assert cut.proxy.fired.is_set() and len(first.runners) == 1
    assert (await require(store, "x")).export.runner is None
    # Its next sweeps leave the launched runner time to take the export itself.
    await until(lambda: sweeps(leader))
    assert len(first.runners) == 1
    # Another scheduler, taking over, launches one again; it takes the export and runs swift.
    second = TaskLauncher(cut)
    await cut.watchdog(second).sweep()
    assert len(second.runners) == 1
    await until(lambda: _running_swift(store))
    # The first runner comes to it at last: taken by another runner, it leaves without running swift.
    held.set()
    assert await asyncio.wait_for(first.tasks[0], 30) == 0
    swift_gate.touch()
    assert await asyncio.wait_for(second.tasks[0], 30) == 0
    job = await require(store, "x")
    assert job.export.status == ExportStatus.COMPLETED and job.export.runner is not None
    assert job.export.runner.is_process(second.runners[0])
    log = Path(job.export.log_file or "").read_bytes()
    assert RERUN_MARK not in log and log.count(b"gated-swift: waiting for the gate") == 1
    types = [e.type for e in await store.events("x", None, 100)]
    assert types.count("export_completed") == 1 and "export_failed" not in types, types


async def _running_swift(store: JobStore) -> bool:
    job = await store.get("x")
    return job is not None and job.export.pid is not None


async def test_redis_refusing_writes_is_said_once_a_minute_and_its_503_names_no_script(
    own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    """A sweep every half second logged "watchdog sweep failed: Redis refuses writes" 7,200 times an hour, and the
    503 a refused write answered carried our script's hash and line (hunt CI)."""
    import httpx
    from loguru import logger

    from application import scheduler_process
    from application.main import create_app
    from application.scheduler_process import _log_failure

    scheduler_process._OUTAGES.last.clear()  # (what earlier tests in this process said)
    settings = settings_for(own_redis.url, tmp_path)
    app = create_app(settings)
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    warned: list[str] = []
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/api/v1/training") as http,
        ):
            # (after the app's start, which sets the log's sinks up anew)
            sink = logger.add(lambda m: warned.append(str(m)), level="WARNING", format="{message}")
            body = {"data_path": "org/data", "model_path": "org/model", "output_dir": "o", "num_gpus": 0}
            assert (await http.post("/jobs", json=body)).status_code == 201
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", "1")
            r = await http.patch("/jobs/o", json={"priority": 9})
            assert r.status_code == 503 and "maxmemory" in r.json()["detail"], r.text
            assert "script" not in r.json()["detail"], r.text
            with pytest.raises(RedisError) as caught:
                await client.set(f"{settings.REDIS_KEY_PREFIX}:probe", "x")
            refused = caught.value
            for _ in range(5):
                _log_failure("watchdog sweep failed", refused)
            _log_failure("queue pass failed", refused)  # (another kind: said at once)
            await client.config_set("maxmemory", "0")
            logger.remove(sink)
    finally:
        await client.aclose()
    said = [w for w in warned if "Redis refuses writes" in w]
    assert [w.split(":", 1)[0] for w in said] == ["watchdog sweep failed", "queue pass failed"], said
