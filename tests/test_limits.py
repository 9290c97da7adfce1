"""Per-owner limits and retention: 429 with Retry-After where a request is refused, GPUs shared fairly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, KEYS_SETTING, auth, job_body, make_model


def body(tmp_path: Path, name: str, **extra: Any) -> dict[str, Any]:
    """Jobs that hang after their first step (they hold their GPU until stopped), one shared data set."""
    return job_body(tmp_path, name, dataset="data", hang_after_steps=1, **extra)


async def test_create_rate_per_key(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(API_KEYS=KEYS_SETTING, CREATE_RATE_LIMIT="3/minute") as client:
        for i in range(3):
            r = await client.post("/jobs", json=body(tmp_path, f"r{i}"), headers=auth(ALICE_KEY))
            assert r.status_code == 201, r.text
        r = await client.post("/jobs", json=body(tmp_path, "r3"), headers=auth(ALICE_KEY))
        assert r.status_code == 429 and "CREATE_RATE_LIMIT" in r.json()["detail"]
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert (await client.post("/jobs", json=body(tmp_path, "b0"), headers=auth(BOB_KEY))).status_code == 201
        # The window's counters go away by themselves: none is ever left without an expiry.
        store = client.app.state.training.store
        window = int(time.time() // 60)
        for name in ("alice", "bob"):
            # (the window may have turned since the creates)
            ttl = max([await store.r.ttl(store.keys.rate(name, w)) for w in (window - 1, window)])
            assert 0 < ttl <= 61, (name, ttl)


async def test_waiting_jobs_per_owner(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(API_KEYS=KEYS_SETTING, MAX_QUEUED_PER_OWNER="2") as client:
        for i in range(2):
            r = await client.post("/jobs", json=body(tmp_path, f"w{i}"), headers=auth(ALICE_KEY))
            assert r.status_code == 201, r.text
        r = await client.post("/jobs", json=body(tmp_path, "w2"), headers=auth(ALICE_KEY))
        assert r.status_code == 429 and "MAX_QUEUED_PER_OWNER=2" in r.json()["detail"] and r.headers["Retry-After"]
        assert (await client.post("/jobs", json=body(tmp_path, "bob"), headers=auth(BOB_KEY))).status_code == 201
        await client.post("/jobs/w0/stop", headers=auth(ALICE_KEY))  # cancelled: no longer waiting
        assert (await client.post("/jobs", json=body(tmp_path, "w2"), headers=auth(ALICE_KEY))).status_code == 201


async def test_gpus_per_owner_make_a_job_wait_without_blocking_others(app_factory: Callable[..., Any],
                                                                      tmp_path: Path) -> None:  # fmt: skip
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(API_KEYS=KEYS_SETTING, MAX_GPUS_PER_OWNER="1", SIMULATED_GPUS="3x80") as client:
        r = await client.post("/jobs", json=body(tmp_path, "big", num_gpus=2), headers=auth(ALICE_KEY))
        assert r.status_code == 422 and "MAX_GPUS_PER_OWNER=1" in r.json()["detail"]
        first = await client.post("/jobs", json=body(tmp_path, "a1", auto_start=True), headers=auth(ALICE_KEY))
        assert first.json()["status"] == "running", first.text
        second = await client.post("/jobs", json=body(tmp_path, "a2", auto_start=True), headers=auth(ALICE_KEY))
        assert second.json()["status"] == "queued", second.text  # two GPUs are free, but alice holds her share
        bobs = await client.post("/jobs", json=body(tmp_path, "b1", auto_start=True), headers=auth(BOB_KEY))
        assert bobs.json()["status"] == "running", bobs.text  # queued behind a2, yet not blocked by it
        await client.post("/jobs/a1/stop", headers=auth(ALICE_KEY))
        deadline = time.monotonic() + 15
        while (await client.get("/jobs/a2", headers=auth(ALICE_KEY))).json()["status"] != "running":
            assert time.monotonic() < deadline, "a2 should start once a1 released alice's GPU"
            await asyncio.sleep(0.05)


async def test_a_job_held_by_its_owners_limit_is_not_told_there_are_no_free_gpus(app_factory: Callable[..., Any],
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    # A CPU-only job started behind its owner's waiting job was answered "No free GPUs now".
    make_model(tmp_path / "models" / "tiny-qwen2")
    limits = {"MAX_RUNNING_PER_OWNER": "2", "MAX_GPUS_PER_OWNER": "3", "SIMULATED_GPUS": "4x80"}
    async with app_factory(API_KEYS=KEYS_SETTING, **limits) as client:
        for name, gpus, want in (("x", 1, "running"), ("y", 3, "queued"), ("z", 0, "queued")):
            r = await client.post("/jobs", json=body(tmp_path, name, num_gpus=gpus, auto_start=True),
                                  headers=auth(ALICE_KEY))  # fmt: skip
            assert r.json()["status"] == want, r.text
        assert r.json()["pending_reason"]["code"] == "owner_limit", r.text
        assert "No free GPUs" not in r.json()["message"] and "MAX_GPUS_PER_OWNER" in r.json()["message"], r.text


async def test_runs_per_owner_count_cpu_only_jobs_too(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    # A CPU-only job holds no GPU: without MAX_RUNNING_PER_OWNER, one key ran any number at once on the host.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(API_KEYS=KEYS_SETTING, MAX_RUNNING_PER_OWNER="1", SIMULATED_GPUS="2x80") as client:
        first = await client.post("/jobs", json=body(tmp_path, "c1", num_gpus=0, auto_start=True),
                                  headers=auth(ALICE_KEY))  # fmt: skip
        assert first.json()["status"] == "running", first.text
        for name, gpus in (("c2", 0), ("g1", 1)):
            r = await client.post("/jobs", json=body(tmp_path, name, num_gpus=gpus, auto_start=True),
                                  headers=auth(ALICE_KEY))  # fmt: skip
            assert r.json()["status"] == "queued" and r.json()["pending_reason"]["code"] == "owner_limit", r.text
        bobs = await client.post("/jobs", json=body(tmp_path, "b1", num_gpus=0, auto_start=True), headers=auth(BOB_KEY))
        assert bobs.json()["status"] == "running", bobs.text  # another owner's turn is not held up
        await client.post("/jobs/c1/stop", headers=auth(ALICE_KEY))
        deadline = time.monotonic() + 15
        while (await client.get("/jobs/c2", headers=auth(ALICE_KEY))).json()["status"] != "running":
            assert time.monotonic() < deadline, "c2 should start once c1 ended"
            await asyncio.sleep(0.05)
        assert (await client.get("/jobs/g1", headers=auth(ALICE_KEY))).json()["status"] == "queued"  # in turn


async def test_terminal_jobs_expire_after_the_retention(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(JOB_RETENTION_DAYS=1 / 86400) as client:  # one second
        for name in ("old", "live"):
            assert (await client.post("/jobs", json=body(tmp_path, name))).status_code == 201
        await client.post("/jobs/old/stop")
        # Oldest of all, two entries retention can neither read nor find: one raised out of every sweep (and
        # the orphan-upload sweep after it), and 100 of either kind held back every job behind them, for good.
        store = client.app.state.training.store
        await store.r.hset(
            store.keys.job("unreadable"),
            mapping={"job_id": '"unreadable"', "status": '"failed"', "created_at": "1.0", "priority": '"high"'},
        )
        # One the delete script cannot decode either: left to an operator, out of retention's way.
        await store.r.hset(
            store.keys.job("undecodable"),
            mapping={"job_id": '"undecodable"', "status": '"failed"', "created_at": "3.0", "export": "{not json"},
        )
        await store.r.zadd(store.keys.expiry, {"unreadable": 1.0, "lost": 2.0, "undecodable": 3.0})
        watchdog = client.scheduler.watchdog
        deadline = time.monotonic() + 10
        removed: list[str] = []
        while "old" not in removed:
            assert time.monotonic() < deadline
            removed += await watchdog.retention.expire_old_jobs()
            await asyncio.sleep(0.1)
        assert (await client.get("/jobs/old")).status_code == 404
        assert "unreadable" in removed and (await client.get("/jobs/unreadable")).status_code == 404
        assert await store.expired(time.time(), 10) == []
        assert (await client.get("/jobs/live")).status_code == 200  # still pending: never expires
        assert (tmp_path / "data.jsonl").is_file()  # files stay


async def test_a_backlog_of_expired_records_goes_a_batch_after_another_in_one_sweep(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # A hundred a sweep, a sweep a minute: a backlog (retention turned on, or lowered) of 100,000 records took
    # 17 h to go, all of them in Redis's memory meanwhile (hunt CD).
    from application.models.training_model import JobStatus
    from tests.test_job_store import make_job

    async with app_factory() as client:
        store = client.app.state.training.store
        for n in range(250):
            await store.create(make_job(f"old{n:03}", JobStatus.PENDING), message="", actor="t")
            await store.transition(f"old{n:03}", JobStatus.CANCELLED)
        await store.r.zadd(store.keys.expiry, {f"old{n:03}": 1.0 + n for n in range(250)})  # (ended long ago)
        # Lost records among them (evicted): a batch with any was taken for the last one (review CF).
        await store.r.delete(*(store.keys.job(f"old{n:03}") for n in range(0, 100, 10)))
        removed = await client.scheduler.watchdog.retention.expire_old_jobs(batch=100, budget=60)  # (a slow machine)
        assert len(removed) == 240 and removed[0] == "old001", len(removed)
        assert await store.expired(time.time(), 10) == [] and (await store.counts(None))["cancelled"] == 0


async def test_a_burst_of_creates_cannot_pass_the_waiting_cap(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    # Each create reads the owner's count and then writes: the cap must hold when creates overlap, too.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(API_KEYS=KEYS_SETTING, MAX_QUEUED_PER_OWNER="2") as client:
        answers = await asyncio.gather(*(client.post("/jobs", json=body(tmp_path, f"burst{i}"),
                                                     headers=auth(ALICE_KEY)) for i in range(8)))  # fmt: skip
        codes = sorted(r.status_code for r in answers)
        assert codes == [201, 201] + [429] * 6, [r.text for r in answers]
        listed = (await client.get("/jobs", headers=auth(ALICE_KEY))).json()
        assert listed["total"] == 2, listed


async def test_a_resume_counts_against_the_waiting_cap_as_a_create_does(app_factory: Callable[..., Any],
                                                                         tmp_path: Path) -> None:  # fmt: skip
    # Only creates were counted: paused jobs resumed past it (a cap of 3 held 6 waiting jobs).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(API_KEYS=KEYS_SETTING, MAX_QUEUED_PER_OWNER="2") as client:
        r = await client.post("/jobs", json=body(tmp_path, "p", auto_start=True), headers=auth(ALICE_KEY))
        assert r.json()["status"] == "running", r.text
        assert (await client.post("/jobs/p/pause", headers=auth(ALICE_KEY))).json()["status"] == "paused"
        for name in ("w0", "w1"):
            assert (await client.post("/jobs", json=body(tmp_path, name), headers=auth(ALICE_KEY))).status_code == 201
        refused = await client.post("/jobs/p/resume", headers=auth(ALICE_KEY))
        assert refused.status_code == 429 and "MAX_QUEUED_PER_OWNER=2" in refused.json()["detail"], refused.text
        assert (await client.get("/jobs/p", headers=auth(ALICE_KEY))).json()["status"] == "paused"
        by_admin = await client.post("/jobs/p/resume", headers=auth(ADMIN_KEY))  # the owner's cap, said as hers
        assert by_admin.status_code == 429 and by_admin.json()["detail"].startswith("'alice' already has 2"), by_admin
        await client.post("/jobs/w0/stop", headers=auth(ALICE_KEY))  # cancelled: no longer waiting
        resumed = await client.post("/jobs/p/resume", headers=auth(ALICE_KEY))
        assert resumed.status_code == 200, resumed.text


async def test_a_job_asking_for_more_than_a_lowered_gpu_cap_is_told_it_can_never_start(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # MAX_GPUS_PER_OWNER lowered under a queued 2-GPU job: it said "owner_limit", its owner's jobs ahead, for ever;
    # a pending one could be started, and a paused one resumed, into that same wait.
    make_model(tmp_path / "models" / "tiny-qwen2")
    alice = auth(ALICE_KEY)
    shared = {"API_KEYS": KEYS_SETTING, "SIMULATED_GPUS": "2x80", "REDIS_KEY_PREFIX": f"cap-{time.time_ns()}"}
    async with app_factory(MAX_GPUS_PER_OWNER="2", **shared) as client:
        r = await client.post("/jobs", json=body(tmp_path, "p", num_gpus=2), headers=alice)
        assert r.json()["status"] == "pending", r.text  # (its GPUs free: it may be started)
        r = await client.post("/jobs", json=body(tmp_path, "r", num_gpus=2, auto_start=True), headers=alice)
        assert r.json()["status"] == "running", r.text
        assert (await client.post("/jobs/r/pause", headers=alice)).json()["status"] == "paused"
        r = await client.post("/jobs", json=body(tmp_path, "a1", auto_start=True), headers=alice)
        assert r.json()["status"] == "running", r.text
        r = await client.post("/jobs", json=body(tmp_path, "q", num_gpus=2, auto_start=True), headers=alice)
        assert r.json()["status"] == "queued" and r.json()["pending_reason"]["code"] == "owner_limit", r.text
    async with app_factory(MAX_GPUS_PER_OWNER="1", **shared) as client:
        reason = (await client.get("/queue/q/status", headers=alice)).json()["pending_reason"]
        assert reason["code"] == "never" and reason["message"] == (
            "it asks for more GPUs than its owner may hold (MAX_GPUS_PER_OWNER=1): cancel it (POST .../stop) and "
            "create it again with num_gpus of 1 or fewer"
        ), reason
        cap = "it asks for 2 GPUs, more than one owner may hold (MAX_GPUS_PER_OWNER=1): create it again with num_gpus"
        r = await client.post("/jobs/p/start", headers=alice)
        assert r.status_code == 409 and r.json()["detail"] == f"job 'p' can never start: {cap} of 1 or fewer", r.text
        r = await client.post("/jobs/r/resume", headers=alice)
        assert r.status_code == 409 and r.json()["detail"] == f"job 'r' can never run again here: {cap} of 1 or fewer"
        assert [(await client.get(f"/jobs/{j}", headers=alice)).json()["status"] for j in "pr"] == ["pending", "paused"]
