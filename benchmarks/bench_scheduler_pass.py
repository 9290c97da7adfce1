"""Cost of one scheduling decision (`scheduler.decide`), pure Python, no Redis (run by hand; prints figures).

Queues of 100 / 1,000 / 10,000 jobs (priorities 0-10, 1-4 GPUs, some with `min_gpu_memory_gb`, about
half with a duration estimate) against 8 GPUs, in several cluster states:

* some-free      3 GPUs free, 5 held by running jobs (some with remaining-time estimates), NVLink pairs
* all-busy       every GPU held: the short-circuit path
* blocked-head   a 8-GPU job at the head, 4 GPUs free: backfill scans the whole queue for short jobs
* unusable-free  2 free GPUs too small for every job: backfill plans around `BACKFILL_DEPTH` blocked jobs

For each, the median and p99 over repeated calls, per policy; then `plan` (waits and reasons) once per size.

    .venv/bin/python benchmarks/bench_scheduler_pass.py [--repeats 200] [--sizes 100,1000,10000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from application.services.scheduler import (
    GpuState,
    Policy,
    QueuedJob,
    RunningJob,
    decide,
    plan,
    queue_key,
)
from benchmarks.simulate_trace import positive

NOW = 1_750_000_000.0
N_GPUS = 8
Cluster = tuple[list[GpuState], list[RunningJob]]


def make_queue(n: int, rng: random.Random, *, big_head: bool = False, min_mem: float | None = None) -> list[QueuedJob]:
    jobs = [
        QueuedJob(
            job_id=f"job-{k:05d}",
            priority=rng.randint(0, 10),
            submitted_at=NOW - rng.uniform(0, 86_400),
            num_gpus=rng.choice((1, 1, 1, 2, 2, 4)),
            gpu_ids=None,
            min_gpu_memory_gb=min_mem if min_mem is not None else rng.choice((None, None, None, 40.0)),
            estimated_duration=rng.choice((None, rng.uniform(300, 36_000))),
        )
        for k in range(n)
    ]
    jobs.sort(key=queue_key)
    if big_head:
        jobs.insert(0, QueuedJob("big-head", 10, NOW - 90_000, 8, None, None, 7200.0))
    return jobs


def cluster(free: set[int], rng: random.Random, *, free_gb: float = 80.0) -> Cluster:
    gpus: list[GpuState] = []
    running: list[RunningJob] = []
    for i in range(N_GPUS):
        if i in free:
            gpus.append(GpuState(i, 80.0, free_gb, rng.uniform(0, 5), None))
        else:
            gpus.append(GpuState(i, 80.0, 20.0, 95.0, f"run-{i}"))
            running.append(RunningJob(f"run-{i}", (i,), rng.choice((None, rng.uniform(60, 7200)))))
    return gpus, running


def nvlink_pairs(a: int, b: int) -> int | None:
    # NVLink within pairs (0,1), (2,3) ..., PCIe otherwise.
    return 2 if a // 2 == b // 2 else 1


def time_calls(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
    return statistics.median(samples) * 1000, p99 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive, default=200)
    parser.add_argument("--sizes", default="100,1000,10000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(20240501)

    print(f"decide(): {N_GPUS} GPUs, {args.repeats} calls per row, Python {sys.version.split()[0]}")
    print(f"{'scenario':<14} {'queued':>7} {'policy':<9} {'starts':>6} {'median ms':>10} {'p99 ms':>8}")
    for n in sizes:
        scenarios: list[tuple[str, list[QueuedJob], Cluster]] = [
            ("some-free", make_queue(n, rng), cluster({0, 3, 6}, rng)),
            ("all-busy", make_queue(n, rng), cluster(set(), rng)),
            ("blocked-head", make_queue(n, rng, big_head=True), cluster({0, 1, 2, 3}, rng)),
            ("unusable-free", make_queue(n, rng, min_mem=40.0), cluster({0, 1}, rng, free_gb=24.0)),
        ]
        for name, queue, (gpus, running) in scenarios:
            for policy in ("strict", "backfill"):
                rules = Policy(name=policy, min_free_gb=2.0, max_util=90.0, link_score=nvlink_pairs)
                call = partial(decide, queue, gpus, running, rules, NOW)
                starts = call()
                med, p99 = time_calls(call, args.repeats)
                print(f"{name:<14} {n:>7} {policy:<9} {len(starts):>6} {med:>10.3f} {p99:>8.3f}")

    print()
    print("plan() with waits and reasons (backfill, some-free), 20 calls per row")
    for n in sizes:
        queue = make_queue(n, rng)
        gpus, running = cluster({0, 3, 6}, rng)

        est = partial(plan, queue, gpus, running, Policy(min_free_gb=2.0, max_util=90.0), NOW)

        med, p99 = time_calls(est, 20)
        print(f"{'some-free':<14} {n:>7} {'backfill':<9} {'':>6} {med:>10.3f} {p99:>8.3f}")


if __name__ == "__main__":
    main()
