"""The scheduler's queue pass, in this process against a real Redis, with real runners of the fake swift."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import job_body, make_model, wait_job


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
