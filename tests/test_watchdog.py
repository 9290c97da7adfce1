"""The scheduler's watchdog over runs whose runner died: real processes, a real Redis, the in-process scheduler's
watchdog swept by hand (its loop is not started), jobs put in the state a dead runner leaves."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from application.models.training_model import ExportInfo, ExportStatus, JobStatus, RunnerInfo
from application.runner import CLAIMED
from application.services import launcher
from application.services import process_group as pg
from tests.conftest import ROOT, _until, job_body, make_model, wait_job

FIXTURES = ROOT / "tests" / "fixtures" / "swift"


def dead_runner() -> RunnerInfo:
    """A runner that has exited: a real process, ended and reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = pg.process_start_time(proc.pid)
    proc.wait()
    return RunnerInfo(host=socket.gethostname(), pid=proc.pid, start_time=start, launched_at=time.time() - 30)


async def running_with_dead_runner(client: httpx.AsyncClient, tmp_path: Path, name: str,
                                   swift: subprocess.Popen[bytes] | None = None, run_dir: str | None = None,
                                   **options: Any) -> None:  # fmt: skip
    """A job recorded running under run `run-<name>` whose runner died (having recorded `swift` when given)."""
    await client.post("/jobs", json=job_body(tmp_path, name, **options))
    fields: dict[str, Any] = {"run_id": f"run-{name}", "runner": dead_runner(), "started_at": time.time() - 30,
                              "run_dir": run_dir}  # fmt: skip
    if swift is not None:
        fields.update(pid=swift.pid, process_start_time=pg.process_start_time(swift.pid),
                      process_stamp=pg.process_stamp(swift.pid))  # fmt: skip
    await client.scheduler.store.transition(name, JobStatus.RUNNING, fields=fields)  # type: ignore[attr-defined]


def sleeper() -> subprocess.Popen[bytes]:
    """A live process that sleeps for ten minutes."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


async def completed_job(client: httpx.AsyncClient, tmp_path: Path, name: str) -> Any:
    """A job whose run completed under run `run-<name>` (as recorded); the store, to give it an export."""
    await client.post("/jobs", json=job_body(tmp_path, name))
    store = client.scheduler.store  # type: ignore[attr-defined]
    await store.transition(name, JobStatus.RUNNING, fields={"run_id": f"run-{name}"})
    await store.transition(name, JobStatus.COMPLETED)
    return store


def marked(run: str, tmp_path: Path, script: str = "sleep 600") -> subprocess.Popen[bytes]:
    """What swift leaves of the run `run`: a process group of its own, marked with the run."""
    return pg.spawn(["sh", "-c", script], {**os.environ, pg.RUN_MARK: run}, tmp_path, tmp_path / f"{run}.log")


async def test_swift_started_by_a_runner_that_died_before_recording_its_pid_is_stopped(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The runner starts swift before it can record its pid: killed in between, its swift would train on in a
    # session of its own, on GPUs the next job is given.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True) as client:
        await running_with_dead_runner(client, tmp_path, "early")
        swift = marked("run-early", tmp_path)
        await client.scheduler.watchdog.sweep()
        assert swift.wait(10) is not None  # stopped (the group had SIGTERM)
        job = (await client.get("/jobs/early")).json()
        assert job["status"] == "failed" and job["error_code"] == "runner_lost", job


async def test_a_running_record_this_version_cannot_read_does_not_stop_the_watch_over_the_others(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """One running job's record with a value a hand or another version wrote raised out of every sweep: no dead
    runner of anyone's was noticed (its GPUs held for good), nor an export watched, nor an old job expired."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True) as client:
        for name in ("odd", "early"):
            await running_with_dead_runner(client, tmp_path, name)
        store = client.scheduler.store
        await store.r.hset(store.keys.job("odd"), "num_gpus", json.dumps("one"))
        await client.scheduler.watchdog.sweep()
        job = (await client.get("/jobs/early")).json()
        assert job["status"] == "failed" and job["error_code"] == "runner_lost", job
        # Left as it is, for its owner or an operator to delete: this version cannot tell how its run stands.
        assert json.loads(await store.r.hget(store.keys.job("odd"), "status")) == "running"
        await client.scheduler.watchdog.sweep()


async def test_one_jobs_step_of_the_sweep_that_raises_does_not_stop_the_others(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's output this version could not read (a logging.jsonl value no number fits) raised out of the end
    of its dead runner's run at every sweep: no other dead runner was noticed, nor an export watched."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True) as client:
        for name in ("odd", "early"):
            await running_with_dead_runner(client, tmp_path, name)
        sweeper = client.scheduler.watchdog
        end = sweeper.runner_died

        async def failing_for_odd(job: Any) -> None:  # (the fault: whatever raises while ending that one run)
            if job.job_id == "odd":
                raise OverflowError("int too large to convert to float")
            await end(job)

        monkeypatch.setattr(sweeper, "runner_died", failing_for_odd)
        await sweeper.sweep()
        await sweeper.sweep()
        job = (await client.get("/jobs/early")).json()
        assert job["status"] == "failed" and job["error_code"] == "runner_lost", job
        assert (await client.get("/jobs/odd")).json()["status"] == "running"


async def test_a_process_of_a_dead_runners_run_in_a_session_of_its_own_is_stopped_too(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Only the recorded group was stopped: a child that had called setsid() trained on, on GPUs the next job got.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True) as client:
        swift, escaped = marked("run-leaky", tmp_path), marked("run-leaky", tmp_path)
        await running_with_dead_runner(client, tmp_path, "leaky", swift=swift)
        await client.scheduler.watchdog.sweep()
        assert swift.wait(10) is not None and escaped.wait(10) is not None
        job = (await client.get("/jobs/leaky")).json()
        assert job["status"] == "failed" and job["error_code"] == "runner_lost", job


async def test_a_run_whose_runner_was_never_launched_goes_back_to_the_queue_and_then_runs(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler moves a job to running, then launches its runner: one that died in between left a job with
    no runner, no swift and no log, which the next leader failed as 'runner_lost', though nothing had run."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True, SIMULATED_GPUS="1x80") as client:
        await client.post("/jobs", json=job_body(tmp_path, "orphan", step_seconds=0.01, training={"max_steps": 2}))
        log_file = tmp_path / "output" / "orphan" / "logs" / "orphan.train.log"
        scheduler = client.scheduler
        fields = {"run_id": "run-orphan", "runner": None, "started_at": time.time() - 30, "log_file": str(log_file)}
        await scheduler.store.transition("orphan", JobStatus.RUNNING, acquire_gpus=[0], fields=fields)
        # Its spec written: a scheduler that stalled before the launch may yet launch from it, so it goes too.
        spec = pg.launch_spec(log_file.parent, "orphan", "run-orphan")
        spec.parent.mkdir(parents=True)
        spec.write_text("{}")
        await scheduler.watchdog.sweep()
        job = (await client.get("/jobs/orphan")).json()
        assert job["status"] == "queued" and job["error_code"] is None, job
        assert not spec.exists()
        events = (await client.get("/jobs/orphan/events")).json()["events"]
        assert "never launched" in events[-1]["message"], events[-1]
        assert await scheduler.processor.run_pass() == ["orphan"]
        job = await wait_job(client, "orphan", lambda j: j["status"] != "running")
        assert job["status"] == "completed" and job["progress"]["current_step"] == 2, job
        # Started by a scheduler whose clock is 2 minutes ahead: lost once it has been seen for the grace, not
        # only once this host's clock reaches that start (its GPUs were held for the skew, with nothing running).
        monkeypatch.setattr(launcher, "RUNNER_START_GRACE", 1.0)
        await client.post("/jobs", json=job_body(tmp_path, "ahead", step_seconds=0.01, training={"max_steps": 2}))
        fields = {**fields, "run_id": "run-ahead", "started_at": time.time() + 120,
                  "log_file": str(tmp_path / "output" / "ahead" / "logs" / "ahead.train.log")}  # fmt: skip
        await scheduler.store.transition("ahead", JobStatus.RUNNING, acquire_gpus=[0], fields=fields)
        await scheduler.watchdog.sweep()
        assert (await client.get("/jobs/ahead")).json()["status"] == "running"  # within the grace
        deadline = time.monotonic() + 10
        while (await client.get("/jobs/ahead")).json()["status"] == "running":
            assert time.monotonic() < deadline, "a run stamped in the future was never found lost"
            await asyncio.sleep(0.2)
            await scheduler.watchdog.sweep()
        events = (await client.get("/jobs/ahead/events")).json()["events"]
        assert any("never launched" in e["message"] for e in events), [(e["type"], e["message"]) for e in events]
        # A runner that took its spec a moment ago (swift's log not made yet) was launched: the run is not given up.
        monkeypatch.setattr(launcher, "RUNNER_START_GRACE", 15.0)
        await client.post("/jobs", json=job_body(tmp_path, "taken", step_seconds=0.01, training={"max_steps": 2}))
        taken_log = tmp_path / "output" / "taken" / "logs" / "taken.train.log"
        fields = {**fields, "run_id": "run-taken", "started_at": time.time() - 30, "log_file": str(taken_log)}
        await scheduler.store.transition("taken", JobStatus.RUNNING, acquire_gpus=[0], fields=fields)
        taken_log.parent.mkdir(parents=True)
        Path(f"{pg.launch_spec(taken_log.parent, 'taken', 'run-taken')}{CLAIMED}").write_text("{}")
        await scheduler.watchdog.sweep()
        assert (await client.get("/jobs/taken")).json()["status"] == "running"
        # Asked to stop before its runner came: it ends stopped, and its spec goes too (it stayed, and a scheduler
        # that stalled before the launch could still start swift on GPUs given to the next job).
        await client.post("/jobs", json=job_body(tmp_path, "asked", step_seconds=0.01, training={"max_steps": 2}))
        asked_log = tmp_path / "output" / "asked" / "logs" / "asked.train.log"
        fields = {**fields, "run_id": "run-asked", "started_at": time.time() - 30, "log_file": str(asked_log),
                  "stop_requested": True}  # fmt: skip
        await scheduler.store.transition("asked", JobStatus.RUNNING, fields=fields)  # ("taken" holds the GPU)
        spec = pg.launch_spec(asked_log.parent, "asked", "run-asked")
        spec.parent.mkdir(parents=True)
        spec.write_text("{}")
        await scheduler.watchdog.sweep()
        assert (await client.get("/jobs/asked")).json()["status"] in ("stopped", "cancelled")
        assert not spec.exists()


async def test_a_run_that_trained_to_its_end_while_nobody_watched_is_completed_with_its_whole_history(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Its runner killed while no scheduler ran, swift trained on to its last step and end lines; the next leader
    recorded 'runner_lost' and kept the loss history the runner had written before it died (steps missing)."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True, AUTO_EXPORT=False) as client:
        run_dir = tmp_path / "output" / "ended" / "v0-20261126-155015"
        run_dir.mkdir(parents=True)
        shutil.copy(FIXTURES / "sft_success.logging.jsonl", run_dir / "logging.jsonl")
        await running_with_dead_runner(client, tmp_path, "ended", run_dir=str(run_dir))
        written = [{"step": 1, "loss": 8.264, "eval_loss": None, "learning_rate": 1e-4, "grad_norm": 0.6,
                    "epoch": 0.025, "time": time.time()}]  # fmt: skip
        await client.scheduler.store.add_history("ended", written)
        await client.scheduler.watchdog.sweep()
        await client.scheduler.watchdog.sweep()  # (a second sweep, or a second leader's, adds nothing)
        job = (await client.get("/jobs/ended")).json()
        assert job["status"] == "completed" and job["error_code"] is None, job
        history = (await client.get("/jobs/ended/progress", params={"history_limit": 100})).json()["history"]
        steps = [p["step"] for p in history if p.get("loss") is not None]
        assert steps == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20], steps
        assert [p["step"] for p in history if p.get("eval_loss") is not None] == [10, 20], history
        # One that stopped half way (its end lines written by swift's `finally`) is still lost.
        half = tmp_path / "output" / "half" / "v0-20261126-155015"
        half.mkdir(parents=True)
        lines = (FIXTURES / "sft_success.logging.jsonl").read_text().splitlines()
        (half / "logging.jsonl").write_text("\n".join(lines[:5]) + "\n")
        await running_with_dead_runner(client, tmp_path, "half", run_dir=str(half))
        await client.scheduler.watchdog.sweep()
        job = (await client.get("/jobs/half")).json()
        assert job["status"] == "failed" and job["error_code"] == "runner_lost", job
        # Retried: the steps up to the checkpoint it resumes from are kept (the next run starts after them; they
        # were left out, and lost for good), not those after it (trained again).
        again = tmp_path / "output" / "again" / "v0-20261126-155015"
        (again / "checkpoint-6").mkdir(parents=True)
        (again / "checkpoint-6" / "trainer_state.json").write_text("{}")
        (again / "logging.jsonl").write_text("\n".join(lines[:5]) + "\n")
        await running_with_dead_runner(client, tmp_path, "again", run_dir=str(again), max_retries=1)
        await client.scheduler.store.add_history("again", written)
        await client.scheduler.watchdog.sweep()
        job = (await client.get("/jobs/again")).json()
        assert job["status"] == "queued" and job["resume_from"] == str(again / "checkpoint-6"), job
        history = (await client.get("/jobs/again/progress", params={"history_limit": 100})).json()["history"]
        assert [p["step"] for p in history] == [1, 2, 4, 6], history


async def test_a_run_that_ended_unwatched_keeps_the_checkpoint_and_the_end_time_it_left(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Its runner died at checkpoint-10 while no scheduler ran; swift trained on to checkpoint-20 and exited, and
    the next leader recorded the end. The checkpoint the runner last saw won over logging.jsonl's, so the export
    merged a checkpoint from half the training; and the end was stamped when the scheduler came back."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True, AUTO_EXPORT=False) as client:
        ended = {}
        for name, exit_record in (("late", True), ("nofile", False)):
            run_dir = tmp_path / "output" / name / "v0-20261126-155015"
            for step in (10, 20):
                (run_dir / f"checkpoint-{step}").mkdir(parents=True)
                (run_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
            lines = (FIXTURES / "sft_success.logging.jsonl").read_text().replace(
                "/data/lab/out/v0-20261126-155015", str(run_dir))  # fmt: skip
            (run_dir / "logging.jsonl").write_text(lines)
            log_file = tmp_path / "output" / name / "logs" / f"{name}.train.log"
            log_file.parent.mkdir(parents=True)
            log_file.write_text((FIXTURES / "sft_success.stdout.txt").read_text())
            ended[name] = time.time() - 3600
            if exit_record:
                pg.write_exit_file(log_file.with_suffix(".exit.json"), 0)
                record = json.loads(log_file.with_suffix(".exit.json").read_text())
                log_file.with_suffix(".exit.json").write_text(json.dumps({**record, "finished_at": ended[name]}))
            else:
                os.utime(log_file, (ended[name], ended[name]))
            await client.post("/jobs", json=job_body(tmp_path, name))
            fields = {"run_id": f"run-{name}", "runner": dead_runner(), "started_at": time.time() - 7200,
                      "run_dir": str(run_dir), "log_file": str(log_file),
                      "last_checkpoint": str(run_dir / "checkpoint-10")}  # fmt: skip
            await client.scheduler.store.transition(name, JobStatus.RUNNING, fields=fields)
        await client.scheduler.watchdog.sweep()
        await client.scheduler.watchdog.sweep()  # (a second sweep adds nothing)
        for name in ended:
            job = (await client.get(f"/jobs/{name}")).json()
            assert job["status"] == "completed", job
            assert job["last_checkpoint"] == str(tmp_path / "output" / name / "v0-20261126-155015" / "checkpoint-20")
            assert abs(job["finished_at"] - ended[name]) < 1, (job["finished_at"], ended[name])
            # The checkpoint saved while no runner watched has its event, as the one the runner saw would have
            # (hunt AH: five saves in the log, two events).
            events = (await client.get(f"/jobs/{name}/events")).json()["events"]
            saved = [e["data"]["path"] for e in events if e["type"] == "checkpoint_saved"]
            assert saved == [job["last_checkpoint"]], events


async def swept_after_a_sigterm(app_factory: Callable[..., Any], tmp_path: Path, name: str,
                                asked: dict[str, Any] | None, **options: Any) -> Any:  # fmt: skip
    """The job `name` (created with `options`) after a sweep, its runner dead and its exit record saying swift
    ended by SIGTERM, with what the runner wrote it was asked (`asked`)."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True, AUTO_EXPORT=False) as client:
        log_file = tmp_path / "output" / name / "logs" / f"{name}.train.log"
        log_file.parent.mkdir(parents=True)
        log_file.write_text("")
        pg.write_exit_file(log_file.with_suffix(".exit.json"), -15, asked)
        await running_with_dead_runner(client, tmp_path, name, **options)
        await client.scheduler.store.update(name, {"log_file": str(log_file)})
        await client.scheduler.watchdog.sweep()
        return (await client.get(f"/jobs/{name}")).json()


@pytest.mark.parametrize(("asked", "status"), [({"stop": True}, "stopped"), ({"pause": True}, "paused"),
                                               (None, "queued")])  # fmt: skip
async def test_what_a_runner_ended_its_run_for_decides_the_end_when_the_record_no_longer_says_so(
    app_factory: Callable[..., Any], tmp_path: Path, asked: dict[str, Any] | None, status: str
) -> None:
    # Redis back from an older snapshot: the stop (or pause) its runner acted on is gone from the record, and the
    # run killed by that stop's SIGTERM was retried from the beginning, or failed "killed by signal 15" (hunt).
    job = await swept_after_a_sigterm(app_factory, tmp_path, "rolled", asked, max_retries=2)
    assert job["status"] == status, job


@pytest.mark.parametrize(("asked", "limit", "status", "code"), [
    ({"time_limit": True}, 3600, "failed", "time_limit"),  # its runner wrote that the limit stopped it
    (None, 20, "failed", "time_limit"),  # it ended 30 s after its start, past its 20 s limit
    ({"stop": True, "time_limit": True}, 20, "failed", "time_limit"),  # it outranks a request, as for the runner
    ({"stop": True}, 20, "stopped", None),  # a stop its runner acted on, its grace past the limit
    (None, 3600, "queued", None),  # a signal well within its limit: retried
])  # fmt: skip
async def test_a_run_whose_runner_died_in_its_time_limits_grace_fails_on_its_time_limit(
    app_factory: Callable[..., Any], tmp_path: Path, asked: dict[str, Any] | None, limit: int, status: str,
    code: str | None,
) -> None:  # fmt: skip
    # Its runner killed in the grace after the limit's SIGTERM: the launcher's -15 was all the record said, and
    # the run was retried as killed by a signal, with a fresh limit (hunt DK); with no retries left it failed
    # "killed by signal 15".
    job = await swept_after_a_sigterm(app_factory, tmp_path, "limited", asked, max_retries=2, time_limit=limit)
    assert (job["status"], job["error_code"]) == (status, code), job
    if code == "time_limit":
        assert "exceeded its time limit" in job["error_message"] and job["retries"] == 0, job


@pytest.mark.parametrize(("limit", "written_after", "status"), [
    (None, 1800, "queued"), (3600, 1800, "queued"), (3600, None, "queued"),  # died with its host within its limit
    (3600, 3700, "failed"),  # swift still wrote past its limit: the limit stopped it
])  # fmt: skip
async def test_a_run_that_died_with_its_host_is_judged_by_when_it_ended_not_when_it_was_found(
    app_factory: Callable[..., Any], tmp_path: Path, limit: int | None, written_after: int | None, status: str
) -> None:
    # Its host crashed 30 minutes into a 1-hour limit and came back 3 hours after the start: with no exit record,
    # "now" stood for the run's end, and it failed on its time limit instead of going back to the queue (review DL).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True, AUTO_EXPORT=False) as client:
        await client.post("/jobs", json=job_body(tmp_path, "rebooted", max_retries=2, time_limit=limit))
        started = time.time() - 3 * 3600
        log_file = tmp_path / "output" / "rebooted" / "logs" / "rebooted.train.log"
        log_file.parent.mkdir(parents=True)
        if written_after is not None:
            log_file.write_text("Train:  10%|#| 10/100 [00:30<01:30,  1.00it/s]\n")
            os.utime(log_file, (started + written_after, started + written_after))
        dead = dead_runner()
        runner = dead.model_copy(update={"start_time": started, "stamp": "an-earlier-boot/123456",
                                         "launched_at": started})  # fmt: skip
        await client.scheduler.store.transition("rebooted", JobStatus.RUNNING, fields={
            "run_id": "run-rebooted", "runner": runner, "started_at": started, "pid": dead.pid,
            "log_file": str(log_file) if written_after is not None else None})  # fmt: skip
        await client.scheduler.watchdog.sweep()
        job = (await client.get("/jobs/rebooted")).json()
        assert job["status"] == status, (job["status"], job["error_code"], job["error_message"])
        if status == "failed":
            assert job["error_code"] == "time_limit", job


async def test_a_stop_asked_while_the_watchdog_stops_another_run_decides_how_its_job_ends(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The watchdog spends up to STOP_GRACE_SECONDS on each dead runner's leftovers: a stop asked of the next
    # job meanwhile must not be lost to the state the sweep read before (recorded lost and retried).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True) as client:
        termed = tmp_path / "got-sigterm"
        stubborn = marked("run-stubborn", tmp_path, f'trap "touch {termed}" TERM; while :; do sleep 0.05; done')
        await running_with_dead_runner(client, tmp_path, "stubborn", swift=stubborn)
        await running_with_dead_runner(client, tmp_path, "second", max_retries=2)
        sweep = asyncio.create_task(client.scheduler.watchdog.sweep())
        await _until(termed.exists, timeout=10)  # the sweep is in the first job's grace
        stop = asyncio.create_task(client.post("/jobs/second/stop"))
        await sweep
        assert stubborn.wait(10) is not None  # killed after the grace
        assert (await stop).json()["status"] == "stopped"
        job = (await client.get("/jobs/second")).json()
        assert job["status"] == "stopped" and len(job["attempts"]) <= 1, job


async def test_an_export_that_swift_finished_after_its_runner_died_is_completed(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Its runner killed while Redis was down, swift export merged on to the end and said so in its log; with
    no exit status left, the export was recorded failed and its merged model went unlisted."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True) as client:
        store = await completed_job(client, tmp_path, "late")
        checkpoint = tmp_path / "output" / "late" / "v0-20261126-155015" / "checkpoint-20"
        merged = Path(f"{checkpoint}-merged")
        merged.mkdir(parents=True)
        (merged / "config.json").write_text("{}")
        log = tmp_path / "output" / "late" / "logs" / "late.export.log"
        log.parent.mkdir(parents=True)
        tail = (FIXTURES / "export_merge.stderr.txt").read_text().replace(
            "/data/lab/out/v0-20261126-155015/checkpoint-20", str(checkpoint))  # fmt: skip
        log.write_text(tail)
        export = ExportInfo(status=ExportStatus.RUNNING, export_id="exp-late", runner=dead_runner(),
                            checkpoint=str(checkpoint), log_file=str(log), started_at=time.time() - 30)  # fmt: skip
        await store.update("late", {"export": export}, exporting=True)
        await client.scheduler.watchdog.sweep()
        got = (await client.get("/jobs/late")).json()["export"]
        assert got["status"] == "completed" and got["path"] == str(merged), got


async def test_an_export_whose_runner_died_before_recording_swifts_pid_is_stopped(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The same window as a run's, for an export: its swift was left merging unwatched while the export was
    # recorded failed, and asking again put two exports into one folder.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True) as client:
        store = await completed_job(client, tmp_path, "merged")
        export = ExportInfo(status=ExportStatus.RUNNING, export_id="exp-merged", runner=dead_runner(),
                            started_at=time.time() - 30)  # fmt: skip
        await store.update("merged", {"export": export}, exporting=True)
        swift = marked("exp-merged", tmp_path)
        await client.scheduler.watchdog.sweep()
        assert swift.wait(10) is not None
        got = (await client.get("/jobs/merged")).json()["export"]
        assert got["status"] == "failed" and "runner died" in got["error"], got


async def test_an_export_that_ends_before_its_launch_is_recorded_stays_ended(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The scheduler wrote the record it read before the launch, plus the runner, after the runner had written
    the export's end: a completed export went back to running, for good (no export, stop or delete after it)."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "quick", auto_start=True, step_seconds=0.01, training={"max_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "quick", lambda j: j["status"] == "completed")
        launcher = client.scheduler.launcher
        launch, reap = launcher.launch, launcher.reap
        swept = asyncio.Event()
        launched = False

        async def stalled(*args: Any, **kwargs: Any) -> RunnerInfo:
            nonlocal launched
            runner = await launch(*args, **kwargs)
            # The scheduler stalls right after the launch, until the export has ended.
            await wait_job(client, "quick", lambda j: j["export"]["status"] == "completed")
            launched = True
            return runner

        def reaped() -> None:
            reap()
            if launched:
                swept.set()  # the sweep that launched it is over: the runner is recorded (or not) by now

        launcher.launch, launcher.reap = stalled, reaped
        assert (await client.post("/jobs/quick/export")).status_code == 200
        await asyncio.wait_for(swept.wait(), 60)
        export = (await client.get("/jobs/quick")).json()["export"]
        assert export["status"] == "completed" and export["finished_at"], export
        assert (await client.delete("/jobs/quick")).status_code == 204


async def test_a_sweep_that_read_an_export_before_it_was_handed_back_does_not_fail_it(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A runner whose host shuts down hands its export back (to run again under the next scheduler). A sweep that
    had read the export before that found the runner gone and recorded the export failed, from its old copy."""
    from application.models.job_request import TrainingParams
    from application.models.training_model import Job
    from application.services.exports import put_export, run_again

    async with app_factory(scheduler=False, lead=True) as client:
        store, watchdog = client.app.state.training.store, client.scheduler.watchdog
        job = Job(job_id="j", status=JobStatus.COMPLETED, priority=5, owner=None, data_path="d", model_path="m",
                  output_dir=str(tmp_path / "output" / "j"), output_dir_requested="j", num_gpus=1,
                  training=TrainingParams(), created_at=1.0, updated_at=1.0)  # fmt: skip
        await store.create(job, message="created", actor="t")
        # (a pid above Linux's pid_max: this host's runner is gone)
        gone = RunnerInfo(host=socket.gethostname(), pid=2**22 + 17, launched_at=time.time())
        running = ExportInfo(status=ExportStatus.RUNNING, export_id="x", checkpoint="c", command=["swift", "export"],
                             runner=gone)  # fmt: skip
        await put_export(store, "j", running)
        stale = await store.get("j")  # the sweep's read
        await store.update("j", {"export": run_again(running)})  # the runner hands it back
        assert stale is not None
        await watchdog.exports.watch(stale)
        export = (await client.get("/jobs/j")).json()["export"]
        assert export["status"] == "running" and export["runner"] is None, export  # the next sweep launches it


async def test_a_scheduler_that_lost_the_lead_kills_no_silent_runner(app_factory: Callable[..., Any],
                                                                     tmp_path: Path) -> None:  # fmt: skip
    # Hunt AY: a scheduler frozen mid-sweep (SIGSTOP) woke after a standby had taken the lead, judged a runner
    # by the heartbeats it read before its stall, and killed it: only the record of the end was fenced.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True, RUNNER_HEARTBEAT_TTL=1) as client:
        store, dog = client.scheduler.store, client.scheduler.watchdog
        await client.post("/jobs", json=job_body(tmp_path, "quiet"))
        runner = sleeper()  # alive, never beating
        try:
            info = RunnerInfo(host=socket.gethostname(), pid=runner.pid, start_time=pg.process_start_time(runner.pid),
                              stamp=pg.process_stamp(runner.pid), launched_at=time.time() - 30)  # fmt: skip
            await store.transition("quiet", JobStatus.RUNNING, fields={"run_id": "run-quiet", "runner": info,
                                                                        "started_at": time.time() - 30})  # fmt: skip
            await store.r.set(store.keys.leader, "7:another-scheduler")  # a standby leads now
            past = time.monotonic() + dog.silence.patience + 1
            while time.monotonic() < past:  # silent for longer than a leader waits before it kills
                await dog.sweep()
                await asyncio.sleep(0.2)
            assert runner.poll() is None, "a scheduler that no longer leads killed a runner"
            assert (await client.get("/jobs/quiet")).json()["status"] == "running"
        finally:
            runner.kill()
            runner.wait()


async def test_a_runner_that_beat_since_the_sweeps_read_is_not_killed(app_factory: Callable[..., Any],
                                                                      tmp_path: Path) -> None:  # fmt: skip
    # Hunt AY: a scheduler frozen between reading the heartbeats and judging them woke to kill a runner that had
    # beaten all along; the silence is read again right before the kill.
    async with app_factory(scheduler=False, lead=True, RUNNER_HEARTBEAT_TTL=1) as client:
        dog, cluster = client.scheduler.watchdog, client.scheduler.cluster
        runner = sleeper()
        try:
            info = RunnerInfo(host=socket.gethostname(), pid=runner.pid, start_time=pg.process_start_time(runner.pid),
                              stamp=pg.process_stamp(runner.pid), launched_at=time.time() - 30)  # fmt: skip

            def own(beat: dict[str, Any] | None) -> bool:
                return bool(beat and beat.get("run_id") == "run-b")

            since = time.monotonic()
            assert dog.silence.of("run-b", False) < 1  # first seen silent
            await _until(lambda: time.monotonic() - since > dog.silence.patience, timeout=30)
            # A beat lands after the sweep read none (the stall): the stale read is not acted on.
            await cluster.runner_tick("b", {"id": "run-b", "run_id": "run-b", "kind": "run"}, 5)
            assert not await dog.silence.killed("b", "run-b", info, False, own)
            assert runner.poll() is None
            assert dog.silence.of("run-b", False) < 1  # silent from now on, not from before the beat
        finally:
            runner.kill()
            runner.wait()
