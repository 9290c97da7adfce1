"""Export options over HTTP: a chosen checkpoint, a named output, several exports kept, clear refusals."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from application.exceptions import Invalid
from application.models.job_request import TrainingParams
from application.models.training_model import ExportInfo, ExportStatus, Job, JobStatus
from application.services import export_control
from application.services.exports import (
    EXPORTS_KEPT,
    as_they_stand,
    export_log,
    name_taken,
    put_export,
    record_auto_export,
    settle,
    while_running,
)
from application.services.job_store import JobStore
from application.services.keys import Keys
from tests.conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, KEYS_SETTING, ApiServer, auth, job_body, wait_for


def test_export_of_a_chosen_checkpoint_into_a_named_folder_keeps_every_export(server: ApiServer,
                                                                              workspace: Path) -> None:  # fmt: skip
    training = {"max_steps": 20, "save_steps": 5, "save_total_limit": 10}
    assert server.create(**job_body(workspace, "exp", auto_start=True, training=training)).status_code == 201
    job = wait_for(lambda: (j := server.job("exp"))["status"] == "completed" and j["export"]["status"] == "completed"
                   and j, what="the run and its automatic export")  # fmt: skip
    run = Path(job["run_dir"])
    assert job["export"]["checkpoint"] == str(run / "checkpoint-20")

    r = server.http.post("/jobs/exp/export", json={"checkpoint": "checkpoint-10", "output_name": "ten"})
    assert r.status_code == 200, r.text
    command = r.json()["export"]["command"]
    assert command[command.index("--adapters") + 1] == str(run / "checkpoint-10")
    assert command[command.index("--output_dir") + 1] == str(Path(job["output_dir"]) / "exports" / "ten")
    job = wait_for(lambda: (j := server.job("exp"))["export"]["status"] != "running" and j, what="the export")
    assert job["export"]["status"] == "completed", job["export"]
    target = Path(job["output_dir"]) / "exports" / "ten"
    assert job["export"]["path"] == str(target) and (target / "config.json").is_file()

    # By its path as GET .../checkpoints lists it, too; the default output sits next to the checkpoint.
    listed = [c["path"] for c in server.http.get("/jobs/exp/checkpoints").json()["checkpoints"]]
    assert str(run / "checkpoint-5") in listed
    assert server.http.post("/jobs/exp/export", json={"checkpoint": str(run / "checkpoint-5")}).status_code == 200
    wait_for(lambda: server.job("exp")["export"]["status"] == "completed", what="the third export")
    assert (run / "checkpoint-5-merged" / "config.json").is_file()

    exports = server.http.get("/jobs/exp/exports").json()["exports"]
    assert [Path(e["checkpoint"]).name for e in exports] == ["checkpoint-20", "checkpoint-10", "checkpoint-5"]
    assert [e["status"] for e in exports] == ["completed"] * 3 and exports[1]["output_dir"] == str(target)
    # Each export has its own log.
    assert len({e["log_file"] for e in exports}) == 3 and all(Path(e["log_file"]).is_file() for e in exports)
    # Each checkpoint merged is marked so (only the last export's was).
    marked = {Path(c["path"]).name for c in server.http.get("/jobs/exp/checkpoints").json()["checkpoints"]
              if c["exported"]}  # fmt: skip
    assert marked == {"checkpoint-5", "checkpoint-10", "checkpoint-20"}, marked


def test_wrong_export_requests_are_refused_saying_what_to_change(server: ApiServer, workspace: Path) -> None:
    training = {"max_steps": 10, "save_steps": 5}
    assert server.create(**job_body(workspace, "bad", auto_start=True, training=training)).status_code == 201
    wait_for(lambda: (j := server.job("bad"))["status"] == "completed" and j["export"]["status"] == "completed",
             what="the run and its automatic export")  # fmt: skip
    cases = [
        ({"checkpoint": "checkpoint-999"}, 422, "not one of job 'bad''s checkpoints"),
        ({"checkpoint": "../../../etc"}, 422, "not one of job 'bad''s checkpoints"),
        ({"checkpoint": "/etc/passwd"}, 422, "not one of job 'bad''s checkpoints"),
        ({"output_name": "../up"}, 422, "output_name"),
        ({"quant_bits": 4}, 422, "quant_bits needs quant_method"),
        ({"quant_method": "awq"}, 422, "needs quant_bits"),
        # Refused by bitsandbytes / AutoAWQ only once the export held a GPU, after its wait.
        ({"quant_method": "bnb", "quant_bits": 3}, 422, "quant_method bnb takes quant_bits 4 or 8, not 3"),
        ({"quant_method": "awq", "quant_bits": 8}, 422, "quant_method awq takes quant_bits 4, not 8"),
        ({"merge_lora": False}, 422, "nothing to export"),
        # (it ran with --merge_lora true regardless)
        ({"merge_lora": False, "quant_method": "bnb", "quant_bits": 4}, 422, "leave merge_lora out"),
        ({"merge": True}, 422, "unknown field"),
    ]
    for body, code, says in cases:
        r = server.http.post("/jobs/bad/export", json=body)
        assert r.status_code == code and says in r.json()["detail"], (body, r.text)
    assert server.http.post("/jobs/bad/export", json={"output_name": "once"}).status_code == 200
    wait_for(lambda: server.job("bad")["export"]["status"] == "completed", what="the named export")
    again = server.http.post("/jobs/bad/export", json={"output_name": "once"})
    assert again.status_code == 409 and "choose another" in again.json()["detail"]
    assert len(server.http.get("/jobs/bad/exports").json()["exports"]) == 2
    # Its checkpoints removed by hand: said so, not "has no checkpoint yet" (which sent users waiting).
    for checkpoint in server.job("bad")["checkpoints"]:
        shutil.rmtree(checkpoint)
    for body in ({}, {"quant_method": "bnb", "quant_bits": 4}):
        r = server.http.post("/jobs/bad/export", json=body)
        assert r.status_code == 409 and "checkpoints are no longer in its folder (2 recorded" in r.json()["detail"], (
            r.text
        )


def test_an_export_takes_only_the_jobs_own_checkpoints_not_those_an_earlier_job_left_in_its_folder(
    server: ApiServer, workspace: Path
) -> None:
    def run(training: dict[str, Any]) -> dict[str, Any]:
        assert server.create(**job_body(workspace, "a1", auto_start=True, training=training)).status_code == 201
        return wait_for(lambda: (j := server.job("a1"))["status"] == "completed" and j["export"]["status"] ==
                        "completed" and j, what="the run and its automatic export")  # fmt: skip

    earlier = run({"max_steps": 6, "save_steps": 3})
    assert server.http.delete("/jobs/a1").status_code == 204  # its folder, with its checkpoints, stays
    run({"max_steps": 4, "save_steps": 2})  # the same id and folder
    listed = [Path(c["path"]).name for c in server.http.get("/jobs/a1/checkpoints").json()["checkpoints"]]
    assert listed == ["checkpoint-2", "checkpoint-4"]
    for wanted in ("checkpoint-6", str(Path(earlier["run_dir"]) / "checkpoint-3")):
        for extra in ({}, {"quant_bits": 4, "quant_method": "awq"}):
            r = server.http.post("/jobs/a1/export", json={"checkpoint": wanted, **extra})
            assert r.status_code == 422 and "not one of job 'a1''s checkpoints" in r.json()["detail"], (wanted, r.text)


def test_a_quantized_export_runs_as_a_gpu_job_of_its_own(server: ApiServer, workspace: Path) -> None:
    training = {"max_steps": 10, "save_steps": 5, "save_total_limit": 5}
    body = job_body(workspace, "q", auto_start=True, training=training)
    assert server.create(**body).status_code == 201
    job = wait_for(lambda: (j := server.job("q"))["status"] == "completed" and j["export"]["status"] == "completed"
                   and j, what="the run and its automatic export")  # fmt: skip
    run = Path(job["run_dir"])
    r = server.http.post("/jobs/q/export", json={"checkpoint": "checkpoint-5", "quant_bits": 4, "quant_method": "awq"})
    assert r.status_code == 200, r.text
    assert "queued as job 'q-quant'" in r.json()["message"]
    assert (r.json()["export"]["status"], r.json()["export"]["job_status"]) == ("running", "queued")  # as listed
    target = Path(job["output_dir"]) / "exports" / "checkpoint-5-awq-int4"
    child = server.wait_status("q-quant", "completed")
    assert child["kind"] == "export" and child["export_of"] == "q" and len(child["gpu_ids"]) == 1
    # Its end is an export's, not a training's.
    events = server.http.get("/jobs/q-quant/events").json()["events"]
    assert [e["message"] for e in events if e["type"] == "status_completed"] == ["export completed"], events
    # The job it exports says so too.
    told = [e for e in server.http.get("/jobs/q/events").json()["events"] if e["data"].get("job_id") == "q-quant"]
    assert [e["type"] for e in told] == ["export_started", "export_completed"], told
    # Lists (and webhooks, which send the list entry) tell an export's job from a training run, and whose it is.
    listed = next(j for j in server.http.get("/jobs").json()["jobs"] if j["job_id"] == "q-quant")
    assert (listed["kind"], listed["export_of"]) == ("export", "q")
    argv = child["command"]
    assert argv[1:4] == ["export", "--adapters", str(run / "checkpoint-5")]
    assert argv[argv.index("--quant_method") + 1] == "awq" and argv[argv.index("--quant_bits") + 1] == "4"
    assert argv[argv.index("--dataset") + 1] == body["data_path"]  # awq calibrates on the job's own data
    assert argv[argv.index("--output_dir") + 1] == str(target) and (target / "config.json").is_file()
    exports = server.http.get("/jobs/q/exports").json()["exports"]
    quant = [e for e in exports if e["job_id"] == "q-quant"]
    assert len(quant) == 1 and quant[0]["status"] == "completed" and quant[0]["path"] == str(target)
    assert quant[0]["quant_bits"] == 4 and quant[0]["quant_method"] == "awq"
    # The job's own page says so too: it showed the record as stored, running for ever.
    assert [e["status"] for e in server.job("q")["exports"] if e["job_id"] == "q-quant"] == ["completed"]
    # The export job neither taught the predictions nor exported itself, and cannot be exported: it is said whose
    # checkpoints to export (it "had no checkpoint yet").
    assert server.job("q-quant")["export"]["status"] == "none"
    r = server.http.post("/jobs/q-quant/export", json={})
    assert r.status_code == 409 and "is an export of job 'q': it has no checkpoints" in r.json()["detail"], r.text
    again = server.http.post("/jobs/q/export", json={"checkpoint": "checkpoint-5", "quant_bits": 4,
                                                     "quant_method": "awq"})  # fmt: skip
    assert again.status_code == 409 and "name another with output_name" in again.json()["detail"]  # none was sent
    # Its job deleted (by its user, or by JOB_RETENTION_DAYS), the export keeps how it ended and where its model
    # is (it became "stopped: deleted before it ended", with no path), and its id is not given to the next one.
    assert server.http.delete("/jobs/q-quant").status_code == 204
    gone = [e for e in server.http.get("/jobs/q/exports").json()["exports"] if e["job_id"] == "q-quant"]
    assert (gone[0]["status"], gone[0]["path"], gone[0]["error"]) == ("completed", str(target), None), gone
    # A new job given that id since is not the export's (it could be another owner's).
    assert server.create(**job_body(workspace, "unrelated", job_id="q-quant")).status_code == 201
    still = [e for e in server.http.get("/jobs/q/exports").json()["exports"] if e["job_id"] == "q-quant"]
    assert still == gone, still
    r = server.http.post("/jobs/q/export", json={"checkpoint": "checkpoint-10", "quant_bits": 4, "quant_method": "awq"})
    assert r.status_code == 200 and "queued as job 'q-quant-2'" in r.json()["message"], r.text


def test_quantizing_a_job_whose_upload_was_deleted_needs_the_data_only_to_calibrate(
    server: ApiServer, workspace: Path
) -> None:
    rows = Path(job_body(workspace, "rows")["data_path"]).read_bytes()
    up = server.http.post("/files", files={"file": ("mine.jsonl", rows)})
    assert up.status_code == 201, up.text
    hook = "https://hooks.example.com/ml-team"
    body = job_body(workspace, "up", data_path=up.json()["id"], auto_start=True, webhook_url=hook,
                    training={"max_steps": 4, "save_steps": 2})  # fmt: skip
    assert server.create(**body).status_code == 201
    wait_for(lambda: (j := server.job("up"))["status"] == "completed" and j["export"]["status"] == "completed",
             what="the run and its automatic export")  # fmt: skip
    assert server.http.delete(f"/files/{up.json()['id']}").status_code == 204  # no active job uses it
    # awq calibrates on the job's data set: refused, saying why (it said "could not be stored: try again").
    r = server.http.post("/jobs/up/export", json={"quant_bits": 4, "quant_method": "awq"})
    assert r.status_code == 409 and "has been deleted" in r.json()["detail"] and "bnb" in r.json()["detail"], r.text
    # bnb reads no data: it runs, and its end goes to the job's own webhook as the export's end.
    r = server.http.post("/jobs/up/export", json={"quant_bits": 4, "quant_method": "bnb"})
    assert r.status_code == 200, r.text
    child = server.wait_status("up-quant", "completed")
    assert "--dataset" not in child["command"] and child["webhook_url"] == hook
    # An export whose job was deleted before it ran wrote nothing: its name is free again (it stayed taken).
    assert server.http.post("/queue/processor/stop").status_code == 200  # so that it waits
    again = {"quant_bits": 8, "quant_method": "bnb", "output_name": "again"}
    assert server.http.post("/jobs/up/export", json=again).status_code == 200
    assert server.job("up-quant-2")["status"] == "queued"
    assert server.http.delete("/jobs/up-quant-2").status_code == 204
    r = server.http.post("/jobs/up/export", json=again)
    assert r.status_code == 200 and "queued as job 'up-quant-3'" in r.json()["message"], r.text
    # Not ended while its job waits, and the record says it waits (it read as plainly "running").
    waiting = [e for e in server.http.get("/jobs/up/exports").json()["exports"] if e["job_id"] == "up-quant-3"]
    assert [(e["status"], e["job_status"]) for e in waiting] == [("running", "queued")]


def test_two_exports_never_write_into_one_folder_and_both_records_stay(tmp_path: Path) -> None:
    target = tmp_path / "exports" / "X"
    queued = ExportInfo(status=ExportStatus.RUNNING, export_id="q-quant", job_id="q-quant", output_dir=str(target))
    job = Job(job_id="j", status=JobStatus.COMPLETED, priority=5, owner=None, data_path="d", model_path="m",
              output_dir=str(tmp_path), output_dir_requested="j", num_gpus=1, training=TrainingParams(),
              created_at=0, updated_at=0, exports=[queued])  # fmt: skip
    assert name_taken(job, target)  # asked for, not written yet
    ended = queued.model_copy(update={"status": ExportStatus.FAILED})
    assert not name_taken(job.model_copy(update={"exports": [ended]}), target)  # it failed, nothing there
    target.mkdir(parents=True)
    assert name_taken(job.model_copy(update={"exports": []}), target)


async def completed_job(redis_client: Any) -> JobStore:
    """A store holding one completed job, "j", under a key prefix of its own."""
    store = JobStore(redis_client, Keys(f"exports-{time.time_ns()}"))
    job = Job(job_id="j", status=JobStatus.COMPLETED, priority=5, owner=None, data_path="d", model_path="m",
              output_dir="/out/j", output_dir_requested="j", num_gpus=1, training=TrainingParams(), created_at=0,
              updated_at=0)  # fmt: skip
    await store.create(job, message="created", actor="t")
    return store


async def test_a_merge_and_a_quantized_export_recorded_at_once_both_stay(redis_client: Any) -> None:
    store = await completed_job(redis_client)
    for n in range(10):
        merge = ExportInfo(status=ExportStatus.RUNNING, export_id=f"m{n}", checkpoint="c")
        quant = ExportInfo(status=ExportStatus.RUNNING, export_id=f"q{n}", job_id=f"j-quant-{n}", checkpoint="c")
        await asyncio.gather(put_export(store, "j", merge), put_export(store, "j", quant, current=False))
        await store.update("j", {"export": merge.model_copy(update={"status": ExportStatus.COMPLETED})})
    stored = await store.get("j")
    assert stored is not None
    ids = [e.export_id or "" for e in (*stored.exports, stored.export)]
    assert sorted(ids) == sorted([f"m{n}" for n in range(10)] + [f"q{n}" for n in range(10)]), ids


async def test_how_a_quantized_export_ended_is_an_event_of_the_job_it_exports(redis_client: Any) -> None:
    """A merge's end is on the job's events; a quantized export's was only on its own job's, so a user following
    the job (its events, its stream, the dashboard) never heard that the export failed."""
    store = await completed_job(redis_client)
    for n, to in enumerate((JobStatus.FAILED, JobStatus.COMPLETED, JobStatus.CANCELLED)):
        child = Job(job_id=f"j-quant-{n}", status=JobStatus.QUEUED, priority=5, owner=None, data_path="d",
                    model_path="m", output_dir=f"/out/j/exports/{n}", output_dir_requested="x", num_gpus=1,
                    training=TrainingParams(), created_at=n, updated_at=n, kind="export", export_of="j")  # fmt: skip
        await store.create(child, message="queued", actor="t")
        info = ExportInfo(status=ExportStatus.RUNNING, export_id=f"q{n}", job_id=child.job_id, checkpoint="c")
        await put_export(store, "j", info, current=False)
        if to != JobStatus.CANCELLED:
            await store.transition(child.job_id, JobStatus.RUNNING)
        await store.transition(child.job_id, to, message="exit code 1" if to == JobStatus.FAILED else "")
    events = await store.events("j", None, 100)
    ended = [(e.type, e.message, e.data["job_id"]) for e in events if e.type.startswith("export_")]
    assert ended == [
        ("export_failed", "quantized export job 'j-quant-0' failed: exit code 1", "j-quant-0"),
        ("export_completed", "quantized export job 'j-quant-1' completed", "j-quant-1"),
        ("export_stopped", "quantized export job 'j-quant-2' cancelled", "j-quant-2"),
    ], ended
    # A job that only names "j" (not in j's export list: another owner's job given the same id since) tells j
    # nothing.
    stray = Job(job_id="stray", status=JobStatus.QUEUED, priority=5, owner=None, data_path="d", model_path="m",
                output_dir="/out/stray", output_dir_requested="x", num_gpus=1, training=TrainingParams(), created_at=9,
                updated_at=9, kind="export", export_of="j")  # fmt: skip
    await store.create(stray, message="queued", actor="t")
    await store.transition("stray", JobStatus.FAILED, message="boom")
    assert len(await store.events("j", None, 100)) == len(events)


async def test_a_quantized_export_deleted_before_it_ended_is_said_so_one_that_ended_keeps_its_end(
    redis_client: Any,
) -> None:
    store = await completed_job(redis_client)
    for name in ("ended", "waiting"):
        info = ExportInfo(status=ExportStatus.RUNNING, export_id=name, job_id=f"j-{name}", checkpoint="c",
                          output_dir=f"/out/j/exports/{name}")  # fmt: skip
        await put_export(store, "j", info, current=False)
    for name, status in (("ended", JobStatus.COMPLETED), ("waiting", JobStatus.QUEUED)):
        end = 9.0 if name == "ended" else None
        quant = Job(job_id=f"j-{name}", status=status, priority=5, owner=None, data_path="d", model_path="m",
                    output_dir="/out/j", output_dir_requested="x", num_gpus=1, training=TrainingParams(), created_at=0,
                    updated_at=0, kind="export", export_of="j", finished_at=end)  # fmt: skip
        await settle(store, quant)  # as a delete or JOB_RETENTION_DAYS does before the record goes
    stored = await store.get("j")
    assert stored is not None
    shown = {e.export_id: e for e in await as_they_stand(store, stored)}  # (neither export job exists)
    assert (shown["ended"].status, shown["ended"].path, shown["ended"].finished_at) == (
        ExportStatus.COMPLETED, "/out/j/exports/ended", 9.0)  # fmt: skip
    assert shown["waiting"].status == ExportStatus.STOPPED and "deleted before it ended" in (
        shown["waiting"].error or ""
    )


async def test_what_is_written_about_an_export_lands_only_while_that_export_runs(redis_client: Any) -> None:
    """A stop aimed at export X stopped export Y (X ended and Y was asked for in between); a watchdog that read X
    before its runner recorded its end recorded it again, or wrote X's end over Y (Y then never ran)."""
    store = await completed_job(redis_client)
    x = ExportInfo(status=ExportStatus.RUNNING, export_id="x", checkpoint="c")
    await put_export(store, "j", x)
    # Meanwhile X's runner writes its pid: the write still lands, on the record as it is then.
    await store.update("j", {"export": x.model_copy(update={"pid": 123})})
    stop = {"export_stop_requested": True}
    assert (await while_running(store, "j", "x", lambda now: stop)) is not None
    assert (await store.get("j")).export_stop_requested  # type: ignore[union-attr]
    # X ends; Y is asked for (which clears the flag): what was meant for X writes nothing.
    await store.update("j", {"export": x.model_copy(update={"status": ExportStatus.COMPLETED})})
    assert await while_running(store, "j", "x", lambda now: stop) is None
    y = ExportInfo(status=ExportStatus.RUNNING, export_id="y", checkpoint="c")
    await put_export(store, "j", y)
    ended = x.model_copy(update={"status": ExportStatus.FAILED, "error": "late"})
    assert await while_running(store, "j", "x", lambda now: {"export": ended}) is None
    stored = await store.get("j")
    assert stored is not None and stored.export.export_id == "y" and stored.export.status == ExportStatus.RUNNING
    assert not stored.export_stop_requested and [e.export_id for e in stored.exports] == ["x"]


def test_without_a_gpu_a_quantized_export_is_refused(server_factory: Callable[..., ApiServer],
                                                     workspace: Path) -> None:  # fmt: skip
    server = server_factory(env={"SIMULATED_GPUS": "0"})
    assert server.create(**job_body(workspace, "cpu", num_gpus=0, auto_start=True,
                                    training={"max_steps": 4, "save_steps": 2})).status_code == 201  # fmt: skip
    server.wait_status("cpu", "completed")
    r = server.http.post("/jobs/cpu/export", json={"quant_bits": 8, "quant_method": "bnb"})
    assert r.status_code == 422 and "this server has none" in r.json()["detail"]


def test_an_export_past_the_kept_records_gets_a_log_of_its_own(tmp_path: Path) -> None:
    # A job's record keeps its last EXPORTS_KEPT exports; the logs of all of them are on disk.
    logs = tmp_path / "logs"
    logs.mkdir()
    kept = [ExportInfo(status=ExportStatus.COMPLETED, log_file=str(logs / f"j.export-{n}.log")) for n in range(2, 52)]
    for info in kept:
        Path(info.log_file or "").write_text("an earlier export's output\n")
    (logs / "j.export.log").write_text("the first export's output\n")
    job = Job(job_id="j", status=JobStatus.COMPLETED, priority=5, data_path="d", model_path="m", num_gpus=0,
              output_dir=str(tmp_path), output_dir_requested="j",
              training=TrainingParams(), created_at=0, updated_at=0, exports=kept[-EXPORTS_KEPT:],
              export=ExportInfo(status=ExportStatus.COMPLETED, log_file=str(logs / "j.export-52.log")))  # fmt: skip
    (logs / "j.export-52.log").write_text("the last export's output\n")
    assert export_log(job) == logs / "j.export-53.log"
    # A kept export whose runner never started has a record and no log yet: its name is taken too.
    job.exports[-1] = job.exports[-1].model_copy(update={"log_file": str(logs / "j.export-53.log")})
    assert export_log(job) == logs / "j.export-54.log"


async def test_an_export_stopped_before_any_scheduler_launched_it_never_runs(app_factory: Callable[..., Any],
                                                                              tmp_path: Path) -> None:  # fmt: skip
    from tests.conftest import make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    prefix = f"test-export-stop-{time.time_ns()}"  # one store for the three servers
    async with app_factory(REDIS_KEY_PREFIX=prefix, AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "early", auto_start=True, training={"max_steps": 4, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "early", lambda j: j["status"] == "completed")
    async with app_factory(REDIS_KEY_PREFIX=prefix, scheduler=False) as client:  # no scheduler runs
        asked = await client.post("/jobs/early/export")
        assert asked.status_code == 200 and "no scheduler is running" in asked.json()["message"], asked.text
        r = await client.post("/jobs/early/stop")
        assert r.status_code == 200 and "has not ended yet" in r.json()["message"], r.text
    async with app_factory(REDIS_KEY_PREFIX=prefix) as client:
        done = await wait_job(client, "early", lambda j: j["export"]["status"] != "running")
        export = done["export"]
        assert export["status"] == "stopped" and "before it started" in export["error"], export
        assert export["runner"] is None and not Path(export["log_file"]).exists()


def test_a_job_whose_run_named_no_folder_has_no_checkpoints_of_an_earlier_job(tmp_path: Path) -> None:
    from application.models.training_model import Attempt
    from application.services.checkpoints import own_checkpoints

    # An earlier job with this id and folder left a checkpoint; this one's run ended before swift named its
    # run folder (refused at parse time, or stopped while loading).
    (tmp_path / "v0-20261201-100000" / "checkpoint-5").mkdir(parents=True)
    job = Job(job_id="a1", status=JobStatus.FAILED, priority=5, data_path="d/x", model_path="m/x",
              output_dir=str(tmp_path), output_dir_requested="a1", num_gpus=1, training=TrainingParams(),
              created_at=0, updated_at=0,
              attempts=[Attempt(number=1, run_id="r1", started_at=1.0, outcome="failed")])  # fmt: skip
    assert own_checkpoints(job, tmp_path.parent) == []


async def test_a_name_asked_for_by_two_exports_at_once_goes_to_one_and_a_failed_ones_is_free(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A merge and a quantized export sent together into one output_name were both accepted (both saw it free),
    # and the name of a quantized export that ended without writing anything stayed taken for merges.
    from tests.conftest import make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "twice", auto_start=True, training={"max_steps": 4, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        full = job_body(
            tmp_path, "full", auto_start=True, training={"max_steps": 2, "save_steps": 2, "train_type": "full"}
        )
        assert (await client.post("/jobs", json=full)).status_code == 201
        await wait_job(client, "twice", lambda j: j["status"] == "completed")
        await wait_job(client, "full", lambda j: j["status"] == "completed")
        assert (await client.post("/queue/processor/stop")).status_code == 200  # quantized exports stay queued
        quant = {"output_name": "same", "quant_bits": 4, "quant_method": "bnb"}
        replies = await asyncio.gather(client.post("/jobs/twice/export", json={"output_name": "same"}),
                                       client.post("/jobs/twice/export", json=quant))  # fmt: skip
        assert sorted(r.status_code for r in replies) == [200, 409], [r.text for r in replies]
        assert "is taken" in next(r for r in replies if r.status_code == 409).json()["detail"]
        won = next(r for r in replies if r.status_code == 200).json()["export"]
        if won["job_id"]:  # the quantized one: cancelled, it holds the checkpoint's merged folder no longer
            assert (await client.post(f"/jobs/{won['job_id']}/stop")).json()["status"] == "cancelled"
        await wait_job(client, "twice", lambda j: j["export"]["status"] != "running")

        r = await client.post("/jobs/twice/export", json={**quant, "output_name": "later"})
        assert r.status_code == 200, r.text
        child = r.json()["export"]["job_id"]
        assert (await client.post(f"/jobs/{child}/stop")).json()["status"] == "cancelled"
        r = await client.post("/jobs/twice/export", json={"output_name": "later"})
        assert r.status_code == 200, r.text
        await wait_job(client, "twice", lambda j: j["export"]["status"] != "running")

        # swift's quantized export merges into <checkpoint>-merged first, or takes what that folder holds: while
        # one waits, neither a merge into that folder nor another quantized export of the checkpoint may start.
        q1 = await client.post("/jobs/twice/export", json={**quant, "output_name": "q1"})
        assert q1.status_code == 200, q1.text
        for other in ({}, {**quant, "output_name": "q2"}):
            r = await client.post("/jobs/twice/export", json=other)
            assert r.status_code == 409 and "checkpoint-4-merged" in r.json()["detail"], (other, r.text)
        assert (await client.post("/jobs/twice/export", json={"output_name": "elsewhere"})).status_code == 200
        # A full model's quantized exports merge nothing: two of one checkpoint may wait at once.
        for method in ({"quant_bits": 4, "quant_method": "bnb"}, {"quant_method": "fp8"}):
            assert (await client.post("/jobs/full/export", json=method)).status_code == 200, method

        # Another request of the job holding its exports for longer than a request waits: a 503 (an Idempotency-Key
        # is then free for the retry the answer asks for, where a 409 was kept for 24 h).
        monkeypatch.setattr(export_control, "REQUEST_WAIT", 0.2)
        store = client.app.state.training.store
        await store.r.set(store.keys.export_request("twice"), "another worker", px=10_000)
        r = await client.post("/jobs/twice/export", json={"output_name": "busy"}, headers={"Idempotency-Key": "b-1"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        await store.r.delete(store.keys.export_request("twice"))
        await wait_job(client, "twice", lambda j: j["export"]["status"] != "running")
        r = await client.post("/jobs/twice/export", json={"output_name": "busy"}, headers={"Idempotency-Key": "b-1"})
        assert r.status_code == 200 and "idempotent-replayed" not in r.headers, r.text
        await wait_job(client, "twice", lambda j: j["export"]["status"] != "running")

        # A quantized export that ended does not hold <checkpoint>-merged for ever: its stored record says
        # running, and the automatic export of the checkpoint (a resumed run ending on it) was skipped for it.
        assert (await client.post("/queue/processor/start")).status_code == 200
        await wait_job(client, q1.json()["export"]["job_id"], lambda j: j["status"] == "completed")
        settings = client.app.state.settings
        assert await record_auto_export(store, settings, "twice", None) is not None


async def test_a_quantized_export_still_waiting_is_kept_past_the_kept_records(redis_client: Any) -> None:
    # Only the last EXPORTS_KEPT records stay: a quantized export waiting for GPUs behind 50 newer merges was
    # dropped, gone from GET .../exports while its job ran, and a merge of its checkpoint no longer refused. One
    # whose job has ended (or is gone) goes as any other: its stored record says running for ever.
    store = await completed_job(redis_client)
    for child, status in (("j-quant", JobStatus.QUEUED), ("j-quant-2", JobStatus.COMPLETED), ("j-quant-3", None)):
        if status is not None:
            job = Job(job_id=child, status=status, priority=5, owner=None, data_path="d", model_path="c",
                      output_dir=f"/out/j/exports/.{child}.job", output_dir_requested=child, num_gpus=1,
                      kind="export", export_of="j", training=TrainingParams(), created_at=0, updated_at=0)  # fmt: skip
            await store.create(job, message="queued", actor="t")
        record = ExportInfo(status=ExportStatus.RUNNING, export_id=child, job_id=child, checkpoint="c")
        await put_export(store, "j", record, current=False)
    for n in range(EXPORTS_KEPT + 5):
        merge = ExportInfo(status=ExportStatus.RUNNING, export_id=f"m{n}", checkpoint="c")
        await put_export(store, "j", merge)
        await store.update("j", {"export": merge.model_copy(update={"status": ExportStatus.COMPLETED})})
    stored = await store.get("j")
    assert stored is not None
    ids = [e.export_id for e in stored.exports]
    assert ids[0] == "j-quant" and len(ids) == EXPORTS_KEPT + 1 and ids[-1] == f"m{EXPORTS_KEPT + 3}", ids


def test_a_full_models_quantized_export_runs_again_into_its_own_folder(tmp_path: Path) -> None:
    # Paused or preempted after swift made --output_dir, a full model's export ran again without --exist_ok:
    # swift refuses an output folder that exists (FileExistsError).
    from application.models.job_request import ExportRequest
    from application.services.quant_exports import prepare_quant_job, quant_argv

    parent = Job(job_id="j", status=JobStatus.COMPLETED, priority=5, owner=None, data_path="d", model_path="m",
                 output_dir=str(tmp_path), output_dir_requested="j", num_gpus=1,
                 training=TrainingParams(train_type="full"), created_at=0, updated_at=0)  # fmt: skip
    argv = quant_argv("swift", parent, str(tmp_path / "checkpoint-4"),
                      ExportRequest(quant_method="bnb", quant_bits=4), tmp_path / "exports" / "x")  # fmt: skip
    assert argv[2:4] == ["--model", str(tmp_path / "checkpoint-4")]
    assert argv[argv.index("--exist_ok") + 1] == "true"
    # A full model has no adapter to merge: merge_lora false (which its plain export needs) is no reason to refuse.
    run = tmp_path / "out" / "j" / "v0-20261203-120000"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / "trainer_state.json").write_text("{}")
    ran = parent.model_copy(update={"output_dir": str(run.parent), "run_dir": str(run),
                                    "last_checkpoint": str(run / "checkpoint-4")})  # fmt: skip
    no_merge = ExportRequest(quant_method="bnb", quant_bits=4, merge_lora=False)
    _, info = prepare_quant_job(ran, no_merge, "swift", tmp_path / "out", "j-quant", 0.0)
    assert info.command and "--merge_lora" not in info.command
    with pytest.raises(Invalid, match="leave merge_lora out"):  # (an adapter's is merged to be quantized)
        prepare_quant_job(ran.model_copy(update={"training": TrainingParams()}), no_merge, "swift", tmp_path / "out",
                          "j-quant", 0.0)  # fmt: skip


async def test_a_paused_jobs_running_export_holds_back_its_resume_and_is_what_a_stop_stops(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Resumed while its export ran, the run's end found the export running and skipped the automatic export of
    # its last checkpoint: the job read exported, from an earlier one. A stop stopped the paused job instead.
    from tests.conftest import gated_swift, make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    wrapper, _gate = gated_swift(tmp_path)  # (never opened: the export runs until stopped)
    async with app_factory(SWIFT_BIN=str(wrapper)) as client:
        body = job_body(tmp_path, "p", auto_start=True, step_seconds=0.1, training={"max_steps": 60, "save_steps": 5})
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "p", lambda j: (j["progress"]["current_step"] or 0) >= 6)
        assert (await client.post("/jobs/p/pause")).json()["status"] == "paused"
        assert (await client.post("/jobs/p/export")).status_code == 200
        await wait_job(client, "p", lambda j: j["export"]["pid"] is not None)
        r = await client.post("/jobs/p/resume")
        assert r.status_code == 409 and "an export of job 'p' is running" in r.json()["detail"], r.text
        stopped = await client.post("/jobs/p/stop")
        assert stopped.status_code == 200 and "stays paused" in stopped.json()["message"], stopped.text
        job = (await client.get("/jobs/p")).json()
        assert job["status"] == "paused" and job["export"]["status"] == "stopped", (job["status"], job["export"])
        assert (await client.post("/jobs/p/resume")).status_code == 200
        await client.post("/jobs/p/stop")


async def test_many_stops_of_an_export_at_once_add_one_event(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    # Each read the flag unset and wrote its own "export stop requested" (review AK, as stops of a run did).
    from tests.conftest import gated_swift, make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    wrapper, _gate = gated_swift(tmp_path)  # (never opened: the automatic export runs until stopped)
    async with app_factory(SWIFT_BIN=str(wrapper), STOP_GRACE_SECONDS=1) as client:
        body = job_body(tmp_path, "x", num_gpus=0, auto_start=True, training={"max_steps": 2, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "x", lambda j: j["export"]["status"] == "running" and j["export"]["pid"] is not None)
        answers = await asyncio.gather(*(client.post("/jobs/x/stop") for _ in range(8)))
        # A stop that comes once the export has ended (the first ones' grace can pass before a loaded machine gets
        # to the last) has nothing to stop.
        late = {"detail": "job 'x' is already completed: nothing to stop"}
        assert any(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert all(a.status_code == 200 or (a.status_code == 409 and a.json() == late) for a in answers), [
            a.text for a in answers
        ]
        await wait_job(client, "x", lambda j: j["export"]["status"] == "stopped")
        events = [e["type"] for e in (await client.get("/jobs/x/events")).json()["events"]]
        assert events.count("export_stop_requested") == 1, events


async def test_a_paused_quantized_export_resumed_says_it_runs_again_not_that_training_starts_over(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    from tests.conftest import gated_swift, make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    wrapper, gate = gated_swift(tmp_path)  # (the export waits at the gate: it is running when paused)
    async with app_factory(SWIFT_BIN=str(wrapper), AUTO_EXPORT=False) as client:
        await quantizing(client, tmp_path, "e")
        assert (await client.post("/jobs/e-quant/pause")).json()["status"] == "paused"
        r = await client.post("/jobs/e-quant/resume")
        assert r.status_code == 200, r.text
        assert r.json()["message"] == "The export runs again from its start (swift export does not resume)", r.text
        gate.touch()
        await wait_job(client, "e-quant", lambda j: j["status"] == "completed")


async def test_a_jobs_record_is_kept_the_retention_from_its_last_exports_end(app_factory: Callable[..., Any],
                                                                             tmp_path: Path) -> None:  # fmt: skip
    # Exported when its record was about to expire, the job was removed within a minute of the export's end.
    from tests.conftest import make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    retention = 3.0
    async with app_factory(JOB_RETENTION_DAYS=retention / 86400, AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "old", auto_start=True, training={"max_steps": 4, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        done = await wait_job(client, "old", lambda j: j["status"] == "completed")
        wait_for(lambda: time.time() > done["finished_at"] + retention, timeout=10)  # past its retention
        assert (await client.post("/jobs/old/export", json={"output_name": "kept"})).status_code == 200
        await wait_job(client, "old", lambda j: j["export"]["status"] == "completed")
        watchdog = client.scheduler.watchdog
        assert await watchdog.retention.expire_old_jobs() == []
        assert (await client.get("/jobs/old")).status_code == 200
        # Who writes each named export folder: an entry per export, which nothing ever dropped (a soak's hash
        # grew by one for every named export, of jobs deleted or expired long ago).
        store = client.app.state.training.store
        claimed = [json.loads(v)["of"] for v in (await store.r.hgetall(store.keys.export_targets)).values()]
        assert claimed == ["old"]
        deadline = time.monotonic() + 20
        while not await watchdog.retention.expire_old_jobs():  # it still goes, the retention after the export's end
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert (await client.get("/jobs/old")).status_code == 404
        assert await store.r.hlen(store.keys.export_targets) == 0

        body = job_body(tmp_path, "deleted", auto_start=True, training={"max_steps": 2, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "deleted", lambda j: j["status"] == "completed")
        assert (await client.post("/jobs/deleted/export", json={"output_name": "kept"})).status_code == 200
        await wait_job(client, "deleted", lambda j: j["export"]["status"] == "completed")
        assert await store.r.hlen(store.keys.export_targets) == 1
        # A quantized export waiting for its GPU still writes its folder once its parent's record is gone.
        assert (await client.post("/queue/processor/stop")).status_code == 200
        quant = {"output_name": "q", "quant_bits": 4, "quant_method": "bnb"}
        answer = (await client.post("/jobs/deleted/export", json=quant)).json()
        child = answer["export"]["job_id"]
        # Not "it starts on a free GPU": nothing starts it while the processor is stopped (hunt AI).
        assert answer["message"].endswith("it waits: the queue processor is stopped: POST /queue/processor/start "
                                          "(or start the job explicitly)"), answer["message"]  # fmt: skip
        assert child and await store.r.hlen(store.keys.export_targets) == 2
        assert (await client.delete("/jobs/deleted")).status_code == 204
        held = await store.r.hgetall(store.keys.export_targets)
        assert [json.loads(v).get("job") for v in held.values()] == [child]


async def test_an_export_never_writes_through_a_symlink_out_of_the_jobs_folder(app_factory: Callable[..., Any],
                                                                               tmp_path: Path) -> None:  # fmt: skip
    # Asked for while no scheduler ran, then exports/ made a link out of the folder: the export wrote its model
    # there when a scheduler came (only the request was checked, and only for the folder itself).
    from tests.conftest import make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    prefix = f"test-export-escape-{time.time_ns()}"
    async with app_factory(REDIS_KEY_PREFIX=prefix, AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "esc", auto_start=True, training={"max_steps": 4, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        job = await wait_job(client, "esc", lambda j: j["status"] == "completed")
    outside = tmp_path / "outside"
    outside.mkdir()
    exports = Path(job["output_dir"]) / "exports"
    async with app_factory(REDIS_KEY_PREFIX=prefix, scheduler=False) as client:  # no scheduler runs
        asked = await client.post("/jobs/esc/export", json={"output_name": "out", "checkpoint": "checkpoint-4/"})
        assert asked.status_code == 200, asked.text  # (a trailing slash names the same folder)
        exports.symlink_to(outside, target_is_directory=True)
    async with app_factory(REDIS_KEY_PREFIX=prefix) as client:
        done = await wait_job(client, "esc", lambda j: j["export"]["status"] != "running")
        assert done["export"]["status"] == "failed" and "leads out of the job's folder" in done["export"]["error"]
        assert list(outside.iterdir()) == []
        again = await client.post("/jobs/esc/export", json={"output_name": "other"})
        assert again.status_code == 409 and "leads out of the job's folder" in again.json()["detail"], again.text


@pytest.mark.parametrize("quantized", [False, True])
async def test_an_export_never_loads_a_base_model_whose_folder_links_out_of_the_roots_since_the_create(
    app_factory: Callable[..., Any], tmp_path: Path, quantized: bool
) -> None:
    # swift export loads the base model (named in the checkpoint's args.json) to merge the adapter into: a file of
    # its folder replaced by a link since (out of MODEL_ROOTS, to another owner's checkpoint) was merged in, or
    # quantized by an export job of its own (a hunt; a review).
    from tests.conftest import make_model, wait_job

    model = make_model(tmp_path / "models" / "own")
    secret = tmp_path / "elsewhere" / "model.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(b"not this job's")
    async with app_factory(AUTO_EXPORT=False, MODEL_ROOTS=str(tmp_path / "models")) as client:
        body = {**job_body(tmp_path, "merge", auto_start=True, training={"max_steps": 2}), "model_path": str(model)}
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "merge", lambda j: j["status"] == "completed")
        (model / "model.safetensors").symlink_to(secret)
        ask = {"quant_method": "bnb", "quant_bits": 4} if quantized else None
        asked = await client.post("/jobs/merge/export", json=ask)
        assert asked.status_code == 200, asked.text
        if quantized:
            job = await wait_job(
                client, asked.json()["export"]["job_id"], lambda j: j["status"] not in ("queued", "running")
            )
            assert job["status"] == "failed" and job["error_code"] == "input_path", job
            error = job["error_message"]
        else:
            done = await wait_job(client, "merge", lambda j: j["export"]["status"] != "running")
            assert done["export"]["status"] == "failed", done["export"]
            assert not Path(done["export"]["checkpoint"] + "-merged").exists()
            error = done["export"]["error"]
        assert f"model_path {model} changed since the job was created" in error, error
        assert "leads outside MODEL_ROOTS" in error and str(secret) not in error


async def test_a_quantized_export_never_reads_or_writes_through_a_symlink_out_of_the_jobs_folder(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # A merge was checked for links out of the job's folder; a quantized export was not: with the job's
    # <checkpoint>-merged a link to another job's merged model, swift (which takes the model already merged there)
    # would quantize that model into this job's exports/; with exports/ a link out, it was taken, queued, took a
    # GPU and then failed saying to create the job again.
    from tests.conftest import make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    prefix = f"test-quant-escape-{time.time_ns()}"
    outside = tmp_path / "outside"
    (outside / "merged").mkdir(parents=True)
    async with app_factory(REDIS_KEY_PREFIX=prefix, AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "qe", auto_start=True, training={"max_steps": 4, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        job = await wait_job(client, "qe", lambda j: j["status"] == "completed")
        checkpoint = Path(job["run_dir"]) / "checkpoint-2"
        merged = Path(f"{checkpoint}-merged")
        merged.symlink_to(outside / "merged", target_is_directory=True)
        quant = {"checkpoint": "checkpoint-2", "quant_method": "bnb", "quant_bits": 4}
        r = await client.post("/jobs/qe/export", json=quant)
        assert r.status_code == 409 and f"{merged} leads out of the job's folder" in r.json()["detail"], r.text
        merged.unlink()
        exports = Path(job["output_dir"]) / "exports"
        exports.symlink_to(outside, target_is_directory=True)
        r = await client.post("/jobs/qe/export", json=quant)
        assert r.status_code == 409 and "leads out of the job's folder" in r.json()["detail"], r.text
        assert "create the job again" not in r.json()["detail"]
        exports.unlink()
    async with app_factory(REDIS_KEY_PREFIX=prefix, scheduler=False) as client:  # no scheduler runs
        r = await client.post("/jobs/qe/export", json=quant)
        assert r.status_code == 200, r.text
        merged.symlink_to(outside / "merged", target_is_directory=True)  # made after the ask, before its start
    async with app_factory(REDIS_KEY_PREFIX=prefix) as client:
        export_job = await wait_job(client, "qe-quant", lambda j: j["status"] not in ("queued", "running"))
        assert export_job["status"] == "failed", export_job
        assert f"{merged} leads out of the job's folder" in export_job["error_message"], export_job["error_message"]
        assert list((outside / "merged").iterdir()) == []


async def test_jobs_that_share_an_output_folder_never_export_into_one_folder_at_once(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Jobs that share an output folder share its exports/. Each job's checks saw only its own exports, so a merge
    # of one job and a quantized export of the other, still waiting, were both given exports/<name>.
    from tests.conftest import wait_job

    async with app_factory(AUTO_EXPORT=False) as client:
        training = {"max_steps": 4, "save_steps": 2}
        first = job_body(tmp_path, "first", auto_start=True, output_dir="shared", job_id="first", training=training)
        assert (await client.post("/jobs", json=first)).status_code == 201
        await wait_job(client, "first", lambda j: j["status"] == "completed")
        assert (await client.post("/queue/processor/stop")).status_code == 200  # its quantized export waits
        quant = {"output_name": "q", "quant_bits": 4, "quant_method": "bnb"}
        r = await client.post("/jobs/first/export", json=quant)
        assert r.status_code == 200, r.text
        child = r.json()["export"]["job_id"]
        second = job_body(tmp_path, "second", auto_start=True, output_dir="shared", job_id="second", training=training)
        assert (await client.post("/jobs", json=second)).status_code == 201
        await wait_job(client, "second", lambda j: j["status"] == "completed")
        r = await client.post("/jobs/second/export", json={"output_name": "q"})
        assert r.status_code == 409 and "another job in this output folder" in r.json()["detail"], r.text
        # Once that export is over (cancelled here, before it wrote anything), the folder is free for the other job.
        assert (await client.post(f"/jobs/{child}/stop")).json()["status"] == "cancelled"
        r = await client.post("/jobs/second/export", json={"output_name": "q"})
        assert r.status_code == 200, r.text
        # and that merge now holds it (the first job's own records know nothing of it).
        r = await client.post("/jobs/first/export", json=quant)
        assert r.status_code == 409, r.text


async def test_two_jobs_sharing_a_folder_asking_for_one_export_folder_at_once_get_one_each(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Both requests find the folder free; the claim is a compare-and-set, and a claim made moments ago counts
    # as writing before its export is recorded.
    from tests.conftest import wait_job

    async with app_factory(AUTO_EXPORT=False) as client:
        training = {"max_steps": 2, "save_steps": 2}
        for name in ("one", "two"):
            body = job_body(tmp_path, name, auto_start=True, output_dir="together", job_id=name, training=training)
            assert (await client.post("/jobs", json=body)).status_code == 201
            await wait_job(client, name, lambda j: j["status"] == "completed")
        assert (await client.post("/queue/processor/stop")).status_code == 200  # quantized exports wait
        quant = {"output_name": "x", "quant_bits": 4, "quant_method": "bnb"}
        replies = await asyncio.gather(client.post("/jobs/one/export", json={"output_name": "x"}),
                                       client.post("/jobs/two/export", json=quant))  # fmt: skip
        assert sorted(r.status_code for r in replies) == [200, 409], [r.text for r in replies]


async def test_an_export_recorded_just_before_redis_went_away_is_answered_as_asked(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    # Recorded, then Redis went away: the wake-up, the leader read and the request lock's release after it
    # answered 503 "try again", and the retry was refused: "an export of job ... is already running".
    from tests.conftest import QUICK_TO_GIVE_UP, make_model, wait_job
    from tests.redis_proxy import RedisProxy

    make_model(tmp_path / "models" / "tiny-qwen2")
    prefix = f"test-export-cut-{time.time_ns()}"
    async with app_factory(REDIS_KEY_PREFIX=prefix, AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "cut", auto_start=True, training={"max_steps": 4, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "cut", lambda j: j["status"] == "completed")
    proxy = RedisProxy(redis_url)
    try:
        async with app_factory(REDIS_KEY_PREFIX=prefix, REDIS_URL=proxy.url, scheduler=False,
                               **QUICK_TO_GIVE_UP) as client:  # fmt: skip
            proxy.cut_after(rb"export_started", lose_reply=False, down_seconds=3)
            asked = await client.post("/jobs/cut/export")
            assert proxy.fired.is_set()
            assert asked.status_code == 200 and "Redis went away" in asked.json()["message"], asked.text
    finally:
        proxy.close()
    async with app_factory(REDIS_KEY_PREFIX=prefix, AUTO_EXPORT=False) as client:
        done = await wait_job(client, "cut", lambda j: j["export"]["status"] not in ("running", "none"))
        assert done["export"]["status"] == "completed", done["export"]


@pytest.mark.parametrize("cut_by", ["stop", "full disk", "weights removed"])
async def test_a_checkpoint_whose_save_was_cut_short_is_not_exported(app_factory: Callable[..., Any],
                                                                     tmp_path: Path, cut_by: str) -> None:  # fmt: skip
    # A stop during swift's save leaves an empty checkpoint-N: an export of it (the default one too, when it was
    # the last) started, and then failed with swift's "is not an adapter". A full disk left an empty
    # adapter_config.json (PEFT writes it after the weights): listed complete, and exported (hunt BW).
    from tests.conftest import make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "cut", auto_start=True, training={"max_steps": 4, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        job = await wait_job(client, "cut", lambda j: j["status"] == "completed")
        last = Path(job["last_checkpoint"])
        assert last.name == "checkpoint-4"
        for f in last.iterdir():
            (shutil.rmtree if f.is_dir() else Path.unlink)(f)
        if cut_by == "full disk":
            (last / "adapter_config.json").touch()
        if cut_by == "weights removed":  # (by hand: a resume from it failed in swift, hunt CY)
            (last / "adapter_config.json").write_text('{"r": 8}')
            (last / "trainer_state.json").write_text("{}")
        listed = (await client.get("/jobs/cut/checkpoints")).json()["checkpoints"]
        complete = [(Path(c["path"]).name, c["complete"]) for c in listed]
        assert complete == [("checkpoint-2", True), ("checkpoint-4", False)], listed
        page = (await client.get("http://test/ui/jobs/cut")).text
        assert re.search(r"checkpoint-4</code></td>.*?<td>incomplete</td></tr>", page), page
        r = await client.post("/jobs/cut/export", json={"checkpoint": "checkpoint-4"})
        assert r.status_code == 409 and r.json()["detail"] == (
            f"{last} holds no whole LoRA adapter (adapter_config.json and its weights): its save was cut short, or its "
            "files were removed; "
            "export another checkpoint (GET .../checkpoints)"
        ), r.text
        quant = {"quant_bits": 4, "quant_method": "bnb"}
        r = await client.post("/jobs/cut/export", json={**quant, "checkpoint": "checkpoint-4"})
        assert r.status_code == 409 and "holds no whole LoRA adapter" in r.json()["detail"], r.text
        r = await client.post("/jobs/cut/export", json=quant)  # (a job of its own, for a GPU: cancelled)
        assert r.status_code == 200 and Path(r.json()["export"]["checkpoint"]).name == "checkpoint-2", r.text
        assert (await client.post(f"/jobs/{r.json()['export']['job_id']}/stop")).status_code == 200
        r = await client.post("/jobs/cut/export")
        assert r.status_code == 200 and Path(r.json()["export"]["checkpoint"]).name == "checkpoint-2", r.text
        done = await wait_job(client, "cut", lambda j: j["export"]["status"] != "running")
        assert done["export"]["status"] == "completed", done["export"]


def test_another_owner_cannot_use_up_a_jobs_export_ids_and_a_refused_one_leaves_no_claim(
    server_factory: Callable[..., ApiServer], workspace: Path, redis_url: str
) -> None:
    # Hunt BC: bob created (and cancelled) jobs q-quant, q-quant-2 ... q-quant-99, and no quantized export of
    # alice's q could be queued for 90 days; a refused export left its folder's claim in Redis for good; and the
    # 429 for alice's cap named the admin who asked.
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "MAX_QUEUED_PER_OWNER": "1", "AUTO_EXPORT": "false"})
    alice, bob, admin = auth(ALICE_KEY), auth(BOB_KEY), auth(ADMIN_KEY)
    body = job_body(workspace, "q", auto_start=True, training={"max_steps": 2, "save_steps": 2})
    assert server.http.post("/jobs", json=body, headers=alice).status_code == 201
    wait_for(lambda: server.http.get("/jobs/q", headers=alice).json()["status"] == "completed", what="q's run")
    for taken in ["q-quant", *(f"q-quant-{n}" for n in range(2, 10))]:
        assert server.http.post("/jobs", json=job_body(workspace, taken, job_id=taken), headers=bob).status_code == 201
        assert server.http.post(f"/jobs/{taken}/stop", headers=bob).status_code == 200
    assert server.http.post("/jobs", json=job_body(workspace, "waits"), headers=alice).status_code == 201  # her cap
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    claims = f"{server.prefix}:export_targets"
    before = r.hgetall(claims)
    quantize = {"checkpoint": "checkpoint-2", "quant_bits": 4, "quant_method": "bnb"}
    over = server.http.post("/jobs/q/export", json=quantize, headers=admin)
    assert over.status_code == 429 and over.json()["detail"].startswith("'alice' already has 1"), over.text
    assert r.hgetall(claims) == before
    assert server.http.post("/jobs/waits/stop", headers=alice).status_code == 200
    queued = server.http.post("/jobs/q/export", json=quantize, headers=alice)
    assert queued.status_code == 200, queued.text
    assert re.search(r"queued as job 'q-quant-[0-9a-f]{8}'", queued.json()["message"]), queued.text
    r.close()


async def test_a_jobs_record_is_kept_while_its_quantized_export_runs_and_the_retention_after_its_end(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Retention removed the job at its next sweep while its quantized export's job still ran (hunt BR): the
    # export's end then had no job to tell, and the record went before the README's "after its last export ends".
    from tests.conftest import gated_swift, make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    wrapper, gate = gated_swift(tmp_path)
    retention = 6.0
    async with app_factory(SWIFT_BIN=str(wrapper), JOB_RETENTION_DAYS=retention / 86400, AUTO_EXPORT=False) as client:
        await quantizing(client, tmp_path, "r")
        done = (await client.get("/jobs/r")).json()
        wait_for(lambda: time.time() > done["finished_at"] + retention, timeout=20)  # past its retention
        retention_of = client.scheduler.watchdog.retention
        assert await retention_of.expire_old_jobs() == []
        assert (await client.get("/jobs/r")).status_code == 200
        # Out of the oldest the sweep reads meanwhile: a hundred such jobs held back every one behind them (review BV).
        store = client.app.state.training.store
        assert "r" not in await store.expired(time.time() - retention, 100)
        gate.touch()
        quant = await wait_job(client, "r-quant", lambda j: j["status"] == "completed")
        assert quant["finished_at"] + retention > time.time() + 1, "a machine too slow to tell"
        assert "r" not in await retention_of.expire_old_jobs()  # kept the retention from the export's end
        assert (await client.get("/jobs/r")).status_code == 200
        deadline = time.monotonic() + 20
        while "r" not in await retention_of.expire_old_jobs():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)


async def test_a_quantized_exports_folder_claim_goes_with_its_job_once_its_parent_is_gone(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The parent deleted while its quantized export ran left the export's folder claimed, and nothing ever
    # dropped it: not the export job's end, nor its delete (hunt BR).
    from tests.conftest import gated_swift, make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    wrapper, gate = gated_swift(tmp_path)
    async with app_factory(SWIFT_BIN=str(wrapper), AUTO_EXPORT=False) as client:
        store = client.app.state.training.store
        await quantizing(client, tmp_path, "qp")
        assert (await client.delete("/jobs/qp")).status_code == 204
        claims = [json.loads(v) for v in (await store.r.hgetall(store.keys.export_targets)).values()]
        assert claims and all(c["job"] == "qp-quant" for c in claims), claims  # (it still writes there)
        gate.touch()
        await wait_job(client, "qp-quant", lambda j: j["status"] == "completed")
        assert (await client.delete("/jobs/qp-quant")).status_code == 204
        assert await store.r.hlen(store.keys.export_targets) == 0


async def quantizing(client: Any, tmp_path: Path, name: str) -> None:
    """A CPU job `name` run to its end, then its bnb export (a job of its own, `<name>-quant`) until it runs: behind
    a gated swift, it waits there until the gate is opened."""
    from tests.conftest import wait_job

    body = job_body(tmp_path, name, num_gpus=0, auto_start=True, training={"max_steps": 4, "save_steps": 2})
    assert (await client.post("/jobs", json=body)).status_code == 201
    await wait_job(client, name, lambda j: j["status"] == "completed")
    asked = {"checkpoint": "checkpoint-2", "quant_bits": 4, "quant_method": "bnb"}
    assert (await client.post(f"/jobs/{name}/export", json=asked)).status_code == 200
    await wait_job(client, f"{name}-quant", lambda j: j["status"] == "running")
