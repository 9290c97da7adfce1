"""The planner over a real Redis: what a pass reads of a long queue."""

from __future__ import annotations

import time
from pathlib import Path

import redis.asyncio as aioredis

from application.models.training_model import JobStatus
from application.services import preemption
from application.services.gpu_pool import queued_job
from application.services.job_store import JobStore
from application.services.keys import Keys
from application.services.queue_planner import WINDOW, ClusterView, Planner, build_view
from application.services.scheduler import GpuState, RunningJob
from application.utils.gpu_types import GpuSnapshot
from tests.conftest import settings_for
from tests.test_gpu_pool import a100_80gb, snapshot
from tests.test_job_store import make_job


async def test_a_cpu_only_job_deep_in_a_long_queue_starts_while_every_gpu_is_busy(
    redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # CPU-only jobs start whatever waits ahead of them, but with every GPU busy a pass read only its window of
    # the queue: one queued behind 256 GPU jobs or more never started.
    store = JobStore(redis_client, Keys("deep"))
    now = time.time()
    for i in range(WINDOW + 900):
        await store.create(make_job(f"g{i}", JobStatus.QUEUED, created=now + i), message="", actor="t")
    await store.create(make_job("cpu", JobStatus.QUEUED, created=now + 5000, num_gpus=0), message="", actor="t")
    gpus = [GpuState(0, 80.0, 80.0, None, held_by="running")]
    busy = ClusterView(GpuSnapshot("simulated", (), None, None, now), gpus, [RunningJob("running", (0,), None)])
    planner = Planner(store, settings_for(redis_url, tmp_path))
    starts = []
    for _ in range(3):  # a page further each pass, from the window's end
        found = await planner.plan(busy)
        starts += [s.job_id for s in found.starts]
        if starts:
            break
    assert starts == ["cpu"]
    # And again, once the pages went round the queue.
    for _ in range(4):
        found = await planner.plan(busy)
        if found.starts:
            assert [s.job_id for s in found.starts] == ["cpu"]
            return
    raise AssertionError("the CPU-only job was not found again")


async def test_the_forecast_plans_with_the_heads_clocks_as_the_scheduler_does(
    redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # "big" has waited long as the head of its priority, behind a higher-priority job that waits for GPU 0: the
    # scheduler holds GPU 1 for it, but GET /queue and the create's estimate, planned without the clocks, told
    # "small" it starts at the next pass (review CM).
    store = JobStore(redis_client, Keys("clocks"))
    now = time.time()
    for job_id, priority, n in (("urgent", 7, 1), ("big", 5, 2), ("small", 5, 1)):
        job = make_job(job_id, JobStatus.QUEUED, priority, now + len(job_id), n)
        if job_id == "urgent":  # (it names GPU 0, which a run of unknown length holds)
            job = job.model_copy(update={"gpu_ids_requested": [0]})
        await store.create(job, message="", actor="t")
    gpus = [GpuState(0, 80.0, 80.0, None, held_by="long"), GpuState(1, 80.0, 80.0, None, held_by=None)]
    view = ClusterView(GpuSnapshot("simulated", (), None, None, now), gpus, [RunningJob("long", (0,), None)])
    planner = Planner(store, settings_for(redis_url, tmp_path, QUEUE_STARVATION_SECONDS=1800))
    young = await planner.forecast(view, 10)
    assert [s.job_id for s in young.starts] == ["small"]  # (a young head of its priority: first fit)
    await store.mark_heads(["big"], now - 5000)
    held = await planner.forecast(view, 10, clocks=await store.head_clocks())
    assert held.starts == [] and held.reasons["small"].code == "reservation", held
    assert held.reasons["small"].job_id == "big"
    assert (await planner.plan(view, clocks=await store.head_clocks())).starts == []  # (as the scheduler's pass)


async def test_a_job_asked_to_start_past_the_window_heads_neither_the_queue_nor_its_priority(
    redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # Planned behind the window, out of queue order, it was named the head ahead of 40 jobs of its priority the
    # pass never read, and its starvation clock started (reviews CM, CO).
    store = JobStore(redis_client, Keys("asked"))
    now = time.time()
    for i in range(WINDOW):  # (2 GPUs each on a 1-GPU server: none can ever start, none heads)
        await store.create(make_job(f"w{i:04d}", JobStatus.QUEUED, created=now + i, num_gpus=2), message="", actor="t")
    for i in range(40):
        await store.create(make_job(f"p{i:04d}", JobStatus.QUEUED, created=now + 1000 + i), message="", actor="t")
    await store.create(make_job("asked", JobStatus.QUEUED, created=now + 5000), message="", actor="t")
    gpus = [GpuState(0, 80.0, 80.0, None, held_by="running")]
    view = ClusterView(GpuSnapshot("simulated", (), None, None, now), gpus, [RunningJob("running", (0,), None)])
    planner = Planner(store, settings_for(redis_url, tmp_path, QUEUE_STARVATION_SECONDS=1800))
    alone = await planner.plan(view)
    found = await planner.plan(view, wanted={"asked"})
    assert (found.head, found.heads) == (alone.head, alone.heads) and "asked" not in found.heads, found


async def test_a_run_that_ends_between_the_views_reads_is_seen_ending_and_no_run_is_preempted_for_its_gpu(
    redis_client: aioredis.Redis,
) -> None:
    # Its pause ended after the leases were read and before its fields were: the view had a run holding GPU 0 and
    # not ending (the end clears pause_requested), and preemption stopped "healthy" for a GPU already free
    # (a stress loop of test_run_control's pause test).
    store = JobStore(redis_client, Keys("ended"))
    for job_id, gpu in (("pausing", 0), ("healthy", 1)):
        await store.create(make_job(job_id, priority=1), message="", actor="t")
        await store.transition(job_id, JobStatus.RUNNING, acquire_gpus=[gpu], fields={"gpu_ids": [gpu]})
    await store.update("pausing", {"pause_requested": True})
    state = await store.planning_state()
    await store.transition("pausing", JobStatus.PAUSED, fields={"pause_requested": False})

    view = await build_view(store, snapshot(a100_80gb(0), a100_80gb(1)), state=state)
    assert [(r.job_id, r.ending, r.remaining_seconds) for r in view.running] == [("pausing", True, 0.0),
                                                                                 ("healthy", False, None)]  # fmt: skip
    # (its GPU is started on by the next pass, which the end woke: see build_view)
    assert [(g.index, g.held_by) for g in view.gpus] == [(0, "pausing"), (1, "healthy")]
    rows = await store.get_fields(["pausing", "healthy"], list(preemption.FIELDS))
    candidates, under_way = preemption.candidates(view.running, rows, time.time())
    urgent = queued_job("urgent", 9, time.time(), 1, None, None)
    assert not under_way
    assert preemption.choose_victims(urgent, view.gpus, candidates, min_free_gb=0, max_util=100, min_run=0,
                                     now=time.time()) is None  # fmt: skip
