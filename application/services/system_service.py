"""GPUs, system status and health: what the operators' dashboards read.

GPU readings and ms-swift facts come from the scheduler (through the store): an API worker needs neither
GPUs nor ms-swift of its own. Host figures (CPU, memory, disk of OUTPUT_ROOT) are this API host's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import psutil

from application import __version__
from application.services.redis_service import RedisService
from application.services.training_service import TrainingService
from application.utils.gpu_utils import gpu_summary

# A GPU reading older than this says the scheduler is not watching the GPUs any more.
STALE_GPU_SECONDS = 60.0


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
        "cpu": {"count": psutil.cpu_count(), "percent": psutil.cpu_percent(interval=None)},
        "memory": {"total_gb": round(vm.total / gib, 2), "used_gb": round(vm.used / gib, 2),
                   "available_gb": round(vm.available / gib, 2), "percent": vm.percent},
        "disk": {"path": str(output_root), "total_gb": round(disk.total / gib, 2), "used_gb": round(disk.used / gib, 2),
                 "free_gb": round(disk.free / gib, 2), "percent": round(disk.used / disk.total * 100, 1)},
        "load": {"1m": load1, "5m": load5, "15m": load15},
    }  # fmt: skip


class SystemService:
    def __init__(self, service: TrainingService, redis: RedisService) -> None:
        self.service = service
        self.redis = redis

    async def gpus(self) -> dict[str, Any]:
        snapshot = await self.service.gpu_snapshot()
        leases = await self.service.store.leases()
        gpus = []
        for g in snapshot.gpus:
            entry = g.to_dict()
            entry["job_id"] = leases.get(g.index)
            gpus.append(entry)
        return {"backend": snapshot.backend, "driver_version": snapshot.driver_version, "error": snapshot.error,
                "taken_at": snapshot.taken_at or None, "gpus": gpus, "summary": gpu_summary(snapshot)}  # fmt: skip

    async def redis_health(self) -> dict[str, Any]:
        try:
            latency = await self.redis.ping()
            info = await self.redis.info()
            return {"ok": True, "latency_ms": round(latency, 3), "embedded": self.redis.embedded is not None, **info}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "embedded": self.redis.embedded is not None}

    async def scheduler_health(self) -> dict[str, Any]:
        leader = await self.service.cluster.leader()
        snapshot = await self.service.gpu_snapshot()
        age = time.time() - snapshot.taken_at if snapshot.taken_at else None
        return {
            "ok": leader is not None,
            "leader": leader.scheduler_id if leader else None,
            "gpu_reading_age_seconds": round(age, 3) if age is not None else None,
            **({} if leader else {"error": "no scheduler leads: queued jobs wait (python start.py scheduler)"}),
        }

    async def swift_health(self) -> dict[str, Any]:
        raw = await self.service.cluster.swift_info_raw()
        if raw is None:
            return {"ok": None, "version": None, "bin": None, "detail": "not known yet: the scheduler reports it"}
        info = json.loads(raw)
        return {"ok": info.get("version") is not None or info.get("probed"), "version": info.get("version"),
                "version_source": info.get("version_source"), "bin": info.get("bin"),
                "probed": info.get("probed")}  # fmt: skip

    async def system_status(self) -> dict[str, Any]:
        settings = self.service.settings
        stats = await asyncio.to_thread(host_stats, settings.OUTPUT_ROOT)
        snapshot = await self.service.gpu_snapshot()
        redis = await self.redis_health()
        counts = await self.service.store.counts() if redis["ok"] else None
        enabled, _ = await self.service.cluster.processor_switch() if redis["ok"] else (False, None)
        return {
            **stats,
            "gpus": gpu_summary(snapshot),
            "jobs": counts,
            "queue_length": await self.service.store.queue_length() if redis["ok"] else None,
            "redis": redis,
            "scheduler": await self.scheduler_health() if redis["ok"] else None,
            "queue_processor": {"running": enabled, "policy": settings.QUEUE_POLICY.value},
            "swift": await self.swift_health() if redis["ok"] else None,
            "version": __version__,
            "uptime_seconds": round(time.time() - self.service.started_at, 3),
        }

    async def health(self) -> tuple[bool, dict[str, Any]]:
        redis = await self.redis_health()
        body: dict[str, Any] = {"status": "healthy" if redis["ok"] else "unhealthy", "redis": redis,
                                "version": __version__}  # fmt: skip
        if not redis["ok"]:
            body["detail"] = f"Redis does not answer: {redis['error']}"
            return False, body
        snapshot = await self.service.gpu_snapshot()
        body["gpu"] = {"backend": snapshot.backend, "count": len(snapshot.gpus), "error": snapshot.error}
        body["scheduler"] = await self.scheduler_health()
        body["swift"] = await self.swift_health()
        if not body["scheduler"]["ok"]:
            body["status"] = "degraded"
        return True, body
