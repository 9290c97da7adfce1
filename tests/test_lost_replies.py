"""Writes whose reply Redis lost after it had made them (a real Redis behind tests/redis_proxy.py): the server
looks for what it wrote before it answers "try again", whose retry made it a second time or failed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from application.services import lua, lua_cluster, lua_log
from tests.conftest import QUICK_TO_GIVE_UP, job_body, make_model, wait_job
from tests.redis_proxy import RedisProxy

WAITING = ("pending", "queued", "running")
ROWS = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}) + "\n"


def script(source: str) -> bytes:
    """What the proxy looks for: the script's sha, as EVALSHA sends it."""
    return re.escape(hashlib.sha1(source.encode()).hexdigest().encode())


@asynccontextmanager
async def through_a_proxy(
    app_factory: Callable[..., Any], redis_url: str, scheduler: bool = False, retries: int = 0, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, RedisProxy]]:
    proxy = RedisProxy(redis_url)
    settings = {**QUICK_TO_GIVE_UP, "REDIS_RETRIES": str(retries), **overrides}
    try:
        async with app_factory(REDIS_URL=proxy.url, scheduler=scheduler, **settings) as client:
            yield client, proxy
    finally:
        proxy.close()


# A reply lost with its connection, met by the caller: with no retries and Redis away a second, or with retries
# on and Redis back at once (redis-py's retry of a dropped connection sent the script again, and it ran twice;
# only a command that cannot have reached Redis is sent again now).
LOSSES = pytest.mark.parametrize(("retries", "down"), [(0, 1.0), (3, 0.05)], ids=["met", "retries-on"])


def upload(client: httpx.AsyncClient, name: str) -> Any:
    return client.post("/files", files={"file": (name, (ROWS * 20).encode(), "application/octet-stream")})


@LOSSES
async def test_a_create_stored_before_its_reply_was_lost_is_answered_as_made_once(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path, retries: int, down: float
) -> None:
    # It answered 503 "try again"; the retry then made the job a second time under a derived id (or, with its
    # job_id, was refused as "taken"), and an auto_start job was left pending.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with through_a_proxy(app_factory, redis_url, retries=retries) as (client, proxy):
        assert (await client.post("/jobs", json=job_body(tmp_path, "first"))).status_code == 201  # (scripts loaded)
        proxy.cut_after(script(lua.CREATE), lose_reply=True, down_seconds=down)
        r = await client.post("/jobs", json=job_body(tmp_path, "second"))
        assert proxy.fired.is_set()
        assert r.status_code == 201 and r.json()["job_id"] == "second", r.text
        listed = (await client.get("/jobs")).json()
        assert sorted(j["job_id"] for j in listed["jobs"]) == ["first", "second"], listed


@LOSSES
async def test_an_upload_stored_before_its_reply_was_lost_keeps_its_file(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path, retries: int, down: float
) -> None:
    # It answered 503 and deleted the file, while its record (and its bytes against the owner's quota) stayed: a
    # listed upload with no data, which every job naming it failed on.
    size = len((ROWS * 20).encode())
    async with through_a_proxy(app_factory, redis_url, retries=retries, FILE_QUOTA_BYTES=2 * size) as (client, proxy):
        first = await upload(client, "first.jsonl")
        assert first.status_code == 201  # (scripts loaded)
        proxy.cut_after(script(lua_cluster.STORE_FILE), lose_reply=True, down_seconds=down)
        r = await upload(client, "second.jsonl")
        assert proxy.fired.is_set()
        assert r.status_code == 201, r.text
        assert Path(r.json()["path"]).is_file()
        listed = (await client.get("/files")).json()
        assert sorted(f["filename"] for f in listed["files"]) == ["first.jsonl", "second.jsonl"], listed
        # Counted once against the quota (run twice, it was counted twice, for good: 413 with room to spare).
        assert (await client.delete(f"/files/{first.json()['id']}")).status_code == 204
        third = await upload(client, "third.jsonl")
        assert third.status_code == 201, third.text


@LOSSES
async def test_a_file_delete_made_before_its_reply_was_lost_removes_the_file(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path, retries: int, down: float
) -> None:
    # It answered 503 with the record gone and the file left on disk for good: the retry was 404, and no sweep
    # looked at it.
    async with through_a_proxy(app_factory, redis_url, retries=retries) as (client, proxy):
        first, second = [(await upload(client, f"{n}.jsonl")).json() for n in ("first", "second")]
        assert (await client.delete(f"/files/{first['id']}")).status_code == 204  # (scripts loaded)
        proxy.cut_after(script(lua_cluster.FORGET_FILE), lose_reply=True, down_seconds=down)
        r = await client.delete(f"/files/{second['id']}")
        assert proxy.fired.is_set()
        assert r.status_code == 204, r.text  # (sent again, it ran twice and was a 404 "gone", as a second delete)
        assert not Path(second["path"]).exists()
        assert (await client.get(f"/files/{second['id']}")).status_code == 404


@LOSSES
async def test_a_start_recorded_before_its_reply_was_lost_is_launched_not_given_up(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path, retries: int, down: float
) -> None:
    # The scheduler took the lost reply for a start that did not happen: the job held its GPU with no runner until
    # the watchdog gave it up, "preempted for the stop of the scheduler that was starting it", and ran it again.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with through_a_proxy(app_factory, redis_url, scheduler=True, retries=retries) as (client, proxy):
        proxy.cut_after(rb'"to":"running"', lose_reply=True, down_seconds=down)
        body = job_body(tmp_path, "lost", auto_start=True, step_seconds=0.01, training={"max_steps": 2})
        # (the create's own wait for that start is cut too: its answer may be a 503; the job is made either way)
        assert (await client.post("/jobs", json=body)).status_code in (201, 503)
        deadline = time.monotonic() + 30
        while (r := await client.get("/jobs/lost")).status_code != 200 or r.json()["status"] in WAITING:
            assert time.monotonic() < deadline, r.text  # (503 while the proxy is down)
            await asyncio.sleep(0.1)
        done = r.json()
        assert proxy.fired.is_set()
        assert done["status"] == "completed" and len(done["attempts"]) == 1, done["attempts"]


async def test_a_keyed_change_whose_reply_was_lost_answers_its_retry_the_same_not_twice(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    # A stop, a delete, a priority change... whose reply a dropped connection lost answered "try again when it is
    # back": the retry was then refused ("already cancelled: nothing to stop") for what the first one did. With a
    # key, its claim was freed: the retry ran the change again (an export ran twice) or was refused for what the
    # first did, where the README promises the first answer.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with through_a_proxy(app_factory, redis_url, retries=3) as (client, proxy):
        assert (await client.post("/jobs", json=job_body(tmp_path, "waiting"))).status_code == 201
        proxy.cut_after(script(lua.TRANSITION), lose_reply=True, down_seconds=0.05)
        key = {"Idempotency-Key": "stop-once"}
        first = await client.post("/jobs/waiting/stop", headers=key)
        assert proxy.fired.is_set() and first.status_code == 503 and "Retry-After" not in first.headers, first.text
        assert "may have been carried out all the same" in first.json()["detail"], first.text
        again = await client.post("/jobs/waiting/stop", headers=key)
        assert again.status_code == 503 and again.json() == first.json(), again.text
        # (no Retry-After: a client that follows it with the same key would get this answer for a day)
        assert again.headers.get("Idempotent-Replayed") == "true" and "Retry-After" not in again.headers
        assert (await client.get("/jobs/waiting")).json()["status"] == "cancelled"


async def test_a_quantized_export_whose_job_create_reply_was_lost_is_listed_on_its_parent(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    # Its job was stored and ran, but the parent's exports never listed it, and a retry was refused for its folder.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with through_a_proxy(app_factory, redis_url, scheduler=True, retries=3) as (client, proxy):
        body = job_body(tmp_path, "q", auto_start=True, training={"max_steps": 4, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "q", lambda j: j["status"] == "completed" and j["export"]["status"] == "completed")
        proxy.cut_after(script(lua.CREATE), lose_reply=True, down_seconds=0.05)
        r = await client.post("/jobs/q/export", json={"quant_method": "bnb", "quant_bits": 8})
        assert proxy.fired.is_set()
        assert r.status_code == 200 and "queued as job 'q-quant'" in r.json()["message"], r.text
        listed = (await client.get("/jobs/q/exports")).json()["exports"]
        assert [e.get("job_id") for e in listed if e.get("job_id")] == ["q-quant"], listed


async def test_a_create_whose_start_lost_its_pass_request_is_answered_as_created(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    # The job was stored and queued; only the request for a pass lost its reply: the create answered 503, which its
    # Idempotency-Key then kept for a day (review).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with through_a_proxy(app_factory, redis_url, scheduler=True, retries=3) as (client, proxy):
        assert (await client.post("/jobs", json=job_body(tmp_path, "first"))).status_code == 201  # (scripts loaded)
        proxy.cut_after(rb"RPUSH", lose_reply=True, down_seconds=0.05)
        body = job_body(tmp_path, "second", auto_start=True, training={"max_steps": 2})
        r = await client.post("/jobs", json=body, headers={"Idempotency-Key": "create-once"})
        assert proxy.fired.is_set()
        assert r.status_code == 201 and r.json()["status"] in ("queued", "running", "completed"), r.text


async def test_the_watchdogs_event_of_a_dead_runners_end_is_written_once_though_its_reply_was_lost(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    # Sent again after a lost reply, the requeued run's `retry` event was listed twice (the end-to-end recheck).
    from tests.test_watchdog import running_with_dead_runner

    make_model(tmp_path / "models" / "tiny-qwen2")
    async with through_a_proxy(app_factory, redis_url, retries=3, lead=True, AUTO_EXPORT=False) as (client, proxy):
        await running_with_dead_runner(client, tmp_path, "requeued", max_retries=2)
        proxy.cut_after(rb"(?s)" + script(lua_log.APPEND) + rb".*retry", lose_reply=True, down_seconds=0.05)
        await client.scheduler.watchdog.sweep()  # type: ignore[attr-defined]
        assert proxy.fired.is_set()
        events = [e["type"] for e in (await client.get("/jobs/requeued/events")).json()["events"]]
        assert events.count("retry") == 1, events


async def test_an_auto_start_create_whose_start_met_redis_away_answers_created_and_says_to_look(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    # The job was stored; its start's reply was lost and Redis stayed away for the look at how it stands: a 503
    # "try again" freed the Idempotency-Key, and the retry was refused for the job's own folder (last review).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with through_a_proxy(app_factory, redis_url, scheduler=True, retries=0) as (client, proxy):
        first = job_body(tmp_path, "first", auto_start=True, training={"max_steps": 2})
        assert (await client.post("/jobs", json=first)).status_code == 201  # (scripts loaded, a GPU reading)
        await wait_job(client, "first", lambda j: j["status"] == "completed")
        proxy.cut_after(rb"(?s)" + script(lua.TRANSITION) + rb".*queued", lose_reply=True, down_seconds=1.0)
        body = job_body(tmp_path, "second", auto_start=True, training={"max_steps": 2})
        r = await client.post("/jobs", json=body, headers={"Idempotency-Key": "create-once"})
        assert proxy.fired.is_set()
        assert r.status_code == 201 and "Redis did not say whether it started" in r.json()["message"], r.text
