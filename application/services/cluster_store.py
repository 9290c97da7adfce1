"""What the scheduler, the runners and the API workers tell each other through Redis, beside the jobs.

The leader lock, runner heartbeats, the scheduler's GPU reading and ms-swift facts (API workers have neither
GPUs nor ms-swift of their own), the processor switch and statistics, manual pass requests, wake-ups,
idempotency records (idempotency_records.py) and rate counters, the webhook queue (webhook_queue.py; this store
extends both) and the shared metrics. Like `JobStore`, the only place these keys are read or written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from application.models.training_model import JobStatus
from application.services import clock, lua_cluster
from application.services.export_targets import ExportTargets
from application.services.idempotency_records import IdempotencyRecords
from application.services.job_reads import job_fields
from application.services.keys import Keys
from application.services.queue_view import PlanningState
from application.services.redis_service import REDIS_AWAY
from application.services.scheduler import Head
from application.services.webhook_queue import WebhookQueue
from application.utils.gpu_types import GpuSnapshot

PASS_WAITERS = 8  # waits for a pass's answer one process has in Redis at once
STALE_READING_SECONDS = 60.0  # a leading scheduler publishes its GPU reading every few seconds
# A Redis with no run_id recorded whose jobs are all this new, none running, is a new deployment's (`restart_hold`).
FRESH_SECONDS = 300.0


def reading_error(snapshot: GpuSnapshot, now: float) -> str | None:
    """What is wrong with a published GPU reading: its own error, or its age once no scheduler renews it (its
    memory, use and holders may have changed since)."""
    age = now - snapshot.taken_at if snapshot.taken_at else None
    if snapshot.error is None and age is not None and age > STALE_READING_SECONDS:
        return f"this reading is {age:.0f} s old: no scheduler has published one since (is one running?)"
    return snapshot.error


@dataclass(frozen=True)
class Leader:
    value: str  # "<fencing token>:<scheduler id>"

    @property
    def scheduler_id(self) -> str:
        return self.value.partition(":")[2]

    @property
    def token(self) -> int:
        return int(self.value.partition(":")[0])


@dataclass(frozen=True)
class RunnerTick:
    """What a runner learns from its job at each heartbeat."""

    status: str | None
    run_id: str | None
    stop_requested: bool
    export_stop_requested: bool
    export_id: str | None
    pause_requested: bool = False
    preempt_for: str | None = None


@dataclass(frozen=True, slots=True)
class CreateContext:
    """Everything a create reads before it stores the job, read in one round trip (`ClusterStore.create_context`)."""

    snapshot: dict[str, Any] | None  # the scheduler's GPU reading
    swift: dict[str, Any] | None  # its ms-swift facts
    leases: dict[int, str]
    running: list[str]
    queue_length: int
    head: Head | None
    history_version: int
    leader: Leader | None
    processor_enabled: bool
    rate_count: int | None  # this window's creates by the caller, this one included (None: no rate limit)
    folders_indexed: bool = True  # the folders of jobs stored by an older version are recorded (folder_owners)
    starts_held: str | None = None  # why no run starts for a moment (`hold_starts`), while it holds
    clocks: dict[str, float] = field(default_factory=dict)  # the heads' since when (`QueueView.head_clocks`)

    @property
    def planning_state(self) -> PlanningState:
        return PlanningState(self.leases, self.running, self.queue_length, self.history_version)


@dataclass(frozen=True)
class MetricsState:
    counts: dict[JobStatus, int]  # jobs by status
    queue_length: int
    oldest_queued_at: float | None
    snapshot: dict[str, Any] | None  # the scheduler's GPU reading
    leases: dict[str, str]  # GPU index -> job
    latency: dict[str, str]  # the scheduling-latency histogram's hash
    running: list[str]  # running jobs (the first of them)
    exporting: int  # jobs whose merge export runs or waits to be launched


class ClusterStore(WebhookQueue, IdempotencyRecords, ExportTargets):
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.r: Any = client
        self.keys = keys
        self._acquire = client.register_script(lua_cluster.LEADER_ACQUIRE)
        self._renew = client.register_script(lua_cluster.LEADER_RENEW)
        self._release = client.register_script(lua_cluster.LEADER_RELEASE)
        self._claim_answer = client.register_script(lua_cluster.CLAIM_ANSWER)
        self._queued_since = client.register_script(lua_cluster.QUEUED_SINCE)
        self._queued_since_stale = client.register_script(lua_cluster.QUEUED_SINCE_STALE)
        self._create_context = client.register_script(lua_cluster.CREATE_CONTEXT)
        self._claim_export_target = client.register_script(lua_cluster.CLAIM_EXPORT_TARGET)
        self._release_export_targets = client.register_script(lua_cluster.RELEASE_EXPORT_TARGETS)
        self._restart_hold = client.register_script(lua_cluster.RESTART_HOLD)
        self._pass_waits = asyncio.Semaphore(PASS_WAITERS)
        self._set_head = client.register_script(lua_cluster.SET_HEAD)

    # ---- the leader lock -----------------------------------------------------------------------------

    async def restart_hold(self, why: str, seconds: float) -> tuple[bool, float, str]:
        """Whether Redis restarted since the leader last asked (its run_id is another now), and so may have come
        back from an older state (a snapshot, a backup) that forgot runs which go on: then no run starts for
        `seconds` (`why`), held in Redis for this leader or the next. Nothing recorded yet counts as a restart when
        jobs are stored (a snapshot taken before a version that records it), not for a new deployment (no job, or
        only jobs of its first FRESH_SECONDS, none running); with INFO refused, none is told. Also how long starts
        are held now (0: they are not), and why. One round trip: INFO is read by the script (the scheduler asks
        each round, and a round's reads lie between a run's end and the next start)."""
        restarted, left_ms, held_why = await self._restart_hold(
            keys=[
                self.keys.redis_run,
                self.keys.starts_held,
                self.keys.jobs_index,
                self.keys.status_index(JobStatus.RUNNING),
            ],
            args=[
                json.dumps(
                    {
                        "why": why,
                        "ms": max(1, int(seconds * 1000)),
                        "fresh_since": clock.now() - FRESH_SECONDS,
                    }
                )
            ],
        )
        return bool(restarted), int(left_ms) / 1000, held_why or ""

    async def hold_starts(self, why: str, seconds: float) -> None:
        await self.r.set(self.keys.starts_held, why, px=max(1, int(seconds * 1000)))

    async def starts_held(self) -> tuple[float, str]:
        """How long no run may start yet (0 when it may), and why: a hold any leader set, kept across a change of
        leader (a standby taking the lead within it)."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.pttl(self.keys.starts_held)
            pipe.get(self.keys.starts_held)
            left_ms, why = await pipe.execute()
        return (left_ms / 1000 if left_ms and left_ms > 0 else 0.0), why or ""

    async def acquire_leadership(self, scheduler_id: str, ttl: float) -> str | None:
        """The lock's value (with a new fencing token) when this scheduler now leads, else None."""
        value = await self._acquire(keys=[self.keys.leader], args=[json.dumps(
            {"id": scheduler_id, "ttl_ms": int(ttl * 1000), "epoch": self.keys.leader_epoch})])  # fmt: skip
        return str(value) if value else None

    async def renew_leadership(self, value: str, ttl: float) -> bool:
        return bool(
            await self._renew(keys=[self.keys.leader], args=[json.dumps({"value": value, "ttl_ms": int(ttl * 1000)})])
        )

    async def release_leadership(self, value: str) -> None:
        await self._release(keys=[self.keys.leader], args=[json.dumps({"value": value})])

    @contextlib.asynccontextmanager
    async def holding(self, key: str, ttl: float, wait: float) -> AsyncIterator[bool]:
        """`key` held for the block (SET NX with a TTL, freed only by its holder): yields True, or False when
        another held it for all of `wait` seconds."""
        token = uuid.uuid4().hex
        deadline = time.monotonic() + wait
        while not await self.r.set(key, token, nx=True, px=int(ttl * 1000)):
            if time.monotonic() >= deadline:
                yield False
                return
            await asyncio.sleep(0.05)
        try:
            yield True
        finally:
            # With Redis gone, the key lapses at its TTL: what the block did stands (an answer that says "try
            # again" would be a lie, and its retry refused).
            with contextlib.suppress(*REDIS_AWAY):
                await asyncio.shield(self._release(keys=[key], args=[json.dumps({"value": token})]))

    async def leader(self) -> Leader | None:
        value = await self.r.get(self.keys.leader)
        return Leader(value) if value else None

    # ---- runners ------------------------------------------------------------------------------------

    async def runner_tick(self, job_id: str, beat: Mapping[str, Any], ttl: float) -> RunnerTick:
        """Beat a runner's heartbeat and read what it must know of its job, in one round trip."""
        async with self.r.pipeline(transaction=False) as pipe:
            raw = json.dumps(dict(beat))
            pipe.set(self.keys.runner_heartbeat(job_id, str(beat["id"])), raw, px=int(ttl * 1000))
            # The job's one key too, which a scheduler of the previous version reads (a rollback, a rolling
            # upgrade whose lead goes back to a host not upgraded yet): left to expire.
            pipe.set(self.keys.runner_heartbeat(job_id), raw, px=int(ttl * 1000))
            pipe.hmget(self.keys.job(job_id), ["status", "run_id", "stop_requested", "export_stop_requested", "export",
                                               "pause_requested", "preempt_for"])  # fmt: skip
            _, _, (status, run_id, stop, export_stop, export, pause, preempt) = await pipe.execute()
        return RunnerTick(
            status=json.loads(status) if status else None,
            run_id=json.loads(run_id) if run_id else None,
            stop_requested=bool(stop and json.loads(stop)),
            export_stop_requested=bool(export_stop and json.loads(export_stop)),
            export_id=(json.loads(export) or {}).get("export_id") if export else None,
            pause_requested=bool(pause and json.loads(pause)),
            preempt_for=json.loads(preempt) if preempt else None,
        )

    async def runner_heartbeat(self, job_id: str, ident: str | None) -> dict[str, Any] | None:
        return (await self.runner_heartbeats([(job_id, ident)]))[0]

    async def runner_heartbeats(self, runs: list[tuple[str, str | None]]) -> list[dict[str, Any] | None]:
        """The heartbeats of these (job, run or export id): each one's own, else the job's key as runners of
        earlier versions beat it (the caller checks whose beat it is)."""
        keys = [k for job_id, ident in runs for k in (self.keys.runner_heartbeat(job_id, ident or "-"),
                                                      self.keys.runner_heartbeat(job_id))]  # fmt: skip
        raws = await self.r.mget(keys) if keys else []
        pairs = zip(raws[::2], raws[1::2], strict=True)
        return [json.loads(own or legacy) if own or legacy else None for own, legacy in pairs]

    async def heartbeat_and_lead(self, job_id: str, ident: str | None,
                                 fence: str | None) -> tuple[dict[str, Any] | None, bool]:  # fmt: skip
        """`runner_heartbeat`, and whether `fence` is still the leader lock's value (None: unfenced, as in the
        store's transitions), read together."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.runner_heartbeat(job_id, ident or "-"))
            pipe.get(self.keys.runner_heartbeat(job_id))
            pipe.get(self.keys.leader)
            own, legacy, leader = await pipe.execute()
        return (json.loads(own or legacy) if own or legacy else None), fence is None or leader == fence

    async def drop_runner_heartbeats(self, job_id: str, idents: Iterable[str]) -> None:
        if keys := [self.keys.runner_heartbeat(job_id, ident) for ident in idents]:
            await self.r.delete(*keys)

    # ---- what the scheduler publishes for the API workers -------------------------------------------
    # (a GPU reading older than STALE_READING_SECONDS says no scheduler watches the GPUs any more)

    async def put_gpu_snapshot(self, snapshot: Mapping[str, Any]) -> None:
        await self.r.set(self.keys.gpu_snapshot, json.dumps(dict(snapshot), separators=(",", ":")))

    async def gpu_snapshot(self) -> dict[str, Any] | None:
        raw = await self.r.get(self.keys.gpu_snapshot)
        return json.loads(raw) if raw else None

    async def queue_head(self) -> Head | None:
        return _head(await self.r.get(self.keys.queue_head))

    async def create_context(self, rate: tuple[str, float] | None) -> CreateContext:
        """What a create needs, in one command (lua_cluster.CREATE_CONTEXT). `rate` (window key, period) counts
        this create."""
        keys = [self.keys.gpu_snapshot, self.keys.swift_info, self.keys.queue_head, self.keys.history_version,
                self.keys.leader, self.keys.folders_indexed, self.keys.starts_held, self.keys.gpu_leases,
                self.keys.status_index(JobStatus.RUNNING), self.keys.queue, self.keys.processor_stats,
                self.keys.head_since]  # fmt: skip
        if rate is not None:
            keys.append(rate[0])
        out = await self._create_context(keys=keys, args=[max(1, int(rate[1])) + 1 if rate is not None else 0])
        (snapshot, info, head, version, leader, indexed, held), leases, running, length, enabled, n, clocks = out
        return CreateContext(
            snapshot=json.loads(snapshot) if snapshot else None, swift=json.loads(info) if info else None,
            leases={int(k): v for k, v in zip(leases[::2], leases[1::2], strict=True)}, running=list(running),
            queue_length=int(length), head=_head(head), history_version=int(version or 0),
            leader=Leader(leader) if leader else None, processor_enabled=enabled == "1",
            rate_count=int(n) if rate is not None else None, folders_indexed=bool(indexed), starts_held=held or None,
            clocks={j: float(t) for j, t in zip(clocks[::2], clocks[1::2], strict=True)},
        )  # fmt: skip

    async def set_queue_head(self, head: Head, read: float | None = None) -> None:
        """`read`: the head's clock as the caller read it (`QueueView.head_clocks`), if it had one: nothing is
        written unless it still stands."""
        k = self.keys
        await self._set_head(keys=[k.queue, k.queue_head, k.head_since],
                             args=[head[0], repr(head[1]), "" if read is None else repr(read)])  # fmt: skip

    async def put_swift_info(self, info: Mapping[str, Any], probe: Mapping[str, Any] | None) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            if probe is not None:
                pipe.set(self.keys.swift_probe, json.dumps(dict(probe), separators=(",", ":")))
            else:
                pipe.delete(self.keys.swift_probe)
            pipe.set(self.keys.swift_info, json.dumps(dict(info), separators=(",", ":")))
            await pipe.execute()

    async def swift_info(self) -> dict[str, Any] | None:
        raw = await self.r.get(self.keys.swift_info)
        return json.loads(raw) if raw else None

    async def swift_probe(self) -> dict[str, Any] | None:
        raw = await self.r.get(self.keys.swift_probe)
        return json.loads(raw) if raw else None

    async def health_state(self) -> dict[str, Any]:
        """Everything /health shows, in one round trip: Redis itself, the leader, the GPU reading, ms-swift."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.info("server")
            # A write, as every create makes: a Redis whose disk is full answers reads and refuses writes
            # (MISCONF), and INFO cannot tell whether it refuses them (that depends on its configuration).
            pipe.set(self.keys.health_probe, "1", px=60_000)
            pipe.get(self.keys.leader)
            pipe.get(self.keys.gpu_snapshot)
            pipe.get(self.keys.swift_info)
            pipe.get(self.keys.starts_held)
            info, probe, leader, snapshot, swift, held = await pipe.execute(raise_on_error=False)
        for answer in (info, leader, snapshot, swift, held):
            if isinstance(answer, Exception):
                raise answer
        return {
            "redis": {k: str(info.get(k)) for k in ("redis_version", "uptime_in_seconds") if k in info},
            "write_error": f"Redis refuses writes: {probe}" if isinstance(probe, ResponseError) else None,
            "leader": Leader(leader) if leader else None,
            "gpus": json.loads(snapshot) if snapshot else None,
            "swift": json.loads(swift) if swift else None,
            "starts_held": held or None,
        }

    async def check_writable(self) -> None:
        """Raises Redis's refusal (OOM, MISCONF, READONLY) while it takes no writes."""
        await self.r.set(self.keys.health_probe, "1", px=60_000)

    async def published(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The scheduler's GPU reading and ms-swift facts, in one round trip."""
        snapshot, info = await self.r.mget([self.keys.gpu_snapshot, self.keys.swift_info])
        return (json.loads(snapshot) if snapshot else None), (json.loads(info) if info else None)

    # ---- the processor switch and statistics --------------------------------------------------------

    async def processor_switch(self) -> tuple[bool, float | None]:
        raw = await self.r.hmget(self.keys.processor_stats, ["enabled", "since"])
        return raw[0] == "1", float(raw[1]) if raw[1] else None

    async def set_processor_switch(self, on: bool) -> bool:
        key = self.keys.processor_stats
        flag = "1" if on else "0"
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hget(key, "enabled")
            pipe.hset(key, "enabled", flag)
            previous, _ = await pipe.execute()
        changed = previous != flag
        if changed:
            await self.r.hset(key, "since", repr(clock.now()))
            await self.publish_wakeup("processor")
        return bool(changed)

    async def init_processor_switch(self, on: bool) -> None:
        """Set the switch at start-up only if nobody set it yet (an operator's stop survives restarts)."""
        if await self.r.hsetnx(self.keys.processor_stats, "enabled", "1" if on else "0"):
            await self.r.hset(self.keys.processor_stats, "since", repr(clock.now()))

    async def record_pass(self, stats: Mapping[str, Any]) -> None:
        await self.r.hset(self.keys.processor_stats, mapping={k: json.dumps(v) for k, v in stats.items()})

    async def pass_stats(self) -> dict[str, Any]:
        raw = await self.r.hgetall(self.keys.processor_stats)
        return {k: json.loads(v) for k, v in raw.items() if k not in ("enabled", "since")}

    # ---- manual passes and wake-ups -----------------------------------------------------------------

    async def request_pass(self, request_id: str, timeout: float, only: list[str] | None = None) -> list[str] | None:
        """Ask the leader for a pass now (starting only `only`, when given) and wait for the jobs it started;
        None when no answer came in time."""
        deadline = time.monotonic() + timeout
        await self.r.rpush(self.keys.pass_requests, json.dumps({"id": request_id, "only": only}))
        await self.publish_wakeup("pass")
        # Each wait holds a pooled connection in its BLPOP: 600 starts at once took all of a worker's, and other
        # users' requests waited seconds for one, or were 503 (hunt DN). Past PASS_WAITERS they wait their turn
        # holding none (the answer waits in Redis for a minute).
        try:
            await asyncio.wait_for(self._pass_waits.acquire(), timeout)
        except TimeoutError:
            return None
        try:
            # In steps shorter than the client's socket timeout: one BLPOP as long as the wait (5 s, like
            # REDIS_SOCKET_TIMEOUT's default) timed out its socket read, retried, and answered 503 after 21 s.
            socket_timeout = self.r.connection_pool.connection_kwargs.get("socket_timeout") or 2.0
            step = max(0.1, min(1.0, socket_timeout / 2))
            while (left := deadline - time.monotonic()) > 0.01:  # (BLPOP takes a timeout of 0 as "for ever")
                reply = await self.r.blpop([self.keys.pass_result(request_id)], timeout=round(min(step, left), 3))
                if reply:
                    answer = json.loads(reply[1])
                    # A pass that failed answers {"error": ...}: as no answer (the caller says to try again).
                    return list(answer) if isinstance(answer, list) else None
            return None
        finally:
            self._pass_waits.release()

    async def take_pass_requests(self) -> list[tuple[str, list[str] | None]]:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.lrange(self.keys.pass_requests, 0, -1)
            pipe.delete(self.keys.pass_requests)
            raws, _ = await pipe.execute()
        requests = [json.loads(raw) for raw in raws]
        return [(str(r["id"]), r.get("only")) for r in requests]

    async def answer_pass(self, request_id: str, started: list[str] | dict[str, str]) -> None:
        key = self.keys.pass_result(request_id)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(started))
            pipe.expire(key, 60)
            await pipe.execute()

    async def publish_wakeup(self, reason: str) -> None:
        await self.r.publish(self.keys.wakeup_channel, reason)

    async def wakeups(self) -> AsyncIterator[str]:
        """Every message on the wake-up channel, for as long as the connection holds."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        async with pubsub:
            await pubsub.subscribe(self.keys.wakeup_channel)
            async for message in pubsub.listen():
                yield str(message.get("data"))

    # ---- metrics -------------------------------------------------------------------------------------------

    async def record_scheduling_latency(self, seconds: float, buckets: Iterable[float]) -> None:
        """One observation of the scheduling-latency histogram, shared by every scheduler that ever led."""
        key = self.keys.metric("scheduling_latency")
        async with self.r.pipeline(transaction=True) as pipe:
            for bound in buckets:
                if seconds <= bound:
                    pipe.hincrby(key, repr(float(bound)), 1)
            pipe.hincrby(key, "+Inf", 1)
            pipe.hincrbyfloat(key, "sum", seconds)
            await pipe.execute()

    async def backfill_queued_since(self) -> int:
        """Record when the queued jobs an older version stored entered the queue (their `queued_at`), for the
        longest wait /metrics shows (once, at a scheduler's start)."""
        queued = self.keys.status_index(JobStatus.QUEUED)
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.zrange(queued, 0, -1)
            pipe.zrange(self.keys.queued_since, 0, -1)
            waiting, known = await pipe.execute()
        # Two reads of ids, not a read of every queued job's record (1.5-2.6 s at 20,000 queued: hunt DX); by
        # membership, not by counts (a downgrade's stale entry hid a missing one: review DY).
        missing = sorted(set(waiting) - set(known))
        if stale := sorted(set(known) - set(waiting)):  # (dropped only if still not queued, in the script)
            for i in range(0, len(stale), 1000):
                await self._queued_since_stale(keys=[queued, self.keys.queued_since], args=stale[i : i + 1000])
        if not missing:
            return 0
        recorded = 0
        rows = await job_fields(self.r, self.keys, missing, ["queued_at"])
        for (at,), job_id in zip(rows, missing, strict=True):
            if at and json.loads(at) is not None:  # still queued when it is added, or not at all
                recorded += int(await self._queued_since(keys=[queued, self.keys.queued_since],
                                                         args=[job_id, repr(float(json.loads(at)))]))  # fmt: skip
        return recorded

    async def metrics_state(self, running_max: int) -> MetricsState:
        """What /metrics shows beside the HTTP figures, in one round trip (counts from the indexes, no scan)."""
        statuses = list(JobStatus)
        async with self.r.pipeline(transaction=False) as pipe:
            for s in statuses:
                pipe.zcard(self.keys.status_index(s))
            pipe.zcard(self.keys.queue)
            pipe.zrange(self.keys.queued_since, 0, 0, withscores=True)
            pipe.get(self.keys.gpu_snapshot)
            pipe.hgetall(self.keys.gpu_leases)
            pipe.hgetall(self.keys.metric("scheduling_latency"))
            pipe.zrange(self.keys.status_index(JobStatus.RUNNING), 0, running_max - 1)
            pipe.scard(self.keys.exporting)
            replies = await pipe.execute()
        counts = replies[: len(statuses)]
        queue_length, oldest, snapshot, leases, latency, running, exporting = replies[len(statuses) :]
        return MetricsState(
            counts={s: int(n) for s, n in zip(statuses, counts, strict=True)}, queue_length=int(queue_length),
            oldest_queued_at=float(oldest[0][1]) if oldest else None,
            snapshot=json.loads(snapshot) if snapshot else None, leases=leases, latency=latency, running=running,
            exporting=int(exporting),
        )  # fmt: skip


def _head(raw: str | None) -> Head | None:
    if not raw:
        return None
    job_id, since = json.loads(raw)
    return (str(job_id), float(since))
