"""Reservations under backfill: starvation (a tiny discrete-event loop over the scheduler's own decisions, jobs
arriving over time), wrong estimates, owners' caps, and what a plan tells the jobs it holds back (no Redis, no GPUs)."""

from __future__ import annotations

import heapq
import math

import pytest

from application.services import scheduler
from application.services.scheduler import (
    GpuState,
    Policy,
    QueuedJob,
    RunningJob,
    Start,
    decide,
    next_head,
    plan,
    queue_key,
)
from tests.scheduler_cases import NOW, busy, gpu, gpus_free, job, ordered, policy_of, run

# ------------------------------------------------------------------------------------------ starvation


def simulate(
    policy: str | Policy | None,
    arrivals: list[tuple[float, QueuedJob, float]],
    running: list[tuple[RunningJob, float]],
    n_gpus: int,
    horizon: float,
) -> dict[str, float]:
    """Tiny discrete-event loop over `decide`: start times by job id. policy None: greedy, no reservation.

    `arrivals`: (arrival time, job, true duration); `running`: (job, true end time), both from t=0.
    """
    t = 0.0
    durations = {j.job_id: d for _, j, d in arrivals}
    pending = sorted(arrivals, key=lambda a: a[0], reverse=True)
    queue: list[QueuedJob] = []
    active: dict[str, tuple[tuple[int, ...], float, float | None]] = {
        r.job_id: (r.gpu_ids, end, end) for r, end in running
    }
    starts: dict[str, float] = {}
    head: scheduler.Head | None = None
    head_since: dict[str, float] = {}  # as the store keeps it: each job's own, until it leaves the queue
    events: list[float] = [end for _, end in running]
    while t <= horizon:
        while pending and pending[-1][0] <= t:
            queue.append(pending.pop()[1])
        queue.sort(key=queue_key)
        for jid in [jid for jid, (_, end, _) in active.items() if end <= t]:
            del active[jid]
        runs = [
            RunningJob(jid, ids, None if est_end is None else est_end - t) for jid, (ids, _, est_end) in active.items()
        ]
        holder = {i: jid for jid, (ids, _, _) in active.items() for i in ids}
        gpus = [gpu(i, held=holder.get(i)) for i in range(n_gpus)]
        if policy is None:
            chosen: list[Start] = []
            for j in queue:
                got = run([j], busy(gpus, [*runs, *(RunningJob(s.job_id, s.gpu_ids, 0) for s in chosen)]))
                chosen += [Start(jid, ids) for jid, ids in got.items()]
        else:
            # As the queue processor does: the head, and each priority's, with since when, kept from pass to pass.
            p = plan(queue, gpus, runs, policy_of(policy) if isinstance(policy, str) else policy, t,
                     estimating=False, head=head, clocks=head_since)  # fmt: skip
            chosen, head = p.starts, next_head(head, p.head, t, head_since.get(p.head or ""))
            if head is not None:
                head_since.setdefault(*head)
            for level_head in p.heads:
                head_since.setdefault(level_head, t)
        by_id = {j.job_id: j for j in queue}
        for s in chosen:
            j = by_id[s.job_id]
            end = t + durations[j.job_id]
            active[j.job_id] = (s.gpu_ids, end, None if j.estimated_duration is None else t + j.estimated_duration)
            starts[j.job_id] = t
            head_since.pop(j.job_id, None)
            heapq.heappush(events, end)
        queue = [j for j in queue if j.job_id not in starts]
        if pending:
            heapq.heappush(events, pending[-1][0])
        while events and events[0] <= t:
            heapq.heappop(events)
        if not events:
            break
        t = heapq.heappop(events)
    return starts


def starvation_case(
    small_estimate: bool,
) -> tuple[list[tuple[float, QueuedJob, float]], list[tuple[RunningJob, float]]]:
    """A 4-GPU job at the head, 4 GPUs busy with short jobs, and a 1-GPU job arriving every 40 s."""
    running = [(RunningJob(f"r{i}", (i,), 100.0 * (i + 1)), 100.0 * (i + 1)) for i in range(4)]
    arrivals = [(0.0, QueuedJob("big", 5, 0.0, 4, None, None, 1000.0), 1000.0)]
    for k in range(200):
        at = 1.0 + 40.0 * k
        est = 150.0 if small_estimate else None
        arrivals.append((at, QueuedJob(f"s{k:03d}", 5, at, 1, None, None, est), 150.0))
    return arrivals, running


def test_starvation_greedy_without_reservation_starves_the_big_job() -> None:
    arrivals, running = starvation_case(small_estimate=True)
    starts = simulate(None, arrivals, running, n_gpus=4, horizon=8000.0)
    assert "big" not in starts
    assert len(starts) > 150


@pytest.mark.parametrize("small_estimate", [True, False])
def test_starvation_backfill_starts_the_big_job_in_bounded_time(small_estimate: bool) -> None:
    arrivals, running = starvation_case(small_estimate)
    starts = simulate("backfill", arrivals, running, n_gpus=4, horizon=50_000.0)
    # The last running job ends at 400; the reservation keeps small jobs off the GPUs past that.
    assert starts["big"] == 400.0
    # Small jobs still ran in the gaps before it when their estimates said they fit.
    before = [jid for jid, t in starts.items() if jid != "big" and t < starts["big"]]
    assert bool(before) is small_estimate
    # And every small job ran in the end.
    assert len(starts) == len(arrivals)


def test_starvation_fallback_is_first_fit_then_drains_for_the_big_job() -> None:
    # No estimates for the small jobs: while the big job is young they take any GPU (better than FIFO);
    # once it has waited QUEUE_STARVATION_SECONDS it drains the GPUs, so it waits at most that plus the
    # longest run still going (a small job: 150 s).
    arrivals, running = starvation_case(small_estimate=False)
    patience = 600.0
    starts = simulate(policy_of(starvation_seconds=patience), arrivals, running, n_gpus=4, horizon=50_000.0)
    before = [jid for jid, t in starts.items() if jid != "big" and t < starts["big"]]
    assert len(before) >= 10
    assert 400.0 <= starts["big"] <= patience + 150.0
    assert len(starts) == len(arrivals)


def test_starvation_clock_is_the_heads_own_and_not_restarted_by_a_job_briefly_ahead_of_it() -> None:
    # The clock was one (id, since): a higher priority job waiting a moment at the head restarted it, and with
    # one every 10 s the big job (unknown durations everywhere: only the starvation rule drains for it) never
    # started while 1-GPU jobs of its own priority kept taking each freed GPU.
    running = [(RunningJob(f"r{i}", (i,), None), 2.0 * (i + 1)) for i in range(4)]
    arrivals = [(0.0, QueuedJob("big", 5, 0.0, 4, None, None, None), 50.0)]
    for k in range(150):
        at = 0.5 + 2.0 * k
        arrivals.append((at, QueuedJob(f"s{k:03d}", 5, at, 1, None, None, None), 8.0))
    for k in range(30):
        at = 5.0 + 10.0 * k
        arrivals.append((at, QueuedJob(f"x{k:02d}", 6, at, 1, None, None, None), 3.0))
    starts = simulate(policy_of(starvation_seconds=15.0), arrivals, running, n_gpus=4, horizon=2000.0)
    # At the head from the start: 15 s, then the longest run still going (8 s), then a pass.
    assert starts["big"] <= 15.0 + 8.0 + 1.0, starts["big"]


def test_starvation_a_job_blocked_at_a_higher_priority_leaves_each_lower_priority_its_own_head() -> None:
    # A higher-priority job pinned to GPU 0, which a long run holds, was the queue's head for as long: the big
    # job's reservation stayed soft, and 1-GPU jobs of its priority (unknown durations) took each GPU it had
    # waited for (hunt CL: not started after 40 h). It is its priority's head, with a clock of its own.
    running = [(RunningJob("long", (0,), None), 5000.0), *((RunningJob(f"r{i}", (i,), None), 2.0 * i)
                                                          for i in (1, 2, 3))]  # fmt: skip
    arrivals = [(0.0, QueuedJob("big", 5, 0.0, 3, None, None, None), 50.0),
                (0.2, QueuedJob("pinned", 7, 0.2, 1, (0,), None, None), 60.0)]  # fmt: skip
    for k in range(150):
        at = 0.5 + 2.0 * k
        arrivals.append((at, QueuedJob(f"s{k:03d}", 5, at, 1, None, None, None), 8.0))
    starts = simulate(policy_of(starvation_seconds=15.0), arrivals, running, n_gpus=4, horizon=2000.0)
    assert "pinned" not in starts  # (GPU 0 is the long run's till 5,000 s)
    # Its own priority's head from its first pass: 15 s, then the longest run still going (8 s), then a pass.
    assert starts.get("big", math.inf) <= 15.0 + 8.0 + 2.0, starts.get("big")
    assert len(starts) > 100  # (the small jobs ran before and after it)


def test_a_reservation_is_planned_on_the_gpus_the_start_will_take_so_a_big_memory_job_is_told_true() -> None:
    # An 80 GB card and two 24 GB cards, every duration known. "j4" needs 40 GB, so the 80 GB card: it was told
    # it starts when "j3" (planned there, the biggest card first) ends at 174 s; but "j3"'s start left that card
    # to the jobs that need it, "j5" took it, and "j4" started at 243 s (hunt CL).
    running = [RunningJob("a", (0, 1), 35.0), RunningJob("b", (2,), 0.001)]
    gpus = [gpu(0, held="a"), gpu(1, total=24.0, held="a"), gpu(2, total=24.0, held="b")]
    q = ordered(job("j3", t=0, n=2, est=139.0), job("j5", t=1, est=208.0), job("j4", t=2, mem=40.0, est=172.0))
    told = plan(q, gpus, running, policy_of("backfill"), NOW).waits["j4"]
    assert told is not None
    later = plan(q, [gpu(0), gpu(1, total=24.0), gpu(2, total=24.0)], [], policy_of("backfill"), NOW + 35.0)
    started = {s.job_id: s.gpu_ids for s in later.starts}
    assert 0 in started.get("j5", ()) or 0 in started.get("j3", ()), started
    on_card = next(j for j, ids in started.items() if 0 in ids)
    ends = 35.0 + {"j3": 139.0, "j5": 208.0}[on_card]
    assert ends <= told + 1e-6, (started, told)


def test_starvation_young_reservation_still_binds_known_estimates() -> None:
    # Both durations known: backfill decides even while the big job is young, so it starts when planned.
    arrivals, running = starvation_case(small_estimate=True)
    starts = simulate(policy_of(starvation_seconds=3600.0), arrivals, running, n_gpus=4, horizon=50_000.0)
    assert starts["big"] == 400.0


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_wrong_estimates_delay_a_reservation_by_at_most_the_overrun(factor: float) -> None:
    # GPU 1 busy until +300; "big" (2 GPUs) waits for it. "fill" is backfilled on GPU 0 with an estimate of
    # 200 s (ends before +300 by the estimate); it really runs 200 * factor.
    running = [(RunningJob("r", (1,), 300.0), 300.0)]
    arrivals = [
        (0.0, QueuedJob("big", 5, 0.0, 2, None, None, 1000.0), 1000.0),
        (0.0, QueuedJob("fill", 5, 0.5, 1, None, None, 200.0), 200.0 * factor),
    ]
    starts = simulate(policy_of(), arrivals, running, n_gpus=2, horizon=10_000.0)
    assert starts["fill"] == 0.0
    overrun = max(0.0, 200.0 * factor - 300.0)
    # Too long an estimate only costs backfill chances; too short delays "big" by the overrun, no more.
    assert starts["big"] == 300.0 + overrun


def test_a_job_waiting_on_outside_processes_ahead_does_not_restart_the_heads_clock() -> None:
    # GPU 2 is used by someone else's process; "x" wants that GPU and can be planned no start, so the head whose
    # wait counts is "y". A pass with no GPU free and one with a GPU free both name "y": naming "x" in one
    # of them switched the head at every pass and "y"'s QUEUE_STARVATION_SECONDS never ran out.
    x = job("x", t=0.0, ids=(2,), est=100.0)
    y = job("y", t=1.0, n=2, est=100.0)
    outside = gpu(2, free=1.0, util=100.0)
    queue = ordered(x, y, job("small", t=2.0))
    all_busy = [gpu(0, held="r0"), gpu(1, held="r1"), outside]
    running = [RunningJob("r0", (0,), None), RunningJob("r1", (1,), None)]
    policy = policy_of(starvation_seconds=600.0)
    assert plan(queue, all_busy, running, policy, NOW, estimating=False).head == "y"
    one_free = [gpu(0), gpu(1, held="r1"), outside]
    p = plan(queue, one_free, running[1:], policy, NOW, estimating=False)
    assert p.head == "y" and [s.job_id for s in p.starts] == ["small"]


def test_a_job_over_its_owners_cap_on_a_gpu_that_is_gone_waits_as_never_startable() -> None:
    # The GPU it named was in the inventory when it was created; a restart with fewer GPUs lost it.
    running = [RunningJob("r0", (0,), 100.0, owner="ann")]
    gpus = [gpu(0, held="r0"), gpu(1)]
    queue = [QueuedJob("j0", 5, NOW, 1, (3,), None, 50.0, owner="ann")]
    p = plan(queue, gpus, running, policy_of(owner_gpu_cap=1), NOW)
    assert p.starts == [] and p.waits == {"j0": None} and p.reasons["j0"].code == "never"


def test_a_gpu_backfilled_under_a_reservation_is_planned_free_only_after_the_reserving_job() -> None:
    # "big" (3 GPUs) reserves GPUs 2, 3 and 0 from +10 to +20; "fill" backfills on GPU 2 until +10. "pair" can
    # start only when "big" ends: its estimate said +10 (GPU 2 free when "fill" ends), a start that never came.
    gpus = [gpu(0, held="r0"), gpu(1, held="r0"), gpu(2), gpu(3)]
    queue = ordered(job("big", t=0.0, n=3, est=10.0), job("fill", t=1.0, est=10.0), job("pair", t=2.0, n=2, est=10.0))
    p = plan(queue, gpus, [RunningJob("r0", (0, 1), 10.0)], policy_of(), NOW)
    assert [s.job_id for s in p.starts] == ["fill"]
    assert p.waits == {"big": 10.0, "fill": 0.0, "pair": 20.0}


def test_a_head_that_runs_are_preempted_for_holds_the_gpus_they_free() -> None:
    # "head" (young: its reservation soft for its own priority) preempted "v0" and "v1"; "v0" stopped at once,
    # and "same" (its priority, no estimate) took v0's GPU: the next pass preempted a third run for "head".
    policy = policy_of(starvation_seconds=1e9)
    gpus = [gpu(0), gpu(1, held="v1"), gpu(2, held="r2"), gpu(3, held="r3")]
    making_way = [RunningJob("v1", (1,), 0.0, ending=True, making_way_for="head"),
                  *(RunningJob(f"r{i}", (i,), None) for i in (2, 3))]  # fmt: skip
    queue = ordered(job("head", priority=9, t=0.0, n=2), job("same", priority=9, t=1.0))
    p = plan(queue, gpus, making_way, policy, NOW, estimating=False, head=("head", NOW))
    assert p.starts == [] and p.head == "head"
    # Made way for another job (or for none): young, it binds only the known, and "same" takes the free GPU.
    for other in ("someone", None):
        running = [RunningJob("v1", (1,), 0.0, ending=True, making_way_for=other), *making_way[1:]]
        p = plan(queue, gpus, running, policy, NOW, estimating=False, head=("head", NOW))
        assert p.starts == [Start("same", (0,))]


def test_an_overrunning_job_counts_as_ending_any_moment() -> None:
    # "r" is past its estimate (remaining 0): "big" is planned at once, so nothing may backfill onto GPU 0.
    running = [RunningJob("r", (1,), 0.0)]
    gpus = busy(gpus_free(2), running)
    q = ordered(job("big", t=1, n=2, est=1000), job("short", t=2, est=5), job("unknown", t=3))
    assert run(q, gpus, running) == {}


def test_priorities_stay_strict_across_levels_under_backfill() -> None:
    # "urgent" (priority 9, young, so its reservation is soft for its own priority) waits for GPU 1 (+100).
    running = [RunningJob("r", (1,), 100.0)]
    gpus = busy(gpus_free(2), running)
    young = policy_of(starvation_seconds=1e9)
    q = ordered(
        job("urgent", priority=9, t=1, n=2, est=1000),
        job("low-unknown", priority=1, t=2),
        job("low-long", priority=1, t=3, est=500),
        job("low-short", priority=1, t=4, est=50),
    )
    got = {s.job_id for s in decide(q, gpus, running, young, NOW)}
    # A lower priority backfills only where it delays no higher-priority reservation.
    assert got == {"low-short"}
    # The same priority with no estimate may take it while "urgent" is young (the fallback), not once old.
    q2 = ordered(job("urgent", priority=9, t=1, n=2, est=1000), job("same-unknown", priority=9, t=2))
    assert {s.job_id for s in decide(q2, gpus, running, young, NOW)} == {"same-unknown"}
    assert decide(q2, gpus, running, policy_of(starvation_seconds=60.0), NOW, head=("urgent", NOW - 61)) == []
    # Its clock runs from when it became the head, not from its submission.
    assert decide(q2, gpus, running, policy_of(starvation_seconds=60.0), NOW, head=("other", NOW - 61)) != []


def test_pending_reasons() -> None:
    running = [RunningJob("r", (1,), 100.0)]
    gpus = [gpu(0), gpu(1, held="r"), gpu(2, free=1.0, util=100.0)]
    q = ordered(
        job("big", t=1, n=2, est=1000),
        job("long", t=2, est=500),
        job("outside", t=3, ids=(2,), est=10),
        job("huge", t=4, n=3, est=10),
    )
    p = plan(q, gpus, running, policy_of(), NOW)
    assert p.reasons["big"].code == "resources"
    assert (p.reasons["long"].code, p.reasons["long"].job_id) == ("reservation", "big")
    assert p.reasons["long"].starts_in == pytest.approx(100.0)
    assert "big" in p.reasons["long"].text
    assert p.reasons["outside"].code == "outside_processes"
    assert p.reasons["huge"].code == "outside_processes"
    strict = plan(q, gpus, running, policy_of("strict"), NOW)
    assert strict.reasons["long"].code == "priority"
    owned = plan([QueuedJob("mine", 5, NOW, 1, None, None, 5.0, owner="ann")], gpus,
                 [RunningJob("r", (1,), 100.0, owner="ann")], policy_of(owner_gpu_cap=1), NOW)  # fmt: skip
    assert owned.starts == [] and owned.reasons["mine"].code == "owner_limit"


def test_a_job_over_its_owners_cap_is_told_when_its_owners_gpus_come_back() -> None:
    # ann holds her cap (2) with runs ending in 30 and 60 s: her next job waits for the first (GPUs are free).
    running = [RunningJob("a1", (0,), 30.0, owner="ann"), RunningJob("a2", (1,), 60.0, owner="ann")]
    gpus = busy(gpus_free(4), running)
    capped = policy_of(owner_gpu_cap=2)
    q = [QueuedJob("a3", 5, NOW, 1, None, None, 20.0, owner="ann"), QueuedJob("a4", 5, NOW + 1, 2, None, None, 20.0,
                                                                                owner="ann")]  # fmt: skip
    p = plan(q, gpus, running, capped, NOW)
    assert p.starts == [] and p.reasons["a3"].code == "owner_limit"
    assert p.waits["a3"] == pytest.approx(30.0) and p.waits["a4"] == pytest.approx(60.0)  # (they were null)
    # A run of hers with no known end: when her GPUs come back cannot be told.
    unknown = [RunningJob("a1", (0,), None, owner="ann"), RunningJob("a2", (1,), None, owner="ann")]
    assert plan(q[:1], busy(gpus_free(4), unknown), unknown, capped, NOW).waits["a3"] is None


def test_a_blocked_job_keeps_its_owners_cap_for_itself_against_that_owners_later_jobs() -> None:
    # GPU 0 (80 GB) is bob's for 100 s more; GPUs 1, 2 are free 24 GB cards; ann's cap is 2. "head" needs the
    # 80 GB card: it reserves it from +100. Started on GPUs 1 and 2, ann's later job kept her at her cap when
    # GPU 0 came free, and "head" waited on it 1,000 s (for ever, behind a stream of such jobs).
    running = [RunningJob("r", (0,), 100.0, owner="bob")]
    gpus = [gpu(0, free=1.0, held="r"), gpu(1, total=24.0), gpu(2, total=24.0)]
    capped = policy_of(owner_gpu_cap=2, starvation_seconds=0.0)
    head = QueuedJob("head", 9, NOW - 10, 1, None, 70.0, 50.0, owner="ann")
    for priority in (9, 1):
        later = QueuedJob("later", priority, NOW - 5, 2, None, None, 1000.0, owner="ann")
        p = plan([head, later], gpus, running, capped, NOW)
        assert p.starts == [] and p.waits["head"] == 100.0 and p.reasons["later"].code == "owner_limit"
        assert decide([head, later], gpus, running, capped, NOW) == []
    # Her cap is taken in queue order: a later job of hers starts if it has room beside "head"'s share; another
    # owner's job is not held back.
    one = QueuedJob("one", 1, NOW - 5, 1, None, None, None, owner="ann")
    bobs = QueuedJob("bobs", 1, NOW - 4, 1, None, None, 1000.0, owner="bob")
    assert [s.job_id for s in decide([head, one, bobs], gpus, running, capped, NOW)] == ["one", "bobs"]
    # A job over its owner's cap keeps its share too: ann's runs end in 30 s, then "next" (2 GPUs) has her cap.
    mine = [RunningJob("a1", (1,), 30.0, owner="ann")]
    nxt = QueuedJob("next", 5, NOW - 10, 2, None, None, 50.0, owner="ann")
    small = QueuedJob("small", 5, NOW - 5, 1, None, None, 10.0, owner="ann")
    p = plan([nxt, small], busy(gpus_free(4), mine), mine, capped, NOW)
    assert p.starts == [] and p.reasons["small"].code == "owner_limit"
    assert p.waits == {"next": pytest.approx(30.0), "small": pytest.approx(80.0)}


def test_an_owners_runs_at_once_are_capped_in_queue_order_cpu_only_jobs_too() -> None:
    # ann may run one job at once; hers runs 30 s more on the CPU. Her GPU job waits for it, and her CPU job
    # behind it for both, though GPUs are free and CPU-only jobs otherwise always start.
    running = [RunningJob("r", (), 30.0, owner="ann")]
    capped = policy_of(owner_run_cap=1)
    q = [QueuedJob("g", 5, NOW - 10, 1, None, None, 50.0, owner="ann"),
         QueuedJob("c", 5, NOW - 5, 0, None, None, 10.0, owner="ann"),
         QueuedJob("bobs", 5, NOW - 1, 0, None, None, 10.0, owner="bob")]  # fmt: skip
    p = plan(q, gpus_free(2), running, capped, NOW)
    assert [s.job_id for s in p.starts] == ["bobs"]
    assert {j: p.reasons[j].code for j in ("g", "c")} == {"g": "owner_limit", "c": "owner_limit"}
    assert p.waits["g"] == pytest.approx(30.0) and p.waits["c"] == pytest.approx(80.0)
    assert decide(q, gpus_free(2), running, capped, NOW) == p.starts
    assert [s.job_id for s in decide(q, gpus_free(2), [], capped, NOW)] == ["g", "bobs"]


def test_a_job_waiting_on_gpus_busy_outside_holds_none_of_its_owners_limits() -> None:
    # ann's job names GPU 0, busy with a process the server did not start: it may wait for ever, and her next
    # job waited as long for her cap, on an idle GPU.
    gpus = [gpu(0, free=1.0, util=100.0), gpu(1)]
    q = [QueuedJob("pinned", 5, NOW - 10, 1, (0,), None, 50.0, owner="ann"),
         QueuedJob("next", 5, NOW - 5, 1, None, None, 50.0, owner="ann")]  # fmt: skip
    for capped in (policy_of(owner_gpu_cap=1), policy_of(owner_run_cap=1)):
        assert [s.job_id for s in decide(q, gpus, [], capped, NOW)] == ["next"]
        assert [s.job_id for s in plan(q, gpus, [], capped, NOW).starts] == ["next"]


def test_under_strict_a_blocked_job_keeps_its_owners_turn_in_both_passes() -> None:
    running = [RunningJob("b", (0,), 100.0, owner="bob")]
    gpus = busy(gpus_free(2), running)
    q = [QueuedJob("pair", 5, NOW - 10, 2, None, None, 50.0, owner="ann"),
         QueuedJob("cpu", 5, NOW - 5, 0, None, None, 50.0, owner="ann")]  # fmt: skip
    strict = policy_of("strict", owner_run_cap=1)
    assert plan(q, gpus, running, strict, NOW).starts == [] == decide(q, gpus, running, strict, NOW)


def test_a_job_needing_memory_an_outside_process_holds_is_told_so_not_too_few_gpus() -> None:
    # An outside process left 30 of 80 GiB: enough for the GPU to count as free, not for a job asking 40. The job
    # was told "not enough free GPUs" while /queue said every GPU was free and nothing of ours ran.
    gpus = [gpu(0, free=30.0, util=10.0), gpu(1)]
    q = ordered(job("pinned", t=1, ids=(0,), mem=40.0, est=10), job("any2", t=2, n=2, mem=40.0, est=10))
    p = plan(q, gpus, [], policy_of(), NOW)
    assert p.reasons["pinned"].code == "outside_processes"
    assert p.reasons["any2"].code == "outside_processes"
    # Where our own runs are what it waits for, it still says so.
    held = [gpu(0, free=30.0, util=10.0), gpu(1, held="r")]
    p = plan(ordered(job("one", n=1, mem=40.0, est=10)), held, [RunningJob("r", (1,), 100.0)], policy_of(), NOW)
    assert p.reasons["one"].code in ("resources", "reservation")


def test_a_gpu_whose_reading_failed_is_said_so_not_taken_for_outside_processes() -> None:
    unreadable = GpuState(0, 80.0, 80.0, 0.0, None, readable=False)  # NVML failed on it: nobody else is on it
    p = plan([job("a", est=10.0)], [unreadable], [], policy_of(), NOW)
    assert p.starts == [] and p.reasons["a"].code == "gpu_unreadable" and "GET /gpus" in p.reasons["a"].text
    busy_outside = gpu(1, free=1.0, util=100.0)
    p = plan([job("b", n=2, est=10.0)], [unreadable, busy_outside], [], policy_of(), NOW)
    assert p.reasons["b"].code == "outside_processes"  # (one of them is busy with an outside process)


def test_a_reservation_whose_start_is_only_a_lower_bound_tells_no_time() -> None:
    # GPU 1 is held by a run of unknown length: "big" can start no sooner than GPU 0 frees (in 30 s) but no one
    # can tell when. "small" (lower priority, unknown too) waits for big's reservation, without a start time.
    running = [RunningJob("known", (0,), 30.0), RunningJob("unknown", (1,), None)]
    gpus = busy(gpus_free(3), running)
    q = ordered(job("big", t=1, n=3, est=100), job("small", priority=4, t=2))
    p = plan(q, gpus, running, policy_of(), NOW)
    assert p.starts == [] and p.waits["big"] is None
    assert (p.reasons["small"].code, p.reasons["small"].job_id) == ("reservation", "big")
    assert p.reasons["small"].starts_in is None and "unknown length" in p.reasons["small"].text


def test_starvation_strict_also_starts_the_big_job() -> None:
    arrivals, running = starvation_case(small_estimate=True)
    starts = simulate("strict", arrivals, running, n_gpus=4, horizon=8000.0)
    assert starts["big"] == 400.0
    assert min(t for jid, t in starts.items() if jid != "big") >= 400.0


def test_a_job_its_owners_limit_holds_back_does_not_keep_a_gpu_from_a_job_free_to_choose() -> None:
    # ann may run one job at once and runs one on the CPU: her job naming GPU 1 cannot start. bob's job may take
    # either GPU; it took GPU 0, which carl's job names, and carl's waited beside an idle GPU 1.
    running = [RunningJob("r", (), 30.0, owner="ann")]
    q = [QueuedJob("pinned", 5, NOW - 10, 1, (1,), None, 50.0, owner="ann"),
         QueuedJob("any", 5, NOW - 5, 1, None, None, 50.0, owner="bob"),
         QueuedJob("named", 5, NOW - 1, 1, (0,), None, 50.0, owner="carl")]  # fmt: skip
    capped = policy_of(owner_run_cap=1)
    for starts in (decide(q, gpus_free(2), running, capped, NOW), plan(q, gpus_free(2), running, capped, NOW).starts):
        assert {s.job_id: s.gpu_ids for s in starts} == {"any": (1,), "named": (0,)}


def test_the_gpus_jobs_want_are_counted_against_owner_limits_as_the_plan_counts_them() -> None:
    # ann's job on a GPU busy outside takes no share of her cap in the plan; it did in the GPU preference, so her
    # job naming GPU 1 counted as held back, and bob's free job took GPU 1 (y then waited beside an idle GPU 0).
    gpus = [gpu(0, util=50.0), gpu(1, util=0.0), gpu(2, free=1.0, util=100.0)]
    q = [QueuedJob("any", 5, NOW - 10, 1, None, None, 50.0, owner="bob"),
         QueuedJob("x", 5, NOW - 9, 1, (2,), None, 50.0, owner="ann"),
         QueuedJob("y", 5, NOW - 8, 1, (1,), None, 50.0, owner="ann")]  # fmt: skip
    capped = policy_of(owner_gpu_cap=1)
    for starts in (decide(q, gpus, [], capped, NOW), plan(q, gpus, [], capped, NOW).starts):
        assert {s.job_id: s.gpu_ids for s in starts} == {"any": (0,), "y": (1,)}
    # A CPU-only job ahead takes its owner's one run at once in both.
    q = [QueuedJob("cpu", 5, NOW - 11, 0, None, None, 50.0, owner="ann"),
         QueuedJob("pinned", 5, NOW - 10, 1, (1,), None, 50.0, owner="ann"),
         QueuedJob("any", 5, NOW - 5, 1, None, None, 50.0, owner="bob"),
         QueuedJob("named", 5, NOW - 1, 1, (0,), None, 50.0, owner="carl")]  # fmt: skip
    capped = policy_of(owner_run_cap=1)
    for starts in (decide(q, gpus_free(2), [], capped, NOW), plan(q, gpus_free(2), [], capped, NOW).starts):
        assert {s.job_id: s.gpu_ids for s in starts} == {"cpu": (), "any": (1,), "named": (0,)}


def test_a_low_priority_job_does_not_take_the_free_gpu_a_blocked_urgent_job_behind_a_capped_one_needs() -> None:
    # bob holds GPUs 0 and 2 (his cap) for 10 s; GPU 1 is free. carl's urgent 2-GPU job reserves GPU 1 and the
    # first of bob's to come back: ann's 50-s job must not start on GPU 1 (a forecast change let it).
    running = [RunningJob("r0", (0, 2), 10.0, owner="bob")]
    q = [QueuedJob("b1", 9, NOW - 10, 1, None, None, 25.0, owner="bob"),
         QueuedJob("c2", 9, NOW - 9, 2, None, None, 25.0, owner="carl"),
         QueuedJob("a1", 5, NOW - 8, 1, None, None, 50.0, owner="ann")]  # fmt: skip
    capped = policy_of(owner_gpu_cap=2)
    gpus = busy(gpus_free(3), running)
    assert decide(q, gpus, running, capped, NOW) == [] == plan(q, gpus, running, capped, NOW).starts
