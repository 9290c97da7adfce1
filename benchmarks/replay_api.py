"""Replay a synthetic trace live through the HTTP API, and compare it with the offline policies (run by hand).

The server (`start.py`: API, scheduler, embedded Redis) runs on simulated GPUs with the fake swift
(tests/fake_swift), whose runs take max_steps x the step time their data set asks for. Jobs arrive at the
trace's times with plain create bodies: a model, a data set, GPUs and max_steps. No duration and no time
limit: the server must find its own predictions (the plan: steps x the speed its runners measured). A short
warm-up first runs each model once on each GPU count, as a team's earlier runs would have.

The same jobs (their real submission times, their nominal durations plus the start-up the live runs
measured) then go through `simulate_trace.simulate` under each offline policy, and one table compares them:
the live server against textbook EASY backfill given exact durations (the yardstick), the server's own
backfill given exact durations (every blocked job holds a reservation), FIFO and greedy first fit.

    .venv/bin/python benchmarks/replay_api.py [--jobs 60] [--gpus 8] [--span 240] [--seed 7]
        [--starvation 20] [--no-warmup] [--plot replay.png]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from application.config import Settings  # noqa: E402
from benchmarks.simulate_trace import Result, TraceJob, mode_of, plot_cdf, positive, simulate, table  # noqa: E402

FAKE_SWIFT = ROOT / "tests" / "fake_swift" / "swift"
# Seconds per step of each model (the fake swift sleeps that long per step): 3 kinds of model.
MODELS = {"m-small": 0.05, "m-medium": 0.1, "m-large": 0.2}
GPU_CHOICES = (1, 1, 1, 1, 1, 2, 2, 4, 4, 8)


@dataclass(frozen=True)
class SyntheticJob:
    name: str
    at: float  # seconds after the replay starts
    model: str
    steps: int
    num_gpus: int

    @property
    def duration(self) -> float:
        return self.steps * MODELS[self.model]


def synthetic_trace(n: int, span: float, gpus: int, seed: int, *, shortest: float = 4.0, longest: float = 40.0,
                    wide_every: int = 0) -> list[SyntheticJob]:  # fmt: skip
    """`n` jobs arriving (Poisson) over `span` seconds, durations log-uniform in [shortest, longest], GPU
    counts mostly 1 with some 2, 4 and all-GPU jobs (every `wide_every`-th job asks for all GPUs)."""
    rng = random.Random(seed)
    rate = n / span
    t = 0.0
    jobs = []
    for i in range(n):
        model = rng.choice(list(MODELS))
        duration = math.exp(rng.uniform(math.log(shortest), math.log(longest)))
        k = gpus if wide_every and i % wide_every == wide_every - 1 else min(gpus, rng.choice(GPU_CHOICES))
        jobs.append(SyntheticJob(f"r{i:03d}", round(t, 3), model, max(2, round(duration / MODELS[model])), k))
        t += rng.expovariate(rate)
    return jobs


def prepare(workdir: Path, jobs: Sequence[SyntheticJob]) -> None:
    """One model folder and one data set per model (the data set tells the fake swift its step time)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for model, step in MODELS.items():
        folder = workdir / "models" / model
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
        (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
        data = workdir / "data" / f"{model}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        first = json.dumps({"messages": messages, "fake_swift": {"step_seconds": step}})
        data.write_text(first + "\n" + (json.dumps({"messages": messages}) + "\n") * 50)


def body(workdir: Path, job: SyntheticJob, prefix: str = "") -> dict[str, Any]:
    return {
        "job_id": prefix + job.name, "output_dir": prefix + job.name, "auto_start": True,
        "model_path": str(workdir / "models" / job.model), "data_path": str(workdir / "data" / f"{job.model}.jsonl"),
        "num_gpus": job.num_gpus, "training": {"max_steps": job.steps, "logging_steps": 2},
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`python start.py` (API, scheduler and an embedded Redis) on simulated GPUs with the fake swift."""

    def __init__(self, workdir: Path, gpus: int, starvation: float, extra: dict[str, str] | None = None,
                 port: int | None = None) -> None:  # fmt: skip
        # A port no one listens on: one derived from the pid could be another server's, whose answers were then
        # measured (with its jobs left behind) while this one had quit ("address in use").
        self.port = port or free_port()
        self.workdir = workdir
        # None of the caller's settings (REDIS_*: its Redis, not the embedded one; API_PREFIX, QUEUE_POLICY, ...):
        # the server measured is the one described here.
        inherited = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
        self.env = {
            **inherited, "APP_HOST": "127.0.0.1", "APP_PORT": str(self.port), "ENVIRONMENT": "test",
            "OUTPUT_ROOT": str(workdir / "output"), "DATA_ROOTS": str(workdir / "data"),
            "MODEL_ROOTS": str(workdir / "models"), "LOG_DIR": str(workdir / "logs"),
            "DATA_DIR": str(workdir / "redis"),
            "SWIFT_BIN": str(FAKE_SWIFT), "SWIFT_VERSION": "4.6.0", "GPU_BACKEND": "simulated",
            "SIMULATED_GPUS": f"{gpus}x80", "QUEUE_POLL_INTERVAL": "0.5", "RUNNER_POLL_INTERVAL": "0.2",
            "QUEUE_STARVATION_SECONDS": str(starvation), "AUTO_EXPORT": "false", "CREATE_RATE_LIMIT": "0",
            "API_WORKERS": "1", "LOG_LEVEL": "WARNING", **(extra or {}),
        }  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}/api/v1/training", timeout=30)

    def __enter__(self) -> Server:
        with open(self.workdir / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "start.py")], cwd=ROOT, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = self.http.get("/health").json().get("scheduler", {}).get("ok")
            except (httpx.HTTPError, ValueError):
                ready = False
            # (its own process still running: an answer from another server on the port is none of its)
            if ready and self.proc.poll() is None:
                return self
            if time.monotonic() > deadline or self.proc.poll() is not None:
                # __exit__ does not run when __enter__ raises, and the caller's temp folder (its log) goes next.
                self.__exit__()
                tail = (self.workdir / "server.log").read_text(errors="replace").splitlines()[-15:]
                raise SystemExit("the server did not start; the end of its log:\n" + "\n".join(tail))
            time.sleep(0.2)

    def __exit__(self, *_: object) -> None:
        self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class LiveRun:
    jobs: list[dict[str, Any]]  # the server's records, in trace order
    wall: float


def wait_done(http: httpx.Client, ids: Sequence[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    pending = list(ids)
    done: dict[str, dict[str, Any]] = {}
    while pending:
        for job_id in list(pending):
            job = http.get(f"/jobs/{job_id}").json()
            if job["status"] in ("completed", "failed", "stopped", "cancelled"):
                done[job_id] = job
                pending.remove(job_id)
        if pending and time.monotonic() > deadline:
            raise SystemExit(f"{len(pending)} jobs did not finish within {timeout:.0f} s: {pending[:5]}")
        time.sleep(0.2)
    return [done[i] for i in ids]


def warm_up(server: Server, workdir: Path, gpus: int) -> None:
    """Each model once on each GPU count the trace uses: the history a team's earlier runs leave."""
    sizes = sorted({min(gpus, k) for k in GPU_CHOICES} | {gpus})
    warm = [SyntheticJob(f"warm-{m}-{k}", 0.0, m, 20, k) for m in MODELS for k in sizes]
    for job in warm:
        r = server.http.post("/jobs", json=body(workdir, job))
        r.raise_for_status()
    failed = [j["job_id"] for j in wait_done(server.http, [j.name for j in warm], 600) if j["status"] != "completed"]
    if failed:
        raise SystemExit(f"warm-up runs failed: {failed}")


def replay(server: Server, workdir: Path, trace: Sequence[SyntheticJob], timeout: float = 1800) -> LiveRun:
    t0 = time.monotonic()
    for job in trace:
        delay = t0 + job.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        r = server.http.post("/jobs", json=body(workdir, job))
        if r.status_code != 201:
            raise SystemExit(f"create {job.name} answered {r.status_code}: {r.text}")
    jobs = wait_done(server.http, [j.name for j in trace], timeout)
    return LiveRun(jobs, time.monotonic() - t0)


def live_result(run: LiveRun, gpus: int, startup: float) -> Result:
    jobs = run.jobs
    delays = [j["started_at"] - j["created_at"] for j in jobs]
    jct = [j["finished_at"] - j["created_at"] for j in jobs]
    first = min(j["created_at"] for j in jobs)
    makespan = max(j["finished_at"] for j in jobs) - first
    busy = sum((j["finished_at"] - j["started_at"]) * len(j["gpu_ids"]) for j in jobs)
    ratios = [(j["finished_at"] - j["started_at"]) / j["queued_prediction"]["seconds"]
              for j in jobs if j.get("queued_prediction") and j["queued_prediction"].get("seconds")]  # fmt: skip
    return Result("live", len(jobs), delays, jct, busy / (gpus * makespan), makespan, 0, 0.0, ratios)


def offline(trace: Sequence[SyntheticJob], run: LiveRun, gpus: int, starvation: float,
            policies: Sequence[str]) -> tuple[list[Result], float]:  # fmt: skip
    """The same jobs, at their real submission times, through the simulator; with the start-up the live runs
    took beyond their nominal duration (median), so the comparison is fair to the simulation."""
    extra = [(j["finished_at"] - j["started_at"]) - t.duration for j, t in zip(run.jobs, trace, strict=True)]
    startup = max(0.0, statistics.median(extra))
    first = min(j["created_at"] for j in run.jobs)
    jobs = [TraceJob(t.name, j["created_at"] - first, t.duration, t.num_gpus, f"{t.model}:{t.num_gpus}")
            for j, t in zip(run.jobs, trace, strict=True)]  # fmt: skip
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].submitted_at, jobs[i].job_id))
    jobs = [jobs[i] for i in order]
    # swift prints its remaining time after its first logged steps: the start-up and two steps.
    results = [simulate(jobs, gpus, mode_of(p, starvation), startup=startup, progress_after=startup + 0.5)
               for p in policies]  # fmt: skip
    return results, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=positive, default=60)
    parser.add_argument("--gpus", type=positive, default=8)
    parser.add_argument("--span", type=float, default=240.0, help="seconds over which the jobs arrive")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--starvation", type=float, default=20.0, help="QUEUE_STARVATION_SECONDS (scaled down)")
    parser.add_argument("--wide-every", type=int, default=12, help="every N-th job asks for all GPUs (0: none)")
    parser.add_argument("--no-warmup", action="store_true", help="start with no history: no prediction at first")
    parser.add_argument("--plot", type=Path, help="write the JCT CDFs (live and offline) to this PNG")
    parser.add_argument("--save", type=Path, help="write the live run's job records to this JSON file")
    parser.add_argument("--load", type=Path, help="compare a saved live run (same trace options) instead")
    args = parser.parse_args()

    trace = synthetic_trace(args.jobs, args.span, args.gpus, args.seed, wide_every=args.wide_every)
    demand = sum(j.duration * j.num_gpus for j in trace)
    print(f"synthetic trace: {len(trace)} jobs over {args.span:g} s on {args.gpus} GPUs, offered load"
          f" {demand / args.span / args.gpus:.2f}; QUEUE_STARVATION_SECONDS {args.starvation:g}")  # fmt: skip
    # What makes the trace: a saved run is compared only with the trace it ran (another gave a traceback, or a
    # comparison with other jobs).
    options = {k: getattr(args, k) for k in ("jobs", "gpus", "span", "seed", "starvation", "wide_every")}
    if args.load:
        saved = json.loads(args.load.read_text())
        if saved.get("options", options) != options:
            given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in saved["options"].items())
            raise SystemExit(f"{args.load} is a run of another trace: load it with {given}")
        run, processor = LiveRun(saved["jobs"], saved["wall"]), saved["processor"]
    else:
        with tempfile.TemporaryDirectory(prefix="swift-api-replay-") as tmp:
            workdir = Path(tmp)
            prepare(workdir, trace)
            with Server(workdir, args.gpus, args.starvation) as server:
                if not args.no_warmup:
                    t = time.monotonic()
                    warm_up(server, workdir, args.gpus)
                    print(f"warm-up: {time.monotonic() - t:.1f} s")
                run = replay(server, workdir, trace)
                failed = [j["job_id"] for j in run.jobs if j["status"] != "completed"]
                if failed:
                    raise SystemExit(f"jobs failed: {failed}; see {workdir / 'server.log'}")
                processor = server.http.get("/queue/processor/status").json()
        if args.save:
            args.save.write_text(json.dumps({"jobs": run.jobs, "wall": run.wall, "processor": processor,
                                             "options": options}))  # fmt: skip
    sources: dict[str | None, int] = {}
    for j in run.jobs:
        src = (j.get("queued_prediction") or {}).get("source")
        sources[src] = sources.get(src, 0) + 1
    results, startup = offline(trace, run, args.gpus, args.starvation,
                               ("fifo", "greedy", "easy", "oracle", "fallback"))  # fmt: skip
    live = live_result(run, args.gpus, startup)
    print(f"live replay: {run.wall:.0f} s; start-up beyond the nominal duration (median) {startup:.2f} s;"
          f" predictions at queue time by source {sources};"
          f" actual/predicted median {processor['prediction_error']['median']},"
          f" p90 {processor['prediction_error']['p90']}")  # fmt: skip
    print()
    print(table([live, *results], baseline="easy"))
    row = live.row()
    print()
    for name, what in (("easy", "EASY backfill given exact durations (the target's yardstick)"),
                       ("oracle", "the server's own backfill given exact durations")):  # fmt: skip
        ref = next(r for r in results if r.policy == name).row()
        print(f"live vs {what}: mean JCT {row['jct_mean'] / ref['jct_mean']:.2f}x (target <= 1),"
              f" worst wait {row['delay_max'] / max(1e-9, ref['delay_max']):.2f}x (target <= 1.2)")  # fmt: skip
    if args.plot:
        plot_cdf([live, *results], args.plot, f"Live replay: {len(trace)} jobs on {args.gpus} GPUs")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
