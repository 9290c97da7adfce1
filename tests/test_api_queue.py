"""The GPU queue over HTTP: 2 simulated GPUs, the fake swift, real Redis, one or two real API processes."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ApiServer, wait_for
from tests.conftest import job_body as shared_job_body


def job_body(workspace: Path, name: str, **fields: Any) -> dict[str, Any]:
    """With `job_id` set to the name: the queue tests refer to jobs by it."""
    return shared_job_body(workspace, name, job_id=name, dataset=f"d-{name}", **fields)


def create(server: ApiServer, workspace: Path, name: str, **fields: Any) -> dict[str, Any]:
    r = server.create(**job_body(workspace, name, **fields))
    assert r.status_code == 201, r.text
    return r.json()


def hold(server: ApiServer, workspace: Path, name: str, **fields: Any) -> dict[str, Any]:
    """A running job that keeps its GPU until stopped."""
    r = create(server, workspace, name, auto_start=True, hang_after_steps=1, **fields)
    assert r["status"] == "running", r
    return wait_for(lambda: (j := server.job(name))["pid"] and j, what=f"{name}'s process")


def queue_ids(server: ApiServer) -> list[str]:
    entries = server.http.get("/queue").json()["entries"]
    assert [e["position"] for e in entries] == list(range(1, len(entries) + 1))
    return [e["job_id"] for e in entries]


def stop(server: ApiServer, name: str) -> None:
    r = server.http.post(f"/jobs/{name}/stop")
    assert r.status_code == 200 and r.json()["status"] == "stopped", r.text


def holds_for(server: ApiServer, seconds: float, predicate: Callable[[], bool], what: str) -> None:
    """Assert `predicate` stays true for `seconds` (the absence of an event can only be watched for a while)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), what
        time.sleep(0.05)


def overlapping_gpu_use(jobs: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """Pairs of jobs whose [started_at, finished_at] intervals overlap on one GPU."""
    bad = []
    for a, b in itertools.combinations([j for j in jobs if j["started_at"] is not None], 2):
        shared = set(a["gpu_ids"]) & set(b["gpu_ids"])
        a_end = a["finished_at"] or float("inf")
        b_end = b["finished_at"] or float("inf")
        if shared and a["started_at"] < b_end and b["started_at"] < a_end:
            bad.append((a["job_id"], b["job_id"], min(shared)))
    return bad


class GpuChecker(threading.Thread):
    """Polls /gpus and the running jobs until stopped; records any moment a GPU looks held by two jobs."""

    def __init__(self, servers: list[ApiServer]) -> None:
        super().__init__(daemon=True)
        self.clients = [httpx.Client(base_url=s.base, timeout=10) for s in servers]
        self.halt = threading.Event()
        self.polls = 0
        self.violations: list[str] = []
        self.busiest = 0

    def run(self) -> None:
        while not self.halt.is_set():
            for client in self.clients:
                running = client.get("/jobs", params={"status": "running", "limit": 500}).json()["jobs"]
                seen: dict[int, str] = {}
                for job in running:
                    for gpu in job["gpu_ids"]:
                        if gpu in seen:
                            self.violations.append(f"GPU {gpu} held by {seen[gpu]} and {job['job_id']}")
                        seen[gpu] = job["job_id"]
                self.busiest = max(self.busiest, len(seen))
                gpus = client.get("/gpus").json()["gpus"]
                if len({g["index"] for g in gpus}) != len(gpus):
                    self.violations.append(f"/gpus lists a GPU twice: {gpus}")
                self.polls += 1

    def finish(self) -> None:
        self.halt.set()
        self.join(10)
        for client in self.clients:
            client.close()


# ---- queued jobs ------------------------------------------------------------------------------------------


def test_third_job_queues_with_position_and_estimate_then_starts_when_a_gpu_frees(server: ApiServer,
                                                                                  workspace: Path) -> None:  # fmt: skip
    for name in ("a", "b"):
        r = create(server, workspace, name, auto_start=True, step_seconds=0.1, training={"max_steps": 200})
        assert r["status"] == "running"
    # Estimates need the running jobs' parsed remaining time.
    wait_for(lambda: all(server.job(n)["progress"]["remaining_seconds"] is not None for n in ("a", "b")))
    a = server.job("a")
    assert sorted(server.job("a")["gpu_ids"] + server.job("b")["gpu_ids"]) == [0, 1]

    r = create(server, workspace, "c")
    assert r["status"] == "queued" and r["queue_position"] == 1
    assert "queue" in r["message"].lower()
    est = r["estimated_wait_time"]
    # From the running jobs' parsed remaining time (200 steps of 0.1 s each): a real figure, not a placeholder.
    assert est is not None and 0 < est["seconds"] < 60 and est["text"] == "less than a minute"
    assert r["pending_reason"]["code"] == "resources" and r["pending_reason"]["message"]
    assert server.job("c")["status"] == "queued" and server.job("c")["queued_at"] is not None

    q = server.http.get("/queue").json()
    assert [e["job_id"] for e in q["entries"]] == ["c"]
    entry = q["entries"][0]
    assert entry["position"] == 1 and entry["priority"] == 5 and entry["num_gpus"] == 1
    assert entry["waited_seconds"] >= 0 and entry["estimated_wait_time"]["seconds"] >= 0
    assert q["summary"]["length"] == 1 and q["summary"]["free_gpus"] == 0 and q["summary"]["running_jobs"] == 2
    assert q["summary"]["processor_running"] is True
    st = server.http.get("/queue/c/status").json()
    assert st["queued"] is True and st["queue_position"] == 1 and st["jobs_ahead"] == 0
    assert st["estimated_wait_time"]["seconds"] >= 0 and st["pending_reason"]["code"] == "resources"
    assert entry["pending_reason"]["code"] == "resources"
    job_status = server.http.get("/jobs/c/status").json()
    assert job_status["queue_position"] == 1 and job_status["pending_reason"]["code"] == "resources"
    assert job_status["estimated_wait_time"]["seconds"] >= 0
    # POST start on a queued job keeps it queued and says so.
    r2 = server.http.post("/jobs/c/start")
    assert r2.status_code == 200 and r2.json()["status"] == "queued" and r2.json()["queue_position"] == 1

    stop(server, "a")
    c = server.wait_status("c", "running", timeout=10)
    assert c["gpu_ids"] == a["gpu_ids"]
    assert queue_ids(server) == []
    st = server.http.get("/queue/c/status").json()
    assert st["queued"] is False and st["status"] == "running" and st["queue_position"] is None
    events = [e["type"] for e in server.http.get("/jobs/c/events").json()["events"]]
    assert events[:2] == ["created", "status_running"]


def test_creates_made_at_once_each_answer_why_their_job_waits(server: ApiServer, workspace: Path) -> None:
    # A create forecasts the queue up to the position its job was stored at; jobs submitted before it but stored
    # a moment later moved it past that part, and its answer said pending_reason null, estimated_wait_time null.
    hold(server, workspace, "both", num_gpus=2)
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: create(server, workspace, f"at-once-{i}", auto_start=True), range(12)))
    assert all(a["status"] == "queued" for a in answers), answers
    assert [a["job_id"] for a in answers if a["pending_reason"] is None] == [], answers


def test_a_job_whose_gpus_are_gone_since_its_create_is_told_so_at_its_start(
    server_factory: Callable[..., ApiServer], workspace: Path
) -> None:
    # Restarted with fewer GPUs: a pending job's start queued it for ever ("this request can never be met"), and
    # a start of such a queued one said it would start by itself.
    first = server_factory(env={"SIMULATED_GPUS": "2x80"})
    create(first, workspace, "pinned", gpu_ids=[1])
    hold(first, workspace, "rested", num_gpus=2)
    assert first.http.post("/jobs/rested/pause").json()["status"] == "paused"
    hold(first, workspace, "busy", num_gpus=2)
    assert create(first, workspace, "two", num_gpus=2, auto_start=True)["status"] == "queued"
    first.stop()
    second = server_factory(env={"SIMULATED_GPUS": "1x80"}, prefix=first.prefix)
    wait_for(lambda: len(second.http.get("/gpus").json()["gpus"]) == 1, what="the new GPU reading")
    # The GPU "busy" still holds is listed apart (it was in no list).
    assert second.http.get("/gpus").json()["missing"] == [{"index": 1, "job_id": "busy"}]
    page = second.http.get(second.base.split("/api/")[0] + "/ui/gpus").text
    assert 'id="gpus-missing"' in page and "GPU 1: held by" in page and "busy" in page.split("gpus-missing")[1]
    r = second.http.post("/jobs/pinned/start")
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        "job 'pinned' can never start here: gpu_ids [1] do not exist: this server has 1 "
        "GPU, indices [0]. Delete it and create it again with a request these GPUs meet"
    )
    assert second.job("pinned")["status"] == "pending"
    # One queued before the GPUs went: its reason says what to do, and so does a start of it.
    r = second.http.post("/jobs/two/start")  # (it answered 200 "queued"; the README says 409)
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == ("job 'two' can never start here: num_gpus=2 can never be met: this server has 1 GPU."
                                  " Delete it and create it again with a request these GPUs meet")  # fmt: skip
    assert second.job("two")["status"] == "queued"
    assert second.http.get("/jobs/two/status").json()["pending_reason"]["code"] == "never"
    # The same with the queue processor stopped, whose reason a queued job shows before its own (review AK).
    assert second.http.post("/queue/processor/stop").status_code == 200
    assert second.http.post("/jobs/two/start").status_code == 409
    assert second.http.post("/queue/processor/start").status_code == 200
    # A paused one is not resumed into that wait either (the README: "not started or resumed either, 409").
    r = second.http.post("/jobs/rested/resume")
    assert r.status_code == 409, r.text
    assert r.json()["detail"].startswith("job 'rested' can never run again here: num_gpus=2 can never be met"), r.text
    assert second.job("rested")["status"] == "paused"


def test_pending_job_whose_start_finds_no_gpu_is_queued(server: ApiServer, workspace: Path) -> None:
    assert create(server, workspace, "p")["status"] == "pending"
    hold(server, workspace, "h0")
    hold(server, workspace, "h1")
    r = server.http.post("/jobs/p/start")
    assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["queue_position"] == 1
    assert queue_ids(server) == ["p"]
    stop(server, "h1")
    server.wait_status("p", "running", timeout=10)


def test_a_create_whose_derived_id_is_a_running_jobs_waits_pending(server: ApiServer, workspace: Path) -> None:
    # Without auto_start, a job whose GPUs are free waits `pending` for POST start. One whose id, derived from its
    # output_dir, was a running job's (stored as `<id>-2`) was planned under that id, which no pass starts: it was
    # queued, and the scheduler started it without being asked (the README check EM).
    hold(server, workspace, "busy")
    body = shared_job_body(workspace, "other", dataset="d-other", hang_after_steps=1)
    body["output_dir"] = "sub/busy"
    r = server.create(**body)
    assert r.status_code == 201 and r.json()["job_id"] == "busy-2" and r.json()["status"] == "pending", r.text


def test_starts_sent_at_once_are_each_answered_as_a_start_of_the_job_as_it_stands(server: ApiServer,
                                                                                 workspace: Path) -> None:  # fmt: skip
    # A retrying client, or two colleagues: the start that lost the race to queue the job was a 409 "is queued now:
    # it cannot be started", while a start of a queued job is a 200 (found by the concurrency hunt).
    for i in range(4):
        assert create(server, workspace, f"p{i}")["status"] == "pending"
    hold(server, workspace, "h0")
    hold(server, workspace, "h1")
    with ThreadPoolExecutor(3) as pool:
        for i in range(4):
            answers = list(pool.map(lambda _: server.http.post(f"/jobs/p{i}/start"), range(3)))  # noqa: B023
            assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
            assert {r.json()["status"] for r in answers} == {"queued"}, [r.text for r in answers]
            events = [e["type"] for e in server.http.get(f"/jobs/p{i}/events").json()["events"]]
            assert events.count("status_queued") == 1, events
            # Taken out of the queue, it is a 409 as before, whoever cancelled it.
            assert server.http.delete(f"/queue/p{i}").json()["status"] == "cancelled"
            r = server.http.post(f"/jobs/p{i}/start")
            assert r.status_code == 409 and "is cancelled: only a pending job can be started" in r.text, r.text
        # With free GPUs the first start's pass may have started the job before another start is refused: a 200
        # too. (A start that reads the job once it runs is a 409, as any start of a running job: on a loaded
        # machine one of the three may come that late.)
        stop(server, "h0")
        stop(server, "h1")
        for i in range(4):
            assert create(server, workspace, f"f{i}", hang_after_steps=1)["status"] == "pending"
            answers = list(pool.map(lambda _: server.http.post(f"/jobs/f{i}/start"), range(3)))  # noqa: B023
            ok = [r.json()["status"] for r in answers if r.status_code == 200]
            late = [r for r in answers if r.status_code != 200]
            assert ok and set(ok) <= {"queued", "running"}, [r.text for r in answers]
            assert all(r.status_code == 409 and "is running: only a pending job" in r.text for r in late), late
            server.wait_status(f"f{i}", "running", timeout=10)
            stop(server, f"f{i}")
            events = [e["type"] for e in server.http.get(f"/jobs/f{i}/events").json()["events"]]
            assert events.count("status_running") == 1, events


def test_priority_then_fifo_order_patch_resorts_and_gpus_go_in_that_order(server: ApiServer,
                                                                          workspace: Path) -> None:  # fmt: skip
    hold(server, workspace, "a")
    hold(server, workspace, "b")
    positions = {}
    for name, priority in (("low", 0), ("mid1", 5), ("high", 10), ("mid2", 5)):
        r = create(server, workspace, name, priority=priority, hang_after_steps=1)
        assert r["status"] == "queued"
        positions[name] = r["queue_position"]
    assert positions == {"low": 1, "mid1": 1, "high": 1, "mid2": 3}
    assert queue_ids(server) == ["high", "mid1", "mid2", "low"]
    assert [e["priority"] for e in server.http.get("/queue").json()["entries"]] == [10, 5, 5, 0]

    patched = server.http.patch("/jobs/low", json={"priority": 10})
    assert patched.status_code == 200 and patched.json()["priority"] == 10 and patched.json()["status"] == "queued"
    assert queue_ids(server) == ["low", "high", "mid1", "mid2"]  # same priority: submitted first goes first
    assert server.http.patch("/jobs/mid1", json={"priority": 0}).status_code == 200
    assert queue_ids(server) == ["low", "high", "mid2", "mid1"]
    assert server.http.get("/queue/mid1/status").json()["jobs_ahead"] == 3
    events = server.http.get("/jobs/low/events").json()["events"]
    assert any(e["type"] == "priority_changed" and e["data"] == {"from": 0, "to": 10} for e in events)
    # The priority it has already: nothing changes, and no "priority changed from 10 to 10" joins the events.
    same = server.http.patch("/jobs/low", json={"priority": 10})
    assert same.status_code == 200 and same.json()["priority"] == 10, same.text
    again = server.http.get("/jobs/low/events").json()["events"]
    assert [e["type"] for e in again].count("priority_changed") == 1, again

    stop(server, "a")
    server.wait_status("low", "running", timeout=10)
    assert queue_ids(server) == ["high", "mid2", "mid1"]
    stop(server, "low")
    server.wait_status("high", "running", timeout=10)
    stop(server, "b")
    server.wait_status("mid2", "running", timeout=10)
    assert queue_ids(server) == ["mid1"] and server.job("mid1")["status"] == "queued"


def test_a_resumed_job_has_waited_since_it_was_queued_again_in_both_views(server: ApiServer,
                                                                          workspace: Path) -> None:  # fmt: skip
    hold(server, workspace, "h1")
    create(server, workspace, "x", auto_start=True, step_seconds=0.05, training={"max_steps": 400, "save_steps": 5})
    wait_for(lambda: (server.job("x")["progress"]["current_step"] or 0) >= 30, what="x ran a while")
    assert server.http.post("/jobs/x/pause").status_code == 200
    wait_for(lambda: server.job("x")["status"] == "paused")
    hold(server, workspace, "h2")  # takes the GPU x gave back
    assert server.http.post("/jobs/x/resume").status_code == 200
    x = server.job("x")
    assert x["status"] == "queued"
    entry = next(e for e in server.http.get("/queue").json()["entries"] if e["job_id"] == "x")
    own = server.http.get("/queue/x/status").json()["waited_seconds"]
    # Its place is kept (by submission time), its wait is counted from its return to the queue, as its own
    # status says; it was counted from its submission, running and paused time included.
    assert entry["submitted_at"] == x["created_at"]
    assert abs(entry["waited_seconds"] - own) < 1.0 and entry["waited_seconds"] < x["queued_at"] - x["created_at"]


def test_cancel_from_queue_and_queue_status(server: ApiServer, workspace: Path) -> None:
    a = hold(server, workspace, "a")
    hold(server, workspace, "b")
    create(server, workspace, "c")
    create(server, workspace, "d")
    st = server.http.get("/queue/d/status").json()
    assert st["queued"] is True and st["queue_position"] == 2 and st["jobs_ahead"] == 1

    r = server.http.delete("/queue/c")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert server.job("c")["status"] == "cancelled" and server.job("c")["finished_at"] is not None
    assert queue_ids(server) == ["d"]
    assert server.http.get("/queue/d/status").json()["queue_position"] == 1
    st = server.http.get("/queue/c/status").json()
    assert st["queued"] is False and st["status"] == "cancelled" and "cancelled" in st["message"]
    for name, words in (("c", "it has left the queue already"), ("a", "not queued")):
        r = server.http.delete(f"/queue/{name}")
        assert r.status_code == 409 and words in r.json()["detail"]
    assert server.http.patch("/jobs/c", json={"priority": 9}).status_code == 409
    assert server.http.post("/jobs/c/start").status_code == 409

    stop(server, "a")
    d = server.wait_status("d", "running", timeout=10)
    assert d["gpu_ids"] == a["gpu_ids"] and server.job("c")["status"] == "cancelled"
    assert server.http.get("/jobs", params={"status": "cancelled"}).json()["total"] == 1


def test_explicit_gpu_ids_wait_for_that_gpu(server: ApiServer, workspace: Path) -> None:
    hold(server, workspace, "on0", gpu_ids=[0])
    hold(server, workspace, "on1", gpu_ids=[1])
    assert create(server, workspace, "wants1", gpu_ids=[1])["status"] == "queued"
    stop(server, "on0")
    # GPU 0 is free, but not for this job: a new job takes it while `wants1` keeps waiting for GPU 1.
    other = create(server, workspace, "any", auto_start=True, hang_after_steps=1)
    assert other["status"] == "running" and server.job("any")["gpu_ids"] == [0]
    assert server.job("wants1")["status"] == "queued"
    stop(server, "on1")
    assert server.wait_status("wants1", "running", timeout=10)["gpu_ids"] == [1]


def test_gpus_busy_with_outside_processes_are_skipped_until_freed(server_factory: Callable[..., ApiServer],
                                                                  workspace: Path, tmp_path: Path) -> None:  # fmt: skip
    usage = tmp_path / "gpu-usage.json"
    usage.write_text(json.dumps({"0": {"processes": [{"pid": 4242, "used_memory_mb": 79 * 1024, "name": "other"}],
                                       "utilization": 100}}))  # fmt: skip
    server = server_factory(env={"SIMULATED_GPU_USAGE_FILE": str(usage)})
    gpu0 = server.http.get("/gpus").json()["gpus"][0]
    assert gpu0["processes"][0]["pid"] == 4242 and gpu0["memory_free_mb"] == pytest.approx(1024)
    first = hold(server, workspace, "first")
    assert first["gpu_ids"] == [1]
    assert create(server, workspace, "second")["status"] == "queued"
    # A 2-GPU job needs GPU 0 too: only the outside process stands in its way.
    pair = create(server, workspace, "pair", num_gpus=2)
    assert pair["pending_reason"]["code"] == "outside_processes", pair
    usage.write_text("{}")  # the outside process ended: the periodic pass notices
    assert server.wait_status("second", "running", timeout=10)["gpu_ids"] == [0]


# ---- the processor switch ---------------------------------------------------------------------------------


def test_processor_stop_keeps_queued_jobs_waiting_manual_pass_and_restart(server: ApiServer,
                                                                          workspace: Path) -> None:  # fmt: skip
    r = server.http.post("/queue/processor/stop")
    assert r.status_code == 200 and r.json()["running"] is False
    assert server.http.get("/queue/processor/status").json()["running"] is False
    assert server.http.post("/queue/processor/stop").json()["running"] is False  # idempotent

    a = hold(server, workspace, "a")
    create(server, workspace, "b", auto_start=True, step_seconds=0.05, training={"max_steps": 1000})
    # c keeps its GPU until stopped below: a run that ended by itself would free it for d on a slow machine.
    assert create(server, workspace, "c", hang_after_steps=1)["status"] == "queued"
    # A start of it while its GPUs are busy does not start it, and the answer does not say it starts by itself.
    r = server.http.post("/jobs/c/start")
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    assert r.json()["message"] == ("The job is queued and could not start now; nothing starts it by itself while the "
                                   "queue processor is stopped: POST /queue/processor/start, or start it again when "
                                   "its GPUs are free")  # fmt: skip
    stop(server, "a")
    assert {g["index"]: g["job_id"] for g in server.http.get("/gpus").json()["gpus"]}[a["gpu_ids"][0]] is None
    step = wait_for(lambda: server.job("b")["progress"]["current_step"], what="b's progress")
    # Over a few poll intervals (QUEUE_POLL_INTERVAL=1) nothing starts c, while b goes on.
    holds_for(server, 2.5, lambda: server.job("c")["status"] == "queued", "c must wait while the processor is off")
    assert server.job("b")["status"] == "running" and server.job("b")["progress"]["current_step"] > step
    queue = server.http.get("/queue").json()
    assert queue["summary"]["processor_running"] is False
    assert server.http.get("/queue/c/status").json()["pending_reason"]["code"] == "processor_stopped"
    # No wait is told while nothing starts jobs, in the queue's view as in the job's own.
    [entry] = queue["entries"]
    assert entry["estimated_wait_time"] is None and entry["pending_reason"]["code"] == "processor_stopped", entry
    assert server.http.get("/queue/c/status").json()["estimated_wait_time"] is None

    r = server.http.post("/queue/process")
    assert r.status_code == 200 and r.json()["started"] == ["c"] and r.json()["queue_length"] == 0
    assert server.job("c")["status"] == "running" and server.job("c")["gpu_ids"] == a["gpu_ids"]
    r = server.http.post("/queue/process")
    assert r.json()["started"] == [] and r.json()["message"]

    r = server.http.post("/queue/processor/start")
    assert r.status_code == 200 and r.json()["running"] is True
    assert create(server, workspace, "d", hang_after_steps=1)["status"] == "queued"
    stop(server, "c")
    server.wait_status("d", "running", timeout=10)
    status = server.http.get("/queue/processor/status").json()
    assert status["running"] is True and status["passes"] >= 1 and status["jobs_started"] >= 2, status
    assert status["last_pass_at"] is not None and status["last_error"] is None, status


# ---- bursts -----------------------------------------------------------------------------------------------


def burst(workspace: Path, count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        job_body(workspace, f"burst{i:02d}", auto_start=True, priority=rng.choice([0, 3, 5, 10]),
                 num_gpus=rng.choice([1, 1, 2]), step_seconds=0.01, training={"max_steps": rng.randint(3, 8)})
        for i in range(count)
    ]  # fmt: skip


def assert_all_ran_without_sharing(server: ApiServer, bodies: list[dict[str, Any]], checker: GpuChecker) -> None:
    jobs = [server.wait_status(b["job_id"], "completed", "failed", timeout=90) for b in bodies]
    checker.finish()
    assert [j["job_id"] for j in jobs if j["status"] != "completed"] == [], [j["error_message"] for j in jobs]
    for job, b in zip(jobs, bodies, strict=True):
        assert len(job["gpu_ids"]) == b["num_gpus"] and set(job["gpu_ids"]) <= {0, 1}
        assert job["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, job["gpu_ids"]))
    assert overlapping_gpu_use(jobs) == []
    assert checker.violations == []
    assert checker.polls >= 3
    assert all(g["job_id"] is None for g in server.http.get("/gpus").json()["gpus"])
    assert server.http.get("/queue").json()["summary"]["length"] == 0


def test_burst_of_mixed_jobs_all_complete_and_no_gpu_is_ever_shared(server_factory: Callable[..., ApiServer],
                                                                    workspace: Path) -> None:  # fmt: skip
    server = server_factory(env={"AUTO_EXPORT": "false"})
    bodies = burst(workspace, 10, seed=7)
    checker = GpuChecker([server])
    checker.start()
    statuses = [server.create(**b).json()["status"] for b in bodies]
    assert "queued" in statuses and "running" in statuses
    assert_all_ran_without_sharing(server, bodies, checker)
    assert checker.busiest >= 1


def test_two_api_processes_on_one_redis_never_double_allocate(server_factory: Callable[..., ApiServer],
                                                              workspace: Path, tmp_path: Path) -> None:  # fmt: skip
    first = server_factory(env={"AUTO_EXPORT": "false"})
    second = server_factory(env={"AUTO_EXPORT": "false"}, prefix=first.prefix, workdir=tmp_path)
    assert first.port != second.port
    bodies = burst(workspace, 12, seed=11)
    checker = GpuChecker([first, second])
    checker.start()

    def submit(i_body: tuple[int, dict[str, Any]]) -> int:
        i, b = i_body
        with httpx.Client(base_url=(first if i % 2 else second).base, timeout=30) as client:
            return client.post("/jobs", json=b).status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(submit, enumerate(bodies)))
    assert codes == [201] * len(bodies)
    # Both processes see one store.
    assert first.http.get("/jobs").json()["total"] == second.http.get("/jobs").json()["total"] == len(bodies)
    assert_all_ran_without_sharing(first, bodies, checker)
    schedulers = {first.job(b["job_id"])["scheduled_by"] for b in bodies}
    assert len(schedulers) == 1, "only the leading scheduler starts runs"


def test_switching_the_processor_off_and_on_never_hangs_or_strands_a_job(server_factory: Callable[..., ApiServer],
                                                                         workspace: Path) -> None:  # fmt: skip
    """Stop/start in a tight loop while jobs flow: every switch answers, every job runs to the end."""
    server = server_factory(env={"AUTO_EXPORT": "false"})
    bodies = [job_body(workspace, f"flip{i:02d}", step_seconds=0.0, training={"max_steps": 2}) for i in range(12)]
    for b in bodies:
        assert server.create(**b).status_code == 201
    halt = threading.Event()
    answers: list[int] = []

    def flip() -> None:
        with httpx.Client(base_url=server.base, timeout=10) as client:
            while not halt.is_set():
                for action in ("stop", "start"):
                    try:
                        answers.append(client.post(f"/queue/processor/{action}").status_code)
                    except httpx.TimeoutException:
                        answers.append(-1)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        for b in bodies:
            server.http.post(f"/jobs/{b['job_id']}/start")
        jobs = [server.wait_status(b["job_id"], "completed", "failed", timeout=60) for b in bodies]
    finally:
        halt.set()
        flipper.join(15)
    ended = [(j["job_id"], j["status"], j["error_message"]) for j in jobs]
    assert [j["job_id"] for j in jobs if j["status"] != "completed"] == [], ended
    assert all(j["pid"] for j in jobs)
    assert len(answers) >= 10 and set(answers) == {200}, answers
    # The switch still means what it says afterwards.
    server.http.post("/queue/processor/stop")
    assert server.http.get("/queue/processor/status").json()["running"] is False


def test_stopping_the_processor_stops_it_for_every_api_process(server_factory: Callable[..., ApiServer],
                                                               workspace: Path, tmp_path: Path) -> None:  # fmt: skip
    first = server_factory()
    second = server_factory(prefix=first.prefix, workdir=tmp_path)
    assert first.http.post("/queue/processor/stop").json()["running"] is False
    assert second.http.get("/queue/processor/status").json()["running"] is False  # one switch for both
    a = hold(first, workspace, "a")
    hold(second, workspace, "a2")  # both GPUs busy
    assert create(second, workspace, "b")["status"] == "queued"
    stop(first, "a")
    holds_for(second, 2.5, lambda: second.job("b")["status"] == "queued", "b must wait: the processor is off")
    assert second.http.post("/queue/processor/start").json()["running"] is True
    assert first.wait_status("b", "running", timeout=10)["gpu_ids"] == a["gpu_ids"]


async def test_the_queue_pages_length_agrees_with_its_entries_while_jobs_come_and_go(
    app_factory: Any, tmp_path: Path
) -> None:
    # The length was read apart from the entries, after the forecast: 55 against 54 listed while jobs were queued
    # and cancelled (hunt CH).
    import asyncio

    async with app_factory(scheduler=False, CREATE_RATE_LIMIT="0") as client:
        body = job_body(tmp_path, "churn", num_gpus=1, auto_start=True)
        churning = True

        async def churn() -> None:
            for i in itertools.count():
                if not churning:
                    return
                r = await client.post("/jobs", json={**body, "job_id": f"c{i}", "output_dir": f"c{i}"})
                assert r.status_code == 201 and r.json()["status"] == "queued", r.text
                if i % 2:
                    assert (await client.delete(f"/queue/c{i - 1}")).status_code == 200

        task = asyncio.create_task(churn())
        try:
            for _ in range(60):
                q = (await client.get("/queue", params={"limit": 500})).json()
                assert q["summary"]["length"] == len(q["entries"]), q["summary"]
        finally:
            churning = False
            await task
