"""What idle Server-Sent Events streams cost the server (run by hand; prints figures).

The server (`start.py`: API, scheduler, embedded Redis) runs one job that stops making progress after its first
step, so its streams stay open with nothing new to send. The benchmark opens N streams on it (logs, events and
progress in turn), lets them idle, and measures the CPU time the API process and Redis use meanwhile, against
the same interval with no stream open. Target: 100 idle streams cost less than 5 % of a core.

    .venv/bin/python benchmarks/bench_streams.py [--streams 100] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.replay_api import Server  # noqa: E402


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def server_processes(server: Server) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(the API process, Redis): `start.py all` serves the API itself and starts Redis and the scheduler."""
    assert server.proc is not None
    api = psutil.Process(server.proc.pid)
    redis = [c for c in api.children(recursive=True) if "redis-server" in " ".join(c.cmdline())]
    return [api], redis


async def hold_streams(base: str, job_id: str, n: int, seconds: float,
                       procs: list[list[psutil.Process]]) -> tuple[int, list[float]]:  # fmt: skip
    """Open n streams, wait until all are open, then measure each process group's CPU share while they idle."""
    kinds = ["logs", "events", "progress"]
    opened = 0

    async def one(i: int, client: httpx.AsyncClient) -> None:
        nonlocal opened
        async with client.stream("GET", f"/jobs/{job_id}/{kinds[i % 3]}/stream") as r:
            assert r.status_code == 200
            opened += 1
            async for _ in r.aiter_lines():
                pass

    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        tasks = [asyncio.create_task(one(i, client)) for i in range(n)]
        deadline = time.monotonic() + 30
        while opened < n and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(3.0)  # the streams' first reads (the whole history, the log) are done
        before, t0 = [cpu_seconds(p) for p in procs], time.monotonic()
        await asyncio.sleep(seconds)
        shares = [(cpu_seconds(p) - b) / (time.monotonic() - t0) for p, b in zip(procs, before, strict=True)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return opened, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="swift-api-streams-") as tmp:
        workdir = Path(tmp)
        model = workdir / "models" / "m"
        model.mkdir(parents=True)
        (model / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}')
        (model / "tokenizer.json").write_text('{"version": "1.0"}')
        data = workdir / "data" / "d.jsonl"
        data.parent.mkdir(parents=True)
        row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        first = json.dumps({**row, "fake_swift": {"hang_after_steps": 1}})
        data.write_text(first + "\n" + (json.dumps(row) + "\n") * 20)
        # (STREAMS_PER_OWNER, 64 by default, counts every caller without a key as one: the rest got a 429)
        with Server(workdir, 1, 1800, extra={"STREAMS_PER_OWNER": "0"}) as server:
            body = {"data_path": str(data), "model_path": str(model), "output_dir": "idle", "job_id": "idle",
                    "auto_start": True}  # fmt: skip
            r = server.http.post("/jobs", json=body)
            r.raise_for_status()
            deadline = time.monotonic() + 30
            while not (server.http.get("/jobs/idle").json()["progress"]["current_step"] or 0):
                if time.monotonic() > deadline:
                    raise SystemExit("the job did not start")
                time.sleep(0.1)
            api, redis = server_processes(server)
            base = str(server.http.base_url)
            c0, r0, t0 = cpu_seconds(api), cpu_seconds(redis), time.monotonic()
            time.sleep(args.seconds)
            idle_api = (cpu_seconds(api) - c0) / (time.monotonic() - t0)
            idle_redis = (cpu_seconds(redis) - r0) / (time.monotonic() - t0)
            opened, (busy_api, busy_redis) = asyncio.run(hold_streams(base, "idle", args.streams, args.seconds,
                                                                      [api, redis]))  # fmt: skip
            server.http.post("/jobs/idle/stop")
    if opened < args.streams:
        raise SystemExit(f"only {opened} of {args.streams} streams opened: the figures would be for fewer")
    print(f"{opened} idle streams for {args.seconds:g} s (STREAM_POLL_SECONDS 0.5):")
    print(f"  API process  {100 * idle_api:.2f} % of a core without streams, {100 * busy_api:.2f} % with them"
          f" -> {100 * (busy_api - idle_api):.2f} % for the streams")  # fmt: skip
    print(f"  Redis        {100 * idle_redis:.2f} % -> {100 * busy_redis:.2f} %"
          f" ({100 * (busy_redis - idle_redis):.2f} % for the streams)")  # fmt: skip
    print("  (measured once every stream is open and has sent its backlog; target: < 5 % of a core)")


if __name__ == "__main__":
    main()
