"""The background heartbeat a runner keeps while it waits on something long."""

from __future__ import annotations

import asyncio
import time

from application.services.heartbeat import beating


async def test_beats_on_each_interval_until_the_block_ends() -> None:
    beats: list[float] = []

    async def beat() -> None:
        beats.append(time.monotonic())

    async with beating(beat, 0.05):
        await asyncio.sleep(0.3)
    ended = len(beats)
    assert ended >= 4, beats
    await asyncio.sleep(0.2)
    assert len(beats) == ended  # none after the block
    async with beating(beat, 10.0):  # ended within its interval: the caller's own beat was enough
        await asyncio.sleep(0)
    assert len(beats) == ended


async def test_a_beat_that_swallows_its_cancellation_still_ends_with_the_block() -> None:
    # redis-py returns its reply when a cancellation lands as it comes: a cancelled beat went on for ever, and the
    # runner waiting for it never ended.
    beats = 0

    async def swallowing() -> None:
        nonlocal beats
        beats += 1
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass

    started = time.monotonic()
    async with beating(swallowing, 0.001):
        await asyncio.sleep(0.2)
    assert time.monotonic() - started < 2.0
    after = beats
    await asyncio.sleep(0.2)
    assert beats == after
