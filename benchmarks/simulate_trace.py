"""Replay a GPU-cluster trace through the server's own `scheduler.plan` and `predictions` (run by hand).

The trace is Microsoft's Philly trace as processed for the Pollux simulator (../shared/traces/README.md): one
row per job with its submission time, duration, GPU count and virtual cluster. Each job is queued at its
submission time and started when `plan` says so; it ends `duration` (+ --startup) seconds later. The
scheduler sees only what the live server would know, per policy:

    fifo       QUEUE_POLICY=strict (all jobs share one priority, so strict is FIFO)
    greedy     first fit, no reservations (a reference: it starves wide jobs)
    easy       textbook EASY backfill given exact durations (`easy` below, not the server's planner): only the
               first blocked job holds a reservation. The issue's yardstick
    oracle     the server's backfill given every job's exact duration (starvation time 0): every blocked job
               holds a reservation (conservative backfill); on these traces its mean JCT is as good as EASY's or better
    predicted  the server's backfill: predictions from `predictions.predict` over finished jobs of the same
               kind (here: the virtual cluster and GPU count, all the trace tells of a job), swift's own
               remaining time once a job has run --progress-after seconds, QUEUE_STARVATION_SECONDS
    fallback   the same with no prediction before a job starts (swift's remaining time only)
    blind      the same knowing nothing at all, not even swift's remaining time

Printed per policy: mean job completion time (JCT), queueing delay (mean, p50, p99, worst), GPU utilization
over the makespan, makespan, and the cost of the decisions. --plot writes each policy's JCT CDF as a PNG.

    .venv/bin/python benchmarks/simulate_trace.py [--gpus 64] [--cluster 6214e9] [--limit 5000]
        [--start '2017-10-01 00:00:00'] [--end ...] [--policies fifo,oracle,predicted,fallback]
        [--starvation 1800] [--progress-after 60] [--plot jct.png]
"""

from __future__ import annotations

import argparse
import csv
import heapq
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from application.services.predictions import predict, remaining_seconds  # noqa: E402
from application.services.scheduler import (  # noqa: E402
    GpuState,
    Head,
    Policy,
    QueuedJob,
    RunningJob,
    Start,
    next_head,
    plan,
    queue_key,
)

GPU_GB = 80.0
PRIORITY = 5
POLICIES = ("fifo", "greedy", "easy", "oracle", "predicted", "fallback", "blind")
END, PROGRESS, WAKE = 0, 1, 2
# As the live scheduler: queued jobs without a prediction get one when history grows, within its window.
PREDICTION_WINDOW = 256


@dataclass(frozen=True, slots=True)
class TraceJob:
    job_id: str
    submitted_at: float
    duration: float
    num_gpus: int
    kind: str  # what makes jobs "similar" for the history source
    priority: int = PRIORITY


@dataclass(frozen=True)
class Mode:
    name: str
    policy: str  # "strict" | "backfill" | "easy" (textbook EASY here, not the server's planner)
    starvation: float
    knowledge: str  # "oracle" | "predicted" | "progress" | "none"


def mode_of(name: str, starvation: float) -> Mode:
    return {
        "fifo": Mode(name, "strict", 0.0, "none"),
        "greedy": Mode(name, "backfill", math.inf, "none"),
        "easy": Mode(name, "easy", 0.0, "oracle"),
        "oracle": Mode(name, "backfill", 0.0, "oracle"),
        "predicted": Mode(name, "backfill", starvation, "predicted"),
        "fallback": Mode(name, "backfill", starvation, "progress"),
        "blind": Mode(name, "backfill", starvation, "none"),
    }[name]


@dataclass(slots=True)
class Result:
    policy: str
    jobs: int
    delays: list[float]
    jct: list[float]
    utilization: float
    makespan: float
    passes: int
    pass_seconds: float
    prediction_ratios: list[float] = field(default_factory=list)

    def row(self) -> dict[str, float]:
        return {
            "jct_mean": statistics.fmean(self.jct),
            "delay_mean": statistics.fmean(self.delays),
            "delay_p50": pct(self.delays, 0.5),
            "delay_p99": pct(self.delays, 0.99),
            "delay_max": max(self.delays),
            "utilization": self.utilization,
            "makespan": self.makespan,
        }


def simulate(
    jobs: Sequence[TraceJob],
    n_gpus: int,
    mode: Mode,
    *,
    startup: float = 0.0,
    progress_after: float = 60.0,
) -> Result:
    """Run the trace to its end under one policy. Jobs must be in submission order."""
    policy = Policy(name="backfill" if mode.policy == "easy" else mode.policy, min_free_gb=2.0, max_util=90.0,
                    starvation_seconds=mode.starvation)  # fmt: skip
    by_id = {j.job_id: j for j in jobs}
    runtime = {j.job_id: j.duration + startup for j in jobs}
    free_gpu = [GpuState(i, GPU_GB, GPU_GB, 0.0, None) for i in range(n_gpus)]
    gpus = list(free_gpu)
    n_free = n_gpus
    history: dict[str, list[float]] = {}  # kind -> finished durations, newest first
    history_version = 0
    seen_version = -1
    predicted: dict[str, float | None] = {}
    queued_prediction: dict[str, float | None] = {}
    running: dict[str, tuple[tuple[int, ...], float]] = {}
    events: list[tuple[float, int, str]] = []  # (time, END | PROGRESS | WAKE, job id)
    queue: list[QueuedJob] = []
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    ratios: list[float] = []
    arrivals = iter(jobs)
    nxt = next(arrivals, None)
    passes = 0
    pass_seconds = 0.0
    head: Head | None = None
    head_since: dict[str, float] = {}

    def prediction_for(j: TraceJob) -> float | None:
        if mode.knowledge == "oracle":
            return runtime[j.job_id]
        if mode.knowledge != "predicted":
            return None
        p = predict(time_limit=None, steps=None, samples_per_step=1, profile=(), durations=history.get(j.kind, ()))
        return p.seconds if p else None

    def queued(j: TraceJob) -> QueuedJob:
        return QueuedJob(j.job_id, j.priority, j.submitted_at, j.num_gpus, None, None, queued_prediction[j.job_id])

    while nxt is not None or events:
        t = min(nxt.submitted_at if nxt is not None else math.inf, events[0][0] if events else math.inf)
        while events and events[0][0] <= t:
            _, kind, jid = heapq.heappop(events)
            if kind == END:
                ids, s = running.pop(jid)
                finished[jid] = t
                for i in ids:
                    gpus[i] = free_gpu[i]
                n_free += len(ids)
                history.setdefault(by_id[jid].kind, []).insert(0, t - s)
                history_version += 1
                planned = queued_prediction[jid]
                if planned:
                    ratios.append((t - s) / planned)
            elif kind == PROGRESS and jid in running:
                predicted[jid] = runtime[jid]  # swift prints its remaining time: from then on the server knows
        while nxt is not None and nxt.submitted_at <= t:
            queued_prediction[nxt.job_id] = predicted[nxt.job_id] = prediction_for(nxt)
            queue.append(queued(nxt))
            nxt = next(arrivals, None)
        if mode.knowledge == "predicted" and history_version != seen_version:
            seen_version = history_version
            for n, q in enumerate(queue[:PREDICTION_WINDOW]):
                if q.estimated_duration is None and (p := prediction_for(by_id[q.job_id])) is not None:
                    queued_prediction[q.job_id] = predicted[q.job_id] = p
                    queue[n] = queued(by_id[q.job_id])
        if not n_free or not queue:
            continue
        run_view = [
            RunningJob(jid, ids, remaining_seconds(predicted=predicted[jid], started_at=s, time_limit=None, now=t))
            for jid, (ids, s) in running.items()
        ]
        t0 = time.perf_counter()
        if mode.policy == "easy":
            starts = easy(queue, [g.index for g in gpus if g.held_by is None],
                          [(ids, s + runtime[jid]) for jid, (ids, s) in running.items()], runtime, t)  # fmt: skip
            pass_seconds += time.perf_counter() - t0
            passes += 1
        else:
            decision = plan(queue, gpus, run_view, policy, t, estimating=False, head=head, clocks=head_since)
            pass_seconds += time.perf_counter() - t0
            passes += 1
            starts = decision.starts
        # As the queue processor keeps it: each job's clock is its own until it starts.
        kept = next_head(head, decision.head, t, head_since.get(decision.head or "")) if mode.policy != "easy" else None
        if kept is not None:
            head_since.setdefault(*kept)
        if kept != head and kept is not None and 0.0 < mode.starvation < math.inf:
            # (its reservation then binds all)
            heapq.heappush(events, (max(t, kept[1] + mode.starvation), WAKE, kept[0]))
        for level_head in decision.heads if mode.policy != "easy" else ():  # (each priority's head: its own clock)
            if level_head not in head_since:
                head_since[level_head] = t
                if 0.0 < mode.starvation < math.inf:
                    heapq.heappush(events, (t + mode.starvation, WAKE, level_head))
        head = kept
        if not starts:
            continue
        for st in starts:
            jid = st.job_id
            running[jid] = (st.gpu_ids, t)
            started[jid] = t
            head_since.pop(jid, None)
            heapq.heappush(events, (t + runtime[jid], END, jid))
            if mode.knowledge in ("predicted", "progress") and runtime[jid] > progress_after:
                heapq.heappush(events, (t + progress_after, PROGRESS, jid))
            for i in st.gpu_ids:
                gpus[i] = GpuState(i, GPU_GB, 1.0, 100.0, jid)
            n_free -= len(st.gpu_ids)
        done = {st.job_id for st in starts}
        queue = [q for q in queue if q.job_id not in done]

    missing = [j.job_id for j in jobs if j.job_id not in finished]
    if missing:
        raise RuntimeError(f"{len(missing)} jobs never ran under {mode.name}")
    delays = [started[j.job_id] - j.submitted_at for j in jobs]
    jct = [finished[j.job_id] - j.submitted_at for j in jobs]
    first = min(j.submitted_at for j in jobs)
    makespan = max(finished.values()) - first
    busy = sum(runtime[j.job_id] * j.num_gpus for j in jobs)
    return Result(mode.name, len(jobs), delays, jct, busy / (n_gpus * makespan), makespan, passes, pass_seconds,
                  ratios)  # fmt: skip


def easy(
    queue: Sequence[QueuedJob],
    free: list[int],
    running: Sequence[tuple[tuple[int, ...], float]],
    runtime: Mapping[str, float],
    now: float,
) -> list[Start]:
    """Textbook EASY backfill (Lifka 1995; Mu'alem and Feitelson 2001) with exact run times, one priority:
    jobs start in queue order while they fit; the first that does not (the head) gets the one reservation,
    at the shadow time when enough running jobs have ended; a later job may start now if it ends by then,
    or if it uses only GPUs the head will not need (the extra GPUs at the shadow time). Other blocked jobs
    hold nothing. The yardstick the issue names, kept apart from the server's planner (`scheduler.plan`,
    where every blocked job holds a reservation)."""
    free = sorted(free)
    starts: list[Start] = []
    ends = sorted((end, len(ids)) for ids, end in running)
    shadow: float | None = None
    extra = 0
    for q in queue:
        k = q.num_gpus
        if shadow is None:
            if k <= len(free):
                starts.append(Start(q.job_id, tuple(free[:k])))
                free = free[k:]
                ends = sorted([*ends, (now + runtime[q.job_id], k)])
                continue
            # The head: when will k GPUs be free, and how many beyond its need then?
            avail = len(free)
            shadow = math.inf
            for end, n in ends:
                avail += n
                if avail >= k:
                    shadow, extra = end, avail - k
                    break
            continue
        if k <= len(free) and (now + runtime[q.job_id] <= shadow or k <= extra):
            if now + runtime[q.job_id] > shadow:
                extra -= k
            starts.append(Start(q.job_id, tuple(free[:k])))
            free = free[k:]
    return starts


# ---- the Philly trace ------------------------------------------------------------------------------------


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
    rows.sort(key=lambda r: r["timestamp"])  # the file is not in time order; this format sorts as text
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
        kind = f"{r['cluster']}:{gpus}"
        jobs.append(TraceJob(f"j{n:06d}", at, max(1.0, float(r["duration"])), gpus, kind))
    jobs.sort(key=lambda j: queue_key(QueuedJob(j.job_id, j.priority, j.submitted_at, 1, None, None, None)))
    jobs.sort(key=lambda j: j.submitted_at)
    return jobs, skipped


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def human(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def table(results: Sequence[Result], baseline: str | None = "oracle") -> str:
    """A Markdown table of the results; ratios against `baseline` when it is among them."""
    base = next((r.row() for r in results if r.policy == baseline), None)
    head = "| policy | mean JCT | mean delay | p50 delay | p99 delay | worst wait | utilization | makespan |"
    lines = [head, "|" + "---|" * 8]
    for r in results:
        row = r.row()
        vs = base is not None and r.policy != baseline

        def rel(key: str, row: dict[str, float] = row, vs: bool = vs) -> str:
            return f" ({row[key] / base[key]:.2f}x)" if vs and base and base[key] else ""

        ratio, dratio = rel("jct_mean"), rel("delay_mean")
        lines.append(
            f"| {r.policy} | {human(row['jct_mean'])}{ratio} | {human(row['delay_mean'])}{dratio} | "
            f"{human(row['delay_p50'])} | {human(row['delay_p99'])} | {human(row['delay_max'])} | "
            f"{100 * row['utilization']:.1f} % | {human(row['makespan'])} |"
        )
    return "\n".join(lines)


def plot_cdf(results: Sequence[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for r in results:
        xs = sorted(r.jct)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{r.policy} (mean {human(statistics.fmean(xs))})")
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (s, log scale)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def stream_check(gpus: int, starvation: float, seed: int = 1) -> None:
    """Target: a stream of 1-GPU jobs arriving faster than they finish, plus one all-GPU job. Once the big job is
    at the head of the queue (every job submitted before it has started: those go first in any order-keeping
    policy), it must wait at most QUEUE_STARVATION_SECONDS + the longest remaining run (a small job's)."""
    import random

    rng = random.Random(seed)
    small_max, every = 600.0, 30.0
    jobs = [TraceJob(f"s{i:05d}", i * every, rng.uniform(60.0, small_max), 1, "small") for i in range(3000)]
    jobs.append(TraceJob("big", 3600.0 + 0.5, 1800.0, gpus, "big"))
    jobs.sort(key=lambda j: (j.submitted_at, j.job_id))
    demand = statistics.fmean(j.duration for j in jobs if j.job_id != "big") / every
    print(f"stream: a 1-GPU job every {every:g} s (60-{small_max:g} s each: {demand / gpus:.2f}x what {gpus} GPUs"
          f" take), one {gpus}-GPU job at t=3600 s; bound at the head = {starvation:g} + {small_max:g} s")  # fmt: skip
    for name in ("fifo", "greedy", "fallback", "predicted", "oracle"):
        r = simulate(jobs, gpus, mode_of(name, starvation))
        i = next(n for n, j in enumerate(jobs) if j.job_id == "big")
        start = jobs[i].submitted_at + r.delays[i]
        ahead = [
            j.submitted_at + d for j, d in zip(jobs, r.delays, strict=True) if j.submitted_at < jobs[i].submitted_at
        ]
        at_head = start - max(jobs[i].submitted_at, max(ahead))
        verdict = "ok" if at_head <= starvation + small_max else "OVER"
        print(f"  {name:<10} big job waited {human(r.delays[i]):>9}, {human(at_head):>9} at the head ({verdict});"
              f" mean delay {human(statistics.fmean(r.delays))}")  # fmt: skip


def positive(text: str) -> int:
    """argparse's type for a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=ROOT.parent / "shared" / "traces" / "philly.csv")
    parser.add_argument("--gpus", type=positive, default=64)
    parser.add_argument("--cluster", help="only this virtual cluster id (e.g. 6214e9)")
    parser.add_argument("--limit", type=int, default=5000, help="at most this many jobs, from the earliest")
    parser.add_argument("--start", help="only jobs submitted at or after 'YYYY-MM-DD HH:MM:SS'")
    parser.add_argument("--end", help="only jobs submitted before 'YYYY-MM-DD HH:MM:SS'")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}")
    parser.add_argument("--starvation", type=float, default=1800.0, help="QUEUE_STARVATION_SECONDS")
    parser.add_argument("--progress-after", type=float, default=60.0,
                        help="seconds a run takes before swift prints its remaining time")  # fmt: skip
    parser.add_argument("--startup", type=float, default=0.0, help="seconds added to every run (start-up)")
    parser.add_argument("--plot", type=Path, help="write the JCT CDF of each policy to this PNG")
    parser.add_argument("--stream", action="store_true", help="only the starvation check (1-GPU stream + a wide job)")
    args = parser.parse_args()
    if args.stream:
        stream_check(min(args.gpus, 8), args.starvation)
        return
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.gpus < 1 or args.limit < 1 or any(n not in POLICIES for n in names):
        parser.error(f"--gpus and --limit must be at least 1; policies are {', '.join(POLICIES)}")

    if not args.trace.is_file():
        parser.error(f"no trace at {args.trace}: pass --trace with the Philly trace's CSV (cluster_job_log as CSV: "
                     "the project's shared/traces/philly.csv beside this repository), or run --stream, which needs "
                     "none")  # fmt: skip
    jobs, skipped = load_trace(args)
    if not jobs:
        parser.error("no job in the trace matches the selection")
    demand = sum(j.duration * j.num_gpus for j in jobs)
    span = jobs[-1].submitted_at - jobs[0].submitted_at
    print(
        f"{args.trace.name}: {len(jobs)} jobs ({skipped} skipped: more than {args.gpus} GPUs),"
        f" cluster {args.cluster or 'all'}, submitted over {span / 86400:.2f} days;"
        f" offered load {demand / max(1.0, span) / args.gpus:.2f} x {args.gpus} GPUs;"
        f" starvation {args.starvation:g} s, progress after {args.progress_after:g} s"
    )
    results = []
    for name in names:
        t0 = time.perf_counter()
        r = simulate(jobs, args.gpus, mode_of(name, args.starvation), startup=args.startup,
                     progress_after=args.progress_after)  # fmt: skip
        wall = time.perf_counter() - t0
        extra = ""
        if r.prediction_ratios:
            s = sorted(r.prediction_ratios)
            extra = f"; actual/predicted median {statistics.median(s):.2f}, p90 {pct(s, 0.9):.2f}"
        print(f"  {name}: {r.passes} passes, {1000 * r.pass_seconds / max(1, r.passes):.2f} ms mean,"
              f" {wall:.1f} s{extra}", flush=True)  # fmt: skip
        results.append(r)
    print()
    print(table(results))
    if args.plot:
        plot_cdf(results, args.plot, f"Philly {args.cluster or 'all clusters'}: {len(jobs)} jobs on {args.gpus} GPUs")
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
