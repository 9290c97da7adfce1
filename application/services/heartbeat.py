"""A heartbeat kept in the background while a runner waits on something long (its own loop beats otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any


@contextlib.asynccontextmanager
async def beating(beat: Callable[[], Awaitable[Any]], interval: float) -> AsyncIterator[None]:
    """Call `beat` now and every `interval` seconds until the block ends."""
    stop = asyncio.Event()

    async def loop() -> None:
        stopped = asyncio.ensure_future(stop.wait())
        while not stop.is_set():
            await beat()
            await asyncio.wait([stopped], timeout=interval)

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
