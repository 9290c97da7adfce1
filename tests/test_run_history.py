"""What completed runs teach the predictions, as stored in a real Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

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
