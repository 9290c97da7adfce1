"""One scheduler leads, others stand by: failover within seconds, and never two starts of one job or GPU."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import redis
import redis.asyncio as aioredis
from loguru import logger

from application.models.training_model import JobStatus
from application.scheduler_process import cancel
from application.services.cluster_store import ClusterStore
from application.services.embedded_redis import EmbeddedRedis
from application.services.job_store import JobStore, Refusal, TransitionRefused
from application.services.keys import Keys
from application.services.leader import LeaderLock
from tests.conftest import ROOT, ApiServer, gone, job_body, wait_for, wait_job
from tests.test_api_queue import GpuChecker, assert_all_ran_without_sharing, burst, create, hold
from tests.test_job_store import make_job
from tests.test_runner import running

T = TypeVar("T")


def scheduler_of(server: ApiServer) -> psutil.Process:
    return server.schedulers()[0]


def leader_id(server: ApiServer) -> str:
    return str(server.http.get("/health").json()["scheduler"]["leader"])


def standby(server: ApiServer) -> subprocess.Popen[bytes]:
    """Another scheduler on the same store (as on a second host): `python start.py scheduler`."""
    with open(server.workdir / "standby.log", "ab") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "start.py"), "scheduler"], cwd=ROOT, env=server.env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


async def test_only_the_leaders_fence_starts_a_run(redis_client: aioredis.Redis) -> None:
    keys = Keys("t")
    store, cluster = JobStore(redis_client, keys), ClusterStore(redis_client, keys)
    first = await cluster.acquire_leadership("a", ttl=5)
    assert first and await cluster.acquire_leadership("b", ttl=5) is None
    await store.create(make_job("j", JobStatus.QUEUED), message="", actor="t")
    await redis_client.delete(keys.leader)  # a's lock expired while it stalled...
    second = await cluster.acquire_leadership("b", ttl=5)
    assert second and int(second.split(":")[0]) > int(first.split(":")[0])  # ...and b leads with a newer token
    with pytest.raises(TransitionRefused) as exc:
        await store.transition("j", JobStatus.RUNNING, acquire_gpus=[0], fence=first)  # a wakes up: refused
    assert exc.value.reason == Refusal.NOT_LEADER and await store.leases() == {}
    assert not await cluster.renew_leadership(first, ttl=5)
    await store.transition("j", JobStatus.RUNNING, acquire_gpus=[0], fence=second)
    assert await store.leases() == {0: "j"}
    # b's next acquire after its reply was lost (a timeout, Redis ran it anyway): it takes back its own lock,
    # token and all, instead of waiting out a TTL with no leader; a takes nothing.
    assert await cluster.acquire_leadership("b", ttl=5) == second and await cluster.acquire_leadership("a", 5) is None


def _stall_until_gone(sync: redis.Redis, key: str, then: Callable[[], object] | None = None) -> None:
    """Block this event loop (as a loaded host does) until the leader lock has expired in Redis, then run `then`
    while it is still blocked, before the leader's renewal can run again."""
    deadline = time.monotonic() + 10
    while sync.exists(key):
        assert time.monotonic() < deadline, "the lock never expired"
        time.sleep(0.01)
    if then is not None:
        then()


async def _kept_until_lost(lock: LeaderLock, sync: redis.Redis, key: str,
                           then: Callable[[], object] | None = None) -> str:  # fmt: skip
    await lock.wait_for_leadership()
    keeping = asyncio.create_task(lock.keep())
    await asyncio.sleep(0)  # the renewal loop started (waiting for its first renewal), then stalled with this loop
    _stall_until_gone(sync, key, then)
    await asyncio.wait_for(keeping, timeout=10)
    assert lock.lost.is_set() and not lock.leading and lock.lost_reason is not None
    return lock.lost_reason


async def test_a_lock_that_expired_under_load_is_not_reported_as_taken_by_another_scheduler(
    redis_client: aioredis.Redis, redis_sync: redis.Redis, redis_url: str
) -> None:
    # A single scheduler whose renewal came late logged "another scheduler holds the lock": operators went looking
    # for a second scheduler that did not exist.
    keys = Keys("t")
    lock = LeaderLock(ClusterStore(redis_client, keys), "alone", ttl=0.3)
    reason = await _kept_until_lost(lock, redis_sync, keys.leader)
    assert reason.startswith("the lock expired") and "no scheduler holds it" in reason, reason
    since, late = (float(reason.split(f" s {word}")[0].rsplit(" ", 1)[1]) for word in ("after", "past"))
    assert since >= 0.3 and late >= 0 and abs(since - 0.3 - late) < 0.002, reason  # how late the renewal came

    async def take() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await LeaderLock(ClusterStore(client, keys), "elsewhere:7:1", ttl=5).wait_for_leadership()
        finally:
            await client.aclose()

    def another_scheduler_takes_it() -> None:  # (its own loop: this one is stalled)
        taker = threading.Thread(target=asyncio.run, args=(take(),))
        taker.start()
        taker.join(10)

    reason = await _kept_until_lost(lock, redis_sync, keys.leader, then=another_scheduler_takes_it)
    assert reason.startswith("another scheduler holds the lock (elsewhere:7:1, fencing token 3)"), reason


async def test_an_error_redis_answers_at_once_is_logged_once_while_standing_by(redis_url: str) -> None:
    # A db index Redis does not have is refused at once: "Redis does not answer" every 0.2 s filled the log.

    said: list[str] = []
    sink = logger.add(lambda m: said.append(str(m)), level="WARNING", format="{message}")
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    client.connection_pool.connection_kwargs["db"] = 9999  # (the test Redis may be a TCP port or a socket)
    try:
        lock = LeaderLock(ClusterStore(client, Keys("db-out-of-range")), "standby", ttl=3)
        standing_by = asyncio.create_task(lock.wait_for_leadership(poll=0.05))
        await asyncio.wait([standing_by], timeout=1.0)  # twenty tries and more
        assert not standing_by.done()
        # As the scheduler does: redis-py can swallow one cancellation that lands in its connect (a CI run hung
        # in asyncio.wait_for here for two minutes).
        await cancel([standing_by])
    finally:
        logger.remove(sink)
        await client.aclose()
    assert len([m for m in said if "still standing by" in m]) == 1 and "DB index is out of range" in said[0], said


def test_a_standby_leads_within_five_seconds_of_the_leaders_death(server: ApiServer, workspace: Path) -> None:
    spare = standby(server)
    try:
        old = leader_id(server)
        hold(server, workspace, "h0")
        hold(server, workspace, "h1")
        assert create(server, workspace, "waiting", hang_after_steps=1)["status"] == "queued"
        scheduler_of(server).send_signal(signal.SIGKILL)
        died = time.monotonic()
        # The runners need no scheduler to stop their runs: a GPU frees at once, and the standby must use it.
        assert server.http.post("/jobs/h0/stop").json()["status"] == "stopped"
        started = server.wait_status("waiting", "running", timeout=15)
        took = time.monotonic() - died
        assert took < 5.0, f"the queued job started {took:.1f} s after the leader died"
        assert leader_id(server) != old and started["scheduled_by"] != old
    finally:
        spare.send_signal(signal.SIGTERM)
        spare.wait(20)


def test_after_redis_lost_the_lock_no_run_starts_until_runs_it_may_have_forgotten_have_ended(
    server_factory: Callable[..., ApiServer], workspace: Path, redis_url: str
) -> None:
    # Redis back from an older snapshot showed a running job's GPU free and the job queued again, while its runner,
    # finding its run no longer recorded, was still stopping swift: the scheduler took the lead at once and
    # started a second run on that GPU (a hunt with Redis rolled back). Losing the lock that way, it now waits.
    server = server_factory(env={"STOP_GRACE_SECONDS": "3"})
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        key = Keys(server.prefix).leader
        first = wait_for(lambda: sync.get(key), what="a leader")
        sync.delete(key)  # (as a Redis restarted from a snapshot taken before this lock was written)
        wait_for(lambda: (v := sync.get(key)) and v != first, what="the lead taken again")
        retaken = time.time()
        create(server, workspace, "after", auto_start=True, training={"max_steps": 2})
        job = server.wait_status("after", "completed", timeout=30)
        assert job["started_at"] - retaken >= 3.0, job["started_at"] - retaken  # (the stop grace at least)
    finally:
        sync.close()


async def test_a_redis_restart_is_told_by_its_run_id_and_a_stored_state_without_one_counts_as_one(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    keys = Keys("t")
    cluster, store = ClusterStore(redis_client, keys), JobStore(redis_client, keys)

    async def restarted() -> bool:
        return (await cluster.restart_hold("held for a test", 30))[0]

    assert await restarted() is False  # a new deployment: nothing to forget
    assert await restarted() is False  # the same Redis
    assert await redis_client.get(keys.redis_run) == (await redis_client.info("server"))["run_id"]
    assert await cluster.starts_held() == (0.0, "")
    await redis_client.set(keys.redis_run, "another-redis")
    assert await restarted() is True and await restarted() is False
    # The hold is in Redis with the run_id's record, for any leader that asks next (it was written after the run_id
    # was recorded: one write that failed lost it for a standby).
    left, why = await cluster.starts_held()
    assert 25 < left <= 30 and why == "held for a test"
    again, left_now, why_now = await cluster.restart_hold("another", 30)  # (the same Redis: told, not held anew)
    assert again is False and 20 < left_now <= left and why_now == "held for a test"
    await redis_client.delete(keys.starts_held)
    # A new deployment whose first job was created before the scheduler's first look: nothing to forget (it
    # waited out a hold, told "Redis restarted": hunt CW).
    await store.create(make_job("new", JobStatus.QUEUED), message="", actor="t")
    await redis_client.delete(keys.redis_run)
    assert await restarted() is False
    # Restored from a snapshot taken before run_ids were recorded (an upgrade, then a restore): jobs of before, no
    # run_id (a hunt: the new leader started a second run on a GPU an orphan still held); or new ones but one runs.
    await store.create(make_job("j", JobStatus.QUEUED, created=time.time() - 3600), message="", actor="t")
    await redis_client.delete(keys.redis_run)
    assert await restarted() is True and await restarted() is False
    await store.delete("j", [], actor="t")
    await store.create(make_job("r", JobStatus.RUNNING), message="", actor="t")
    await redis_client.delete(keys.redis_run)
    assert await restarted() is True
    # A Redis user without INFO's right: no restart can be told (none is, and nothing is recorded).
    await redis_client.delete(keys.redis_run, keys.starts_held)
    user = f"no-info-{os.getpid()}"
    await redis_client.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                                   commands=["+@all", "-info"])  # fmt: skip
    limited = aioredis.Redis.from_url(redis_url, username=user, password="pw", decode_responses=True)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            await limited.info("server")
        assert await ClusterStore(limited, keys).restart_hold("held", 30) == (False, 0.0, "")
        assert await redis_client.get(keys.redis_run) is None
    finally:
        await limited.aclose()
        await redis_client.acl_deluser(user)


def test_a_scheduler_that_leads_after_redis_restarted_starts_nothing_until_forgotten_runs_have_ended(
    server_factory: Callable[..., ApiServer], own_redis: EmbeddedRedis, workspace: Path
) -> None:
    # Redis back from a snapshot that still held this scheduler's lock (or a standby taking the lead after Redis
    # restarted) has no lost lock to go by: Redis's run_id tells it. A Redis that kept everything cannot be told
    # from one back from a snapshot (review).
    server = server_factory(env={"REDIS_URL": own_redis.url, "STOP_GRACE_SECONDS": "3"})
    sync = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        create(server, workspace, "before", auto_start=True, training={"max_steps": 2})
        server.wait_status("before", "completed", timeout=30)  # (no hold on a new deployment's first lead)
        own_redis.stop()
        own_redis.start()
        back = time.time()
        # A scheduler that leads next (a standby, or this one started again) keeps the hold (review).
        wait_for(lambda: sync.exists(Keys(server.prefix).starts_held), what="the hold")
        scheduler_of(server).send_signal(signal.SIGKILL)
        create(server, workspace, "after", auto_start=True, training={"max_steps": 2})
        job = server.wait_status("after", "completed", timeout=40)
        assert job["started_at"] - back >= 3.0, job["started_at"] - back  # (the stop grace at least)
        said = server.http.get("/queue/processor/status").json()
        assert "Redis restarted since the scheduler last looked" in json.dumps(said), said
    finally:
        sync.close()


def hanging_run(server_factory: Callable[..., ApiServer], own_redis: EmbeddedRedis, workspace: Path, name: str,
                grace: float) -> tuple[ApiServer, dict[str, Any]]:  # fmt: skip
    """A server on `own_redis` (one GPU) running job `name`, whose trainer hangs after a step and ignores SIGTERM
    (it holds the GPU until `grace` has passed), and the job once its runner is recorded."""
    env = {"REDIS_URL": own_redis.url, "STOP_GRACE_SECONDS": f"{grace:g}", "SIMULATED_GPUS": "1x80"}
    server = server_factory(env=env)
    create(server, workspace, name, auto_start=True, hang_after_steps=1, ignore_sigterm=True)
    return server, wait_for(lambda: (j := server.job(name))["pid"] and j["runner"] and j, what="the run")


def test_a_scheduler_started_on_a_redis_that_lost_everything_waits_for_the_runs_it_does_not_know(
    server_factory: Callable[..., ApiServer], own_redis: EmbeddedRedis, workspace: Path
) -> None:
    # start.py stopped (its runners go on), Redis back empty, start.py started again: the new leader had no lost
    # lock and no Redis run_id to go by, and started a run at once on the GPU an orphaned run still held (hunt BU).
    first, job = hanging_run(server_factory, own_redis, workspace, "orphan", grace=8)
    runner = job["runner"]["pid"]
    first.stop()
    sync = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        sync.flushall()  # (as a Redis that kept nothing across its restart)
        again = server_factory(env={"REDIS_URL": own_redis.url, "STOP_GRACE_SECONDS": "8", "SIMULATED_GPUS": "1x80"},
                               prefix=first.prefix)  # fmt: skip
        if gone(runner):
            pytest.fail("the orphaned runner ended before the new scheduler led: too slow a machine to tell")
        create(again, workspace, "next", auto_start=True, training={"max_steps": 2})
        said = again.http.get("/queue/processor/status").json()
        assert "runs Redis does not know still end on this host (orphan)" in json.dumps(said), said
        ended = wait_for(lambda: gone(runner) and time.time(), timeout=30, what="the orphan's end")
        job = again.wait_status("next", "completed", timeout=40)
        assert job["started_at"] >= ended - 0.5, (job["started_at"], ended)  # (its GPU: not while the orphan held it)
    finally:
        sync.close()


def test_a_leader_whose_redis_was_flushed_names_the_runs_it_no_longer_knows(
    server_factory: Callable[..., ApiServer], own_redis: EmbeddedRedis, workspace: Path
) -> None:
    # Redis flushed under a running server: the hold said only "Redis lost the lead's lock", and the runs being
    # ended (whose jobs the API no longer shows) were named nowhere in the server's log (hunt CR).
    server, job = hanging_run(server_factory, own_redis, workspace, "flushed", grace=8)
    sync = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        sync.flushall()
        log = server.workdir / f"server-{server.port}.log"
        said = wait_for(lambda: "runs Redis does not know still end on this host (flushed)" in
                        (text := log.read_text(errors="replace")) and text, what="the hold naming the run")  # fmt: skip
        assert "Redis lost the lead's lock; runs Redis does not know" in said
        # The runner's own log says why it stops the run (it said "orphaned", at INFO: hunt CW).
        runner_log = Path(job["log_file"]).parent / "flushed.runner.log"
        wait_for(lambda: "Redis records no such job" in runner_log.read_text(errors="replace"), what="the runner's why")
    finally:
        sync.close()


def test_no_run_starts_on_a_gpu_while_a_runner_that_has_not_noticed_the_loss_of_its_record_lives(
    server_factory: Callable[..., ApiServer], own_redis: EmbeddedRedis, workspace: Path
) -> None:
    # A runner whose Redis connection hung learned of a flush a socket timeout after the scheduler: the hold's time
    # was up while its swift was still in its stop grace, and the next run shared the GPU for 1.4 s (hunt CT). A
    # stopped runner (SIGSTOP) is one that has not noticed, for as long as the test wants.
    server, job = hanging_run(server_factory, own_redis, workspace, "first", grace=2)
    runner, trainer = psutil.Process(job["runner"]["pid"]), job["pid"]
    sync = redis.Redis.from_url(own_redis.url, decode_responses=True)
    runner.send_signal(signal.SIGSTOP)
    try:
        sync.flushall()
        flushed = time.monotonic()
        create(server, workspace, "next", auto_start=True, training={"max_steps": 2})

        # Past the hold's own time (2 + 2 x 0.5 + 1 s): still held, for the run this host still has.
        def held() -> str | None:
            said = json.dumps(server.http.get("/queue/processor/status").json())
            return said if "still end on this host (first)" in said else None

        said = wait_for(held, timeout=30, what="the hold naming the run")
        while time.monotonic() - flushed < 8:
            assert server.job("next")["status"] == "queued", said
            time.sleep(0.2)
        assert psutil.pid_exists(trainer)
    finally:
        runner.send_signal(signal.SIGCONT)
        sync.close()
    ended = wait_for(lambda: gone(trainer) and time.time(), timeout=30, what="the first run's end")
    started = server.wait_status("next", "completed", timeout=40)["started_at"]
    assert started >= ended - 0.5, (started, ended)  # (not while the first run's swift lived)


async def test_a_job_that_waits_out_a_start_hold_is_told_why_though_the_gpus_look_free(
    app_factory: Callable[..., Any], workspace: Path
) -> None:
    # It was told "No free GPUs now" with no reason, and /queue showed both GPUs free with nothing held.
    why = "no run starts until 12:00:00: Redis restarted since the scheduler last looked, and runs it may have " \
          "forgotten must end first"  # fmt: skip
    async with app_factory() as client:
        held_at = time.time()
        await client.scheduler.cluster.hold_starts(why, 8)  # (as a leader that saw Redis restart sets it)
        r = await client.post("/jobs", json=job_body(workspace, "held", auto_start=True, num_gpus=2,
                                                     training={"max_steps": 2}))  # fmt: skip
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["status"] == "queued", created
        assert created["pending_reason"]["code"] == "processor_stopped" and created["pending_reason"]["message"] == why
        assert created["message"] == f"The job was added to the GPU queue: {why}"
        queue = (await client.get("/queue")).json()
        assert queue["summary"]["starts_held"] == why and queue["summary"]["free_gpus"] == 2, queue
        assert queue["summary"]["processor_running"] is True  # (its switch: the hold ends by itself)
        assert queue["entries"][0]["pending_reason"]["message"] == why
        assert (await client.get("/queue/held/status")).json()["pending_reason"]["message"] == why
        # Created behind it (the create's own answer, from what it read in one round trip):
        after = (await client.post("/jobs", json=job_body(workspace, "after", training={"max_steps": 2}))).json()
        assert after["status"] == "queued" and after["pending_reason"]["message"] == why, after
        job = await wait_job(client, "held", lambda j: j["status"] == "completed", timeout=40)
        assert job["started_at"] >= held_at + 7.5, job["started_at"] - held_at  # (after the hold, not before)
        assert (await client.get("/queue")).json()["summary"]["starts_held"] is None


def test_a_scheduler_that_dies_is_started_again_and_the_runs_go_on(server: ApiServer, workspace: Path) -> None:
    # In a container, the end of `start.py scheduler` would end the container and every runner in it.
    job = running(server, workspace, "on", min_step=3, step_seconds=0.1, training={"max_steps": 60})
    keeper, old = server.scheduler_keeper(), scheduler_of(server)
    old.send_signal(signal.SIGKILL)
    new = wait_for(lambda: [p for p in server.schedulers() if p.pid != old.pid], timeout=15, what="another one")[0]
    assert new.ppid() == keeper.pid and keeper.is_running()
    # The keeper start.py all starts imports nothing of the server's (its checks were start.py's): it held 52 MB
    # and took 0.45 s of CPU at each start, now 13 MB and 0.02 s.
    assert keeper.memory_info().rss < 30 * 2**20, keeper.memory_info()
    wait_for(lambda: str(new.pid) in leader_id(server), timeout=15, what="the new scheduler to lead")
    assert psutil.Process(job["runner"]["pid"]).is_running()  # the run never noticed
    done = server.wait_status("on", "completed", "failed", timeout=60)
    assert done["status"] == "completed" and len(done["attempts"]) == 1, done["error_message"]


def test_two_schedulers_through_a_failover_never_share_a_job_or_a_gpu(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path
) -> None:
    first = server_factory(env={"AUTO_EXPORT": "false"})
    second = server_factory(env={"AUTO_EXPORT": "false"}, prefix=first.prefix, workdir=tmp_path)
    bodies = burst(workspace, 14, seed=5)
    checker = GpuChecker([first, second])
    checker.start()
    for i, b in enumerate(bodies):
        assert (first if i % 2 else second).create(**b).status_code == 201
        if i == 6:  # mid-burst, kill the leading scheduler: the other takes over
            leader = leader_id(first)
            victim = next(s for s in (first, second) if str(scheduler_of(s).pid) in leader)
            scheduler_of(victim).send_signal(signal.SIGKILL)
    assert_all_ran_without_sharing(first, bodies, checker)
    for b in bodies:
        events = [e["type"] for e in first.http.get(f"/jobs/{b['job_id']}/events").json()["events"]]
        assert events.count("status_running") == 1, (b["job_id"], events)
    assert len({first.job(b["job_id"])["scheduled_by"] for b in bodies}) == 2  # both led, one after the other
    assert os.path.exists(first.workdir)
    wait_for(lambda: leader_id(second) != "None", what="a leader after the failover")


async def test_the_ms_swift_facts_are_published_once_redis_answers(tmp_path: Path) -> None:
    # A scheduler that starts while Redis is down tried once: /health said "not known yet" and every create
    # naming an extra swift argument was 503 "try again shortly" for good.

    from application.scheduler_process import Scheduler
    from application.services.embedded_redis import EmbeddedRedis, find_redis_server
    from application.services.redis_service import RedisService
    from tests.conftest import _until, seed_swift_probe, settings_for

    folder = tmp_path / "later"
    settings = settings_for(f"unix://{folder}/redis.sock?db=0", tmp_path, REDIS_SOCKET_TIMEOUT=1)
    seed_swift_probe(tmp_path)  # the probe of ms-swift, as a real one printed it
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(str(m)), level="WARNING")
    redis = RedisService(settings)
    await redis.connect()
    binary = find_redis_server()
    assert binary
    server = EmbeddedRedis(folder, binary)
    try:
        scheduler = Scheduler(settings, redis)
        scheduler.swift_facts_check = 0.2
        publish = asyncio.create_task(scheduler._publish_swift())
        await _until(lambda: any("could not publish the ms-swift facts" in m for m in seen), timeout=60)
        server.start()  # Redis comes up after the first try failed
        facts = await wait_value(scheduler.cluster.swift_info, 60)
        assert facts.get("found") is True and facts.get("probed") is True, facts
        # SWIFT_VERSION names the version the probe found: /health says where it came from (it said "detected").
        assert (facts["version"], facts["version_source"]) == ("4.6.0", "setting"), facts
        # A Redis that lost its data: the facts are published again (creates naming ms-swift arguments were
        # refused until a scheduler restarted).
        await scheduler.cluster.r.flushdb()
        assert await wait_value(scheduler.cluster.swift_info, 30) == facts
    finally:
        publish.cancel()
        logger.remove(sink)
        await redis.close()
        server.stop()


async def wait_value(read: Callable[[], Awaitable[T | None]], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while (value := await read()) is None:
        assert time.monotonic() < deadline, "no value in time"
        await asyncio.sleep(0.1)
    return value


async def until_requests(client: Any, count: int, timeout: float = 10.0) -> None:
    """Until `count` manual pass requests wait in the list."""
    deadline = time.monotonic() + timeout
    while await client.llen(Keys("t").pass_requests) < count:
        assert time.monotonic() < deadline, f"no {count} pass requests in time"
        await asyncio.sleep(0.05)


async def test_a_start_waiting_longer_than_the_socket_timeout_for_the_leader_is_no_redis_error(redis_url: str) -> None:
    # One BLPOP as long as the wait outlasted the client's socket timeout (both 5 s by default): the read timed
    # out, was retried, and a start answered 503 "Redis does not answer" after 21 s with Redis fine.
    from application.services.cluster_store import ClusterStore
    from application.services.keys import Keys

    client = aioredis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.5)
    try:
        cluster = ClusterStore(client, Keys("t"))
        assert await cluster.request_pass("nobody-answers", timeout=1.5) is None  # no leader: no answer
        waiting = asyncio.create_task(cluster.request_pass("answered", timeout=5))
        await until_requests(client, 2)
        await asyncio.sleep(1.2)  # the answer comes after more than one socket timeout
        await cluster.answer_pass("answered", ["j1"])
        assert await asyncio.wait_for(waiting, 10) == ["j1"]
        # A pass that failed says so: no answer, at once (not "no job fits"); a wait of (almost) nothing is no
        # BLPOP for ever.
        failed = asyncio.create_task(cluster.request_pass("failed", timeout=30))
        await until_requests(client, 3)
        await cluster.answer_pass("failed", {"error": "ValidationError: ..."})
        assert await asyncio.wait_for(failed, 5) is None
        assert await asyncio.wait_for(cluster.request_pass("instant", timeout=0.0003), 2) is None
    finally:
        await client.aclose()


async def test_many_waits_for_a_pass_leave_the_connection_pool_to_other_requests(redis_url: str) -> None:
    # Each wait held a pooled connection in its BLPOP: 600 starts at once (any user may start) took all 100 of a
    # worker's, and other users' requests waited seconds for one, or were 503 (hunt DN).
    from application.services.cluster_store import PASS_WAITERS, ClusterStore
    from application.services.keys import Keys

    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url, decode_responses=True, max_connections=PASS_WAITERS + 4, timeout=5
    )  # (as the server's: a command waits for one)
    client = aioredis.Redis.from_pool(pool)
    watch = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        cluster = ClusterStore(client, Keys("t"))
        waits = [asyncio.create_task(cluster.request_pass(f"w{i}", timeout=20)) for i in range(60)]
        await until_requests(client, 60)
        deadline = time.monotonic() + 10
        db = str(watch.connection_pool.connection_kwargs.get("db", 0))  # (the server's list: other workers' too)
        while not (blocked := [c for c in watch.client_list() if c["cmd"] == "blpop" and c["db"] == db]):
            assert time.monotonic() < deadline, "no wait in Redis"
            await asyncio.sleep(0.05)
        assert len(blocked) <= PASS_WAITERS, blocked
        for i in range(20):  # (another user's requests meanwhile: a connection each time)
            assert await asyncio.wait_for(client.set(f"t:other:{i}", 1), 2)
        for i in range(60):  # (an answer waits in Redis for its wait's turn)
            await cluster.answer_pass(f"w{i}", [f"j{i}"])
        assert await asyncio.wait_for(asyncio.gather(*waits), 20) == [[f"j{i}"] for i in range(60)]
    finally:
        watch.close()
        await client.aclose()


async def test_a_reply_lost_right_after_the_lead_was_taken_stands_the_scheduler_by_again(
    redis_url: str, tmp_path: Path
) -> None:
    # One lost reply as a new leader set up its queue switch ended the process: the lock sat unused for its TTL,
    # and each restart waited twice as long (hunt BH).

    from application.scheduler_process import Scheduler
    from application.services.redis_service import RedisService
    from tests.conftest import _until, settings_for

    settings = settings_for(redis_url, tmp_path)
    said: list[str] = []
    sink = logger.add(lambda m: said.append(str(m)), level="WARNING", format="{message}")
    service = RedisService(settings)
    await service.connect()
    scheduler = Scheduler(settings, service)
    real = scheduler.cluster.init_processor_switch
    calls: list[bool] = []

    async def lost_once(on: bool) -> None:
        calls.append(on)
        if len(calls) == 1:
            raise redis.ConnectionError("Connection closed by server.")
        await real(on)

    scheduler.cluster.init_processor_switch = lost_once  # type: ignore[method-assign]
    task = asyncio.create_task(scheduler.run())
    try:
        await _until(lambda: scheduler.leader.leading and scheduler.processor.stats.passes > 0, timeout=30)
        assert len(calls) == 2 and not task.done()
        assert any("lost Redis while taking the lead" in m and "standing by again" in m for m in said), said
    finally:
        scheduler.stopping.set()
        await asyncio.wait_for(task, 15)
        logger.remove(sink)
        await service.close()


def test_simulated_gpus_with_another_backend_is_told_at_start(server_factory: Callable[..., ApiServer]) -> None:
    # It was ignored without a word, and the "no GPU" hint then told the operator to set SIMULATED_GPUS=4.
    server = server_factory(env={"GPU_BACKEND": "auto", "SIMULATED_GPUS": "4"})
    wait_for(lambda: "SIMULATED_GPUS=4 is not used: GPU_BACKEND=auto reads NVML" in server.server_log(),
             timeout=20, what="the warning")  # fmt: skip
