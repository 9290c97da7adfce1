"""Where the disk checks of creates and uploads run: threads of their own, a few of an owner's at a time.

A data set check reads the whole file (rows counted, media looked for): seconds for a big one. On the loop's
default pool one key's burst of creates took every thread, and another owner's small upload, whose disk writes
wait for one of them too, took 41 s (hunt DD). Here a key's checks run PER_OWNER at a time (a server without keys
is one owner: two, so that a small check passes a big one), and no check takes a thread that the uploads' writes
or a page's file reads need.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

THREADS = min(32, (os.cpu_count() or 1) + 4)  # (as the loop's default pool)
PER_OWNER = 2


class CheckPool:
    def __init__(self, threads: int = THREADS, per_owner: int = PER_OWNER) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="checks")
        self._turns: dict[str | None, asyncio.Semaphore] = {}  # (one per key that ever checked: keys are few)
        self._per_owner = per_owner

    async def run(self, owner: str | None, check: Callable[[], T]) -> T:
        """`check()` in a thread of the pool, once fewer than `per_owner` of the owner's are under way."""
        turn = self._turns.setdefault(owner, asyncio.Semaphore(self._per_owner))
        await turn.acquire()
        try:
            done = asyncio.get_running_loop().run_in_executor(self._executor, check)
        except BaseException:
            turn.release()
            raise
        # Given back when the check ends, not when its request does: a client that hangs up leaves its check
        # running in the thread, and the owner's next one waits for it all the same.
        done.add_done_callback(lambda _: turn.release())
        return await asyncio.shield(done)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
