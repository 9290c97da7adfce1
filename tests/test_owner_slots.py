"""Per-key slots for long requests (streams, uploads, downloads), counted in a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from application.exceptions import TooMany
from application.services.owner_slots import OwnerSlots, Slot, holding


def slots(client: aioredis.Redis, ttl: float) -> OwnerSlots:
    return OwnerSlots(client, lambda owner: f"test-slots:{owner}", cap=1, ttl=ttl, setting="CAP", what="things",
                      advice="wait")  # fmt: skip


async def items(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


async def test_a_request_whose_slot_lapsed_while_it_stalled_may_not_go_on_past_the_cap(
    redis_client: aioredis.Redis,
) -> None:
    # A client that stops reading for longer than a slot lasts let its slot lapse; the next request took its
    # place, and the stalled one went on without any: a key could hold any number of stalled requests.
    cap = slots(redis_client, ttl=0.3)
    stalled = await cap.take("alice")
    assert stalled is not None
    with pytest.raises(TooMany):
        await cap.take("alice")
    deadline = time.monotonic() + 10
    while (taken := await _try(cap)) is None:  # once the stalled one's slot has lapsed
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    stalled.renew_at = 0.0  # it renews at its next item
    with pytest.raises(TooMany, match="already has 1 things"):
        async for _ in stalled.renewing(items(3)):
            pass
    await taken.release()
    # With room again, a lapsed slot is simply taken back and the request goes on.
    stalled.renew_at = 0.0
    assert [i async for i in stalled.renewing(items(3))] == [0, 1, 2]
    assert await redis_client.zcard("test-slots:alice") == 1


async def _try(cap: OwnerSlots) -> Slot | None:
    try:
        return await cap.take("alice")
    except TooMany:
        return None


async def test_a_response_whose_slot_cannot_be_taken_back_ends_where_it_is(redis_client: aioredis.Redis) -> None:
    # A stream or download has answered 200 already: it ends (the client may reconnect, and is then told 429),
    # rather than failing with an error the server logs as its own.
    cap = slots(redis_client, ttl=0.3)
    stalled = await cap.take("alice")
    assert stalled is not None
    deadline = time.monotonic() + 10
    while (taken := await _try(cap)) is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    stalled.renew_at = 0.0
    assert [i async for i in holding(stalled, items(3))] == []
    assert await redis_client.zrange("test-slots:alice", 0, -1) == [taken.id]  # its own slot is not given back
