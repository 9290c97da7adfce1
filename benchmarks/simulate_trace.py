"""Replay a GPU-cluster trace through `scheduler.decide` in a discrete-event simulation (run by hand).

The trace is Microsoft's Philly trace as processed for the Pollux simulator (see ../shared/traces/README.md):
one row per job with its submission time, duration and GPU count. Each job is queued at its submission time
(all at one priority, so the queue is FIFO), started when `decide` says so, and ends `duration` seconds
later. The scheduler sees every job's duration as `estimated_duration`, optionally with multiplicative
log-normal noise (--estimate-noise) or not at all for a fraction of jobs (--unknown-estimates); a running
job's `remaining_seconds` is its estimate minus the time it has run (0 once it overruns).

GPUs are identical (80 GB, no outside processes, no topology), so the figures compare queueing policies
only. Jobs asking for more GPUs than the cluster has are skipped. Printed per policy: jobs, queueing delay
(mean, median, p95, p99; also the mean for jobs of 8+ GPUs, the ones backfill can starve without
reservations), mean job completion time, GPU utilization over the makespan, makespan, and the cost of the
decisions.

    .venv/bin/python benchmarks/simulate_trace.py [--gpus 64] [--cluster 6214e9] [--limit 5000]
        [--start '2017-10-01 00:00:00' --end '2017-10-08 00:00:00'] [--policy both]
        [--estimate-noise 0.5] [--unknown-estimates 0.2] [--seed 1]
"""

from __future__ import annotations

import argparse
import csv
import heapq
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from application.services.scheduler import GpuState, QueuedJob, RunningJob, decide  # noqa: E402

GPU_GB = 80.0
PRIORITY = 5


@dataclass(frozen=True, slots=True)
class TraceJob:
    job_id: str
    submitted_at: float
    duration: float
    num_gpus: int


@dataclass(slots=True)
class Result:
    policy: str
    jobs: int
    delays: list[float]
    big_delays: list[float]
    jct: list[float]
    utilization: float
    makespan: float
    passes: int
    pass_seconds: float


def load_trace(args: argparse.Namespace) -> tuple[list[TraceJob], int]:
    """The selected jobs in submission order, and how many were skipped for asking too many GPUs."""
    with open(args.trace, newline="") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if (args.cluster is None or r["cluster"] == args.cluster)
            and (args.start is None or r["timestamp"] >= args.start)
            and (args.end is None or r["timestamp"] < args.end)
        ]
    # The file is not in time order; "YYYY-MM-DD HH:MM:SS" sorts as text.
    rows.sort(key=lambda r: r["timestamp"])
    jobs: list[TraceJob] = []
    skipped = 0
    for n, r in enumerate(rows):
        if len(jobs) >= args.limit:
            break
        gpus = int(r["num_gpus"])
        if gpus > args.gpus:
            skipped += 1
            continue
        at = datetime.strptime(r["timestamp"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
        jobs.append(TraceJob(f"j{n:06d}", at, max(1.0, float(r["duration"])), gpus))
    return jobs, skipped


def estimates(jobs: list[TraceJob], noise: float, unknown: float, seed: int) -> dict[str, float | None]:
    rng = random.Random(seed)
    out: dict[str, float | None] = {}
    for j in jobs:
        if rng.random() < unknown:
            out[j.job_id] = None
        else:
            out[j.job_id] = j.duration * (math.exp(rng.gauss(0.0, noise)) if noise > 0 else 1.0)
    return out


def simulate(jobs: list[TraceJob], est: dict[str, float | None], n_gpus: int, policy: str) -> Result:
    queued_of = {
        j.job_id: QueuedJob(j.job_id, PRIORITY, j.submitted_at, j.num_gpus, None, None, est[j.job_id]) for j in jobs
    }
    by_id = {j.job_id: j for j in jobs}
    free_gpu = [GpuState(i, GPU_GB, GPU_GB, 0.0, None) for i in range(n_gpus)]
    gpus = list(free_gpu)
    n_free = n_gpus
    # job_id -> (gpu ids, start time); and completions as (end time, job_id).
    running: dict[str, tuple[tuple[int, ...], float]] = {}
    ends: list[tuple[float, str]] = []
    queue: list[QueuedJob] = []
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    arrivals = iter(jobs)
    nxt = next(arrivals, None)
    passes = 0
    pass_seconds = 0.0

    while nxt is not None or ends or queue:
        t = min(nxt.submitted_at if nxt is not None else math.inf, ends[0][0] if ends else math.inf)
        if t == math.inf:
            break  # queued jobs that can never start (cannot happen: oversized jobs were skipped)
        while ends and ends[0][0] <= t:
            _, jid = heapq.heappop(ends)
            ids, _ = running.pop(jid)
            finished[jid] = t
            for i in ids:
                gpus[i] = free_gpu[i]
            n_free += len(ids)
        while nxt is not None and nxt.submitted_at <= t:
            # Same-time arrivals come in id order, which is also the queue's tie order.
            queue.append(queued_of[nxt.job_id])
            nxt = next(arrivals, None)
        if not n_free or not queue:
            continue
        run_view = [
            RunningJob(jid, ids, None if est[jid] is None else max(0.0, s + (est[jid] or 0.0) - t))
            for jid, (ids, s) in running.items()
        ]
        t0 = time.perf_counter()
        starts = decide(queue, gpus, run_view, policy=policy, min_free_gb=2.0, max_util=90.0, now=t)
        pass_seconds += time.perf_counter() - t0
        passes += 1
        if not starts:
            continue
        for s in starts:
            running[s.job_id] = (s.gpu_ids, t)
            started[s.job_id] = t
            heapq.heappush(ends, (t + by_id[s.job_id].duration, s.job_id))
            for i in s.gpu_ids:
                gpus[i] = GpuState(i, GPU_GB, 1.0, 100.0, s.job_id)
            n_free -= len(s.gpu_ids)
        queue = [q for q in queue if q.job_id not in started]

    delays = [started[j.job_id] - j.submitted_at for j in jobs]
    big = [started[j.job_id] - j.submitted_at for j in jobs if j.num_gpus >= 8]
    jct = [finished[j.job_id] - j.submitted_at for j in jobs]
    first = min(j.submitted_at for j in jobs)
    makespan = max(finished.values()) - first
    busy = sum(j.duration * j.num_gpus for j in jobs)
    return Result(policy, len(jobs), delays, big, jct, busy / (n_gpus * makespan), makespan, passes, pass_seconds)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def report(r: Result, wall: float) -> None:
    print(f"policy {r.policy}: {r.jobs} jobs")
    print(
        f"  queueing delay   mean {hours(statistics.fmean(r.delays))}, median {hours(statistics.median(r.delays))},"
        f" p95 {hours(pct(r.delays, 0.95))}, p99 {hours(pct(r.delays, 0.99))}"
    )
    if r.big_delays:
        print(f"  8+ GPU jobs      {len(r.big_delays)}, mean delay {hours(statistics.fmean(r.big_delays))}")
    print(f"  job completion   mean {hours(statistics.fmean(r.jct))}")
    print(f"  GPU utilization  {100 * r.utilization:.1f} % over the makespan of {r.makespan / 86400:.2f} days")
    print(
        f"  decisions        {r.passes} passes, {1000 * r.pass_seconds / max(1, r.passes):.3f} ms mean;"
        f" simulation {wall:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=ROOT.parent / "shared" / "traces" / "philly.csv")
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--cluster", help="only this virtual cluster id (e.g. 6214e9)")
    parser.add_argument("--limit", type=int, default=5000, help="at most this many jobs, from the earliest")
    parser.add_argument("--start", help="only jobs submitted at or after 'YYYY-MM-DD HH:MM:SS'")
    parser.add_argument("--end", help="only jobs submitted before 'YYYY-MM-DD HH:MM:SS'")
    parser.add_argument("--policy", choices=("strict", "backfill", "both"), default="both")
    parser.add_argument("--estimate-noise", type=float, default=0.0, help="sigma of log-normal estimate error")
    parser.add_argument("--unknown-estimates", type=float, default=0.0, help="fraction of jobs with no estimate")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.gpus < 1 or args.limit < 1:
        parser.error("--gpus and --limit must be at least 1")

    jobs, skipped = load_trace(args)
    if not jobs:
        parser.error("no job in the trace matches the selection")
    est = estimates(jobs, args.estimate_noise, args.unknown_estimates, args.seed)
    demand = sum(j.duration * j.num_gpus for j in jobs)
    span = jobs[-1].submitted_at - jobs[0].submitted_at
    print(
        f"{args.trace.name}: {len(jobs)} jobs ({skipped} skipped: more than {args.gpus} GPUs),"
        f" cluster {args.cluster or 'all'}, submitted over {span / 86400:.2f} days;"
        f" offered load {demand / max(1.0, span) / args.gpus:.2f} x {args.gpus} GPUs"
    )
    print(f"estimates: noise sigma {args.estimate_noise}, unknown fraction {args.unknown_estimates}")
    for policy in ("strict", "backfill") if args.policy == "both" else (args.policy,):
        t0 = time.perf_counter()
        result = simulate(jobs, est, args.gpus, policy)
        report(result, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
