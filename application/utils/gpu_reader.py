"""The scheduler's GPU reading: the inventory read in a thread of its own, and given up on after a time limit.

NVML calls block, and a hung driver (a GPU fallen off the bus, a driver mid-reset) can block one for good. Read on
the loop's default pool, the scheduler waited for it without a word: its queue stood still while `/queue` showed
every GPU free and `/health` said healthy, and it could not even shut down, as `asyncio.run` joins that pool
(hunt DO). A reading that has not come back within `timeout` is published as every GPU unreadable (busy, as a GPU
NVML cannot read is), saying why. Later rounds do not start another call behind the hung one, nor wait for it
again: they look whether it came back. Its thread is a daemon, so it keeps no process alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from application.services import clock
from application.utils.gpu_types import READING_HUNG, GpuInventory, GpuSnapshot, unreadable_gpu

READ_TIMEOUT_SECONDS = 10.0


class GpuReader:
    def __init__(self, inventory: GpuInventory, timeout: float = READ_TIMEOUT_SECONDS) -> None:
        self.inventory = inventory
        self.timeout = timeout
        self._pending: asyncio.Future[GpuSnapshot] | None = None
        self._since = 0.0  # when the pending reading began (monotonic)
        self._last: GpuSnapshot | None = None

    def remember(self, snapshot: GpuSnapshot) -> None:
        """The GPUs a reading showed before this process read any (the one its predecessor published): what a
        reading that cannot list them (NVML hung, or not started) shows, unreadable. Without them it showed none,
        and every GPU create was refused as one that can never be met (review DP)."""
        if self._last is None and snapshot.backend == self.inventory.backend and snapshot.gpus:
            self._last = snapshot

    async def read(self) -> GpuSnapshot:
        if self._pending is None:
            self._pending, self._since = self._start(), time.monotonic()
        pending, waited = self._pending, time.monotonic() - self._since
        try:
            snapshot = await asyncio.wait_for(asyncio.shield(pending), max(0.0, self.timeout - waited))
        except TimeoutError:
            return self._unreadable(f"{READING_HUNG} for {time.monotonic() - self._since:.0f} s (NVML hung: a GPU "
                                    "fallen off the bus, or a driver being reset?); every GPU counts as busy until it "
                                    "does")  # fmt: skip
        finally:
            if pending.done():  # (a reading that raised is not raised again: the next round reads afresh)
                self._pending = None
        if snapshot.gpus_unknown:
            return self._unreadable(str(snapshot.error))
        self._last = snapshot
        return snapshot

    def _start(self) -> asyncio.Future[GpuSnapshot]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GpuSnapshot] = loop.create_future()

        def settle(snapshot: GpuSnapshot | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(snapshot)  # type: ignore[arg-type]

        def work() -> None:
            snapshot, error = None, None
            try:
                snapshot = self.inventory.snapshot()
            except BaseException as exc:  # (snapshot() does not raise: a bug, given to whoever awaits)
                error = exc
            with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile: no one waits any more)
                loop.call_soon_threadsafe(settle, snapshot, error)

        threading.Thread(target=work, name="gpu-reading", daemon=True).start()
        return future

    def _unreadable(self, why: str) -> GpuSnapshot:
        last = self._last
        gpus = tuple(unreadable_gpu(g.index, g, why) for g in last.gpus) if last else ()
        return GpuSnapshot(self.inventory.backend, gpus, why, last.driver_version if last else None, clock.now())
