"""Stopping, restarting the API under a running job, and exports: real processes, real signals."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from application.services.embedded_redis import EmbeddedRedis
from application.services.process_group import group_members
from tests.conftest import FAKE_SWIFT, QUICK_TO_GIVE_UP, ApiServer, gated_swift, job_body, wait_for


def job_processes(needle: str) -> list[psutil.Process]:
    """Live processes whose command line or working directory mentions `needle` (a job's output dir)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        try:
            if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(needle in part for part in (p.info["cmdline"] or [])) or needle in (p.info["cwd"] or ""):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_running(server: ApiServer, workspace: Path, name: str, min_step: int = 1, **options: Any) -> dict[str, Any]:
    """Create + auto-start a job, wait until swift has made `min_step` steps; returns the detail."""
    r = server.create(**job_body(workspace, name, auto_start=True, **options))
    assert r.status_code == 201 and r.json()["status"] == "running", r.text
    return wait_for(lambda: (j := server.job(name))["pid"] and (j["progress"]["current_step"] or 0) >= min_step and j,
                    what=f"{name} to make {min_step} step(s)")  # fmt: skip


# ---- stop ---------------------------------------------------------------------------------------------------


def test_a_stop_recorded_before_redis_went_away_is_answered_as_asked_not_try_again(
    server_factory: Callable[..., ApiServer], own_redis: EmbeddedRedis, workspace: Path
) -> None:
    # The stop was recorded, then Redis went away while the answer waited for the run to end: a 503 "try again
    # when it is back", whose retry was then refused ("already stopped").
    server = server_factory(env={"REDIS_URL": own_redis.url, "STOP_GRACE_SECONDS": "6", **QUICK_TO_GIVE_UP})
    start_running(server, workspace, "held", ignore_sigterm=True, hang_after_steps=1)
    answer: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: answer.append(server.http.post("/jobs/held/stop", timeout=60)))
    asking.start()
    wait_for(lambda: "stop_requested" in [e["type"] for e in server.http.get("/jobs/held/events").json()["events"]],
             what="the stop to be recorded")  # fmt: skip
    own_redis.stop()
    asking.join(60)
    r = answer[0]
    assert r.status_code == 200 and r.json()["status"] == "running", r.text
    assert "Stop requested" in r.json()["message"], r.text
    # Other requests meanwhile: a 503 that says when to try again.
    gone = server.http.get("/jobs")
    assert gone.status_code == 503 and gone.headers.get("Retry-After") == "5", (gone.headers, gone.text)


def test_stop_running_job_kills_the_whole_group_and_releases_gpus(server: ApiServer, workspace: Path) -> None:
    # (The progress shown lags the tqdm bar by one step: the bar of the last step has no line end yet.)
    job = start_running(server, workspace, "stopme", hang_after_steps=3, min_step=2)
    pid = job["pid"]
    assert group_members(pid), "the job's process group should be running"
    assert len(job_processes(job["output_dir"])) >= 3  # runner, swift launcher, trainer
    gpus = {g["index"]: g["job_id"] for g in server.http.get("/gpus").json()["gpus"]}
    assert gpus[job["gpu_ids"][0]] == "stopme"

    t0 = time.monotonic()
    r = server.http.post("/jobs/stopme/stop")
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "stopped" and "terminated" in r.json()["message"]
    assert elapsed < 3.0  # STOP_GRACE_SECONDS: SIGTERM was enough
    assert group_members(pid) == []
    # The runner records the stop, then leaves: nothing of the job is left a moment later.
    wait_for(lambda: job_processes(job["output_dir"]) == [], timeout=10, what="the runner to leave")
    assert all(g["job_id"] is None for g in server.http.get("/gpus").json()["gpus"])
    stopped = server.job("stopme")
    assert stopped["status"] == "stopped" and stopped["finished_at"] is not None
    # The follower's later view of the exit does not overwrite the recorded stop.
    wait_for(
        lambda: any(e["type"] == "status_stopped" for e in server.http.get("/jobs/stopme/events").json()["events"])
    )
    assert server.job("stopme")["status"] == "stopped"
    assert server.http.get("/jobs", params={"status": "stopped"}).json()["total"] == 1

    r = server.http.post("/jobs/stopme/stop")
    assert r.status_code == 409 and "stopped" in r.json()["detail"]
    r = server.http.post("/jobs/stopme/start")
    assert r.status_code == 409


def test_stop_ignoring_sigterm_is_killed_after_the_grace(server_factory: Callable[..., ApiServer],
                                                         workspace: Path) -> None:  # fmt: skip
    server = server_factory(env={"STOP_GRACE_SECONDS": "1.5"})
    job = start_running(server, workspace, "stubborn", ignore_sigterm=True, hang_after_steps=1)
    pid = job["pid"]
    t0 = time.monotonic()
    r = server.http.post("/jobs/stubborn/stop")
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "stopped" and "killed" in r.json()["message"]
    assert 1.5 <= elapsed < 10
    assert group_members(pid) == []
    wait_for(lambda: job_processes(job["output_dir"]) == [], timeout=10, what="the runner to leave")
    assert all(g["job_id"] is None for g in server.http.get("/gpus").json()["gpus"])
    assert server.job("stubborn")["status"] == "stopped"


def test_a_job_given_a_deleted_jobs_id_and_folder_writes_new_logs_beside_the_old(server: ApiServer,
                                                                                  workspace: Path) -> None:  # fmt: skip
    def run(steps: int) -> dict[str, Any]:
        body = job_body(workspace, "again", auto_start=True, training={"max_steps": steps})
        assert server.create(**body).status_code == 201
        return wait_for(
            lambda: (j := server.job("again"))["status"] == "completed" and j["export"]["status"] == "completed" and j,
            what="the run and its automatic export",
        )

    first = run(3)
    old_log, old_exit = Path(first["log_file"]), Path(first["log_file"]).with_suffix(".exit.json")
    kept = old_log.read_bytes(), old_exit.read_bytes()
    assert server.http.delete("/jobs/again").status_code == 204  # what it wrote on disk stays
    second = run(5)
    assert second["output_dir"] == first["output_dir"] and second["log_file"] != first["log_file"]
    assert (old_log.read_bytes(), old_exit.read_bytes()) == kept  # it was written over by the new run
    assert b"5/5" in Path(second["log_file"]).read_bytes()


def test_stop_of_pending_cancels_and_of_completed_is_409(server: ApiServer, workspace: Path) -> None:
    r = server.create(**job_body(workspace, "waiting"))
    assert r.json()["status"] == "pending"
    r = server.http.post("/jobs/waiting/stop")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert server.job("waiting")["status"] == "cancelled"
    assert server.http.post("/jobs/waiting/start").status_code == 409

    server.create(**job_body(workspace, "done", auto_start=True, training={"max_steps": 3}))
    server.wait_status("done", "completed")
    wait_for(lambda: server.job("done")["export"]["status"] == "completed", what="the automatic export")
    r = server.http.post("/jobs/done/stop")
    assert r.status_code == 409 and "completed" in r.json()["detail"]
    assert server.job("done")["status"] == "completed"


# ---- export on demand ---------------------------------------------------------------------------------------


def test_export_on_demand_twice_and_conflicts(server_factory: Callable[..., ApiServer], workspace: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    wrapper, gate = gated_swift(tmp_path)
    server = server_factory(env={"SWIFT_BIN": str(wrapper), "AUTO_EXPORT": "false"})

    # Nothing to export before a run has finished.
    server.create(**job_body(workspace, "fresh"))
    r = server.http.post("/jobs/fresh/export")
    assert r.status_code == 409 and "pending" in r.json()["detail"]

    server.create(**job_body(workspace, "exp", auto_start=True, training={"max_steps": 4, "save_steps": 2}))
    job = server.wait_status("exp", "completed")
    assert job["export"]["status"] == "none"  # AUTO_EXPORT=false
    last = job["last_checkpoint"]
    assert last.endswith("checkpoint-4")

    r = server.http.post("/jobs/exp/export")
    assert r.status_code == 200, r.text
    assert r.json()["export"]["status"] == "running" and r.json()["export"]["checkpoint"] == last
    assert "--exist_ok" not in r.json()["export"]["command"]
    # While it runs: a second export and a delete are refused.
    r2 = server.http.post("/jobs/exp/export")
    assert r2.status_code == 409 and "already running" in r2.json()["detail"]
    assert server.http.delete("/jobs/exp").status_code == 409
    assert server.job("exp")["export"]["status"] == "running"
    gate.touch()
    job = wait_for(lambda: (j := server.job("exp"))["export"]["status"] != "running" and j, what="the export")
    assert job["export"]["status"] == "completed", job["export"]
    merged = Path(f"{last}-merged")
    assert job["export"]["path"] == str(merged) and (merged / "model.safetensors").is_file()
    first_export_mtime = (merged / "model.safetensors").stat().st_mtime_ns

    # The same checkpoint again: swift needs --exist_ok true, and it works.
    r = server.http.post("/jobs/exp/export")
    assert r.status_code == 200, r.text
    assert r.json()["export"]["command"][-2:] == ["--exist_ok", "true"]
    job = wait_for(lambda: (j := server.job("exp"))["export"]["status"] != "running" and j, what="the 2nd export")
    assert job["export"]["status"] == "completed", job["export"]
    assert (merged / "model.safetensors").stat().st_mtime_ns >= first_export_mtime
    export_log = server.http.get("/jobs/exp/logs", params={"kind": "export"}).json()
    assert any("merged" in line for line in export_log["lines"])
    events = [e["type"] for e in server.http.get("/jobs/exp/events").json()["events"]]
    assert events.count("export_started") == 2 and events.count("export_completed") == 2


def test_stop_during_the_automatic_export_stops_the_export(server_factory: Callable[..., ApiServer],
                                                          workspace: Path, tmp_path: Path) -> None:  # fmt: skip
    wrapper, _gate = gated_swift(tmp_path)
    server = server_factory(env={"SWIFT_BIN": str(wrapper)})
    server.create(**job_body(workspace, "merging", auto_start=True, training={"max_steps": 2}))
    job = server.wait_status("merging", "completed")
    job = wait_for(lambda: (j := server.job("merging"))["export"]["pid"] and j, what="the export to start")
    assert job["export"]["status"] == "running"
    # A delete meanwhile is refused, and says how to end the export sooner (lifecycle audit: it offered no stop).
    r = server.http.delete("/jobs/merging")
    assert r.status_code == 409 and "POST .../jobs/merging/stop" in r.json()["detail"], r.text
    r = server.http.post("/jobs/merging/stop")
    assert r.status_code == 200 and r.json()["status"] == "completed" and "Export stopped" in r.json()["message"]
    job = wait_for(lambda: (j := server.job("merging"))["export"]["status"] != "running" and j, what="export end")
    assert job["export"]["status"] == "stopped" and job["status"] == "completed"
    assert group_members(job["export"]["pid"]) == []
    assert not Path(f"{job['last_checkpoint']}-merged").exists()


@pytest.mark.parametrize(("killed", "says"), [
    ("swift", "swift export was killed by signal 9 (SIGKILL"),  # as the OOM killer would
    # Its scheduler started the runner and saw how it ended; the error said only that it "died (pid N)".
    ("runner", "the export's runner was killed by signal 9 (SIGKILL"),
])  # fmt: skip
def test_an_export_killed_by_a_signal_nobody_asked_for_has_failed_and_says_which(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path, killed: str, says: str
) -> None:
    wrapper, _gate = gated_swift(tmp_path)
    server = server_factory(env={"SWIFT_BIN": str(wrapper)})
    server.create(**job_body(workspace, "oom", auto_start=True, training={"max_steps": 2}))
    server.wait_status("oom", "completed")
    job = wait_for(lambda: (j := server.job("oom"))["export"]["pid"] and j, what="the export to start")
    if killed == "swift":
        os.killpg(job["export"]["pid"], signal.SIGKILL)
    else:
        os.kill(job["export"]["runner"]["pid"], signal.SIGKILL)
    job = wait_for(lambda: (j := server.job("oom"))["export"]["status"] != "running" and j, what="export end")
    assert job["export"]["status"] == "failed", job["export"]
    assert says in job["export"]["error"], job["export"]
    assert group_members(job["export"]["pid"]) == []  # its swift export is gone either way


def test_an_export_whose_worker_was_killed_says_which_signal(server_factory: Callable[..., ApiServer],
                                                             workspace: Path, tmp_path: Path) -> None:  # fmt: skip
    # swift's launcher passes its worker's -9 to sys.exit: the export exits 247, and that is still a SIGKILL.
    wrapper = tmp_path / "oom-export-swift"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = export ]; then exit 247; fi\nexec "{FAKE_SWIFT}" "$@"\n')
    wrapper.chmod(0o755)
    server = server_factory(env={"SWIFT_BIN": str(wrapper)})
    server.create(**job_body(workspace, "oom2", auto_start=True, training={"max_steps": 2}))
    server.wait_status("oom2", "completed")
    job = wait_for(lambda: (j := server.job("oom2"))["export"]["status"] not in ("none", "running") and j,
                   what="the export's end")  # fmt: skip
    assert job["export"]["status"] == "failed", job["export"]
    assert job["export"]["error"] == ("swift export exited with code 247: it was killed by signal 9 (SIGKILL; often "
                                      "the kernel's OOM killer)"), job["export"]  # fmt: skip


def test_export_of_queued_job_is_409(server: ApiServer, workspace: Path) -> None:
    for name in ("hold0", "hold1"):
        start_running(server, workspace, name, hang_after_steps=1)
    r = server.create(**job_body(workspace, "waits"))
    assert r.status_code == 201 and r.json()["status"] == "queued"
    r = server.http.post("/jobs/waits/export")
    assert r.status_code == 409 and "queued" in r.json()["detail"]
    r = server.http.post("/jobs/hold0/export")
    assert r.status_code == 409 and "running" in r.json()["detail"]
    assert server.job("waits")["export"]["status"] == "none"


def test_stopped_job_with_a_checkpoint_can_be_exported(server_factory: Callable[..., ApiServer],
                                                       workspace: Path) -> None:  # fmt: skip
    server = server_factory(env={"AUTO_EXPORT": "false"})
    start_running(server, workspace, "partial", hang_after_steps=3, min_step=2, training={"save_steps": 2})
    wait_for(lambda: server.job("partial")["last_checkpoint"], what="a checkpoint")
    assert server.http.post("/jobs/partial/stop").json()["status"] == "stopped"
    r = server.http.post("/jobs/partial/export")
    assert r.status_code == 200, r.text
    job = wait_for(lambda: (j := server.job("partial"))["export"]["status"] != "running" and j)
    assert job["export"]["status"] == "completed"
    assert job["export"]["path"].endswith("checkpoint-2-merged") and Path(job["export"]["path"]).is_dir()


def test_a_trainer_killed_by_a_signal_says_so(server: ApiServer, workspace: Path) -> None:
    job = start_running(server, workspace, "oomed", hang_after_steps=2, min_step=1)
    trainer = wait_for(lambda: next((p for p in job_processes(job["output_dir"])
                                     if "--fake-swift-trainer" in (p.info["cmdline"] or [])), None),
                       what="the trainer process")  # fmt: skip
    trainer.send_signal(signal.SIGKILL)  # what the kernel's OOM killer does
    failed = server.wait_status("oomed", "failed")
    # swift's launcher exits with its child's -9 through sys.exit: status 247.
    assert "killed by signal 9 (SIGKILL; often the kernel's OOM killer)" in failed["error_message"], failed
    assert "{'loss'" not in failed["error_message"]


def test_an_output_folder_a_symlink_took_out_of_output_root_after_the_create_gets_nothing(
    server: ApiServer, workspace: Path
) -> None:
    outside = workspace / "elsewhere"
    outside.mkdir()
    assert server.create(**job_body(workspace, "relinked")).json()["status"] == "pending"
    out = Path(server.job("relinked")["output_dir"])
    out.symlink_to(outside, target_is_directory=True)  # made on the host after the create's check
    assert server.http.post("/jobs/relinked/start").status_code == 200
    failed = server.wait_status("relinked", "failed")
    assert failed["error_code"] == "output_dir", failed
    assert "outside OUTPUT_ROOT" in failed["error_message"] and "create the job again" in failed["error_message"]
    assert list(outside.iterdir()) == []  # no log, no launch spec, no checkpoint
    assert all(g["job_id"] is None for g in server.http.get("/gpus").json()["gpus"])
