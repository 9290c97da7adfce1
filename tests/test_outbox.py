"""A runner's end through a Redis that fails at an exact moment (a real Redis behind tests/redis_proxy.py): an
end Redis took is the runner's even when its answer was lost; the same end written by a scheduler while Redis
kept the runner out is not."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from application.models.training_model import Attempt, JobStatus
from application.services.job_store import JobStore
from application.services.keys import Keys
from application.services.outbox import Outbox
from application.services.redis_service import create_client
from tests.conftest import settings_for
from tests.redis_proxy import RedisProxy
from tests.test_job_store import make_job, require


@pytest.fixture
async def cut(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[RedisProxy, JobStore, JobStore]]:
    """A proxy, a store through it (the runner's) and one straight to Redis (a scheduler's), one running job."""
    proxy = RedisProxy(redis_url)
    settings = settings_for(proxy.url, tmp_path, REDIS_RETRIES=0, REDIS_SOCKET_TIMEOUT=1, REDIS_CONNECT_TIMEOUT=1)
    keys = Keys(settings.REDIS_KEY_PREFIX)
    runners, direct = create_client(settings, proxy.url), aioredis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(direct, keys)
    job = make_job("j", JobStatus.RUNNING).model_copy(update={"run_id": "run1"})
    job.attempts = [Attempt(number=1, run_id="run1", started_at=time.time())]
    await store.create(job, message="created", actor="t")
    try:
        yield proxy, JobStore(runners, keys), store
    finally:
        proxy.close()
        await runners.aclose()
        await direct.aclose()


def completed_at(ended: float) -> dict[str, object]:
    """The fields of a completed end at `ended`, as `record_end` writes them (its attempt's end time)."""
    return {"attempts": [Attempt(number=1, run_id="run1", started_at=ended - 60, finished_at=ended,
                                 outcome="completed")], "finished_at": ended}  # fmt: skip


async def test_an_end_redis_took_is_the_runners_though_its_answer_was_lost(
    cut: tuple[RedisProxy, JobStore, JobStore],
) -> None:
    proxy, runners, store = cut
    proxy.cut_after(rb"status_completed", lose_reply=True, down_seconds=1.0)
    outbox = Outbox(runners, "j", "run1")
    assert await outbox.finish(JobStatus.COMPLETED, completed_at(time.time()), "training completed") is True
    assert proxy.fired.is_set()
    assert (await require(store, "j")).status == JobStatus.COMPLETED


async def test_the_same_end_written_by_a_scheduler_while_redis_kept_the_runner_out_is_not_the_runners(
    cut: tuple[RedisProxy, JobStore, JobStore],
) -> None:
    proxy, runners, store = cut
    # The runner's connection is cut (its end never reaches Redis) and new ones refused for a second.
    proxy.cut_after(rb"PING", lose_reply=False, down_seconds=1.0)
    with contextlib.suppress(RedisError):
        await runners.r.ping()
    assert proxy.fired.is_set()
    outbox = Outbox(runners, "j", "run1")
    finishing = asyncio.create_task(outbox.finish(JobStatus.COMPLETED, completed_at(time.time()), "completed"))
    await asyncio.sleep(0)
    # Meanwhile a scheduler (which judged the runner dead: its heartbeat went stale) records the same end.
    ended = time.time() - 5
    await store.transition("j", JobStatus.COMPLETED, expect=(JobStatus.RUNNING,), run_id="run1",
                           fields=completed_at(ended), message="completed, recorded by the scheduler")  # fmt: skip
    # Not the runner's: it must not go on to run the automatic export the scheduler now takes care of.
    assert await asyncio.wait_for(finishing, 30) is False
    job = await require(store, "j")
    assert job.status == JobStatus.COMPLETED and job.finished_at == ended
