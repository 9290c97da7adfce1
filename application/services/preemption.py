"""Which running jobs to preempt for a waiting one (PREEMPTION=on): a pure function, like `scheduler.plan`.

Determined preempts low-priority work and resumes it from checkpoints; Slurm's REQUEUE does the same. Here a queued
job that cannot start may take the GPUs of running jobs of strictly lower priority: as few as needed, preferring
the lowest priority, then the fewest GPUs freed past the need, the fewest runs, the least work lost since their
last checkpoint (times the GPUs held), the most recently started (`_fewest`). A job that has run less than
`min_run` seconds since its last start is never preempted, so two jobs cannot take GPUs from each other in turn;
one that should end soon, before the work it would lose, is waited for. The victims go back to the queue at their
place and resume from their checkpoints (`run_end.conclude`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from application.services.scheduler import GpuState, QueuedJob, RunningJob, gpu_is_free

# What preemption reads of each running job besides the planner's view (`candidates`).
FIELDS = ("priority", "last_checkpoint_at", "preempt_for")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A running job as preemption sees it."""

    job_id: str
    priority: int
    gpu_ids: tuple[int, ...]
    started_at: float
    lost_seconds: float  # training since its last checkpoint (or its start): what a preemption throws away
    ending: bool = False  # asked to stop, pause or make way already: its GPUs come back without a preemption


def candidates(running: Sequence[RunningJob], rows: Sequence[Sequence[str | None]],
               now: float) -> tuple[list[Candidate], bool]:  # fmt: skip
    """The running jobs as preemption sees them, from their `FIELDS` (`rows`, stored JSON), and whether a
    preemption is under way already (one of them is making way)."""
    found = []
    under_way = False
    for r, (prio, saved, making_way) in zip(running, rows, strict=True):
        under_way = under_way or bool(making_way and json.loads(making_way))
        # A run asked to stop, pause or make way, past its time limit (its runner stops it in its grace) or with
        # its record gone gives its GPUs back anyway: only they count (preempting another run for them threw its
        # work away), whatever else could be read of it.
        if r.ending:
            found.append(Candidate(r.job_id, int(json.loads(prio)) if prio else 0, r.gpu_ids, r.started_at or now,
                                   0.0, ending=True))  # fmt: skip
            continue
        if prio is None or r.started_at is None:
            continue
        last_save = float(json.loads(saved)) if saved and json.loads(saved) else r.started_at
        found.append(Candidate(r.job_id, int(json.loads(prio)), r.gpu_ids, r.started_at,
                               now - max(r.started_at, last_save)))  # fmt: skip
    return found, under_way


def choose_victims(
    job: QueuedJob,
    gpus: Sequence[GpuState],
    running: Sequence[Candidate],
    *,
    min_free_gb: float,
    max_util: float,
    min_run: float,
    now: float,
    ends: Mapping[str, float] | None = None,
) -> list[str] | None:
    """The running jobs to preempt so that `job` can start, or None when lower-priority jobs cannot free
    enough (or none may be preempted yet). `ends`: runs' seconds left (by prediction or time limit); while a
    run it would preempt ends within `min_run`, and before the work its preemption would throw away,
    nothing is preempted: its end is waited for (3,000 s of training were lost to save 5 s: hunt AZ), and the
    next passes find its GPUs free (`preemption_wait` plans the preemption for then)."""
    by_index = {g.index: g for g in gpus}
    need = max(min_free_gb, job.min_gpu_memory_gb or 0.0)
    wanted = set(job.gpu_ids) if job.gpu_ids else None
    k = len(wanted) if wanted else job.num_gpus
    if k <= 0:
        return None
    free = {g.index for g in gpus if gpu_is_free(g, min_free_gb=need, max_util=max_util)}
    # A run being stopped or paused gives its GPUs back anyway: evicting another for them threw its work away.
    free.update(i for c in running if c.ending for i in c.gpu_ids)

    # A GPU whose reading failed is no use to anyone until it reads again: evicting its job frees nothing.
    usable = {i for i, g in by_index.items() if g.readable and g.memory_usable_gb >= need}
    if wanted is not None and not wanted <= {i for i, g in by_index.items() if g.readable}:
        return None

    def enough(freed: set[int]) -> bool:
        if wanted is not None:
            return wanted <= freed
        # A GPU a victim gives back has all its memory again.
        return sum(1 for i in freed if i in usable) >= k

    def gives(c: Candidate) -> int:
        """How many of the GPUs the job lacks `c` gives back."""
        if wanted is not None:
            return len(wanted & set(c.gpu_ids))
        return sum(1 for i in c.gpu_ids if i in usable)

    if enough(free):
        return None  # it can start without anyone's GPUs: not preemption's business

    def may_go(c: Candidate) -> bool:
        return not c.ending and c.priority < job.priority and now - c.started_at >= min_run and gives(c) > 0

    # Only a run it would otherwise preempt is waited for: one of a higher priority ending soon (a backfilled
    # one after another) could put the preemption off for ever (review BE).
    if any(may_go(c) and _ends_first(c, ends, min_run) for c in running):
        return None
    short = len(wanted - free) if wanted is not None else k - sum(1 for i in free if i in usable)
    chosen = _fewest([c for c in running if may_go(c)], gives, short)
    return [c.job_id for c in chosen] if chosen is not None else None


# The runs `_fewest` weighs every set of (255 sets at most, about a millisecond: a pass runs it for the head and
# the queue's estimates for each moment they look at); past that, it adds runs one by one, by the same order.
EXACT_SEARCH_MAX = 8


def _fewest(eligible: Sequence[Candidate], gives: Callable[[Candidate], int], short: int) -> list[Candidate] | None:
    """The victims that give `short` more of the GPUs the job can use (`gives`: how many a run gives; their GPUs
    are disjoint), chosen by, in order: the lowest priorities (how far above the lowest their priorities are,
    summed); the fewest GPUs freed past the need (a
    3-GPU run preempted for a 1-GPU job left two idle, and it could not run again until a third came free: hunt
    DI); the fewest runs; the least work lost (seconds since the last checkpoint, times the GPUs each held); the
    most recently started. Only the lowest priorities that can give enough are weighed at all."""
    by_priority = sorted(eligible, key=lambda c: c.priority)
    total, upto = 0, 0
    while upto < len(by_priority) and total < short:  # the lowest priorities that can give enough
        total += gives(by_priority[upto])
        upto += 1
    if total < short:
        return None
    top = by_priority[upto - 1].priority
    pool = [c for c in by_priority if c.priority <= top and gives(c) > 0]
    floor = pool[0].priority

    def cost(victims: Sequence[Candidate]) -> tuple[Any, ...]:
        # First how far above the lowest priority its victims are, summed: two priority-1 runs were stopped where a
        # priority-0 run and one priority-1 run would do, the priority-0 one training on (review DL); runs of one
        # priority are then told apart by the GPUs they leave idle, not by their number.
        return (sum(c.priority - floor for c in victims), sum(len(c.gpu_ids) for c in victims) - short,
                len(victims), sum(c.lost_seconds * len(c.gpu_ids) for c in victims),
                sorted(-c.started_at for c in victims), sorted(c.job_id for c in victims))  # fmt: skip

    def alone(c: Candidate) -> tuple[Any, ...]:
        """A run's place in the greedy order: those that give the most without freeing GPUs past the need first
        (four 1-GPU runs were stopped where one 4-GPU run would do: review DL)."""
        return (c.priority, max(0, len(c.gpu_ids) - short), -gives(c), c.lost_seconds * len(c.gpu_ids),
                -c.started_at, c.job_id)  # fmt: skip

    if len(pool) > EXACT_SEARCH_MAX:
        # Greedy: the cheapest first, then any the others make unnecessary dropped.
        chosen: list[Candidate] = []
        for c in sorted(pool, key=alone):
            if sum(map(gives, chosen)) >= short:
                break
            chosen.append(c)
        for c in reversed(list(chosen)):
            if sum(gives(o) for o in chosen if o is not c) >= short:
                chosen.remove(c)
        return chosen
    best: tuple[tuple[Any, ...], list[Candidate]] | None = None
    for size in range(1, len(pool) + 1):
        for victims in itertools.combinations(pool, size):
            if sum(map(gives, victims)) >= short and (best is None or cost(victims) < best[0]):
                best = (cost(victims), list(victims))
    return best[1] if best is not None else None


def _ends_first(c: Candidate, ends: Mapping[str, float] | None, within: float) -> bool:
    """The run should end within `within` seconds, and before the work since its last checkpoint (bounded: a
    run with no checkpoint past half its estimate would be waited for that long)."""
    left = (ends or {}).get(c.job_id)
    return left is not None and left <= min(c.lost_seconds, within)


def preemption_wait(
    job: QueuedJob,
    gpus: Sequence[GpuState],
    running: Sequence[Candidate],
    *,
    min_free_gb: float,
    max_util: float,
    min_run: float,
    now: float,
    ends: Mapping[str, float] | None = None,
) -> tuple[float, list[str]] | None:
    """For a waiting job's estimate: the seconds until preemption frees enough GPUs for it (0: the next pass
    asks), with its victims then; None when lower-priority runs cannot free enough at any time, or when runs
    that end by themselves first (`ends`: their seconds left, by prediction or time limit) free enough."""
    moments = sorted({max(now, c.started_at + min_run) for c in running
                      if c.gpu_ids and not c.ending and c.priority < job.priority}
                     | {now + left for left in (ends or {}).values() if left > 0})  # fmt: skip
    for at in moments:
        # Runs over by then give their GPUs back anyway: none of them is a victim. (A hair of slack again: a
        # moment now + left, less now, can round below left.)
        then = [replace(c, ending=True) if (ends or {}).get(c.job_id, math.inf) <= at - now + 1e-6 else c
                for c in running]  # fmt: skip
        # As a pass at that moment sees them: less time left, more work since the last checkpoint.
        later = {j: left - (at - now) for j, left in (ends or {}).items()}
        then = [replace(c, lost_seconds=c.lost_seconds + at - now) for c in then]
        # (a hair past the moment: started_at + min_run - started_at can round below min_run)
        if victims := choose_victims(job, gpus, then, min_free_gb=min_free_gb, max_util=max_util, min_run=min_run,
                                     now=at + 1e-6, ends=later):  # fmt: skip
            return at - now, victims
        # A stand-in victim holding every GPU: no victim chosen means the job needs none by then.
        everything = Candidate("", -(2**62), tuple(g.index for g in gpus), -math.inf, 0.0)
        if not choose_victims(job, gpus, [*then, everything], min_free_gb=min_free_gb, max_util=max_util, min_run=0,
                              now=at):  # fmt: skip
            return None
    return None
