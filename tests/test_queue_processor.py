"""The scheduler's queue pass, in this process against a real Redis, with real runners of the fake swift."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from application.models.training_model import Job, JobStatus
from application.scheduler_process import Scheduler
from application.services import clock
from application.services.job_store import JobStore, Refusal, TransitionRefused
from application.services.process_group import group_members
from application.services.queue_planner import build_view
from application.services.queue_processor import QueueProcessor
from application.services.queue_view import PlanningState
from application.services.redis_service import RedisService
from tests.conftest import (
    ADMIN_KEY,
    ALICE_KEY,
    BOB_KEY,
    KEYS_SETTING,
    _until,
    auth,
    job_body,
    make_model,
    settings_for,
    wait_job,
)
from tests.test_job_store import make_job, require


async def hog_the_gpu(client: Any, tmp_path: Path) -> None:
    """A run named "hog" that holds its GPU (the only one, on these servers) until stopped."""
    body = job_body(tmp_path, "hog", auto_start=True, hang_after_steps=1)
    assert (await client.post("/jobs", json=body)).status_code == 201
    await wait_job(client, "hog", lambda j: j["status"] == "running")


async def test_a_job_whose_folder_cannot_be_used_fails_alone_and_the_queue_goes_on(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A queued job whose output folder no file can be made in (a path too long for the system, as a job stored
    before the create refused those has) raised out of the pass: every start behind it failed, pass after pass."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        for name, priority in (("broken", 9), ("fine", 1)):
            r = await client.post("/jobs", json=job_body(tmp_path, name, priority=priority, step_seconds=0.01,
                                                          training={"max_steps": 2}))  # fmt: skip
            assert r.status_code == 201, r.text
        store = client.app.state.training.store
        too_long = str(tmp_path / "output" / "/".join(["d" * 250] * 17))
        await store.r.hset(store.keys.job("broken"), "output_dir", json.dumps(too_long))
        for name in ("broken", "fine"):
            assert (await client.post(f"/jobs/{name}/start")).status_code == 200
        broken = await wait_job(client, "broken", lambda j: j["status"] == "failed")
        assert broken["error_code"] == "output_dir" and "File name too long" in broken["error_message"], broken
        fine = await wait_job(client, "fine", lambda j: j["status"] == "completed")
        assert fine["exit_code"] == 0
        # Counted as what it was: not a start ("started 1 job(s)" and the pass's log said so).
        assert (await client.get("/queue/processor/status")).json()["jobs_started"] == 1


async def test_a_scheduler_that_lost_its_lead_after_starting_a_run_launches_no_runner(
    app_factory: Callable[..., Any], tmp_path: Path, redis_url: str
) -> None:
    """A leader stalled between recording a run and launching its runner (its successor meanwhile gave the job
    another run) launched it anyway: a second trainer on the GPU, writing into the new run's log."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        processor = client.scheduler.processor
        lead = processor.fence
        key = client.app.state.training.store.keys.job("late")
        sync = redis.Redis.from_url(redis_url, decode_responses=True)
        # The lead is lost as soon as the run is recorded, before its runner is launched.
        processor.fence = lambda: "a-lead-lost-meanwhile" if sync.hget(key, "status") == '"running"' else lead()
        try:
            r = await client.post("/jobs", json=job_body(tmp_path, "late", auto_start=True, training={"max_steps": 2}))
            assert r.status_code == 201, r.text
            job = await wait_job(client, "late", lambda j: j["status"] == "running")
            passes = processor.stats.passes
            await _until(lambda: processor.stats.passes > passes, timeout=10)  # the pass that started it is over
            assert client.scheduler.launcher.children == {}
            assert not Path(job["log_file"]).exists()
            assert (await client.get("/jobs/late")).json()["runner"] is None
        finally:
            processor.fence = lead
            sync.close()


async def test_a_scheduler_whose_lead_was_just_lost_starts_nothing(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The lost lock's value is set to none before the scheduler's tasks are cancelled, and a fence of none
    checked nothing: a start in flight then took the job's GPUs with no one to launch its runner."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        assert (await client.post("/queue/processor/stop")).status_code == 200
        r = await client.post("/jobs", json=job_body(tmp_path, "j", training={"max_steps": 2}))
        assert r.status_code == 201 and r.json()["status"] == "pending", r.text
        store, sched = client.app.state.training.store, client.scheduler
        await store.transition("j", JobStatus.QUEUED, expect=(JobStatus.PENDING,))  # (no pass: the processor is off)
        job = await store.get("j")
        assert job is not None
        held, sched.leader.value = sched.leader.value, None  # what LeaderLock.keep does as the lead is lost
        try:
            with pytest.raises(TransitionRefused) as refused:
                await sched.processor.start_run(job, [0])
        finally:
            sched.leader.value = held
        assert refused.value.reason == Refusal.NOT_LEADER
        assert (await client.get("/jobs/j")).json()["status"] == "queued" and await store.leases() == {}


async def test_a_stop_that_came_as_the_last_run_went_back_to_the_queue_is_honoured(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A stop (pause) accepted between the runner's last look at its flags and its requeue (a retry): the next
    pass started the job again with the flag cleared, and it ran to completed."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80", PREEMPTION=True, PREEMPTION_MIN_RUN_SECONDS=0) as client:
        blocker = job_body(tmp_path, "blocker", auto_start=True, hang_after_steps=1, priority=1,
                           training={"max_steps": 50})  # fmt: skip
        assert (await client.post("/jobs", json=blocker)).json()["status"] == "running"
        store, processor = client.app.state.training.store, client.scheduler.processor
        assert (await client.post("/queue/processor/stop")).status_code == 200  # (no pass before the flags)
        for name, flag in (("asked", "stop_requested"), ("rested", "pause_requested")):
            body = job_body(tmp_path, name, auto_start=True, priority=10, training={"max_steps": 2})
            r = await client.post("/jobs", json=body)
            assert r.status_code == 201 and r.json()["status"] == "queued", r.text
            await store.update(name, {flag: True})  # what the stop (pause) wrote, as the run went back
        passes = processor.stats.passes
        assert (await client.post("/queue/processor/start")).status_code == 200
        await _until(lambda: processor.stats.passes >= passes + 2, timeout=15)
        # Nothing is preempted for a job that will not run.
        still = (await client.get("/jobs/blocker")).json()
        assert still["status"] == "running" and still["preempt_for"] is None, still
        assert (await client.post("/jobs/blocker/stop")).status_code == 200
        done = await wait_job(client, "asked", lambda j: j["status"] not in ("queued", "running"))
        assert done["status"] == "cancelled" and done["started_at"] is None, done  # no checkpoint: cancelled
        rested = await wait_job(client, "rested", lambda j: j["status"] not in ("queued", "running"))
        assert rested["status"] == "paused" and rested["started_at"] is None and not rested["pause_requested"]
        assert (await client.post("/jobs/rested/resume")).status_code == 200
        await wait_job(client, "rested", lambda j: j["status"] == "completed")


async def test_an_input_that_leads_elsewhere_since_the_create_fails_the_run_before_swift_reads_it(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Inputs were sandboxed at the create only: a folder on a data set's path replaced by a link to files outside
    DATA_ROOTS (or to another owner's) meanwhile had the run read those."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    roots, secret = tmp_path / "data", tmp_path / "secret"
    (roots / "team").mkdir(parents=True)
    secret.mkdir()
    body = job_body(tmp_path, "relinked", training={"max_steps": 2})
    Path(body["data_path"]).rename(roots / "team" / "t.jsonl")
    (secret / "t.jsonl").write_text("not for this job\n")
    async with app_factory(DATA_ROOTS=str(roots), DATA_DIR=tmp_path / "server") as client:
        r = await client.post("/jobs", json={**body, "data_path": "team/t.jsonl"})
        assert r.status_code == 201, r.text
        (roots / "team").rename(roots / "team.kept")
        (roots / "team").symlink_to(secret, target_is_directory=True)
        assert (await client.post("/jobs/relinked/start")).status_code == 200
        failed = await wait_job(client, "relinked", lambda j: j["status"] in ("failed", "completed"))
        assert failed["status"] == "failed" and failed["error_code"] == "input_path", failed
        assert f"data_path {roots / 'team' / 't.jsonl'} now leads to another place" in failed["error_message"]
        assert str(secret) not in failed["error_message"] and not (secret / "logs").exists()


async def test_an_input_relinked_to_the_key_file_inside_its_data_root_fails_the_run(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A link made since the create to elsewhere inside the roots is taken (data moved), but not to the server's
    own files a data root holds: the run would have trained on API_KEYS_FILE, which the create refuses."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    roots = tmp_path / "data"
    keys = roots / "cfg" / "keys.json"
    keys.parent.mkdir(parents=True)
    keys.write_text(json.dumps({"root": {"role": "admin", "key": "root-key-0123456789abcdef"}}))
    body = job_body(tmp_path, "relinked", training={"max_steps": 2})
    Path(body["data_path"]).rename(roots / "t.jsonl")
    async with app_factory(DATA_ROOTS=str(roots), DATA_DIR=tmp_path / "server", API_KEYS_FILE=str(keys)) as client:
        client.headers["Authorization"] = "Bearer root-key-0123456789abcdef"
        r = await client.post("/jobs", json={**body, "data_path": "t.jsonl"})
        assert r.status_code == 201, r.text
        (roots / "t.jsonl").unlink()
        (roots / "t.jsonl").symlink_to(keys)
        assert (await client.post("/jobs/relinked/start")).status_code == 200
        failed = await wait_job(client, "relinked", lambda j: j["status"] in ("failed", "completed"))
        assert failed["status"] == "failed" and failed["error_code"] == "input_path", failed
        assert f"data_path {roots / 't.jsonl'} now leads to another place" in failed["error_message"]


async def test_a_link_made_in_a_model_folder_since_the_create_is_checked_again_before_the_run(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A model folder's links were checked at the create only: a file replaced since by a link to another owner's
    checkpoint (or out of the roots) was trained on, and merged into the owner's export (a hunt)."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    bobs_weights = tmp_path / "output" / "bobs" / "model.safetensors"
    outside = tmp_path / "elsewhere" / "model.safetensors"
    async with app_factory(API_KEYS=KEYS_SETTING, MODEL_ROOTS=str(tmp_path / "models")) as client:
        client.headers.update(auth(BOB_KEY))
        assert (await client.post("/jobs", json=job_body(tmp_path, "bobs"))).status_code == 201
        for path in (bobs_weights, outside):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"weights")
        cases = [
            (ALICE_KEY, "alices", bobs_weights, "overlaps the folder of another owner's job"),
            (ADMIN_KEY, "roots", outside, "is a link that leads outside MODEL_ROOTS"),
            (ADMIN_KEY, "admins", bobs_weights, None),
        ]  # (an admin may use anyone's files, as at the create)
        for key, name, target, says in cases:
            client.headers.update(auth(key))
            model = make_model(tmp_path / "models" / name)
            body = {**job_body(tmp_path, name, training={"max_steps": 2}), "model_path": str(model)}
            assert (await client.post("/jobs", json=body)).status_code == 201
            (model / "model.safetensors").unlink(missing_ok=True)
            (model / "model.safetensors").symlink_to(target)
            assert (await client.post(f"/jobs/{name}/start")).status_code == 200
            ended = await wait_job(client, name, lambda j: j["status"] in ("failed", "completed"))
            if says is None:
                assert ended["status"] == "completed", ended
                continue
            assert ended["status"] == "failed" and ended["error_code"] == "input_path", ended
            assert f"model_path {model} changed since the job was created" in ended["error_message"], ended
            assert says in ended["error_message"] and ended["started_at"] is None, ended  # (no GPU taken)


async def test_media_a_data_file_names_since_the_create_are_checked_before_the_run(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data file's media were checked at the create only: rewritten since to name a file out of DATA_ROOTS (or
    another owner's upload), its run had swift open it (a hunt). A file changed without such media still runs.
    Neither Redis's clock running ahead of this host's (the create's time is Redis's, a file's this host's) nor
    a modification time set back hides a change (hunt BH)."""
    real_now = clock.now
    monkeypatch.setattr(clock, "now", lambda: real_now() + 90)
    make_model(tmp_path / "models" / "tiny-qwen2")
    roots, secret = tmp_path / "data", tmp_path / "secret.png"
    roots.mkdir()
    secret.write_bytes(b"not for this job")
    async with app_factory(DATA_ROOTS=str(roots), DATA_DIR=tmp_path / "server") as client:
        for name in ("changed", "grown", "backdated"):
            body = job_body(tmp_path, name, training={"max_steps": 2})
            Path(body["data_path"]).rename(roots / f"{name}.jsonl")
            assert (await client.post("/jobs", json={**body, "data_path": f"{name}.jsonl"})).status_code == 201
        chat = [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "hello"}]
        for name in ("changed", "backdated"):
            with (roots / f"{name}.jsonl").open("a") as f:
                f.write(json.dumps({"messages": chat, "images": [str(secret)]}) + "\n")
        hour_ago = time.time() - 3600
        os.utime(roots / "backdated.jsonl", (hour_ago, hour_ago))
        with (roots / "grown.jsonl").open("a") as f:
            f.write(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "more"}]}) + "\n")  # fmt: skip
        for name in ("changed", "grown", "backdated"):
            assert (await client.post(f"/jobs/{name}/start")).status_code == 200
        for name in ("changed", "backdated"):
            failed = await wait_job(client, name, lambda j: j["status"] in ("failed", "completed"))
            assert failed["status"] == "failed" and failed["error_code"] == "input_path", failed
            assert f"data_path {roots / f'{name}.jsonl'} changed since the job was created" in failed["error_message"]
            assert "must be a file inside DATA_ROOTS" in failed["error_message"] and failed["started_at"] is None
        assert (await wait_job(client, "grown", lambda j: j["status"] in ("failed", "completed")))["status"] == \
            "completed"  # fmt: skip


async def test_a_job_whose_folder_links_redis_is_slow_to_tell_of_waits_for_the_next_pass(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whose folder a model folder's link leads into is read from Redis before the run: one slow answer failed the
    job for good ("try again"), or left it running without a runner (a review)."""
    from application.services import folder_owners

    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(API_KEYS=KEYS_SETTING, MODEL_ROOTS=str(tmp_path / "models")) as client:
        client.headers.update(auth(ALICE_KEY))
        assert (await client.post("/jobs", json=job_body(tmp_path, "first", training={"max_steps": 2},
                                                         auto_start=True))).status_code == 201  # fmt: skip
        await wait_job(client, "first", lambda j: j["status"] == "completed")
        (tmp_path / "output" / "first" / "w.bin").write_bytes(b"her own")
        model = make_model(tmp_path / "models" / "linked")
        (model / "extra.bin").symlink_to(tmp_path / "output" / "first" / "w.bin")  # (her own job's: allowed)
        body = {**job_body(tmp_path, "second", training={"max_steps": 2}), "model_path": str(model)}
        assert (await client.post("/jobs", json=body)).status_code == 201
        real, slow = folder_owners.FolderIndex.foreign, [1.0]

        async def answering_late_once(self: Any, folder: dict[str, Any]) -> str | None:
            await asyncio.sleep(slow.pop() if slow else 0)  # (one read Redis is slow to answer)
            return await real(self, folder)

        monkeypatch.setattr(folder_owners, "READ_TIMEOUT", 0.2)
        monkeypatch.setattr(folder_owners.FolderIndex, "foreign", answering_late_once)
        assert (await client.post("/jobs/second/start")).status_code == 200
        ended = await wait_job(client, "second", lambda j: j["status"] in ("failed", "completed"))
        assert ended["status"] == "completed" and not slow, ended
        assert len(ended["attempts"]) == 1, ended["attempts"]


async def test_a_quantized_export_whose_parents_record_cannot_be_read_holds_up_no_other_job(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The start of a quantized export reads its parent's record to check the base model's folder: a record that
    could not be read failed every pass, and no job behind the export ever started (a review)."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80", AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "p", auto_start=True, priority=9, training={"max_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "p", lambda j: j["status"] == "completed")
        await hog_the_gpu(client, tmp_path)
        asked = await client.post("/jobs/p/export", json={"quant_method": "bnb", "quant_bits": 4})
        assert asked.status_code == 200, asked.text
        fine = job_body(tmp_path, "fine", priority=1, auto_start=True, training={"max_steps": 2})
        assert (await client.post("/jobs", json=fine)).json()["status"] == "queued"
        store = client.app.state.training.store
        await store.r.hset(store.keys.job("p"), mapping={"num_gpus": json.dumps("one")})  # (as a hand wrote it)
        assert (await client.post("/jobs/hog/stop")).status_code == 200
        await wait_job(client, "fine", lambda j: j["status"] == "completed", timeout=30)
        export = await wait_job(client, asked.json()["export"]["job_id"], lambda j: j["status"] != "queued")
        assert export["status"] in ("running", "completed"), export


async def test_a_queued_job_whose_record_cannot_be_read_fails_alone_and_the_queue_goes_on(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A record this version cannot read (a value a hand or an older version wrote) raised out of every pass:
    no job of anyone's started while it was queued."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        await hog_the_gpu(client, tmp_path)
        for name, priority in (("unreadable", 9), ("fine", 1)):
            body = job_body(tmp_path, name, priority=priority, auto_start=True, step_seconds=0.01,
                            training={"max_steps": 2})  # fmt: skip
            r = await client.post("/jobs", json=body)
            assert r.status_code == 201 and r.json()["status"] == "queued", r.text
        store = client.app.state.training.store
        # Unreadable twice over: a field of the wrong type, and an owner that is not even JSON.
        await store.r.hset(store.keys.job("unreadable"), mapping={"num_gpus": json.dumps("one"), "owner": "bob"})
        assert (await client.post("/jobs/hog/stop")).status_code == 200
        fine = await wait_job(client, "fine", lambda j: j["status"] == "completed")
        assert fine["exit_code"] == 0
        status = await store.r.hget(store.keys.job("unreadable"), "status")
        assert json.loads(status) == "failed"


async def test_the_queue_past_the_forecasts_reach_says_the_jobs_ahead_come_first(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past ESTIMATE_WINDOW GET /queue gave no reason, which says "the next pass starts it" (the dashboard wrote
    # so), while each job's own status said `priority`.
    from application.services import job_create, placement, queue_planner, queue_service

    for module in (queue_planner, queue_service, job_create, placement):
        monkeypatch.setattr(module, "ESTIMATE_WINDOW", 2)
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        body = job_body(tmp_path, "busy", hang_after_steps=1, auto_start=True)
        assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        for i in range(4):
            r = await client.post("/jobs", json=job_body(tmp_path, f"w{i}", auto_start=True))
            assert r.json()["status"] == "queued", r.text
        entries = (await client.get("/queue")).json()["entries"]
        assert [e["job_id"] for e in entries] == ["w0", "w1", "w2", "w3"]
        for entry in entries:
            own = (await client.get(f"/queue/{entry['job_id']}/status")).json()
            assert entry["pending_reason"] is not None and entry["pending_reason"]["code"] == own["pending_reason"][
                "code"], (entry, own)  # fmt: skip
        assert [e["pending_reason"]["code"] for e in entries[2:]] == ["priority", "priority"]
        assert (await client.post("/jobs/busy/stop")).status_code == 200


@pytest.mark.parametrize("processor", ["on", "off"])
async def test_a_start_asked_for_a_cpu_job_past_the_planned_window_starts_it(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processor: str
) -> None:
    # A pass plans the first WINDOW queued jobs (and one deeper page for CPU-only ones, a further one each
    # pass): a CPU-only job's own start (auto_start, POST .../start) past them started nothing until the deep
    # page came round to it (18 passes at 19,600 queued), and with the processor off never (hunt, review).
    from application.services import queue_planner

    monkeypatch.setattr(queue_planner, "WINDOW", 2)
    monkeypatch.setattr(queue_planner, "DEEP_PAGE", 0)  # (the deep page never comes round: the start alone)
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        assert (await client.post("/jobs", json=job_body(tmp_path, "hog", auto_start=True,
                                                         hang_after_steps=1))).status_code == 201  # fmt: skip
        await wait_job(client, "hog", lambda j: j["status"] == "running")
        if processor == "off":
            assert (await client.post("/queue/processor/stop")).status_code == 200
        for n in range(6):
            r = await client.post("/jobs", json=job_body(tmp_path, f"gpu-{n}", auto_start=True))
            assert r.status_code == 201 and r.json()["status"] == "queued", r.text
        cpu: dict[str, Any] = {"num_gpus": 0, "training": {"torch_dtype": "float32", "max_steps": 2}}
        r = await client.post("/jobs", json=job_body(tmp_path, "cpu-auto", auto_start=True, **cpu))
        assert r.status_code == 201 and r.json()["status"] == "running", r.text
        assert (await client.post("/jobs", json=job_body(tmp_path, "cpu-later", **cpu))).status_code == 201
        r = await client.post("/jobs/cpu-later/start")
        assert r.status_code == 200 and r.json()["status"] == "running", r.text
        assert (await client.get("/jobs/gpu-5")).json()["status"] == "queued"  # (only the jobs asked for)


async def test_jobs_whose_records_redis_evicted_leave_the_queue_and_their_gpus(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Under an evicting maxmemory-policy: a queued job's record gone kept its queue entry, which the plan gave
    # the free GPUs pass after pass (nothing behind it started), and a running one's kept its GPU leased (hunt).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        await hog_the_gpu(client, tmp_path)
        for name in ("evicted", "behind"):
            r = await client.post("/jobs", json=job_body(tmp_path, name, auto_start=True, training={"max_steps": 2}))
            assert r.status_code == 201 and r.json()["status"] == "queued", r.text
        store = client.app.state.training.store
        await store.r.delete(store.keys.job("evicted"), store.keys.job("hog"))  # as an evicting Redis would
        behind = await wait_job(client, "behind", lambda j: j["status"] == "completed")
        assert behind["exit_code"] == 0
        queue = (await client.get("/queue")).json()
        assert queue["entries"] == [], queue
        assert (await client.get("/jobs/evicted")).status_code == 404 and await store.leases() == {}
        # Its folder is free again (its claim outlived it: every new job naming that folder was "in use by
        # another active job", for good).
        again = await client.post("/jobs", json=job_body(tmp_path, "evicted", training={"max_steps": 2}))
        assert again.status_code == 201, again.text


async def test_a_head_found_again_keeps_its_starvation_clock_and_is_planned_with_it(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A higher-priority job waiting a moment at the head restarted the clock of the job it came ahead of, so a
    stream of such jobs kept a wide job's reservation soft for ever."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True, SIMULATED_GPUS="1x80") as client:
        processor, cluster = client.scheduler.processor, client.scheduler.cluster
        await client.post("/jobs", json=job_body(tmp_path, "hog", hang_after_steps=1, auto_start=True))
        assert await processor.run_pass() == ["hog"]
        await client.post("/jobs", json=job_body(tmp_path, "big", auto_start=True))
        await processor.run_pass()
        first = await cluster.queue_head()
        assert first is not None and first[0] == "big"
        await client.post("/jobs", json=job_body(tmp_path, "urgent", priority=9, auto_start=True))
        await processor.run_pass()
        assert (await cluster.queue_head() or ("",))[0] == "urgent"
        assert (await client.post("/jobs/urgent/stop")).status_code == 200  # (cancelled: out of the queue)
        await processor.run_pass()
        assert await cluster.queue_head() == first
        await client.post("/jobs/hog/stop")


async def test_a_start_refused_because_the_job_was_stopped_meanwhile_keeps_its_loss_history(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The points past the checkpoint a run resumes from were dropped before its move to running: a stop (or a
    dequeue) that came first refused that move, and the history of a job that never ran again was cut for good."""
    from application.models.training_model import Attempt

    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False, lead=True, SIMULATED_GPUS="1x80") as client:
        store, processor = client.scheduler.store, client.scheduler.processor
        await client.post("/jobs", json=job_body(tmp_path, "paused"))
        checkpoint = tmp_path / "output" / "paused" / "v0-1" / "checkpoint-20"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        first = Attempt(number=1, run_id="r1", started_at=time.time() - 60, outcome="paused")
        await store.transition("paused", JobStatus.RUNNING, fields={"run_id": "r1", "attempts": [first]})
        await store.add_history("paused", [{"step": s, "loss": 1.0, "time": time.time()} for s in range(1, 24)])
        await store.transition("paused", JobStatus.QUEUED, fields={"resume_from": str(checkpoint)})
        job = await store.get("paused")
        await store.transition("paused", JobStatus.CANCELLED)  # the stop that came first
        with pytest.raises(TransitionRefused):
            await processor.start_run(job, [0])
        assert [p.step for p in await store.history("paused", 100)] == list(range(1, 24))


async def test_a_reply_lost_between_a_runs_record_and_its_launch_still_launches_it(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost reply to the scheduling-latency metric (or to the check that the run is still this scheduler's),
    between the run's record and its launch, ended the pass: the job showed running with no runner until the
    watchdog requeued it as "preempted for the stop of the scheduler" (hunt BH)."""
    from application.services import job_store as job_store_module
    from application.services import run_start

    lost = [redis.ConnectionError("Connection closed by server."), redis.ConnectionError("Connection reset.")]

    async def metric_lost(*args: Any) -> None:
        raise lost.pop(0)

    real_update = job_store_module.JobStore.update

    async def check_lost_once(self: Any, job_id: str, fields: Any, **kwargs: Any) -> Any:
        if not fields and kwargs.get("fence") and lost:
            raise lost.pop(0)
        return await real_update(self, job_id, fields, **kwargs)

    monkeypatch.setattr(run_start, "record_scheduling_latency", metric_lost)
    monkeypatch.setattr(job_store_module.JobStore, "update", check_lost_once)
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory() as client:
        body = job_body(tmp_path, "lost", auto_start=True, training={"max_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        ended = await wait_job(client, "lost", lambda j: j["status"] in ("failed", "completed", "queued") and
                               bool(j.get("attempts")))  # fmt: skip
        assert ended["status"] == "completed" and len(ended["attempts"]) == 1 and not lost, ended


async def test_a_job_whose_folder_shows_runs_its_record_does_not_know_is_not_run_again(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Redis back from a snapshot in which a job waited: the job had since completed, and it ran again from its
    # start, told to no one (hunt BU). A deleted job's run in the folder a new job reuses is another job's, even
    # one that ended after the new job was created (its runner stopping once Redis lost its record: review BV).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        created = {}
        for name in ("restored", "reused"):
            body = job_body(tmp_path, name, step_seconds=0.01, training={"max_steps": 2})
            assert (await client.post("/jobs", json=body)).status_code == 201
            created[name] = (await client.get(f"/jobs/{name}")).json()["created_at"]
        for name, of in (("restored", created["restored"]), ("reused", created["reused"] - 3600)):
            folder = tmp_path / "output" / name
            (folder / "v0-20261205-101010" / "checkpoint-2").mkdir(parents=True)
            (folder / "v0-20261205-101010" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
            (folder / "logs").mkdir()
            (folder / "logs" / f"{name}.train.log").write_text("a run Redis forgot\n")
            (folder / "logs" / f"{name}.train.exit.json").write_text(json.dumps({
                "exit_code": 0, "finished_at": clock.now() + 1, "job_created_at": of,
                "run_dir": str(folder / "v0-20261205-101010")}))  # fmt: skip
        assert (await client.post("/jobs/reused/start")).status_code == 200
        reused = await wait_job(client, "reused", lambda j: j["status"] == "completed")
        assert [Path(a["log_file"]).name for a in reused["attempts"]] == ["reused.train.2.log"]
        # What its runner writes beside the log to be told apart so: whose run it was, and its run folder.
        record = json.loads((tmp_path / "output" / "reused" / "logs" / "reused.train.2.exit.json").read_text())
        assert record["job_created_at"] == created["reused"] and record["run_dir"] == reused["run_dir"], record
        r = await client.post("/jobs/restored/start")
        assert r.status_code == 200, r.text
        restored = await wait_job(client, "restored", lambda j: j["status"] == "failed")
        assert restored["error_code"] == "unknown_run", restored
        assert "its folder holds 1 run(s) of it that its record did not know (the last: logs/restored.train.log, " \
               "ended with completed at " in restored["error_message"], restored["error_message"]  # fmt: skip
        assert restored["error_message"].endswith(
            "resume it from its newest checkpoint (POST .../resume), or export one (GET .../checkpoints)"
        ), restored["error_message"]
        assert [(a["outcome"], Path(a["log_file"]).name) for a in restored["attempts"]] == [
            ("completed", "restored.train.log")]  # fmt: skip
        logs = await client.get("/jobs/restored/logs", params={"attempt": 1})
        assert [line for line in logs.json()["lines"]] == ["a run Redis forgot"], logs.text
        # Its checkpoints are its own again (listed, exportable).
        listed = (await client.get("/jobs/restored/checkpoints")).json()["checkpoints"]
        assert [Path(c["path"]).name for c in listed] == ["checkpoint-2"], listed
        # ... and a resume goes on from the one it lists (it found none: "create a new job", hunt CR).
        r = await client.post("/jobs/restored/resume")
        assert r.status_code == 200 and r.json()["resume_from"] == listed[0]["path"], r.text
        resumed = await wait_job(client, "restored", lambda j: j["status"] in ("completed", "failed"))
        assert resumed["status"] == "completed" and resumed["attempts"][-1]["resumed_from"] == listed[0]["path"]


async def test_a_run_the_running_index_lost_keeps_its_gpu_and_is_indexed_again(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The running index evicted (allkeys-lru) or deleted by hand: each pass dropped the leases of the runs it no
    # longer listed, and the queued job started on a GPU a run still trained on (hunt CI: 3 trainers, 2 GPUs).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        await hog_the_gpu(client, tmp_path)
        body = job_body(tmp_path, "next", auto_start=True, training={"max_steps": 2})
        assert (await client.post("/jobs", json=body)).json()["status"] == "queued"
        store = client.app.state.training.store
        running = store.keys.status_index(JobStatus.RUNNING)
        await store.r.delete(running)
        assert (await client.post("/queue/process")).json()["started"] == []
        assert await store.r.hgetall(store.keys.gpu_leases) == {"0": "hog"}
        assert await store.r.zrange(running, 0, -1) == ["hog"]
        assert (await client.get("/jobs/next")).json()["status"] == "queued"
        # It still ends as runs do, and the queue goes on.
        assert (await client.post("/jobs/hog/stop")).status_code == 200
        await wait_job(client, "next", lambda j: j["status"] == "completed")


async def test_a_pass_starts_the_clock_of_each_prioritys_head_and_keeps_it(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Each priority's first waiting job is the head of its own, for the starvation rule (hunt CL): its clock is
    # kept in Redis as the queue's head's is, so a scheduler taking over goes on counting.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        empty = (await client.post("/queue/process")).json()
        assert empty["message"] == "the queue is empty", empty  # (it said no queued job fits: hunt CN)
        await hog_the_gpu(client, tmp_path)
        # Only this test's passes from here: the live processor, woken by the first PATCH below, ran a pass
        # before the second and started low2's clock at its new priority (seen once in a fresh CI).
        assert (await client.post("/queue/processor/stop")).status_code == 200
        for name, priority in (("high", 7), ("low", 5), ("low2", 5)):
            body = job_body(tmp_path, name, auto_start=True, priority=priority, training={"max_steps": 2})
            assert (await client.post("/jobs", json=body)).json()["status"] == "queued"
        store = client.app.state.training.store
        passed = (await client.post("/queue/process")).json()
        assert passed["started"] == [] and passed["message"] == "no queued job fits the free GPUs now", passed
        clocks = await store.head_clocks()
        assert set(clocks) == {"high", "low"}, clocks
        assert (await client.post("/queue/process")).status_code == 200
        assert await store.head_clocks() == clocks  # (kept: not restarted by later passes)
        # Moved to another priority, a job's clock starts again there: kept, one raised was at once hard at its
        # new priority, and runs were preempted for it (review CM).
        assert (await client.patch("/jobs/low2", json={"priority": 9})).status_code == 200
        assert (await client.patch("/jobs/low", json={"priority": 6})).status_code == 200
        assert set(await store.head_clocks()) == {"high"}
        assert (await client.post("/queue/process")).status_code == 200
        again = await store.head_clocks()
        assert set(again) == {"high", "low", "low2"} and again["low"] > clocks["low"], again
        assert (await client.patch("/jobs/low", json={"priority": 6})).status_code == 200  # (the same: kept)
        assert (await store.head_clocks())["low"] == again["low"]
        # Gone from the queue, a job's clock goes with it.
        assert (await client.delete("/queue/high")).status_code == 200
        assert set(await store.head_clocks()) == {"low", "low2"}


async def test_a_start_asked_in_a_round_whose_other_reads_failed_is_made_by_a_later_round(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The round's reads go out together: a start's request taken in a round whose restart-hold read failed was
    answered with the error and forgotten. With the processor off nothing else starts it: it stayed queued for
    good (before, the request stayed in Redis and the next round made the pass for it)."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        assert (await client.post("/queue/processor/stop")).status_code == 200
        r = await client.post("/jobs", json=job_body(tmp_path, "asked", training={"max_steps": 2}))
        assert r.status_code == 201 and r.json()["status"] == "pending", r.text
        cluster = client.scheduler.cluster
        real_hold, real_take = cluster.restart_hold, cluster.take_pass_requests
        taken: list[str] = []
        failed: list[bool] = []

        async def take() -> list[tuple[str, list[str] | None]]:
            requests = await real_take()
            taken.extend(request_id for request_id, _ in requests)
            return requests

        async def hold(why: str, seconds: float) -> tuple[bool, float, str]:
            answer = await real_hold(why, seconds)
            await asyncio.sleep(0.05)  # (the round's take has landed)
            if taken and not failed:
                failed.append(True)
                raise redis.ConnectionError("Connection closed by server.")  # (one lost reply)
            return answer

        cluster.restart_hold, cluster.take_pass_requests = hold, take
        try:
            assert (await client.post("/jobs/asked/start")).status_code == 200
            assert failed, "the round that took the start's request did not fail"
            job = await wait_job(client, "asked", lambda j: j["status"] != "queued", timeout=15)
            assert job["status"] in ("running", "completed"), job
        finally:
            cluster.restart_hold, cluster.take_pass_requests = real_hold, real_take


async def test_a_heads_clock_forgotten_by_a_priority_change_during_a_passs_starts_stays_forgotten(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The heads' clocks are written after the pass's starts: a priority change meanwhile forgot the head's clock
    (its time at the head of another priority, review CM), and the pass wrote the old one back."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="2x80") as client:
        await hog_the_gpu(client, tmp_path)  # (one of the two)
        assert (await client.post("/queue/processor/stop")).status_code == 200
        store, processor = client.app.state.training.store, client.scheduler.processor
        for name, gpus, priority in (("big", 2, 5), ("small", 1, 9)):
            r = await client.post("/jobs", json=job_body(tmp_path, name, num_gpus=gpus, priority=priority,
                                                          training={"max_steps": 2}))  # fmt: skip
            assert r.status_code == 201, r.text
            if r.json()["status"] == "pending":
                await store.transition(name, JobStatus.QUEUED, expect=(JobStatus.PENDING,))
        # big has waited at the head of priority 5 for an hour (its clock, as earlier passes kept it); the queue's
        # head was small, which this pass starts
        await store.r.hset(
            store.keys.head_since, mapping={"big": repr(clock.now() - 3600), "small": repr(clock.now() - 10)}
        )
        await store.r.set(store.keys.queue_head, json.dumps(["small", clock.now() - 10]))
        real = processor.start_run
        changed: list[float] = []

        async def start_run(job: Any, gpu_ids: list[int]) -> bool:
            r = await client.patch("/jobs/big", json={"priority": 6})  # (a user, as the pass starts others)
            assert r.status_code == 200, r.text
            changed.append(clock.now())
            return await real(job, gpu_ids)

        processor.start_run = start_run
        try:
            before = clock.now()
            started = await processor.run_pass(only={"small"})
        finally:
            processor.start_run = real
        assert started == ["small"] and changed, (started, changed)
        since = await store.r.hget(store.keys.head_since, "big")
        assert since is None or float(since) >= changed[0], (since, before, changed)


async def test_the_window_a_pass_plans_after_a_runs_end_holds_the_predictions_that_end_taught(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The window a pass plans is the one the predictions' refresh read when it wrote none (one round trip fewer
    on the way from a run's end to the next start), and is read again when it wrote some."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False, SIMULATED_GPUS="2x80") as client:
        await hog_the_gpu(client, tmp_path)
        a = job_body(tmp_path, "a", auto_start=True, step_seconds=0.2, training={"max_steps": 20})
        assert (await client.post("/jobs", json=a)).json()["status"] == "running"
        # "b" waits, queued before anything was known of its kind, and no pass starts it once "a" ends.
        assert (await client.post("/queue/processor/stop")).status_code == 200
        b = job_body(tmp_path, "b", auto_start=True, training={"max_steps": 20})
        assert (await client.post("/jobs", json=b)).json()["status"] == "queued"
        await wait_job(client, "a", lambda j: j["status"] == "completed")
        store = client.app.state.training.store

        async def stored() -> dict[str, float | None]:
            return {job_id: meta.estimated_duration for job_id, meta in await store.queue_window(0, 10)}

        assert (await stored())["b"] is None  # (no pass since "a" ended)
        processor = client.scheduler.processor
        version = (await store.planning_state()).history_version
        written = {q.job_id: q.estimated_duration for q in await processor._predicted_window(version)}
        assert written["b"] is not None and written == await stored()
        processor._history_seen = None  # (the same news again: this refresh finds nothing to write)
        kept = {q.job_id: q.estimated_duration for q in await processor._predicted_window(version)}
        assert kept == written


async def test_a_run_that_ends_as_the_pass_reads_the_cluster_leaves_the_job_it_frees_the_gpu_for_predicted(
    redis_url: str, tmp_path: Path
) -> None:
    # A run's end teaches the history, then frees its GPUs. The pass read the history's version before the GPUs
    # and the history's after: when the end fell between, the pass saw the GPU free and the old version, and
    # started the job behind with no prediction, for good (a flake of test_predictions).
    async with idle_processor(redis_url, tmp_path, SIMULATED_GPUS="1x80") as processor:
        store = processor.store
        await running_for_an_hour(store, "a", 5, 0)
        await store.create(make_job("b", JobStatus.QUEUED), message="", actor="t")
        await processor.run_pass()  # (the history's version seen: nothing was known, nothing predicted)
        assert (await require(store, "b")).queued_prediction is None
        read = store.planning_state
        starts: list[str] = []

        async def end_of_a_then_read() -> PlanningState:
            a = await require(store, "a")
            assert await processor.history.learn(a, 3600.0, None, None)
            await store.transition("a", JobStatus.COMPLETED)
            return await read()

        async def start(job: Job, gpu_ids: list[int]) -> bool:
            starts.append(job.job_id)
            return False

        store.planning_state = end_of_a_then_read  # type: ignore[method-assign]
        processor.start_run = start  # type: ignore[method-assign]
        await processor.run_pass()
        assert starts == ["b"]
        b = await require(store, "b")
        assert b.queued_prediction is not None and b.queued_prediction.seconds == 3600.0, b.queued_prediction


@pytest.mark.parametrize("seconds", [60.0, None])
async def test_the_window_a_pass_plans_leaves_out_a_job_that_left_the_queue_while_its_prediction_was_made(
    app_factory: Callable[..., Any], tmp_path: Path, seconds: float | None
) -> None:
    """A refresh whose predictions found none of their jobs still waiting (they left the queue after it read the
    window), or that found none to make, handed the pass the window it read: the jobs that left were planned."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False, SIMULATED_GPUS="1x80") as client:
        await hog_the_gpu(client, tmp_path)
        assert (await client.post("/queue/processor/stop")).status_code == 200
        b = job_body(tmp_path, "b", auto_start=True, training={"max_steps": 20})
        assert (await client.post("/jobs", json=b)).json()["status"] == "queued"
        processor = client.scheduler.processor
        predict = processor.history.predict

        async def predict_while_b_leaves(job: Any, version: int | None = None) -> Any:
            assert (await client.post("/jobs/b/stop")).status_code == 200  # (queued: it leaves the queue)
            found = await predict(job, version)
            return found.model_copy(update={"seconds": seconds, "source": "history" if seconds else None})

        processor.history.predict = predict_while_b_leaves
        processor._history_seen = None
        version = (await processor.store.planning_state()).history_version
        window = [q.job_id for q in await processor._predicted_window(version)]
        assert (await client.get("/jobs/b")).json()["status"] == "cancelled"
        assert "b" not in window, window


async def test_a_heads_clock_forgotten_by_a_priority_change_while_the_pass_plans_stays_forgotten(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The pass reads the heads' clocks with its first reads and writes the queue's head, with the clock it read,
    after its plan: a priority change in between forgot the clock (its time at the head of another priority,
    review CM), and the pass wrote it back, for good. The job raised was at once hard at its new priority: a job
    of that priority that could take the free GPU waited behind it."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="2x80") as client:
        await hog_the_gpu(client, tmp_path)  # (one of the two)
        assert (await client.post("/queue/processor/stop")).status_code == 200
        store, processor = client.app.state.training.store, client.scheduler.processor
        r = await client.post("/jobs", json=job_body(tmp_path, "big", num_gpus=2, priority=5,
                                                      training={"max_steps": 2}))  # fmt: skip
        assert r.status_code == 201, r.text
        if r.json()["status"] == "pending":
            await store.transition("big", JobStatus.QUEUED, expect=(JobStatus.PENDING,))
        # big has headed priority 5 for an hour (its clock, as earlier passes kept it); no head is stored.
        await store.r.hset(store.keys.head_since, "big", repr(clock.now() - 3600))
        await store.r.delete(store.keys.queue_head)
        real = processor.planner.plan
        changed: list[float] = []

        async def plan(*args: Any, **kwargs: Any) -> Any:
            found = await real(*args, **kwargs)
            if not changed:
                r = await client.patch("/jobs/big", json={"priority": 9})  # (a user, as the pass plans)
                assert r.status_code == 200, r.text
                changed.append(clock.now())
            return found

        processor.planner.plan = plan
        try:
            assert await processor.run_pass() == []
        finally:
            processor.planner.plan = real
        assert changed
        since = await store.r.hget(store.keys.head_since, "big")
        assert since is None or float(since) >= changed[0], (since, changed)
        # What it does: a job of big's new priority that the free GPU fits, and big's soft reservation lets
        # start (nothing tells when either ends), waits behind big as behind a head that waited an hour.
        r = await client.post("/jobs", json=job_body(tmp_path, "small", priority=9, training={"max_steps": 2}))
        if r.json()["status"] == "pending":
            await store.transition("small", JobStatus.QUEUED, expect=(JobStatus.PENDING,))
        assert await processor.run_pass() == ["small"]
        await client.post("/jobs/hog/stop")


@contextlib.asynccontextmanager
async def idle_processor(redis_url: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[QueueProcessor]:
    """A real scheduler's queue processor, not started: the test calls its steps."""
    settings = settings_for(redis_url, tmp_path, **overrides)
    service = RedisService(settings)
    await service.connect()
    try:
        yield Scheduler(settings, service).processor
    finally:
        await service.close()


def preempting_processor(redis_url: str, tmp_path: Path) -> contextlib.AbstractAsyncContextManager[QueueProcessor]:
    """`idle_processor` with PREEMPTION on, on 2 GPUs."""
    return idle_processor(redis_url, tmp_path, PREEMPTION=True, SIMULATED_GPUS="2x80")


async def running_for_an_hour(store: JobStore, job_id: str, priority: int, gpu: int) -> None:
    """A job recorded running on `gpu` for an hour, with no runner."""
    await store.create(make_job(job_id, priority=priority), message="", actor="t")
    await store.transition(job_id, JobStatus.RUNNING, acquire_gpus=[gpu],
                           fields={"gpu_ids": [gpu], "started_at": time.time() - 3600})  # fmt: skip


async def test_a_run_whose_record_is_gone_is_not_a_reason_to_preempt_another(redis_url: str, tmp_path: Path) -> None:
    # Its record evicted by Redis (or deleted by hand) while it runs: its index entry and lease stay until the
    # watchdog forgets it, and its runner stops on finding no record. The view gave it no GPUs (they come from the
    # record), so GPU 0 stayed busy for preemption, and "low" was preempted for it (review EK).
    async with preempting_processor(redis_url, tmp_path) as processor:
        store = processor.store
        for job_id, priority, gpu in (("gone", 7, 0), ("low", 1, 1)):
            await running_for_an_hour(store, job_id, priority, gpu)
        await store.create(make_job("head", JobStatus.QUEUED, priority=5), message="", actor="t")
        await store.r.delete(store.keys.job("gone"))
        view = await build_view(store, processor.inventory.snapshot(), reclaim=True)
        assert [(r.job_id, r.gpu_ids) for r in view.running if r.job_id == "gone"] == [("gone", (0,))], view.running
        assert await processor.preempt("head", view) == []
        low = await require(store, "low")
        assert low.status == JobStatus.RUNNING and low.preempt_for is None, low


async def test_the_gpu_of_a_run_whose_record_is_gone_stays_held_until_its_trainer_is_gone(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Its runner, finding no record, stops swift: SIGTERM, the grace, SIGKILL. The watchdog freed its lease at
    # once, and "behind" started on the GPU while the trainer, ignoring SIGTERM, still ran (review EK).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80") as client:
        body = job_body(tmp_path, "stubborn", auto_start=True, hang_after_steps=1, ignore_sigterm=True)
        assert (await client.post("/jobs", json=body)).status_code == 201
        group = (await wait_job(client, "stubborn", lambda j: j["pid"] is not None))["pid"]
        r = await client.post("/jobs", json=job_body(tmp_path, "behind", auto_start=True, training={"max_steps": 2}))
        assert r.json()["status"] == "queued", r.text
        store = client.app.state.training.store
        await store.r.delete(store.keys.job("stubborn"))  # as an evicting Redis does
        deadline = time.monotonic() + 30
        while (await client.get("/jobs/behind")).json()["status"] == "queued":
            assert time.monotonic() < deadline, "behind never started"
            await asyncio.sleep(0.05)
        assert group_members(group) == [], "behind started on the GPU of a trainer still running"


@pytest.mark.parametrize("deleted", [False, True])
async def test_a_run_that_ends_between_the_passs_view_and_its_preemption_frees_its_gpu_and_no_run_is_preempted(
    redis_url: str, tmp_path: Path, deleted: bool
) -> None:
    # The pass plans and tries its starts between its view and the preemption: a run that ended meanwhile gave its
    # GPU back, and "low" was preempted (its work since its last checkpoint lost) for a GPU already free (hunt EH).
    async with preempting_processor(redis_url, tmp_path) as processor:
        store = processor.store
        # "done" (priority 7: above the head, never a victim) on GPU 0, "low" (priority 1) on GPU 1, both running
        # for an hour; "head" (priority 5, 1 GPU) waits.
        for job_id, priority, gpu in (("done", 7, 0), ("low", 1, 1)):
            await running_for_an_hour(store, job_id, priority, gpu)
        await store.create(make_job("head", JobStatus.QUEUED, priority=5), message="", actor="t")
        view = await build_view(store, processor.inventory.snapshot())
        await store.transition("done", JobStatus.COMPLETED)  # it ends after the view: GPU 0 is free
        if deleted:  # (and its record with it: review EJ, a record gone counted as a run going on)
            await store.delete("done")
        assert await processor.preempt("head", view) == []
        low = await store.get("low")
        assert low is not None and low.status == JobStatus.RUNNING and low.preempt_for is None, low


async def test_a_start_whose_job_was_deleted_and_created_again_under_its_id_does_not_run_the_old_ones_command(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The start's checks await (the look at its inputs, the version, the folder): Alice's queued job deleted and
    # Bob's created under its id meanwhile, the start recorded Alice's command, data and folder on Bob's job and
    # launched it (hunt EI).
    async with app_factory(scheduler=False, lead=True, API_KEYS=KEYS_SETTING, SIMULATED_GPUS="1x80") as client:
        r = await client.post("/jobs", json=job_body(tmp_path, "x", auto_start=True), headers=auth(ALICE_KEY))
        assert r.status_code == 201, r.text
        store = client.app.state.training.store
        starter = client.scheduler.processor.starter
        job = await store.get("x")
        assert job is not None and job.status == JobStatus.QUEUED
        inputs = starter._inputs_unmoved

        async def meanwhile(j: Any) -> Any:
            found = await inputs(j)
            assert (await client.delete("/jobs/x", headers=auth(ALICE_KEY))).status_code == 204
            body = {**job_body(tmp_path, "bobs", auto_start=True), "job_id": "x"}
            r = await client.post("/jobs", json=body, headers=auth(BOB_KEY))
            assert r.status_code == 201, r.text
            return found

        starter._inputs_unmoved = meanwhile
        with contextlib.suppress(TransitionRefused):
            assert not await starter.start(job, [0])
        now = await store.get("x")
        # Bob's job x, still queued, as his own (not running Alice's command, on her data, into output/x).
        assert now is not None and now.owner == "bob" and now.status == JobStatus.QUEUED, (
            now,
            now and now.command_line,
        )
        assert now.output_dir.endswith("bobs") and await store.leases() == {}


async def test_a_pause_asked_after_the_passs_view_keeps_another_run_from_being_preempted(
    redis_url: str, tmp_path: Path
) -> None:
    # The queue's window, which names the head, is read beside the view and can come after it: a pause asked in
    # between, and the run being paused still counted as busy and not ending. "healthy" (a checkpoint just saved:
    # the least work to lose) was preempted for GPUs that the pause was giving back (a stress loop of
    # test_run_control's pause test).
    async with preempting_processor(redis_url, tmp_path) as processor:
        store = processor.store
        for job_id, gpu in (("pausing", 0), ("healthy", 1)):
            await running_for_an_hour(store, job_id, 1, gpu)
        await store.update("healthy", {"last_checkpoint_at": time.time()})
        view = await build_view(store, processor.inventory.snapshot())
        await store.update("pausing", {"pause_requested": True})  # asked after the view
        await store.create(make_job("urgent", JobStatus.QUEUED, priority=9), message="", actor="t")
        assert await processor.preempt("urgent", view) == []
        healthy = await store.get("healthy")
        assert healthy is not None and healthy.preempt_for is None, healthy
