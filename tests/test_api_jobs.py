"""The job endpoints against a real server process, real Redis and the fake `swift` as a real subprocess.

What a user sees over HTTP: create -> pending/running -> completed with progress, loss history, checkpoints
and the automatic export; the exact argv swift ran; job ids; failures; logs, events, list and delete.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKE_SWIFT, ApiServer, fake_dataset, job_body, make_model, wait_for, wait_job

MODEL_DIR = "models/tiny-qwen2"


def body(workspace: Path, name: str, **extra: Any) -> dict[str, Any]:
    """Output folders under output/, as the original system's example has them."""
    return job_body(workspace, name, output_dir=f"output/{name}", **extra)


def created(server: ApiServer, payload: dict[str, Any]) -> dict[str, Any]:
    r = server.create(**payload)
    assert r.status_code == 201, r.text
    return r.json()


def flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} not in {command}"
    return command[command.index(name) + 1]


def logging_losses(run_dir: str) -> list[float]:
    rows = [json.loads(line) for line in Path(run_dir, "logging.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["loss"]) for r in rows if "loss" in r]


# ---- the happy path ----------------------------------------------------------------------------------------


def test_create_pending_start_complete_progress_checkpoint_and_auto_export(server: ApiServer, workspace: Path) -> None:
    r = server.create(**body(workspace, "training_001"))
    assert r.status_code == 201, r.text
    assert r.json() == {"job_id": "training_001", "status": "pending", "message": r.json()["message"],
                        "queue_position": None, "estimated_wait_time": None, "pending_reason": None,
                        "predicted_duration": {"seconds": None, "source": None}, "gpu_ids": None}  # fmt: skip
    assert r.json()["message"]
    assert server.job("training_001")["status"] == "pending"
    assert server.http.get("/jobs/training_001/status").json()["status"] == "pending"

    started = server.http.post("/jobs/training_001/start")
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "running"
    assert len(started.json()["gpu_ids"]) == 1

    job = server.wait_status("training_001", "completed")
    assert job["exit_code"] == 0 and job["error_message"] is None
    assert job["started_at"] <= job["finished_at"]

    # The exact argv: 4.x tuner flag, local model -> --check_model false, text model -> no --vit_lr, GPU -> bf16.
    cmd = job["command"]
    assert cmd[:2] == [str(FAKE_SWIFT), "sft"]
    assert flag(cmd, "--tuner_type") == "lora" and "--train_type" not in cmd
    assert flag(cmd, "--check_model") == "false"
    assert "--vit_lr" not in cmd and "--aligner_lr" not in cmd
    assert flag(cmd, "--torch_dtype") == "bfloat16"
    assert flag(cmd, "--model") == str(workspace / MODEL_DIR)
    # Relative output_dirs resolve under OUTPUT_ROOT.
    assert flag(cmd, "--output_dir") == job["output_dir"] == str(server.output_root / "output" / "training_001")
    assert job["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(str(i) for i in job["gpu_ids"])
    assert job["gpu_ids"] == started.json()["gpu_ids"]

    # Progress from the run: 20 steps (the fake's default), loss history equal to what swift logged.
    prog = server.http.get("/jobs/training_001/progress").json()
    assert prog["status"] == "completed"
    assert prog["progress"]["current_step"] == prog["progress"]["max_steps"] == 20
    losses = [p["loss"] for p in prog["history"] if p["loss"] is not None]
    assert losses == pytest.approx(logging_losses(job["run_dir"]), rel=1e-3)
    assert len(losses) >= 4
    assert [p["step"] for p in prog["history"]] == sorted(p["step"] for p in prog["history"])
    assert prog["train_loss"] is not None and prog["train_runtime"] is not None
    # The step's other numbers (token_acc here; rewards/* for DPO) under metrics: they were dropped.
    train = [p for p in prog["history"] if p["loss"] is not None]
    assert all(0 <= p["metrics"]["token_acc"] <= 1 for p in train), train[:2]

    last = prog["last_checkpoint"]
    assert last and last.endswith("checkpoint-20") and Path(last).is_dir()
    assert last in prog["checkpoints"] and last.startswith(job["run_dir"])
    assert (Path(last) / "adapter_model.safetensors").is_file()

    # Automatic export after success: <checkpoint>-merged on disk.
    job = wait_for(lambda: (j := server.job("training_001"))["export"]["status"] in ("completed", "failed") and j,
                   what="the automatic export")  # fmt: skip
    assert job["export"]["status"] == "completed", job["export"]
    assert job["export"]["path"] == f"{last}-merged"
    assert (Path(last + "-merged") / "model.safetensors").is_file()
    assert job["export"]["command"][1:5] == ["export", "--adapters", last, "--merge_lora"]
    # The status endpoint agrees with the detail.
    st = server.http.get("/jobs/training_001/status").json()
    assert st["status"] == "completed" and st["export"]["status"] == "completed"
    assert st["duration_seconds"] == pytest.approx(job["finished_at"] - job["started_at"])
    events = [e["type"] for e in server.http.get("/jobs/training_001/events").json()["events"]]
    for kind in ("created", "status_running", "checkpoint_saved", "status_completed", "export_started",
                 "export_completed"):  # fmt: skip
        assert kind in events, events
    assert events.index("status_running") < events.index("status_completed") < events.index("export_completed")


def test_auto_start_runs_at_once_and_cpu_job_uses_float32(server: ApiServer, workspace: Path) -> None:
    r = created(server, body(workspace, "auto", auto_start=True))
    assert r["job_id"] == "auto" and r["status"] == "running"
    assert r["gpu_ids"] == [0] and r["message"] == "Training started on GPUs [0]"
    cpu = created(server, body(workspace, "cpu", auto_start=True, num_gpus=0))
    assert cpu["status"] == "running" and cpu["gpu_ids"] == []
    job = server.wait_status("auto", "completed")
    assert flag(job["command"], "--torch_dtype") == "bfloat16"
    # num_gpus 0: float32 (the fake, like real swift, fails bf16 without a GPU) and no visible GPU.
    cpu_job = server.wait_status("cpu", "completed", "failed")
    assert cpu_job["status"] == "completed", cpu_job["error_message"]
    assert flag(cpu_job["command"], "--torch_dtype") == "float32"
    assert cpu_job["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert cpu_job["gpu_ids"] == []


def test_multimodal_model_gets_vit_lr_and_overrides_reach_the_command(server: ApiServer, workspace: Path) -> None:
    vl = make_model(workspace / "models" / "tiny-vl",
                    {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "vision_config": {}})  # fmt: skip
    payload = body(workspace, "vl", auto_start=True, model_path=str(vl),
                   training={"max_steps": 6, "logging_steps": 2, "save_steps": 3, "lora_rank": 8})  # fmt: skip
    created(server, payload)
    job = server.wait_status("vl", "completed")
    cmd = job["command"]
    assert flag(cmd, "--vit_lr") == "1e-05" and flag(cmd, "--aligner_lr") == "1e-05"
    assert flag(cmd, "--max_steps") == "6" and flag(cmd, "--lora_rank") == "8"
    prog = server.http.get("/jobs/vl/progress").json()
    assert prog["progress"]["max_steps"] == 6
    assert [Path(c).name for c in prog["checkpoints"]] == ["checkpoint-3", "checkpoint-6"]
    assert prog["last_checkpoint"].endswith("checkpoint-6")


def test_swift_3x_uses_train_type_and_parses_3x_progress(server_factory: Callable[..., ApiServer],
                                                         workspace: Path) -> None:  # fmt: skip
    server = server_factory(env={"SWIFT_VERSION": "3.5.3", "FAKE_SWIFT_VERSION": "3.5.3"})
    created(server, body(workspace, "v3", auto_start=True))
    job = server.wait_status("v3", "completed", "failed")
    assert job["status"] == "completed", job["error_message"]
    assert job["swift_version"] == "3.5.3"
    assert flag(job["command"], "--train_type") == "lora" and "--tuner_type" not in job["command"]
    prog = server.http.get("/jobs/v3/progress").json()
    assert prog["progress"]["current_step"] == prog["progress"]["max_steps"] == 20
    assert prog["progress"]["percentage"] == pytest.approx(100.0)
    losses = [p["loss"] for p in prog["history"] if p["loss"] is not None]
    assert losses == pytest.approx(logging_losses(job["run_dir"]), rel=1e-3)
    assert prog["last_checkpoint"].endswith("checkpoint-20") and Path(prog["last_checkpoint"]).is_dir()
    job = wait_for(lambda: (j := server.job("v3"))["export"]["status"] == "completed" and j, what="3.x export")
    assert Path(job["export"]["path"]).is_dir()


# ---- job ids ------------------------------------------------------------------------------------------------


def test_job_id_from_output_dir_made_unique_and_explicit_id_conflict(server: ApiServer, workspace: Path) -> None:
    data = fake_dataset(workspace, "ids")
    model = str(workspace / MODEL_DIR)
    first = created(server, {"data_path": data, "model_path": model, "output_dir": "output/training_001"})
    assert first["job_id"] == "training_001"
    second = created(server, {"data_path": data, "model_path": model, "output_dir": "other/training_001"})
    assert second["job_id"] == "training_001-2"
    third = created(server, {"data_path": data, "model_path": model, "output_dir": "third/training_001"})
    assert third["job_id"] == "training_001-3"
    assert server.job("training_001-2")["output_dir"] == str(server.output_root / "other" / "training_001")

    explicit = created(server, {"data_path": data, "model_path": model, "output_dir": "x/y", "job_id": "my-job.1"})
    assert explicit["job_id"] == "my-job.1"
    before = server.http.get("/jobs").json()["total"]
    taken = server.create(data_path=data, model_path=model, output_dir="z/w", job_id="training_001")
    assert taken.status_code == 409, taken.text
    assert "training_001" in taken.json()["detail"] and "taken" in taken.json()["detail"]
    assert server.http.get("/jobs").json()["total"] == before == 4
    assert server.job("training_001")["output_dir"] == str(server.output_root / "output" / "training_001")


# ---- failures -----------------------------------------------------------------------------------------------


def test_missing_dataset_fails_with_the_path_and_logs_show_it(server: ApiServer, workspace: Path) -> None:
    # The pre-flight check refuses a missing data set at create; one that disappears before the start
    # fails in swift, which names it.
    missing = fake_dataset(workspace, "no_such_data")
    created(server, body(workspace, "nodata", data_path=missing))
    Path(missing).unlink()
    assert server.http.post("/jobs/nodata/start").json()["status"] == "running"
    job = server.wait_status("nodata", "failed")
    assert missing in job["error_message"]
    assert job["exit_code"] not in (0, None)
    assert job["log_tail"] and any(missing in line for line in job["log_tail"])
    assert job["export"]["status"] == "none"  # no automatic export of a failed run
    logs = server.http.get("/jobs/nodata/logs").json()
    assert logs["count"] == len(logs["lines"]) > 0
    assert any(missing in line for line in logs["lines"])
    assert logs["log_file"] == job["log_file"] and Path(job["log_file"]).is_file()
    assert logs["lines"][-len(job["log_tail"][-3:]) :] == job["log_tail"][-3:]
    two = server.http.get("/jobs/nodata/logs", params={"limit": 2}).json()
    assert two["count"] == 2 and two["lines"] == logs["lines"][-2:]
    # GPUs are released.
    assert all(g["job_id"] is None for g in server.http.get("/gpus").json()["gpus"])


def test_failure_during_training_records_the_runtime_error(server: ApiServer, workspace: Path) -> None:
    payload = body(workspace, "boom", auto_start=True, data_path=fake_dataset(workspace, "boom", fail_at_step=7),
                   training={"logging_steps": 1})  # fmt: skip
    created(server, payload)
    job = server.wait_status("boom", "failed")
    assert "RuntimeError: fake_swift failure at step 7" in job["error_message"]
    assert job["exit_code"] == 1
    prog = server.http.get("/jobs/boom/progress").json()
    assert prog["progress"]["current_step"] == 7  # the tqdm bar reached step 7 before the exception
    assert [p["step"] for p in prog["history"]] == [1, 2, 3, 4, 5, 6]
    assert prog["last_checkpoint"] is None
    events = server.http.get("/jobs/boom/events").json()["events"]
    assert events[-1]["type"] == "status_failed" and "step 7" in events[-1]["message"]


# ---- logs, events, list, delete, 404 ------------------------------------------------------------------------


def test_logs_limit_and_events_pagination(server: ApiServer, workspace: Path) -> None:
    created(server, body(workspace, "chatty", auto_start=True, training={"logging_steps": 1}))
    job = server.wait_status("chatty", "completed")
    all_lines = server.http.get("/jobs/chatty/logs", params={"limit": 10_000}).json()["lines"]
    assert len(all_lines) > 100  # the default limit matters
    default = server.http.get("/jobs/chatty/logs").json()
    assert default["count"] == 100 and default["lines"] == all_lines[-100:]
    assert server.http.get("/jobs/chatty/logs", params={"limit": 3}).json()["lines"] == all_lines[-3:]
    for bad in (0, 10_001, -1):
        r = server.http.get("/jobs/chatty/logs", params={"limit": bad})
        assert r.status_code == 422, (bad, r.text)
        assert "limit" in r.json()["detail"]
    assert any("'global_step/max_steps': '20/20'" in line for line in all_lines)
    export_logs = wait_for(lambda: server.job("chatty")["export"]["status"] == "completed"
                           and server.http.get("/jobs/chatty/logs", params={"kind": "export"}).json())  # fmt: skip
    assert export_logs["kind"] == "export" and export_logs["lines"]
    assert export_logs["log_file"] != job["log_file"]
    # A line that never ended (a bar printing only \r, for megabytes) is one clipped line of a page, not the whole
    # 16 MB read window: it made a `limit=1` page 16-100 MB of JSON.
    with open(job["log_file"], "ab") as f:
        f.write(b"\x01" * 3_000_000)
    last_two = server.http.get("/jobs/chatty/logs", params={"limit": 2}).json()["lines"]
    assert last_two[0] == all_lines[-1]
    assert last_two[1].startswith("\x01" * 16_384 + " … (2,983,616 more characters)") and len(last_two[1]) < 16_500
    # Many such lines: each character six bytes of JSON, 1,100 of them made a page of 100 MB. At most 8 MiB, the
    # newest lines.
    with open(job["log_file"], "ab") as f:
        f.write((b"\x01" * 16_000 + b"\n") * 1_100 + b"the last line\n")
    page = server.http.get("/jobs/chatty/logs", params={"limit": 1_200})
    lines = page.json()["lines"]
    assert len(page.content) <= 8 * 1024 * 1024 + 1024 and 50 < len(lines) < 1_100, (len(page.content), len(lines))
    assert lines[-1] == "the last line" and lines[-2] == "\x01" * 16_000 and page.json()["count"] == len(lines)

    everything = server.http.get("/jobs/chatty/events", params={"limit": 1000}).json()["events"]
    assert len(everything) >= 4
    paged: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = server.http.get("/jobs/chatty/events", params=params).json()
        assert len(page["events"]) <= 2
        paged.extend(page["events"])
        after = page["next_after"]
        if after is None:
            break
    assert paged == everything
    assert [e["time"] for e in paged] == sorted(e["time"] for e in paged)
    assert server.http.get("/jobs/chatty/events", params={"after": "nope"}).status_code == 422


def test_list_filters_pagination_newest_first(server: ApiServer, workspace: Path) -> None:
    data = fake_dataset(workspace, "list")
    model = str(workspace / MODEL_DIR)
    ids = [created(server, {"data_path": data, "model_path": model, "output_dir": f"list/j{i}"})["job_id"]
           for i in range(5)]  # fmt: skip
    server.http.post(f"/jobs/{ids[1]}/start")
    server.wait_status(ids[1], "completed")
    listed = server.http.get("/jobs").json()
    assert [j["job_id"] for j in listed["jobs"]] == ids[::-1]
    assert listed["total"] == 5 and listed["next_offset"] is None

    page1 = server.http.get("/jobs", params={"limit": 2}).json()
    assert [j["job_id"] for j in page1["jobs"]] == [ids[4], ids[3]] and page1["next_offset"] == 2
    page2 = server.http.get("/jobs", params={"limit": 2, "offset": page1["next_offset"]}).json()
    assert [j["job_id"] for j in page2["jobs"]] == [ids[2], ids[1]] and page2["next_offset"] == 4
    page3 = server.http.get("/jobs", params={"limit": 2, "offset": 4}).json()
    assert [j["job_id"] for j in page3["jobs"]] == [ids[0]] and page3["next_offset"] is None

    done = server.http.get("/jobs", params={"status": "completed"}).json()
    assert [j["job_id"] for j in done["jobs"]] == [ids[1]] and done["total"] == 1
    assert done["jobs"][0]["progress"]["current_step"] == 20
    pending = server.http.get("/jobs", params={"status": "pending"}).json()
    assert [j["job_id"] for j in pending["jobs"]] == [ids[4], ids[3], ids[2], ids[0]]
    assert server.http.get("/jobs", params={"status": "running"}).json()["jobs"] == []

    assert server.http.get("/jobs", params={"limit": 501}).status_code == 422
    assert server.http.get("/jobs", params={"limit": 0}).status_code == 422
    assert server.http.get("/jobs", params={"offset": -1}).status_code == 422
    assert server.http.get("/jobs", params={"status": "bogus"}).status_code == 422
    assert server.http.get("/jobs", params={"limit": 500}).status_code == 200


def test_delete_and_unknown_or_malformed_ids(server: ApiServer, workspace: Path) -> None:
    created(
        server, body(workspace, "keep", auto_start=True, data_path=fake_dataset(workspace, "keep", hang_after_steps=1))
    )
    running = server.wait_status("keep", "running")
    wait_for(lambda: server.job("keep")["progress"]["current_step"], what="a first step")
    r = server.http.delete("/jobs/keep")
    assert r.status_code == 409 and "stop it first" in r.json()["detail"]
    assert server.job("keep")["status"] == "running"

    assert server.http.post("/jobs/keep/stop").json()["status"] == "stopped"
    r = server.http.delete("/jobs/keep")
    assert r.status_code == 204 and r.content == b""
    assert server.http.get("/jobs/keep").status_code == 404
    assert server.http.get("/jobs").json()["total"] == 0
    assert Path(running["output_dir"]).is_dir()
    assert list(Path(running["output_dir"]).glob("v*/logging.jsonl"))  # training output stays on disk
    assert server.http.delete("/jobs/keep").status_code == 404
    # The output folder is free again for a new job of the same name.
    assert created(server, body(workspace, "keep"))["job_id"] == "keep"

    calls = [
        ("GET", "/jobs/nope"), ("GET", "/jobs/nope/status"), ("GET", "/jobs/nope/progress"), ("GET", "/jobs/nope/logs"),
        ("GET", "/jobs/nope/events"), ("POST", "/jobs/nope/start"), ("POST", "/jobs/nope/stop"),
        ("POST", "/jobs/nope/export"), ("DELETE", "/jobs/nope"), ("PATCH", "/jobs/nope"),
        ("GET", "/queue/nope/status"), ("DELETE", "/queue/nope"),
    ]  # fmt: skip
    for method, path in calls:
        kwargs: dict[str, Any] = {"json": {"priority": 3}} if method == "PATCH" else {}
        r = server.http.request(method, path, **kwargs)
        assert r.status_code == 404, (method, path, r.text)
        assert "nope" in r.json()["detail"]
    for bad in ("bad%20id!", "-lead", "a" * 129, "%2E%2E"):
        for path in (f"/jobs/{bad}", f"/jobs/{bad}/status", f"/jobs/{bad}/logs"):
            r = server.http.get(path)
            assert r.status_code in (404, 422), (path, r.status_code, r.text)
        assert server.http.delete(f"/jobs/{bad}").status_code in (404, 405, 422)


async def test_a_create_overtaken_by_a_delete_before_its_auto_start_still_says_created(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The job is stored, then started in a second step: a delete (or stop) in between used to turn the
    create's answer into a 404 or 409, as if nothing had been created."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    data = fake_dataset(tmp_path, "shared")
    async with app_factory(scheduler=False, CREATE_RATE_LIMIT="0") as client:
        answers: list[tuple[int, str]] = []
        for i in range(40):
            name = f"race{i}"
            body = {"job_id": name, "data_path": data, "model_path": str(tmp_path / "models" / "tiny-qwen2"),
                    "output_dir": name, "num_gpus": 0, "auto_start": True}  # fmt: skip
            created = asyncio.create_task(client.post("/jobs", json=body))
            deadline = time.monotonic() + 30
            while not created.done():  # the owner deletes it as soon as it exists
                assert time.monotonic() < deadline, f"the create of {name} did not answer in 30 s"
                await client.delete(f"/jobs/{name}")
                await asyncio.sleep(0)
            r = created.result()
            answers.append((r.status_code, r.json().get("message") or r.json().get("detail")))
        assert {code for code, _ in answers} == {201}, [a for a in answers if a[0] != 201]
        assert any("deleted before it could start" in str(m) for _, m in answers), answers


def test_a_run_whose_loss_turns_nan_keeps_its_pages_valid_json(server: ApiServer, workspace: Path) -> None:
    # swift prints 'loss': 'nan' (and logging.jsonl NaN) once a run diverges: written into the job, it made its
    # page and every list page holding it unparseable (NaN is not JSON) for browsers and strict clients.
    body = job_body(
        workspace,
        "diverged",
        auto_start=True,
        nan_from_step=3,
        training={"max_steps": 6, "logging_steps": 1, "save_steps": 2, "save_total_limit": 5},
    )
    assert server.create(**body).status_code == 201
    server.wait_status("diverged", "completed")

    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a response"))

    job = strict(server.http.get("/jobs/diverged").text)
    strict(server.http.get("/jobs").text)
    progress = strict(server.http.get("/jobs/diverged/progress").text)
    points = {p["step"]: p["loss"] for p in progress["history"]}
    assert points[2] is not None and points[4] is None, points
    assert job["progress"]["current_step"] == 6 and progress["train_loss"] is None
    # Nor does it show the last good loss of a run that has diverged.
    assert job["progress"]["loss"] is None and progress["progress"]["loss"] is None
    # The events say why, once: the step where the loss stopped being a number.
    events = [e for e in server.http.get("/jobs/diverged/events").json()["events"] if e["type"] == "loss_not_finite"]
    assert len(events) == 1 and "at step 3: the run diverged" in events[0]["message"], events
    assert events[0]["data"]["step"] == 3
    # A checkpoint saved after it has no loss to show: it showed step 2's, as healthy as the one before.
    losses = {c["step"]: c["loss"] for c in strict(server.http.get("/jobs/diverged/checkpoints").text)["checkpoints"]}
    assert losses[2] is not None and losses[4] is None and losses[6] is None, losses


async def test_a_queued_create_whose_wait_estimate_redis_did_not_answer_says_created(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is stored before its wait is estimated: a lost reply there answered 503 "this POST may have been
    carried out", and the retry was refused as a second job in its folder (hunt BH)."""
    import redis

    from application.services.placement import Placement

    async with app_factory() as client:
        hog = job_body(tmp_path, "hog", auto_start=True, num_gpus=2, hang_after_steps=1)
        assert (await client.post("/jobs", json=hog)).status_code == 201
        await wait_job(client, "hog", lambda j: j["status"] == "running")
        real, lost = Placement.placed, [redis.ConnectionError("Connection closed by server.")]

        async def placed_lost_once(self: Any, *args: Any, **kwargs: Any) -> Any:
            if lost:
                raise lost.pop()
            return await real(self, *args, **kwargs)

        monkeypatch.setattr(Placement, "placed", placed_lost_once)
        r = await client.post("/jobs", json=job_body(tmp_path, "waits", auto_start=True, num_gpus=1))
        assert r.status_code == 201 and not lost, r.text
        assert r.json()["status"] == "queued" and r.json()["queue_position"] == 1, r.json()
        assert "Redis did not answer for its wait estimate: see GET .../queue/waits/status" in r.json()["message"]
        assert (await client.get("/jobs/waits")).json()["status"] == "queued"


async def test_a_listed_job_whose_record_is_gone_leaves_the_list_when_deleted(app_factory: Any, tmp_path: Path) -> None:
    # Its record evicted (allkeys-lru) or deleted by hand: GET /jobs listed it for good, and DELETE was a 404.
    async with app_factory(scheduler=False) as client:
        for name in ("ghost", "kept"):
            assert (await client.post("/jobs", json=job_body(tmp_path, name, num_gpus=0))).status_code == 201
        store = client.app.state.training.store
        await store.r.delete(store.keys.job("ghost"))
        assert {j["job_id"] for j in (await client.get("/jobs")).json()["jobs"]} == {"ghost", "kept"}
        r = await client.delete("/jobs/ghost")
        assert r.status_code == 404, r.text
        listed = (await client.get("/jobs")).json()
        assert [j["job_id"] for j in listed["jobs"]] == ["kept"] and listed["total"] == 1, listed
    # Another owner's delete (a 404) leaves a job that is there as it was: its entries go only with its record.
    from tests.conftest import ALICE_KEY, BOB_KEY, KEYS_SETTING, auth

    async with app_factory(scheduler=False, API_KEYS=KEYS_SETTING) as client:
        body = job_body(tmp_path, "alices", num_gpus=1, auto_start=True)
        assert (await client.post("/jobs", json=body, headers=auth(ALICE_KEY))).status_code == 201
        store = client.app.state.training.store
        entries = [store.keys.queue, store.keys.jobs_index]
        before = [await store.r.zrange(key, 0, -1) for key in entries]
        assert (await client.delete("/jobs/alices", headers=auth(BOB_KEY))).status_code == 404
        assert [await store.r.zrange(key, 0, -1) for key in entries] == before and before[0] == ["alices"]
        listed = (await client.get("/jobs", headers=auth(ALICE_KEY))).json()["jobs"]
        assert [j["job_id"] for j in listed] == ["alices"]
