"""The API against a bare FastAPI+Redis app on the same Redis, in one run (run by hand; prints figures).

Ratios survive a noisy machine, absolute figures don't: every figure of ours is printed beside the bare
stack's, measured in the same run with the same load generator (wrk), worker count and Redis.

1. create: POST /jobs (hub ids, a unique output_dir per request) vs a bare endpoint doing one pipelined
   SET + ZADD of the JSON body; and vs a bare endpoint that stores the same job through our JobStore.create
   (the atomic write: hash, indexes, output-folder claim, list entry, first event), without any of the
   create's checks. That second figure tells how much of the gap is the write a job needs, how much the rest.
2. list: GET /jobs?limit=50 with 10,000 and then 100,000 jobs stored vs a bare endpoint doing ZREVRANGE +
   MGET of 50 JSON job documents of the same size.
3. /health p99 during a storm of GET /jobs?limit=500, for both.
4. scheduling latency during that storm: 12 jobs that each need all 8 simulated GPUs run in a chain (swift
   sleeps 1 s); from one run's exit (its exit file) to the launch of the next one's runner, and to the start of
   the next swift.
5. CPU of one runner following a run that logs a step every 0.1 s (the fake swift), as % of one core.
6. a fresh API worker's first requests (one of each kind) against the same requests again (printed after 1).

    sudo apt-get install wrk       # the load generator
    .venv/bin/python benchmarks/bench_api.py [--duration 10] [--connections 10] [--skip-100k]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from application.models.job_request import TrainingParams  # noqa: E402
from application.models.training_model import Job, JobStatus  # noqa: E402
from application.services.embedded_redis import EmbeddedRedis, find_redis_server  # noqa: E402
from application.services.job_store import JobStore  # noqa: E402
from application.services.keys import Keys  # noqa: E402
from benchmarks.bench_streams import cpu_seconds  # noqa: E402

PREFIX = "bench"
BARE_APP = textwrap.dedent("""
    import json, os, sys, time
    import redis.asyncio as aioredis
    from fastapi import FastAPI, Request

    sys.path.insert(0, os.environ["BENCH_ROOT"])
    from application.models.job_request import TrainingParams
    from application.models.training_model import Job, JobStatus
    from application.services.job_store import JobStore
    from application.services.keys import Keys

    app = FastAPI()
    r = aioredis.Redis.from_url(os.environ["BENCH_REDIS_URL"], decode_responses=True)
    store = JobStore(r, Keys("bare-store"))

    @app.post("/jobs", status_code=201)
    async def create(request: Request):
        body = await request.json()
        job_id = body["output_dir"]
        now = time.time()
        doc = json.dumps({"job_id": job_id, "status": "pending", "created_at": now, **body})
        async with r.pipeline(transaction=False) as pipe:
            pipe.set(f"bare:job:{job_id}", doc)
            pipe.zadd("bare:jobs", {job_id: now})
            await pipe.execute()
        return {"job_id": job_id, "status": "pending", "message": "created"}

    @app.post("/stored-jobs", status_code=201)
    async def create_stored(request: Request):
        body = await request.json()
        now = time.time()
        job = Job(job_id=body["output_dir"], status=JobStatus.PENDING, priority=5, owner=None,
                  data_path=body["data_path"], model_path=body["model_path"],
                  output_dir="/srv/output/" + body["output_dir"], output_dir_requested=body["output_dir"],
                  num_gpus=body["num_gpus"], training=TrainingParams(**body["training"]), created_at=now,
                  updated_at=now)
        await store.create(job, message="Training job created", actor="anonymous")
        return {"job_id": job.job_id, "status": "pending", "message": "created"}

    @app.get("/jobs")
    async def jobs(limit: int = 50, offset: int = 0):
        ids = await r.zrevrange("bare:jobs", offset, offset + limit - 1)
        docs = await r.mget([f"bare:job:{i}" for i in ids]) if ids else []
        return {"jobs": [json.loads(d) for d in docs if d], "total": await r.zcard("bare:jobs")}

    @app.get("/health")
    async def health():
        await r.ping()
        return {"status": "healthy"}
""")
CREATE_LUA = textwrap.dedent("""
    local counter = 0
    local threads = 0
    function setup(thread)
      threads = threads + 1
      thread:set("tid", threads)
    end
    function request()
      counter = counter + 1
      local id = string.format("%s-%d-%d", prefix, tid, counter)
      local body = '{"data_path": "AI-ModelScope/alpaca-gpt4-data-en", "model_path": "Qwen/Qwen2.5-7B-Instruct", '
        .. '"output_dir": "' .. id .. '", "num_gpus": 0, "training": {"torch_dtype": "float32"}}'
      return wrk.format("POST", path, {["Content-Type"] = "application/json", ["Authorization"] = auth}, body)
    end
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def wait_workers(server: subprocess.Popen[bytes], port: int, path: str, count: int, timeout: float = 60) -> None:
    """Until each of the `count` uvicorn workers under `server` has answered a request. One answering is not
    enough: wrk opens its connections at once and keeps them, so a worker still importing the app when it began
    served none of them for the whole run (one of our two workers did all the creates in some runs, the bare
    app's lighter workers were ready in time: the create ratio swung between 0.16 and 0.29)."""
    if count <= 1:
        return  # one worker serves in the server's own process (start.py, uvicorn): it has answered
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [p for p in psutil.Process(server.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(request)
            client.recv(1024)
            mine = client.getsockname()[1]
            for worker in workers:
                if any(c.raddr and c.raddr.port == mine for c in worker.net_connections("tcp")):
                    seen.add(worker.pid)
        if len(seen & {w.pid for w in workers}) >= count:
            return
        time.sleep(0.05)
    raise SystemExit(f"not every one of the {count} workers on port {port} answered within {timeout:g} s")


def connections_per_worker(server: subprocess.Popen[bytes], port: int) -> list[int]:
    """The open connections each uvicorn worker under `server` holds on `port`. A worker's loop takes every
    connection waiting when it wakes, so all of a storm's can land on one worker while the other serves none:
    its /health checks were then answered by an idle worker (the bare app's p99 went from 2,290 ms in one run
    to 26 ms in the next)."""
    workers = [p for p in psutil.Process(server.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    return [sum(1 for c in w.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "ESTABLISHED")
            for w in workers or [psutil.Process(server.pid)]]  # fmt: skip


def wrk(url: str, duration: float, connections: int, script: Path | None = None, env_lua: str = "",
        latency: bool = False) -> dict[str, float]:  # fmt: skip
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{int(duration)}s", "--timeout", "10s"]
    if latency:
        argv.append("--latency")
    if script is not None:
        lua = script.with_suffix(f".{abs(hash(env_lua))}.lua")
        lua.write_text(env_lua + script.read_text())
        argv += ["-s", str(lua)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    result["requests"] = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
        result[f"p{pct}_ms"] = float(value) * scale
    return result


def measured(proc: subprocess.Popen[bytes], *args: object, **kwargs: object) -> dict[str, float]:
    """wrk against one server, with the server's own CPU per request (its process and all its workers): on a
    shared 2-core box the req/s of a run moves with what else runs, its CPU per request much less."""
    root = psutil.Process(proc.pid)
    procs = [root, *root.children(recursive=True)]
    before = cpu_seconds(procs)
    result = wrk(*args, **kwargs)  # type: ignore[arg-type]
    result["cpu_us"] = (cpu_seconds(procs) - before) / max(1.0, result["requests"]) * 1e6
    return result


def start(argv: list[str], env: dict[str, str], cwd: Path, log: Path, nice: int = 0) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=(lambda: os.nice(nice)) if nice else None)  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def sample_job(i: int, epoch: float) -> Job:
    # Newer than the create phase's jobs (stored on both sides too, but the bare app's are only their bodies):
    # the 50 listed are these, the same documents on both sides.
    now = epoch + i * 0.001
    job = Job(job_id=f"seed{i:07d}", status=JobStatus.COMPLETED, priority=5, owner=None,
              data_path="AI-ModelScope/alpaca-gpt4-data-en", model_path="Qwen/Qwen2.5-7B-Instruct",
              output_dir=f"/srv/output/seed{i:07d}", output_dir_requested=f"seed{i:07d}", num_gpus=1, gpu_ids=[0],
              training=TrainingParams(max_steps=100), created_at=now, updated_at=now, started_at=now + 1,
              finished_at=now + 60, command=["swift", "sft", "--model", "Qwen/Qwen2.5-7B-Instruct"] * 8,
              exit_code=0, checkpoints=[f"/srv/output/seed{i:07d}/v0-x/checkpoint-{k}" for k in (50, 100)],
              last_checkpoint=f"/srv/output/seed{i:07d}/v0-x/checkpoint-100", train_loss=1.25,
              train_runtime=59.0)  # fmt: skip
    job.progress.current_step = 100
    job.progress.max_steps = 100
    return job


async def seed(redis_url: str, upto: int, start_at: int, epoch: float) -> None:
    """Stored jobs for the list: ours through the store, the bare app's as JSON documents of the same jobs."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(client, Keys(PREFIX))
    for lo in range(start_at, upto, 50):
        batch = [sample_job(i, epoch) for i in range(lo, min(upto, lo + 50))]
        await asyncio.gather(*(store.create(j.model_copy(update={"status": JobStatus.PENDING}), message="seed",
                                            actor="bench") for j in batch))  # fmt: skip
        async with client.pipeline(transaction=False) as pipe:
            for j in batch:
                pipe.set(f"bare:job:{j.job_id}", j.model_dump_json())
                pipe.zadd("bare:jobs", {j.job_id: j.created_at})
            await pipe.execute()
    await client.aclose()


def chain_latency(redis_url: str, env: dict[str, str], work: Path, base: str, storm: str, duration: float) -> None:
    # A swift that trains for a second: long enough for its runner to be watching when it exits.
    swift = work / "one-second-swift"
    swift.write_text("#!/bin/sh\nsleep 1\n")
    swift.chmod(0o755)
    sched_env = {**env, "SWIFT_BIN": str(swift), "SIMULATED_GPUS": "8x80", "AUTO_EXPORT": "false",
                 "QUEUE_POLL_INTERVAL": "5", "REDIS_KEY_PREFIX": f"{PREFIX}-chain"}  # fmt: skip
    api_port = free_port()
    api = start([sys.executable, str(ROOT / "start.py"), "all"], {**sched_env, "APP_PORT": str(api_port)}, ROOT,
                work / "chain.log")  # fmt: skip
    chain_base = f"http://127.0.0.1:{api_port}/api/v1/training"
    try:
        wait_http(f"{chain_base}/health")
        with httpx.Client(base_url=chain_base, timeout=30) as http:
            deadline = time.monotonic() + 30
            while not http.get("/health").json().get("scheduler", {}).get("ok"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            http.post("/queue/processor/stop")
            ids = []
            for i in range(12):
                r = http.post("/jobs", json={"data_path": "org/data", "model_path": "org/model",
                                             "output_dir": f"chain{i:02d}", "num_gpus": 8})  # fmt: skip
                r.raise_for_status()
                ids.append(r.json()["job_id"])
            storm_proc = subprocess.Popen(["wrk", "-t1", "-c10", f"-d{int(duration) + 30}s", storm],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1)
            for job_id in ids:
                http.post(f"/jobs/{job_id}/start")  # queued now, in order, while the storm runs
            http.post("/queue/processor/start")
            deadline = time.monotonic() + 120
            while http.get("/jobs", params={"status": "completed", "limit": 1}).json()["total"] < len(ids):
                assert time.monotonic() < deadline, "chain did not finish"
                time.sleep(0.2)
            storm_proc.terminate()
            storm_proc.wait()
            details = [http.get(f"/jobs/{job_id}").json() for job_id in ids]
            for d in details:
                events = http.get(f"/jobs/{d['job_id']}/events").json()["events"]
                d["swift_at"] = next(e["data"]["at"] for e in events if e["type"] == "process_started")
    finally:
        stop(api)
    details.sort(key=lambda d: d["started_at"])
    gaps, swift_gaps = [], []
    for prev, nxt in itertools.pairwise(details):
        exited = json.loads(Path(prev["log_file"]).with_suffix(".exit.json").read_text())["finished_at"]
        gaps.append((nxt["runner"]["launched_at"] - exited) * 1000)
        swift_gaps.append((nxt["swift_at"] - exited) * 1000)
    print(
        f"  scheduling latency during the storm, run exit -> next runner launched ({len(gaps)} hand-overs, "
        f"8 GPUs each): p50 {statistics.median(gaps):.1f} ms, p99 {max(gaps):.1f} ms (the slowest: too few for a "
        f"99th percentile) (target p50 < 50 ms); "
        f"-> next swift started (the runner's start-up included): p50 {statistics.median(swift_gaps):.0f} ms"
    )


def first_requests(env: dict[str, str], work: Path) -> None:
    """What the first users of a fresh API worker wait (route tables, connections), beside the same requests
    answered again: one worker, so that every request reaches it."""
    port = free_port()
    api = start([sys.executable, str(ROOT / "start.py"), "api"], {**env, "API_WORKERS": "1", "APP_PORT": str(port)},
                ROOT, work / "first.log")  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    paths = ["/api/v1/training/queue", "/api/v1/training/jobs?limit=1", "/api/v1/training/jobs/none/events",
             "/metrics", "/api/v1/training/no-such-route"]  # fmt: skip
    try:
        wait_http(f"{base}/api/v1/training/health")
        with httpx.Client(base_url=base, timeout=30) as http:
            ms: list[list[float]] = []
            for _ in range(2):
                ms.append([])
                for path in paths:
                    t = time.perf_counter()
                    http.get(path)
                    ms[-1].append((time.perf_counter() - t) * 1000)
    finally:
        stop(api)
    print(
        f"  a fresh worker's first requests ({', '.join(p.rsplit('/', 1)[-1] for p in paths)}): "
        f"{' / '.join(f'{x:.0f}' for x in ms[0])} ms; the same again: {' / '.join(f'{x:.0f}' for x in ms[1])} ms"
    )


def runner_cpu(env: dict[str, str], work: Path) -> None:
    data = work / "data" / "steps.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps({**row, "fake_swift": {"step_seconds": 0.1}}) + "\n" + (json.dumps(row) + "\n") * 40)
    model = work / "data" / "tiny-qwen2"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    (model / "tokenizer.json").write_text("{}")
    port = free_port()
    cpu_env = {**env, "SWIFT_BIN": str(ROOT / "tests" / "fake_swift" / "swift"), "SIMULATED_GPUS": "1x80",
               "REDIS_KEY_PREFIX": f"{PREFIX}-cpu", "APP_PORT": str(port), "AUTO_EXPORT": "false"}  # fmt: skip
    api = start([sys.executable, str(ROOT / "start.py"), "all"], cpu_env, ROOT, work / "cpu.log")
    base = f"http://127.0.0.1:{port}/api/v1/training"
    try:
        wait_http(f"{base}/health")
        with httpx.Client(base_url=base, timeout=30) as http:
            deadline = time.monotonic() + 30
            while not http.get("/health").json().get("scheduler", {}).get("ok"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            r = http.post(
                "/jobs",
                json={
                    "data_path": str(data),
                    "model_path": str(model),
                    "output_dir": "cpu",
                    "auto_start": True,
                    "training": {"max_steps": 400, "logging_steps": 1},
                },
            )
            r.raise_for_status()
            deadline = time.monotonic() + 30
            while not (job := http.get("/jobs/cpu").json()).get("runner") or not job.get("pid"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            runner = psutil.Process(job["runner"]["pid"])
            time.sleep(3)
            c0, t0 = sum(runner.cpu_times()[:2]), time.monotonic()
            lines0 = (Path(job["log_file"])).read_bytes().count(b"\n")
            time.sleep(20)
            c1, t1 = sum(runner.cpu_times()[:2]), time.monotonic()
            lines1 = (Path(job["log_file"])).read_bytes().count(b"\n")
            http.post("/jobs/cpu/stop")
    finally:
        stop(api)
    print(
        f"  one runner following a run that logs {(lines1 - lines0) / (t1 - t0):.0f} lines/s: "
        f"{100 * (c1 - c0) / (t1 - t0):.2f} % of one core (target < 2 %)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--skip-100k", action="store_true")
    ap.add_argument("--create-only", action="store_true", help="only the create figure (for profiling work)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: sudo apt-get install wrk")
    binary = find_redis_server()
    if not binary:
        raise SystemExit("no redis-server found")
    workers = min(4, os.cpu_count() or 1)
    print(f"swift-api vs a bare FastAPI+Redis app: {workers} uvicorn workers each, wrk -t2 -c{args.connections} "
          f"-d{args.duration:g}s, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="swift-api-bench-api-") as tmp:
        work = Path(tmp)
        redis_server = EmbeddedRedis(work / "redis", binary)
        redis_server.start()
        url = redis_server.url
        ours_port, bare_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "REDIS_"))}
        env.update({"ENVIRONMENT": "test", "REDIS_URL": url, "REDIS_KEY_PREFIX": PREFIX, "APP_HOST": "127.0.0.1",
                    "APP_PORT": str(ours_port), "OUTPUT_ROOT": str(work / "out"), "DATA_ROOTS": str(work / "data"),
                    "MODEL_ROOTS": str(work / "data"), "LOG_DIR": str(work / "logs"), "DATA_DIR": str(work / "d"),
                    "LOG_LEVEL": "WARNING", "CREATE_RATE_LIMIT": "0", "API_WORKERS": str(workers),
                    "GPU_BACKEND": "simulated", "SWIFT_VERSION": "4.6.0", "BENCH_REDIS_URL": url,
                    "BENCH_ROOT": str(ROOT)})  # fmt: skip
        (work / "bare_app.py").write_text(BARE_APP)
        ours = start([sys.executable, str(ROOT / "start.py"), "api"], env, ROOT, work / "ours.log")
        # At the niceness our API workers take (API_NICE), so that neither gets more CPU than the other.
        bare = start([sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(bare_port), "--workers",
                      str(workers), "--log-level", "warning"], env, work, work / "bare.log", nice=10)  # fmt: skip
        ours_base = f"http://127.0.0.1:{ours_port}/api/v1/training"
        bare_base = f"http://127.0.0.1:{bare_port}"
        try:
            wait_http(f"{ours_base}/health")
            wait_http(f"{bare_base}/health")
            wait_workers(ours, ours_port, "/api/v1/training/health", workers)
            wait_workers(bare, bare_port, "/health", workers)
            script = work / "create.lua"
            script.write_text(CREATE_LUA)
            a = measured(ours, f"{ours_base}/jobs", args.duration, args.connections, script,
                         'prefix = "ours"\npath = "/api/v1/training/jobs"\nauth = ""\n')  # fmt: skip
            b = measured(bare, f"{bare_base}/jobs", args.duration, args.connections, script,
                         'prefix = "bare"\npath = "/jobs"\nauth = ""\n')  # fmt: skip
            print(f"  create: ours {a['rps']:.0f} req/s, bare {b['rps']:.0f} req/s -> ratio {a['rps'] / b['rps']:.2f} "
                  f"(target >= 0.5; non-2xx: {a['errors']:.0f} / {b['errors']:.0f})")  # fmt: skip
            print(f"  create, server CPU per request: ours {a['cpu_us']:.0f} us, bare {b['cpu_us']:.0f} us -> ratio "
                  f"{b['cpu_us'] / a['cpu_us']:.2f}")  # fmt: skip
            c = measured(bare, f"{bare_base}/stored-jobs", args.duration, args.connections, script,
                         'prefix = "stored"\npath = "/stored-jobs"\nauth = ""\n')  # fmt: skip
            print(f"  create vs a bare endpoint storing the same job with JobStore.create and nothing else: "
                  f"{c['rps']:.0f} req/s, {c['cpu_us']:.0f} us CPU per request -> ratio {a['rps'] / c['rps']:.2f} "
                  f"(req/s), {c['cpu_us'] / a['cpu_us']:.2f} (CPU); that endpoint against the SET+ZADD one: "
                  f"{c['rps'] / b['rps']:.2f}")  # fmt: skip
            first_requests({k: v for k, v in env.items() if k != "APP_PORT"}, work)
            if args.create_only:
                return
            stored, epoch = 0, time.time()
            for size in (10_000, 100_000):
                if size == 100_000 and args.skip_100k:
                    continue
                asyncio.run(seed(url, size, stored, epoch))
                stored = size
                a = wrk(f"{ours_base}/jobs?limit=50", args.duration, args.connections, latency=True)
                b = wrk(f"{bare_base}/jobs?limit=50", args.duration, args.connections, latency=True)
                print(f"  list 50 of {size:,} jobs (+ those the create phase stored): ours {a['rps']:.0f} req/s "
                      f"(p50 {a.get('p50_ms', 0):.1f} ms), bare "
                      f"{b['rps']:.0f} req/s (p50 {b.get('p50_ms', 0):.1f} ms) -> ratio {a['rps'] / b['rps']:.2f} "
                      "(target >= 0.8, flat)")  # fmt: skip
            health: dict[str, dict[str, float]] = {}
            spread: dict[str, list[int]] = {}
            for name, server, port, base in (("ours", ours, ours_port, ours_base), ("bare", bare, bare_port,
                                                                                    bare_base)):  # fmt: skip
                seconds = int(args.duration) + 3
                storm = ["wrk", "-t1", f"-c{args.connections}", f"-d{seconds}s", f"{base}/jobs?limit=500"]
                for _ in range(5):
                    storm_proc = subprocess.Popen(storm, stdout=subprocess.PIPE, text=True)
                    time.sleep(1)
                    spread[name] = connections_per_worker(server, port)
                    if min(spread[name]) > 0:
                        break
                    storm_proc.kill()  # (a worker the storm does not reach answers /health as a quiet one)
                    storm_proc.wait()
                # Several connections, so that the health checks reach every worker, as the storm does.
                health[name] = wrk(f"{base}/health", args.duration, 8, latency=True)
                storm_out, _ = storm_proc.communicate()
                found = re.search(r"Requests/sec:\s+([\d.]+)", storm_out)
                health[name]["storm_rps"] = float(found.group(1)) if found else 0.0
            print(f"  /health during a list-500 storm: ours p99 {health['ours'].get('p99_ms', 0):.1f} ms (storm "
                  f"{health['ours']['storm_rps']:.0f} req/s, its connections per worker {spread['ours']}), bare p99 "
                  f"{health['bare'].get('p99_ms', 0):.1f} ms (storm {health['bare']['storm_rps']:.0f} req/s, "
                  f"{spread['bare']}) (target: ours no worse)")  # fmt: skip
            chain_latency(url, {k: v for k, v in env.items() if k != "APP_PORT"}, work, ours_base,
                          f"{ours_base}/jobs?limit=500", args.duration)  # fmt: skip
            runner_cpu({k: v for k, v in env.items() if k != "APP_PORT"}, work)
        finally:
            stop(ours)
            stop(bare)
            redis_server.stop()


if __name__ == "__main__":
    main()
