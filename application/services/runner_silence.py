"""Runners that stopped answering: how long each has gone without a heartbeat, as the leading scheduler saw it,
and the kill of a live one of this host that stayed silent (stopped with SIGSTOP, or hung).

A silence counts from the first sweep that found no beat (a runner not seen beating yet, a Redis that was away),
and is read again right before anything is done about it (`confirmed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

from loguru import logger

from application.config import Settings
from application.models.training_model import RunnerInfo
from application.services.cluster_store import ClusterStore
from application.services.launcher import RunnerLauncher

# A runner on this host whose process lives but whose heartbeat has been missing this many RUNNER_HEARTBEAT_TTLs
# (or RUNNER_POLL_INTERVALs, when longer) in a row, as this scheduler saw it, is stopped (SIGSTOP) or hung: it
# would hold its GPUs, and ignore stops and time limits, for ever.
HUNG_AFTER_TTLS = 3

Own = Callable[[dict[str, Any] | None], bool]  # whether a heartbeat is the runner's own (its run or export id)


class Silence:
    def __init__(self, cluster: ClusterStore, launcher: RunnerLauncher, settings: Settings,
                 fence: Callable[[], str | None]) -> None:  # fmt: skip
        self.cluster = cluster
        self.launcher = launcher
        self.settings = settings
        self.fence = fence
        # By run or export id: when its runner was first seen without a heartbeat; why it was killed.
        self._since: dict[str, float] = {}
        self.hung: dict[str, str] = {}

    @property
    def patience(self) -> float:
        # A runner beats every RUNNER_POLL_INTERVAL: set longer than the TTL, its key lapses between beats.
        return HUNG_AFTER_TTLS * max(self.settings.RUNNER_HEARTBEAT_TTL, self.settings.RUNNER_POLL_INTERVAL)

    def clear(self) -> None:
        """Redis was away: no runner could beat, so silence counts again from the first sweep that reads it."""
        self._since.clear()

    def keep_only(self, watched: Collection[str | None]) -> None:
        self._since = {key: since for key, since in self._since.items() if key in watched}
        self.hung = {key: why for key, why in self.hung.items() if key in watched}

    def of(self, key: str | None, beating: bool) -> float:
        """How long the runner of `key` (a run or export id) has gone without a heartbeat."""
        if beating or key is None:
            self._since.pop(key or "", None)
            return 0.0
        return time.monotonic() - self._since.setdefault(key, time.monotonic())

    async def confirmed(self, job_id: str, key: str | None, own: Own) -> bool:
        """Read again right before a runner is judged gone: it has not beaten since, and this scheduler still
        leads. A scheduler frozen mid-sweep (SIGSTOP, a stalled VM) woke to judge by the beats it read before
        its stall, and killed a healthy runner, also once it had lost the lead (hunt AY): only the record of the
        end was fenced, not the kill."""
        beat, leading = await self.cluster.heartbeat_and_lead(job_id, key, self.fence())
        if own(beat):
            self._since.pop(key or "", None)
            return False
        return leading

    async def gone(self, job_id: str, key: str | None, beating: bool, own: Own) -> bool:
        """A runner only its heartbeat can tell of (another host's): silent past patience, confirmed."""
        return self.of(key, beating) >= self.patience and await self.confirmed(job_id, key, own)

    async def killed(self, job_id: str, key: str | None, runner: RunnerInfo, beating: bool, own: Own) -> bool:
        """Kill a live runner of this host silent past patience, keeping why under `key` for the record of the
        end."""
        silent = self.of(key, beating)
        if silent < self.patience or key is None or not await self.confirmed(job_id, key, own):
            return False
        if not self.launcher.kill(runner):  # (nothing awaited since the read: no other step of this process ran)
            return False
        self.hung[key] = (f"runner (pid {runner.pid}) stopped answering: no heartbeat for {silent:.0f} s "
                          "while its process lived (stopped or hung); it was killed")  # fmt: skip
        logger.warning("job {}: {}", job_id, self.hung[key])
        return True
