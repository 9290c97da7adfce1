"""The list entries kept per job: those another version wrote, rewritten when a page finds them."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from application.models.training_model import JobStatus
from application.services import lua
from application.services.embedded_redis import EmbeddedRedis
from application.services.job_store import JobStore
from application.services.keys import Keys
from tests.test_job_store import listed, make_job


@pytest.fixture
def store(redis_client: aioredis.Redis) -> JobStore:
    return JobStore(redis_client, Keys("t"))


async def failed_job(store: JobStore, job_id: str) -> None:
    await store.create(make_job(job_id), message="", actor="t")
    await store.transition(job_id, JobStatus.RUNNING, acquire_gpus=[0], fields={"gpu_ids": [0]})
    await store.transition(job_id, JobStatus.FAILED, fields={"error_code": "exit_code", "error_message": "boom"})


def as_written_by(summary: str | bytes, fields: list[str]) -> str:
    entry = json.loads(summary)
    return json.dumps({name: entry[name] for name in fields}, separators=(",", ":"))  # (as the scripts write)


async def test_an_entry_an_older_runner_rewrote_is_written_again_when_a_page_finds_it(
    store: JobStore, redis_client: aioredis.Redis
) -> None:
    # A runner of an older version ended its run after the upgrade: its script wrote the entry with its own fields
    # (none for error_code then), after the scheduler's start rewrote them all. The list lacked the key for good.
    await failed_job(store, "a")
    await store.summaries.backfill()  # the scheduler's start
    key = store.keys.job_summary("a")
    older = [f for f in lua.SUMMARY_FIELDS if f != "error_code"]
    await redis_client.set(key, as_written_by(await redis_client.get(key) or "", older))
    entry = (await listed(store, None))[0]
    assert entry["error_code"] == "exit_code" and entry["status"] == "failed", entry
    assert json.loads(await redis_client.get(key) or "{}")["error_code"] == "exit_code"  # stored, not only shown


async def test_an_entry_a_newer_version_wrote_is_left_as_it_is(store: JobStore, redis_client: aioredis.Redis) -> None:
    # After a downgrade: its fields past ours (with a long value) are no reason to rewrite it on every page.
    await failed_job(store, "a")
    key = store.keys.job_summary("a")
    newer = json.loads(await redis_client.get(key) or "{}") | {"notes": "x" * 500}
    await redis_client.set(key, json.dumps(newer, separators=(",", ":")))
    assert (await listed(store, None))[0]["notes"] == "x" * 500
    assert json.loads(await redis_client.get(key) or "{}") == newer


async def test_a_redis_that_takes_no_writes_still_lists_every_field(own_redis: EmbeddedRedis) -> None:
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        store = JobStore(client, Keys("t"))
        await failed_job(store, "a")
        key = store.keys.job_summary("a")
        older = [f for f in lua.SUMMARY_FIELDS if f not in ("error_code", "kind")]
        await client.set(key, as_written_by(await client.get(key) or "", older))
        await client.config_set("min-replicas-to-write", 1)  # (writes refused: NOREPLICAS)
        entry = (await listed(store, None))[0]
        assert entry["job_id"] == "a" and set(lua.SUMMARY_FIELDS) <= set(entry), entry
        assert entry["error_code"] is None and entry["kind"] is None and entry["error_message"] == "boom"
    finally:
        await client.aclose()


async def test_an_older_entry_of_a_job_whose_record_is_gone_is_listed_with_every_field(
    store: JobStore, redis_client: aioredis.Redis
) -> None:
    # Its record evicted, its entry left until a sweep forgets it: rewritten (in vain) on every page, and listed
    # without the fields (review CF).
    await failed_job(store, "a")
    key = store.keys.job_summary("a")
    older = [f for f in lua.SUMMARY_FIELDS if f != "error_code"]
    await redis_client.set(key, as_written_by(await redis_client.get(key) or "", older))
    await redis_client.delete(store.keys.job("a"))
    entry = (await listed(store, None))[0]
    assert entry["job_id"] == "a" and entry["error_code"] is None and set(lua.SUMMARY_FIELDS) <= set(entry), entry
