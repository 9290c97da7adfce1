"""The one clock of every time that another host reads: Redis's.

The API role runs on any host and the scheduler and runners on the GPU hosts, and hosts' clocks disagree by
seconds to minutes. Times that one host writes and another compares with its own "now" (a run's start and its
duration, when a job was queued and how long it waited, the GPU reading's age, a slot's or a rate window's end)
went wrong by the skew: a live scheduler's GPU reading called stale, negative durations, a cap exceeded and
the request that held it cut off. So each process reads Redis's TIME now and then and anchors it to its own
monotonic clock; `now()` is that anchor moved on by the monotonic clock, so a step of this host's clock in
between (NTP) changes nothing either. Before the first reading, or without Redis, it is this host's clock.

Times of this host's own things stay on its own clock: file times (`os.stat`), process start times, timeouts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loguru import logger
from redis.exceptions import RedisError

# Read again this often: a monotonic clock drifts from real time by parts per million, Redis's host may be set.
RESYNC_SECONDS = 300.0
RETRY_SECONDS = 10.0  # after a failed reading (Redis away): the anchor so far stands meanwhile
SAMPLES = 3  # the reading of the shortest round trip of these is kept: a busy loop's delay is not the clock's
SKEW_WARNING_SECONDS = 2.0
STEP_WARNING_SECONDS = 1.0  # a reading this far from the last one's prediction is a step (drift is microseconds)
OFFSET_STEP = 0.01  # the grain of `from_local`'s offset, and how far it moves before it is taken again
SAME_CLOCK_SECONDS = 0.05  # clocks this close are one clock for a file's time (what a skew of more moves)


class Clock:
    def __init__(self) -> None:
        self._anchor: tuple[float, float] | None = None  # (Redis's time, this process's monotonic time) at once
        self._next = 0.0  # monotonic time of the next reading
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._offset: float | None = None  # Redis's clock less this host's, as `from_local` last took it
        self._round_trip = 0.0  # of the anchor's reading

    @property
    def anchored(self) -> bool:
        return self._anchor is not None

    def now(self) -> float:
        """Redis's time now, as Unix seconds (this host's clock until the first reading)."""
        if self._client is not None and time.monotonic() >= self._next:
            self._read_later()  # (a first reading that failed too: a process started while Redis was away)
        anchor = self._anchor
        if anchor is None:
            return time.time()
        return anchor[0] + (time.monotonic() - anchor[1])

    def from_local(self, local: float) -> float:
        """A time of this host's clock (a file's mtime) on the shared one: the file's own time where the two clocks
        agree within SAME_CLOCK_SECONDS (one host, or hosts kept in step by NTP), else moved by their offset in
        steps of OFFSET_STEP, kept until it moves by more than a step. Taken afresh at each call, the offset moved
        by microseconds, and each API worker's by its own: an unchanged file's time changed from one read to the
        next (hunt CP, review CV)."""
        offset = self.now() - time.time()
        if self._offset is None or abs(offset - self._offset) > OFFSET_STEP:
            self._offset = 0.0 if abs(offset) < SAME_CLOCK_SECONDS else round(offset / OFFSET_STEP) * OFFSET_STEP
        return local + self._offset

    async def sync(self, client: Any) -> bool:
        """Read Redis's time now and read it again every RESYNC_SECONDS from here on (on the next `now()` past
        it). False, the anchor kept, when Redis does not answer."""
        self._client = client
        best: tuple[float, float, float] | None = None  # (round trip, Redis's time, monotonic midpoint)
        try:
            for _ in range(SAMPLES):
                before = time.monotonic()
                seconds, micros = await client.time()
                after = time.monotonic()
                if best is None or after - before < best[0]:
                    best = (after - before, seconds + micros / 1e6, (before + after) / 2)
        except (RedisError, OSError) as exc:
            self._next = time.monotonic() + RETRY_SECONDS
            logger.debug("clock: Redis's time not read ({}); this process keeps its anchor", exc)
            if best is None:
                return False
        assert best is not None
        if self._client is not client:
            return False  # forgotten, or another client's meanwhile: not this reading's to set
        first = self._anchor is None
        moved = 0.0 if first else best[1] - self.now_at(best[2])
        # (each anchor is as good as half its round trip: a slow one, on a busy loop, is no step of the clock)
        unsure = (self._round_trip + best[0]) / 2
        self._anchor, self._round_trip = (best[1], best[2]), best[0]
        self._next = time.monotonic() + RESYNC_SECONDS
        skew = time.time() - self.now()
        if first and abs(skew) > SKEW_WARNING_SECONDS:
            logger.warning("this host's clock is {:+.1f} s off Redis's: times are kept on Redis's clock", skew)
        elif abs(moved) > STEP_WARNING_SECONDS + unsure:
            # Nothing else tells a step of Redis's clock (its host's NTP, an operator, a VM resumed): times this
            # process wrote before and after it disagree by as much (hunt DT).
            logger.warning("Redis's clock moved {:+.1f} s since this process last read it (a step of its host's "
                           "clock?): times from here are on the new reading", moved)  # fmt: skip
        return True

    def now_at(self, monotonic: float) -> float:
        """Redis's time at this process's monotonic time `monotonic`, by the anchor (this host's clock without)."""
        anchor = self._anchor
        if anchor is None:
            return time.time() - (time.monotonic() - monotonic)
        return anchor[0] + (monotonic - anchor[1])

    def _read_later(self) -> None:
        """A reading in the background, once due: `now()` is called where nothing may wait."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a thread: the next call on the loop reads
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return  # (one at a time)
        self._next = time.monotonic() + RETRY_SECONDS
        self._task = loop.create_task(self._resync(self._client))

    async def _resync(self, client: Any) -> None:
        try:
            await self.sync(client)
        except Exception as exc:  # (a client closed with its loop): this host's anchor stands, read again later
            logger.debug("clock: Redis's time not read ({!r})", exc)

    def forget(self) -> None:
        """Back to this host's clock (a test's, or a process's, Redis client is closed)."""
        self._anchor, self._client, self._next, self._task = None, None, 0.0, None


_clock = Clock()
now, from_local, sync, forget = _clock.now, _clock.from_local, _clock.sync, _clock.forget
