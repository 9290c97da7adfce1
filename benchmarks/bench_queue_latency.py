"""Scheduling latency and processor-pass cost, measured on a real Redis (run by hand; prints figures).

1. Latency: the server (start.py: API, scheduler) runs with 1 simulated GPU and a swift that trains for
   0.2 s; N one-GPU jobs are queued at once, so each starts when the previous one exits. For each
   consecutive pair we measure from the previous run's exit (the time its runner recorded the exit status)
   to the launch of the next job's runner (the scheduler's part), and to the start of its swift: p50 / p99.
   (benchmarks/bench_api.py measures the same during a storm of API requests.)
2. One processor pass (QueueProcessor.run_pass: GPU snapshot, leases, queue window, decision, starts)
   with 100 ... 10,000 queued jobs and 8 GPUs, free or all busy; starts are recorded, not launched.

    .venv/bin/python benchmarks/bench_queue_latency.py [--jobs 200] [--sizes 100,1000,10000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from application.config import Settings, load_settings  # noqa: E402
from application.models.job_request import TrainingParams  # noqa: E402
from application.models.training_model import Job, JobStatus  # noqa: E402
from application.services.cluster_store import ClusterStore  # noqa: E402
from application.services.embedded_redis import EmbeddedRedis, find_redis_server  # noqa: E402
from application.services.job_store import JobStore  # noqa: E402
from application.services.keys import Keys  # noqa: E402
from application.services.launcher import LocalLauncher  # noqa: E402
from application.services.queue_processor import QueueProcessor  # noqa: E402
from application.services.swift_command import SwiftVersion  # noqa: E402
from application.utils.gpu_utils import SimulatedInventory  # noqa: E402
from benchmarks.replay_api import free_port  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def latency(redis_url: str, jobs: int, workdir: Path) -> None:
    port = free_port()  # (one from the pid could be another server's: its answers were measured)
    swift = workdir / "short-swift"
    swift.write_text("#!/bin/sh\nsleep 0.2\n")
    swift.chmod(0o755)
    inherited = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}  # (none of the caller's)
    env = {**inherited, "ENVIRONMENT": "test", "REDIS_URL": redis_url, "REDIS_KEY_PREFIX": "bench-latency",
           "APP_HOST": "127.0.0.1", "APP_PORT": str(port), "OUTPUT_ROOT": str(workdir / "out"),
           "LOG_DIR": str(workdir / "logs"), "SWIFT_BIN": str(swift), "SWIFT_VERSION": "4.6.0",
           "API_WORKERS": "1", "CREATE_RATE_LIMIT": "0",
           "GPU_BACKEND": "simulated", "SIMULATED_GPUS": "1x80", "AUTO_EXPORT": "false", "LOG_LEVEL": "WARNING",
           "QUEUE_POLL_INTERVAL": "5", "SIMULATED_GPU_USAGE_FILE": str(workdir / "usage.json")}  # fmt: skip
    usage = workdir / "usage.json"
    usage.write_text(json.dumps({"0": {"utilization": 100}}))  # busy: every job created now is queued
    server = subprocess.Popen([sys.executable, str(ROOT / "start.py")], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}/api/v1/training"
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    ready = http.get("/health").json().get("scheduler", {}).get("ok")
                except (httpx.HTTPError, ValueError):
                    ready = False
                if ready and server.poll() is None:  # (its own: not another answering on the port)
                    break
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start: see its output above")
                time.sleep(0.1)
            ids = []
            for i in range(jobs):
                r = http.post("/jobs", json={"data_path": "org/data", "model_path": "org/model",
                                             "output_dir": f"j{i:04d}", "num_gpus": 1, "priority": 5})  # fmt: skip
                r.raise_for_status()
                assert r.json()["status"] == "queued", r.text
                ids.append(r.json()["job_id"])
            tmp = workdir / "usage.tmp"
            tmp.write_text("{}")
            os.replace(tmp, usage)  # the GPU frees up: the processor notices on its next poll
            http.post("/queue/process")
            deadline = time.monotonic() + 300
            while http.get("/jobs", params={"status": "completed", "limit": 1}).json()["total"] < jobs:
                if time.monotonic() > deadline:
                    raise SystemExit("jobs did not finish")
                time.sleep(0.2)
            details = [http.get(f"/jobs/{job_id}").json() for job_id in ids]
            for d in details:
                events = http.get(f"/jobs/{d['job_id']}/events").json()["events"]
                d["swift_at"] = next(e["data"]["at"] for e in events if e["type"] == "process_started")
    finally:
        server.terminate()
        server.wait(15)
    details.sort(key=lambda d: d["swift_at"])
    gaps, swift_gaps = [], []
    for prev, nxt in itertools.pairwise(details):
        exit_file = Path(prev["log_file"]).with_suffix(".exit.json")
        exited = json.loads(exit_file.read_text())["finished_at"]
        gaps.append((nxt["runner"]["launched_at"] - exited) * 1000)
        swift_gaps.append((nxt["swift_at"] - exited) * 1000)
    print(f"scheduling latency, {len(gaps)} hand-overs (1 GPU, swift trains 0.2 s):")
    print(f"  exit -> next runner launched: p50 {statistics.median(gaps):.1f} ms   p99 {pct(gaps, 99):.1f} ms   "
          f"max {max(gaps):.1f} ms")  # fmt: skip
    print(f"  exit -> next swift started:   p50 {statistics.median(swift_gaps):.1f} ms   "
          f"p99 {pct(swift_gaps, 99):.1f} ms")  # fmt: skip


async def passes(redis_url: str, sizes: list[int], workdir: Path) -> None:
    from loguru import logger

    logger.remove()  # one "queue pass started" line per pass would drown the figures
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    settings = load_settings(OUTPUT_ROOT=str(workdir / "out2"), GPU_BACKEND="simulated", SIMULATED_GPUS="8x80")
    print("one processor pass (QueueProcessor.run_pass), 8 GPUs:")
    print(f"  {'queued':>7} {'free GPUs: median':>18} {'p99':>8} {'started':>8} {'all busy: median':>17} {'p99':>8}")
    for size in sizes:
        await client.flushdb()
        keys = Keys(f"bench-pass-{size}")
        store = JobStore(client, keys)
        started: list[str] = []

        async def record(job: Job, gpu_ids: list[int], started: list[str] = started) -> None:
            started.append(job.job_id)

        async def version() -> SwiftVersion:
            return SwiftVersion("4.6.0", "setting")

        processor = QueueProcessor(store, ClusterStore(client, keys), SimulatedInventory(8, 80.0), settings,
                                   LocalLauncher({}), lambda: None, version, "bench")  # fmt: skip
        processor.start_run = record  # type: ignore[method-assign]  # the decision is measured, not the launch
        now = time.time()
        for i in range(size):
            t = now + i * 0.001
            job = Job(job_id=f"q{i:06d}", status=JobStatus.QUEUED, priority=i % 11, data_path="d", model_path="m",
                      output_dir=f"/o/{i}", output_dir_requested=str(i), num_gpus=1 + i % 4,
                      training=TrainingParams(), created_at=t, updated_at=t)  # fmt: skip
            await store.create(job, message="", actor="bench")
        free_times, busy_times = [], []
        for _ in range(30):
            started.clear()
            t0 = time.perf_counter()
            await processor.run_pass()
            free_times.append((time.perf_counter() - t0) * 1000)
        n_started = len(started)
        for g in range(8):  # every GPU leased to a running job
            await client.hset(store.keys.gpu_leases, str(g), "busy")
        await client.zadd(store.keys.status_index(JobStatus.RUNNING), {"busy": 0})
        for _ in range(30):
            t0 = time.perf_counter()
            await processor.run_pass()
            busy_times.append((time.perf_counter() - t0) * 1000)
        print(f"  {size:>7} {statistics.median(free_times):>15.2f} ms {pct(free_times, 99):>5.2f} ms {n_started:>8}"
              f" {statistics.median(busy_times):>14.2f} ms {pct(busy_times, 99):>5.2f} ms")  # fmt: skip
    await client.flushdb()
    await client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    binary = find_redis_server()
    if not binary:
        raise SystemExit("no redis-server found")
    with tempfile.TemporaryDirectory(prefix="swift-api-bench-") as tmp:
        work = Path(tmp)
        server = EmbeddedRedis(work / "redis", binary)
        server.start()
        try:
            if not args.skip_latency:
                latency(server.url, args.jobs, work)
            asyncio.run(passes(server.url, [int(s) for s in args.sizes.split(",")], work))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
