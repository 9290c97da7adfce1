"""The whole server on a machine with a real NVIDIA GPU: NVML inventory, real `swift sft` on CUDA, hand-over, pause.

    .venv/bin/python benchmarks/device_check_training.py [--swift PATH] [--steps 40] [--keep]

Builds the tiny Qwen2 model of the end-to-end test, starts `start.py` (embedded Redis, NVML backend, the real
swift) and, over HTTP, checks what only a real GPU can show:

- GET /gpus lists what nvidia-smi lists, and a create asking for more GPUs or memory than exist is refused;
- job A (1 GPU) trains in bfloat16 with CUDA_VISIBLE_DEVICES=0; while it runs, /gpus names A as the holder of
  GPU 0, and the CUDA processes NVML sees there are in A's process group (ours, not "outside processes");
- job B, created meanwhile, queues behind A for the GPU (not for outside processes), and starts once A's run
  and export have ended and NVML shows the memory released: the hand-over time is printed;
- B is paused after its first checkpoint (SIGTERM to a live CUDA process group) and resumed from it; after its
  next checkpoint C (priority 9, PREEMPTION on) preempts it, runs alone on the GPU and completes, and B resumes
  again and completes; the exports merge the LoRA into a model;
- at the end GPU 0 holds no process of ours.

Prints one PASS/FAIL line per check and the figures; exit status 0 when every check passed, 1 otherwise.
`--simulated` runs the same flow on GPU_BACKEND=simulated (1x80) with the fake swift, to try the script
without a GPU (the NVML-only checks are then skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BUILD_MODEL = ROOT / "tests" / "e2e" / "build_tiny_model.py"
FAKE_SWIFT = ROOT / "tests" / "fake_swift" / "swift"

results: list[tuple[bool, str]] = []


def check(ok: bool, what: str, detail: Any = "") -> bool:
    results.append((bool(ok), what))
    print(f"{'PASS' if ok else 'FAIL'} {what}" + (f"  [{detail}]" if detail != "" and not ok else ""), flush=True)
    return bool(ok)


def figure(name: str, value: Any) -> None:
    print(f"FIGURE {name}: {value}", flush=True)


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smi(query: str, kind: str = "gpu") -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", f"--query-{kind}={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


class Server:
    def __init__(self, work: Path, swift: Path, simulated: bool) -> None:
        self.simulated = simulated
        self.port = free_port()
        self.log_path = work / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "SWIFT_", "GPU_", "SIMULATED_"))}
        env.update({
            "APP_HOST": "127.0.0.1", "APP_PORT": str(self.port), "API_WORKERS": "2", "ENVIRONMENT": "test",
            "OUTPUT_ROOT": str(work / "output"), "DATA_ROOTS": str(work / "lab"), "MODEL_ROOTS": str(work / "lab"),
            "LOG_DIR": str(work / "logs"), "DATA_DIR": str(work / "data"), "SWIFT_BIN": str(swift),
            "GPU_BACKEND": "simulated" if simulated else "nvml", "QUEUE_POLL_INTERVAL": "0.5",
            "RUNNER_POLL_INTERVAL": "0.5", "STOP_GRACE_SECONDS": "20", "LOG_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PREEMPTION": "true", "PREEMPTION_MIN_RUN_SECONDS": "0",
            "SWIFT_VERSION": "",  # read from swift's own environment (env/.env.test names the fake's)
        })  # fmt: skip
        if simulated:
            env.update({"SIMULATED_GPUS": "1x80", "SWIFT_VERSION": "4.6.0", "FAKE_SWIFT_STEP_SECONDS": "0.3"})
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "start.py")], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}/api/v1/training", timeout=30)

    def get(self, path: str, **params: Any) -> Any:
        r = self.http.get(path, params=params)
        r.raise_for_status()
        return r.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.get(f"/jobs/{job_id}"))

    def up(self) -> bool:
        try:
            health = self.http.get("/health").json()
        except httpx.HTTPError:
            return False
        swift = health.get("swift") or {}
        # The fake swift has no ms-swift to probe: known is enough there.
        ready = swift.get("ok") is not None if self.simulated else swift.get("probed")
        return bool(ready) and bool(self.http.get("/gpus").json().get("gpus"))

    def tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join([line for line in lines if '"GET /api/' not in line][-n:])

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def job_body(lab: Path, output_dir: str, steps: int, save_steps: int, **extra: Any) -> dict[str, Any]:
    training = {
        "model_type": "qwen2", "template": "qwen2_5", "max_steps": steps, "logging_steps": 2,
        "save_steps": save_steps, "split_dataset_ratio": 0, "max_length": 256, "lora_rank": 8, "lora_alpha": 16,
        "dataloader_num_workers": 0, "dataset_num_proc": 1, "save_total_limit": 4,
    }  # fmt: skip
    return {"data_path": str(lab / "data.jsonl"), "model_path": str(lab / "tiny-qwen2"), "output_dir": output_dir,
            "num_gpus": 1, "auto_start": True, "training": training, **extra}  # fmt: skip


def ended(server: Server, job_id: str) -> dict[str, Any] | None:
    job = server.job(job_id)
    if job["status"] in ("completed", "failed", "stopped") and job["export"]["status"] not in ("none", "running"):
        return job
    return job if job["status"] in ("failed", "stopped") else None


@dataclass
class Seen:
    holders: set[str | None] = field(default_factory=set)
    reasons: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    in_group: list[bool] = field(default_factory=list)
    peak_mb: float = 0.0
    first_process_at: float | None = None


def watch(server: Server, job_id: str, until: Callable[[], Any], deadline: float, queued: str | None = None) -> Seen:
    """Sample GPU 0 until `until()`: who holds it, its processes (each in the job's process group?) and the
    reason `queued` waits."""
    seen = Seen()
    while not until() and time.time() < deadline:
        job = server.job(job_id)
        g = server.get("/gpus")["gpus"][0]
        seen.holders.add(g.get("job_id"))
        for proc in g["processes"]:
            if proc["pid"] not in seen.pids and job.get("pid"):
                seen.in_group.append(pgid(proc["pid"]) in (job["pid"], None))  # None: it ended meanwhile
            seen.pids.add(proc["pid"])
            seen.peak_mb = max(seen.peak_mb, proc.get("used_memory_mb") or 0.0)
            seen.first_process_at = seen.first_process_at or time.time()
        if queued:
            reason = (server.get(f"/jobs/{queued}/status").get("pending_reason") or {}).get("code")
            if reason:
                seen.reasons.add(reason)
        time.sleep(0.3)
    return seen


def step_of(checkpoint: str | None) -> int:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint and checkpoint.rsplit("-", 1)[-1].isdigit() else -1


def pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def run(args: argparse.Namespace, work: Path) -> None:
    lab = work / "lab"
    lab.mkdir(parents=True)
    swift = Path(args.swift) if args.swift else FAKE_SWIFT
    python = args.python or sys.executable
    t0 = time.monotonic()
    build = subprocess.run([python, str(BUILD_MODEL), str(lab)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})  # fmt: skip
    if not check(build.returncode == 0, "the tiny model builds", build.stderr[-2000:]):
        return
    figure("model build s", round(time.monotonic() - t0, 1))

    server = Server(work, swift, args.simulated)
    try:
        t0 = time.monotonic()
        try:
            wait_for(server.up, 180, "the server to answer with its GPUs read and swift probed", 0.5)
        except TimeoutError as exc:
            check(False, "the server starts", f"{exc}\n{server.tail()}")
            return
        figure("server start s", round(time.monotonic() - t0, 1))
        scenario(args, server, lab)
    finally:
        print("--- server log (tail) ---\n" + server.tail(40), flush=True)
        server.stop()


def scenario(args: argparse.Namespace, server: Server, lab: Path) -> None:
    gpus = server.get("/gpus")
    print("GET /gpus: " + json.dumps(gpus)[:1500], flush=True)
    check(gpus["backend"] == ("simulated" if args.simulated else "nvml"), "the GPU backend", gpus["backend"])
    check(len(gpus["gpus"]) == 1, "one GPU listed", len(gpus["gpus"]))
    total_gb = gpus["gpus"][0]["memory_total_mb"] / 1024
    if not args.simulated:
        rows = smi("index,uuid,name,memory.total")
        ours = [(g["index"], g["uuid"], g["name"], round(g["memory_total_mb"])) for g in gpus["gpus"]]
        theirs = [(int(r[0]), r[1], r[2], round(float(r[3]))) for r in rows]
        check(ours == theirs, "/gpus lists what nvidia-smi lists", (ours, theirs))

    too_many = server.http.post("/jobs", json=job_body(lab, "too_many", 4, 2, num_gpus=2))
    check(too_many.status_code in (409, 422) and "1 GPU" in too_many.text, "2 GPUs on a 1-GPU machine: refused",
          (too_many.status_code, too_many.text[:300]))  # fmt: skip
    too_big = server.http.post("/jobs", json=job_body(lab, "too_big", 4, 2, min_gpu_memory_gb=int(total_gb) + 100))
    check(too_big.status_code in (409, 422), "more GPU memory than the GPU has: refused",
          (too_big.status_code, too_big.text[:300]))  # fmt: skip

    t_create = time.time()
    a = server.http.post("/jobs", json=job_body(lab, "gpu_a", args.steps, args.steps // 2))
    if not check(a.status_code == 201 and a.json()["status"] == "running", "job A starts on the free GPU", a.text):
        return
    a_id = a.json()["job_id"]
    b_steps = args.steps * 6
    b = server.http.post("/jobs", json=job_body(lab, "gpu_b", b_steps, args.steps // 2))
    check(b.status_code == 201 and b.json()["status"] == "queued", "job B queues while A holds the GPU", b.text)
    b_id = b.json()["job_id"]

    # While A runs: the holder of GPU 0, its CUDA processes in A's process group, B's reason.
    seen = watch(server, a_id, lambda: server.job(a_id)["status"] != "running", t_create + args.deadline, b_id)
    check(seen.holders - {None} == {a_id}, "while A runs, /gpus names A as GPU 0's holder", seen.holders)
    check("outside_processes" not in seen.reasons and bool(seen.reasons),
          "B waits for A's GPU, not for outside processes", seen.reasons)  # fmt: skip
    if not args.simulated:
        check(bool(seen.pids), "NVML shows A's CUDA process on GPU 0", seen.pids)
        check(bool(seen.in_group) and all(seen.in_group), "those processes are in A's process group (ours)",
              seen.in_group)  # fmt: skip
        figure("A: peak GPU memory of its process MiB", round(seen.peak_mb))
        if seen.first_process_at:
            figure("A: create -> first CUDA process on the GPU s", round(seen.first_process_at - t_create, 1))

    try:
        job_a = wait_for(lambda: ended(server, a_id), args.deadline, "A and its export to end", 0.5)
    except TimeoutError as exc:
        check(False, "A ends", exc)
        return
    ok = check(job_a["status"] == "completed" and job_a["exit_code"] == 0, "A completes", job_a.get("error_message"))
    command = job_a["command"]
    check(command[command.index("--torch_dtype") + 1] == "bfloat16", "A trains in bfloat16 on the GPU", command)
    check(
        job_a["gpu_ids"] == [0] and job_a["env"].get("CUDA_VISIBLE_DEVICES") == "0",
        "A ran with CUDA_VISIBLE_DEVICES=0",
        (job_a["gpu_ids"], job_a["env"].get("CUDA_VISIBLE_DEVICES")),
    )
    if ok:
        check(job_a["export"]["status"] == "completed" and any(Path(job_a["export"]["path"]).glob("*.safetensors")),
              "A's export merged the LoRA", job_a["export"])  # fmt: skip
        prog = server.get(f"/jobs/{a_id}/progress", history_limit=1000)
        losses = [p["loss"] for p in prog["history"] if p.get("loss") is not None]
        check(prog["progress"]["current_step"] == args.steps and bool(losses), "A's progress reached max_steps",
              prog["progress"])  # fmt: skip
        figure("A: train_runtime s (swift's own)", prog.get("train_runtime"))
        figure("A: losses", [round(x, 4) for x in losses])
        if prog.get("train_runtime"):
            figure("A: steps/s", round(args.steps / prog["train_runtime"], 2))

    # B starts after A's run and export: the hand-over.
    try:
        job_b = wait_for(lambda: (j := server.job(b_id))["status"] != "queued" and j, 120, "B to start", 0.1)
    except TimeoutError as exc:
        check(False, "B starts after A", f"{exc}: {server.get(f'/jobs/{b_id}/status')}")
        return
    check(job_b["status"] == "running", "B starts once A's run has ended", job_b["status"])
    # A's export merges on the CPU: the GPU goes back to the queue when A's run ends.
    figure(
        "hand-over: A's run ended -> B running ms",
        round((job_b["started_at"] - job_a["attempts"][-1]["finished_at"]) * 1000),
    )

    seen = watch(server, b_id, lambda: server.job(b_id)["last_checkpoint"] or server.job(b_id)["status"] != "running",
                 time.time() + args.deadline)  # fmt: skip
    if not check(bool(server.job(b_id)["last_checkpoint"]), "B saves a checkpoint", server.job(b_id)["status"]):
        return
    if not args.simulated:
        check(bool(seen.in_group) and all(seen.in_group), "while B runs, GPU 0's processes are B's alone",
              seen.in_group)  # fmt: skip
    t_pause = time.monotonic()
    paused = server.http.post(f"/jobs/{b_id}/pause").json()
    if not check(paused.get("status") == "paused" and paused.get("resume_step"), "B pauses at a checkpoint", paused):
        return
    figure("B: pause -> paused s", round(time.monotonic() - t_pause, 2))
    if not args.simulated:
        freed = wait_for(lambda: not server.get("/gpus")["gpus"][0]["processes"], 60, "GPU 0 to be free", 0.2)
        check(bool(freed), "B's CUDA processes are gone once it is paused")
    resumed = server.http.post(f"/jobs/{b_id}/resume")
    check(resumed.status_code == 200 and resumed.json()["resume_step"] == paused["resume_step"],
          "B resumes from that checkpoint", resumed.text)  # fmt: skip
    # Preemption: C (priority 9) takes the GPU from B, which goes back to the queue from its checkpoint.
    at = paused["resume_step"]
    try:
        wait_for(lambda: step_of(server.job(b_id)["last_checkpoint"]) > at or server.job(b_id)["status"] != "running",
                 args.deadline, "a checkpoint of B's second run", 0.2)  # fmt: skip
    except TimeoutError as exc:
        check(False, "B's second run saves a checkpoint", exc)
        return
    t_c = time.time()
    c = server.http.post("/jobs", json=job_body(lab, "gpu_c", args.steps, args.steps // 2, priority=9))
    if not check(c.status_code == 201, "C (priority 9) is created", c.text):
        return
    c_id = c.json()["job_id"]
    try:
        job_c = wait_for(lambda: (j := server.job(c_id))["status"] != "queued" and j, 120, "C to start", 0.1)
    except TimeoutError as exc:
        check(False, "C starts by preempting B", f"{exc}: {server.get(f'/jobs/{c_id}/status')}")
        return
    job_b = server.job(b_id)
    check(job_c["status"] == "running" and job_b["status"] == "queued", "C runs, B is back in the queue",
          (job_c["status"], job_b["status"]))  # fmt: skip
    last = job_b["attempts"][-1]
    check(last.get("outcome") == "preempted" and last.get("preempted_for") == c_id,
          "B's second run ended as preempted for C", last)  # fmt: skip
    figure("preemption: C created -> C running s", round(job_c["started_at"] - t_c, 2))
    seen = watch(server, c_id, lambda: server.job(c_id)["status"] != "running", time.time() + args.deadline)
    if not args.simulated:
        check(bool(seen.in_group) and all(seen.in_group), "while C runs, GPU 0's processes are C's alone",
              seen.in_group)  # fmt: skip
    check(server.job(c_id)["status"] == "completed", "C completes", server.job(c_id).get("error_message"))
    try:
        job_b = wait_for(lambda: ended(server, b_id), args.deadline, "B and its export to end", 0.5)
    except TimeoutError as exc:
        check(False, "B ends", exc)
        return
    check(job_b["status"] == "completed", "B completes after the resume", job_b.get("error_message"))
    check(len(job_b["attempts"]) == 3 and job_b["progress"]["current_step"] == b_steps,
          "B ran three times (paused, preempted) to max_steps",
          (len(job_b["attempts"]), job_b["progress"]))  # fmt: skip
    check(job_b["export"]["status"] == "completed", "B's export completes", job_b["export"])

    final = server.get("/gpus")["gpus"][0]
    check(final.get("job_id") is None, "at the end no job holds GPU 0", final.get("job_id"))
    if not args.simulated:
        gone = wait_for(lambda: not server.get("/gpus")["gpus"][0]["processes"], 30, "no process on GPU 0", 0.5)
        check(bool(gone), "at the end GPU 0 runs no process")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swift", help="the real swift CLI (default: `swift` on PATH; the fake one if --simulated)")
    parser.add_argument("--python", help="the Python that builds the tiny model (default: this one)")
    parser.add_argument("--steps", type=int, default=40, help="max_steps of job A (B runs 6 times as many)")
    parser.add_argument("--deadline", type=float, default=240, help="seconds any one wait may take")
    parser.add_argument("--simulated", action="store_true", help="no GPU: simulated backend and the fake swift")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if not args.simulated:
        args.swift = args.swift or shutil.which("swift")
        if not args.swift or not shutil.which("nvidia-smi"):
            print("needs nvidia-smi and the real swift (--swift); try --simulated without a GPU", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="device-check-"))
    try:
        run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    failed = [what for ok, what in results if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
