"""A short live replay: a synthetic trace through the HTTP API (real server processes, real Redis, the fake
swift), with no durations in the requests, against the offline simulation of the same jobs."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from benchmarks.replay_api import Server, offline, prepare, replay, synthetic_trace
from tests.conftest import free_port, kill_processes_under
from tests.test_api_queue import overlapping_gpu_use

GPUS = 4
STARVATION = 3.0


@pytest.mark.timeout(300)
def test_live_replay_backfills_beats_fifo_and_starves_no_wide_job(redis_url: str, tmp_path: Path) -> None:
    # 14 jobs of 1.5-6 s on 4 GPUs arriving over 10 s (about twice what the GPUs can take), every 7th
    # asking for all 4 GPUs.
    trace = synthetic_trace(14, 10.0, GPUS, seed=3, shortest=1.5, longest=6.0, wide_every=7)
    prepare(tmp_path, trace)
    env = {"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": f"replay-{tmp_path.name}"[-40:]}
    try:
        with Server(tmp_path, GPUS, STARVATION, extra=env, port=free_port()) as server:
            run = replay(server, tmp_path, trace, timeout=240)
            processor = server.http.get("/queue/processor/status").json()
    finally:
        kill_processes_under(tmp_path)
    jobs = run.jobs
    assert [j["job_id"] for j in jobs if j["status"] != "completed"] == []
    assert overlapping_gpu_use(jobs) == []

    # Backfill: some job started while one submitted before it still waited.
    assert any(b["started_at"] < a["started_at"] for a in jobs for b in jobs if a["created_at"] < b["created_at"])
    # No wide job starved: once at the head (every job submitted before it had started), each waited at most
    # the starvation time plus the longest run, and a pass or two.
    longest = max(j["finished_at"] - j["started_at"] for j in jobs)
    for wide in (j for j in jobs if len(j["gpu_ids"]) == GPUS):
        head_at = max([wide["created_at"], *(j["started_at"] for j in jobs if j["created_at"] < wide["created_at"])])
        assert wide["started_at"] - head_at <= STARVATION + longest + 2.0, wide["job_id"]

    # Nothing was said of durations: the server learned them. Jobs queued after the first runs of their kind
    # completed were planned with a prediction, and the processor reports how good they were.
    predicted = [j for j in jobs if j["queued_prediction"] is not None]
    assert predicted and all(j["queued_prediction"]["source"] == "plan" for j in predicted)
    assert processor["prediction_error"]["count"] >= len([j for j in predicted if j["status"] == "completed"]) > 0
    assert 0.5 < processor["prediction_error"]["median"] < 2.0

    # Better than first come, first served on the same jobs (simulated with the start-up the live runs took).
    results, _ = offline(trace, run, GPUS, STARVATION, ("fifo",))
    live_jct = statistics.fmean(j["finished_at"] - j["created_at"] for j in jobs)
    assert live_jct < statistics.fmean(results[0].jct)
