"""The GPU reading as the create check and the planner see it: one figure for what a GPU can offer a job."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from application.models.job_request import JobCreate
from application.services.gpu_pool import gpu_states, impossible_request, never_free
from application.services.preemption import Candidate, choose_victims
from application.services.scheduler import Policy, QueuedJob, RunningJob, gpu_is_free, plan
from application.utils.gpu_types import GpuInfo, GpuSnapshot, unreadable_gpu

MIB = 1.0  # GpuInfo holds MiB


def a100_80gb(index: int, used_mb: float = 0.0) -> GpuInfo:
    """An A100-80GB as NVML's v2 memory figures show it: 81,920 MiB in all, 870 MiB of which the driver
    keeps (neither used nor free), so an idle one has 81,050 MiB free."""
    total, reserved = 81920 * MIB, 870 * MIB
    return GpuInfo(index=index, uuid=f"GPU-{index}", name="NVIDIA A100-SXM4-80GB", memory_total_mb=total,
                   memory_used_mb=used_mb, memory_free_mb=total - reserved - used_mb, utilization=0.0,
                   memory_utilization=None, temperature_c=None, power_w=None, power_limit_w=None,
                   processes=())  # fmt: skip


def snapshot(*gpus: GpuInfo) -> GpuSnapshot:
    return GpuSnapshot(backend="nvml", gpus=gpus, error=None, driver_version="550.54", taken_at=time.time())


def create(**fields: object) -> JobCreate:
    return JobCreate.model_validate({"data_path": "d.jsonl", "model_path": "m", "output_dir": "o", **fields})


def starts(min_gb: float, snap: GpuSnapshot) -> list[str]:
    now = time.time()
    queued = [QueuedJob("a", 5, now - 10, 1, None, min_gb, None)]
    return [s.job_id for s in plan(queued, gpu_states(snap, {}), [], Policy(), now).starts]


def test_a_memory_request_an_idle_gpu_cannot_offer_is_refused_at_create_not_left_waiting() -> None:
    snap = snapshot(a100_80gb(0), a100_80gb(1))
    # 80 GiB is the card's total, but the driver's share never comes free: such a job could never start.
    reason = impossible_request(create(min_gpu_memory_gb=80), snap)
    assert reason is not None and "min_gpu_memory_gb=80" in reason and "79.15 GiB" in reason
    # What an idle card does offer is accepted, and the planner starts it on an idle card.
    offered = 81050 / 1024
    assert impossible_request(create(min_gpu_memory_gb=offered), snap) is None
    assert starts(offered, snap) == ["a"]


def test_a_free_memory_setting_past_every_gpus_memory_is_the_operators_to_lower_not_the_users() -> None:
    # GPU_MIN_FREE_MEMORY_GB=100 on 80 GB cards: every GPU job queued for ever ("never"), its user told to change
    # num_gpus or min_gpu_memory_gb, which could not help (hunt CE).
    snap = snapshot(a100_80gb(0), a100_80gb(1))
    why = never_free(snap, 100.0)
    assert why is not None and "GPU_MIN_FREE_MEMORY_GB=100" in why and "79.15 GiB" in why and "operator" in why
    assert starts(0.0, snap) == ["a"] and never_free(snap, 79.0, num_gpus=2) is None
    assert never_free(snap, 100.0, num_gpus=0) is None  # (a CPU job takes no GPU)
    assert never_free(snapshot(), 100.0) is None  # (no GPU: impossible_request says so)


def test_a_queued_job_the_free_memory_setting_holds_back_tells_its_user_the_operator_must_change_it() -> None:
    # Raised past the cards' memory after these jobs were queued: the create check no longer sees them, and their
    # reason named the user's num_gpus and min_gpu_memory_gb, which could not help.
    now, snap = time.time(), snapshot(a100_80gb(0), a100_80gb(1))
    queued = [QueuedJob("plain", 5, now - 10, 1, None, None, None),
              QueuedJob("asks_40", 5, now - 9, 2, None, 40.0, None),
              QueuedJob("asks_90", 5, now - 8, 1, None, 90.0, None),
              QueuedJob("gpu_7", 5, now - 7, 1, (7,), None, None)]  # fmt: skip
    found = plan(queued, gpu_states(snap, {}), [], Policy(min_free_gb=100.0), now)
    assert found.starts == [] and {r.code for r in found.reasons.values()} == {"never"}
    for jid in ("plain", "asks_40"):
        text = found.reasons[jid].text
        assert "GPU_MIN_FREE_MEMORY_GB=100" in text and "operator" in text and "create it again" not in text, text
    # A request no setting could make possible is still its user's to change.
    for jid in ("asks_90", "gpu_7"):
        text = found.reasons[jid].text
        assert "create it again" in text and "GPU_MIN_FREE_MEMORY_GB" not in text, text


def test_memory_other_processes_use_still_keeps_a_job_off_a_gpu() -> None:
    snap = snapshot(a100_80gb(0, used_mb=40 * 1024))
    assert impossible_request(create(min_gpu_memory_gb=60), snap) is None  # it may come free
    assert starts(60, snap) == []
    assert starts(30, snap) == ["a"]


def test_a_gpu_that_cannot_be_read_is_busy_not_gone() -> None:
    # GPU 1 is held by our job "r" (60 s left) and fails one reading; A is pinned to GPUs 0 and 1.
    now = time.time()
    lost = unreadable_gpu(1, a100_80gb(1), "NVML could not read it: GPU is lost")
    snap = snapshot(a100_80gb(0), lost)
    assert impossible_request(create(num_gpus=2), snap) is None
    assert impossible_request(create(gpu_ids=[1]), snap) is None
    assert impossible_request(create(min_gpu_memory_gb=79, gpu_ids=[1]), snap) is None
    queue = [QueuedJob("A", 5, now - 100, 2, (0, 1), None, None), QueuedJob("B", 5, now - 50, 1, None, None, None)]
    running = [RunningJob("r", (1,), 60.0)]
    for name in ("backfill", "strict"):
        found = plan(queue, gpu_states(snap, {1: "r"}), running, Policy(name=name), now)
        # A keeps its reservation of GPU 0 (it was planned 'never' and dropped it: B, of no known length, took it).
        assert found.starts == [] and found.reasons["A"].code != "never", (name, found)
    # Not held by us: an unreadable GPU is never free, whatever the thresholds.
    state = gpu_states(snapshot(lost), {})[0]
    assert not gpu_is_free(state, min_free_gb=0, max_util=100)


def test_preemption_never_evicts_a_job_for_a_gpu_that_cannot_be_read() -> None:
    # GPU 1's reading fails: its job A loses its work for nothing (the head cannot start there); B's GPU helps.
    now = time.time()
    lost = unreadable_gpu(1, a100_80gb(1), "NVML could not read it: GPU is lost")
    gpus = gpu_states(snapshot(a100_80gb(0, used_mb=70 * 1024), lost), {0: "B", 1: "A"})
    head = QueuedJob("hi", 9, now - 10, 1, None, None, None)
    running = [Candidate("A", 1, (1,), now - 900, 0.0), Candidate("B", 1, (0,), now - 900, 500.0)]
    kwargs: dict[str, Any] = {"min_free_gb": 1.0, "max_util": 50.0, "min_run": 0.0, "now": now}
    assert choose_victims(head, gpus, running, **kwargs) == ["B"]
    pinned = QueuedJob("hi", 9, now - 10, 1, (1,), None, None)
    assert choose_victims(pinned, gpus, running, **kwargs) is None


def test_preemption_evicts_no_one_for_gpus_a_run_being_stopped_gives_back() -> None:
    now = time.time()
    gpus = gpu_states(snapshot(a100_80gb(0, used_mb=70 * 1024), a100_80gb(1, used_mb=70 * 1024)), {0: "A", 1: "B"})
    head = QueuedJob("hi", 9, now - 10, 1, None, None, None)
    kwargs: dict[str, Any] = {"min_free_gb": 1.0, "max_util": 50.0, "min_run": 0.0, "now": now}
    # A (being paused, the most work to lose) was chosen, or B (healthy) evicted while A's GPU came back.
    running = [Candidate("A", 1, (0,), now - 900, 0.0, ending=True), Candidate("B", 1, (1,), now - 900, 500.0)]
    assert choose_victims(head, gpus, running, **kwargs) is None
    two = QueuedJob("hi", 9, now - 10, 2, None, None, None)
    assert choose_victims(two, gpus, running, **kwargs) == ["B"]
    healthy = [Candidate("A", 1, (0,), now - 900, 0.0), running[1]]
    assert choose_victims(head, gpus, healthy, **kwargs) == ["A"]


def test_a_gpu_never_read_is_of_unknown_size_not_of_none() -> None:
    # Failing since the scheduler started: no size is known, so no memory request is judged impossible on it.
    snap = snapshot(a100_80gb(0), unreadable_gpu(1, None, "NVML could not read it: Unknown Error"))
    assert impossible_request(create(gpu_ids=[1], min_gpu_memory_gb=40), snap) is None
    now = time.time()
    queued = [QueuedJob("a", 5, now - 10, 1, (1,), 40.0, None)]
    found = plan(queued, gpu_states(snap, {}), [], Policy(), now)
    assert found.starts == [] and found.reasons["a"].code != "never"


async def test_a_create_on_gpus_the_setting_keeps_from_ever_being_free_is_503_and_health_says_why(
    app_factory: Any, tmp_path: Any
) -> None:
    from tests.conftest import job_body, make_model

    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(GPU_MIN_FREE_MEMORY_GB=100, SIMULATED_GPUS="2x80") as client:
        r = await client.post("/jobs", json=job_body(tmp_path, "gpu", num_gpus=1))
        assert r.status_code == 503 and "GPU_MIN_FREE_MEMORY_GB=100" in r.json()["detail"], r.text
        assert (await client.post("/jobs", json=job_body(tmp_path, "cpu", num_gpus=0))).status_code == 201
        health = (await client.get("/health")).json()
        assert health["status"] == "degraded" and "GPU_MIN_FREE_MEMORY_GB=100" in health["gpu"]["never_free"], health


async def test_a_job_the_free_memory_setting_raised_since_holds_back_is_the_operators_to_release(
    app_factory: Any, tmp_path: Any
) -> None:
    from tests.conftest import job_body

    same = {"REDIS_KEY_PREFIX": f"test-{uuid.uuid4().hex[:8]}", "SIMULATED_GPUS": "2x80"}
    async with app_factory(**same) as client:
        r = await client.post("/jobs", json=job_body(tmp_path, "gpu", num_gpus=1))
        assert r.status_code == 201 and r.json()["status"] == "pending", r.text
        job_id = r.json()["job_id"]
    async with app_factory(GPU_MIN_FREE_MEMORY_GB=100, **same) as client:
        r = await client.post(f"/jobs/{job_id}/start")
        assert r.status_code == 200 and r.json()["status"] == "queued", r.text
        assert "operator must lower" in r.json()["message"], r.text
        r = await client.post(f"/jobs/{job_id}/start")
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert "cannot start while the server's setting GPU_MIN_FREE_MEMORY_GB=100" in detail, detail
        reason = (await client.get(f"/jobs/{job_id}/status")).json()["pending_reason"]
        assert reason["code"] == "never" and "operator must lower" in reason["message"], reason


async def test_a_server_meant_to_have_no_gpus_is_healthy_all_the_same(app_factory: Any) -> None:
    # (/health turns degraded while GPUs cannot be read: not for a server without any, which says why in `error`)
    async with app_factory(SIMULATED_GPUS="0") as client:
        deadline = time.monotonic() + 20
        while (health := (await client.get("/health")).json())["gpu"]["error"] is None or "no GPU reading" in str(
            health["gpu"]["error"]
        ):  # (until the scheduler published its first reading)
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.1)
        assert health["status"] == "healthy" and "SIMULATED_GPUS=0" in health["gpu"]["error"], health
