"""Pause, resume, retries, preemption and the checkpoints endpoint, through the API with real runners of the fake
swift (which resumes the way ms-swift 4.6.0 does) and a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from application.auth import Caller
from application.models.training_model import Attempt, JobStatus
from application.services import clock, job_start, run_control
from application.services import process_group as pg
from application.services.log_parser import RunFacts
from application.services.preemption import Candidate, choose_victims, preemption_wait
from application.services.run_control import _rest_as_asked
from application.services.run_end import RunEnd, checkpoint_step, retryable
from application.services.run_record import record_end
from application.services.scheduler import GpuState, QueuedJob
from tests.conftest import _until, job_body, make_model, settings_for, wait_job

T = TypeVar("T")
OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def steps_of(history: list[dict[str, Any]]) -> list[int]:
    return [p["step"] for p in history if p.get("loss") is not None]


# ---- pure rules ------------------------------------------------------------------------------------------


def test_retryable_failures() -> None:
    signal = RunEnd(JobStatus.FAILED, "m", "swift was killed by signal 9 (SIGKILL)", "signal")
    lost = RunEnd(JobStatus.FAILED, "m", "the runner died", "runner_lost")
    bad_arg = RunEnd(JobStatus.FAILED, "m", "ValueError: remaining_argv: ['--bogus']", "exit_code")
    oom = RunEnd(JobStatus.FAILED, "m", OOM, "exit_code")
    limit = RunEnd(JobStatus.FAILED, "m", "the run exceeded its time limit", "time_limit")
    assert retryable(signal, 7, None) and retryable(lost, None, None)
    assert not retryable(bad_arg, 3, None) and not retryable(limit, 9, None)
    assert retryable(oom, 7, None)
    before = Attempt(number=1, run_id="r", started_at=0, error_message=OOM, last_step=7)
    assert not retryable(oom, 7, before)  # CUDA OOM at the same step twice would only repeat
    assert retryable(oom, 9, before)
    assert checkpoint_step("/o/v1-x/checkpoint-120") == 120 and checkpoint_step(None) is None


def gpu(i: int, held: str | None = None) -> GpuState:
    return GpuState(i, 80.0, 1.0 if held else 80.0, 100.0 if held else 0.0, held)


def test_choose_victims_as_few_as_needed_lowest_priority_least_lost_newest() -> None:
    gpus = [gpu(0, "low-old"), gpu(1, "low-new"), gpu(2, "mid"), gpu(3, "top")]
    running = [
        Candidate("low-old", 1, (0,), started_at=100.0, lost_seconds=300.0),
        Candidate("low-new", 1, (1,), started_at=900.0, lost_seconds=300.0),
        Candidate("mid", 5, (2,), started_at=100.0, lost_seconds=5.0),
        Candidate("top", 9, (3,), started_at=100.0, lost_seconds=5.0),
    ]
    rules: dict[str, Any] = {"min_free_gb": 2.0, "max_util": 90.0, "min_run": 60.0, "now": 1000.0}
    one = QueuedJob("urgent", 9, 1000.0, 1, None, None, None)
    assert choose_victims(one, gpus, running, **rules) == ["low-new"]  # lowest priority, then most recent
    two = QueuedJob("urgent", 9, 1000.0, 2, None, None, None)
    assert sorted(choose_victims(two, gpus, running, **rules) or []) == ["low-new", "low-old"]
    three = QueuedJob("urgent", 9, 1000.0, 3, None, None, None)
    assert sorted(choose_victims(three, gpus, running, **rules) or []) == ["low-new", "low-old", "mid"]
    assert choose_victims(QueuedJob("urgent", 9, 1000.0, 4, None, None, None), gpus, running, **rules) is None
    # Strictly lower priority only, and never a job that has not run min_run since its start.
    assert choose_victims(QueuedJob("peer", 5, 1000.0, 3, None, None, None), gpus, running, **rules) is None
    assert choose_victims(one, gpus, running, **{**rules, "min_run": 950.0}) is None
    # Explicit GPU ids: the job holding that GPU, whatever else is cheaper.
    pinned = QueuedJob("urgent", 9, 1000.0, 1, (2,), None, None)
    assert choose_victims(pinned, gpus, running, **rules) == ["mid"]
    # Less work lost wins among equal priorities.
    cheaper = [*running[:1], Candidate("low-new", 1, (1,), 900.0, lost_seconds=900.0), *running[2:]]
    assert choose_victims(one, gpus, cheaper, **rules) == ["low-old"]
    # A run that ends within min_run, before the work its preemption would throw away, is waited for (hunt AZ:
    # 3,000 s of training were thrown away to save 5 s); and no other run is preempted before it has ended (its GPU
    # would be held idle until then: review BB). One that ends later, or whose end is unknown, is a victim.
    assert choose_victims(one, gpus, running, **rules, ends={"low-new": 5.0}) is None
    assert choose_victims(two, gpus, running, **rules, ends={"low-new": 5.0}) is None
    assert preemption_wait(two, gpus, running, **rules, ends={"low-new": 5.0}) == (5.0, ["low-old"])
    assert choose_victims(one, gpus, running, **rules, ends={"low-new": 200.0}) == ["low-new"]  # past min_run
    # A run it would not preempt (of the job's priority) ending soon puts nothing off (review BE).
    assert sorted(choose_victims(two, gpus, running, **rules, ends={"top": 1.0}) or []) == ["low-new", "low-old"]
    assert choose_victims(pinned, gpus, running, **rules, ends={"mid": 5.0}) is None
    assert choose_victims(pinned, gpus, running, **rules, ends={"mid": 50.0}) == ["mid"]
    assert preemption_wait(pinned, gpus, running, **rules, ends={"mid": 5.0}) is None  # (it frees the GPU itself)


def test_choose_victims_frees_no_more_gpus_and_stops_no_more_runs_than_needed() -> None:
    """Least work lost in wall seconds alone chose a 3-GPU run for a 1-GPU job, two of whose GPUs then sat idle
    and which could not run again until a third came free; and two 1-GPU runs where one 2-GPU run would do
    (hunt DI)."""
    rules: dict[str, Any] = {"min_free_gb": 2.0, "max_util": 90.0, "min_run": 60.0, "now": 1000.0}
    gpus = [gpu(0, "big"), gpu(1, "big"), gpu(2, "big"), gpu(3, "small")]
    running = [Candidate("big", 2, (0, 1, 2), 100.0, lost_seconds=100.0),
               Candidate("small", 2, (3,), 100.0, lost_seconds=101.0)]  # fmt: skip
    one = QueuedJob("urgent", 9, 1000.0, 1, None, None, None)
    assert choose_victims(one, gpus, running, **rules) == ["small"]
    gpus = [gpu(0, "a"), gpu(1, "b"), gpu(2, "c"), gpu(3, "c")]
    running = [Candidate("a", 2, (0,), 100.0, 10.0), Candidate("b", 2, (1,), 100.0, 10.0),
               Candidate("c", 2, (2, 3), 100.0, 500.0)]  # fmt: skip
    two = QueuedJob("urgent", 9, 1000.0, 2, None, None, None)
    assert choose_victims(two, gpus, running, **rules) == ["c"]
    # Fewer GPUs idle outranks fewer runs: two 1-GPU runs rather than a 3-GPU one for two GPUs.
    gpus = [gpu(0, "a"), gpu(1, "b"), gpu(2, "c"), gpu(3, "c"), gpu(4, "c")]
    running = [Candidate("a", 2, (0,), 100.0, 10.0), Candidate("b", 2, (1,), 100.0, 10.0),
               Candidate("c", 2, (2, 3, 4), 100.0, 1.0)]  # fmt: skip
    assert sorted(choose_victims(two, gpus, running, **rules) or []) == ["a", "b"]
    # The lowest priority outranks all of it: a priority-1 3-GPU run before a priority-2 1-GPU one.
    running = [Candidate("a", 2, (0,), 100.0, 10.0), Candidate("c", 1, (2, 3, 4), 100.0, 900.0)]
    assert choose_victims(one, gpus, running, **rules) == ["c"]
    # Pinned: only the run on the GPU it names, however much else it holds.
    assert choose_victims(QueuedJob("u", 9, 1000.0, 1, (3,), None, None), gpus, running, **rules) == ["c"]


def test_choose_victims_among_many_runs_still_takes_as_few_as_needed() -> None:
    # Past EXACT_SEARCH_MAX runs the choice is greedy: four 1-GPU runs were stopped where one 4-GPU run would do
    # (review DL).
    rules: dict[str, Any] = {"min_free_gb": 2.0, "max_util": 90.0, "min_run": 60.0, "now": 1000.0}
    gpus = [gpu(i, f"r{i}") for i in range(16)]
    running = [Candidate(f"r{i}", 1, (i,), 100.0, lost_seconds=100.0 + i) for i in range(16)]
    three = QueuedJob("urgent", 9, 1000.0, 3, None, None, None)
    assert sorted(choose_victims(three, gpus, running, **rules) or []) == ["r0", "r1", "r2"]
    mixed = [*running[:12], Candidate("four", 1, (12, 13, 14, 15), 100.0, lost_seconds=500.0)]
    assert choose_victims(QueuedJob("u", 9, 1000.0, 4, None, None, None), gpus, mixed, **rules) == ["four"]


def test_choose_victims_stops_no_run_while_one_of_a_lower_priority_trains_on() -> None:
    # Two priority-1 runs were stopped where the priority-0 run and one priority-1 run would do (review DL).
    rules: dict[str, Any] = {"min_free_gb": 2.0, "max_util": 90.0, "min_run": 60.0, "now": 1000.0}
    gpus = [gpu(0, "low"), gpu(1, "mid1"), gpu(2, "mid2")]
    running = [Candidate("low", 0, (0,), 100.0, lost_seconds=3000.0), Candidate("mid1", 1, (1,), 100.0, 60.0),
               Candidate("mid2", 1, (2,), 100.0, 60.0)]  # fmt: skip
    two = QueuedJob("u", 9, 1000.0, 2, None, None, None)
    assert sorted(choose_victims(two, gpus, running, **rules) or []) == ["low", "mid1"]


def test_preemption_wait_is_when_enough_lower_priority_runs_may_be_preempted() -> None:
    gpus = [gpu(0, "young"), gpu(1, "old"), gpu(2, "peer")]
    running = [
        Candidate("young", 1, (0,), started_at=900.0, lost_seconds=10.0),
        Candidate("old", 1, (1,), started_at=100.0, lost_seconds=10.0),
        Candidate("peer", 9, (2,), started_at=100.0, lost_seconds=10.0),
    ]
    rules: dict[str, Any] = {"min_free_gb": 2.0, "max_util": 90.0, "min_run": 600.0, "now": 1000.0}
    assert preemption_wait(QueuedJob("u", 9, 1000.0, 1, None, None, None), gpus, running, **rules) == (0.0, ["old"])
    # A run that ends by itself (its time limit) before it may be preempted: when it ends, the one other victim
    # that job still needs; and none at all when its end frees enough (it was told "preempting young in 500 s").
    two = QueuedJob("u", 9, 1000.0, 2, None, None, None)
    assert preemption_wait(two, gpus, running, **rules, ends={"young": 100.0}) == (100.0, ["old"])
    assert preemption_wait(QueuedJob("u", 9, 1000.0, 1, (0,), None, None), gpus, running, **rules,
                           ends={"young": 100.0}) is None  # fmt: skip
    # Two GPUs: once the young run has run min_run too (at 1500).
    assert preemption_wait(QueuedJob("u", 9, 1000.0, 2, None, None, None), gpus, running, **rules) == (
        500.0, ["young", "old"])  # fmt: skip
    # Never: a run of the same priority is no victim, and a run asked to stop already gives its GPU anyway.
    assert preemption_wait(QueuedJob("u", 9, 1000.0, 3, None, None, None), gpus, running, **rules) is None
    # A fractional minimum run time: started_at + min_run - started_at may round below min_run.
    odd = [Candidate("r", 1, (0,), started_at=1e9 + 0.1, lost_seconds=1.0)]
    found = preemption_wait(QueuedJob("u", 9, 1.0, 1, None, None, None), [gpu(0, "r")], odd,
                            **{**rules, "min_run": 90.3, "now": 1e9 + 10})  # fmt: skip
    assert found is not None and found[1] == ["r"] and found[0] == pytest.approx(80.4), found
    ending = [Candidate("young", 1, (0,), 900.0, 10.0, ending=True), *running[1:]]
    assert preemption_wait(QueuedJob("u", 9, 1000.0, 1, (0,), None, None), gpus, ending, **rules) is None


# ---- pause and resume ------------------------------------------------------------------------------------


async def test_a_job_stopped_while_it_waits_to_run_again_can_still_be_resumed(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Resumed (or preempted, or retried) and waiting for a GPU, it is queued like a job that never ran: a stop
    then cancelled it, and its checkpoints could no longer be resumed, while a stop of the same job paused left
    it stopped and resumable."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="1x80", AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "saver", step_seconds=0.05, auto_start=True,
                        training={"max_steps": 200, "save_steps": 5})  # fmt: skip
        assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        await wait_job(client, "saver", lambda j: (j["progress"]["current_step"] or 0) >= 6)
        assert (await client.post("/jobs/saver/pause")).json()["status"] == "paused"
        hog = job_body(tmp_path, "hog", hang_after_steps=1, auto_start=True)
        assert (await client.post("/jobs", json=hog)).json()["status"] == "running"
        waiting = (await client.post("/jobs/saver/resume")).json()
        assert waiting["status"] == "queued" and waiting["resume_step"] >= 5, waiting
        r = await client.post("/jobs/saver/stop")
        assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
        assert "still resumes it" in r.json()["message"] and r.json()["resume_from"] == waiting["resume_from"]
        assert r.json()["resume_step"] == waiting["resume_step"], r.text  # (it said the checkpoint, not its step)
        assert (await client.get("/queue")).json()["summary"]["length"] == 0
        again = await client.post("/jobs/saver/resume")
        assert again.status_code == 200 and again.json()["resume_step"] == waiting["resume_step"], again.text
        # Taken out of the queue by DELETE /queue/{id}: the same.
        removed = await client.delete("/queue/saver")
        assert removed.status_code == 200 and removed.json()["status"] == "stopped", removed.text
        # One that ran but saved nothing has nothing to resume: cancelled, as one that never ran.
        assert (await client.post("/jobs/hog/stop")).json()["status"] == "stopped"
        no_saves = {"max_steps": 400, "save_steps": 1000}
        early = job_body(tmp_path, "early", step_seconds=0.05, auto_start=True, training=no_saves)
        assert (await client.post("/jobs", json=early)).json()["status"] == "running"
        await wait_job(client, "early", lambda j: (j["progress"]["current_step"] or 0) >= 2)
        assert (await client.post("/jobs/early/pause")).json()["status"] == "paused"
        assert (await client.post("/jobs", json=job_body(tmp_path, "hog2", hang_after_steps=1, auto_start=True))
                ).json()["status"] == "running"  # fmt: skip
        assert (await client.post("/jobs/early/resume")).json()["status"] == "queued"
        assert (await client.post("/jobs/early/stop")).json()["status"] == "cancelled"
        # One that never ran is cancelled as before.
        fresh = job_body(tmp_path, "fresh", auto_start=True)
        assert (await client.post("/jobs", json=fresh)).json()["status"] == "queued"
        assert (await client.post("/jobs/fresh/stop")).json()["status"] == "cancelled"


async def test_a_pause_that_a_stop_overtakes_claims_no_lost_steps(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A pause asked while a stop is under way: the job ends stopped; the pause's answer said 'lost_steps' = every
    step trained and 'resume_from' null, as if nothing could be resumed."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False, STOP_GRACE_SECONDS=2) as client:
        # Its trainer ignores SIGTERM: the stop takes the whole grace, and the pause surely comes within it.
        body = job_body(tmp_path, "both", step_seconds=0.05, ignore_sigterm=True, auto_start=True,
                        training={"max_steps": 400, "save_steps": 5})  # fmt: skip
        assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        await wait_job(client, "both", lambda j: (j["progress"]["current_step"] or 0) >= 7)
        stop = asyncio.create_task(client.post("/jobs/both/stop"))
        await wait_job(client, "both", lambda j: j["stop_requested"])
        again = asyncio.create_task(client.post("/jobs/both/stop"))  # a user who asks twice
        paused = await client.post("/jobs/both/pause")
        stopped = await stop
        assert stopped.json()["status"] == "stopped", stopped.text
        assert (await again).json()["status"] == "stopped"
        answer = paused.json()
        assert answer["status"] == "stopped" and answer["lost_steps"] is None and answer["resume_step"] is None, answer
        events = [e["type"] for e in (await client.get("/jobs/both/events")).json()["events"]]
        assert events.count("stop_requested") == 1 and events.count("pause_requested") == 1, events
        resumed = await client.post("/jobs/both/resume")  # what the checkpoints keep
        assert resumed.status_code == 200 and resumed.json()["resume_step"] >= 5, resumed.text


async def test_many_stops_or_pauses_at_once_add_one_event(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    """Users (or a script's retries) asking at the same moment: each request read the flag unset and wrote its
    own event, 'stop requested' ten times for one stop (found by the concurrency hunt)."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    # (trainers that ignore SIGTERM: each run ends a grace after the first ask, once every ask has landed; one
    # that came after a quick end was told "already stopped")
    async with app_factory(SIMULATED_GPUS="2x80", AUTO_EXPORT=False, STOP_GRACE_SECONDS=3) as client:
        for name in ("stopped", "paused"):
            body = job_body(tmp_path, name, hang_after_steps=1, auto_start=True, ignore_sigterm=True,
                            training={"max_steps": 50})  # fmt: skip
            assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        await wait_job(client, "stopped", lambda j: (j["progress"]["current_step"] or 0) >= 1)
        await wait_job(client, "paused", lambda j: (j["progress"]["current_step"] or 0) >= 1)
        answers = await asyncio.gather(*(client.post("/jobs/stopped/stop") for _ in range(8)),
                                       *(client.post("/jobs/paused/pause") for _ in range(8)))  # fmt: skip
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        for name, event in (("stopped", "stop_requested"), ("paused", "pause_requested")):
            ended = name
            job = await wait_job(client, name, lambda j: j["status"] == ended)  # noqa: B023 (awaited here)
            events = [e["type"] for e in (await client.get(f"/jobs/{name}/events")).json()["events"]]
            assert events.count(event) == 1, (job["status"], events)


async def test_a_stop_or_a_pause_answers_for_its_run_when_someone_resumes_the_job_at_once(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two users: one stops (or pauses) a run, the other resumes the job as soon as that took effect. The stop,
    reading the job after the resume, took it for a run gone back to the queue by itself and stopped it again
    ("stopped while it waited to run again"): the resume answered "queued" never ran. With the resumed run
    started, a stop or a pause answered "not ended yet" after the whole grace (found by the concurrency hunt)."""
    from application.services import run_control

    monkeypatch.setattr(run_control, "POLL_SECONDS", 1.0)  # the answer reads the job late: the resume comes first
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="2x80", AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "t", step_seconds=0.05, auto_start=True, training={"max_steps": 400, "save_steps": 5})
        assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        await wait_job(client, "t", lambda j: (j["progress"]["current_step"] or 0) >= 6)
        # A priority-10 job waits for both GPUs: once t's run stops it takes them, and t's resume waits.
        hog = job_body(tmp_path, "hog", hang_after_steps=1, auto_start=True, num_gpus=2, priority=10)
        assert (await client.post("/jobs", json=hog)).json()["status"] == "queued"
        stop = asyncio.create_task(client.post("/jobs/t/stop"))
        await wait_job(client, "t", lambda j: j["status"] == "stopped")
        resumed = await client.post("/jobs/t/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "queued", resumed.text
        answer = (await stop).json()
        assert answer["message"].startswith("Training stopped"), answer
        assert answer["message"].endswith("it has been resumed since: queued now"), answer
        await wait_job(client, "hog", lambda j: j["status"] == "running")
        job = (await client.get("/jobs/t")).json()
        assert job["status"] == "queued", job["status"]  # the resume holds
        events = (await client.get("/jobs/t/events")).json()["events"]
        assert not [e for e in events if "waited to run again" in e["message"]], events

        # A pause, resumed at once, the resumed run starting on GPUs just freed.
        assert (await client.post("/jobs/hog/stop")).json()["status"] == "stopped"
        job = await wait_job(client, "t", lambda j: j["status"] == "running" and len(j["attempts"]) == 2)
        at = job["attempts"][-1]["first_step"]
        await wait_job(client, "t", lambda j: (j["progress"]["current_step"] or 0) >= at + 6)
        t0 = time.monotonic()
        pause = asyncio.create_task(client.post("/jobs/t/pause"))
        await wait_job(client, "t", lambda j: j["status"] == "paused")
        assert (await client.post("/jobs/t/resume")).status_code == 200
        answer = (await pause).json()
        assert answer["message"].startswith("Paused: resumes from"), answer
        assert "it has been resumed since" in answer["message"] and answer["resume_step"] > at, answer
        assert answer["lost_steps"] is not None and answer["lost_steps"] >= 0, answer
        assert time.monotonic() - t0 < 8, "it waited for the resumed run to end (the grace: 13 s)"


async def test_a_stops_answer_says_what_a_resume_would_do(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    """The stop of a running job named no checkpoint (hunt CY): the user learnt only by resuming whether the job
    could be resumed, and from where. Now it says so as the pause's answer does."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(SIMULATED_GPUS="2x80", AUTO_EXPORT=False) as client:
        training = {"max_steps": 400, "save_steps": 5}
        body = job_body(tmp_path, "saved", step_seconds=0.05, auto_start=True, training=training)
        assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        bare = job_body(tmp_path, "bare", hang_after_steps=1, auto_start=True, training={"max_steps": 50})
        assert (await client.post("/jobs", json=bare)).json()["status"] == "running"
        await wait_job(client, "saved", lambda j: (j["progress"]["current_step"] or 0) >= 7)
        await wait_job(client, "bare", lambda j: (j["progress"]["current_step"] or 0) >= 1)
        stopped = (await client.post("/jobs/saved/stop")).json()
        assert stopped["status"] == "stopped" and stopped["resume_step"] is not None, stopped
        assert stopped["resume_step"] >= 5 and stopped["resume_step"] % 5 == 0, stopped
        assert stopped["resume_from"].endswith(f"/checkpoint-{stopped['resume_step']}"), stopped
        assert stopped["lost_steps"] is not None and stopped["lost_steps"] >= 0, stopped
        assert f"POST .../resume resumes it from {stopped['resume_from']}" in stopped["message"], stopped
        resumed = (await client.post("/jobs/saved/resume")).json()
        assert resumed["resume_from"] == stopped["resume_from"], (stopped, resumed)

        answer = (await client.post("/jobs/bare/stop")).json()
        assert answer["status"] == "stopped" and answer["resume_from"] is None and answer["lost_steps"] is None
        assert answer["message"].endswith("it saved no checkpoint: POST .../resume cannot resume it"), answer
        refused = await client.post("/jobs/bare/resume")
        assert refused.status_code == 409 and "no checkpoint" in refused.json()["detail"], refused.text


async def test_pause_then_resume_continues_from_the_checkpoint(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory() as client:
        training = {"max_steps": 40, "save_steps": 10, "logging_steps": 1, "save_total_limit": 5}
        # (its first run waits at step 14 for the pause: a loaded machine let it run past step 20 before it came)
        body = job_body(tmp_path, "pr", step_seconds=0.05, resume_skip_seconds=1.5, auto_start=True, training=training,
                        hang_first_run_after_steps=14)  # fmt: skip
        assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        await wait_job(client, "pr", lambda j: (j["progress"]["current_step"] or 0) >= 14)
        r = await client.post("/jobs/pr/pause")
        assert r.status_code == 200, r.text
        paused = r.json()
        assert paused["status"] == "paused" and paused["resume_step"] == 10
        assert paused["resume_from"].endswith("/checkpoint-10") and paused["lost_steps"] >= 4
        assert "checkpoint-10" in paused["message"]
        # save_only_model (the default) saves weights only: the resumed run's lr schedule starts over (real swift).
        assert "weights only (save_only_model): the optimizer and the learning-rate schedule" in paused["message"]
        assert all(g["job_id"] is None for g in (await client.get("/gpus")).json()["gpus"])
        rested = (await client.get("/jobs/pr")).json()
        assert rested["gpu_ids"] == [] and rested["attempts"][0]["gpu_ids"] == [0], rested
        assert (await client.get("/jobs/pr/status")).json()["gpu_ids"] == []
        assert (await client.post("/jobs/pr/pause")).status_code == 409
        r = await client.post("/jobs/pr/start")
        assert r.status_code == 409 and "resume it with POST .../jobs/pr/resume" in r.json()["detail"]
        event = (await client.get("/jobs/pr/events")).json()["events"][-1]
        assert event["type"] == "status_paused", event
        assert f"; the {paused['lost_steps']} steps trained after it are lost" in event["message"], event

        r = await client.post("/jobs/pr/resume")
        assert r.status_code == 200 and r.json()["status"] in ("queued", "running"), r.text
        assert r.json()["resume_step"] == 10 and "checkpoint-10" in r.json()["message"]
        assert "start again" in r.json()["message"], r.json()
        resumed = (await client.get("/jobs/pr/progress")).json()["progress"]  # before its first new step too
        assert resumed["current_step"] >= 10 and resumed["percentage"] >= 25.0, resumed
        # swift's bar starts again at 0 while it skips the checkpoint's data: the job stays at its step (it fell
        # to 0% for the whole skip).
        await wait_job(client, "pr", lambda j: (j["progress"]["current_step"] or 0) > 10 or
                       (j["progress"]["current_step"] or 0) < 10)  # fmt: skip
        assert (await client.get("/jobs/pr")).json()["progress"]["current_step"] > 10
        done = await wait_job(client, "pr", lambda j: j["status"] == "completed" and j["export"]["status"] not in
                              ("none", "running"))  # fmt: skip
        assert done["progress"]["current_step"] == 40
        first, second = done["attempts"]
        assert (first["outcome"], second["outcome"]) == ("paused", "completed")
        assert second["resumed_from"] == paused["resume_from"] and second["first_step"] == 10
        assert first["run_dir"] != second["run_dir"] and first["log_file"] != second["log_file"]
        logs = (await client.get("/jobs/pr/logs", params={"attempt": 1, "limit": 10000})).json()
        assert logs["log_file"] == first["log_file"] and logs["count"] > 0
        assert (await client.get("/jobs/pr/logs")).json()["log_file"] == second["log_file"]
        bad = await client.get("/jobs/pr/logs", params={"attempt": 3})
        assert bad.status_code == 404 and "its runs are 1 to 2" in bad.json()["detail"]
        bad = await client.get("/jobs/pr/logs", params={"attempt": 1, "kind": "export"})
        assert bad.status_code == 404 and "leave attempt out" in bad.json()["detail"]
        assert "--resume_from_checkpoint" in done["command"] and "--resume_only_model" in done["command"]
        # The loss history goes on from the checkpoint: no step twice, none missing.
        history = (await client.get("/jobs/pr/progress", params={"history_limit": 1000})).json()["history"]
        assert steps_of(history) == list(range(1, 41))
        # Checkpoints span both runs; the export merged the final one.
        cps = (await client.get("/jobs/pr/checkpoints")).json()
        assert [c["step"] for c in cps["checkpoints"]] == [10, 20, 30, 40]
        assert [c["attempt"] for c in cps["checkpoints"]] == [1, 2, 2, 2]
        assert cps["checkpoints"][-1]["resume"] and cps["resume_from"].endswith("checkpoint-40")
        assert done["export"]["status"] == "completed" and done["export"]["checkpoint"] == cps["exported"]
        assert cps["checkpoints"][-1]["exported"] and cps["checkpoints"][-1]["size_bytes"] > 0
        assert all(c["loss"] is not None and c["time"] for c in cps["checkpoints"])
        # A page of the newest: what one look at the job costs stays bounded however many a job keeps.
        newest = (await client.get("/jobs/pr/checkpoints", params={"limit": 2})).json()
        assert [c["step"] for c in newest["checkpoints"]] == [30, 40] and newest["total"] == cps["total"] == 4
        assert newest["resume_from"] == cps["resume_from"]
        assert [c["loss"] for c in newest["checkpoints"]] == [c["loss"] for c in cps["checkpoints"][2:]]
        older = (await client.get("/jobs/pr/checkpoints", params={"limit": 2, "offset": 3})).json()  # and older
        assert [c["step"] for c in older["checkpoints"]] == [10] and older["offset"] == 3 and older["total"] == 4
        events = [e["type"] for e in (await client.get("/jobs/pr/events")).json()["events"]]
        assert "paused" in events and events.count("status_running") == 2
        # Its running time is both runs' (it was the second's alone), not the pause between them.
        ran = sum(a["finished_at"] - a["started_at"] for a in done["attempts"])
        assert (await client.get("/jobs/pr/status")).json()["duration_seconds"] == pytest.approx(ran)


async def test_a_job_paused_once_its_training_ended_keeps_its_figures_through_a_resume_that_trains_no_step(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Paused in swift's shutdown after its last checkpoint, it resumed into a run that trains nothing: the job
    # completed with no loss, and the train_loss (0.0) and runtime of a run of no step (hunt CY).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory() as client:
        training = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}
        body = job_body(tmp_path, "late", hang_after_summary=True, auto_start=True, training=training)
        assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        ended = await wait_job(client, "late", lambda j: j["train_loss"] is not None)
        assert ended["progress"]["current_step"] == 4 and ended["progress"]["loss"] is not None
        paused = (await client.post("/jobs/late/pause")).json()
        assert paused["status"] == "paused" and paused["resume_step"] == 4 and paused["lost_steps"] == 0, paused
        assert (await client.post("/jobs/late/resume")).status_code == 200
        done = await wait_job(client, "late", lambda j: j["status"] == "completed")
        assert done["attempts"][-1]["first_step"] == 4
        assert done["train_loss"] == ended["train_loss"] != 0.0 and done["train_runtime"] == ended["train_runtime"]
        kept = ("current_step", "loss", "eval_loss", "learning_rate", "grad_norm", "token_acc", "epoch")
        assert {k: done["progress"][k] for k in kept} == {k: ended["progress"][k] for k in kept}, done["progress"]


async def test_a_stop_during_a_pause_grace_stops_the_job(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    # swift's launcher dies at the pause's SIGTERM, its trainer (ignoring SIGTERM) only at the grace's SIGKILL:
    # a stop sent in between was accepted while the job still ran, so it must decide how the run ends.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "pst", step_seconds=0.05, ignore_sigterm=True, auto_start=True,
                        training={"max_steps": 400, "save_steps": 5, "logging_steps": 1})  # fmt: skip
        await client.post("/jobs", json=body)
        job = await wait_job(client, "pst", lambda j: (j["progress"]["current_step"] or 0) >= 7)
        pause = asyncio.create_task(client.post("/jobs/pst/pause"))
        await _until(lambda: not _alive(job["pid"]), timeout=10)  # the launcher is gone, the trainer is not
        again = asyncio.create_task(client.post("/jobs/pst/pause"))  # a user who asks twice
        assert (await client.get("/jobs/pst")).json()["status"] == "running"
        r = await client.post("/jobs/pst/stop")
        assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
        assert (await pause).json()["status"] == "stopped"
        done = (await client.get("/jobs/pst")).json()
        assert done["status"] == "stopped" and done["attempts"][-1]["outcome"] == "stopped"
        assert (await again).json()["status"] == "stopped"
        events = [e["type"] for e in (await client.get("/jobs/pst/events")).json()["events"]]
        assert events.count("pause_requested") == 1 and events.count("stop_requested") == 1, events


async def test_resume_without_a_checkpoint_starts_again(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        # Long enough that the pause (at step 3) lands before the run's end on a loaded machine: a run that ends
        # by itself first is completed, as it should be, and there is nothing to resume.
        body = job_body(tmp_path, "nock", step_seconds=0.1, auto_start=True,
                        training={"max_steps": 24, "save_steps": 100, "logging_steps": 1})  # fmt: skip
        await client.post("/jobs", json=body)
        await wait_job(client, "nock", lambda j: (j["progress"]["current_step"] or 0) >= 3)
        paused = (await client.post("/jobs/nock/pause")).json()
        assert paused["status"] == "paused" and paused["resume_from"] is None
        assert "beginning" in paused["message"] and "steps it made will be trained again" in paused["message"]
        event = (await client.get("/jobs/nock/events")).json()["events"][-1]
        assert event["type"] == "status_paused" and "trained so far are lost" in event["message"], event
        r = (await client.post("/jobs/nock/resume")).json()
        assert r["resume_from"] is None and "starts from the beginning" in r["message"]
        done = await wait_job(client, "nock", lambda j: j["status"] == "completed")
        assert "--resume_from_checkpoint" not in done["command"] and len(done["attempts"]) == 2
        history = (await client.get("/jobs/nock/progress", params={"history_limit": 1000})).json()["history"]
        assert steps_of(history) == list(range(1, 25))


async def test_a_paused_job_that_saved_no_checkpoint_is_cancelled_by_a_stop_not_promised_a_resume(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A stop used to leave it `stopped` with "POST .../resume still resumes it", and the resume then said it left
    no checkpoint: a dead end the answer had promised a way out of."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "bare", step_seconds=0.1, auto_start=True,
                        training={"max_steps": 40, "save_steps": 100})  # fmt: skip
        await client.post("/jobs", json=body)
        await wait_job(client, "bare", lambda j: (j["progress"]["current_step"] or 0) >= 2)
        assert (await client.post("/jobs/bare/pause")).json()["resume_from"] is None
        r = await client.post("/jobs/bare/stop")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        assert "no checkpoint" in r.json()["message"] and "resume" not in r.json()["message"].split(":")[0], r.text
        assert (await client.get("/jobs/bare")).json()["status"] == "cancelled"
        again = await client.post("/jobs/bare/resume")
        assert again.status_code == 409 and "cancelled" in again.json()["detail"], again.text


async def a_job_that_left_checkpoints_in(client: Any, tmp_path: Path, folder: str) -> list[str]:
    first = job_body(tmp_path, folder, auto_start=True, training={"max_steps": 4, "save_steps": 2})
    first["job_id"] = "first"
    assert (await client.post("/jobs", json=first)).status_code == 201
    done = await wait_job(client, "first", lambda j: j["status"] == "completed")
    assert done["checkpoints"]
    return list(done["checkpoints"])


async def test_a_job_paused_before_swift_names_its_run_folder_has_no_checkpoint_of_an_earlier_job_there(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        earlier = await a_job_that_left_checkpoints_in(client, tmp_path, "shared")
        # The same folder, free again; swift takes seconds (imports, model load) before it names its run folder.
        body = job_body(tmp_path, "shared", dataset="slow", start_seconds=3, auto_start=True,
                        training={"max_steps": 4, "save_steps": 2, "logging_steps": 1})  # fmt: skip
        body["job_id"] = "second"
        assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        paused = (await client.post("/jobs/second/pause")).json()
        assert paused["status"] == "paused" and paused["resume_from"] is None, paused
        job = (await client.get("/jobs/second")).json()
        assert job["checkpoints"] == [] and job["last_checkpoint"] is None, (job["checkpoints"], earlier)
        r = (await client.post("/jobs/second/resume")).json()
        assert r["resume_from"] is None and "starts from the beginning" in r["message"], r
        done = await wait_job(client, "second", lambda j: j["status"] == "completed", timeout=40)
        assert "--resume_from_checkpoint" not in done["command"]
        assert not set(done["checkpoints"]) & set(earlier), done["checkpoints"]
        history = (await client.get("/jobs/second/progress", params={"history_limit": 100})).json()["history"]
        assert steps_of(history) == [1, 2, 3, 4]


async def test_resume_a_stopped_job_and_refusals(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        # (long enough that it is still running when the stop comes on a loaded machine)
        body = job_body(tmp_path, "st", step_seconds=0.05, auto_start=True,
                        training={"max_steps": 100, "save_steps": 5, "logging_steps": 1})  # fmt: skip
        await client.post("/jobs", json=body)
        await wait_job(client, "st", lambda j: (j["progress"]["current_step"] or 0) >= 7)
        assert (await client.post("/jobs/st/stop")).json()["status"] == "stopped"
        # Its runner wrote beside swift's exit status what it ended the run for (read should Redis forget it).
        log_file = Path((await client.get("/jobs/st")).json()["log_file"])
        assert pg.read_exit_asked(log_file.with_suffix(".exit.json")) == (True, False, None)
        r = await client.post("/jobs/st/start")
        assert r.status_code == 409 and "resume it from its last checkpoint with POST" in r.json()["detail"], r.text
        # Stopped is terminal, but its checkpoint can still be resumed; the output folder is claimed again.
        other = job_body(tmp_path, "st", step_seconds=0.05, training={"max_steps": 3}, job_id="taker")
        assert (await client.post("/jobs", json=other)).status_code == 201  # the folder was free meanwhile
        r = await client.post("/jobs/st/resume")
        assert r.status_code == 409 and "output_dir" in r.json()["detail"]
        await client.delete("/jobs/taker")
        # Both GPUs taken meanwhile: it waits, and does not show the GPUs of its last run as its own.
        hog = job_body(tmp_path, "hog", step_seconds=0.05, auto_start=True, num_gpus=2, training={"max_steps": 400})
        assert (await client.post("/jobs", json=hog)).json()["status"] == "running"
        r = await client.post("/jobs/st/resume")
        assert r.status_code == 200 and r.json()["resume_step"] % 5 == 0 and r.json()["resume_step"] >= 5, r.text
        assert r.json()["status"] == "queued" and not r.json()["gpu_ids"], r.text
        assert (await client.get("/jobs/st")).json()["gpu_ids"] == []
        assert (await client.post("/jobs/hog/stop")).json()["status"] == "stopped"
        done = await wait_job(client, "st", lambda j: j["status"] == "completed")
        assert done["finished_at"] > done["started_at"] and [a["outcome"] for a in done["attempts"]] == [
            "stopped", "completed"]  # fmt: skip
        assert (await client.post("/jobs/st/resume")).status_code == 409  # completed: nothing to resume
        # A failed run with no checkpoint cannot be resumed: the answer says what to do instead.
        bad = job_body(tmp_path, "bad", fail_at_step=1, auto_start=True, training={"max_steps": 5})
        await client.post("/jobs", json=bad)
        await wait_job(client, "bad", lambda j: j["status"] == "failed")
        r = await client.post("/jobs/bad/resume")
        assert r.status_code == 409 and "no checkpoint" in r.json()["detail"]
        # Nor does a start of it offer a resume that is then refused (lifecycle audit).
        r = await client.post("/jobs/bad/start")
        assert r.status_code == 409 and "/resume" not in r.json()["detail"], r.text
        assert "left no checkpoint" in r.json()["detail"] and "create a new job" in r.json()["detail"], r.text
        assert (await client.post("/jobs/nope/resume")).status_code == 404


# ---- retries ---------------------------------------------------------------------------------------------


async def test_retries_resume_a_killed_run_but_not_a_failure_that_repeats(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    # (a long poll: the end of a backoff wakes a pass itself; it waited for the next poll: review DU)
    async with app_factory(AUTO_EXPORT=False, SIMULATED_GPUS="3x80", RETRY_BACKOFF_SECONDS=2,
                           QUEUE_POLL_INTERVAL=60) as client:  # fmt: skip
        common: dict[str, Any] = {"auto_start": True, "max_retries": 2}
        killed = job_body(tmp_path, "killed", step_seconds=0.02, sigkill_at_step=7,
                          training={"max_steps": 12, "save_steps": 5, "logging_steps": 1}, **common)  # fmt: skip
        broken = job_body(tmp_path, "broken", fail_at_step=3, training={"max_steps": 12}, **common)
        oom = job_body(tmp_path, "oom", step_seconds=0.02, fail_at_step=7, fail_message=OOM,
                       training={"max_steps": 12, "save_steps": 5}, **{**common, "max_retries": 3})  # fmt: skip
        for b in (killed, broken, oom):
            assert (await client.post("/jobs", json=b)).status_code == 201

        # Back in the queue, it waits out its backoff with GPUs free, and says so (hunt DK: a minute-long fault
        # used up every retry in seconds).
        waiting = await wait_job(client, "killed", lambda j: j["retries"] == 1 or j["status"] == "failed")
        status = (await client.get("/jobs/killed/status")).json()
        if status["status"] == "queued":  # (unless the 2 s were over by this read)
            assert status["pending_reason"]["code"] == "retry_backoff", status
        done = await wait_job(client, "killed", lambda j: j["status"] in ("completed", "failed"))
        assert done["status"] == "completed" and done["retries"] == 1
        first, second = done["attempts"]
        assert (first["outcome"], first["error_code"]) == ("retried", "signal")
        events = (await client.get("/jobs/killed/events")).json()["events"]
        retry = next(e for e in events if e["type"] == "retry")
        assert "retry 1 of 2" in retry["message"] and retry["data"]["resume_step"] == 5
        assert "starts again in less than a minute at the earliest" in retry["message"], retry["message"]
        retry_at = retry["data"]["retry_at"]
        assert retry_at == pytest.approx(first["finished_at"] + 2, abs=0.01), retry
        assert waiting["retry_at"] in (retry_at, None), waiting  # (None: it ran again by that read)
        if status["status"] == "queued":
            assert status["pending_reason"]["starts_at"] == pytest.approx(retry_at, abs=0.01), status
        assert retry_at <= second["started_at"] < retry_at + 5, done
        assert done["retry_at"] is None  # (its backoff is over once it runs again)
        assert second["resumed_from"].endswith("checkpoint-5") and second["outcome"] == "completed"

        failed = await wait_job(client, "broken", lambda j: j["status"] == "failed")
        assert len(failed["attempts"]) == 1 and failed["retries"] == 0  # an error that would repeat
        # ... and it says why it ends the job that had retries (hunt DK: only swift's error was shown).
        assert failed["error_message"].endswith("(not retried: an error the run printed would only repeat)")

        oomed = await wait_job(client, "oom", lambda j: j["status"] == "failed", timeout=40)
        assert [a["outcome"] for a in oomed["attempts"]] == ["retried", "failed"]  # the same step twice: stop
        assert oomed["attempts"][1]["started_at"] >= oomed["attempts"][0]["finished_at"] + 2, oomed
        assert "CUDA out of memory" in oomed["error_message"]
        assert oomed["error_message"].endswith("(not retried: out of GPU memory at step 7 again)"), oomed


async def test_a_retry_in_its_backoff_with_the_processor_stopped(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review DW: once its backoff was over, with no pass since (the processor stopped), the scheduler's loop turned
    every 50 ms, reading the GPUs and publishing them each time, until the processor was started again; a start
    meanwhile said to start it again "when its GPUs are free"; and a stop left its retry_at on the ended job."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False, RETRY_BACKOFF_SECONDS=2, QUEUE_POLL_INTERVAL=5) as client:
        body = job_body(tmp_path, "killed", step_seconds=0.02, sigkill_at_step=3, auto_start=True, max_retries=2,
                        training={"max_steps": 50})  # fmt: skip
        assert (await client.post("/jobs", json=body)).status_code == 201
        job = await wait_job(client, "killed", lambda j: j["retries"] == 1 and j["status"] == "queued")
        assert (await client.post("/queue/processor/stop")).status_code == 200
        started = (await client.post("/jobs/killed/start")).json()
        assert started["status"] == "queued" and "processor" in started["message"], started
        assert "retried: it waits" in started["message"] and "GPUs are free" not in started["message"], started

        processor = client.scheduler.processor
        views = 0
        view = processor.view

        async def counted() -> Any:
            nonlocal views
            views += 1
            return await view()

        monkeypatch.setattr(processor, "view", counted)
        await _until(lambda: time.time() > job["retry_at"] + 0.5)
        views = 0
        await asyncio.sleep(2)  # (a measure of how often the loop turns, not a wait for something to happen)
        assert views <= 1, f"the scheduler's loop turned {views} times in 2 s with QUEUE_POLL_INTERVAL=5"

        assert (await client.post("/jobs/killed/stop")).status_code == 200
        ended = (await client.get("/jobs/killed")).json()
        assert ended["status"] in ("cancelled", "stopped") and ended["retry_at"] is None, ended


async def test_a_stop_or_a_pause_that_lands_as_a_run_ends_retried_takes_effect_before_its_backoff_ends(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A pause (or stop) accepted just after the runner read its flags: the run ends "retried" and the job goes
    back to the queue with the request still asked. It was honoured only by the start that would have run the job,
    once its backoff (up to 10 minutes) was over: queued all that time, answered "the run had already ended"
    (review DU)."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False, SIMULATED_GPUS="2x80", RETRY_BACKOFF_SECONDS=600) as client:
        store = client.app.state.training.store
        for name in ("paused", "stopped"):
            body = job_body(tmp_path, name, step_seconds=0.02, sigkill_at_step=7, auto_start=True, max_retries=1,
                            training={"max_steps": 12, "save_steps": 5, "logging_steps": 1})  # fmt: skip
            assert (await client.post("/jobs", json=body)).status_code == 201
        for name in ("paused", "stopped"):
            await wait_job(client, name, lambda j: j["retries"] == 1 and j["status"] == "queued")
        # What the race leaves: the request written after the run's end was read (the API's own pause answers
        # with the job paused when it sees this; the scheduler pauses any it did not see).
        await store.update("paused", {"pause_requested": True}, statuses=(JobStatus.QUEUED,))
        await store.update("stopped", {"stop_requested": True}, statuses=(JobStatus.QUEUED,))
        paused = await wait_job(client, "paused", lambda j: j["status"] != "queued", timeout=20)
        assert paused["status"] == "paused" and paused["retry_at"] is None and not paused["pause_requested"], paused
        stopped = await wait_job(client, "stopped", lambda j: j["status"] != "queued", timeout=20)
        assert stopped["status"] == "stopped", stopped
        events = (await client.get("/jobs/paused/events")).json()["events"]
        assert events[-1]["message"].startswith("paused on request as its last run ended: resumes from "), events[-1]
        # Resumed, it runs at once: the backoff was the failed run's, not the resumed job's.
        assert (await client.post("/jobs/paused/resume")).status_code == 200
        done = await wait_job(client, "paused", lambda j: j["status"] in ("completed", "failed"), timeout=40)
        assert done["status"] == "completed", done


@pytest.mark.parametrize("also_stop", [False, True])
async def test_a_pause_that_lands_as_the_run_ends_retried_answers_with_the_job_paused_or_stopped(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, also_stop: bool
) -> None:
    """The pause request's own part of the race above: it answered "the run had already ended (retried)" and left
    the job queued. A stop asked as well wins, as it does in the scheduler (review DY: the pause won)."""
    from application.services.run_control import RunControl

    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False, SIMULATED_GPUS="2x80", RETRY_BACKOFF_SECONDS=600) as client:
        store = client.app.state.training.store
        body = job_body(tmp_path, "j", step_seconds=0.05, sigkill_at_step=7, auto_start=True, max_retries=1,
                        training={"max_steps": 40, "save_steps": 5, "logging_steps": 1})  # fmt: skip
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "j", lambda j: j["status"] == "running")
        assert (await client.post("/queue/processor/stop")).status_code == 200  # (no pass does it instead)

        async def late(self: RunControl, job: Any, flag: str, caller: Any) -> None:
            # The request written just after the runner read its flags: the run ends retried with it asked.
            await wait_job(client, "j", lambda j: j["retries"] == 1 and j["status"] == "queued")
            await store.update("j", {flag: True}, statuses=(JobStatus.QUEUED,))
            if also_stop:
                await store.update("j", {"stop_requested": True}, statuses=(JobStatus.QUEUED,))

        monkeypatch.setattr(RunControl, "_ask_once", late)
        answer = (await client.post("/jobs/j/pause")).json()
        job = (await client.get("/jobs/j")).json()
        if also_stop:
            assert answer["status"] == job["status"] == "stopped", (answer, job)  # (checkpoint-5 stays)
            assert answer["message"].endswith("a stop asked as well wins over the pause: the job is stopped"), answer
        else:
            assert answer["status"] == job["status"] == "paused" and job["retry_at"] is None, (answer, job)
            assert answer["message"].startswith("Paused: resumes from ") and answer["resume_step"] == 5, answer


async def test_a_run_killed_before_swift_names_its_run_folder_is_retried_from_the_beginning(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        earlier = await a_job_that_left_checkpoints_in(client, tmp_path, "shared")
        body = job_body(tmp_path, "shared", dataset="slow", start_seconds=3, auto_start=True, max_retries=1,
                        training={"max_steps": 4, "save_steps": 2})  # fmt: skip
        body["job_id"] = "second"
        assert (await client.post("/jobs", json=body)).status_code == 201
        job = await wait_job(client, "second", lambda j: j["pid"] is not None)
        os.killpg(job["pid"], signal.SIGKILL)  # the OOM killer, while swift still loads
        done = await wait_job(client, "second", lambda j: j["status"] in ("completed", "failed"), timeout=40)
        assert done["status"] == "completed" and [a["outcome"] for a in done["attempts"]] == ["retried", "completed"]
        assert done["attempts"][1]["resumed_from"] is None and "--resume_from_checkpoint" not in done["command"]
        retry = next(e for e in (await client.get("/jobs/second/events")).json()["events"] if e["type"] == "retry")
        assert not any(c in retry["message"] for c in earlier), retry["message"]


# ---- preemption ------------------------------------------------------------------------------------------


async def test_preemption_with_two_gpus_and_three_priorities(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    settings = {"PREEMPTION": True, "PREEMPTION_MIN_RUN_SECONDS": 0, "AUTO_EXPORT": False, "QUEUE_POLL_INTERVAL": 0.2}
    async with app_factory(**settings) as client:

        def long(name: str, priority: int, steps: int = 60) -> dict[str, Any]:
            return job_body(tmp_path, name, step_seconds=0.05, auto_start=True, priority=priority,
                            training={"max_steps": steps, "save_steps": 5, "logging_steps": 1})  # fmt: skip

        for name, prio in (("low", 1), ("mid", 5)):
            assert (await client.post("/jobs", json=long(name, prio))).json()["status"] == "running"
        await wait_job(client, "low", lambda j: (j["progress"]["current_step"] or 0) >= 6)
        low_gpu = (await client.get("/jobs/low")).json()["gpu_ids"]
        # An urgent job: the lowest priority makes way, not the middle one.
        await client.post("/jobs", json=long("urgent", 9, steps=10))
        urgent = await wait_job(client, "urgent", lambda j: j["status"] == "running", timeout=20)
        assert urgent["gpu_ids"] == low_gpu
        low = (await client.get("/jobs/low")).json()
        # Its last checkpoint (every 5 steps) before the preemption stopped it: how far it got depends on the
        # machine's load, not on the scheduler.
        step = int(low["resume_from"].rpartition("/checkpoint-")[2]) if low["status"] == "queued" else -1
        assert step % 5 == 0 and 5 <= step <= low["progress"]["current_step"], low
        assert (await client.get("/jobs/mid")).json()["status"] == "running"
        low_events = (await client.get("/jobs/low/events")).json()["events"]
        assert any(e["type"] == "preempted" and "urgent" in e["message"] for e in low_events)
        urgent_events = (await client.get("/jobs/urgent/events")).json()["events"]
        assert any(e["type"] == "preempting" and "low" in e["message"] for e in urgent_events)
        # Everything ends; the victim resumed from its checkpoint, at its place in the queue.
        for name in ("urgent", "mid", "low"):
            done = await wait_job(client, name, lambda j: j["status"] in ("completed", "failed"), timeout=60)
            assert done["status"] == "completed", (name, done["error_message"])
        low = (await client.get("/jobs/low")).json()
        assert [a["outcome"] for a in low["attempts"]] == ["preempted", "completed"]
        history = (await client.get("/jobs/low/progress", params={"history_limit": 1000})).json()["history"]
        assert steps_of(history) == list(range(1, 61))


# Preemption at once on two GPUs, with a short grace for a trainer that ignores SIGTERM.
PREEMPTING_2_GPUS: dict[str, Any] = {
    "PREEMPTION": True,
    "PREEMPTION_MIN_RUN_SECONDS": 0,
    "AUTO_EXPORT": False,
    "QUEUE_POLL_INTERVAL": 0.2,
    "STOP_GRACE_SECONDS": 3,
    "SIMULATED_GPUS": "2x80",
}


async def test_a_victim_does_not_take_back_the_gpu_it_freed_while_the_other_victim_stops(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Two victims for one job that needs both GPUs: the first stops at once and goes back to the queue, the
    second takes its grace. The pass in between planned with the second as running for its whole predicted
    time, so the first fitted "before" the head's reservation and started again on the GPU it had just freed."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(**PREEMPTING_2_GPUS) as client:
        # swift's remaining time becomes the runs' predictions: the first victim's run would end first.
        def long(name: str, priority: int, steps: int, **options: Any) -> dict[str, Any]:
            return job_body(tmp_path, name, priority=priority, step_seconds=0.05, auto_start=True,
                            training={"max_steps": steps, "save_steps": 5}, **options)  # fmt: skip

        assert (await client.post("/jobs", json=long("quick", 5, 150))).json()["status"] == "running"
        slow = long("slow", 2, 600, ignore_sigterm=True)
        assert (await client.post("/jobs", json=slow)).json()["status"] == "running"
        for name in ("quick", "slow"):
            await wait_job(client, name, lambda j: (j["progress"]["current_step"] or 0) >= 6)
        big = job_body(tmp_path, "big", priority=9, num_gpus=2, step_seconds=0.05, auto_start=True,
                       training={"max_steps": 5})  # fmt: skip
        assert (await client.post("/jobs", json=big)).json()["status"] == "queued"
        await wait_job(client, "big", lambda j: j["status"] in ("running", "completed"), timeout=30)
        quick = (await client.get("/jobs/quick")).json()
        assert quick["status"] == "queued" and [a["outcome"] for a in quick["attempts"]] == ["preempted"], quick
        events = (await client.get("/jobs/quick/events")).json()["events"]
        assert [e["type"] for e in events].count("preempted") == 1, events


async def test_a_gpu_freed_for_a_job_is_not_taken_by_another_of_its_priority_while_the_other_victim_stops(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The first victim stopped at once, and a job of the head's priority with no prediction took the GPU it
    freed (a young head's reservation bound only known durations): the head waited for that job as well, and
    on more GPUs the next pass preempted yet another run for it."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(**PREEMPTING_2_GPUS) as client:
        for name, priority, ignore_sigterm in (("quick", 5, False), ("slow", 2, True)):
            body = job_body(tmp_path, name, priority=priority, step_seconds=0.05, auto_start=True,
                            training={"max_steps": 600, "save_steps": 5}, ignore_sigterm=ignore_sigterm)  # fmt: skip
            assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        for name in ("quick", "slow"):
            await wait_job(client, name, lambda j: (j["progress"]["current_step"] or 0) >= 6)
        for name, gpus in (("big", 2), ("same", 1)):
            body = job_body(tmp_path, name, priority=9, num_gpus=gpus, step_seconds=0.05, auto_start=True,
                            training={"max_steps": 5})  # fmt: skip
            assert (await client.post("/jobs", json=body)).json()["status"] == "queued"
        big = await wait_job(client, "big", lambda j: j["status"] in ("running", "completed"), timeout=30)
        # "same" waited for "big": it had not started before it (on a loaded machine, "big" may be done by the
        # first look, and "same" then ran, rightly, on the GPUs it left).
        same = (await client.get("/jobs/same")).json()
        assert not same["attempts"] or same["attempts"][0]["started_at"] >= big["attempts"][0]["started_at"], same
        for name in ("big", "same"):
            done = await wait_job(client, name, lambda j: j["status"] in ("completed", "failed"), timeout=60)
            assert done["status"] == "completed", (name, done["error_message"])


async def test_while_its_victim_stops_a_waiting_job_says_it_is_being_made_way_for(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # From the preemption request until the victim's run had gone (a grace, for a trainer that ignores SIGTERM),
    # the waiting job said "not enough free GPUs", naming no one.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(**{**PREEMPTING_2_GPUS, "SIMULATED_GPUS": "1x80", "STOP_GRACE_SECONDS": 6}) as client:
        low = job_body(tmp_path, "low", priority=1, step_seconds=0.05, auto_start=True, ignore_sigterm=True,
                       training={"max_steps": 2000, "save_steps": 5})  # fmt: skip
        assert (await client.post("/jobs", json=low)).json()["status"] == "running"
        await wait_job(client, "low", lambda j: (j["progress"]["current_step"] or 0) >= 1)
        urgent = job_body(tmp_path, "urgent", priority=9, step_seconds=0.05, auto_start=True)
        assert (await client.post("/jobs", json=urgent)).json()["status"] == "queued"
        await wait_job(client, "low", lambda j: j["preempt_for"] == "urgent")
        status = (await client.get("/jobs/urgent/status")).json()
        assert status["status"] == "queued", status  # (the victim still stopping: its grace is 6 s)
        assert status["pending_reason"]["code"] == "preemption" and status["pending_reason"]["job_id"] == "low"
        await wait_job(client, "urgent", lambda j: j["status"] in ("running", "completed"), timeout=30)


async def test_no_run_is_preempted_for_the_gpu_of_a_run_being_paused(app_factory: Callable[..., Any],
                                                                      tmp_path: Path) -> None:  # fmt: skip
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(**PREEMPTING_2_GPUS) as client:
        # The one being paused has the most work to lose (no checkpoint yet): a victim it was not, so it was
        # the other run that lost its work for a GPU that was coming back anyway.
        for name, save, stubborn in (("pausing", 1000, True), ("healthy", 5, False)):
            body = job_body(tmp_path, name, priority=1, step_seconds=0.05, auto_start=True, ignore_sigterm=stubborn,
                            training={"max_steps": 2000, "save_steps": save})  # fmt: skip
            assert (await client.post("/jobs", json=body)).json()["status"] == "running"
            await wait_job(client, name, lambda j: (j["progress"]["current_step"] or 0) >= 1)
        # (a pause answers once the run has stopped: its trainer ignores SIGTERM, so after the grace)
        pause = asyncio.create_task(client.post("/jobs/pausing/pause"))
        await wait_job(client, "pausing", lambda j: j["pause_requested"])
        urgent = job_body(tmp_path, "urgent", priority=9, step_seconds=0.05, auto_start=True)
        assert (await client.post("/jobs", json=urgent)).json()["status"] == "queued"
        assert (await pause).status_code == 200
        await wait_job(client, "urgent", lambda j: j["status"] in ("running", "completed"), timeout=30)
        healthy = (await client.get("/jobs/healthy")).json()
        assert healthy["status"] == "running" and healthy["preempt_for"] is None, healthy
        assert (await client.get("/jobs/pausing")).json()["status"] == "paused"
        for name in ("pausing", "healthy"):
            events = (await client.get(f"/jobs/{name}/events")).json()["events"]
            assert "preemption_requested" not in [e["type"] for e in events], events
        assert (await client.post("/jobs/healthy/stop")).status_code == 200


async def test_no_run_is_preempted_for_the_gpu_of_a_run_past_its_time_limit(app_factory: Callable[..., Any],
                                                                              tmp_path: Path) -> None:  # fmt: skip
    # Its runner is stopping it (the grace of a trainer that ignores SIGTERM): its GPU comes back anyway, and the
    # other run lost its work since its last checkpoint for it.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(**PREEMPTING_2_GPUS) as client:
        for name, limit, stubborn in (("timing-out", 2, True), ("healthy", None, False)):
            body = job_body(tmp_path, name, priority=1, step_seconds=0.05, auto_start=True, ignore_sigterm=stubborn,
                            time_limit=limit, training={"max_steps": 2000, "save_steps": 5})  # fmt: skip
            assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        # What the limit leaves the run, on the server's clock (the CLI showed it on its own host's: hunt DT).
        status = (await client.get("/jobs/timing-out/status")).json()
        assert 0 <= status["time_limit_left_seconds"] <= 2, status
        assert (await client.get("/jobs/healthy/status")).json()["time_limit_left_seconds"] is None

        deadline = time.monotonic() + 30
        while "time_limit" not in [e["type"] for e in (await client.get("/jobs/timing-out/events")).json()["events"]]:
            assert time.monotonic() < deadline, "the time limit was never reached"
            await asyncio.sleep(0.05)
        urgent = job_body(tmp_path, "urgent", priority=9, step_seconds=0.05, auto_start=True)
        assert (await client.post("/jobs", json=urgent)).json()["status"] == "queued"
        await wait_job(client, "urgent", lambda j: j["status"] in ("running", "completed"), timeout=30)
        healthy = (await client.get("/jobs/healthy")).json()
        assert healthy["status"] == "running" and healthy["preempt_for"] is None, healthy
        timed_out = (await client.get("/jobs/timing-out")).json()
        assert timed_out["status"] == "failed" and timed_out["error_code"] == "time_limit", timed_out
        assert (await client.post("/jobs/healthy/stop")).status_code == 200


async def test_no_preemption_before_the_minimum_run_time(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(PREEMPTION=True, PREEMPTION_MIN_RUN_SECONDS=600, SIMULATED_GPUS="1x80") as client:
        await client.post("/jobs", json=job_body(tmp_path, "low", hang_after_steps=1, auto_start=True, priority=1))
        await wait_job(client, "low", lambda j: j["status"] == "running")
        r = await client.post("/jobs", json=job_body(tmp_path, "urgent", auto_start=True, priority=9))
        # Its wait is the rest of the victim's minimum run time (the victim's end is unknown: the runs' ends
        # alone gave no estimate, "resources").
        created = r.json()
        assert created["status"] == "queued" and created["pending_reason"]["code"] == "preemption", created
        assert created["pending_reason"]["job_id"] == "low", created
        assert "PREEMPTION_MIN_RUN_SECONDS" in created["pending_reason"]["message"], created
        assert 500 < created["estimated_wait_time"]["seconds"] <= 600, created
        for _ in range(10):  # several passes (QUEUE_POLL_INTERVAL 1 s would do it; wake-ups do it faster)
            passed = await client.post("/queue/process")
            assert passed.status_code == 200, passed.text
        assert (await client.get("/jobs/low")).json()["status"] == "running"
        assert (await client.get("/jobs/low")).json()["preempt_for"] is None
        status = (await client.get("/jobs/urgent/status")).json()
        assert status["pending_reason"]["code"] == "preemption", status
        queue = (await client.get("/queue")).json()["entries"]
        assert queue[0]["pending_reason"]["code"] == "preemption", queue
        # A job of the same priority waits for the run's end, which nobody can tell.
        await client.delete("/queue/urgent")
        r = await client.post("/jobs", json=job_body(tmp_path, "peer", auto_start=True, priority=1))
        assert r.json()["pending_reason"]["code"] == "resources" and r.json()["estimated_wait_time"] is None, r.text


@pytest.mark.parametrize("route", ["pause", "resume"])
async def test_pause_and_resume_of_a_job_that_is_not_there_yet(
    app_factory: Callable[..., Any], tmp_path: Path, route: str
) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False) as client:
        await client.post("/jobs", json=job_body(tmp_path, "waiting"))
        r = await client.post(f"/jobs/waiting/{route}")
        status = (await client.get("/jobs/waiting")).json()["status"]
        assert r.status_code == 409 and f"is {status}" in r.json()["detail"] and "only a" in r.json()["detail"]


async def test_a_job_whose_uploaded_data_set_was_deleted_is_not_resumed(app_factory: Callable[..., Any],
                                                                        tmp_path: Path) -> None:  # fmt: skip
    make_model(tmp_path / "models" / "tiny-qwen2")
    rows = Path(job_body(tmp_path, "rows", step_seconds=0.05)["data_path"]).read_bytes()
    async with app_factory() as client:
        up = await client.post("/files", files={"file": ("mine.jsonl", rows)})
        assert up.status_code == 201, up.text
        file_id = up.json()["id"]
        body = {**job_body(tmp_path, "gone", auto_start=True, training={"max_steps": 200, "save_steps": 2}),
                "data_path": file_id}  # fmt: skip
        assert (await client.post("/jobs", json=body)).json()["status"] == "running"
        await wait_job(client, "gone", lambda j: (j["progress"]["current_step"] or 0) >= 3)
        assert (await client.post("/jobs/gone/stop")).status_code == 200
        # Another job on it makes a delete 409; the refusal must not forget the stopped job as a user: once it
        # is resumed, a delete was allowed while it ran (its next run would have found no data).
        other = {**job_body(tmp_path, "other", auto_start=True, training={"max_steps": 400}), "data_path": file_id}
        assert (await client.post("/jobs", json=other)).json()["status"] == "running"
        assert (await client.delete(f"/files/{file_id}")).status_code == 409
        assert (await client.post("/jobs/gone/resume")).status_code == 200
        assert (await client.post("/jobs/other/stop")).status_code == 200
        r = await client.delete(f"/files/{file_id}")
        assert r.status_code == 409 and "gone" in r.json()["detail"], r.text
        assert (await client.post("/jobs/gone/stop")).json()["status"] in ("stopped", "cancelled")
        assert (await client.delete(f"/files/{file_id}")).status_code == 204  # allowed: the job is not active
        r = await client.post("/jobs/gone/resume")
        assert r.status_code == 409 and f"uploaded file {file_id}, which has been deleted" in r.json()["detail"]
        assert (await client.get("/jobs/gone")).json()["status"] == "stopped"


async def later(delay: float, call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """`call` a moment later: a range of delays makes requests meet the other's steps at different points."""
    await asyncio.sleep(delay)
    return await call(*args)


async def test_a_stop_racing_a_start_or_a_delete_stops_or_says_404(app_factory: Callable[..., Any],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    # The stop reads the job, the start (or the scheduler) moves it on before the stop writes: the stop reads
    # it again and stops it as it is then; it answered 409 "can no longer be cancelled" and the job ran on.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        for i in range(12):
            body = job_body(tmp_path, f"race{i}", hang_after_steps=1, training={"max_steps": 50})
            assert (await client.post("/jobs", json=body)).json()["status"] == "pending"
            start, stop = await asyncio.gather(
                client.post(f"/jobs/race{i}/start"), later(i / 1000, client.post, f"/jobs/race{i}/stop")
            )
            assert stop.status_code == 200, (i, start.json(), stop.json())
            assert stop.json()["status"] in ("cancelled", "stopped"), stop.json()
            job = await wait_job(client, f"race{i}", lambda j: j["status"] not in ("queued", "running"))
            assert job["status"] in ("cancelled", "stopped"), job
        # A job deleted as it is resumed, paused or stopped is not there: 404, not "is None now".
        for i, action in enumerate(("resume", "stop", "start")):
            await client.post("/jobs", json=job_body(tmp_path, f"gone{i}", training={"max_steps": 5}))
            if action == "resume":
                await client.post(f"/jobs/gone{i}/stop")  # cancelled: resume has nothing to resume, but races
            deleted, acted = await asyncio.gather(client.delete(f"/jobs/gone{i}"),
                                                  client.post(f"/jobs/gone{i}/{action}"))  # fmt: skip
            assert deleted.status_code in (204, 409) and acted.status_code in (200, 404, 409), acted.text
            assert "None" not in acted.text, acted.text


async def test_a_start_whose_run_is_over_before_its_answer_reads_it_says_so_not_409(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The start's answer reads the job after the pass that started it: a run short enough to have completed by
    then was answered 409 'completed: cannot be started', for a start that had started it. (What the answer makes
    of the job is driven here with a run over already: the race itself is a matter of milliseconds.)"""
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        body = job_body(tmp_path, "short", auto_start=True, training={"max_steps": 2})
        created = (await client.post("/jobs", json=body)).json()
        job = await wait_job(client, "short", lambda j: j["status"] == "completed")
        answer = await job_start.answer_start(client.app.state.training, "short", job["created_at"])
        assert (answer.status, answer.message) == ("completed", "Training started and has completed"), created


async def test_a_start_of_a_queued_job_with_no_scheduler_says_it_starts_when_one_runs(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # It said "did not start (its GPUs are not free), nor will it by itself: no scheduler is running: queued jobs
    # start when one does" (review AK): no pass had looked at the GPUs, and it does start once a scheduler runs.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(scheduler=False) as client:
        body = job_body(tmp_path, "waits", auto_start=True)
        assert (await client.post("/jobs", json=body)).json()["status"] == "queued"
        r = await client.post("/jobs/waits/start")
        assert r.status_code == 200, r.text
        assert r.json()["message"] == ("The job is queued: no scheduler is running: queued jobs start when one does "
                                       "(python start.py)")  # fmt: skip


async def test_a_job_whose_data_the_operator_took_out_of_data_roots_runs_again_once_they_hold_it(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # DATA_ROOTS narrowed at a restart: each waiting job failed as it started, told to create the job again
    # (which lost what it had), and a resume was accepted to fail at once (hunt CE).
    prefix = f"test-roots-{time.time_ns()}"  # (one Redis state across the servers)
    (tmp_path / "narrow").mkdir()
    async with app_factory(REDIS_KEY_PREFIX=prefix) as client:
        body = job_body(tmp_path, "held", auto_start=False, training={"max_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
    # (a root that is no folder, a typo: warned of as the scheduler starts)
    narrowed = settings_for("redis://127.0.0.1:1/0", tmp_path, DATA_ROOTS=f"{tmp_path / 'narrow'},{tmp_path / 'typo'}")
    assert narrowed.missing_roots() == [("DATA_ROOTS", tmp_path / "typo")]
    async with app_factory(REDIS_KEY_PREFIX=prefix, DATA_ROOTS=str(tmp_path / "narrow")) as client:
        await client.post("/jobs/held/start")
        failed = await wait_job(client, "held", lambda j: j["status"] == "failed")
        assert failed["error_code"] == "input_path", failed
        assert "which the server's operator changed" in failed["error_message"], failed
        assert "resume it then" in failed["error_message"], failed
        r = await client.post("/jobs/held/resume")
        assert r.status_code == 409 and "stays failed" in r.json()["detail"], r.text
        assert (await client.get("/jobs/held")).json()["status"] == "failed"
    async with app_factory(REDIS_KEY_PREFIX=prefix) as client:
        r = await client.post("/jobs/held/resume")  # (no checkpoint: nothing ran, it starts over)
        assert r.status_code == 200, r.text
        done = await wait_job(client, "held", lambda j: j["status"] in ("completed", "failed"), timeout=60)
        assert done["status"] == "completed", done


async def test_an_ask_honoured_late_does_not_undo_a_resume(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A pause's answer (or a scheduler's pass) rests a job asked to pause or stop as its run ended queued. Its copy
    of the job was read before: if the job has rested so meanwhile and been resumed (which clears the ask), the
    stale copy paused or stopped the resumed job again."""
    async with app_factory(scheduler=False) as client:
        assert (await client.post("/jobs", json=job_body(tmp_path, "late"))).status_code == 201
        training = client.app.state.training
        queued = await training.store.get("late")
        assert queued is not None and queued.status == JobStatus.QUEUED
        admin = Caller(None, "admin")
        for ask in ("pause_requested", "stop_requested"):
            rested = await _rest_as_asked(training, queued.model_copy(update={ask: True}), admin)
            assert rested.status == JobStatus.QUEUED, ask
            now = await training.store.get("late")
            assert now is not None and now.status == JobStatus.QUEUED, ask
        # An ask that still holds is honoured.
        await training.store.update("late", {"pause_requested": True})
        asked = await training.store.get("late")
        assert asked is not None
        assert (await _rest_as_asked(training, asked, admin)).status == JobStatus.PAUSED
        paused = await training.store.get("late")
        assert paused is not None and paused.status == JobStatus.PAUSED and not paused.pause_requested


async def _running_without_runner(store: Any, job_id: str, run_id: str) -> None:
    """Running as a scheduler's start leaves it, with no runner: the test writes the runner's end itself."""
    job = await store.get(job_id)
    attempt = Attempt(number=len(job.attempts) + 1, run_id=run_id, started_at=clock.now())
    await store.transition(job_id, JobStatus.RUNNING, fields={"run_id": run_id, "stop_requested": False,
                                                              "pause_requested": False,
                                                              "attempts": [*job.attempts, attempt]})  # fmt: skip


async def _runner_ends_paused(store: Any, job_id: str, run_id: str) -> None:
    """The end a runner that read the pause alone writes (`record_end`, then `Outbox.finish`'s transition)."""
    job = await store.get(job_id)
    end = record_end(job, -15, RunFacts(), [], [], interrupt="pause", stop_outcome="terminated", override=None,
                     now=clock.now())  # fmt: skip
    await store.transition(job_id, end.status, expect=(JobStatus.RUNNING,), fields=end.fields, message=end.message,
                           run_id=run_id)  # fmt: skip


async def _being_paused(client: Any, tmp_path: Path, job_id: str) -> Any:
    """A job created, running with no runner (run "r1"), and asked to pause; its store."""
    assert (await client.post("/jobs", json=job_body(tmp_path, job_id))).status_code == 201
    store = client.app.state.training.store
    await _running_without_runner(store, job_id, "r1")
    await store.update(job_id, {"pause_requested": True})
    return store


async def test_a_stop_accepted_after_the_runner_read_a_pause_alone_still_stops_the_job(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause under way; a stop lands once the runner has read the run's flags for the last time (the pause alone)
    and before it writes the end. The stop was accepted (the job ran), so it decides the end, as during the grace;
    it was answered "The run had already ended (paused)", the job left paused with stop_requested set (hunt EI)."""
    async with app_factory(scheduler=False, AUTO_EXPORT=False, STOP_GRACE_SECONDS=1) as client:
        store = await _being_paused(client, tmp_path, "ps")  # (the pause, as its runner read it last)
        wait = run_control.await_job

        async def end_written_once_the_stop_is_asked(*args: Any) -> Any:
            # The stop's flag is stored (accepted: the job still ran); the runner now writes the end it computed.
            assert (await store.get_fields(["ps"], ["stop_requested"]))[0][0] == "true"
            await _runner_ends_paused(store, "ps", "r1")
            return await wait(*args)

        monkeypatch.setattr(run_control, "await_job", end_written_once_the_stop_is_asked)
        r = await client.post("/jobs/ps/stop")
        job = (await client.get("/jobs/ps")).json()
        assert job["status"] in ("stopped", "cancelled"), (r.json(), job["status"], job["stop_requested"])
        assert r.json()["status"] == job["status"]


async def test_that_stop_leaves_a_job_resumed_run_and_paused_again_since_paused(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop above reads the paused job, then stops it: a resume, a new run and a pause of that run (a pause,
    not the stop) in between, and the job was cancelled, for good (review EJ)."""
    async with app_factory(scheduler=False, AUTO_EXPORT=False, STOP_GRACE_SECONDS=1) as client:
        store = await _being_paused(client, tmp_path, "pp")  # (the pause, as its runner read it last)
        wait = run_control.await_job

        async def then_resumed_and_paused(*args: Any) -> Any:
            await _runner_ends_paused(store, "pp", "r1")
            final = await wait(*args)
            assert final.status == JobStatus.PAUSED and final.stop_requested
            assert (await client.post("/jobs/pp/resume")).status_code == 200
            await _running_without_runner(store, "pp", "r2")
            await store.update("pp", {"pause_requested": True})
            await _runner_ends_paused(store, "pp", "r2")
            return final

        monkeypatch.setattr(run_control, "await_job", then_resumed_and_paused)
        r = await client.post("/jobs/pp/stop")
        job = (await client.get("/jobs/pp")).json()
        assert job["status"] == "paused", (r.json(), job["status"])


async def test_two_stops_accepted_as_a_pause_ended_both_say_what_stopped_the_job(
    app_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one whose stop of the paused job was refused (the other's came first) said "The run had already ended
    # (paused)" of a job now cancelled (review EJ).
    async with app_factory(scheduler=False, AUTO_EXPORT=False, STOP_GRACE_SECONDS=1) as client:
        store = await _being_paused(client, tmp_path, "p2")  # (the pause, as its runner read it last)
        wait = run_control.await_job
        both_asked = asyncio.Event()
        waits = 0

        async def end_once_both_wait(*args: Any) -> Any:
            nonlocal waits
            waits += 1
            if waits == 2:
                await _runner_ends_paused(store, "p2", "r1")
                both_asked.set()
            await both_asked.wait()
            return await wait(*args)

        monkeypatch.setattr(run_control, "await_job", end_once_both_wait)
        answers = await asyncio.gather(client.post("/jobs/p2/stop"), client.post("/jobs/p2/stop"))
        job = (await client.get("/jobs/p2")).json()
        assert job["status"] in ("stopped", "cancelled"), job
        for r in answers:
            assert r.json()["status"] == job["status"] and "already ended" not in r.json()["message"], r.json()
