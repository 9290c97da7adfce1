"""The GPUs through time, as one scheduling pass plans them (the machinery behind `scheduler.plan`).

Each GPU g carries `lb[g]`, the earliest time the plan may use it, `exact[g]`, whether that time is known
or only a lower bound (one of our jobs with no estimate), and `cap[g]`, the memory a job could get there.
A blocked job reserves the k GPUs that may free up first; its start (shadow time) is the latest of their
`lb`. A lower bound is the safe choice for a reservation: a job backfilled to end before it cannot delay a
start that cannot happen earlier anyway.

`slack[g]` is how long a job may run on free GPU g without delaying a reservation that binds the jobs being
planned now. Reservations of blocked jobs that have waited less than the policy's starvation time are
"soft" toward jobs of their own priority: where both durations are known (the candidate's estimate and the
blocked job's planned start) they bind as usual (backfill, `kslack`); where the predictions cannot
tell, the candidate may take those GPUs (first fit), until the blocked job has waited long enough; then it
drains the GPUs it needs. Soft reservations bind every job of lower priority: they become binding when the
plan moves on to a lower priority.

GPUs busy with outside processes are left out of the plan (lb = inf): we cannot tell when, or whether,
they come back, and reserving free GPUs for a job that waits on them could idle those forever.
"""

from __future__ import annotations

import math
from bisect import insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass

INF = math.inf
LinkScore = Callable[[int, int], int | None]


@dataclass(frozen=True, slots=True)
class Hold:
    """The reservation binding a free GPU: whose, and when it begins (seconds from now; `exact` False: no sooner,
    but a job of unknown duration decides when)."""

    job_id: str
    starts_in: float
    exact: bool = True


def choose(
    cands: list[int], k: int, link_score: LinkScore | None, cache: dict[tuple[int, int], int]
) -> tuple[int, ...]:
    """Pick k of `cands` (already in preference order: free memory, utilization, index)."""
    if link_score is None or k == 1 or k >= len(cands):
        return tuple(sorted(cands[:k]))

    def link(a: int, b: int) -> int:
        key = (a, b) if a < b else (b, a)
        v = cache.get(key)
        if v is None:
            s = link_score(key[0], key[1])
            # Unknown links add nothing, so they neither help nor hurt a set.
            v = 0 if s is None else s
            cache[key] = v
        return v

    rank = {g: i for i, g in enumerate(cands)}
    best_key: tuple[int, tuple[int, ...]] | None = None
    best: list[int] = []
    # Exhaustive search is C(8,4)=70 sets but C(64,8) on large nodes; greedy growth from every seed is
    # O(n^2 k^2) and finds the NVLink islands that matter in practice.
    for seed in cands:
        chosen = [seed]
        total = 0
        while len(chosen) < k:
            best_gain = -INF
            best_c = -1
            for c in cands:
                if c in chosen:
                    continue
                gain = sum(link(c, s) for s in chosen)
                if gain > best_gain:
                    best_gain, best_c = gain, c
            chosen.append(best_c)
            total += int(best_gain)
        key = (-total, tuple(sorted(rank[g] for g in chosen)))
        if best_key is None or key < best_key:
            best_key, best = key, chosen
    return tuple(sorted(best))


_UNWANTED = (False, 0)


class Timeline:
    def __init__(self, now: float, link_score: LinkScore | None) -> None:
        self.now = now
        self.link_score = link_score
        self.usable_mem: dict[int, float] = {}
        self.cap: dict[int, float] = {}
        self.lb: dict[int, float] = {}
        self.exact: dict[int, bool] = {}
        self.util: dict[int, float] = {}
        self.free_order: list[int] = []
        self.free_set: set[int] = set()
        # GPUs whose reading failed (NVML, the simulated file): never free, as outside processes, but said apart.
        self.unreadable: set[int] = set()
        self.profile: list[tuple[float, bool, int, int]] = []
        self.rank: dict[int, int] = {}
        # slack/holds bind every job; kslack/kholds add the soft reservations with a known start, which bind
        # the jobs whose own duration is known. kslack <= slack on every GPU.
        self.slack: dict[int, float] = {}
        self.holds: dict[int, Hold] = {}
        self.kslack: dict[int, float] = {}
        self.kholds: dict[int, Hold] = {}
        self.soft: dict[int, Hold] = {}
        self.soft_level: int | None = None
        self.slack_desc: list[float] = []
        self.kslack_desc: list[float] = []
        self.reservations = 0
        self._link_cache: dict[tuple[int, int], int] = {}
        self._fit_count: dict[float, int] = {}
        # GPUs that queued jobs need and others could do without, and how much (`gpu_wants.wanted`): the last
        # choice of a job that may take others.
        self.wanted: dict[int, tuple[bool, int]] = {}

    # ---- set-up ------------------------------------------------------------------------------------------

    def add_gpu(self, index: int, usable: float, free_mem: float, util: float | None,
                release: tuple[bool, float | None], is_free: bool) -> None:  # fmt: skip
        """One GPU: `usable` is the memory a job has on it when nothing else runs there (`GpuInfo.memory_usable_mb`),
        `release` is (held by one of our jobs, its remaining seconds or None)."""
        if index in self.usable_mem:
            raise ValueError(f"GPU index {index} listed twice")
        self.usable_mem[index] = usable
        self.util[index] = util or 0.0
        held, remaining = release
        if held:
            # Our own job's memory comes back whole when it ends; with no estimate (or past it), any moment.
            self.cap[index] = usable
            self.lb[index], self.exact[index] = (self.now, False) if remaining is None else \
                (self.now + max(0.0, remaining), True)  # fmt: skip
        elif is_free:
            self.free_order.append(index)
            self.cap[index] = free_mem
            self.lb[index], self.exact[index] = self.now, True
        else:
            self.cap[index] = free_mem
            self.lb[index], self.exact[index] = INF, False

    def seal(self) -> None:
        """Order the GPUs once they are all added."""
        self.free_order.sort(key=lambda i: (-self.cap[i], self.util[i], i))
        self.free_set = set(self.free_order)
        # Tie order for reservations; only free GPUs' utilization is ours to compare.
        order = sorted(self.usable_mem, key=lambda i: (-self.cap[i], self.util[i] if i in self.free_set else 0.0, i))
        self.rank = {i: p for p, i in enumerate(order)}
        # The GPUs by when the plan may use them, known times first among equals, then by the order above:
        # tuples sort natively, which keeps a reservation's choice cheap on 64-GPU simulations.
        self.profile = sorted((self.lb[i], not self.exact[i], self.rank[i], i) for i in order)
        self.slack = dict.fromkeys(self.free_order, INF)
        self.kslack = dict(self.slack)
        self.slack_desc = [INF] * len(self.free_order)
        self.kslack_desc = list(self.slack_desc)

    # ---- questions ---------------------------------------------------------------------------------------

    def feasible(self, ids: tuple[int, ...] | None, k: int, need: float) -> bool:
        """Could this request ever be met here?"""
        if ids:
            return len(set(ids)) == k and all(i in self.usable_mem and self.usable_mem[i] >= need for i in ids)
        cnt = self._fit_count.get(need)
        if cnt is None:
            cnt = self._fit_count[need] = sum(1 for m in self.usable_mem.values() if m >= need)
        return k <= cnt

    def may_fit(self, k: int, e: float) -> bool:
        """A cheap first look: enough free GPUs with enough slack for a job of `e` seconds (INF: unknown)."""
        return k <= len(self.free_order) and (self.slack_desc if e == INF else self.kslack_desc)[k - 1] >= e

    def fit(self, ids: tuple[int, ...] | None, k: int, need: float, min_free_gb: float,
            e: float) -> tuple[int, ...] | None:  # fmt: skip
        """Free GPUs this job may start on now without delaying a binding reservation, or None."""
        slack = self.slack if e == INF else self.kslack
        if ids:
            if all(i in self.free_set and self.cap[i] >= need and slack[i] >= e for i in ids):
                return tuple(sorted(ids))
            return None
        if need <= min_free_gb:
            cands = [i for i in self.free_order if slack[i] >= e]
        else:
            cands = [i for i in self.free_order if self.cap[i] >= need and slack[i] >= e]
        if len(cands) < k:
            return None
        if self.wanted and len(cands) > k:
            # (A reserved GPU is kept by its slack already; stable sort: the order within each part stays.)
            cands.sort(key=lambda i: self.wanted.get(i, _UNWANTED) if slack[i] == INF else _UNWANTED)
        return choose(cands, k, self.link_score, self._link_cache)

    def why_blocked(self, ids: tuple[int, ...] | None, k: int, need: float, e: float) -> tuple[str, Hold | None]:
        """Why a job that did not fit waits: a reservation on the free GPUs it could use, outside processes on
        GPUs it needs, or too few GPUs; and the binding reservation when that is it."""
        free = [i for i in (ids or self.free_order) if i in self.free_set and self.cap[i] >= need]
        if len(free) >= k:
            holds = self.holds if e == INF else self.kholds
            binding = min((holds[i] for i in free if i in holds), key=lambda h: h.starts_in, default=None)
            return "reservation", binding
        # Our own jobs' GPUs come back; only when those are not enough do the outside processes hold it up.
        pool = [i for i in (ids or self.usable_mem) if i in self.usable_mem and self.usable_mem[i] >= need]
        ours = sum(1 for i in pool if i not in self.free_set and self.lb[i] != INF)
        # A free GPU holds none of our jobs: less memory there than the job needs is an outside process's doing.
        stuck = [i for i in pool if self.lb[i] == INF or (i in self.free_set and self.cap[i] < need)]
        if len(free) + ours < k and stuck:
            return "gpu_unreadable" if all(i in self.unreadable for i in stuck) else "outside_processes", None
        return "resources", None

    # ---- changes ------------------------------------------------------------------------------------------

    def _move(self, gs: Sequence[int], new_lb: float, new_exact: bool) -> None:
        k = len(gs)
        if [t[3] for t in self.profile[:k]] == list(gs):
            del self.profile[:k]
        else:
            self.profile[:] = [t for t in self.profile if t[3] not in gs]
        for i in gs:
            self.lb[i], self.exact[i] = new_lb, new_exact
            insort(self.profile, (new_lb, not new_exact, self.rank[i], i))

    def _slack_changed(self) -> None:
        self.slack_desc = sorted(self.slack.values(), reverse=True)
        self.kslack_desc = sorted(self.kslack.values(), reverse=True)

    def _bind(self, i: int, hold: Hold, everyone: bool) -> bool:
        """Hold free GPU i for `hold`: for every job, or (a soft reservation with a known start) for the jobs
        whose own duration is known. True when a slack changed."""
        changed = False
        if everyone and hold.starts_in < self.slack[i]:
            self.slack[i] = hold.starts_in
            self.holds[i] = hold
            changed = True
        if hold.starts_in < self.kslack[i]:
            self.kslack[i] = hold.starts_in
            self.kholds[i] = hold
            changed = True
        return changed

    def start(self, chosen: tuple[int, ...], est: float | None) -> None:
        for i in chosen:
            self.free_set.discard(i)
            self.free_order.remove(i)
            del self.slack[i], self.kslack[i]
            self.holds.pop(i, None)
            self.kholds.pop(i, None)
            self.soft.pop(i, None)
        end, exact = (self.now, False) if est is None else (self.now + max(0.0, est), True)
        if all(self.lb[i] <= end for i in chosen):
            self._move(chosen, end, exact)
        else:
            # A job backfilled onto GPUs a blocked job reserved after it: they are next free when that one ends,
            # not when this one does (later jobs were planned onto GPUs the reservation takes).
            for i in chosen:
                self._move((i,), max(self.lb[i], end), exact and self.exact[i] if self.lb[i] > end else exact)
        self._slack_changed()

    def level(self, priority: int) -> None:
        """The plan reaches jobs of `priority`: soft reservations of a higher priority now bind."""
        if self.soft_level is not None and priority < self.soft_level and self.soft:
            for i, hold in self.soft.items():
                if i in self.slack:
                    self._bind(i, hold, True)
            self.soft.clear()
            self._slack_changed()
        self.soft_level = priority

    def earliest(self, ids: tuple[int, ...] | None, k: int, need: float, min_free_gb: float,
                 ) -> tuple[float, bool, Sequence[int]]:  # fmt: skip
        """When a job could start at the soonest, whether that is known, and on which GPUs (nothing changes)."""
        if ids:
            return (max(self.lb[i] if self.cap[i] >= need else INF for i in ids), all(self.exact[i] for i in ids),
                    ids)  # fmt: skip
        pool = self.profile if need <= min_free_gb else [t for t in self.profile if self.cap[t[3]] >= need]
        top = pool[:k]
        if len(top) < k:
            return INF, not any(t[1] for t in top), [t[3] for t in top]
        start = top[-1][0]
        if self.wanted and len(pool) > k and pool[k][0] <= start:
            # As `fit` will choose once they are free: last the cards big enough for more of the memory requests
            # behind. Planned on the one card a later job alone could use, the jobs ahead of it started elsewhere,
            # and it later than it was told, every duration known (hunt CL: 36 of 2,000 random queues, now 4).
            # (Not by the GPUs jobs name: that broke more promises than it kept.)
            ties = (t for t in pool if t[0] <= start)
            top = sorted(ties, key=lambda t: (self.wanted.get(t[3], _UNWANTED)[1], t[1]))[:k]
        return start, not any(t[1] for t in top), [t[3] for t in top]

    def reserve(self, job_id: str, ids: tuple[int, ...] | None, k: int, need: float, min_free_gb: float,
                est: float | None, floor: tuple[float, bool] | None, soft: bool) -> tuple[float, bool]:  # fmt: skip
        """Reserve the GPUs that free up first for a blocked job; its planned start and whether it is known.

        `floor` (strict): never planned before the job ahead of it. `soft`: the job has not waited long enough
        to drain GPUs from its own priority's jobs: its reservation binds them only where the predictions can
        tell (its start is known, and so is theirs); it binds jobs of lower priority in full.
        """
        start, start_exact, res = self.earliest(ids, k, need, min_free_gb)
        if floor is not None:
            start, start_exact = max(start, floor[0]), start_exact and floor[1]
        if start == INF:
            return start, False  # waits on outside processes: no reservation, it could idle free GPUs for ever
        self.reservations += 1
        hold = Hold(job_id, start - self.now, start_exact)
        touched = False
        for i in res:
            if i not in self.free_set:
                continue
            if soft:
                if i not in self.soft or hold.starts_in < self.soft[i].starts_in:
                    self.soft[i] = hold
                if start_exact:
                    touched = self._bind(i, hold, False) or touched
            else:
                touched = self._bind(i, hold, True) or touched
        # Without an estimate the job may also end at once: keep the lower bound.
        self._move(res, start if est is None else start + max(0.0, est), start_exact and est is not None)
        if touched:
            self._slack_changed()
        return start, start_exact

    def close_unreserved(self) -> None:
        """Past BACKFILL_DEPTH reservations: free GPUs none of them holds are kept for the jobs not looked at."""
        for slack in (self.slack, self.kslack):
            for i in slack:
                if slack[i] == INF:
                    slack[i] = -INF
        self._slack_changed()

    @property
    def open_gpus(self) -> bool:
        """A free GPU that no binding reservation holds: later reservations may still change the slacks."""
        return bool(self.slack_desc) and self.slack_desc[0] == INF

    @property
    def max_slack(self) -> float:
        """The most a job of known duration may run on a free GPU now."""
        return self.kslack_desc[0] if self.kslack_desc else -INF

    @property
    def closed(self) -> bool:
        """No free GPU left to any job (past BACKFILL_DEPTH, or none free)."""
        return not self.slack_desc or self.slack_desc[0] < 0.0
