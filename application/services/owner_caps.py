"""The per-owner limits within one scheduling pass: MAX_GPUS_PER_OWNER (GPUs held) and MAX_RUNNING_PER_OWNER
(runs at once, on GPUs or the CPU): what each owner holds, when its runs end, and what its waiting jobs ahead
claim. An owner's jobs take its limits in queue order: a later job of the owner started on them would keep the
jobs ahead of it over a limit when their GPUs come free, and a stream of such jobs would keep them there for
ever (a job of lower priority too)."""

from __future__ import annotations

from collections.abc import Iterable

INF = float("inf")


def beyond_gpu_cap(num_gpus: int, owner: str | None, cap: int) -> str | None:
    """Why an owner's job can never start under MAX_GPUS_PER_OWNER=`cap` (lowered since its create), or None."""
    if not cap or owner is None or num_gpus <= cap:
        return None
    return (f"it asks for {num_gpus} GPUs, more than one owner may hold (MAX_GPUS_PER_OWNER={cap}): create it again "
            f"with num_gpus of {cap} or fewer")  # fmt: skip


class OwnerCaps:
    def __init__(self, gpu_cap: int, run_cap: int, running: Iterable[tuple[str | None, int, float | None]],
                 now: float) -> None:  # fmt: skip
        """`running`: (owner, GPUs held, seconds left or None) of each running job."""
        self.gpu_cap, self.run_cap, self.now = gpu_cap, run_cap, now
        self.active = bool(gpu_cap or run_cap)
        self.gpus: dict[str, int] = {}  # held, then claimed by waiting jobs ahead
        self.runs: dict[str, int] = {}
        # When each owner's runs, and then its waiting jobs ahead, end (None: not known), with their GPUs.
        self.ends: dict[str, list[tuple[float | None, int]]] = {}
        for owner, k, left in running:
            self.add(owner, k, left)

    def add(self, owner: str | None, k: int, seconds: float | None) -> None:
        """A run of `k` GPUs (0: on the CPU) for `seconds` more (None: not known), running or started now."""
        self._count(owner, k, self.now + max(0.0, seconds) if seconds is not None else None)

    def over(self, owner: str | None, k: int) -> bool:
        """Would a run of `k` GPUs take its owner over a limit, counting what its waiting jobs ahead claim?"""
        if not self.active or owner is None:
            return False
        if self.run_cap and self.runs.get(owner, 0) + 1 > self.run_cap:
            return True
        return bool(self.gpu_cap) and k > 0 and self.gpus.get(owner, 0) + k > self.gpu_cap

    def claim(self, owner: str | None, k: int, start: float | None, seconds: float | None) -> None:
        """A waiting job's share of its owner's limits, from `start` (None: not known) for `seconds`. Counted
        whatever its start, so that both scheduling passes count the same (`decide` does not work out every
        start); not for a job that can never start (more GPUs than the cap)."""
        if not self.active or beyond_gpu_cap(k, owner, self.gpu_cap) is not None:
            return
        end = start + max(0.0, seconds) if start is not None and start != INF and seconds is not None else None
        self._count(owner, k, end)

    def _count(self, owner: str | None, k: int, end: float | None) -> None:
        if owner is not None:
            self.gpus[owner] = self.gpus.get(owner, 0) + k
            self.runs[owner] = self.runs.get(owner, 0) + 1
            self.ends.setdefault(owner, []).append((end, k))

    def under_cap_at(self, owner: str, k: int) -> float | None:
        """When enough of the owner's runs and waiting jobs ahead have ended for one more run of `k` GPUs (None:
        one of them has no known end)."""
        ends = sorted(self.ends.get(owner, ()), key=lambda e: (e[0] is None, e[0] or 0.0))
        gpus_back = self.gpus.get(owner, 0) + k - self.gpu_cap if self.gpu_cap and k > 0 else 0
        runs_back = self.runs.get(owner, 0) + 1 - self.run_cap if self.run_cap else 0
        at, gpus, runs = self.now, 0, 0
        for end, n in ends:
            if gpus >= gpus_back and runs >= runs_back:
                break
            if end is None:
                return None
            at, gpus, runs = end, gpus + n, runs + 1
        return at if gpus >= gpus_back and runs >= runs_back else None
