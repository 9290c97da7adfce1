"""MAX_GPUS_PER_OWNER within one scheduling pass: the GPUs each owner holds, when its runs end, and what its
waiting jobs ahead claim. An owner's jobs take its cap in queue order: a later job of the owner started on the
cap would keep the jobs ahead of it over the cap when their GPUs come free, and a stream of such jobs would
keep them there for ever (a job of lower priority too)."""

from __future__ import annotations

from collections.abc import Iterable

INF = float("inf")


class OwnerCaps:
    def __init__(self, cap: int, running: Iterable[tuple[str | None, int, float | None]], now: float) -> None:
        """`running`: (owner, GPUs held, seconds left or None) of each running job."""
        self.cap, self.now = cap, now
        self.held: dict[str, int] = {}
        # When each owner's runs, and then its waiting jobs ahead, end (None: not known), with how many GPUs.
        self.ends: dict[str, list[tuple[float | None, int]]] = {}
        self.claims: dict[str, int] = {}
        for owner, k, left in running:
            self.add(owner, k, left)

    def add(self, owner: str | None, k: int, seconds: float | None) -> None:
        """A run of `k` GPUs for `seconds` more (None: not known), running or started in this pass."""
        if owner is not None:
            self.held[owner] = self.held.get(owner, 0) + k
            self.ends.setdefault(owner, []).append((self.now + max(0.0, seconds) if seconds is not None else None, k))

    def over(self, owner: str | None, k: int) -> bool:
        if not self.cap or owner is None:
            return False
        return self.held.get(owner, 0) + self.claims.get(owner, 0) + k > self.cap

    def claim(self, owner: str | None, k: int, start: float | None, seconds: float | None) -> None:
        """A waiting job's share of its owner's cap, from `start` (None: not known) for `seconds`. Counted whatever
        its start, so that both scheduling passes count the same (`decide` does not work out every start); not
        for a job that can never start (more GPUs than the cap)."""
        if self.cap and owner is not None and k <= self.cap:
            self.claims[owner] = self.claims.get(owner, 0) + k
            end = start + max(0.0, seconds) if start is not None and start != INF and seconds is not None else None
            self.ends.setdefault(owner, []).append((end, k))

    def under_cap_at(self, owner: str, k: int) -> float | None:
        """When enough of the owner's runs and waiting jobs ahead have ended for `k` more GPUs (None: one of them
        has no known end)."""
        back, gone = self.held.get(owner, 0) + self.claims.get(owner, 0) + k - self.cap, 0
        for end, n in sorted(self.ends.get(owner, ()), key=lambda e: (e[0] is None, e[0] or 0.0)):
            if end is None:
                return None
            gone += n
            if gone >= back:
                return end
        return None
