"""How long an urgent job waits for GPUs held by lower-priority work, with PREEMPTION=on (run by hand).

The server (`start.py`: API, scheduler, embedded Redis) runs on 2 simulated GPUs with the fake swift. Each
trial fills both GPUs with priority-1 jobs that train until stopped, then submits a priority-9 job for one GPU
and measures from its create request to its `running` status and to its swift process starting. The victim
stops like a stop (SIGTERM to its group, STOP_GRACE_SECONDS, SIGKILL): a trainer that exits on SIGTERM frees
its GPU at once, one that ignores it only after the grace. Expected: the grace (when used) plus a start.

    .venv/bin/python benchmarks/bench_preemption.py [--trials 5] [--grace 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.replay_api import Server  # noqa: E402


def create(server: Server, workdir: Path, name: str, priority: int, **fake: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data = workdir / "data" / f"{name}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    first = json.dumps({"messages": messages, "fake_swift": {"step_seconds": 0.05, **fake}})
    data.write_text(first + "\n" + (json.dumps({"messages": messages}) + "\n") * 20)
    body = {"job_id": name, "output_dir": name, "auto_start": True, "priority": priority, "data_path": str(data),
            "model_path": str(workdir / "models" / "m"),
            "training": {"max_steps": 100000, "save_steps": 20}}  # fmt: skip
    r = server.http.post("/jobs", json=body)
    r.raise_for_status()
    return dict(r.json())


def wait(server: Server, job_id: str, status: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = dict(server.http.get(f"/jobs/{job_id}").json())
        if job["status"] == status:
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"{job_id} did not become {status}: {job['status']}")
        time.sleep(0.02)


def trials(n: int, grace: float, ignore_sigterm: bool) -> list[tuple[float, float]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="swift-api-preempt-") as tmp:
        workdir = Path(tmp)
        model = workdir / "models" / "m"
        model.mkdir(parents=True)
        (model / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}')
        (model / "tokenizer.json").write_text('{"version": "1.0"}')
        extra = {"PREEMPTION": "on", "PREEMPTION_MIN_RUN_SECONDS": "0", "STOP_GRACE_SECONDS": str(grace),
                 "QUEUE_POLL_INTERVAL": "5"}  # fmt: skip
        with Server(workdir, 2, 1800, extra=extra) as server:
            for t in range(n):
                for k in range(2):
                    create(server, workdir, f"low{t}-{k}", 1, ignore_sigterm=ignore_sigterm)
                for k in range(2):
                    wait(server, f"low{t}-{k}", "running")
                time.sleep(1.0)  # let both train a little: a victim has steps to lose
                t0 = time.time()
                create(server, workdir, f"urgent{t}", 9)
                job = wait(server, f"urgent{t}", "running", timeout=grace + 60)
                swift_at = None
                while swift_at is None and time.time() - t0 < 30:
                    events = server.http.get(f"/jobs/urgent{t}/events").json()["events"]
                    swift_at = next((e["time"] for e in events if e["type"] == "process_started"), None)
                    time.sleep(0.02)
                out.append((job["started_at"] - t0, (swift_at or float("nan")) - t0))
                for job_id in (f"urgent{t}", f"low{t}-0", f"low{t}-1"):
                    server.http.post(f"/jobs/{job_id}/stop")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--grace", type=float, default=3.0, help="STOP_GRACE_SECONDS")
    args = parser.parse_args()
    for ignore in (False, True):
        got = trials(args.trials, args.grace, ignore)
        running = [a for a, _ in got]
        swift = [b for _, b in got]
        kind = "ignores SIGTERM (killed after the grace)" if ignore else "exits on SIGTERM"
        print(f"victim {kind}, STOP_GRACE_SECONDS {args.grace:g}, {args.trials} trials:")
        print(f"  urgent job create -> running        p50 {statistics.median(running):.2f} s, max {max(running):.2f} s")
        print(f"  urgent job create -> swift started  p50 {statistics.median(swift):.2f} s, max {max(swift):.2f} s")


if __name__ == "__main__":
    main()
