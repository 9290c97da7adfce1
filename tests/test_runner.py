"""The runner owns its run: API workers and schedulers may all die, and the run still ends recorded.

Real processes and signals: start.py (API + scheduler), runners, the fake swift, a real Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from application.runner import CLAIMED, _early_start
from application.services.process_group import group_members
from tests.conftest import ADMIN_KEY, FAKE_SWIFT, KEYS_SETTING, ApiServer, gone, job_body, wait_for
from tests.redis_proxy import RedisProxy


def stored(r: redis.Redis, prefix: str, job_id: str) -> dict[str, Any]:
    """A job read straight from Redis, no API in between."""
    raw: dict[str, str] = r.hgetall(f"{prefix}:job:{job_id}")  # type: ignore[assignment]
    return {k: json.loads(v) for k, v in raw.items()}


def running(server: ApiServer, workspace: Path, name: str, min_step: int = 1, created: bool = False,
            **options: Any) -> dict[str, Any]:  # fmt: skip
    if not created:
        r = server.create(**job_body(workspace, name, auto_start=True, **options))
        assert r.status_code == 201 and r.json()["status"] == "running", r.text
    return wait_for(lambda: (j := server.job(name))["runner"] and j["pid"] and
                    (j["progress"]["current_step"] or 0) >= min_step and j, what=f"{name} to run")  # fmt: skip


def stop_the_scheduler(server: ApiServer) -> None:
    """SIGTERM to `start.py scheduler`, until it has exited (start.py, its parent, reaps it only when it stops)."""
    scheduler = server.scheduler_keeper()
    scheduler.send_signal(signal.SIGTERM)
    wait_for(lambda: not scheduler.is_running() or scheduler.status() == psutil.STATUS_ZOMBIE, timeout=40,
             what="the scheduler to exit")  # fmt: skip


def older_than_this_host(runner: dict[str, Any]) -> dict[str, Any]:
    """A runner's record as its host finds it after a reboot: of an earlier boot, started before the host's pid 1
    (a test cannot reboot its host, so the record gets the stamp and start time such a runner would have)."""
    started = psutil.Process(1).create_time() - 30
    return {**runner, "start_time": started, "launched_at": started, "stamp": "an-earlier-boot/12345"}


def resumed_to_the_end(server: ApiServer, name: str, preempted_for: str, exact: bool = True) -> None:
    """The job completes in a second attempt, after a preemption for `preempted_for`, resumed from a checkpoint
    (it saves every 5 of its 60 steps), with every step in its loss history once."""
    done = server.wait_status(name, "completed", "failed", timeout=60)
    assert done["status"] == "completed", done["error_message"]
    assert [a["outcome"] for a in done["attempts"]] == ["preempted", "completed"] and done["retries"] == 0
    assert preempted_for in done["attempts"][0]["preempted_for"]
    assert done["attempts"][1]["resumed_from"].endswith(("checkpoint-10", "checkpoint-15", "checkpoint-20"))
    events = server.http.get(f"/jobs/{name}/events").json()["events"]
    assert any(e["type"] == "preempted" and preempted_for in e["message"] for e in events), events
    steps = [
        p["step"] for p in server.http.get(f"/jobs/{name}/progress", params={"history_limit": 1000}).json()["history"]
    ]
    if exact:
        assert steps == list(range(1, 61))
    else:  # a hard kill may land between a checkpoint and the push of its step's loss: that one can be missing
        assert steps == sorted(set(steps)) and steps[-1] == 60 and len(steps) >= 59, steps


def test_every_api_worker_and_the_scheduler_killed_runs_go_on_and_end_recorded(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path, redis_url: str
) -> None:
    first = server_factory(env={"API_WORKERS": "2", "SIMULATED_GPUS": "3x80"})
    assert len(first.processes()) >= 4  # start.py, the uvicorn supervisor's 2 workers, the scheduler
    names = ["r0", "r1", "r2"]
    # All three created before any is waited for: one after another, the first could end before the third ran.
    for n in names:
        assert first.create(**job_body(workspace, n, auto_start=True, step_seconds=0.15,
                                       training={"max_steps": 30})).status_code == 201  # fmt: skip
    jobs = {n: running(first, workspace, n, created=True) for n in names}
    first.kill_all()
    assert all(psutil.pid_exists(j["runner"]["pid"]) for j in jobs.values()), "runners outlive API and scheduler"

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    steps = {n: stored(r, first.prefix, n)["progress"]["current_step"] for n in names}
    wait_for(lambda: all((stored(r, first.prefix, n)["progress"]["current_step"] or 0) > steps[n] for n in names),
             timeout=20, what="progress written by the runners alone")  # fmt: skip
    wait_for(lambda: all(stored(r, first.prefix, n)["status"] == "completed" for n in names), timeout=60,
             what="the runners to record the ends")  # fmt: skip
    restart = time.time()
    second = server_factory(prefix=first.prefix, workdir=tmp_path)
    for n in names:
        job = second.job(n)
        assert job["status"] == "completed" and job["finished_at"] < restart, job
        assert job["progress"]["current_step"] == 30 and job["exit_code"] == 0
        assert job["last_checkpoint"].endswith("checkpoint-30")

    def exported() -> bool:
        return all(second.job(n)["export"]["status"] == "completed" for n in names)

    wait_for(exported, what="the automatic exports")
    assert all(g["job_id"] is None for g in second.http.get("/gpus").json()["gpus"])
    r.close()


def test_a_run_that_fails_while_no_api_runs_gets_its_true_status(server_factory: Callable[..., ApiServer],
                                                                workspace: Path, tmp_path: Path) -> None:  # fmt: skip
    first = server_factory()
    running(first, workspace, "bad", step_seconds=0.05, fail_at_step=12)
    first.kill_all()
    second = server_factory(prefix=first.prefix, workdir=tmp_path)
    final = second.wait_status("bad", "failed", "completed", timeout=20)
    assert final["status"] == "failed" and final["exit_code"] == 1
    assert "RuntimeError: fake_swift failure at step 12" in final["error_message"]
    assert all(g["job_id"] is None for g in second.http.get("/gpus").json()["gpus"])


def test_a_run_whose_exit_status_cannot_be_written_beside_its_log_ends_with_swifts_own_error(
    server: ApiServer, workspace: Path
) -> None:
    # A full disk: swift failed with "No space left on device", then the runner died writing its exit file, and
    # the job said "runner exited with code 1" (a 0-byte runner log) and was retried as a lost runner.
    blocked = server.output_root / "nospace" / "logs" / "nospace.train.exit.tmp"
    blocked.mkdir(parents=True)  # (where the exit file is written first: it cannot be, as on a full disk)
    body = job_body(workspace, "nospace", auto_start=True, max_retries=2, fail_at_step=2,
                    fail_message="OSError: [Errno 28] No space left on device")  # fmt: skip
    assert server.create(**body).status_code == 201
    final = server.wait_status("nospace", "failed", "completed", "queued", timeout=20)
    assert (final["status"], final["error_code"], final["retries"]) == ("failed", "exit_code", 0), final
    assert "OSError: [Errno 28] No space left on device" in final["error_message"]
    assert all(g["job_id"] is None for g in server.http.get("/gpus").json()["gpus"])


def test_a_runner_killed_by_sigkill_fails_its_job_within_two_seconds(server: ApiServer, workspace: Path) -> None:
    job = running(server, workspace, "victim", hang_after_steps=2)
    swift_group = job["pid"]
    assert group_members(swift_group)
    os.kill(job["runner"]["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    failed = server.wait_status("victim", "failed", "completed", "stopped", timeout=10)
    took = time.monotonic() - t0
    assert failed["status"] == "failed" and took < 2.0, (failed["status"], took)
    assert "runner killed by signal 9 (SIGKILL" in failed["error_message"], failed["error_message"]
    assert failed["error_code"] == "runner_lost"
    assert group_members(swift_group) == []  # nothing is left running on the GPUs that were freed
    assert all(g["job_id"] is None for g in server.http.get("/gpus").json()["gpus"])


def test_a_process_of_the_run_in_a_session_of_its_own_does_not_outlive_the_run(
    server_factory: Callable[..., ApiServer], workspace: Path
) -> None:
    # The run's leftovers were killed by process group only: a child that called setsid() lived on after the run
    # ended, its GPU's lease freed, with CUDA_VISIBLE_DEVICES still naming the GPU (it would hold its memory).
    pid_file = workspace / "escaped.pid"
    swift = workspace / "swift-with-an-escapee"
    swift.write_text(f"#!/bin/sh\nsetsid sh -c 'echo $$ > {pid_file}; exec sleep 300' &\nexec {FAKE_SWIFT} \"$@\"\n")
    swift.chmod(0o755)
    server = server_factory(env={"SWIFT_BIN": str(swift)})
    r = server.create(**job_body(workspace, "leaky", auto_start=True, training={"max_steps": 2}))
    assert r.status_code == 201, r.text
    escaped = int(wait_for(lambda: pid_file.is_file() and pid_file.read_text().strip(), what="the escapee"))
    assert os.getsid(escaped) != os.getsid(0)  # (in a session of its own, out of the run's group)
    done = server.wait_status("leaky", "completed", "failed", timeout=60)
    assert done["status"] == "completed", done["error_message"]
    wait_for(lambda: gone(escaped), timeout=10, what="the escapee to be killed")


def test_a_runner_that_stops_answering_is_killed_and_its_run_stopped(
    server_factory: Callable[..., ApiServer], workspace: Path
) -> None:
    # A stopped (SIGSTOP) or hung runner lives on: its job stayed `running` for ever, holding its GPUs, and a
    # stop was answered 200 and never carried out.
    server = server_factory(env={"RUNNER_HEARTBEAT_TTL": "1"})
    job = running(server, workspace, "mute", hang_after_steps=2)
    swift_group = job["pid"]
    os.kill(job["runner"]["pid"], signal.SIGSTOP)
    assert server.http.post("/jobs/mute/stop").status_code == 200
    ended = server.wait_status("mute", "stopped", "failed", "completed", timeout=30)
    assert ended["status"] == "stopped", ended  # the stop asked for decides the end
    assert gone(job["runner"]["pid"])
    assert group_members(swift_group) == []
    assert all(g["job_id"] is None for g in server.http.get("/gpus").json()["gpus"])

    # Without a stop: failed, saying why.
    job = running(server, workspace, "mute2", hang_after_steps=2)
    os.kill(job["runner"]["pid"], signal.SIGSTOP)
    failed = server.wait_status("mute2", "failed", "completed", "stopped", timeout=30)
    assert failed["status"] == "failed" and failed["error_code"] == "runner_lost", failed
    assert "stopped answering: no heartbeat for" in failed["error_message"], failed["error_message"]


def test_a_busy_runner_is_not_taken_for_hung(server_factory: Callable[..., ApiServer], workspace: Path) -> None:
    # Killed as hung: every run with a poll interval over twice the heartbeat TTL (its first beat came a poll
    # after its start, and the key lapsed between beats), and a runner silent through a stop's long grace.
    server = server_factory(env={"RUNNER_HEARTBEAT_TTL": "1", "RUNNER_POLL_INTERVAL": "2", "STOP_GRACE_SECONDS": "5"})
    server.create(**job_body(workspace, "slow-poll", auto_start=True, step_seconds=0.5, training={"max_steps": 14}))
    done = server.wait_status("slow-poll", "completed", "failed", timeout=60)
    assert done["status"] == "completed", done["error_message"]
    running(server, workspace, "stubborn", ignore_sigterm=True, hang_after_steps=1)
    assert server.http.post("/jobs/stubborn/stop").status_code == 200
    stopped = server.wait_status("stubborn", "stopped", "failed", timeout=60)
    assert stopped["status"] == "stopped" and stopped["stop_outcome"] == "killed", stopped


def test_a_runner_and_its_run_killed_while_no_scheduler_runs_are_never_left_running(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path
) -> None:
    first = server_factory()
    job = running(first, workspace, "vanished", hang_after_steps=1)
    first.kill_all()
    os.kill(job["runner"]["pid"], signal.SIGKILL)
    os.killpg(job["pid"], signal.SIGKILL)
    wait_for(lambda: not group_members(job["pid"]) and not psutil.pid_exists(job["runner"]["pid"]),
             what="the runner and its run to die")  # fmt: skip
    second = server_factory(prefix=first.prefix, workdir=tmp_path)
    final = second.wait_status("vanished", "failed", "completed", "stopped", timeout=15)
    assert final["status"] == "failed" and final["error_code"] == "runner_lost", final
    assert "how it died is known only to the scheduler that started it" in final["error_message"]
    assert second.http.get("/jobs", params={"status": "running"}).json()["total"] == 0
    assert all(g["job_id"] is None for g in second.http.get("/gpus").json()["gpus"])


def test_a_stop_reaches_the_runner_with_no_api_in_between(server: ApiServer, workspace: Path,
                                                          redis_url: str) -> None:  # fmt: skip
    job = running(server, workspace, "flagged", hang_after_steps=2)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.hset(f"{server.prefix}:job:flagged", "stop_requested", "true")  # what the API writes, nothing more
    final = server.wait_status("flagged", "stopped", timeout=10)
    assert final["stop_outcome"] == "terminated" and group_members(job["pid"]) == []
    r.close()


def test_a_run_that_logged_faster_than_its_runner_parses_still_stops_when_asked(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path
) -> None:
    # A trainer far chattier than the runner parses: ~15 MB of step lines at once (well under a second to write,
    # many to parse), then the fake swift, which trains on without end.
    chatty, lines = tmp_path / "chatty-swift", tmp_path / "lines.py"
    line = "{'loss': '1.2', 'grad_norm': '0.5', 'learning_rate': '1e-05', 'epoch': '0.1', " \
           "'global_step/max_steps': '1/100', 'elapsed_time': '1s', 'remaining_time': '1m'}\n"  # fmt: skip
    lines.write_text(f"import sys\nsys.stdout.write({line!r} * 100_000)\n")
    chatty.write_text(
        f'#!/bin/sh\nif [ "$1" = sft ]; then "{sys.executable}" "{lines}"; fi\nexec "{FAKE_SWIFT}" "$@"\n'
    )
    chatty.chmod(0o755)
    server = server_factory(env={"SWIFT_BIN": str(chatty)})
    assert server.create(**job_body(workspace, "chatty", auto_start=True, hang_after_steps=2)).status_code == 201
    # The runner parses in bounded passes and writes, beats and looks at its flags between them: progress shows
    # and a stop reaches swift at once, not once the whole backlog is parsed (15 s and more here).
    job = wait_for(lambda: (j := server.job("chatty"))["pid"] and (j["progress"]["current_step"] or 0) >= 1 and j,
                   timeout=8, what="the first progress")  # fmt: skip
    assert server.http.post("/jobs/chatty/stop").status_code == 200
    wait_for(lambda: group_members(job["pid"]) == [], timeout=8, what="swift to be stopped")
    final = server.wait_status("chatty", "stopped", "completed", "failed", timeout=120)
    assert final["status"] == "stopped" and final["stop_outcome"] == "terminated", final["error_message"]


def test_a_redis_outage_mid_run_loses_no_step(server_factory: Callable[..., ApiServer], workspace: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    from application.services.embedded_redis import EmbeddedRedis, find_redis_server

    binary = find_redis_server()
    assert binary
    own = EmbeddedRedis(tmp_path / "own-redis", binary)  # append-only: a restart keeps the data
    own.start()
    try:
        server = server_factory(env={"REDIS_URL": own.url, "REDIS_RETRIES": "0", "REDIS_SOCKET_TIMEOUT": "1",
                                     "REDIS_CONNECT_TIMEOUT": "1"})  # fmt: skip
        job = running(server, workspace, "steady", step_seconds=0.1, training={"max_steps": 60, "logging_steps": 1})
        own.stop()
        t_down = time.monotonic()
        # The run goes on while Redis is away, to its end; its runner keeps what it read.
        wait_for(lambda: (Path(job["output_dir"]) / "logs" / "steady.train.exit.json").exists(), timeout=30,
                 what="swift to end during the outage")  # fmt: skip
        assert time.monotonic() - t_down >= 1.0
        back = time.time()
        own.start()
        done = server.wait_status("steady", "completed", "failed", timeout=60)
        assert done["status"] == "completed", done["error_message"]
        # When the run ended, not when Redis came back and took the end.
        assert done["finished_at"] < back and done["attempts"][-1]["finished_at"] == done["finished_at"], done
        steps = [p["step"] for p in server.http.get("/jobs/steady/progress", params={"history_limit": 1000})
                 .json()["history"] if p["loss"] is not None]  # fmt: skip
        assert steps == list(range(1, 61)), steps  # every step, those logged during the outage too
    finally:
        own.stop()


@pytest.mark.parametrize(("after", "lose_reply"), [(rb'"to":\s*"completed"', True), (rb'"to":\s*"completed"', False),
                                                    (rb"export_started", True)],
                         ids=["end-reply-lost", "end-reply-delivered", "export-reply-lost"])  # fmt: skip
def test_redis_gone_just_as_a_run_completes_still_exports(
    server_factory: Callable[..., ApiServer], workspace: Path, redis_url: str, after: bytes, lose_reply: bool
) -> None:
    # Redis records the end (or the export), then goes away, with or without answering: the runner took a refused
    # retry for "someone else ended it", or died on its next read, and the automatic export never ran; a retried
    # export record found its own first try running and recorded a skip that never happened.
    proxy = RedisProxy(redis_url)
    try:
        server = server_factory(env={"REDIS_URL": proxy.url, "REDIS_RETRIES": "0", "REDIS_SOCKET_TIMEOUT": "1",
                                     "REDIS_CONNECT_TIMEOUT": "1"})  # fmt: skip
        proxy.cut_after(after, lose_reply=lose_reply, down_seconds=2.0)
        r = server.create(**job_body(workspace, "blip", auto_start=True, step_seconds=0.05,
                                     training={"max_steps": 20, "save_steps": 10}))  # fmt: skip
        assert r.status_code == 201 and r.json()["status"] == "running", r.text
        wait_for(proxy.fired.is_set, timeout=30, what="the end of the run to be recorded")

        def exported() -> dict[str, Any] | None:
            r = server.http.get("/jobs/blip")  # (a 503 while Redis is away)
            job: dict[str, Any] | None = r.json() if r.status_code == 200 else None
            return job if job and job["export"]["status"] not in ("none", "running") else None

        done = wait_for(exported, timeout=60, what="the automatic export")
        assert done["status"] == "completed" and done["export"]["status"] == "completed", done
        assert done["export"]["checkpoint"].endswith("checkpoint-20")
        events = [e["type"] for e in server.http.get("/jobs/blip/events").json()["events"]]
        assert events.count("export_started") == 1 and "export_skipped" not in events, events
    finally:
        proxy.close()


# ---- pause, resume and preemption across restarts ------------------------------------------------------------


def test_a_pause_completes_with_api_and_scheduler_killed_and_resumes_after_restart(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path, redis_url: str
) -> None:
    first = server_factory()
    running(first, workspace, "p", min_step=6, step_seconds=0.1,
            training={"max_steps": 40, "save_steps": 5, "logging_steps": 1})  # fmt: skip
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.hset(f"{first.prefix}:job:p", "pause_requested", "true")  # what POST .../pause writes, then everyone dies
    first.kill_all()
    wait_for(lambda: stored(r, first.prefix, "p")["status"] == "paused", timeout=20, what="the runner to pause it")
    assert not r.hgetall(f"{first.prefix}:gpu_leases"), "a paused job holds no GPU"
    second = server_factory(prefix=first.prefix, workdir=tmp_path)
    paused = second.job("p")
    assert paused["resume_from"].endswith(("checkpoint-5", "checkpoint-10", "checkpoint-15"))
    assert second.http.post("/jobs/p/resume").status_code == 200
    done = second.wait_status("p", "completed", "failed", timeout=60)
    assert done["status"] == "completed" and [a["outcome"] for a in done["attempts"]] == ["paused", "completed"]
    steps = [p["step"] for p in second.http.get("/jobs/p/progress", params={"history_limit": 1000}).json()["history"]]
    assert steps == list(range(1, 41))


def test_a_pause_whose_runner_died_is_recorded_paused_by_the_scheduler(
    server_factory: Callable[..., ApiServer], workspace: Path, redis_url: str
) -> None:
    server = server_factory()
    job = running(server, workspace, "orphan", min_step=6, step_seconds=0.1, ignore_sigterm=True,
                  training={"max_steps": 400, "save_steps": 5, "logging_steps": 1})  # fmt: skip
    os.kill(job["runner"]["pid"], signal.SIGKILL)  # the runner is gone before it could act on the pause
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.hset(f"{server.prefix}:job:orphan", "pause_requested", "true")
    paused = server.wait_status("orphan", "paused", "failed", timeout=30)
    assert paused["status"] == "paused", paused["error_message"]
    assert paused["resume_from"] and paused["attempts"][-1]["outcome"] == "paused"
    assert group_members(job["pid"]) == []  # swift (which ignored SIGTERM) was killed: nothing holds the GPU
    assert all(g["job_id"] is None for g in server.http.get("/gpus").json()["gpus"])


def test_what_is_left_of_a_run_whose_runner_and_launcher_died_is_killed_before_its_gpus_are_freed(
    server: ApiServer, workspace: Path
) -> None:
    # The trainer outlives its launcher (the group's leader) and its runner: as when the runner dies in the
    # grace of a stop that the launcher obeyed and the trainer ignored.
    job = running(server, workspace, "stray", min_step=2, step_seconds=0.1, ignore_sigterm=True,
                  training={"max_steps": 400, "logging_steps": 1})  # fmt: skip
    trainers = [p for p in group_members(job["pid"]) if p != job["pid"]]
    assert trainers, "the fake swift runs its trainer as a child in its group"
    try:
        os.kill(job["runner"]["pid"], signal.SIGKILL)
        os.kill(job["pid"], signal.SIGKILL)
        ended = server.wait_status("stray", "failed", "queued", "pending", timeout=30)
        assert ended["status"] != "running"
        assert group_members(job["pid"]) == [], "the trainer still runs, on GPUs the job no longer holds"
        assert all(g["job_id"] != "stray" for g in server.http.get("/gpus").json()["gpus"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job["pid"], signal.SIGKILL)


def test_a_scheduler_that_takes_its_runs_with_it_sends_them_back_to_resume_from_their_checkpoints(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path, redis_url: str
) -> None:
    # As in a container, where runners die with the scheduler's main process: STOP_RUNS_ON_SHUTDOWN.
    first = server_factory(env={"STOP_RUNS_ON_SHUTDOWN": "true"})
    job = running(first, workspace, "s", min_step=12, step_seconds=0.1,
                  training={"max_steps": 60, "save_steps": 5, "logging_steps": 1})  # fmt: skip
    stop_the_scheduler(first)
    # Recorded before the scheduler exited, by the runner it told to stop: nothing is left to a next scheduler.
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    back = stored(r, first.prefix, "s")
    assert back["status"] == "queued" and back["attempts"][-1]["outcome"] == "preempted", back
    assert back["resume_from"].endswith(("checkpoint-10", "checkpoint-15", "checkpoint-20")), back["resume_from"]
    assert not psutil.pid_exists(job["runner"]["pid"]) and group_members(job["pid"]) == []
    assert not r.hgetall(f"{first.prefix}:gpu_leases")
    resumed_to_the_end(server_factory(prefix=first.prefix, workdir=tmp_path), "s", "shutdown of its host")
    r.close()


def goes_down_whole(server: ApiServer, job: dict[str, Any], redis_url: str, swift_seen_killed: bool = False) -> None:
    """The host goes down with everything on it at once (power, its container killed): nobody records a thing,
    or (`swift_seen_killed`) only the runner, that swift was killed, before it is killed too. It comes back with
    the job's runner record older than itself, as after a real restart."""
    server.kill_all()
    for group in (job["runner"]["pid"], job["pid"]):
        os.killpg(group, signal.SIGKILL)
    wait_for(lambda: group_members(job["runner"]["pid"]) == [] and group_members(job["pid"]) == [],
             what="the host's processes to be gone")  # fmt: skip
    if swift_seen_killed:
        Path(job["log_file"]).with_suffix(".exit.json").write_text(json.dumps({"exit_code": -9}))
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert stored(r, server.prefix, job["job_id"])["status"] == "running"
    r.hset(f"{server.prefix}:job:{job['job_id']}", "runner", json.dumps(older_than_this_host(job["runner"])))
    r.close()


@pytest.mark.parametrize("swift_seen_killed", [False, True], ids=["nothing-recorded", "swift-seen-killed"])
def test_the_runs_of_a_host_that_went_down_whole_go_back_to_the_queue_to_resume(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path, redis_url: str, swift_seen_killed: bool
) -> None:
    first = server_factory()
    job = running(first, workspace, "h", min_step=12, step_seconds=0.1,
                  training={"max_steps": 60, "save_steps": 5, "logging_steps": 1})  # fmt: skip
    goes_down_whole(first, job, redis_url, swift_seen_killed)
    resumed_to_the_end(server_factory(prefix=first.prefix, workdir=tmp_path), "h", "restart of its host", exact=False)


def test_a_job_whose_host_keeps_going_down_under_it_fails_once_past_the_limit(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path, redis_url: str
) -> None:
    env = {"HOST_RESTART_REQUEUES": "1"}
    first = server_factory(env=env)
    job = running(first, workspace, "d", min_step=6, step_seconds=0.1, max_retries=2,
                  training={"max_steps": 200, "save_steps": 5, "logging_steps": 1})  # fmt: skip
    goes_down_whole(first, job, redis_url)
    second = server_factory(env=env, prefix=first.prefix, workdir=tmp_path)
    # Once back in the queue and resumed, as above; then its host goes down under it again.
    job = wait_for(lambda: (j := second.job("d"))["status"] == "running" and len(j["attempts"]) == 2 and
                   j["runner"] and j["pid"] and j, what="the second run")  # fmt: skip
    goes_down_whole(second, job, redis_url)
    third = server_factory(env=env, prefix=first.prefix, workdir=tmp_path)
    done = third.wait_status("d", "completed", "failed", "queued", timeout=30)
    assert done["status"] == "failed" and done["error_code"] == "host_restarts", done
    assert "went down under this job's runs 2 time(s) (HOST_RESTART_REQUEUES=1)" in done["error_message"]
    assert [a["outcome"] for a in done["attempts"]] == ["preempted", "failed"]
    assert done["retries"] == 0  # not a failure a retry would mend
    assert all(g["job_id"] is None for g in third.http.get("/gpus").json()["gpus"])


def pid_namespace() -> list[str] | None:
    """How to start a command in a pid namespace of its own, which is what a container's processes live in: when
    its pid 1 ends, the kernel kills all of them. As root, or else inside a user namespace; None: neither works."""
    for extra in ([], ["--user", "--map-root-user"]):
        argv = ["unshare", *extra, "--pid", "--mount-proc", "--kill-child=SIGTERM"]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if subprocess.run([*argv, "true"], capture_output=True, timeout=10).returncode == 0:
                return argv
    return None


NAMESPACE = pid_namespace()


def processes_under(folder: Path) -> list[int]:
    """Processes working in `folder` (runners and swift work in their job's output folder)."""
    found = []
    for p in psutil.process_iter(["pid", "cwd"]):
        with contextlib.suppress(psutil.Error):
            if (p.info["cwd"] or "").startswith(str(folder)):
                found.append(p.pid)
    return found


@pytest.mark.skipif(NAMESPACE is None, reason="needs `unshare --pid --mount-proc`: root, or user namespaces")
def test_a_host_that_really_restarted_resumes_its_runs(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path
) -> None:
    # The same as above without touching the record: start.py is pid 1 of a namespace, as in a container.
    first = server_factory(wrap=NAMESPACE)
    running(first, workspace, "n", min_step=12, step_seconds=0.1,
            training={"max_steps": 60, "save_steps": 5, "logging_steps": 1})  # fmt: skip
    assert first.proc is not None
    init = psutil.Process(first.proc.pid).children()[0]
    init.kill()  # and with it every process of the namespace: API, scheduler, runner, swift
    first.proc.wait(10)
    wait_for(lambda: not processes_under(tmp_path / "output"), what="the namespace's processes to be gone")
    resumed_to_the_end(server_factory(prefix=first.prefix, workdir=tmp_path, wrap=NAMESPACE), "n",
                       "restart of its host", exact=False)  # fmt: skip


def test_swift_runs_without_the_servers_keys_and_redis_credentials(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path
) -> None:
    # swift runs code a user picked (a hub model's remote code, report_to integrations): it must not find the
    # keys that reach Redis or sign webhooks, whether they come from the environment or from a setting.
    wrapper = tmp_path / "env-swift"
    wrapper.write_text(f'#!/bin/sh\nenv > "{tmp_path}/env-of-$1"\n'
                       f'tr "\\000" "\\n" < /proc/$PPID/environ > "{tmp_path}/env-of-runner-$1"\n'
                       f'exec "{FAKE_SWIFT}" "$@"\n')  # fmt: skip
    wrapper.chmod(0o755)
    server = server_factory(env={"SWIFT_BIN": str(wrapper), "WEBHOOK_SECRET": "hook-secret-0123456789abcdef",
                                 "HF_TOKEN": "the-operators-hub-token", "API_KEYS": KEYS_SETTING,
                                 "SWIFT_API_KEY": ADMIN_KEY, "API_WORKERS": "2"})  # fmt: skip
    # The scheduler, whose runners start swift, has no keys to give: it uses none (hunt DR: job code read them,
    # the admin's among them, from /proc/<scheduler>/environ); nor has the API workers' resource tracker, which
    # lives as long as the server, dumpable (review DV).
    for scheduler in (*server.schedulers(), server.scheduler_keeper()):
        assert not {"API_KEYS", "SWIFT_API_KEY"} & set(scheduler.environ()), scheduler.cmdline()
    trackers = [p for p in server.processes() if "resource_tracker" in " ".join(p.cmdline())]
    assert trackers and not any({"API_KEYS", "SWIFT_API_KEY", "WEBHOOK_SECRET"} & set(p.environ()) for p in trackers)
    server.http.headers.update(server.admin)
    server.create(**job_body(workspace, "envjob", auto_start=True, training={"max_steps": 3}))
    server.wait_status("envjob", "completed")
    wait_for(lambda: server.job("envjob")["export"]["status"] == "completed", what="the automatic export")
    for command in ("sft", "export"):
        env = dict(line.split("=", 1) for line in (tmp_path / f"env-of-{command}").read_text().splitlines()
                   if "=" in line)  # fmt: skip
        leaked = sorted(set(env) & {"REDIS_URL", "REDIS_KEY_PREFIX", "WEBHOOK_SECRET", "OUTPUT_ROOT", "SWIFT_BIN",
                                    "API_KEYS", "SWIFT_API_KEY"})  # fmt: skip
        assert leaked == [], f"swift {command} got {leaked}"
        assert env["HF_TOKEN"] == "the-operators-hub-token" and "CUDA_VISIBLE_DEVICES" in env
        assert env["FAKE_SWIFT_STEP_SECONDS"] == "0.02"  # the rest of the environment is swift's to use
        # Its runner (swift's parent) needs Redis, not what only the HTTP server uses.
        runner = (tmp_path / f"env-of-runner-{command}").read_text().splitlines()
        assert any(line.startswith("REDIS_URL=") for line in runner)
        assert not any(line.startswith(("WEBHOOK_SECRET=", "API_KEYS=", "SWIFT_API_KEY=")) for line in runner)


def test_a_swift_that_cannot_be_run_fails_the_job_saying_whose_it_is_and_is_logged_as_an_error(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path
) -> None:
    # The user was told to set SWIFT_BIN, and nothing above INFO was logged anywhere (hunt AP).
    wrapper = tmp_path / "swift"
    wrapper.write_text(f'#!/bin/sh\nexec "{FAKE_SWIFT}" "$@"\n')
    wrapper.chmod(0o755)
    server = server_factory(env={"SWIFT_BIN": str(wrapper)})
    assert server.create(**job_body(workspace, "noexec", training={"max_steps": 3})).status_code == 201
    wrapper.chmod(0o644)  # (after the server read swift's version)
    assert server.http.post("/jobs/noexec/start").status_code == 200
    failed = server.wait_status("noexec", "failed")
    assert failed["error_code"] == "launch" and "Permission denied" in failed["error_message"], failed
    assert failed["error_message"].endswith("the server's operator must set SWIFT_BIN or run ./install_all.sh")
    runner_log = Path(failed["output_dir"]) / "logs" / "noexec.runner.log"
    assert any("| ERROR" in line and "could not start swift" in line for line in runner_log.read_text().splitlines())
    # A quantized export's job says it is an export that failed (it said "training failed": review AQ).
    wrapper.chmod(0o755)
    body = job_body(workspace, "parent", auto_start=True, training={"max_steps": 2, "save_steps": 2})
    assert server.create(**body).status_code == 201
    wait_for(lambda: (j := server.job("parent"))["status"] == "completed" and j["export"]["status"] == "completed",
             what="the run and its automatic export")  # fmt: skip
    wrapper.chmod(0o644)
    r = server.http.post("/jobs/parent/export", json={"checkpoint": "checkpoint-2", "quant_bits": 4,
                                                      "quant_method": "awq"})  # fmt: skip
    assert r.status_code == 200, r.text
    server.wait_status("parent-quant", "failed")
    events = server.http.get("/jobs/parent-quant/events").json()["events"]
    ended = [e["message"] for e in events if e["type"] == "status_failed"]
    assert len(ended) == 1 and ended[0].startswith("export failed: could not start swift"), events


def test_a_runner_given_the_launch_spec_of_another_run_starts_nothing(tmp_path: Path) -> None:
    log = tmp_path / "late.train.2.log"
    log.write_bytes(b"the other run's output\n")
    ran = tmp_path / "ran"
    spec = tmp_path / "late.launch.json"
    spec.write_text(json.dumps({"run_id": "run-b", "argv": ["/bin/sh", "-c", f"touch {ran}"], "env": {},
                                "cwd": str(tmp_path), "log_file": str(log),
                                "exit_file": str(tmp_path / "late.exit.json")}))  # fmt: skip
    refused = _early_start(str(spec), "run-a")
    assert isinstance(refused, OSError) and "run-b" in str(refused)
    assert log.read_bytes() == b"the other run's output\n" and not ran.exists()


def test_a_launch_spec_revoked_before_its_runner_takes_it_starts_nothing(tmp_path: Path) -> None:
    # A scheduler stalled between its last leader check and the launch; its successor gave the run up and started
    # the job again. The stale runner then started a second trainer on GPUs leased to another run.
    from application.services.process_group import launch_spec, revoke_launch

    ran, log = tmp_path / "ran", tmp_path / "j.train.log"

    def spec_of(run_id: str) -> Path:
        spec = launch_spec(tmp_path, "j", run_id)
        spec.write_text(json.dumps({"run_id": run_id, "argv": ["/bin/sh", "-c", f"touch {ran}"], "env": {},
                                    "cwd": str(tmp_path), "log_file": str(log),
                                    "exit_file": str(tmp_path / "j.exit.json")}))  # fmt: skip
        return spec

    spec = spec_of("run-given-up")
    assert revoke_launch(spec, log, grace=15.0) and not spec.exists()
    refused = _early_start(str(spec), "run-given-up")
    assert isinstance(refused, OSError) and "given up" in str(refused)
    assert not ran.exists() and not log.exists()
    # A runner that took its spec first: the run counts as launched, and the spec is gone once swift's log is made.
    spec = spec_of("run-taken")
    started = _early_start(str(spec), "run-taken")
    assert not isinstance(started, OSError)
    assert started[0].wait(10) == 0 and ran.exists()
    assert not spec.exists() and not Path(f"{spec}{CLAIMED}").exists()
    assert not revoke_launch(spec, log, grace=15.0)
    # Taken by a runner that is still starting swift (its claim fresh, no log yet), or that died doing so.
    claimed = Path(f"{spec_of('run-starting')}{CLAIMED}")
    launch_spec(tmp_path, "j", "run-starting").rename(claimed)
    log.unlink()
    assert not revoke_launch(launch_spec(tmp_path, "j", "run-starting"), log, grace=15.0) and claimed.exists()
    os.utime(claimed, (time.time() - 60, time.time() - 60))
    assert revoke_launch(launch_spec(tmp_path, "j", "run-starting"), log, grace=15.0) and not claimed.exists()


def test_a_runner_that_stalls_after_taking_its_spec_starts_nothing_once_its_run_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its claim went stale (the runner stopped or its disk slow past the grace): the watchdog requeued the run,
    # and the runner, once it went on, started swift all the same.
    from application import runner
    from application.services.process_group import launch_spec, revoke_launch

    ran, log = tmp_path / "ran", tmp_path / "j.train.log"
    spec = launch_spec(tmp_path, "j", "run-stalled")
    spec.write_text(json.dumps({"run_id": "run-stalled", "argv": ["/bin/sh", "-c", f"touch {ran}"], "env": {},
                                "cwd": str(tmp_path), "log_file": str(log),
                                "exit_file": str(tmp_path / "j.exit.json")}))  # fmt: skip
    revoked: list[bool] = []
    loads = json.loads

    def stalled(text: str) -> Any:  # the moment after the claim, read as the stall's end
        claimed = Path(f"{spec}{CLAIMED}")
        os.utime(claimed, (time.time() - 60, time.time() - 60))
        revoked.append(revoke_launch(spec, log, grace=15.0))
        return loads(text)

    monkeypatch.setattr(runner.json, "loads", stalled)
    refused = runner._early_start(str(spec), "run-stalled")
    assert revoked == [True] and isinstance(refused, OSError) and "given up" in str(refused)
    assert not ran.exists() and not log.exists()
    assert not [p.name for p in tmp_path.iterdir() if ".launch.json" in p.name]
