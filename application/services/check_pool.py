"""Where the disk checks of creates and uploads run: threads of their own, one check of an owner's at a time.

A data set check reads the whole file (rows counted, media looked for): seconds for a big one. On the loop's
default pool one key's burst of creates took every thread, and another owner's small upload, whose disk writes
wait for one of them too, took 41 s (hunt DD). Here an owner's checks run one after the other, and no check
takes a thread that the uploads' writes or a page's file reads need.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

THREADS = 2


class CheckPool:
    def __init__(self, threads: int = THREADS) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="checks")
        self._turns: dict[str | None, asyncio.Lock] = {}

    async def run(self, owner: str | None, check: Callable[[], T]) -> T:
        """`check()` in a thread of the pool, once the owner's checks that came first are done."""
        turn = self._turns.setdefault(owner, asyncio.Lock())
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
