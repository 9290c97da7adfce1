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

from application.services.gpu_wants import wanted
from application.services.owner_caps import OwnerCaps, beyond_gpu_cap
from application.services.plan_parts import (
    BACKFILL_DEPTH,
    RETRY_BACKOFF_CAP,
    GpuState,
    Head,
    Plan,
    Policy,
    QueuedJob,
    RunningJob,
    Start,
    gpu_is_free,
    next_head,
    queue_key,
)
from application.services.queue_order import PRIORITY_MAX, PRIORITY_MIN, queue_score, score_priority, score_submitted_at
from application.services.timeline import INF, LinkScore, Timeline
from application.services.wait_reasons import Reason, format_wait

__all__ = [
    "BACKFILL_DEPTH",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "RETRY_BACKOFF_CAP",
    "GpuState",
    "Head",
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
    "next_head",
    "plan",
    "queue_key",
    "queue_score",
    "score_priority",
    "score_submitted_at",
]


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
    """One pass over the queue (in queue order; the policies are the module's): what starts now, when each other
    job should start, and why it waits. `decide` is this with `estimating` False: it stops looking once nothing
    more can start.

    Under backfill each blocked job reserves the GPUs that may free up first (from running jobs'
    `remaining_seconds`, this pass's starts' estimates and the reservations ahead of it; a missing estimate is "at
    once", a lower bound). A reservation binds lower priorities always; its own where both sides are known (the
    candidate's estimate, the reservation's start), or for the head of its priority (the queue's: `head`, the id
    and since when from earlier passes; each priority's: `clocks`) once it has waited `starvation_seconds`, or
    while runs are preempted for it (a lower priority's head left soft for ever let a stream of small jobs take
    a large job's GPUs: hunt CL).

    CPU-only jobs always start; requests that can never be met are skipped; a job past its owner's limits
    (taken in queue order) waits without blocking or reserving. Waits are None when the start depends on a
    missing estimate, on outside processes, or on a request that can never be met.

    A retried run waiting out its backoff (`retry_at` ahead) is left out of the pass, as Slurm leaves a job whose
    begin time is ahead: it neither starts, nor heads, nor holds GPUs for when it may start.
    """
    # (one further off than any backoff lasts was set before a step back of the clock: it is over)
    later = {j.job_id: j.retry_at - now for j in queue
             if j.retry_at is not None and now < j.retry_at <= now + RETRY_BACKOFF_CAP}  # fmt: skip
    if later:
        queue = [j for j in queue if j.job_id not in later]
    found = _Pass(queue, gpus, running, policy, now, estimating, head, clocks).run()
    for job_id, left in later.items():
        found.waits[job_id], found.reasons[job_id] = None, Reason("retry_backoff", starts_in=left)
    return found


class _Pass:
    """One pass of `plan`: the queue taken in order against one `Timeline`, each job started, reserved for, or
    left waiting by its named step; the state the steps share (the owners' limits, the heads found so far, what
    strict's first blocked job holds back) lives here, for this pass only."""

    __slots__ = ("blocked_by", "caps", "clocks", "estimating", "floor", "found_head", "head", "level_heads",
                 "making_way", "now", "policy", "queue", "reasons", "running_ids", "seen", "starts", "strict", "tl",
                 "waits")  # fmt: skip

    def __init__(self, queue: Sequence[QueuedJob], gpus: Sequence[GpuState], running: Sequence[RunningJob],
                 policy: Policy, now: float, estimating: bool, head: Head | None,
                 clocks: Mapping[str, float] | None) -> None:  # fmt: skip
        self.queue, self.policy, self.now, self.estimating = queue, policy, now, estimating
        self.head, self.clocks = head, clocks or {}
        self.strict = policy.name == "strict"
        self.tl = tl = _timeline(gpus, running, policy, now)
        if tl.free_order or estimating:  # (reservations choose by it too: not for a quick pass with none free)
            tl.wanted = wanted(queue, running, tl, policy)
        self.starts: list[Start] = []
        self.waits: dict[str, float | None] = {}
        self.reasons: dict[str, Reason] = {}
        self.running_ids = {r.job_id for r in running}
        self.caps = OwnerCaps(policy.owner_gpu_cap, policy.owner_run_cap,
                              ((r.owner, len(r.gpu_ids), r.remaining_seconds) for r in running), now)  # fmt: skip
        self.seen: set[str] = set()
        self.making_way = {r.making_way_for for r in running if r.making_way_for is not None}
        self.blocked_by: str | None = None  # strict: the first blocked job
        self.floor = (now, True)  # strict: nothing is planned before the job ahead of it
        self.level_heads: dict[int, str] = {}  # the first blocked job of each priority with a reservation
        self.found_head: str | None = None

    def run(self) -> Plan:
        if not self.estimating and not self.tl.free_order:
            # Every GPU is busy: the head is the first GPU job that could ever start (its clock starts now).
            first = self.cpu_only_rest(iter(self.queue), find_head=True)
            return Plan(self.starts, self.waits, self.reasons, first, list(self.level_heads.values()))
        it = iter(self.queue)
        for job in it:
            if self.take(job, it):
                break
        return Plan(self.starts, self.waits, self.reasons, self.found_head, list(self.level_heads.values()))

    # ---- the steps ------------------------------------------------------------------------------------------

    def take(self, job: QueuedJob, rest: Iterator[QueuedJob]) -> bool:
        """The next job in queue order; True when nothing more can start on a GPU in this pass (`rest` then
        looked at for CPU-only jobs and the head)."""
        jid, tl = job.job_id, self.tl
        if jid in self.seen or jid in self.running_ids:
            return False
        k = len(job.gpu_ids) if job.gpu_ids else job.num_gpus
        est = job.estimated_duration
        if not self.estimating and k > 0 and not (self.strict or tl.open_gpus) and \
                (est is None or est > tl.max_slack):  # fmt: skip
            # Deep in a long queue: no slack can change any more, and this job fits in none (it waits, and takes
            # its share of its owner's cap, as the full pass counts it).
            self.name_head(job)
            self.waits_for_gpus(job, k)
            return False
        self.seen.add(jid)
        if k <= 0:
            if k < 0:
                self.waits[jid] = None
                return False
            started, back = self.cpu_only(job)
            if started:
                self.waits[jid] = 0.0
            else:
                self.waits[jid], self.reasons[jid] = (back - self.now if back is not None else None), \
                    Reason("owner_limit")  # fmt: skip
            return False
        if not self.estimating and (self.blocked_by is not None or not tl.free_order or tl.closed):
            # (the head all the same, as the full pass names it: its clock started a pass late)
            look = self.found_head is None and self.blocked_by is None  # (strict: none behind the job that blocks)
            first = jid if look and self.may_head(job) else None
            self.waits_for_gpus(job, k)
            after = self.cpu_only_rest(rest, find_head=look and first is None and
                                       not (self.strict and self.blocks(job, k)))  # fmt: skip
            self.found_head = self.found_head or first or after
            return True
        self.gpu_job(job, k)
        return False

    def gpu_job(self, job: QueuedJob, k: int) -> None:
        """A job on `k` GPUs: started where it fits, else blocked (`blocked`), or waiting on its owner's limits."""
        jid, ids, est, tl = job.job_id, job.gpu_ids, job.estimated_duration, self.tl
        tl.level(job.priority)
        need = self.need_of(job)
        if beyond_gpu_cap(k, job.owner, self.caps.gpu_cap) is not None:
            # (the cap was lowered after its create: it said "owner_limit", its owner's jobs ahead, for ever)
            self.waits[jid], self.reasons[jid] = None, Reason("never", gpu_cap=self.caps.gpu_cap)
            return
        if self.caps.over(job.owner, k):
            self.over_owner_limit(job, k, need)
            return
        e = INF if est is None else max(0.0, est)
        may_fit = self.blocked_by is None and tl.may_fit(k, e)
        if not (may_fit or self.estimating or self.strict or tl.open_gpus):
            self.name_head(job)
            self.waits_for_gpus(job, k)
            return  # it cannot start, and its reservation would change nothing: skip the rest of the work
        if not tl.feasible(ids, k, need):
            self.waits[jid], self.reasons[jid] = None, self.never(job, ids, k)
            return
        chosen = tl.fit(ids, k, need, self.policy.min_free_gb, e) if may_fit else None
        if chosen is not None:
            self.starts.append(Start(jid, chosen))
            self.waits[jid] = 0.0
            tl.start(chosen, est)
            if job.owner is not None:
                self.caps.add(job.owner, k, est)
            return
        self.blocked(job, k, need, e)

    def over_owner_limit(self, job: QueuedJob, k: int, need: float) -> None:
        """It waits, reserving no GPU, no sooner than its owner's runs (and its waiting jobs ahead) give GPUs
        back; its share of the cap is its own from now on."""
        jid, ids = job.job_id, job.gpu_ids
        if not self.tl.feasible(ids, k, need):
            self.waits[jid], self.reasons[jid] = None, self.never(job, ids, k)
            return
        back = self.caps.under_cap_at(job.owner, k) if job.owner is not None else None
        start, exact, _ = self.tl.earliest(ids, k, need, self.policy.min_free_gb)
        if start != INF:  # (as waits_for_gpus, with the earliest start worked out once)
            self.caps.claim(job.owner, k, back, job.estimated_duration if back is not None else None)
        wait = max(back, start) - self.now if self.estimating and back is not None and exact and start != INF \
            else None  # fmt: skip
        self.waits[jid], self.reasons[jid] = wait, Reason("owner_limit")

    def blocked(self, job: QueuedJob, k: int, need: float, e: float) -> None:
        """A job that cannot start now: why (when estimating), then its reservation, or under strict the block
        of every GPU job behind it."""
        jid, ids, tl = job.job_id, job.gpu_ids, self.tl
        if self.estimating:
            if self.strict and self.blocked_by is not None and \
                    tl.fit(ids, k, need, self.policy.min_free_gb, 0.0) is not None:  # fmt: skip
                self.reasons[jid] = Reason("priority", self.blocked_by)
            else:
                code, hold = tl.why_blocked(ids, k, need, e)
                # (a start that is only a lower bound is not told: it would read as a forecast)
                self.reasons[jid] = Reason(code, hold.job_id if hold else None,
                                           hold.starts_in if hold and hold.exact else None)  # fmt: skip
        if self.strict:
            self.blocked_by = self.blocked_by or jid
            if not self.estimating:
                # (the head all the same: preemption makes way for it, also while some GPUs are free)
                if self.found_head is None and self.may_head(job):
                    self.found_head = jid
                self.waits_for_gpus(job, k)
                return
        elif not (tl.open_gpus or self.estimating):
            self.name_head(job)
            self.waits_for_gpus(job, k)
            return
        self.reserve(job, k, need)

    def reserve(self, job: QueuedJob, k: int, need: float) -> None:
        """The GPUs a blocked job holds from when they may all be free: binding for lower priorities, and for its
        own once it has headed its priority for starvation_seconds (or while runs make way for it)."""
        jid, tl = job.job_id, self.tl
        if self.strict or self.policy.starvation_seconds <= 0:
            soft = False
        elif job.priority not in self.level_heads:
            # A head drains its GPUs once it has waited starvation_seconds at the head (of the queue, or of its
            # priority); the jobs behind it take their turn there (so a backlog of old jobs is not FIFO: each
            # head gets its time).
            since = self.head[1] if self.head is not None and self.head[0] == jid else self.clocks.get(jid, self.now)
            soft = self.now - min(since, self.now) < self.policy.starvation_seconds and jid not in self.making_way
        else:
            soft = True
        start, exact = tl.reserve(jid, job.gpu_ids, k, need, self.policy.min_free_gb, job.estimated_duration,
                                  self.floor if self.strict else None, soft=soft)  # fmt: skip
        self.waits_for_gpus(job, k, start)
        if start != INF:
            self.found_head = self.found_head or jid
            self.level_heads.setdefault(job.priority, jid)
        if self.strict:
            self.floor = (start, exact)
        self.waits[jid] = start - self.now if exact and start != INF else None
        if not self.strict and tl.open_gpus and tl.reservations >= BACKFILL_DEPTH:
            tl.close_unreserved()

    # ---- what the steps ask -----------------------------------------------------------------------------------

    def need_of(self, j: QueuedJob) -> float:
        mem = j.min_gpu_memory_gb
        return self.policy.min_free_gb if mem is None or mem < self.policy.min_free_gb else mem

    def never(self, j: QueuedJob, ids: tuple[int, ...] | None, k: int) -> Reason:
        # Whose to change: the request's, or the operator's GPU_MIN_FREE_MEMORY_GB when the request alone fits.
        if self.need_of(j) > (j.min_gpu_memory_gb or 0.0) and self.tl.feasible(ids, k, j.min_gpu_memory_gb or 0.0):
            return Reason("never", min_free_gb=self.policy.min_free_gb)
        return Reason("never")

    def may_head(self, j: QueuedJob) -> bool:
        # As the full pass names it: the first job with a reservation, so not one that waits on outside
        # processes (both passes naming different heads in turn restarted the head's clock at every switch).
        k = len(j.gpu_ids) if j.gpu_ids else j.num_gpus
        if k <= 0 or self.caps.over(j.owner, k) or not self.tl.feasible(j.gpu_ids, k, j.min_gpu_memory_gb or 0.0):
            return False
        return self.tl.earliest(j.gpu_ids, k, self.need_of(j), self.policy.min_free_gb)[0] != INF

    def waits_for_gpus(self, j: QueuedJob, k: int, start: float | None = None) -> None:
        """A GPU job that cannot start in this pass takes its share of its owner's limits (from `start`, when
        known), the same in both passes: not one that can never start, nor one that waits on GPUs busy outside
        or unreadable (it would hold its owner's later jobs back for as long)."""
        if self.caps.active and j.owner is not None and self.tl.feasible(j.gpu_ids, k, self.need_of(j)) and \
                self.tl.earliest(j.gpu_ids, k, self.need_of(j), self.policy.min_free_gb)[0] != INF:  # fmt: skip
            self.caps.claim(j.owner, k, start, j.estimated_duration if start is not None else None)

    def cpu_only(self, j: QueuedJob) -> tuple[bool, float | None]:
        """Start a CPU-only job, unless it takes its owner over MAX_RUNNING_PER_OWNER: then it claims its turn,
        from when its owner's runs (and waiting jobs ahead) have ended enough (None: not known)."""
        if j.owner is not None and self.caps.over(j.owner, 0):
            back = self.caps.under_cap_at(j.owner, 0)
            self.caps.claim(j.owner, 0, back, j.estimated_duration)
            return False, back
        self.starts.append(Start(j.job_id, ()))
        self.caps.add(j.owner, 0, j.estimated_duration)
        return True, None

    def cpu_only_rest(self, rest: Iterator[QueuedJob], find_head: bool = False) -> str | None:
        """Nothing more can start on a GPU in this pass; only CPU-only jobs remain to be found. `find_head`:
        the first GPU job that could ever start, too; under strict, as the full pass names it: only the first
        GPU job that blocks those behind it (strict named one behind a job waiting on outside processes, whose
        runs were preempted for a start strict then never made)."""
        first = None
        looking = find_head
        for j in rest:
            if j.job_id in self.running_ids or j.job_id in self.seen:
                continue
            self.seen.add(j.job_id)
            k = len(j.gpu_ids) if j.gpu_ids else j.num_gpus
            if k == 0:
                self.cpu_only(j)
            elif k > 0:
                # (and each priority's head, but under strict, whose reservations all bind: their clocks start)
                headed = self.strict or j.priority in self.level_heads
                if (looking or not headed) and self.may_head(j):
                    if looking:
                        first, looking = j.job_id, False
                    if not headed:
                        self.level_heads[j.priority] = j.job_id
                elif looking and self.strict and self.blocks(j, k):
                    looking = False
                self.waits_for_gpus(j, k)
        return first

    def blocks(self, j: QueuedJob, k: int) -> bool:
        """Under strict, whether the job blocks the GPU jobs behind it (as the full pass counts it: one its
        owner's limits hold back, or one that can never start, does not)."""
        return not self.caps.over(j.owner, k) and beyond_gpu_cap(k, j.owner, self.caps.gpu_cap) is None and \
            self.tl.feasible(j.gpu_ids, k, self.need_of(j))  # fmt: skip

    def name_head(self, j: QueuedJob) -> None:
        """As the full pass names them, where a quick pass skips the rest of a job's work: the first job of its
        priority that could ever start heads it (and the queue, when none does yet). Left unnamed, the next one
        of its priority was, and its clock started ahead of it (review CM); the queue's started a pass late."""
        if j.priority not in self.level_heads and self.may_head(j):
            self.level_heads[j.priority] = j.job_id
            self.found_head = self.found_head or j.job_id


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
