"""Jobs, the queue and GPU leases in Redis (reads of jobs: job_reads.py; events and loss history: job_log.py;
reads of the queue and the leases: queue_view.py; this store extends all three). Only the store modules talk to
Redis: these, cluster_store.py and the few that keep one record each (files, run_history, owner_slots,
idempotency_records, ...).

A job is a hash with one field per top-level `Job` field, each JSON-encoded, so writers of different
fields (a run's progress, the API's priority change) never overwrite each other. Every status change goes
through `transition`, one Lua script that refuses illegal moves (and any move out of a terminal state),
stamps times, keeps the status indexes (all jobs and the owner's), the queue and the GPU leases in step,
and appends the event. A refusal comes back as `TransitionRefused` with a `Refusal` reason; turning that
into words for HTTP is the service layer's job.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from application.models.training_model import (
    ALLOWED_TRANSITIONS,
    REOPENABLE,
    TERMINAL_STATUSES,
    ExportStatus,
    Job,
    JobStatus,
    PredictedDuration,
)
from application.services import clock, lua, lua_cluster
from application.services.folder_owners import FolderIndex
from application.services.job_codec import (
    QueueMeta,
    encode_fields,
    encode_value,
    event_payload,
    script_arg,
)
from application.services.job_log import SCHEDULER as SCHEDULER
from application.services.job_log import JobLog
from application.services.job_reads import JobReads
from application.services.job_reads import joined as joined
from application.services.job_summaries import JobSummaries
from application.services.keys import Keys
from application.services.queue_view import QueueView
from application.services.refusals import Refusal as Refusal
from application.services.refusals import TransitionRefused as TransitionRefused
from application.services.scheduler import queue_score

# Fields an index or another key mirrors (status and owner sets, the queue's score, the list's order, the
# output-folder claims): only create, transition, set_priority and delete change them, keeping those in step.
INDEXED_FIELDS = frozenset({"job_id", "status", "owner", "priority", "created_at", "output_dir"})


class Claim(NamedTuple):
    """The claim of an Idempotency-Key (idempotency.held_claim): its key and value."""

    key: str
    value: str


class JobStore(JobReads, JobLog, QueueView):
    def __init__(self, client: aioredis.Redis, keys: Keys, *, events_max: int = 1000, history_max: int = 2000):
        super().__init__(client, keys, events_max=events_max, history_max=history_max)
        self._create = client.register_script(lua.CREATE)
        self._transition = client.register_script(lua.TRANSITION)
        self._guarded = client.register_script(lua.GUARDED_UPDATE)
        self._delete = client.register_script(lua.DELETE)
        self._forget_lost = client.register_script(lua.FORGET_LOST)
        self._claim_export_target = client.register_script(lua_cluster.CLAIM_EXPORT_TARGET)
        self._reprioritize = client.register_script(lua.REPRIORITIZE)
        self._drop_lease = client.register_script(lua_cluster.DROP_LEASE)
        self._queue_page = client.register_script(lua_cluster.QUEUE_PAGE)
        self._mark_heads = client.register_script(lua_cluster.MARK_HEADS)
        self._set_prediction = client.register_script(lua.SET_PREDICTION)
        self._forget_idle_export = client.register_script(lua.FORGET_IDLE_EXPORT)
        self.folders = FolderIndex(client, keys)
        self.summaries = JobSummaries(client, keys)

    async def _incarnation(self, job_id: str, created_at: float | None) -> tuple[str | None, str, str | None]:
        """The job's owner, its `created_at` as stored and the job it exports (a quantized export's), read
        together: a script given that time acts only on that job, so the owner's index keys built from it are
        that job's (an id deleted and created again by another owner in between got the first owner's indexes).
        MISSING when the job is gone, or is not the one created at `created_at`, the job the caller read."""
        owner, created, export_of = await self.r.hmget(self.keys.job(job_id), ["owner", "created_at", "export_of"])
        if created is None or (created_at is not None and json.loads(created) != created_at):
            raise TransitionRefused(Refusal.MISSING)
        names: list[str | None] = []
        for raw in (owner, export_of):
            try:
                name = json.loads(raw) if raw else None
            except ValueError:  # a record written by hand: its job can still be failed, stopped and deleted
                name = None
            names.append(name if isinstance(name, str) else None)
        return names[0], created, names[1]

    def _status_keys(self, owner: str | None) -> tuple[dict[str, str], dict[str, str] | None]:
        k = self.keys
        every = {s.value: k.status_index(s) for s in JobStatus}
        mine = {s.value: k.owner_status_index(owner, s) for s in JobStatus} if owner else None
        return every, mine

    # ---- jobs -------------------------------------------------------------------------------------------

    async def create(self, job: Job, *, message: str, actor: str, max_waiting: int = 0,
                     uploads: Sequence[str] = (), folder: Mapping[str, Any] | None = None,
                     claim: Claim | None = None) -> int | None:  # fmt: skip
        """Store a new job, and return its queue position (1 first) when it is queued; raises
        TransitionRefused(EXISTS), (OUTPUT_DIR_BUSY, detail=the holder), (WAITING_CAP, detail=how many) when
        its owner already has `max_waiting` pending or queued jobs (0: no cap), (UPLOAD_GONE, detail=the id)
        when one of the uploaded files it names (`uploads`, their ids) has been deleted meanwhile, or
        (FOREIGN_FOLDER) when `folder` (`folder_owners.folder_arg`, with `check`) overlaps another owner's job
        folder, or (CLAIM_LOST) when `claim` (the Idempotency-Key's) no longer holds. Its output folder is recorded
        as its owner's (if no job recorded it before)."""
        k = self.keys
        queued = job.status == JobStatus.QUEUED
        capped = job.owner if max_waiting else None  # the owner whose cap counts (anonymous callers have none)
        folder = folder or {"owner": job.owner or ""}
        res = await self._create(keys=[k.job(job.job_id)], args=[script_arg({
            "id": job.job_id, "fields": encode_fields(job.model_dump()), "created_at": repr(job.created_at),
            "output_dir": job.output_dir,
            "score": repr(queue_score(job.priority, job.created_at)) if queued else None,
            "meta": QueueMeta.of(job).encode(),
            "event": event_payload("created", message, {"status": job.status.value, "priority": job.priority},
                                   actor, job.created_at),
            "maxlen": self.events_max,
            "cap": max_waiting if capped else None,
            "uploads": list(uploads),
            "folder": folder,
            "claim": claim._asdict() if claim else None,
            "k": {"all": k.jobs_index, "status": k.status_index(job.status), "events": k.job_events(job.job_id),
                  "history": k.job_history(job.job_id), "sent": k.job_sent(job.job_id),
                  "output_dirs": k.output_dirs, "folder_owners": k.folder_owners, "folders": k.folders,
                  "owner_folders": k.owner_folders(folder["owner"]),
                  "queue": k.queue, "queue_meta": k.queue_meta, "queued_since": k.queued_since,
                  "wakeup": k.wakeup_channel, "summary": k.job_summary(job.job_id),
                  **({"owner_all": k.owner_index(job.owner),
                      "owner_status": k.owner_status_index(job.owner, job.status)} if job.owner else {}),
                  **({"owner_pending": k.owner_status_index(capped, JobStatus.PENDING),
                      "owner_queued": k.owner_status_index(capped, JobStatus.QUEUED)} if capped else {}),
                  "upload_files": [k.file(f) for f in uploads], "upload_users": [k.file_users(f) for f in uploads]},
        })])  # fmt: skip
        if res[0] != "ok":
            raise TransitionRefused.from_reply(res)
        return int(res[1]) + 1 if len(res) > 1 else None

    async def update(
        self,
        job_id: str,
        fields: Mapping[str, Any],
        *,
        statuses: Iterable[JobStatus] | None = None,
        refuse_export: Iterable[ExportStatus] | None = None,
        event: tuple[str, str, Mapping[str, Any] | None] | None = None,
        actor: str = SCHEDULER,
        run_id: str | None = None,
        exporting: bool | None = None,
        unchanged: Mapping[str, str | None] | None = None,
        fence: str | None = None,
        created_at: float | None = None,
        notify: str | None = None,
        claim: Claim | None = None,
    ) -> str:
        """Set fields only if the job still exists (and is in `statuses`, its export not in `refuse_export`, the
        `unchanged` fields still as stored when the caller read them (`get_fields`): CHANGED otherwise; with
        `fence`, only while that scheduler leads);
        `exporting` puts the job in (True) or out of (False) the exports the watchdog watches, in the same step;
        `notify` queues that webhook event in it too (an export's end: none is lost between two steps);
        `claim`: an Idempotency-Key's claim that must still hold (CLAIM_LOST).

        Returns the job's status; raises TransitionRefused otherwise. A deleted job is never recreated.
        """
        _not_indexed(fields)
        now = clock.now()
        res = await self._guarded(keys=[self.keys.job(job_id)], args=[script_arg({
            "fields": encode_fields({**fields, "updated_at": now}),
            "statuses": [s.value for s in statuses] if statuses is not None else None,
            "refuse_export": [s.value for s in refuse_export] if refuse_export is not None else None,
            "event": event_payload(event[0], event[1], event[2], actor, now) if event else None,
            "maxlen": self.events_max, "run_id": run_id, "id": job_id, "exporting": exporting, "fence": fence,
            "unchanged": {name: raw or "" for name, raw in unchanged.items()} if unchanged else None,
            "created": encode_value(created_at) if created_at is not None else None,
            "notify": notify, "now": repr(now), "claim": claim._asdict() if claim else None,
            "k": {"events": self.keys.job_events(job_id), "summary": self.keys.job_summary(job_id),
                  "exporting": self.keys.exporting, "leader": self.keys.leader, "webhooks": self.keys.webhooks,
                  "webhooks_global": self.keys.webhooks_global, "expiry": self.keys.expiry},
        })])  # fmt: skip
        if res[0] != "ok":
            raise TransitionRefused.from_reply(res)
        return str(res[1])

    async def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        expect: Iterable[JobStatus] | None = None,
        fields: Mapping[str, Any] | None = None,
        message: str = "",
        data: Mapping[str, Any] | None = None,
        acquire_gpus: Iterable[int] = (),
        actor: str = SCHEDULER,
        run_id: str | None = None,
        fence: str | None = None,
        now: float | None = None,
        reopen: bool = False,
        max_waiting: int = 0,
        created_at: float | None = None,
        uploads: Sequence[str] = (),
        refuse_export: Iterable[ExportStatus] | None = None,
        unchanged: Mapping[str, str | None] | None = None,
    ) -> JobStatus:
        """The one way a job's status changes. Returns the previous status.

        Refuses (TransitionRefused) a move not in ALLOWED_TRANSITIONS — so never out of a terminal state —
        or from a status outside `expect`, or onto a GPU another job leases. Stamps queued/started/finished
        times, keeps the indexes, queue and leases consistent (a job that ends releases its GPUs; one leaving
        the queue leaves the queue set) and wakes the queue processors when GPUs or the queue change.
        `run_id` writes only into that run of the job; `fence` (the leader's lock value) only while that
        scheduler still leads. `reopen` (resume) also allows REOPENABLE moves out of a terminal state, claiming
        the output folder again (OUTPUT_DIR_BUSY when another active job took it meanwhile). `max_waiting` (a
        user's resume): WAITING_CAP when the move would give its owner more pending and queued jobs than that.
        `uploads` (with `reopen`): the uploaded files it reads, UPLOAD_GONE unless all are still there.
        `refuse_export`: EXPORT_STATE while the job's export is in one of these. `unchanged`: CHANGED unless these
        fields still hold these raw (JSON) values, as for `update`.
        """
        now = clock.now() if now is None else now
        allowed = {s for s, targets in ALLOWED_TRANSITIONS.items() if to in targets}
        if reopen:
            allowed |= {s for s, targets in REOPENABLE.items() if to in targets}
        if expect is not None:
            allowed &= set(expect)
        extra: dict[str, Any] = dict(fields or {})
        _not_indexed(extra)
        extra["updated_at"] = now
        if to == JobStatus.QUEUED:
            extra.setdefault("queued_at", now)
            # Only a retry's own move waits (its `retry_at`): a resume or a preemption goes back at once.
            extra.setdefault("retry_at", None)
        elif to == JobStatus.RUNNING:
            extra.setdefault("started_at", now)
            extra.setdefault("retry_at", None)  # (its backoff is over: not shown for ever after)
        if to.is_terminal():
            extra.setdefault("finished_at", now)
            extra.setdefault("retry_at", None)  # (a retry stopped in its backoff waits for nothing: review DW)
        owner, created, export_of = await self._incarnation(job_id, created_at)
        every, mine = self._status_keys(owner)
        k = self.keys
        parent = None
        if export_of and to.is_terminal():
            # The job it exports says how its quantized export ended, as it says how a merge ended.
            ended = {JobStatus.COMPLETED: "export_completed", JobStatus.CANCELLED: "export_stopped"}
            parent = {"id": export_of, "job": k.job(export_of), "events": k.job_events(export_of),
                      "event": event_payload(ended.get(to, "export_failed"), f"quantized export job '{job_id}' "
                                             f"{to.value}" + (f": {message}" if message and to != JobStatus.COMPLETED
                                                              else ""),
                                             {"job_id": job_id, "status": to.value}, actor, now)}  # fmt: skip
        for _ in range(5):
            queue: dict[str, Any] = {"queue": "remove"}
            if to == JobStatus.QUEUED:
                job = await self.get(job_id)
                if job is None:
                    raise TransitionRefused(Refusal.MISSING)
                queue = {"queue": "add", "priority": job.priority,
                         "meta": QueueMeta.of(job, retry_at=extra["retry_at"]).encode(),
                         "score": repr(queue_score(job.priority, job.created_at))}  # fmt: skip
            res = await self._transition(keys=[k.job(job_id)], args=[script_arg({
                "id": job_id, "to": to.value, "allowed": sorted(s.value for s in allowed),
                "fields": encode_fields(extra), **queue, "acquire": list(acquire_gpus),
                "terminal": to.is_terminal(), "reopen": reopen, "since": repr(extra.get("queued_at", now)),
                # A run that ends, pauses or goes back to the queue gives its GPUs back in the same step.
                "release": to.is_terminal() or to in (JobStatus.PAUSED, JobStatus.QUEUED),
                "finished_at": repr(extra["finished_at"]) if to.is_terminal() else None,
                "event": event_payload(f"status_{to.value}", message or f"status changed to {to.value}",
                                       {"status": to.value, **(data or {})}, actor, now),
                "maxlen": self.events_max, "wake": to in (JobStatus.QUEUED, JobStatus.PAUSED) or to.is_terminal(),
                "run_id": run_id, "fence": fence, "cap": max_waiting if max_waiting and owner else None,
                "unchanged": {name: raw or "" for name, raw in (unchanged or {}).items()},
                "refuse_export": [s.value for s in refuse_export] if refuse_export is not None else None,
                "created": created, "uploads": [{"id": f, "file": k.file(f), "users": k.file_users(f)}
                                                for f in uploads] if reopen else [],
                "notify_on": [s.value for s in (*TERMINAL_STATUSES, JobStatus.PAUSED)], "parent": parent,
                "k": {"events": k.job_events(job_id), "output_dirs": k.output_dirs, "queue": k.queue,
                      "queue_meta": k.queue_meta, "leases": k.gpu_leases, "wakeup": k.wakeup_channel,
                      "expiry": k.expiry, "leader": k.leader, "summary": k.job_summary(job_id), "status": every,
                      "webhooks": k.webhooks, "webhooks_global": k.webhooks_global,
                      "owner_status": mine, "queued_since": k.queued_since, "queue_head": k.queue_head,
                      "head_since": k.head_since},
            })])  # fmt: skip
            if res[0] == "ok":
                return JobStatus(res[1])
            refused = TransitionRefused.from_reply(res)
            if refused.reason != Refusal.PRIORITY_CHANGED:
                raise refused
        raise refused

    async def delete(self, job_id: str, uploads: Sequence[str] = (), *, created_at: float | None = None,
                     actor: str | None = None, ended_only: bool = False) -> JobStatus:  # fmt: skip
        """Remove the record (and, as a user of `uploads`, from theirs); raises TransitionRefused(MISSING |
        BAD_STATE (running; with `ended_only`, any status but a terminal one) | EXPORT_STATE). `actor`: who
        deleted it, for the `job_deleted` notification."""
        k = self.keys
        owner, created, _ = await self._incarnation(job_id, created_at)
        every, mine = self._status_keys(owner)
        res = await self._delete(keys=[k.job(job_id)], args=[script_arg({
            "id": job_id, "created": created, "now": repr(clock.now()),
            "refuse": [s.value for s in JobStatus if not s.is_terminal()] if ended_only else [JobStatus.RUNNING.value],
            "message": f"deleted by {actor} before it ended" if actor else "deleted before it ended",
            "unended": [s.value for s in JobStatus if not s.is_terminal() and s != JobStatus.RUNNING],
            "k": {"all": k.jobs_index, "owner_all": k.owner_index(owner) if owner is not None else None,
                  "events": k.job_events(job_id), "history": k.job_history(job_id), "summary": k.job_summary(job_id),
                  "sent": k.job_sent(job_id), "output_dirs": k.output_dirs,
                  "queue": k.queue, "queue_meta": k.queue_meta, "leases": k.gpu_leases, "expiry": k.expiry,
                  "exporting": k.exporting, "status": every, "owner_status": mine, "queued_since": k.queued_since,
                  "queue_head": k.queue_head, "head_since": k.head_since,
                  "upload_users": [k.file_users(f) for f in uploads],
                  "webhooks": k.webhooks, "webhooks_global": k.webhooks_global},
        })])  # fmt: skip
        if res[0] != "ok":
            raise TransitionRefused.from_reply(res)
        return JobStatus(res[1])

    async def forget_lost(self, job_id: str) -> bool:
        """Drop the index entries (queue, status, GPU leases) of a job whose record is gone; False, touching
        nothing, while it exists."""
        k = self.keys
        # Its owner and output folder, from its summary when that is left: the owner's indexes counted it against
        # the owner's waiting cap, and its folder's claim refused every new job naming that folder, for good.
        owner = folder = None
        with contextlib.suppress(ValueError, AttributeError):
            summary = json.loads(await self.r.get(k.job_summary(job_id)) or "{}")
            owner, folder = summary.get("owner"), summary.get("output_dir")
        owner = owner if isinstance(owner, str) else None
        every, mine = self._status_keys(owner)
        forgot = bool(await self._forget_lost(keys=[k.job(job_id)], args=[script_arg({
            "id": job_id, "output_dir": folder if isinstance(folder, str) else None, "k": {
                "all": k.jobs_index, "status": every, "queue": k.queue, "queue_meta": k.queue_meta,
                "queued_since": k.queued_since, "leases": k.gpu_leases, "queue_head": k.queue_head,
                "head_since": k.head_since,
                "expiry": k.expiry, "exporting": k.exporting, "summary": k.job_summary(job_id),
                "owner_all": k.owner_index(owner) if owner is not None else None, "owner_status": mine,
                "output_dirs": k.output_dirs, "events": k.job_events(job_id), "history": k.job_history(job_id),
                "sent": k.job_sent(job_id)}})]))  # fmt: skip
        if forgot and isinstance(folder, str):
            await self._drop_claims(job_id, folder)
        return forgot

    async def _drop_claims(self, job_id: str, folder: str) -> None:
        """The export folders (in `folder`) a job whose record is gone still claimed: kept for good (hunt CD). Read a
        page at a time, no one command over every claim (100,000 held Redis half a second: review CF); each dropped
        only while it holds what was read. One its quantized export's job holds stays: that job may still write
        there, and its own delete releases it."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", folder) + "/*"
        async for target, held in self.r.hscan_iter(self.keys.export_targets, match=pattern, count=1000):
            with contextlib.suppress(ValueError):
                holder = json.loads(held)
                if isinstance(holder, dict) and holder.get("of") == job_id and not holder.get("job"):
                    await self._claim_export_target(keys=[self.keys.export_targets], args=[json.dumps(
                        {"target": target, "expect": held, "value": ""})])  # fmt: skip

    async def reprioritize(self, job: Job, priority: int, *, actor: str) -> JobStatus:
        now = clock.now()
        k = self.keys
        res = await self._reprioritize(keys=[k.job(job.job_id)], args=[script_arg({
            "id": job.job_id, "priority": json.dumps(priority), "score": repr(queue_score(priority, job.created_at)),
            "created": encode_value(job.created_at),
            "meta": QueueMeta.of(job, priority, retry_at=job.retry_at).encode(), "updated_at": json.dumps(now),
            "maxlen": self.events_max,
            "event": event_payload("priority_changed", f"priority changed from {job.priority} to {priority}",
                                   {"from": job.priority, "to": priority}, actor, now),
            "k": {"queue": k.queue, "queue_meta": k.queue_meta, "events": k.job_events(job.job_id),
                  "wakeup": k.wakeup_channel, "summary": k.job_summary(job.job_id), "queue_head": k.queue_head,
                  "head_since": k.head_since},
        })])  # fmt: skip
        if res[0] != "ok":
            raise TransitionRefused.from_reply(res)
        return JobStatus(res[1])

    async def set_predictions(self, found: Mapping[str, PredictedDuration]) -> int:
        """Give jobs that wait (pending or queued) the predictions found for them since they were created, in one
        round trip; how many still waited."""
        if not found:
            return 0
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id, prediction in found.items():
                await self._set_prediction(keys=[self.keys.job(job_id)], args=[script_arg({
                    "id": job_id, "predicted": prediction.model_dump_json(),
                    "seconds": encode_value(prediction.seconds),
                    "k": {"queue_meta": self.keys.queue_meta, "summary": self.keys.job_summary(job_id)},
                })], client=pipe)  # fmt: skip
            return sum(int(n) for n in await pipe.execute())

    async def expired(self, before: float, limit: int) -> list[str]:
        """Terminal jobs that finished before `before`, oldest first."""
        return list(await self.r.zrangebyscore(self.keys.expiry, "-inf", repr(before), start=0, num=limit))

    async def keep_until(self, job_id: str, at: float) -> None:
        """Retention looks at the job again once `at` is past (only one that ended: XX)."""
        await self.r.zadd(self.keys.expiry, {job_id: at}, xx=True, gt=True)

    async def unexpire(self, job_id: str) -> None:
        """Out of retention's sight: a record it can neither read nor delete, left to an operator."""
        await self.r.zrem(self.keys.expiry, job_id)


def _not_indexed(fields: Mapping[str, Any]) -> None:
    if indexed := INDEXED_FIELDS.intersection(fields):
        raise ValueError(f"{', '.join(sorted(indexed))}: changed only by the operations that keep its indexes")
