"""Predicted durations: the pure rules (time limits, plans, history), then each source through the API, with
real runners of the fake swift and a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from application.models.job_request import JobCreate
from application.services import process_group as pg
from application.services.predictions import (
    Prediction,
    StepSample,
    format_limit,
    hub_rows,
    parse_time_limit,
    plan_steps,
    predict,
    ratio_summary,
    recent_average,
    remaining_seconds,
    step_sample,
)
from application.services.process_group import group_members
from tests.conftest import gone, job_body, make_model, wait_job

# ---- time limits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90), ("90", 90), ("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("1d", 86400), ("45s", 45),
     (" 2H ", 7200), ("1d 2h", 93600)],
)  # fmt: skip
def test_time_limit_forms(value: int | str, seconds: int) -> None:
    assert parse_time_limit(value) == seconds


@pytest.mark.parametrize("value", ["", "2 weeks", "h", "1h1h", "-5", "5x", 0, 31 * 86400, "31d", "\u0661\u0662\u0663",
                                   "\U0001d7d7", "9" * 5000, 10**40, "1" * 30 + "s"])  # fmt: skip
def test_time_limit_refusals_say_what_to_send(value: int | str) -> None:
    with pytest.raises(ValueError, match="time_limit") as exc:
        parse_time_limit(value)
    assert len(str(exc.value)) < 200 and "sys.set_int_max_str_digits" not in str(exc.value)


def test_time_limit_is_a_request_field() -> None:
    req = JobCreate(data_path="d.jsonl", model_path="m", output_dir="o", time_limit="1h30m")
    assert req.time_limit_seconds == 5400
    with pytest.raises(ValueError, match="not a duration"):
        JobCreate(data_path="d.jsonl", model_path="m", output_dir="o", time_limit="soon")


def test_format_limit() -> None:
    assert [format_limit(s) for s in (2, 90, 5400, 93600)] == ["2 s", "1 min 30 s", "1 h 30 min", "1 d 2 h"]


# ---- plans -----------------------------------------------------------------------------------------------


def test_plan_steps() -> None:
    common = {"num_epochs": 2, "split_ratio": None, "batch_size": 2, "grad_accum": 4}
    # max_steps wins over everything else.
    assert plan_steps(max_steps=7, rows=None, num_gpus=1, **common) == 7  # type: ignore[arg-type]
    # 1000 rows, 2 x 4 x 2 GPUs = 16 rows per step: ceil(62.5) = 63 steps per epoch, 2 epochs.
    assert plan_steps(max_steps=None, rows=1000, num_gpus=2, **common) == 126  # type: ignore[arg-type]
    # A 10% validation split leaves 900 training rows: ceil(56.25) = 57 per epoch.
    split = {**common, "split_ratio": 0.1}
    assert plan_steps(max_steps=None, rows=1000, num_gpus=2, **split) == 114  # type: ignore[arg-type]
    assert plan_steps(max_steps=None, rows=None, num_gpus=2, **common) is None  # type: ignore[arg-type]
    # Half an epoch: the Trainer rounds the steps up (ceil(0.5 x 63) = 32).
    half = {**common, "num_epochs": 0.5}
    assert plan_steps(max_steps=None, rows=1000, num_gpus=2, **half) == 32  # type: ignore[arg-type]
    assert hub_rows("AI-ModelScope/coco#20000") == 20000 and hub_rows("AI-ModelScope/coco") is None


def test_step_samples_split_steps_from_overhead() -> None:
    # 100 steps at 0.5 s of 8 samples each, in a run of 80 s: 30 s were loading and saving.
    s = step_sample(80.0, 100, 0.5, 8)
    assert s == StepSample(seconds_per_sample=0.5 / 8, overhead=30.0)
    # No speed printed: every second counts as steps.
    assert step_sample(50.0, 100, None, 1) == StepSample(0.5, 0.0)
    assert step_sample(50.0, 0, None, 1) is None


def test_prediction_sources_in_order() -> None:
    profile = [StepSample(0.1, 20.0), StepSample(0.1, 30.0)]

    def both(time_limit: int | None) -> Prediction | None:
        return predict(time_limit=time_limit, steps=100, samples_per_step=4, profile=profile, durations=[500.0])

    assert both(3600) == Prediction(3600.0, "time_limit")
    plan = both(None)
    assert plan is not None and plan.source == "plan" and plan.seconds == pytest.approx(100 * 4 * 0.1 + 25.0)
    history = predict(time_limit=None, steps=None, samples_per_step=4, profile=profile, durations=[500.0, 700.0])
    assert history == Prediction(600.0, "history")
    assert predict(time_limit=None, steps=None, samples_per_step=4, profile=profile, durations=[]) is None


def test_recent_average_is_robust_to_one_odd_run() -> None:
    assert recent_average([100.0, 120.0]) == 110.0  # Tsafrir et al.: the mean of the last two
    assert recent_average([100.0, 5000.0, 110.0, 105.0, 95.0]) == 105.0
    assert recent_average([100.0] * 5 + [9999.0]) == 100.0  # only the newest few count
    assert recent_average([]) is None


def test_remaining_seconds_of_a_running_job() -> None:
    now = 1000.0
    assert remaining_seconds(predicted=300.0, started_at=900.0, time_limit=None, now=now) == 200.0
    # Past its prediction it may end any moment: unknown, not negative.
    assert remaining_seconds(predicted=50.0, started_at=900.0, time_limit=None, now=now) is None
    # The time limit caps it: the runner stops it there.
    assert remaining_seconds(predicted=None, started_at=900.0, time_limit=150, now=now) == 50.0
    assert remaining_seconds(predicted=900.0, started_at=900.0, time_limit=150, now=now) == 50.0
    assert remaining_seconds(predicted=None, started_at=900.0, time_limit=None, now=now) is None


def test_ratio_summary() -> None:
    assert ratio_summary([]) == {"count": 0, "median": None, "p90": None}
    s = ratio_summary([1.0, 2.0, 0.5, 1.5, 1.0, 1.0, 1.1, 0.9, 1.2, 3.0])
    assert s == {"count": 10, "median": 1.05, "p90": 2.0}


# ---- through the API -------------------------------------------------------------------------------------


def body(tmp_path: Path, name: str, **extra: Any) -> dict[str, Any]:
    return job_body(tmp_path, name, dataset="data", **extra)


async def test_each_source_through_the_api(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        # Nothing known yet.
        r = await client.post("/jobs", json=body(tmp_path, "first", training={"max_steps": 20}))
        assert r.status_code == 201 and r.json()["predicted_duration"] == {"seconds": None, "source": None}
        # A time limit is a prediction at once.
        r = await client.post("/jobs", json=body(tmp_path, "limited", time_limit="2h"))
        assert r.json()["predicted_duration"] == {"seconds": 7200.0, "source": "time_limit"}
        status = (await client.get("/jobs/limited/status")).json()
        assert status["time_limit_seconds"] == 7200 and status["predicted_duration"]["source"] == "time_limit"
        bad = await client.post("/jobs", json=body(tmp_path, "bad", time_limit="2 weeks"))
        assert bad.status_code == 422 and "time_limit" in bad.text and "'90m'" in bad.text

        # One run of the model teaches its speed: while it runs, swift's remaining time is the prediction.
        await client.post("/jobs/first/start")
        running = await wait_job(client, "first", lambda j: j["predicted_duration"]["source"] == "progress"
                                 or j["status"] == "completed")  # fmt: skip
        assert running["predicted_duration"]["seconds"] > 0
        done = await wait_job(client, "first", lambda j: j["status"] == "completed")
        actual = done["finished_at"] - done["started_at"]

        # The same model with twice the steps: a plan, about twice the steps' share of the first run.
        r = await client.post("/jobs", json=body(tmp_path, "again", training={"max_steps": 40}))
        predicted = r.json()["predicted_duration"]
        assert predicted["source"] == "plan"
        assert actual < predicted["seconds"] < 2 * actual + 1.0

        # `#N` on a local data set is what swift trains on (N rows sampled, or the set repeated): the plan is N
        # rows', not the file's count (a local `#N` was ignored: a 10x job was planned as the file).
        whole = (await client.post("/jobs", json=body(tmp_path, "whole"))).json()["predicted_duration"]
        stored = (await client.get("/jobs/whole")).json()
        rows, path = stored["dataset_rows"], stored["data_path"]
        plans = {}
        for name, n in (("same", rows), ("tenfold", 10 * rows)):
            r = await client.post("/jobs", json=body(tmp_path, name, data_path=f"{path}#{n}"))
            assert r.status_code == 201, r.text
            plans[name] = r.json()["predicted_duration"]
        assert whole["source"] == plans["same"]["source"] == plans["tenfold"]["source"] == "plan"
        assert plans["same"]["seconds"] == whole["seconds"] < plans["tenfold"]["seconds"]

        # A hub data set has no row count: similar jobs' durations are all there is.
        hub = {"data_path": "swift/self-cognition", "training": {"max_length": 512}}
        first = await client.post("/jobs", json=body(tmp_path, "hub1", **hub))
        assert first.json()["predicted_duration"]["source"] is None
        job = await client.app.state.training.store.get("hub1")
        await client.app.state.training.history.record(job, 120.0, None, None)
        await client.app.state.training.history.record(job, 180.0, None, None)
        second = await client.post("/jobs", json=body(tmp_path, "hub2", **hub))
        assert second.json()["predicted_duration"] == {"seconds": 150.0, "source": "history"}


async def test_a_job_queued_before_anything_was_known_gets_a_prediction(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False, SIMULATED_GPUS="1x80", QUEUE_POLL_INTERVAL=0.2) as client:
        r = await client.post("/jobs", json=body(tmp_path, "a", auto_start=True, training={"max_steps": 20}))
        assert r.json()["status"] == "running"
        r = await client.post("/jobs", json=body(tmp_path, "b", auto_start=True, training={"max_steps": 20}))
        assert r.json()["status"] == "queued" and r.json()["predicted_duration"]["source"] is None
        # "a" completes, its speed is recorded, the scheduler's next pass predicts "b" (it may also start it).
        b = await wait_job(client, "b", lambda j: j["queued_prediction"] is not None, timeout=30)
        assert b["queued_prediction"]["source"] == "plan"
        await wait_job(client, "b", lambda j: j["status"] == "completed")
        status = (await client.get("/queue/processor/status")).json()
        assert status["prediction_error"]["count"] >= 1 and status["prediction_error"]["median"] > 0


@pytest.mark.parametrize("ignore_sigterm", [False, True])
async def test_time_limit_stops_the_run_and_its_whole_tree(
    app_factory: Callable[..., Any], tmp_path: Path, ignore_sigterm: bool
) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    grace = 3 if ignore_sigterm else 1
    async with app_factory(AUTO_EXPORT=False, STOP_GRACE_SECONDS=grace) as client:
        b = job_body(tmp_path, "slow", step_seconds=0.2, ignore_sigterm=ignore_sigterm, auto_start=True,
                     time_limit=2, training={"max_steps": 1000, "save_steps": 2})  # fmt: skip
        r = await client.post("/jobs", json=b)
        assert r.status_code == 201 and r.json()["status"] == "running", r.text
        running = await wait_job(client, "slow", lambda j: j["pid"] is not None and j["runner"] is not None)
        group, runner = running["pid"], running["runner"]["pid"]
        if ignore_sigterm:
            # A pause asked during the limit's grace: the run still ends at its limit, not paused (nor, when
            # preempted then, back in the queue with a fresh limit).
            deadline = time.monotonic() + 20
            while "time_limit" not in [e["type"] for e in (await client.get("/jobs/slow/events")).json()["events"]]:
                assert time.monotonic() < deadline, "no time_limit event"
                await asyncio.sleep(0.05)
            paused = await client.post("/jobs/slow/pause")
            assert paused.status_code == 200 and paused.json()["status"] == "failed", paused.text
        job = await wait_job(client, "slow", lambda j: j["status"] != "running", timeout=20)
        assert job["status"] == "failed" and job["error_code"] == "time_limit"
        # swift expected ~200 s more: the run can take no longer than its limit, and its prediction says so.
        predicted = job["predicted_duration"]
        assert predicted == {"source": "time_limit", "seconds": 2}, predicted  # ("progress", hunt DK)
        assert "time limit of 2 s and was stopped" in job["error_message"] and "time_limit" in job["error_message"]
        assert job["stop_outcome"] == ("killed" if ignore_sigterm else "terminated")
        # Beside the log too, for a scheduler that finds its runner dead in the grace (hunt DK: "signal", retried).
        assert pg.exit_timed_out(pg.read_exit_record(Path(job["log_file"]).with_suffix(".exit.json")) or {})
        assert job["finished_at"] - job["started_at"] < 2 + grace + 3  # the limit, the grace, a poll or two
        if ignore_sigterm:  # its GPUs were held until the trainer was killed, not until its launcher went
            assert job["finished_at"] - job["started_at"] >= 2 + grace - 0.5, job
            assert job["attempts"][-1]["finished_at"] == job["finished_at"], job["attempts"]
        assert group_members(group) == []  # swift's launcher, trainer and workers: all gone
        deadline = time.monotonic() + 10
        while not gone(runner):
            assert time.monotonic() < deadline, "the runner outlived its run"
            await asyncio.sleep(0.05)
        events = (await client.get("/jobs/slow/events")).json()["events"]
        assert "time_limit" in [e["type"] for e in events]
        gpus = (await client.get("/gpus")).json()["gpus"]
        assert all(g["job_id"] is None for g in gpus)
