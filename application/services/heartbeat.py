"""A heartbeat kept in the background while a runner waits on something long (its own loop beats otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any


@contextlib.asynccontextmanager
async def beating(beat: Callable[[], Awaitable[Any]], interval: float) -> AsyncIterator[None]:
    """Call `beat` every `interval` seconds until the block ends. Not at once: the caller beat just before, and a
    block that ends within the interval (a run's usual end) then makes no call beside the caller's own (one in
    parallel took a second Redis connection, ~15 ms of a GPU hand-over under load)."""
    stop = asyncio.Event()

    async def loop() -> None:
        stopped = asyncio.ensure_future(stop.wait())
        while True:
            await asyncio.wait([stopped], timeout=interval)
            if stop.is_set():
                return
            await beat()

    task = asyncio.create_task(loop(), name="heartbeat")
    try:
        yield
    finally:
        # Told, not cancelled: redis-py can swallow a cancellation that lands as its reply comes (a beat then went
        # on for ever, and the runner never ended). Cancelled only if a beat hangs (on Redis).
        stop.set()
        await asyncio.wait([task], timeout=5.0)
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.5)
