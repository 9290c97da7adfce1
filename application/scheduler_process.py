"""The scheduler process (`python -m application.scheduler_process`, kept running by `python start.py scheduler`).
One leads (the Redis lock in `leader`); others stand by.

The leader holds the queue processor (starts runs), the watchdog (runners that died, export requests,
retention), lease reclamation and the GPU reading the API workers show. It owns NVML and process control;
the API workers need neither. Runners it launches outlive it. On SIGTERM it releases the lock, so a standby
takes over at once; if it dies, a standby leads within LEADER_TTL_SECONDS.
"""

from __future__ import annotations

if __name__ == "__main__":  # (python -m application.scheduler_process: its keeper starts it again while runs go on)
    # Before the other imports (3 s of them): until then its environment, WEBHOOK_SECRET included, is readable by
    # code a job runs as this user, which may kill it to have it started again (review DW).
    from application.utils.process_privacy import keep_private as _keep_private

    _keep_private()

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Iterable
from typing import Any

from loguru import logger
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, TryAgainError

from application import __version__
from application.config import GpuBackend, Settings
from application.services import clock
from application.services.cluster_store import ClusterStore
from application.services.job_store import JobStore
from application.services.keys import Keys
from application.services.launcher import LiveRunner, LocalLauncher
from application.services.leader import LeaderLock, scheduler_id
from application.services.queue_processor import QueueProcessor
from application.services.redis_service import REDIS_AWAY, RedisService
from application.services.swift_command import SwiftVersion, detect_swift_version, not_a_python_script
from application.services.swift_info import probe, usable
from application.services.watchdog import WATCH_INTERVAL, Watchdog
from application.services.webhooks import Webhooks
from application.utils.gpu_utils import create_inventory
from application.utils.log_files import allow_moved_root
from application.utils.logger import OutageLog

SWIFT_FACTS_CHECK = 10.0  # seconds between looks at whether the published ms-swift facts are still in Redis


# (no lock value is this: `LeaderLock` values are ids and tokens)
NOT_LEADING = "-"


class Scheduler:
    def __init__(self, settings: Settings, redis: RedisService) -> None:
        self.settings = settings
        allow_moved_root(settings.OUTPUT_ROOT)
        # (a typo there started without a word, and every stored job whose data lay in the root meant failed as
        # it started: hunt CE)
        if settings.SIMULATED_GPUS.strip() not in ("", "0") and settings.GPU_BACKEND != GpuBackend.SIMULATED:
            logger.warning("SIMULATED_GPUS={} is not used: GPU_BACKEND={} reads NVML (GPU_BACKEND=simulated "
                           "simulates GPUs)", settings.SIMULATED_GPUS, settings.GPU_BACKEND.value)  # fmt: skip
        for name, root in settings.missing_roots():
            logger.warning("{} names {}, which is no folder here: no job can read from it (a typo?)", name, root)
        assert redis.client is not None
        client = redis.client
        keys = Keys(settings.REDIS_KEY_PREFIX)
        self.store = JobStore(client, keys, events_max=settings.EVENTS_MAX_PER_JOB,
                              history_max=settings.LOSS_HISTORY_LIMIT)  # fmt: skip
        self.cluster = ClusterStore(client, keys)
        self.ident = scheduler_id()
        self.inventory = create_inventory(settings.GPU_BACKEND.value, settings.SIMULATED_GPUS,
                                          settings.SIMULATED_GPU_USAGE_FILE,
                                          visible=settings.CUDA_VISIBLE_DEVICES)  # fmt: skip
        self.launcher = LocalLauncher(settings.runner_env(os.environ))
        self.leader = LeaderLock(self.cluster, self.ident, settings.LEADER_TTL_SECONDS)
        self._version: SwiftVersion | None = None
        self._swift_facts: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        self.swift_facts_check = SWIFT_FACTS_CHECK
        self.processor = QueueProcessor(self.store, self.cluster, self.inventory, settings, self.launcher,
                                        self.fence, self.swift_version, self.ident)  # fmt: skip
        self.watchdog = Watchdog(self.store, self.cluster, self.launcher, settings, self.fence)
        self.webhooks = Webhooks(self.store, self.cluster, settings)
        self._wake = asyncio.Event()
        self.stopping = asyncio.Event()
        # The start-up backfills: due at the first lead and after Redis lost its data, until they have all been made.
        self._backfills_due = True
        self._starts_from = 0.0  # (monotonic) no run starts before: see `_hold_starts`
        self._held_why = ""
        self._deferred: set[str] = set()  # jobs whose start was asked for while starts were held
        # Redis lost its data: once the hold's time is up, starts wait on while runners of this host whose runs it
        # does not know still live (`_hold_for_forgotten`).
        self._forgotten_may_live = False

    def fence(self) -> str:
        """The lock value this scheduler's status changes are fenced by. Once the lead is lost it is none: with no
        fence a script checks nothing, so the changes still in flight as the tasks are cancelled (a start, a
        run's end) would land unfenced; a value no lock holds refuses them."""
        return self.leader.value or NOT_LEADING

    async def swift_version(self) -> SwiftVersion:
        if self._version is None:
            self._version = await asyncio.to_thread(detect_swift_version, self.settings.SWIFT_BIN,
                                                    self.settings.SWIFT_VERSION)  # fmt: skip
        return self._version

    async def publish_swift(self) -> None:
        """What the API workers must know of ms-swift (they may run where it is not installed); probed once."""
        if self._swift_facts is None:
            self._swift_facts = await self._read_swift()
        await self.cluster.put_swift_info(*self._swift_facts)

    async def _read_swift(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        found, reason = usable(self.settings.SWIFT_BIN)
        version = await self.swift_version()
        info = None
        if found:
            info = await asyncio.to_thread(probe, self.settings.SWIFT_BIN, version.version,
                                           self.settings.DATA_DIR / "swift-probe")  # fmt: skip
        else:
            logger.error("ms-swift cannot be run: {}. Creates are refused with 503 until it is fixed", reason)
        return {
            "bin": self.settings.SWIFT_BIN, "version": info.version if info else version.version,
            # The probe's version; its source is the setting's (or the --version check's) when they agree.
            "version_source": "detected" if info and info.version != version.version else version.source,
            "found": found, "reason": reason, "probe_error": not_a_python_script(self.settings.SWIFT_BIN),
            "probed": info is not None, "stamp": f"{self.ident}:{time.time()}",
        }, info.raw if info is not None else None  # fmt: skip

    # ---- the loops ----------------------------------------------------------------------------------

    async def run(self) -> None:
        logger.info("scheduler {} (swift-api {}) standing by for the lead; GPUs: {}", self.ident, __version__,
                    self.inventory.backend)  # fmt: skip
        await clock.sync(self.cluster.r)  # (Redis not answering yet: this host's clock until it does)
        publish = asyncio.create_task(self._publish_swift(), name="swift-probe")
        # (as API workers do: what start-up built, out of the collector's sight, so that a full collection does not
        # stall a pass, a hand-over with it, for tens of milliseconds)
        gc.collect()
        gc.freeze()
        try:
            while not self.stopping.is_set():
                lead = asyncio.create_task(self.leader.wait_for_leadership())
                await _first(lead, self.stopping.wait())
                if self.stopping.is_set():
                    break
                try:
                    keeper = await self._take_lead()
                except (*REDIS_AWAY, ReadOnlyError, TryAgainError) as exc:  # (away, or failing over: a refusal that
                    # would come again, WRONGTYPE say, still ends the process)
                    # A reply lost right after the lock was taken killed the process: the lock then sat unused for
                    # its TTL, and each restart waited twice as long (hunt BH). Stand by again instead.
                    logger.warning("scheduler {} lost Redis while taking the lead ({}): standing by again",
                                   self.ident, exc)  # fmt: skip
                    await self.leader.release()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), 1.0)
                    continue
                tasks = [
                    keeper,
                    asyncio.create_task(self._listen(), name="wakeups"),
                    asyncio.create_task(self._process(), name="queue-processor"),
                    asyncio.create_task(self._watch(), name="watchdog"),
                    asyncio.create_task(self.webhooks.run(), name="webhooks"),
                ]
                await _first(self.leader.lost.wait(), self.stopping.wait())
                await cancel(tasks)
        finally:
            gc.unfreeze()  # (a scheduler run in a process that goes on: a test's)
            await cancel([publish])
            await self.leader.release()  # first: a standby elsewhere may lead (and restart these runs) at once
            stopped = await self._stop_runs() if self.settings.STOP_RUNS_ON_SHUTDOWN else None
            self.inventory.close()
            after = "runners go on" if stopped is None else f"runs stopped, back in the queue: {stopped or '-'}"
            logger.info("scheduler {} stopped; {}", self.ident, after)

    async def _take_lead(self) -> asyncio.Task[None]:
        """What a new leader does before its loops start; returns the task that keeps the lock."""
        await self.cluster.init_processor_switch(self.settings.QUEUE_PROCESSOR_AUTOSTART)
        data_lost = self.leader.redis_lost_it
        self._backfills_due = self._backfills_due or data_lost
        forgotten: list[LiveRunner] = []
        # After a loss, Redis failing this read leaves the usual hold; otherwise the error ends the lead, as before.
        with contextlib.suppress(*((RedisError,) if data_lost else ())):
            forgotten = await self._forgotten_runs()
        # A Redis that lost its data (or was restored from an older snapshot) while runs went on: their runners end
        # them once they find their records gone, but until then they hold GPUs that Redis calls free (hunt BU: a
        # new run was started on them at once). For as long as the stop grace they were started with, which may
        # be longer than this scheduler's (review BV). Named, for the operator: their jobs are gone from the API.
        names = ", ".join(sorted({r.job_id for r in forgotten})[:10])
        ending = f"runs Redis does not know still end on this host ({names})" if forgotten else ""
        if data_lost or forgotten:
            why = "; ".join(w for w in ("Redis lost the lead's lock" if data_lost else "", ending) if w)
            with contextlib.suppress(RedisError):
                await self._hold_starts(why, max((r.ends_within for r in forgotten), default=0.0))
            self._forgotten_may_live = True
        self.leader.redis_lost_it = False
        # Kept from now: the migrations below may outlast the lock's TTL (a rewrite of every summary of 100k
        # jobs), and a lock let lapse meanwhile handed the lead to a standby that did them all again.
        keeper = asyncio.create_task(self.leader.keep(), name="leader-lock")
        try:
            # Again after Redis lost its data (flushed, replaced, restored from a backup): their markers went with
            # it, and users' creates wait for the folders' one (hunt CR: 503 for every user until a restart, once
            # an admin's create had made the jobs index non-empty before any user's could set it). Also when that
            # marker is gone and this scheduler did not see the loss (a standby took the lock first), and until a
            # pass of them has succeeded (one cut short by a Redis error is made at the next lead: review CV).
            if self._backfills_due or not await self.store.folders.mark_indexed_if_empty():
                # (jobs an older version stored, or stored since Redis lost its data)
                if written := await self.store.summaries.backfill():
                    logger.info("wrote the list summaries of {} job(s) that had none", written)
                if recorded := await self.watchdog.files.backfill_users(self.store):
                    logger.info("recorded {} upload(s) read by active jobs", recorded)
                await self.cluster.backfill_queued_since()
                if recorded := await self.store.folders.backfill():
                    logger.info("recorded the owners of {} job folder(s) not recorded yet", recorded)
                self._backfills_due = False
        except BaseException:
            await cancel([keeper])
            raise
        return keeper

    async def _stop_runs(self) -> list[str]:
        try:
            return await self.watchdog.stop_local_runs()
        except RedisError as exc:
            logger.error("could not stop this host's runs (Redis: {}): they end with it, unrecorded", exc)
            return []

    async def _publish_swift(self) -> None:
        """Publish what the API workers must know of ms-swift, trying again until Redis takes it: a scheduler
        that starts while Redis is down would otherwise leave creates refused ("not read yet") for good."""
        pause = 1.0
        while True:
            try:
                await self.publish_swift()
                break
            except RedisError as exc:
                logger.warning("could not publish the ms-swift facts ({}): trying again in {:g} s", exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)
        # Published again when they are gone: a Redis restarted without its data (or flushed) refused every
        # create that names an ms-swift argument ("not read yet") until a scheduler restarted.
        while True:
            await asyncio.sleep(self.swift_facts_check)
            try:
                if await self.cluster.swift_info() is None:
                    logger.warning("the ms-swift facts are gone from Redis (restarted without its data?): "
                                   "publishing them again")  # fmt: skip
                    await self.publish_swift()
            except RedisError:
                pass  # (down: looked at again at the next check)

    async def _listen(self) -> None:
        while True:
            try:
                async for _ in self.cluster.wakeups():
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: the poll interval still drives passes
                logger.warning("wake-up listener: {}; retrying", exc)
                await asyncio.sleep(1.0)

    def _hold(self, why: str, at_least: float = 0.0) -> tuple[str, float]:
        """What a hold of every start says, and for how long: until runs Redis may have forgotten have ended. Back
        from a snapshot or a backup, Redis shows their GPUs free and their jobs queued again, while their runners,
        finding their runs no longer recorded, stop swift within a poll and a stop grace: a start meanwhile put a
        second run on the same GPU (a hunt, Redis rolled back). Redis cannot tell a restart that kept everything
        from one that did not. Kept in Redis, for a standby that takes the lead meanwhile."""
        hold = max(at_least, self.settings.STOP_GRACE_SECONDS + 2 * self.settings.RUNNER_POLL_INTERVAL + 1.0)
        until = time.strftime("%H:%M:%S %Z", time.localtime(time.time() + hold))  # (with its zone: hunt CN)
        return f"no run starts until {until}: {why}, and runs it may have forgotten must end first", hold

    async def _hold_for_forgotten(self) -> None:
        """Past a hold for a Redis that lost its data: starts wait on, a second at a time, while a runner of this
        host whose run Redis does not know still lives. A runner whose connection hung rather than broke learned of
        the loss a socket timeout after the scheduler did, and a second run was given its GPU while its swift was
        still within its stop grace (hunt CT: 1.4 s). It ends once swift's whole group has."""
        alive = await self._forgotten_runs()
        if not alive:
            self._forgotten_may_live = False
            return
        names = ", ".join(sorted({r.job_id for r in alive})[:10])
        said = f"no run starts yet: runs Redis does not know still end on this host ({names})"
        if not self._held_why.startswith(said):
            logger.warning("scheduler {}: {}", self.ident, said)
        seconds = min(1.0, self.settings.QUEUE_POLL_INTERVAL)
        self._hold_locally(seconds, said)
        # (what a queued job's reason says meanwhile; no longer than this look's own hold, which the next round
        # reads back: held for a second more, the next start waited 2 s after the runner's end, review CV)
        await self.cluster.hold_starts(said, seconds)

    async def _forgotten_runs(self) -> list[LiveRunner]:
        """This deployment's runners alive on this host whose runs (or exports) Redis does not know."""
        found = await asyncio.to_thread(self.launcher.runners)
        if not found:
            return []
        fields = await self.store.get_fields([r.job_id for r in found], ["status", "run_id", "export"])
        forgotten = []
        for runner, (status, run_id, export) in zip(found, fields, strict=True):
            known = status is not None and (json.loads(run_id or "null") == runner.run_id if runner.export_id is None
                                            else runner.export_id in (export or ""))  # fmt: skip
            if not known:
                forgotten.append(runner)
        return forgotten

    async def _hold_starts(self, why: str, at_least: float = 0.0) -> None:
        said, hold = self._hold(why, at_least)
        logger.warning("scheduler {}: {} (for {:g} s)", self.ident, said, hold)
        self._hold_locally(hold, said)
        await self.cluster.hold_starts(said, hold)

    def _hold_locally(self, seconds: float, why: str) -> None:
        self._starts_from = max(self._starts_from, time.monotonic() + seconds)
        self._held_why = why
        self.processor.stats.last_error, self.processor.stats.last_error_at = why, clock.now()

    async def _process(self) -> None:
        self._wake.set()
        while True:
            held = self._starts_from - time.monotonic()
            with contextlib.suppress(TimeoutError):
                wait = self.settings.QUEUE_POLL_INTERVAL if held <= 0 else min(held, self.settings.QUEUE_POLL_INTERVAL)
                # A retry's backoff ends: a pass then, not later. (One past was woken for already: with no pass
                # since, the processor stopped or starts held, it made this loop turn every 50 ms: review DW.)
                if (due := self.processor.retry_due) is not None and due > clock.now():
                    wait = min(wait, max(0.05, due - clock.now()))
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()
            requests: list[tuple[str, list[str] | None]] = []
            try:
                # Each round, not only at taking the lead: back from a snapshot that still held this lead's lock,
                # Redis takes its renewals as before. The round's reads in parallel: each waits its turn in a Redis
                # busy with the API's requests, and they are a hand-over's latency.
                hold, taken, switch = await asyncio.gather(
                    self.cluster.restart_hold(*self._hold("Redis restarted since the scheduler last looked")),
                    self.cluster.take_pass_requests(), self.cluster.processor_switch(), return_exceptions=True,
                )  # fmt: skip
                requests = taken if isinstance(taken, list) else []  # (taken: answered below, whatever else failed)
                if isinstance(hold, BaseException):
                    raise hold
                if isinstance(taken, BaseException):
                    raise taken
                if isinstance(switch, BaseException):
                    raise switch
                (restarted, held, why), (enabled, _) = hold, switch
                if restarted:
                    logger.warning("scheduler {}: {} (for {:g} s)", self.ident, why, held)
                    self._forgotten_may_live = True
                if held > 0:
                    self._hold_locally(held, why)
                if self._forgotten_may_live and self._starts_from <= time.monotonic():
                    await self._hold_for_forgotten()
                if self._starts_from > time.monotonic():
                    await self.processor.view()  # still publish the GPU reading
                    await self.cluster.record_pass(self.processor.stats.__dict__)  # (its last_error says why)
                    # Asked-for passes are told why none is made (a start's job stays queued: it starts after).
                    for request_id, only in requests:
                        self._deferred |= set(only or ())
                        await self.cluster.answer_pass(request_id, {"error": self._held_why})
                    continue
                # With the processor off, only what was asked for starts: POST /queue/process (everything that
                # fits) or the start of one job (one asked for while starts were held, too).
                asked = {j for _, only in requests for j in only or ()} | self._deferred  # (even past the window)
                if enabled or any(only is None for _, only in requests):
                    started = await self.processor.run_pass(wanted=asked)
                elif asked:
                    started = await self.processor.run_pass(only=asked)
                else:
                    started = []
                    await self.processor.view()  # still publish the GPU reading
                self._deferred = set()  # (kept until a pass was made for them)
                for request_id, only in requests:
                    await self.cluster.answer_pass(request_id, started if only is None else
                                                   [j for j in started if j in only])  # fmt: skip
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one bad pass kill the processor
                self.processor.stats.last_error = f"{type(exc).__name__}: {exc}"
                self.processor.stats.last_error_at = clock.now()
                _log_failure("queue pass failed", exc)
                # The starts asked for are made by a later round, as a held round's are: taken from Redis (with the
                # round's other reads, or before its pass failed), they are asked for nowhere else, and with the
                # processor off nothing else starts them.
                for _, only in requests:
                    self._deferred |= set(only or ())
                with contextlib.suppress(Exception):
                    await self.cluster.record_pass(self.processor.stats.__dict__)
                    # Those who asked for this pass are told it failed, rather than left to time out.
                    for request_id, _ in requests:
                        await self.cluster.answer_pass(request_id, {"error": self.processor.stats.last_error})
                await asyncio.sleep(min(1.0, self.settings.QUEUE_POLL_INTERVAL))

    async def _watch(self) -> None:
        while True:
            try:
                await self.watchdog.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log_failure("watchdog sweep failed", exc)
            await asyncio.sleep(WATCH_INTERVAL)


# (A sweep every half second said so 7,200 times an hour while Redis refused writes: hunt CI.)
_OUTAGES = OutageLog()


def _log_failure(what: str, exc: Exception) -> None:
    """Redis going away is expected (a restart, a fail-over): one line a minute, not a traceback per pass and
    sweep."""
    if isinstance(exc, REDIS_AWAY):
        _OUTAGES.seen(exc, f"{what}: Redis does not answer ({exc}); trying again", about=what)
    elif isinstance(exc, (OutOfMemoryError, ReadOnlyError)) or str(exc).startswith(("MISCONF", "NOREPLICAS")):
        _OUTAGES.seen(exc, f"{what}: Redis refuses writes ({exc}); trying again", about=what)
    else:
        logger.exception(what)


async def _first(*aws: Awaitable[object]) -> None:
    """Wait until the first of these finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    await cancel(pending)


async def cancel(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel until they are done: redis-py's pubsub read (and wait_for in 3.11) can swallow a cancellation
    that coincides with their result, and one swallowed request would hang a shutdown."""
    pending = [t for t in tasks if not t.done()]
    while pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)
        pending = [t for t in pending if not t.done()]


async def serve(settings: Settings) -> None:
    redis = RedisService(settings)
    await redis.connect()
    scheduler = Scheduler(settings, redis)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, scheduler.stopping.set)
    # A closed terminal's SIGHUP reaches the whole group: it ended the scheduler (and its keeper restarted one).
    loop.add_signal_handler(signal.SIGHUP, lambda: logger.info("SIGHUP taken: nothing to reopen; scheduling on"))
    try:
        await scheduler.run()
    finally:
        await redis.close()


def main() -> None:
    from application.utils.process_privacy import keep_private

    keep_private()  # (already, when run as a module: for a caller of main() of its own)
    from application.config import get_settings
    from application.keeper import die_with_parent
    from application.utils.logger import setup_logging

    settings = get_settings()
    if settings.DIE_WITH_PARENT:
        die_with_parent()
    os.umask(settings.umask)  # (as start.py sets it, for a scheduler started alone)
    try:
        setup_logging(settings.LOG_LEVEL, settings.LOG_DIR, "scheduler")
    except OSError as exc:  # exit 2: its keeper (start.py scheduler) does not start it again for this
        print(f"swift-api: LOG_DIR={settings.LOG_DIR} cannot be used: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
