"""What completed runs teach the predictions, as stored in a real Redis."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import redis.asyncio as aioredis

from application.models.training_model import Progress
from application.services.embedded_redis import EmbeddedRedis
from application.services.keys import Keys
from application.services.run_history import HISTORY_TTL_SECONDS, RunHistory, keys_of
from tests.test_job_store import make_job


async def test_each_kind_of_run_is_forgotten_when_not_seen_again_for_half_a_year(redis_client: aioredis.Redis) -> None:
    # One key per model, data set, GPU count and training settings: without an end their number only grew.
    keys = Keys("history-ttl")
    job = make_job("done")
    await RunHistory(redis_client, keys).record(job, 120.0, 40, 3.0)
    profile, similar = keys_of(job)
    for key in (keys.step_profile(profile), keys.run_durations(similar)):
        assert HISTORY_TTL_SECONDS - 60 < await redis_client.ttl(key) <= HISTORY_TTL_SECONDS, key


async def test_a_sample_redis_refused_is_to_be_tried_again_and_one_that_may_have_landed_is_not(
    own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    # A run that ended while Redis refused writes (at its maxmemory) lost its duration sample for good: the runner
    # logged it and went on (hunt CI). It now tries again once Redis has taken the run's end.
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    history = RunHistory(client, Keys("t"))
    job = make_job("j")
    durations = history.keys.run_durations(keys_of(job)[1])
    progress = Progress(current_step=10, max_steps=10)
    try:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", "1")
        assert await history.learn(job, 60.0, progress, 55.0) is False  # (refused: made nowhere, to try again)
        await client.config_set("maxmemory", "0")
        # NOREPLICAS (MISCONF alike), which redis-py words "Command # 1 (...) of pipeline caused error: ...".
        await client.config_set("min-replicas-to-write", "1")
        assert await history.learn(job, 60.0, progress, 55.0) is False
        await client.config_set("min-replicas-to-write", "0")
        assert await history.learn(job, 60.0, progress, 55.0) is True
        assert await client.lrange(durations, 0, -1) == ["60.0"]
        # An error in EXEC itself leaves the transaction's other writes made: not to be tried again (twice).
        await client.delete(history.keys.history_version)
        await client.rpush(history.keys.history_version, "a list")
        assert await history.learn(job, 62.0, progress, 55.0) is True
        assert await client.lrange(durations, 0, -1) == ["62.0", "60.0"]
    finally:
        await client.aclose()
    # A reply lost on a dropped connection: the sample may be there already, so it is not tried again.
    assert own_redis.process is not None
    gone = aioredis.Redis.from_url(own_redis.url, decode_responses=True, socket_timeout=0.5)
    try:
        os.kill(own_redis.process.pid, signal.SIGSTOP)  # (own_redis's teardown lets it go on if this fails)
        assert await RunHistory(gone, Keys("t")).learn(job, 61.0, progress, 55.0) is True
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
        await gone.aclose()
