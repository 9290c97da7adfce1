"""GPUs, system status and health: what the operators' dashboards read."""

from __future__ import annotations

import asyncio
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
        snapshot = await asyncio.to_thread(self.service.inventory.snapshot)
        leases = await self.service.store.leases()
        gpus = []
        for g in snapshot.gpus:
            entry = g.to_dict()
            entry["job_id"] = leases.get(g.index)
            gpus.append(entry)
        return {"backend": snapshot.backend, "driver_version": snapshot.driver_version, "error": snapshot.error,
                "gpus": gpus, "summary": gpu_summary(snapshot)}  # fmt: skip

    async def redis_health(self) -> dict[str, Any]:
        try:
            latency = await self.redis.ping()
            info = await self.redis.info()
            return {"ok": True, "latency_ms": round(latency, 3), "embedded": self.redis.embedded is not None, **info}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "embedded": self.redis.embedded is not None}

    async def system_status(self) -> dict[str, Any]:
        stats = await asyncio.to_thread(host_stats, self.service.settings.OUTPUT_ROOT)
        snapshot = await asyncio.to_thread(self.service.inventory.snapshot)
        redis = await self.redis_health()
        counts = await self.service.store.counts() if redis["ok"] else None
        version = await self.service.swift_version()
        return {
            **stats,
            "gpus": gpu_summary(snapshot),
            "jobs": counts,
            "queue_length": await self.service.store.queue_length() if redis["ok"] else None,
            "redis": redis,
            "queue_processor": {"running": (await self.service.processor.switch())[0], "policy":
                                self.service.settings.QUEUE_POLICY.value},
            "swift": {"bin": self.service.settings.SWIFT_BIN, "version": version.version,
                      "version_source": version.source},
            "version": __version__,
            "uptime_seconds": round(time.time() - self.service.started_at, 3),
        }  # fmt: skip

    async def health(self) -> tuple[bool, dict[str, Any]]:
        redis = await self.redis_health()
        snapshot = await asyncio.to_thread(self.service.inventory.snapshot)
        body = {
            "status": "healthy" if redis["ok"] else "unhealthy",
            "redis": redis,
            "gpu": {"backend": snapshot.backend, "count": len(snapshot.gpus), "error": snapshot.error},
            "version": __version__,
        }
        if not redis["ok"]:
            body["detail"] = f"Redis does not answer: {redis['error']}"
        return bool(redis["ok"]), body
