"""Which queued jobs to start now, and on which GPUs: pure functions, no Redis, no I/O, no clock.

The caller (the queue processor, through `queue_planner.Planner`) reads the queue, the GPU states and the running
jobs, calls `plan`, and acts on the returned starts (`decide` is `plan`'s starts alone, for callers that want no
waits or reasons). Keeping the decision pure lets the same code run in tests, in the trace
simulator (`benchmarks/simulate_trace.py`) and in the server, and makes every decision reproducible from
its inputs.

Policy choices (documented in the README):

* Queue order is priority (10 first), then submission time, then job id; `queue_order.queue_score` packs
  the first two into one Redis sorted-set score and Redis orders equal scores by member, the job id.
* CPU-only jobs (num_gpus 0) always start, under both policies and even behind a blocked job: they take
  nothing a GPU job could wait for (but their owner's MAX_RUNNING_PER_OWNER).
* An owner's limits (MAX_GPUS_PER_OWNER, MAX_RUNNING_PER_OWNER) are taken in queue order (`owner_caps`): a
  job over one waits without blocking others, and its share is not given to its owner's later jobs.
* A request that can never be met on these GPUs (more GPUs than exist, unknown or repeated ids, more memory
  than any GPU has) is skipped, so it never blocks the queue; the API rejects such requests at create.
* strict: the first GPU job that does not fit blocks every GPU job behind it.
* backfill: every blocked job holds a reservation (as in Slurm's backfill); a job behind a blocked one
  starts only if, by the estimates, it cannot delay any blocked job ahead of it past its planned start.
  Where the estimates cannot tell (the candidate's duration or the blocked job's start is unknown), jobs
  of the blocked job's priority may take its GPUs,
  until that job has been the head (the first job waiting with a reservation) for `starvation_seconds`;
  then it drains them. So with no estimates at all the queue is first fit in rounds: a head waits at most
  `starvation_seconds` plus the longest remaining run, then the next job behind it becomes the head. The
  head's clock is state the caller keeps between passes (`Plan.head`, `next_head`). Unknown estimates
  count as "could end at once" for releases (a lower bound on a reservation's start).
* GPUs that outside processes make busy are left out of the plan: a job that needs one waits without a
  reservation (under backfill others may use the free GPUs meanwhile), and its wait is unknown.
* Backfill plans around at most `BACKFILL_DEPTH` blocked jobs per pass; past that, GPUs none of them
  reserved are held back, so a pass stays cheap on a long queue and still delays no blocked job.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from application.services.gpu_wants import wanted
from application.services.owner_caps import OwnerCaps, beyond_gpu_cap
from application.services.queue_order import PRIORITY_MAX, PRIORITY_MIN, queue_score, score_priority, score_submitted_at
from application.services.timeline import INF, LinkScore, Timeline
from application.services.wait_reasons import Reason, format_wait

__all__ = [
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "GpuState",
    "LinkScore",
    "Plan",
    "Policy",
    "QueuedJob",
    "Reason",
    "RunningJob",
    "Start",
    "decide",
    "format_wait",
    "gpu_is_free",
    "plan",
    "queue_key",
    "queue_score",
    "score_priority",
    "score_submitted_at",
]


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
    memory_usable_gb: float  # what an idle GPU offers a job (total less the driver's reservation)
    memory_free_gb: float
    # None when the backend cannot tell (simulated GPUs); counted as idle so such GPUs stay usable.
    utilization: float | None
    held_by: str | None
    readable: bool = True  # False: its reading failed (GpuInfo.error): never free, but still there


@dataclass(frozen=True, slots=True)
class RunningJob:
    job_id: str
    gpu_ids: tuple[int, ...]
    remaining_seconds: float | None
    owner: str | None = None
    started_at: float | None = None
    # Asked to stop, pause or make way, or past its time limit (its runner stops it): its GPUs come back anyway.
    ending: bool = False
    making_way_for: str | None = None  # preempted for this queued job


@dataclass(frozen=True, slots=True)
class Start:
    job_id: str
    gpu_ids: tuple[int, ...]


# --------------------------------------------------------------------------------------------- queue order


def queue_key(job: QueuedJob) -> tuple[float, str]:
    """Sort key giving exactly the Redis queue order, for callers that build a queue in memory."""
    return (queue_score(job.priority, job.submitted_at), job.job_id)


# ------------------------------------------------------------------------------------------------ GPUs


def gpu_is_free(gpu: GpuState, *, min_free_gb: float, max_util: float) -> bool:
    """Not held by one of our jobs, and other processes leave enough memory and compute."""
    if gpu.held_by is not None or not gpu.readable:
        return False
    if gpu.memory_free_gb < min_free_gb:
        return False
    return gpu.utilization is None or gpu.utilization <= max_util


# ------------------------------------------------------------------------------------------ the planner

# How many blocked jobs backfill plans around in one pass. Past this many, free GPUs nobody reserved are
# held back rather than risk delaying a blocked job the pass never looked at. Like Slurm's bf_max_job_test,
# it bounds a pass's cost on a long queue of jobs that cannot start.
BACKFILL_DEPTH = 500


@dataclass(frozen=True)
class Policy:
    """How a pass decides. `starvation_seconds` 0: every reservation binds at once (plain backfill)."""

    name: str = "backfill"
    min_free_gb: float = 2.0
    max_util: float = 90.0
    owner_gpu_cap: int = 0
    owner_run_cap: int = 0
    starvation_seconds: float = 0.0
    link_score: LinkScore | None = None

    def __post_init__(self) -> None:
        if self.name not in ("strict", "backfill"):
            raise ValueError(f"policy must be 'strict' or 'backfill', got {self.name!r}")


@dataclass(slots=True)
class Plan:
    starts: list[Start]
    waits: dict[str, float | None]
    reasons: dict[str, Reason]
    # The first job that waits with a reservation: the head whose wait the starvation rule counts.
    head: str | None = None
    # The first of each priority (the head among them): each priority's head whose wait that rule counts.
    heads: list[str] = field(default_factory=list)


# (job id, since when): the queue's head as the scheduler last saw it, for the starvation rule.
Head = tuple[str, float]


def next_head(stored: Head | None, found: str | None, now: float, since: float | None = None) -> Head | None:
    """The head to keep after a pass that found `found` (None: the pass did not look that far). `since`: when
    `found` first became the head in its present stint in the queue, if it was before (the caller keeps that per
    job: a job briefly ahead of it, a higher priority one say, restarted its clock, and it could wait for ever). A
    time in the future (stored by a scheduler on a host whose clock is ahead) counts from now: kept, it made the
    head's reservation soft for the skew besides QUEUE_STARVATION_SECONDS."""
    if stored is not None and stored[1] > now:
        stored = (stored[0], now)
    if found is None or (stored is not None and stored[0] == found):
        return stored
    return (found, now if since is None else min(since, now))


def _timeline(gpus: Sequence[GpuState], running: Sequence[RunningJob], policy: Policy, now: float) -> Timeline:
    release: dict[int, float | None] = {i: r.remaining_seconds for r in running for i in r.gpu_ids}
    tl = Timeline(now, policy.link_score)
    for g in gpus:
        held = g.index in release or g.held_by is not None
        tl.add_gpu(g.index, g.memory_usable_gb, g.memory_free_gb, g.utilization, (held, release.get(g.index)),
                   not held and gpu_is_free(g, min_free_gb=policy.min_free_gb, max_util=policy.max_util))  # fmt: skip
    tl.unreadable = {g.index for g in gpus if not g.readable and g.index not in release and g.held_by is None}
    tl.seal()
    return tl


def plan(
    queue: Sequence[QueuedJob],
    gpus: Sequence[GpuState],
    running: Sequence[RunningJob],
    policy: Policy,
    now: float,
    *,
    estimating: bool = True,
    head: Head | None = None,
    clocks: Mapping[str, float] | None = None,
) -> Plan:
    """One pass over the queue (in queue order): what starts now, when each other job should start, and why
    it waits. `decide` is this with `estimating` False: it stops looking once nothing more can start.

    strict: the first GPU job that does not fit blocks all GPU jobs behind it.
    backfill: each blocked job, in queue order, reserves the GPUs that may free up first (from running jobs'
    `remaining_seconds`, this pass's starts' `estimated_duration` and the reservations of the blocked jobs
    ahead of it) from the time they all may be free (a missing estimate makes that "at once", a lower bound).
    A later job may start only on GPUs no binding reservation holds, or with an estimate that ends by the
    earliest start of the reservations on its GPUs, so no blocked job is delayed past its planned start;
    without an estimate it never backfills onto held GPUs. A reservation binds the jobs of its own priority
    only where both sides are known (the candidate's estimate and the reservation's start), except the
    head's once it has been the head (`head`: the id and since when, from earlier passes) for
    `starvation_seconds`, or while runs are preempted for it: that one binds them all (a job of its priority took
    each GPU a victim freed, and the next pass preempted more runs). The same holds for the first blocked job of
    each lower priority, the head of its own (since when: `clocks`): a job blocked at a higher priority, the
    queue's head, left a large job's reservation soft for ever, and a stream of small jobs of its priority took
    its GPUs (hunt CL). Every reservation binds lower priorities.

    CPU-only jobs always start. Requests that can never be met are skipped. A job whose owner holds
    `owner_gpu_cap` GPUs (counting those its owner's waiting jobs ahead of it need: the cap is taken in queue
    order) waits without blocking or reserving. Waits are None when the start depends on a
    missing estimate, on outside processes, or on a request that can never be met.
    """
    strict = policy.name == "strict"
    tl = _timeline(gpus, running, policy, now)
    if tl.free_order or estimating:  # (reservations choose by it too: not for a quick pass with none free)
        tl.wanted = wanted(queue, running, tl, policy)
    starts: list[Start] = []
    waits: dict[str, float | None] = {}
    reasons: dict[str, Reason] = {}
    running_ids = {r.job_id for r in running}
    caps = OwnerCaps(policy.owner_gpu_cap, policy.owner_run_cap,
                     ((r.owner, len(r.gpu_ids), r.remaining_seconds) for r in running), now)  # fmt: skip
    seen: set[str] = set()
    making_way = {r.making_way_for for r in running if r.making_way_for is not None}
    blocked_by: str | None = None  # strict: the first blocked job
    floor = (now, True)  # strict: nothing is planned before the job ahead of it

    def need_of(j: QueuedJob) -> float:
        mem = j.min_gpu_memory_gb
        return policy.min_free_gb if mem is None or mem < policy.min_free_gb else mem

    def never(j: QueuedJob, ids: tuple[int, ...] | None, k: int) -> Reason:
        # Whose to change: the request's, or the operator's GPU_MIN_FREE_MEMORY_GB when the request alone fits.
        if need_of(j) > (j.min_gpu_memory_gb or 0.0) and tl.feasible(ids, k, j.min_gpu_memory_gb or 0.0):
            return Reason("never", min_free_gb=policy.min_free_gb)
        return Reason("never")

    def may_head(j: QueuedJob) -> bool:
        # As the full pass names it: the first job with a reservation, so not one that waits on outside
        # processes (both passes naming different heads in turn restarted the head's clock at every switch).
        k = len(j.gpu_ids) if j.gpu_ids else j.num_gpus
        if k <= 0 or caps.over(j.owner, k) or not tl.feasible(j.gpu_ids, k, j.min_gpu_memory_gb or 0.0):
            return False
        return tl.earliest(j.gpu_ids, k, need_of(j), policy.min_free_gb)[0] != INF

    def waits_for_gpus(j: QueuedJob, k: int, start: float | None = None) -> None:
        """A GPU job that cannot start in this pass takes its share of its owner's limits (from `start`, when
        known), the same in both passes: not one that can never start, nor one that waits on GPUs busy outside
        or unreadable (it would hold its owner's later jobs back for as long)."""
        if caps.active and j.owner is not None and tl.feasible(j.gpu_ids, k, need_of(j)) and \
                tl.earliest(j.gpu_ids, k, need_of(j), policy.min_free_gb)[0] != INF:  # fmt: skip
            caps.claim(j.owner, k, start, j.estimated_duration if start is not None else None)

    def cpu_only(j: QueuedJob) -> tuple[bool, float | None]:
        """Start a CPU-only job, unless it takes its owner over MAX_RUNNING_PER_OWNER: then it claims its turn,
        from when its owner's runs (and waiting jobs ahead) have ended enough (None: not known)."""
        if j.owner is not None and caps.over(j.owner, 0):
            back = caps.under_cap_at(j.owner, 0)
            caps.claim(j.owner, 0, back, j.estimated_duration)
            return False, back
        starts.append(Start(j.job_id, ()))
        caps.add(j.owner, 0, j.estimated_duration)
        return True, None

    def cpu_only_rest(rest: Iterator[QueuedJob], find_head: bool = False) -> str | None:
        """Nothing more can start on a GPU in this pass; only CPU-only jobs remain to be found. `find_head`:
        the first GPU job that could ever start, too; under strict, as the full pass names it: only the first
        GPU job that blocks those behind it (strict named one behind a job waiting on outside processes, whose
        runs were preempted for a start strict then never made)."""
        first = None
        looking = find_head
        for j in rest:
            if j.job_id in running_ids or j.job_id in seen:
                continue
            seen.add(j.job_id)
            k = len(j.gpu_ids) if j.gpu_ids else j.num_gpus
            if k == 0:
                cpu_only(j)
            elif k > 0:
                # (and each priority's head, but under strict, whose reservations all bind: their clocks start)
                headed = strict or j.priority in level_heads
                if (looking or not headed) and may_head(j):
                    if looking:
                        first, looking = j.job_id, False
                    if not headed:
                        level_heads[j.priority] = j.job_id
                elif looking and strict and blocks(j, k):
                    looking = False
                waits_for_gpus(j, k)
        return first

    def blocks(j: QueuedJob, k: int) -> bool:
        """Under strict, whether the job blocks the GPU jobs behind it (as the full pass counts it: one its
        owner's limits hold back, or one that can never start, does not)."""
        return not caps.over(j.owner, k) and beyond_gpu_cap(k, j.owner, caps.gpu_cap) is None and \
            tl.feasible(j.gpu_ids, k, need_of(j))  # fmt: skip

    level_heads: dict[int, str] = {}  # the first blocked job of each priority with a reservation
    if not estimating and not tl.free_order:
        # Every GPU is busy: the head is the first GPU job that could ever start (its clock starts now).
        first = cpu_only_rest(iter(queue), find_head=True)
        return Plan(starts, waits, reasons, first, list(level_heads.values()))

    found_head: str | None = None

    def name_head(j: QueuedJob) -> None:
        """As the full pass names them, where a quick pass skips the rest of a job's work: the first job of its
        priority that could ever start heads it (and the queue, when none does yet). Left unnamed, the next one
        of its priority was, and its clock started ahead of it (review CM); the queue's started a pass late."""
        nonlocal found_head
        if j.priority not in level_heads and may_head(j):
            level_heads[j.priority] = j.job_id
            found_head = found_head or j.job_id

    it = iter(queue)
    for job in it:
        jid = job.job_id
        if jid in seen or jid in running_ids:
            continue
        ids = job.gpu_ids
        k = len(ids) if ids else job.num_gpus
        est = job.estimated_duration
        if not estimating and k > 0 and not (strict or tl.open_gpus) and \
                (est is None or est > tl.max_slack):  # fmt: skip
            # Deep in a long queue: no slack can change any more, and this job fits in none (it waits, and takes
            # its share of its owner's cap, as the full pass counts it).
            name_head(job)
            waits_for_gpus(job, k)
            continue
        seen.add(jid)
        if k <= 0:
            if k < 0:
                waits[jid] = None
                continue
            started, back = cpu_only(job)
            if started:
                waits[jid] = 0.0
            else:
                waits[jid], reasons[jid] = (back - now if back is not None else None), Reason("owner_limit")
            continue
        if not estimating and (blocked_by is not None or not tl.free_order or tl.closed):
            # (the head all the same, as the full pass names it: its clock started a pass late)
            look = found_head is None and blocked_by is None  # (strict: none behind the job that blocks them)
            first = jid if look and may_head(job) else None
            waits_for_gpus(job, k)
            after = cpu_only_rest(it, find_head=look and first is None and not (strict and blocks(job, k)))
            found_head = found_head or first or after
            break
        tl.level(job.priority)
        need = need_of(job)
        if beyond_gpu_cap(k, job.owner, caps.gpu_cap) is not None:
            # (the cap was lowered after its create: it said "owner_limit", its owner's jobs ahead, for ever)
            waits[jid], reasons[jid] = None, Reason("never", gpu_cap=caps.gpu_cap)
            continue
        if caps.over(job.owner, k):
            # It waits, reserving no GPU, no sooner than its owner's runs (and its waiting jobs ahead) give GPUs
            # back; its share of the cap is its own from now on.
            if not tl.feasible(ids, k, need):
                waits[jid], reasons[jid] = None, never(job, ids, k)
                continue
            back = caps.under_cap_at(job.owner, k) if job.owner is not None else None
            start, exact, _ = tl.earliest(ids, k, need, policy.min_free_gb)
            if start != INF:  # (as waits_for_gpus, with the earliest start worked out once)
                caps.claim(job.owner, k, back, est if back is not None else None)
            wait = max(back, start) - now if estimating and back is not None and exact and start != INF else None
            waits[jid], reasons[jid] = wait, Reason("owner_limit")
            continue
        e = INF if est is None else max(0.0, est)
        may_fit = blocked_by is None and tl.may_fit(k, e)
        if not (may_fit or estimating or strict or tl.open_gpus):
            name_head(job)
            waits_for_gpus(job, k)
            continue  # it cannot start, and its reservation would change nothing: skip the rest of the work
        if not tl.feasible(ids, k, need):
            waits[jid], reasons[jid] = None, never(job, ids, k)
            continue
        chosen = tl.fit(ids, k, need, policy.min_free_gb, e) if may_fit else None
        if chosen is not None:
            starts.append(Start(jid, chosen))
            waits[jid] = 0.0
            tl.start(chosen, est)
            if job.owner is not None:
                caps.add(job.owner, k, est)
            continue
        # Blocked: it cannot start now.
        if estimating:
            if strict and blocked_by is not None and tl.fit(ids, k, need, policy.min_free_gb, 0.0) is not None:
                reasons[jid] = Reason("priority", blocked_by)
            else:
                code, hold = tl.why_blocked(ids, k, need, e)
                # (a start that is only a lower bound is not told: it would read as a forecast)
                reasons[jid] = Reason(code, hold.job_id if hold else None,
                                      hold.starts_in if hold and hold.exact else None)  # fmt: skip
        if strict:
            blocked_by = blocked_by or jid
            if not estimating:
                # (the head all the same: preemption makes way for it, also while some GPUs are free)
                if found_head is None and may_head(job):
                    found_head = jid
                waits_for_gpus(job, k)
                continue
        elif not (tl.open_gpus or estimating):
            name_head(job)
            waits_for_gpus(job, k)
            continue
        if strict or policy.starvation_seconds <= 0:
            soft = False
        elif job.priority not in level_heads:
            # A head drains its GPUs once it has waited starvation_seconds at the head (of the queue, or of its
            # priority); the jobs behind it take their turn there (so a backlog of old jobs is not FIFO: each
            # head gets its time).
            since = head[1] if head is not None and head[0] == jid else (clocks or {}).get(jid, now)
            soft = now - min(since, now) < policy.starvation_seconds and jid not in making_way
        else:
            soft = True
        start, exact = tl.reserve(jid, ids, k, need, policy.min_free_gb, est, floor if strict else None, soft=soft)
        waits_for_gpus(job, k, start)
        if start != INF:
            found_head = found_head or jid
            level_heads.setdefault(job.priority, jid)
        if strict:
            floor = (start, exact)
        waits[jid] = start - now if exact and start != INF else None
        if not strict and tl.open_gpus and tl.reservations >= BACKFILL_DEPTH:
            tl.close_unreserved()
    return Plan(starts, waits, reasons, found_head, list(level_heads.values()))


def decide(
    queue: Sequence[QueuedJob],
    gpus: Sequence[GpuState],
    running: Sequence[RunningJob],
    policy: Policy,
    now: float,
    head: Head | None = None,
) -> list[Start]:
    """The jobs to start now, in queue order, each with its GPUs; every job that fits, not just one.

    `queue` must already be in queue order. GPUs given to a start are not free for later jobs in the same
    pass. Choice among free GPUs: first those no queued job names or alone has the memory for, then most
    free memory, then lowest utilization, then lowest index; for
    several GPUs the set with the best total `link_score` (higher is better, None is unknown), greedily
    grown from each seed, ties by that same order. See `plan` for the policies.
    """
    return plan(queue, gpus, running, policy, now, estimating=False, head=head).starts
