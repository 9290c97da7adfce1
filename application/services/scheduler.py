"""Which queued jobs to start now, and on which GPUs: pure functions, no Redis, no I/O, no clock.

The caller (the queue processor) reads the queue, the GPU states and the running jobs, calls `decide`, and
acts on the returned starts. Keeping the decision pure lets the same code run in tests, in the trace
simulator (`benchmarks/simulate_trace.py`) and in the server, and makes every decision reproducible from
its inputs.

Policy choices (documented in the README):

* Queue order is priority (10 first), then submission time, then job id; `queue_score` packs the first two
  into one Redis sorted-set score and Redis orders equal scores by member, the job id.
* CPU-only jobs (num_gpus 0) always start, under both policies and even behind a blocked job: they take
  nothing a GPU job could wait for.
* A request that can never be met on these GPUs (more GPUs than exist, unknown or repeated ids, more memory
  than any GPU has) is skipped, so it never blocks the queue; the API rejects such requests at create.
* strict: the first GPU job that does not fit blocks every GPU job behind it.
* backfill: a job behind a blocked one starts only if, by the estimates, it cannot delay any blocked job
  ahead of it past its planned start (see `decide`). Unknown estimates count as "could end at once" for
  releases and "could run forever" for backfill candidates, so missing estimates never let small jobs
  starve a large one.
* GPUs that outside processes make busy are left out of the plan: a job that needs one waits without a
  reservation (under backfill others may use the free GPUs meanwhile), and its wait is unknown.
* Backfill plans around at most `BACKFILL_DEPTH` blocked jobs per pass; past that, GPUs none of them
  reserved are held back, so a pass stays cheap on a long queue and still delays no blocked job.
"""

from __future__ import annotations

import math
from bisect import insort
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "GpuState",
    "LinkScore",
    "QueuedJob",
    "RunningJob",
    "Start",
    "decide",
    "estimate_waits",
    "format_wait",
    "gpu_is_free",
    "queue_key",
    "queue_score",
    "score_priority",
    "score_submitted_at",
]

PRIORITY_MIN = 0
PRIORITY_MAX = 10

# Milliseconds get their own decimal band below the priority band. 1e13 ms is the year 2286, so the
# timestamp can never carry into the priority digit, and the largest score (priority 0) is about 1.1e14,
# far below 2**53: every score is an exact integer in a double and Redis compares them exactly.
_PRIORITY_STRIDE_MS = 10**13
_MAX_SUBMITTED_AT = _PRIORITY_STRIDE_MS / 1000

LinkScore = Callable[[int, int], int | None]

_INF = math.inf


@dataclass(frozen=True, slots=True)
class QueuedJob:
    job_id: str
    priority: int
    submitted_at: float
    num_gpus: int
    gpu_ids: tuple[int, ...] | None
    min_gpu_memory_gb: float | None
    estimated_duration: float | None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class GpuState:
    index: int
    memory_total_gb: float
    memory_free_gb: float
    # None when the backend cannot tell (simulated GPUs); counted as idle so such GPUs stay usable.
    utilization: float | None
    held_by: str | None


@dataclass(frozen=True, slots=True)
class RunningJob:
    job_id: str
    gpu_ids: tuple[int, ...]
    remaining_seconds: float | None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Start:
    job_id: str
    gpu_ids: tuple[int, ...]


# --------------------------------------------------------------------------------------------- queue order


def queue_score(priority: int, submitted_at: float) -> float:
    """Sorted-set score: ZRANGE ascending gives priority 10 first, then earliest submission (ms)."""
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(f"priority must be {PRIORITY_MIN}-{PRIORITY_MAX}, got {priority}")
    if not 0 <= submitted_at < _MAX_SUBMITTED_AT:
        raise ValueError(f"submitted_at must be a Unix time in [0, {_MAX_SUBMITTED_AT:.0f}), got {submitted_at}")
    # floor of a product is monotonic in submitted_at, so FIFO order survives the rounding to ms; two
    # submissions in the same millisecond fall back to job-id order, like any other score tie.
    return float((PRIORITY_MAX - priority) * _PRIORITY_STRIDE_MS + math.floor(submitted_at * 1000))


def score_priority(score: float) -> int:
    """Inverse of `queue_score` for the priority."""
    return PRIORITY_MAX - int(score) // _PRIORITY_STRIDE_MS


def score_submitted_at(score: float) -> float:
    """Inverse of `queue_score` for the submission time, to the millisecond."""
    return (int(score) % _PRIORITY_STRIDE_MS) / 1000


def queue_key(job: QueuedJob) -> tuple[float, str]:
    """Sort key giving exactly the Redis queue order, for callers that build a queue in memory."""
    return (queue_score(job.priority, job.submitted_at), job.job_id)


# ------------------------------------------------------------------------------------------------ GPUs


def gpu_is_free(gpu: GpuState, *, min_free_gb: float, max_util: float) -> bool:
    """Not held by one of our jobs, and other processes leave enough memory and compute."""
    if gpu.held_by is not None:
        return False
    if gpu.memory_free_gb < min_free_gb:
        return False
    return gpu.utilization is None or gpu.utilization <= max_util


def _choose(
    cands: list[int],
    k: int,
    link_score: LinkScore | None,
    link_cache: dict[tuple[int, int], int],
) -> tuple[int, ...]:
    """Pick k of `cands` (already in preference order: free memory, utilization, index)."""
    if link_score is None or k == 1 or k >= len(cands):
        return tuple(sorted(cands[:k]))

    def link(a: int, b: int) -> int:
        key = (a, b) if a < b else (b, a)
        v = link_cache.get(key)
        if v is None:
            s = link_score(key[0], key[1])
            # Unknown links add nothing, so they neither help nor hurt a set.
            v = 0 if s is None else s
            link_cache[key] = v
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
            best_gain = -_INF
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


# ------------------------------------------------------------------------------------------ the planner

# How many blocked jobs backfill plans around in one pass. Past this many, free GPUs nobody reserved are
# held back rather than risk delaying a blocked job the pass never looked at. Like Slurm's bf_max_job_test,
# it bounds a pass's cost on a long queue of jobs that cannot start.
BACKFILL_DEPTH = 500


@dataclass(slots=True)
class _Plan:
    starts: list[Start]
    waits: dict[str, float | None]


def _plan(
    queue: Sequence[QueuedJob],
    gpus: Sequence[GpuState],
    running: Sequence[RunningJob],
    *,
    policy: str,
    min_free_gb: float,
    max_util: float,
    now: float,
    link_score: LinkScore | None,
    estimating: bool,
    owner_gpu_cap: int = 0,
) -> _Plan:
    """One pass over the queue; `decide` and `estimate_waits` differ only in what they keep.

    Each GPU g carries `lb[g]`, the earliest time the plan may use it, `exact[g]`, whether that time is
    known or only a lower bound (one of our jobs with no estimate), and `cap[g]`, the memory a job could
    get there. A blocked job reserves the k GPUs that may free up first; its start (shadow time) is the
    latest of their `lb`. A lower bound is the safe choice for a reservation: a job backfilled to end
    before it cannot delay a start that cannot happen earlier anyway.

    GPUs busy with outside processes are left out of the plan (lb = inf): we cannot tell when, or whether,
    they come back, and reserving free GPUs for a job that waits on them could idle those forever.
    """
    if policy not in ("strict", "backfill"):
        raise ValueError(f"policy must be 'strict' or 'backfill', got {policy!r}")
    strict = policy == "strict"
    starts: list[Start] = []
    waits: dict[str, float | None] = {}

    release: dict[int, float | None] = {}
    running_ids: set[str] = set()
    # GPUs each owner holds, for MAX_GPUS_PER_OWNER: a job over its owner's cap waits without blocking others.
    owner_held: dict[str, int] = {}
    for r in running:
        running_ids.add(r.job_id)
        for i in r.gpu_ids:
            release[i] = r.remaining_seconds
        if r.owner is not None:
            owner_held[r.owner] = owner_held.get(r.owner, 0) + len(r.gpu_ids)

    by_index: dict[int, GpuState] = {}
    for g in gpus:
        if g.index in by_index:
            raise ValueError(f"GPU index {g.index} listed twice")
        by_index[g.index] = g

    lb: dict[int, float] = {}
    exact: dict[int, bool] = {}
    cap: dict[int, float] = {}
    total_mem: dict[int, float] = {}
    free_order: list[int] = []
    for i, g in by_index.items():
        total_mem[i] = g.memory_total_gb
        if i in release or g.held_by is not None:
            # Our own job's memory comes back whole when it ends.
            cap[i] = g.memory_total_gb
            rem = release.get(i)
            if rem is None:
                # No estimate (or held by a job not listed as running): it may end any moment.
                lb[i], exact[i] = now, False
            else:
                # A job past its estimate is likewise taken to end any moment.
                lb[i], exact[i] = now + max(0.0, rem), True
        elif gpu_is_free(g, min_free_gb=min_free_gb, max_util=max_util):
            free_order.append(i)
            cap[i] = g.memory_free_gb
            lb[i], exact[i] = now, True
        else:
            cap[i] = g.memory_free_gb
            lb[i], exact[i] = _INF, False
    free_order.sort(key=lambda i: (-by_index[i].memory_free_gb, by_index[i].utilization or 0.0, i))
    free_set = set(free_order)
    # Tie order for reservations; only free GPUs' utilization is ours to compare.
    all_order = sorted(by_index, key=lambda i: (-cap[i], (by_index[i].utilization or 0.0) if i in free_set else 0.0, i))

    rank = {i: p for p, i in enumerate(all_order)}
    # The GPUs by when the plan may use them, known times first among equals, then by the order above:
    # tuples sort natively, which keeps a reservation's choice cheap on 64-GPU simulations.
    profile = sorted((lb[i], not exact[i], rank[i], i) for i in all_order)

    def move(gs: Sequence[int], new_lb: float, new_exact: bool) -> None:
        k = len(gs)
        if [t[3] for t in profile[:k]] == list(gs):
            del profile[:k]
        else:
            profile[:] = [t for t in profile if t[3] not in gs]
        for i in gs:
            lb[i], exact[i] = new_lb, new_exact
            insort(profile, (new_lb, not new_exact, rank[i], i))

    # Seconds a job may run on each free GPU without delaying any reservation there (inf: none).
    slack: dict[int, float] = dict.fromkeys(free_order, _INF)
    slack_desc: list[float] = [_INF] * len(free_order)
    reservations_open = not strict
    # Backfill once every free GPU is reserved: only the largest slack matters to the rest of the queue.
    closed = False
    max_slack = _INF
    reservations = 0
    blocked = False
    floor, floor_exact = now, True
    fit_count: dict[float, int] = {}
    link_cache: dict[tuple[int, int], int] = {}
    seen: set[str] = set()

    def tail(rest: Iterable[QueuedJob]) -> None:
        # Nothing more can start on a GPU in this pass; only CPU-only jobs remain to be found.
        for job in rest:
            jid = job.job_id
            if job.num_gpus == 0 and not job.gpu_ids and jid not in running_ids and jid not in seen:
                seen.add(jid)
                starts.append(Start(jid, ()))

    if not estimating and not free_order:
        tail(queue)
        return _Plan(starts, waits)

    it = iter(queue)
    for job in it:
        if closed:
            est = job.estimated_duration
            if (est is None or est > max_slack) and (job.num_gpus or job.gpu_ids):
                # Deep in a long queue: no slack can change any more, and this job fits in none.
                continue
        jid = job.job_id
        if jid in seen or jid in running_ids:
            continue
        seen.add(jid)
        ids = job.gpu_ids
        k = len(ids) if ids else job.num_gpus
        if k <= 0:
            if k == 0:
                starts.append(Start(jid, ()))
                waits[jid] = 0.0
            else:
                waits[jid] = None
            continue
        if not estimating and (blocked or not free_order or slack_desc[0] < 0.0):
            tail(it)
            break
        if owner_gpu_cap and job.owner is not None and owner_held.get(job.owner, 0) + k > owner_gpu_cap:
            waits[jid] = None  # its owner holds its share: it waits, and neither blocks nor reserves
            continue
        est = job.estimated_duration
        # No estimate: the job may run forever, so only GPUs no reservation waits for will do.
        e = _INF if est is None else max(0.0, est)
        may_fit = not blocked and k <= len(free_order) and slack_desc[k - 1] >= e
        if not (may_fit or estimating or strict or reservations_open):
            # The common case deep in a long queue: it cannot start, and its reservation would change
            # nothing, so skip the rest of the work.
            continue
        mmg = job.min_gpu_memory_gb
        need = min_free_gb if mmg is None or mmg < min_free_gb else mmg

        if ids:
            feasible = len(set(ids)) == k and all(i in by_index and total_mem[i] >= need for i in ids)
        else:
            cnt = fit_count.get(need)
            if cnt is None:
                cnt = fit_count[need] = sum(1 for m in total_mem.values() if m >= need)
            feasible = k <= cnt
        if not feasible:
            waits[jid] = None
            continue

        chosen: tuple[int, ...] | None = None
        if may_fit:
            if ids:
                if all(i in free_set and cap[i] >= need and slack[i] >= e for i in ids):
                    chosen = tuple(sorted(ids))
            else:
                if need <= min_free_gb:
                    cands = [i for i in free_order if slack[i] >= e]
                else:
                    cands = [i for i in free_order if cap[i] >= need and slack[i] >= e]
                if len(cands) >= k:
                    chosen = _choose(cands, k, link_score, link_cache)

        if chosen is not None:
            starts.append(Start(jid, chosen))
            waits[jid] = 0.0
            if job.owner is not None:
                owner_held[job.owner] = owner_held.get(job.owner, 0) + k
            for i in chosen:
                free_set.discard(i)
                free_order.remove(i)
                del slack[i]
            if est is None:
                move(chosen, now, False)
            else:
                move(chosen, now + e, True)
            slack_desc = sorted(slack.values(), reverse=True)
            if reservations_open:
                reservations_open = _INF in slack_desc
            closed = not (strict or estimating or reservations_open)
            max_slack = slack_desc[0] if slack_desc else -_INF
            continue

        # Blocked: it cannot start now.
        if strict:
            blocked = True
            if not estimating:
                continue
        elif not (reservations_open or estimating):
            continue

        if ids:
            res: Sequence[int] = ids
            start = max(lb[i] if cap[i] >= need else _INF for i in ids)
            start_exact = all(exact[i] for i in ids)
        else:
            top = profile[:k] if need <= min_free_gb else [t for t in profile if cap[t[3]] >= need][:k]
            res = [t[3] for t in top]
            start = top[-1][0] if len(top) == k else _INF
            start_exact = not any(t[1] for t in top)
        if strict:
            # Strict starts follow queue order: nothing is planned before the job ahead of it.
            if floor > start:
                start = floor
            start_exact = start_exact and floor_exact
            floor, floor_exact = start, start_exact
        if start == _INF:
            # Waits on outside processes: no reservation, as it could hold free GPUs idle for ever.
            waits[jid] = None
            continue
        waits[jid] = start - now if start_exact else None
        reservations += 1
        touched_free = False
        for i in res:
            if i in free_set and start - now < slack[i]:
                slack[i] = start - now
                touched_free = True
        # Without an estimate the job may also end at once: keep the lower bound.
        move(res, start if est is None else start + e, start_exact and est is not None)
        if reservations_open and reservations >= BACKFILL_DEPTH:
            for i in slack:
                if slack[i] == _INF:
                    slack[i] = -_INF
            touched_free = True
        if touched_free:
            slack_desc = sorted(slack.values(), reverse=True)
            if reservations_open:
                # A later reservation on a free GPU starts at or after its lb, which is already at or past
                # its slack; so once every free GPU is reserved, no later one can tighten a slack.
                reservations_open = _INF in slack_desc
            closed = not (strict or estimating or reservations_open)
            max_slack = slack_desc[0] if slack_desc else -_INF
    return _Plan(starts, waits)


def decide(
    queue: Sequence[QueuedJob],
    gpus: Sequence[GpuState],
    running: Sequence[RunningJob],
    *,
    policy: str = "backfill",
    min_free_gb: float,
    max_util: float,
    now: float,
    link_score: LinkScore | None = None,
    owner_gpu_cap: int = 0,
) -> list[Start]:
    """The jobs to start now, in queue order, each with its GPUs; every job that fits, not just one.

    `queue` must already be in queue order. GPUs given to a start are not free for later jobs in the same
    pass. Choice among free GPUs: most free memory, then lowest utilization, then lowest index; for
    several GPUs the set with the best total `link_score` (higher is better, None is unknown), greedily
    grown from each seed, ties by that same order.

    strict: the first GPU job that does not fit blocks all GPU jobs behind it.
    backfill: each blocked job, in queue order, reserves the GPUs that may free up first (from running
    jobs' `remaining_seconds`, this pass's starts' `estimated_duration` and the reservations of the blocked
    jobs ahead of it) from the time they all may be free (its shadow time; a missing estimate makes that
    "at once", a lower bound). A later job may start only on GPUs outside every reservation, or with an
    estimate that ends by the earliest shadow time of the reservations on its GPUs, so no blocked job is
    delayed past its planned start. A job without an estimate never backfills onto reserved GPUs.
    Reservations are not fitted into gaps before other reservations: a gap is not held for anyone.

    CPU-only jobs always start. Requests that can never be met are skipped. The pass stops looking at GPU
    jobs once no free GPU remains (or, under strict, once a job is blocked).
    """
    return _plan(
        queue,
        gpus,
        running,
        policy=policy,
        min_free_gb=min_free_gb,
        max_util=max_util,
        now=now,
        link_score=link_score,
        estimating=False,
        owner_gpu_cap=owner_gpu_cap,
    ).starts


def estimate_waits(
    queue: Sequence[QueuedJob],
    gpus: Sequence[GpuState],
    running: Sequence[RunningJob],
    *,
    min_free_gb: float,
    max_util: float,
    now: float,
    policy: str = "backfill",
    link_score: LinkScore | None = None,
    owner_gpu_cap: int = 0,
) -> dict[str, float | None]:
    """Seconds until each queued job can start, by the same plan `decide` makes; None when unknowable.

    Jobs `decide` would start now get 0. Every other job is planned in queue order at the earliest time
    enough GPUs are released (running jobs' `remaining_seconds`, then planned jobs' `estimated_duration`),
    never before the reservations of jobs ahead of it (under strict, never before the job ahead starts).
    The plan does not fill later gaps, so a figure is rather an upper bound when estimates hold. None when
    the start depends on a missing estimate, on a GPU busy with outside processes, or on a request that
    can never be met. Jobs listed in `running` or repeated in `queue` get no entry.
    """
    return _plan(
        queue,
        gpus,
        running,
        policy=policy,
        min_free_gb=min_free_gb,
        max_util=max_util,
        now=now,
        link_score=link_score,
        estimating=True,
        owner_gpu_cap=owner_gpu_cap,
    ).waits


def format_wait(seconds: float) -> str:
    """'less than a minute', 'about 5 min', 'about 1 h 20 min', 'about 2 d 3 h'."""
    if not math.isfinite(seconds):
        raise ValueError(f"wait must be a finite number of seconds, got {seconds}")
    if seconds < 60:
        return "less than a minute"
    minutes = math.floor(seconds / 60 + 0.5)
    if minutes < 60:
        return f"about {minutes} min"
    hours, mins = divmod(minutes, 60)
    if hours < 24:
        return f"about {hours} h {mins} min" if mins else f"about {hours} h"
    # Past a day, minutes are noise next to the estimates they come from.
    hours = math.floor(seconds / 3600 + 0.5)
    days, hours = divmod(hours, 24)
    return f"about {days} d {hours} h" if hours else f"about {days} d"
