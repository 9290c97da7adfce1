"""Idempotency-Key: a retried create or action gets the first answer, never a second job or a second stop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel

from application.auth import Caller
from application.exceptions import Conflict, Unavailable
from application.models.job_request import JobCreate
from application.models.job_responses import ActionResponse
from application.models.training_model import JobStatus
from application.services.cluster_store import ClusterStore
from application.services.idempotency import REPLAY_HEADER, Idempotency, held_claim
from application.services.keys import Keys
from tests.conftest import _until, job_body, make_model
from tests.test_job_store import make_job


def body(tmp_path: Path, name: str, **extra: Any) -> dict[str, Any]:
    """Jobs that hang after their first step (they hold their GPU until stopped), one shared data set."""
    return job_body(tmp_path, name, dataset="data", hang_after_steps=1, **extra)


async def test_twenty_concurrent_creates_with_one_key_make_one_job(app_factory: Callable[..., Any],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory() as client:
        headers = {"Idempotency-Key": "create-7f3a"}
        replies = await asyncio.gather(*(client.post("/jobs", json=body(tmp_path, "once"), headers=headers)
                                         for _ in range(20)))  # fmt: skip
        assert {r.status_code for r in replies} == {201}
        assert {r.json()["job_id"] for r in replies} == {"once"}
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in replies) == 19
        assert {r.headers["Location"] for r in replies} == {"/api/v1/training/jobs/once"}
        assert (await client.get("/jobs")).json()["total"] == 1

        later = await client.post("/jobs", json=body(tmp_path, "once"), headers=headers)
        assert later.status_code == 201 and later.json() == replies[0].json()
        other = await client.post("/jobs", json=body(tmp_path, "twice"), headers=headers)
        assert other.status_code == 409 and "different request" in other.json()["detail"]
        # Without a key, the same body is a new request (its folder is taken: 409).
        assert (await client.post("/jobs", json=body(tmp_path, "once"))).status_code == 409
        assert (await client.get("/jobs")).json()["total"] == 1


async def test_an_actions_key_sent_again_for_a_new_job_under_a_deleted_jobs_id_is_another_request(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The replay said "cancelled", of the new job, which was still pending (hunt BR).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory() as client:
        headers = {"Idempotency-Key": "stop-1"}
        assert (await client.post("/jobs", json=body(tmp_path, "ik"))).status_code == 201
        assert (await client.post("/jobs/ik/stop", headers=headers)).json()["status"] == "cancelled"
        assert (await client.delete("/jobs/ik")).status_code == 204
        assert (await client.post("/jobs", json=body(tmp_path, "ik"))).status_code == 201
        again = await client.post("/jobs/ik/stop", headers=headers)
        assert again.status_code == 409 and "different request" in again.json()["detail"], again.text
        assert "Idempotent-Replayed" not in again.headers
        assert (await client.get("/jobs/ik")).json()["status"] == "pending"


async def test_a_retried_action_gets_the_first_answer(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory() as client:
        assert (await client.post("/jobs", json=body(tmp_path, "act"))).status_code == 201
        headers = {"Idempotency-Key": "stop-1"}
        first = await client.post("/jobs/act/stop", headers=headers)
        assert first.status_code == 200 and first.json()["status"] == "cancelled"
        again = await client.post("/jobs/act/stop", headers=headers)
        assert again.status_code == 200 and again.json() == first.json()
        assert (await client.post("/jobs/act/stop")).status_code == 409  # a new stop: nothing left to stop
        # A refused request is replayed as refused.
        bad = await client.post("/jobs/act/start", headers={"Idempotency-Key": "start-1"})
        assert bad.status_code == 409
        replayed = await client.post("/jobs/act/start", headers={"Idempotency-Key": "start-1"})
        assert (replayed.status_code, replayed.content) == (409, bad.content)  # the first answer, byte for byte
        # Also when the message is not ASCII (errors are written ASCII-escaped; the replay was raw UTF-8).
        missing = {**body(tmp_path, "nofile"), "data_path": "file-" + "0" * 24}
        key = {"Idempotency-Key": "create-1"}
        refused = await client.post("/jobs", json=missing, headers=key)
        assert refused.status_code == 422 and "\\u2014" in refused.text, refused.text
        assert (await client.post("/jobs", json=missing, headers=key)).content == refused.content
        # The key is per path and body: the same key on another action is a different request.
        r = await client.post("/jobs/act/export", headers=headers)
        assert r.status_code == 409 and "different request" in r.json()["detail"]
        for bad_key in ("", "has space", "x" * 256):
            r = await client.post("/jobs/act/stop", headers={"Idempotency-Key": bad_key})
            assert r.status_code == 422, (bad_key, r.text)
        # An action takes no body: one nested too deeply to decode is no 500 (it was, with a key), and its key is
        # kept as for any other body.
        deep = b"[" * 100_000 + b"]" * 100_000
        for action in ("start", "stop", "pause", "resume"):
            r = await client.post(f"/jobs/act/{action}", content=deep, headers={"Idempotency-Key": f"deep-{action}"})
            assert r.status_code == 409, (action, r.status_code, r.text)
            again = await client.post(
                f"/jobs/act/{action}", content=deep, headers={"Idempotency-Key": f"deep-{action}"}
            )
            assert again.content == r.content and again.headers.get(REPLAY_HEADER), again.text


async def test_a_claim_whose_worker_died_lapses_and_a_long_request_keeps_its_own(
    redis_client: aioredis.Redis,
) -> None:
    # A worker killed mid-request (kill -9: no handler ran) left its key "still being handled" for 24 h: every
    # retry was 409 for a day, and a cut-off create could never learn whether its job existed.
    cluster = ClusterStore(redis_client, Keys("idem"))
    idem = Idempotency(cluster, lease=0.3)
    calls: list[str] = []

    async def answer(delay: float) -> tuple[int, ActionResponse, dict[str, str]]:
        calls.append("call")
        await asyncio.sleep(delay)
        return 200, ActionResponse(job_id="j", status=JobStatus.STOPPED, message="stopped"), {}

    async def same() -> str:
        return "the-same-request"

    rkey = cluster.keys.idempotency("alice", hashlib.sha256(b"k1").hexdigest())
    claim = json.dumps({"fingerprint": "the-same-request", "state": "running", "claim": "a-worker-since-killed"})
    assert await cluster.claim_idempotency(rkey, claim, 0.3) is None  # what the killed worker held
    retried = await idem.run("alice", "k1", same, lambda: answer(0))
    assert retried.status_code == 200 and REPLAY_HEADER not in retried.headers and calls == ["call"]

    # A request longer than the lease keeps its claim (renewed): a retry meanwhile waits for its answer.
    calls.clear()
    first = asyncio.create_task(idem.run("alice", "k2", same, lambda: answer(1.2)))
    await _until(lambda: calls == ["call"])  # it holds the claim: it is working
    again = await idem.run("alice", "k2", same, lambda: answer(0))
    assert calls == ["call"] and again.headers[REPLAY_HEADER] == "true" and (await first).status_code == 200
    assert await redis_client.ttl(cluster.keys.idempotency("alice", hashlib.sha256(b"k2").hexdigest())) > 3600


async def test_a_worker_whose_claim_lapsed_leaves_the_retrys_claim_alone(redis_client: aioredis.Redis) -> None:
    # A worker stalled past its lease: a retry claimed the key and is running the request. The stalled worker's
    # answer (or its release, on a 503) overwrote or deleted the retry's claim, so a third try ran it again.
    cluster = ClusterStore(redis_client, Keys("idem"))
    idem = Idempotency(cluster, lease=5)
    retrys = json.dumps({"fingerprint": "the-same-request", "state": "running", "claim": "the-retry"})

    async def same() -> str:
        return "the-same-request"

    for key, failing in (("k3", False), ("k4", True)):
        rkey = cluster.keys.idempotency("alice", hashlib.sha256(key.encode()).hexdigest())

        async def stalled(rkey: str = rkey, failing: bool = failing) -> tuple[int, ActionResponse, dict[str, str]]:
            await redis_client.set(rkey, retrys)  # its lease lapsed meanwhile, and a retry took the key
            if failing:
                raise Unavailable("Redis is away: retry")
            return 200, ActionResponse(job_id="j", status=JobStatus.STOPPED, message="stopped"), {}

        if failing:
            with pytest.raises(Unavailable):
                await idem.run("alice", key, same, stalled)
        else:
            assert (await idem.run("alice", key, same, stalled)).status_code == 200  # its own caller still hears
        assert await redis_client.get(rkey) == retrys


async def test_an_answer_is_kept_when_its_claim_lapsed_with_nobody_retrying(redis_client: aioredis.Redis) -> None:
    # The claim check stored nothing once the lease was out, so the next retry ran the request a second time.
    cluster = ClusterStore(redis_client, Keys("idem"))
    idem = Idempotency(cluster, lease=5)
    calls: list[str] = []

    async def same() -> str:
        return "the-same-request"

    rkey = cluster.keys.idempotency("alice", hashlib.sha256(b"k5").hexdigest())

    async def stalled() -> tuple[int, ActionResponse, dict[str, str]]:
        calls.append("call")
        await redis_client.delete(rkey)  # its lease ran out while it worked
        return 200, ActionResponse(job_id="j", status=JobStatus.STOPPED, message="stopped"), {}

    assert (await idem.run("alice", "k5", same, stalled)).status_code == 200
    again = await idem.run("alice", "k5", same, stalled)
    assert again.headers[REPLAY_HEADER] == "true" and calls == ["call"]


async def test_a_create_stalled_past_its_lease_does_not_make_the_job_a_retry_made(app_factory: Callable[..., Any],
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    # Hunt AY: an API worker frozen (SIGSTOP) mid-create past its lease; a retry through another worker created
    # the job, and the frozen one, woken, created it again as 'dup-2': the run was trained twice.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False) as client:
        state = client.app.state
        idem, svc = state.idempotency, state.training
        anyone = Caller(None, "admin")
        request = JobCreate.model_validate(body(tmp_path, "dup"))
        answers: list[Any] = []

        async def same() -> str:
            return "the-same-request"

        async def create(stall: Callable[[], Awaitable[None]]) -> tuple[int, BaseModel, dict[str, str]]:
            await stall()
            return 201, await svc.create(request, anyone, held_claim()), {}

        async def taken_over() -> None:  # its lease lapsed, and a retry took the key and created the job
            rkey = idem.store.keys.idempotency("-", hashlib.sha256(b"k6").hexdigest())
            retry = json.dumps({"fingerprint": "the-same-request", "state": "running", "claim": "the-retry"})
            await state.redis.client.set(rkey, retry)
            answers.append(await svc.create(request, anyone))
            assert (await client.post("/jobs/dup/stop")).status_code == 200  # over: its folder is free again

        with pytest.raises(Conflict) as refused:
            await idem.run(None, "k6", same, lambda: create(taken_over))
        assert "stalled past its Idempotency-Key's lease (10 s)" in refused.value.detail
        listed = (await client.get("/jobs")).json()
        assert [j["job_id"] for j in listed["jobs"]] == [answers[0].job_id] == ["dup"], listed

        async def lapsed() -> None:  # its lease lapsed (a retry's record may have lapsed after its create too)
            await state.redis.client.delete(idem.store.keys.idempotency("-", hashlib.sha256(b"k7").hexdigest()))

        request = JobCreate.model_validate(body(tmp_path, "once"))
        with pytest.raises(Conflict):
            await idem.run(None, "k7", same, lambda: create(lapsed))
        assert (await client.get("/jobs")).json()["total"] == 1

        async def prompt() -> None:
            pass

        first = await idem.run(None, "k7", same, lambda: create(prompt))  # the client sends it again
        again = await idem.run(None, "k7", same, lambda: create(prompt))
        assert first.status_code == 201 and again.headers[REPLAY_HEADER] == "true" and again.body == first.body
        assert (await client.get("/jobs")).json()["total"] == 2


async def test_a_merge_export_stalled_past_its_lease_does_not_export_again(app_factory: Callable[..., Any],
                                                                          tmp_path: Path) -> None:  # fmt: skip
    # Review BB: a worker stalled past its lease on a merge export ran swift export a second time once the
    # export a retry asked for had ended.
    async with app_factory(scheduler=False) as client:
        state = client.app.state
        store, settings = state.training.store, state.training.settings
        run_dir = settings.OUTPUT_ROOT / "x" / "v0-20261203-000000"
        (run_dir / "checkpoint-5").mkdir(parents=True)
        (run_dir / "checkpoint-5" / "adapter_config.json").write_text("{}")  # (a LoRA checkpoint: exportable)
        (run_dir / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"weights")
        job = make_job("x", JobStatus.COMPLETED).model_copy(update={
            "run_id": "run1", "output_dir": str(settings.OUTPUT_ROOT / "x"), "run_dir": str(run_dir),
            "finished_at": time.time(), "checkpoints": [str(run_dir / "checkpoint-5")]})  # fmt: skip
        await store.create(job, message="created", actor="t")
        rkey = state.idempotency.store.keys.idempotency("-", hashlib.sha256(b"k8").hexdigest())

        async def same() -> str:
            return "the-same-request"

        async def stalled() -> tuple[int, BaseModel, dict[str, str]]:
            retry = json.dumps({"fingerprint": "the-same-request", "state": "running", "claim": "the-retry"})
            await state.redis.client.set(rkey, retry)  # its lease lapsed, and a retry took the key
            return 200, await state.exports.export("x", Caller(None, "admin"), None, held_claim()), {}

        with pytest.raises(Conflict) as refused:
            await state.idempotency.run(None, "k8", same, stalled)
        assert "stalled past its Idempotency-Key's lease (10 s)" in refused.value.detail
        assert (await client.get("/jobs/x")).json()["export"]["status"] == "none"  # nothing asked of swift
