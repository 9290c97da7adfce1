"""GPUs, system status and health: what the operators' dashboards read.

GPU readings and ms-swift facts come from the scheduler (through the store): an API worker needs neither
GPUs nor ms-swift of its own. Host figures (CPU, memory, disk of OUTPUT_ROOT) are this API host's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from application import __version__
from application.auth import Caller
from application.exceptions import NotFound
from application.models.system_model import WebhookKey
from application.services import clock
from application.services.cluster_store import reading_error
from application.services.gpu_pool import never_free
from application.services.redis_service import RedisService
from application.services.training_service import TrainingService
from application.services.webhooks import owner_key
from application.utils.gpu_types import snapshot_of
from application.utils.gpu_utils import gpu_summary

HEALTH_TIMEOUT = 3.0  # seconds /health waits for Redis before it answers 503


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def host_stats(output_root: Path) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    disk = shutil.disk_usage(_existing_parent(output_root))
    load1, load5, load15 = os.getloadavg()
    gib = 1024**3
    return {
        "cpu": {"count": psutil.cpu_count()},
        "memory": {"total_gb": round(vm.total / gib, 2), "used_gb": round(vm.used / gib, 2),
                   "available_gb": round(vm.available / gib, 2), "percent": vm.percent},
        "disk": {"path": str(output_root), "total_gb": round(disk.total / gib, 2), "used_gb": round(disk.used / gib, 2),
                 "free_gb": round(disk.free / gib, 2), "percent": _percent_full(disk)},
        "load": {"1m": load1, "5m": load5, "15m": load15},
    }  # fmt: skip


def _percent_full(disk: Any) -> float:
    """As df's Use%: of what users can fill (used + available). Blocks reserved for root, and what the
    filesystem keeps for itself, count in `total` too: used/total stayed far below 100 on a full disk."""
    room = disk.used + disk.free
    return round(disk.used / room * 100, 1) if room else 0.0


class SystemService:
    def __init__(self, service: TrainingService, redis: RedisService) -> None:
        self.service = service
        self.redis = redis
        # psutil measures CPU use since the process's previous call: a worker's first GET /system/status said 0.0
        # whatever the load. Measured from this worker's start instead.
        psutil.cpu_percent(interval=None)
        # start.py's embedded server lives under DATA_DIR and is reached through its unix socket.
        # (its URL quotes the path: a DATA_DIR with a space or '%' in it)
        self.embedded = redis.url.startswith("unix://") and quote(str(service.settings.DATA_DIR)) in redis.url

    async def signing_key(self, caller: Caller, owner: str | None = None, rotate: bool = False) -> WebhookKey:
        """The key that signs the notifications to the own webhook_url of the caller's jobs (an admin: of `owner`'s
        too); `rotate` replaces it first, so that the one before signs no more."""
        secret = self.service.settings.WEBHOOK_SECRET
        if owner is not None and owner != caller.name:
            caller.require_admin("the signing key of another owner's jobs")
            if owner not in {entry.name for entry in self.service.settings.api_keys}:
                # (a typo answered 200 and rotated no one's key: review DY)
                raise NotFound(f"owner '{owner}': no API key has that name (API_KEYS, API_KEYS_FILE)")
        whose = caller.name if owner is None else owner
        if secret is None:
            raise NotFound("this server signs no notification (its operator has set no WEBHOOK_SECRET)")
        cluster = self.service.cluster
        generation = await (cluster.rotate_signing_key(whose) if rotate else cluster.signing_generation(whose))
        return WebhookKey(owner=whose, signing_key=owner_key(secret.get_secret_value(), whose, generation),
                          generation=generation)  # fmt: skip

    async def gpus(self) -> dict[str, Any]:
        snapshot = await self.service.gpu_snapshot()
        leases = await self.service.store.leases()
        gpus = []
        for g in snapshot.gpus:
            entry = g.to_dict()
            entry["job_id"] = leases.get(g.index)
            gpus.append(entry)
        error = reading_error(snapshot, clock.now())
        seen = {g.index for g in snapshot.gpus}
        # (A reading that failed shows no GPU: its error says so, and nothing is "missing" then.)
        read = snapshot.taken_at and snapshot.error is None
        missing = [{"index": i, "job_id": job} for i, job in sorted(leases.items()) if read and i not in seen]
        return {"backend": snapshot.backend, "driver_version": snapshot.driver_version, "error": error,
                "taken_at": snapshot.taken_at or None, "gpus": gpus, "missing": missing,
                "summary": gpu_summary(snapshot, error)}  # fmt: skip

    async def _state(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Redis's own health, and what the scheduler published, in one round trip."""
        started = time.perf_counter()
        try:
            # Bounded: a Redis that hangs (stopped, swapping) would hold the answer for the client's timeout times
            # its retries (20 s by default), past any health check's patience (the image's: 5 s).
            state = await asyncio.wait_for(self.service.cluster.health_state(), HEALTH_TIMEOUT)
        except TimeoutError:
            # (The wait counts this worker's own queue too: under 2,000 requests at once it answered this while
            # Redis answered a ping in 40 ms, hunt BY.)
            error = f"Redis did not answer within {HEALTH_TIMEOUT:g} s, or this API worker was too busy to take it"
            return {"ok": False, "error": error, "embedded": self.embedded}, None
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "embedded": self.embedded}, None
        latency = (time.perf_counter() - started) * 1000
        return {"ok": True, "latency_ms": round(latency, 3), "embedded": self.embedded, **state["redis"]}, state

    @staticmethod
    def _scheduler(state: dict[str, Any]) -> dict[str, Any]:
        leader = state["leader"]
        snapshot = state["gpus"]
        age = clock.now() - float(snapshot.get("taken_at") or 0) if snapshot else None
        return {
            "ok": leader is not None,
            "leader": leader.scheduler_id if leader else None,
            "gpu_reading_age_seconds": round(age, 3) if age is not None else None,
            **({} if leader else {"error": "no scheduler leads: queued jobs wait (python start.py scheduler)"}),
        }

    @staticmethod
    def _swift(info: dict[str, Any] | None) -> dict[str, Any]:
        if info is None:
            return {"ok": None, "version": None, "bin": None, "detail": "not known yet: the scheduler reports it"}
        found = info.get("found", True)  # stored by an older scheduler: it did not check
        probed = bool(info.get("probed"))
        detail = info.get("reason") if not found else (
            None if probed else info.get("probe_error") or "ms-swift's arguments could not be read with SWIFT_BIN's "
            "Python: jobs run, but only the named training fields can be set")  # fmt: skip
        return {"ok": bool(found), "version": info.get("version"), "version_source": info.get("version_source"),
                "bin": info.get("bin"), "probed": probed, "detail": detail}  # fmt: skip

    async def system_status(self) -> dict[str, Any]:
        settings = self.service.settings
        stats = await asyncio.to_thread(host_stats, settings.OUTPUT_ROOT)
        # On this thread, which the constructor primed: psutil measures from the calling thread's previous call,
        # and a worker thread's first said 0.0 whatever the load (hunt BM). (It reads /proc/stat: microseconds.)
        stats["cpu"]["percent"] = psutil.cpu_percent(interval=None)
        redis, state = await self._state()
        snapshot = snapshot_of(state["gpus"] if state else None)
        counts = await self.service.store.counts() if state else None
        enabled, _ = await self.service.cluster.processor_switch() if state else (False, None)
        # Running: switched on and a scheduler leads to run it (as GET /queue/processor/status says).
        processor = {"running": enabled and bool(state and state["leader"]), "enabled": enabled,
                     "policy": settings.QUEUE_POLICY.value}  # fmt: skip
        return {
            **stats,
            "gpus": gpu_summary(snapshot, reading_error(snapshot, clock.now())),
            "jobs": counts,
            "queue_length": await self.service.store.queue_length() if state else None,
            "redis": redis,
            "scheduler": self._scheduler(state) if state else None,
            "queue_processor": processor,
            "swift": self._swift(state["swift"]) if state else None,
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self.service.started, 3),
        }

    async def health(self, full: bool = True) -> tuple[bool, dict[str, Any]]:
        ok, body = await self._health()
        return ok, body if full else _public(body)

    async def _health(self) -> tuple[bool, dict[str, Any]]:
        redis, state = await self._state()
        body: dict[str, Any] = {"status": "healthy" if state else "unhealthy", "redis": redis,
                                "version": __version__}  # fmt: skip
        if state is None:
            body["detail"] = f"Redis does not answer: {redis['error']}"
            return False, body
        reading = snapshot_of(state["gpus"])
        body["gpu"] = {"backend": reading.backend, "count": len(reading.gpus),
                       "error": reading_error(reading, clock.now())}  # fmt: skip
        if never := never_free(reading, self.service.settings.GPU_MIN_FREE_MEMORY_GB):
            body["gpu"]["never_free"] = never
        # GPUs that cannot be read (lost, NVML failing or hung), NVML without GPUs, or a reading no scheduler renews;
        # not a server meant to have none (no NVML library, SIMULATED_GPUS=0), whose `error` says so all the same.
        gpu_trouble = any(g.error for g in reading.gpus) or (reading.backend == "nvml" and not reading.gpus) or (
            reading.error is None and body["gpu"]["error"] is not None)  # fmt: skip
        body["scheduler"] = self._scheduler(state)
        body["swift"] = self._swift(state["swift"])
        if state["starts_held"]:
            # No run starts for a moment: OUTPUT_ROOT's disk full or read-only, Redis restarted (`hold_starts`).
            body["scheduler"]["starts_held"] = state["starts_held"]
        if not body["scheduler"]["ok"] or body["swift"]["ok"] is False or state["starts_held"] or never or gpu_trouble:
            body["status"] = "degraded"
        if state["write_error"]:
            # It answers reads, so it looked fine while every create, start and update was refused (MISCONF).
            redis["ok"], redis["error"] = False, state["write_error"]
            body["status"] = "degraded"
        return True, body


def _public(body: dict[str, Any]) -> dict[str, Any]:
    """/health for a caller without a key on a server with keys: what is up, and nothing an outsider could use to
    find their way in (Redis's address in its error, the leader's host and pid, SWIFT_BIN's path, versions)."""
    public: dict[str, Any] = {
        "status": body["status"],
        "redis": {"ok": body["redis"]["ok"]},
        "version": None,
        "detail": "send an API key for the details (errors, scheduler, ms-swift, versions)",
    }
    if "gpu" in body:
        public["gpu"] = {"backend": body["gpu"]["backend"], "count": body["gpu"]["count"]}
    # With what readiness checks wait for: a GPU reading published, ms-swift's arguments read.
    if "scheduler" in body:
        public["scheduler"] = {k: body["scheduler"][k] for k in ("ok", "gpu_reading_age_seconds")}
    if "swift" in body:
        public["swift"] = {k: body["swift"].get(k) for k in ("ok", "probed")}
    return public
