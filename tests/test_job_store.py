from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from application.models.job_request import TrainingParams
from application.models.job_responses import JobSummary
from application.models.training_model import ExportInfo, ExportStatus, Job, JobStatus, PredictedDuration
from application.services import lua
from application.services.cluster_store import ClusterStore
from application.services.job_codec import QueueMeta, event_payload
from application.services.job_store import JobStore, Refusal, TransitionRefused, queue_score
from application.services.keys import Keys


def make_job(
    job_id: str,
    status: JobStatus = JobStatus.PENDING,
    priority: int = 5,
    created: float | None = None,
    num_gpus: int = 1,
    owner: str | None = None,
) -> Job:
    now = created if created is not None else time.time()
    return Job(
        job_id=job_id,
        status=status,
        priority=priority,
        data_path="d.jsonl",
        model_path="m",
        output_dir=f"/out/{job_id}",
        output_dir_requested=job_id,
        num_gpus=num_gpus,
        owner=owner,
        training=TrainingParams(),
        created_at=now,
        updated_at=now,
    )


async def require(store: JobStore, job_id: str) -> Job:
    job = await store.get(job_id)
    assert job is not None, job_id
    return job


@pytest.fixture
def store(redis_client: aioredis.Redis) -> JobStore:
    return JobStore(redis_client, Keys("t"), events_max=50, history_max=5)


async def test_a_job_naming_a_deleted_upload_is_not_stored_and_one_naming_a_kept_upload_is_its_user(
    store: JobStore,
) -> None:
    kept, gone = "file-" + "1" * 24, "file-" + "2" * 24
    await store.r.set(store.keys.file(kept), "{}")
    with pytest.raises(TransitionRefused) as exc:
        await store.create(make_job("a"), message="created", actor="t", uploads=[kept, gone])
    assert exc.value.reason == Refusal.UPLOAD_GONE and exc.value.detail == gone
    assert await store.get("a") is None and await store.r.hlen(store.keys.output_dirs) == 0
    assert await store.r.exists(store.keys.file_users(kept)) == 0  # nothing recorded either
    job = make_job("a")
    await store.create(job, message="created", actor="t", uploads=[kept])
    assert await store.r.smembers(store.keys.file_users(kept)) == {f"a|{job.created_at!r}"}
    await store.delete("a", uploads=[kept])
    assert await store.r.exists(store.keys.file_users(kept)) == 0


async def test_the_waiting_cap_is_counted_per_owner_in_the_create(store: JobStore) -> None:
    for i in range(2):
        await store.create(make_job(f"w{i}", owner="alice"), message="created", actor="alice", max_waiting=2)
    with pytest.raises(TransitionRefused) as exc:
        await store.create(make_job("w2", owner="alice"), message="created", actor="alice", max_waiting=2)
    assert exc.value.reason == Refusal.WAITING_CAP and exc.value.detail == "2"
    assert await store.get("w2") is None
    await store.create(make_job("b0", owner="bob"), message="created", actor="bob", max_waiting=2)
    await store.create(make_job("anon"), message="created", actor="anonymous", max_waiting=2)  # no owner: no cap


async def test_create_get_and_refuse_duplicate(store: JobStore) -> None:
    job = make_job("a")
    await store.create(job, message="created", actor="t")
    got = await store.get("a")
    assert got == job
    with pytest.raises(TransitionRefused) as exc:
        await store.create(make_job("a"), message="again", actor="t")
    assert exc.value.reason == "exists"


async def test_output_dir_held_by_active_job_only(store: JobStore) -> None:
    await store.create(make_job("a"), message="", actor="t")
    other = make_job("b").model_copy(update={"output_dir": "/out/a"})
    with pytest.raises(TransitionRefused) as exc:
        await store.create(other, message="", actor="t")
    assert (exc.value.reason, exc.value.detail) == ("output_dir_busy", "a")
    await store.transition("a", JobStatus.CANCELLED)
    await store.create(other, message="", actor="t")  # freed once 'a' ended


async def test_transition_refuses_leaving_terminal_and_stamps_times(store: JobStore) -> None:
    await store.create(make_job("a"), message="", actor="t")
    prev = await store.transition("a", JobStatus.RUNNING, acquire_gpus=[0, 1], fields={"pid": 42})
    assert prev == JobStatus.PENDING
    job = await require(store, "a")
    assert job.status == JobStatus.RUNNING and job.started_at and job.pid == 42
    assert await store.leases() == {0: "a", 1: "a"}
    await store.transition("a", JobStatus.COMPLETED)
    job = await require(store, "a")
    assert job.finished_at and job.started_at and job.finished_at >= job.started_at
    assert await store.leases() == {}
    for target in (JobStatus.RUNNING, JobStatus.FAILED, JobStatus.QUEUED):
        with pytest.raises(TransitionRefused) as exc:
            await store.transition("a", target)
        assert exc.value.reason == "bad_state" and exc.value.current == "completed"
    counts = await store.counts()
    assert counts["completed"] == 1 and counts["running"] == 0 and counts["pending"] == 0
    # Nor around the transition, by a field write: the status, and what indexes mirror, are not plain fields.
    for fields in ({"status": JobStatus.RUNNING}, {"owner": "mallory"}, {"priority": 10}, {"output_dir": "/x"}):
        with pytest.raises(ValueError, match="changed only by the operations"):
            await store.update("a", fields)
    with pytest.raises(ValueError, match="status"):
        await store.transition("b", JobStatus.RUNNING, fields={"status": JobStatus.COMPLETED})
    job = await require(store, "a")
    assert (job.status, job.owner, job.priority) == (JobStatus.COMPLETED, None, 5)
    assert (await store.counts())["completed"] == 1


async def test_a_job_stored_before_a_create_rule_still_reads(store: JobStore) -> None:
    # save_steps 999999999 ("never save") was accepted before steps were bounded at create: such a job must still
    # read, or every pass that plans it fails (no job of anyone starts), and its routes answer 500.
    job = make_job("old")
    job.training = TrainingParams.model_validate({"save_steps": 999_999_999, "max_steps": 10**12,
                                                  "warmup_ratio": 1.0})  # fmt: skip
    await store.create(job, message="", actor="t")
    got = await require(store, "old")
    assert (got.training.save_steps, got.training.max_steps, got.training.warmup_ratio) == (999_999_999, 10**12, 1.0)


async def test_gpu_lease_never_shared(store: JobStore) -> None:
    await store.create(make_job("a"), message="", actor="t")
    await store.create(make_job("b"), message="", actor="t")
    await store.transition("a", JobStatus.RUNNING, acquire_gpus=[0])
    with pytest.raises(TransitionRefused) as exc:
        await store.transition("b", JobStatus.RUNNING, acquire_gpus=[1, 0])
    assert exc.value.reason == Refusal.GPU_BUSY and exc.value.detail == "0:a"
    assert (await require(store, "b")).status == JobStatus.PENDING
    assert await store.leases() == {0: "a"}


async def test_queue_order_priority_then_fifo_then_id(store: JobStore) -> None:
    base = 1_800_000_000.0
    for job_id, prio, t in [
        ("low", 0, base),
        ("high", 10, base + 5),
        ("mid-b", 5, base + 1),
        ("mid-a", 5, base + 1),
        ("mid-old", 5, base),
    ]:
        await store.create(make_job(job_id, JobStatus.QUEUED, prio, created=t), message="", actor="t")
    order = [job_id for job_id, _ in await store.queue_window(0, 10)]
    assert order == ["high", "mid-old", "mid-a", "mid-b", "low"]
    assert await store.queue_position("low") == 5
    job = await require(store, "low")
    await store.reprioritize(job, 10, actor="t")
    order = [job_id for job_id, _ in await store.queue_window(0, 10)]
    assert order == ["low", "high", "mid-old", "mid-a", "mid-b"]
    await store.transition("high", JobStatus.RUNNING, acquire_gpus=[0])
    assert await store.queue_position("high") is None
    assert queue_score(10, base) < queue_score(9, base - 10_000_000)


async def test_delete_refuses_running_and_cleans_indexes(store: JobStore) -> None:
    await store.create(make_job("a"), message="", actor="t")
    await store.transition("a", JobStatus.RUNNING, acquire_gpus=[3])
    with pytest.raises(TransitionRefused) as refused:
        await store.delete("a")
    assert refused.value.reason == Refusal.BAD_STATE
    assert (await require(store, "a")).status == JobStatus.RUNNING
    await store.transition("a", JobStatus.STOPPED)
    await store.delete("a")
    assert await store.get("a") is None
    assert sum((await store.counts()).values()) == 0
    with pytest.raises(TransitionRefused) as missing:
        await store.delete("a")
    assert missing.value.reason == Refusal.MISSING
    with pytest.raises(TransitionRefused):
        await store.update("a", {"pid": 1})
    assert await store.get("a") is None  # a late writer never recreates a deleted job


async def test_events_paginate_oldest_first(store: JobStore) -> None:
    await store.create(make_job("a"), message="made", actor="alice")
    for i in range(5):
        await store.add_event("a", "note", f"n{i}", {"i": i})
    first = await store.events("a", None, 3)
    assert [e.message for e in first] == ["made", "n0", "n1"]
    rest = await store.events("a", first[-1].id, 10)
    assert [e.message for e in rest] == ["n2", "n3", "n4"]


async def test_history_is_capped(store: JobStore) -> None:
    await store.create(make_job("a"), message="", actor="t")
    await store.transition("a", JobStatus.RUNNING, fields={"run_id": "r"})
    await store.append_run("a", "r", [{"step": i, "loss": 1.0 / (i + 1)} for i in range(8)], [], sent=(0, 0))
    points = await store.history("a", 100)
    assert [p.step for p in points] == [3, 4, 5, 6, 7]


async def test_a_runner_batch_sent_again_after_a_lost_reply_is_written_once(store: JobStore) -> None:
    await store.create(make_job("a"), message="made", actor="t")
    await store.update("a", {"run_id": "r1"})

    def note(i: int) -> dict[str, str]:
        return event_payload("note", f"n{i}", None, "scheduler", 1000.0 + i)

    first = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}]
    await store.append_run("a", "r1", first, [note(0)], sent=(0, 0))
    # Redis took it, the reply was lost: the runner sends it again, with what came since.
    await store.append_run("a", "r1", [*first, {"step": 3, "loss": 0.8}], [note(0), note(1)], sent=(0, 0))
    await store.append_run("a", "r1", [{"step": 4, "loss": 0.7}], [], sent=(3, 2))
    assert [p.step for p in await store.history("a", 100)] == [1, 2, 3, 4]
    assert [e.message for e in await store.events("a", None, 10)] == ["made", "n0", "n1"]
    # The next run (a resume) counts from nothing.
    await store.update("a", {"run_id": "r2"})
    await store.append_run("a", "r2", [{"step": 4, "loss": 0.6}], [note(2)], sent=(0, 0))
    assert [p.loss for p in await store.history("a", 100)][-2:] == [0.7, 0.6]
    assert [e.message for e in await store.events("a", None, 10)][-1] == "n2"
    await store.delete("a")
    assert not await store.r.exists(store.keys.job_sent("a"))


async def test_a_long_outage_batch_is_written_whole(store: JobStore) -> None:
    big = JobStore(store.r, store.keys, history_max=10_000)
    await big.create(make_job("a"), message="", actor="t")
    await big.transition("a", JobStatus.RUNNING, fields={"run_id": "r"})
    await big.append_run("a", "r", [{"step": i, "loss": 1.0} for i in range(1, 2501)], [], sent=(0, 0))
    assert [p.step for p in await big.history("a", 10_000)] == list(range(1, 2501))


async def test_writes_racing_a_delete_leave_nothing_a_later_job_of_the_same_id_inherits(store: JobStore) -> None:
    await store.create(make_job("a"), message="made", actor="t")
    await store.transition("a", JobStatus.RUNNING, fields={"run_id": "r"})
    await store.transition("a", JobStatus.FAILED, run_id="r")
    await store.delete("a")
    # What the watchdog, a scheduler and a runner's last batch write after the delete: nothing is stored.
    await store.add_event("a", "retry", "attempt 1 failed")
    await store.add_history("a", [{"step": 1, "loss": 1.0}])
    await store.trim_history("a", 0)
    with pytest.raises(TransitionRefused) as late:
        await store.append_run("a", "r", [{"step": 2, "loss": 0.5}], [event_payload("note", "n", None, "t", 1.0)],
                               sent=(0, 0))  # fmt: skip
    assert late.value.reason == Refusal.OTHER_RUN
    names = [store.keys.job_events("a"), store.keys.job_history("a"), store.keys.job_sent("a")]
    assert await store.r.exists(*names) == 0
    # A stream left by an older version's unguarded write: the next job under the id starts without it.
    await store.r.xadd(store.keys.job_events("a"), {"type": "retry", "message": "old"})
    await store.r.rpush(store.keys.job_history("a"), json.dumps({"step": 9, "loss": 9.0}))
    await store.create(make_job("a"), message="made again", actor="t")
    assert [e.message for e in await store.events("a", None, 10)] == ["made again"]
    assert await store.history("a", 10) == []


async def test_the_starvation_clock_of_a_head_ends_with_its_stint_in_the_queue(store: JobStore) -> None:
    head = store.keys.queue_head
    for job_id in ("w", "x"):
        await store.create(make_job(job_id, status=JobStatus.QUEUED), message="", actor="t")
    await store.r.set(head, json.dumps(["w", 100.0]))
    await store.transition("x", JobStatus.RUNNING)  # another job leaving the queue: the head's clock runs on
    assert json.loads(await store.r.get(head)) == ["w", 100.0]
    await store.transition("w", JobStatus.RUNNING)
    assert await store.r.get(head) is None
    # Deleted while the head (stopped, or from before this rule): a later job given its id is a young head.
    await store.create(make_job("y", status=JobStatus.QUEUED), message="", actor="t")
    await store.r.set(head, json.dumps(["y", 100.0]))
    await store.delete("y")
    assert await store.r.get(head) is None


async def test_each_waiting_job_keeps_its_own_starvation_clock_until_it_leaves_the_queue(store: JobStore) -> None:
    cluster = ClusterStore(store.r, store.keys)

    async def since(job_id: str) -> float | None:
        return (await store.head_clocks()).get(job_id)

    for job_id in ("big", "urgent", "gone", "low"):
        await store.create(make_job(job_id, status=JobStatus.QUEUED), message="", actor="t")
    await cluster.set_queue_head(("big", 100.25))
    await cluster.set_queue_head(("urgent", 110.5))  # ahead of it for a moment: its clock is its own
    assert (await cluster.queue_head(), await since("big")) == (("urgent", 110.5), 100.25)
    await store.mark_heads(["low", "big", "nobody"], 115.0)  # (each priority's head: a clock kept is kept)
    assert await store.head_clocks() == {"big": 100.25, "urgent": 110.5, "low": 115.0}
    await store.transition("urgent", JobStatus.RUNNING)
    assert (await cluster.queue_head(), await since("urgent")) == (None, None)
    assert await since("big") == 100.25
    await store.transition("big", JobStatus.CANCELLED)
    assert await since("big") is None
    # A head found by a pass that no longer waits when it is written (stopped meanwhile): nothing kept for it.
    await store.delete("gone")
    await cluster.set_queue_head(("gone", 120.0))
    await store.mark_heads(["gone"], 120.0)
    assert (await cluster.queue_head(), await since("gone")) == (None, None)
    # A head found with the clock the pass read, which a priority change forgot since: not written back.
    await cluster.set_queue_head(("low", 115.0), 115.0)
    assert await cluster.queue_head() == ("low", 115.0)
    await store.r.hdel(store.keys.head_since, "low")  # (as a priority change does)
    await store.r.delete(store.keys.queue_head)
    await cluster.set_queue_head(("low", 115.0), 115.0)
    assert (await cluster.queue_head(), await since("low")) == (None, None)


async def test_list_newest_first_with_status_filter(store: JobStore) -> None:
    for i in range(5):
        await store.create(make_job(f"j{i}", created=1000.0 + i), message="", actor="t")
    await store.transition("j1", JobStatus.CANCELLED)
    total, ids, _ = await store.page(None, None, 0, 3)
    assert ids == ["j4", "j3", "j2"] and total == 5
    total, ids, _ = await store.page(JobStatus.PENDING, None, 2, 10)
    assert ids == ["j2", "j0"] and total == 4


async def test_queueing_uses_the_priority_stored_at_that_moment(store: JobStore, redis_client: aioredis.Redis) -> None:
    created = 1_800_000_000.123
    await store.create(make_job("p", created=created, priority=2), message="", actor="t")
    stale = await require(store, "p")
    await store.reprioritize(stale, 9, actor="t")  # pending: only the stored priority changes
    await store.transition("p", JobStatus.QUEUED)
    assert await redis_client.zscore(store.keys.queue, "p") == queue_score(9, created)
    assert [(job_id, meta.priority) for job_id, meta in await store.queue_window(0, 5)] == [("p", 9)]
    # Each change's event names the priority it replaced, not the one its caller read (concurrent PATCHes all
    # said "from 2"): the events are the job's priority history.
    await store.reprioritize(stale, 4, actor="t")
    changes = [e for e in await store.events("p", None, 10) if e.type == "priority_changed"]
    assert [(e.message, e.data) for e in changes] == [
        ("priority changed from 2 to 9", {"from": 2, "to": 9}),
        ("priority changed from 9 to 4", {"from": 9, "to": 4}),
    ]


async def test_a_follower_writes_only_into_its_own_run(store: JobStore) -> None:
    await store.create(make_job("r"), message="", actor="t")
    await store.transition("r", JobStatus.RUNNING, fields={"run_id": "new-run"})
    with pytest.raises(TransitionRefused) as exc:
        await store.update("r", {"pid": 1}, run_id="old-run")
    assert exc.value.reason == "other_run"
    with pytest.raises(TransitionRefused):
        await store.transition("r", JobStatus.FAILED, run_id="old-run")
    job = await require(store, "r")
    assert job.status == JobStatus.RUNNING and job.pid is None
    await store.update("r", {"pid": 2}, run_id="new-run")
    await store.transition("r", JobStatus.COMPLETED, run_id="new-run")
    assert (await require(store, "r")).pid == 2


async def test_owner_indexes_follow_status_changes_and_delete(store: JobStore) -> None:
    await store.create(make_job("a1", owner="alice", created=1000.0), message="", actor="alice")
    await store.create(make_job("a2", owner="alice", created=1001.0), message="", actor="alice")
    await store.create(make_job("b1", owner="bob", created=1002.0), message="", actor="bob")
    await store.create(make_job("n1", created=1003.0), message="", actor="anonymous")
    assert (await store.page(None, "alice", 0, 10))[:2] == (2, ["a2", "a1"])
    assert (await store.page(None, None, 0, 10))[:2] == (4, ["n1", "b1", "a2", "a1"])
    await store.transition("a1", JobStatus.RUNNING, acquire_gpus=[0])
    assert (await store.page(JobStatus.RUNNING, "alice", 0, 10))[:2] == (1, ["a1"])
    assert (await store.page(JobStatus.PENDING, "alice", 0, 10))[:2] == (1, ["a2"])
    assert (await store.counts("bob"))["pending"] == 1 and (await store.counts())["pending"] == 3
    await store.transition("a1", JobStatus.COMPLETED)
    assert await store.expired(time.time() + 1, 10) == ["a1"]
    await store.delete("a1")
    assert (await store.page(None, "alice", 0, 10))[:2] == (1, ["a2"])
    assert (await store.page(JobStatus.COMPLETED, "alice", 0, 10))[:2] == (0, [])
    assert await store.expired(time.time() + 1, 10) == []


async def test_a_lost_record_is_forgotten_by_its_owner_and_its_folder_too(store: JobStore) -> None:
    # A record an evicting Redis dropped (or someone DEL'd): its owner's indexes kept counting it against the
    # owner's waiting cap, and its folder's claim refused every new job naming that folder, for good.
    for i in range(2):
        await store.create(make_job(f"w{i}", owner="alice"), message="", actor="alice", max_waiting=2)
    await store.transition("w0", JobStatus.QUEUED)
    # Its events and history, and its export folders' claims (but one its quantized export's job holds): kept
    # without an expiry, they stayed for good (hunt CD).
    k = store.keys
    await store.r.hset(k.export_targets, mapping={
        "/out/w0/exports/m": json.dumps({"of": "w0", "export": "e1"}), "/out/w1/exports/m": json.dumps({"of": "w1"}),
        "/out/w0/exports/q": json.dumps({"of": "w0", "job": "w0-q"})})  # fmt: skip
    await store.r.rpush(k.job_history("w0"), "{}")
    await store.r.delete(store.keys.job("w0"))
    assert await store.forget_lost("w0")
    assert not await store.r.exists(k.job_events("w0"), k.job_history("w0"))
    assert sorted(await store.r.hkeys(k.export_targets)) == ["/out/w0/exports/q", "/out/w1/exports/m"]
    assert (await store.page(None, "alice", 0, 10))[:2] == (1, ["w1"])
    assert (await store.counts("alice"))["queued"] == 0
    await store.create(make_job("w2", owner="alice"), message="", actor="alice", max_waiting=2)  # under the cap
    await store.create(make_job("other", owner="alice").model_copy(update={"output_dir": "/out/w0"}), message="",
                       actor="alice")  # fmt: skip
    assert not await store.forget_lost("w1")  # (nothing while the record exists)
    assert (await store.page(None, "alice", 0, 10))[:2] == (3, ["other", "w2", "w1"])


async def test_a_delete_of_ended_jobs_only_refuses_a_job_resumed_since(store: JobStore) -> None:
    # Retention read a job as ended, then a resume queued it again: deleting it then lost a job the user had
    # just been told was resumed.
    await store.create(make_job("r"), message="", actor="t")
    await store.transition("r", JobStatus.RUNNING, acquire_gpus=[0])
    await store.transition("r", JobStatus.STOPPED)
    await store.transition("r", JobStatus.QUEUED, expect=(JobStatus.STOPPED,), reopen=True)
    with pytest.raises(TransitionRefused) as refused:
        await store.delete("r", ended_only=True)
    assert refused.value.reason == Refusal.BAD_STATE and (await require(store, "r")).status == JobStatus.QUEUED
    await store.transition("r", JobStatus.CANCELLED)
    await store.delete("r", ended_only=True)
    assert await store.get("r") is None


async def test_events_record_who_caused_them(store: JobStore) -> None:
    await store.create(make_job("a", owner="alice"), message="made", actor="alice")
    await store.transition("a", JobStatus.RUNNING, actor="scheduler")
    await store.update("a", {"stop_requested": True}, event=("stop_requested", "stop", None), actor="admin")
    events = await store.events("a", None, 10)
    assert [(e.type, e.actor) for e in events] == [("created", "alice"), ("status_running", "scheduler"),
                                                   ("stop_requested", "admin")]  # fmt: skip


async def test_history_limit_zero_gives_no_points(store: JobStore) -> None:
    await store.create(make_job("a"), message="", actor="t")
    await store.update("a", {"run_id": "r"})
    await store.append_run("a", "r", [{"step": 1, "loss": 1.0}], [], sent=(0, 0))
    assert await store.history("a", 0) == []
    assert [p.step for p in await store.history("a", 1)] == [1]


async def listed(store: JobStore, status: JobStatus | None) -> list[dict[str, Any]]:
    """The first page of the job list, as it answers."""
    return list(json.loads(await store.summaries.page_json((await store.page(status, None, 0, 10))[1])))


async def test_lists_come_from_summaries_every_change_keeps_and_old_records_get(
    store: JobStore, redis_client: aioredis.Redis
) -> None:
    assert await store.summaries.backfill() == 0  # (a scheduler's start on the empty store)
    await store.create(make_job("a", created=1000.0), message="", actor="t")
    await store.create(make_job("b", created=1001.0), message="", actor="t")
    await store.transition("a", JobStatus.RUNNING, acquire_gpus=[0], fields={"gpu_ids": [0]})
    await store.update("a", {"progress": {"current_step": 7, "max_steps": 10}})
    total, ids, _ = await store.page(None, None, 0, 10)
    jobs = json.loads(await store.summaries.page_json(ids))
    assert total == 2 and [j["job_id"] for j in jobs] == ["b", "a"]
    assert jobs[1]["status"] == "running" and jobs[1]["progress"]["current_step"] == 7 and jobs[1]["gpu_ids"] == [0]
    await store.reprioritize(await require(store, "b"), 9, actor="t")
    assert (await listed(store, JobStatus.PENDING))[0]["priority"] == 9
    # A record written before summaries were kept gets one from the scheduler's start-up pass.
    await redis_client.delete(store.keys.job_summary("b"))
    assert (await listed(store, None))[0]["job_id"] == "a"
    assert await store.summaries.backfill() == 1
    assert [j["job_id"] for j in await listed(store, None)] == ["b", "a"]
    assert await store.summaries.backfill() == 0  # (nothing to do on the next start)
    # Summaries an older version wrote with fewer fields (before error_code) are all rewritten once: an ended
    # job's summary is never rewritten otherwise, and its list entry lacked the key for good.
    old = json.loads(await redis_client.get(store.keys.job_summary("a")) or "{}")
    del old["error_code"]
    await redis_client.set(store.keys.job_summary("a"), json.dumps(old))
    await redis_client.set(store.keys.summary_fields, "job_id,status")
    assert await store.summaries.backfill() == 2
    assert all("error_code" in j for j in await listed(store, None))
    await store.transition("a", JobStatus.COMPLETED)
    await store.delete("a")
    assert not await redis_client.exists(store.keys.job_summary("a"))


async def test_a_start_looks_only_at_the_summaries_of_jobs_created_since_the_last_one_looked(
    store: JobStore, redis_client: aioredis.Redis
) -> None:
    # Every start walked every job (3.5-5.6 s of a new leader's first pass at 70,000 jobs: hunt DX); creates write
    # their summaries, so only a downgrade's jobs, created since the last start, can lack one.
    await store.create(make_job("old", created=1000.0), message="", actor="t")
    await store.create(make_job("new", created=200_000.0), message="", actor="t")
    assert await store.summaries.backfill() == 2  # (no fields recorded yet: every summary written again)
    assert float(await redis_client.get(store.keys.summaries_scanned) or 0) == 200_000.0
    await store.create(make_job("downgrade", created=150_000.0), message="", actor="t")  # (a day before the mark)
    for job_id in ("old", "downgrade"):
        await redis_client.delete(store.keys.job_summary(job_id))
    assert await store.summaries.backfill() == 1  # "downgrade"'s; "old" lies past what a start looks at
    assert await redis_client.exists(store.keys.job_summary("downgrade"))
    await redis_client.set(store.keys.summary_fields, "job_id,status")  # (fields changed: every job again)
    assert await store.summaries.backfill() == 3
    # One job stamped by a clock ahead does not move the mark past now, and with it past the jobs created after it
    # (review DY: their summaries were never written).
    await store.create(make_job("ahead", created=time.time() + 3 * 86400), message="", actor="t")
    await store.summaries.backfill()
    assert float(await redis_client.get(store.keys.summaries_scanned) or 0) <= time.time()


async def test_a_prediction_found_later_shows_in_the_list(store: JobStore) -> None:
    await store.create(make_job("q", JobStatus.QUEUED), message="created", actor="t")
    entry = (await listed(store, None))[0]
    assert entry["predicted_duration"] == {"seconds": None, "source": None}
    assert await store.set_predictions({"q": PredictedDuration(seconds=90.0, source="plan")}) == 1
    entry = (await listed(store, None))[0]
    assert entry["predicted_duration"] == {"seconds": 90.0, "source": "plan"}
    assert JobSummary.model_validate(entry).predicted_duration == PredictedDuration(seconds=90.0, source="plan")
    # Only a job that still waits takes one (one started meanwhile has its run's own).
    await store.create(make_job("r", JobStatus.RUNNING), message="created", actor="t")
    assert (
        await store.set_predictions(
            {"r": PredictedDuration(seconds=5.0, source="plan"), "gone": PredictedDuration(seconds=5.0, source="plan")}
        )
        == 0
    )
    assert (await store.get("r")).predicted_duration == PredictedDuration()  # type: ignore[union-attr]


async def test_a_priority_change_and_a_prediction_landing_together_each_keep_the_other(store: JobStore) -> None:
    # The priority change rewrote the whole queue entry from the job as its caller read it: a prediction the
    # scheduler set in between was lost (GET /queue showed no duration, backfill took the job as unknown); and
    # the prediction's rewrite rounded the submission time to 14 digits.
    created = 1796439622.7939234
    await store.create(make_job("q", JobStatus.QUEUED, created=created), message="created", actor="t")
    stale = await require(store, "q")
    assert await store.set_predictions({"q": PredictedDuration(seconds=123.5, source="plan")}) == 1
    await store.reprioritize(stale, 7, actor="t")
    [(_, meta)] = await store.queue_window(0, 5)
    assert (meta.priority, meta.estimated_duration, meta.submitted_at) == (7, 123.5, created)
    assert await store.set_predictions({"q": PredictedDuration(seconds=60.0, source="plan")}) == 1
    [(_, meta)] = await store.queue_window(0, 5)
    assert (meta.priority, meta.estimated_duration, meta.submitted_at) == (7, 60.0, created)
    # An entry with a retry's time (its 8th item): the estimate is its 6th still, and the time stays.
    await store.r.hset(store.keys.queue_meta, "q", json.dumps([7, created, 2, [0, 1], None, 60.0, "al", 1e9 + 0.5]))
    assert await store.set_predictions({"q": PredictedDuration(seconds=42.0, source="plan")}) == 1
    [(_, meta)] = await store.queue_window(0, 5)
    assert (meta.gpu_ids, meta.estimated_duration, meta.owner, meta.retry_at) == ([0, 1], 42.0, "al", 1e9 + 0.5)
    # An entry a later version wrote, with items this one does not know: read for what it knows (review DU).
    await store.r.hset(store.keys.queue_meta, "q", json.dumps([7, created, 1, None, None, 60.0, "al", None, "new"]))
    [(_, meta)] = await store.queue_window(0, 5)
    assert (meta.priority, meta.owner, meta.retry_at) == (7, "al", None)
    # An entry an older version wrote, without its owner: the estimate is still its 6th item.
    await store.r.hset(store.keys.queue_meta, "q", json.dumps([7, created, 1, None, None, 60.0]))
    assert await store.set_predictions({"q": PredictedDuration(seconds=99.0, source="plan")}) == 1
    [(_, meta)] = await store.queue_window(0, 5)
    assert (meta.min_gpu_memory_gb, meta.estimated_duration, meta.owner) == (None, 99.0, None)


async def test_create_answers_the_queue_position_of_a_queued_job(store: JobStore) -> None:
    now = time.time()
    assert await store.create(make_job("late", JobStatus.QUEUED, created=now), message="c", actor="t") == 1
    # Higher priority goes ahead of it; a pending job is in no queue.
    assert await store.create(make_job("urgent", JobStatus.QUEUED, priority=9, created=now + 1), message="c",
                              actor="t") == 1  # fmt: skip
    assert await store.create(make_job("p"), message="c", actor="t") is None
    assert await store.queue_position("late") == 2


async def test_an_export_leaves_the_watched_set_with_its_end_and_a_new_request_stays(store: JobStore) -> None:
    """The end of one export and the request of the next cannot undo each other: each changes the export and
    the set the watchdog sweeps in one script (it once ended, then took the next request out of the set)."""
    await store.create(make_job("x", JobStatus.COMPLETED), message="c", actor="t")
    first = ExportInfo(status=ExportStatus.RUNNING, export_id="e1")
    await store.update("x", {"export": first}, refuse_export=[ExportStatus.RUNNING], exporting=True)
    assert await store.exporting() == ["x"]
    # A second request while it runs is refused and changes nothing.
    with pytest.raises(TransitionRefused):
        await store.update("x", {"export": ExportInfo(status=ExportStatus.RUNNING, export_id="e2")},
                           refuse_export=[ExportStatus.RUNNING], exporting=True)  # fmt: skip
    # The first ends: out of the set in the same step; the next request is in it, and stays there.
    await store.update("x", {"export": first.model_copy(update={"status": ExportStatus.COMPLETED})}, exporting=False)
    assert await store.exporting() == []
    await store.update("x", {"export": ExportInfo(status=ExportStatus.RUNNING, export_id="e2")},
                       refuse_export=[ExportStatus.RUNNING], exporting=True)  # fmt: skip
    # A sweep that read the job before that request cannot take a running export out of the set.
    assert not await store.forget_idle_export("x")
    assert await store.exporting() == ["x"]
    await store.update("x", {"export": ExportInfo(status=ExportStatus.FAILED, export_id="e2")})
    assert await store.forget_idle_export("x")
    assert await store.exporting() == []


async def test_the_longest_wait_counts_from_when_a_job_entered_the_queue_not_from_its_creation(
    store: JobStore,
) -> None:
    from application.services.cluster_store import ClusterStore

    cluster = ClusterStore(store.r, store.keys)
    long_ago = time.time() - 86_400
    await store.create(make_job("old", created=long_ago), message="created", actor="t")  # pending a day
    await store.create(make_job("new", status=JobStatus.QUEUED), message="created", actor="t")
    now = time.time()
    assert (await cluster.metrics_state(10)).oldest_queued_at == pytest.approx(now, abs=5)
    await store.transition("old", JobStatus.QUEUED, now=now - 60)  # started into the queue a minute ago
    assert (await cluster.metrics_state(10)).oldest_queued_at == pytest.approx(now - 60, abs=1)
    await store.transition("old", JobStatus.RUNNING, acquire_gpus=[0])  # it leaves the queue
    await store.delete("new")
    assert (await cluster.metrics_state(10)).oldest_queued_at is None
    # A queued job stored by an older version (not in the index) is recorded from its queued_at, once.
    legacy = make_job("legacy", status=JobStatus.QUEUED, created=long_ago).model_copy(update={"queued_at": now - 5})
    await store.create(legacy, message="created", actor="t")
    await store.r.delete(store.keys.queued_since)
    assert await cluster.backfill_queued_since() == 1 and await cluster.backfill_queued_since() == 0
    assert (await cluster.metrics_state(10)).oldest_queued_at == pytest.approx(now - 5, abs=0.01)
    # A stale entry (a downgrade's, of a job no longer queued) does not hide one missing (review DY).
    await store.r.zadd(store.keys.queued_since, {"gone": now - 100})
    await store.r.zrem(store.keys.queued_since, "legacy")
    assert await cluster.backfill_queued_since() == 1
    assert await store.r.zscore(store.keys.queued_since, "legacy") == pytest.approx(now - 5, abs=0.01)
    # ... and is dropped, not read as the longest wait for good (review EA).
    assert await store.r.zscore(store.keys.queued_since, "gone") is None
    assert (await cluster.metrics_state(10)).oldest_queued_at == pytest.approx(now - 5, abs=0.01)


async def test_a_change_for_the_job_a_caller_read_never_lands_on_one_created_since_under_its_id(
    store: JobStore,
) -> None:
    """Alice read her job `x` and asks to start, stop, pause, re-prioritize or delete it; meanwhile it was deleted
    and Bob created another `x`. Each change is refused as 'missing' (a 404), and Bob's job and his indexes stay
    as they were (the start moved Bob's job into Alice's index of queued jobs)."""
    alices = make_job("x", owner="alice", created=1000.0)
    await store.create(alices, message="created", actor="alice")
    await store.delete("x", created_at=alices.created_at)
    bobs = make_job("x", owner="bob", created=2000.0)
    await store.create(bobs, message="created", actor="bob")
    attempts = [
        store.transition("x", JobStatus.QUEUED, expect=(JobStatus.PENDING,), actor="alice",
                         created_at=alices.created_at),
        store.update("x", {"stop_requested": True}, actor="alice", created_at=alices.created_at),
        store.reprioritize(alices, 9, actor="alice"),
        store.delete("x", created_at=alices.created_at),
    ]  # fmt: skip
    for attempt in attempts:
        with pytest.raises(TransitionRefused) as exc:
            await attempt
        assert exc.value.reason == Refusal.MISSING
    now = await require(store, "x")
    assert (now.owner, now.status, now.priority, now.stop_requested) == ("bob", JobStatus.PENDING, 5, False)
    k = store.keys
    assert await store.r.zrange(k.owner_status_index("bob", JobStatus.PENDING), 0, -1) == ["x"]
    assert await store.r.zcard(k.owner_status_index("alice", JobStatus.QUEUED)) == 0
    # Bob's own changes, with his job's time, go through.
    assert await store.transition("x", JobStatus.QUEUED, expect=(JobStatus.PENDING,), actor="bob",
                                  created_at=bobs.created_at) == JobStatus.PENDING  # fmt: skip
    assert await store.r.zrange(k.owner_status_index("bob", JobStatus.QUEUED), 0, -1) == ["x"]


async def test_a_queue_page_is_read_at_one_moment_past_luas_unpack_limit(store: JobStore) -> None:
    # 9,000 queued: one HMGET of them all would pass unpack()'s limit in the script (some 8,000 values).
    ids = [f"q{i:05d}" for i in range(9000)]
    await store.r.zadd(store.keys.queue, {job_id: i for i, job_id in enumerate(ids)})
    gone = {"q00003", "q08999"}  # (their meta missing: not listed, still counted, as the queue holds them)
    await store.r.hset(store.keys.queue_meta, mapping={
        job_id: QueueMeta(5, float(i), 1, None, None).encode() for i, job_id in enumerate(ids) if job_id not in gone
    })  # fmt: skip
    length, page = await store.queue_page(0, 9000)
    assert length == 9000 and [job_id for job_id, _ in page] == [i for i in ids if i not in gone]
    assert page[4] == ("q00005", QueueMeta(5, 5.0, 1, None, None))
    length, page = await store.queue_page(8990, 100)
    assert length == 9000 and [job_id for job_id, _ in page] == ids[8990:8999]
    assert await store.queue_page(9000, 10) == (9000, [])


async def test_a_mark_an_older_version_moved_past_now_is_not_trusted(
    store: JobStore, redis_client: aioredis.Redis
) -> None:
    # Before review DY's mend, one job stamped by a clock ahead moved the mark for good; the mend kept new marks
    # from passing now, but a mark already past it (the deployment the mend was for) hid later jobs still (review EA).
    now = time.time()
    await redis_client.set(store.keys.summaries_scanned, repr(now + 30 * 86400))
    await redis_client.set(store.keys.summary_fields, ",".join(lua.SUMMARY_FIELDS))  # (no full walk for fields)
    await store.create(make_job("later", created=now - 60), message="", actor="t")
    await redis_client.delete(store.keys.job_summary("later"))
    await store.summaries.backfill()
    assert await redis_client.exists(store.keys.job_summary("later"))
    assert float(await redis_client.get(store.keys.summaries_scanned) or 0) <= time.time()


async def test_a_transitions_unchanged_field_given_as_none_must_be_absent(store: JobStore) -> None:
    """As for `update`: None (a field the caller read as missing) is '' in the script. Left None, the pruning of
    the script's argument dropped it, and the guard passed whatever the field held (review EC)."""
    await store.create(make_job("g"), message="created", actor="t")
    await store.r.hset(store.keys.job("g"), "stray", '"x"')
    with pytest.raises(TransitionRefused) as exc:
        await store.transition("g", JobStatus.QUEUED, expect=(JobStatus.PENDING,), unchanged={"stray": None})
    assert exc.value.reason == Refusal.CHANGED
    await store.r.hdel(store.keys.job("g"), "stray")
    await store.transition("g", JobStatus.QUEUED, expect=(JobStatus.PENDING,), unchanged={"stray": None})
    assert (await require(store, "g")).status == JobStatus.QUEUED
