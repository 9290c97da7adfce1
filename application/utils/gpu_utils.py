"""What the GPUs on this host hold right now, from NVML or from a simulation.

Every backend answers `snapshot()` without raising: the scheduler polls it in a thread of its own (gpu_reader.py),
and a driver hiccup must become a readable `error`, never a dead poll loop.

Memory figures are MiB (1024**2 bytes) although the fields say `_mb`, because that is the unit
nvidia-smi prints and operators compare against; the `_gb` figures in `gpu_summary` are GiB.

NVML indices are physical (PCI bus order), as nvidia-smi's are, and stay so: CUDA_VISIBLE_DEVICES in the scheduler's
environment only leaves GPUs out (runs get theirs as CUDA_DEVICE_ORDER=PCI_BUS_ID indices).
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Any

import pynvml
from loguru import logger

from application.services import clock
from application.setting_values import parse_simulated_gpus, parse_visible_devices
from application.utils.gpu_types import (
    MIB,
    NVML_NOT_STARTED,
    SIMULATE_HINT,
    GpuInfo,
    GpuInventory,
    GpuProcess,
    GpuSnapshot,
)
from application.utils.nvml_inventory import (
    LINK_SCORE_BY_TOPOLOGY,
    LINK_SCORE_NVLINK,
    NvmlInventory,
    NvmlUnavailableError,
    nvml_message,
)
from application.utils.simulated_gpus import SIMULATED_LINK_SCORE, SimulatedInventory

__all__ = [
    "LINK_SCORE_BY_TOPOLOGY", "LINK_SCORE_NVLINK", "MIB", "SIMULATED_LINK_SCORE", "GpuInfo", "GpuInventory",
    "GpuProcess", "GpuSnapshot", "NoGpuInventory", "NvmlInventory", "NvmlStarting", "NvmlUnavailableError",
    "SimulatedInventory", "create_inventory", "gpu_summary",
]  # fmt: skip


class NoGpuInventory:
    """No GPUs at all, with the reason shown to whoever asks."""

    backend: str = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def snapshot(self) -> GpuSnapshot:
        return GpuSnapshot(self.backend, (), self.reason, None, clock.now())

    def link_score(self, a: int, b: int) -> int | None:
        return None

    def close(self) -> None:
        pass


class NvmlStarting(NoGpuInventory):
    """NVML that could not start: no GPUs, with NVML's reason, and started again every RETRY_SECONDS (in the
    reading's thread) until it does; its readings are then NvmlInventory's. It was tried once: a driver mismatch
    at start-up (an upgrade not yet rebooted, a driver still loading) left the scheduler GPU-less, saying
    healthy, until someone restarted it (hunt DO).

    Its backend is `none` on a host without NVML's library when GPU_BACKEND=auto (a CPU-only host, as expected),
    `nvml` otherwise (a GPU host in trouble, or one asked for NVML: `/health` says degraded)."""

    RETRY_SECONDS = 30.0

    def __init__(self, nvml: Any, error: BaseException, asked: str = "auto",
                 visible: tuple[str, ...] | None = None) -> None:  # fmt: skip
        self._nvml = nvml
        self._asked = asked
        self._visible = visible
        self._started: NvmlInventory | None = None
        self._next = time.monotonic() + self.RETRY_SECONDS
        self._failed(error)

    def snapshot(self) -> GpuSnapshot:
        if self._started is None and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.RETRY_SECONDS
            try:
                self._started = NvmlInventory(self._nvml, self._visible)
                self.backend = self._started.backend
                logger.info("NVML started: {} GPU(s)", self._started.count)
            except Exception as exc:
                before = self.reason
                self._failed(exc)
                if self.reason != before:
                    logger.warning("GPU_BACKEND: {}", self.reason)
        if self._started is not None:
            return self._started.snapshot()
        return GpuSnapshot(self.backend, (), self.reason, None, clock.now())

    def link_score(self, a: int, b: int) -> int | None:
        return self._started.link_score(a, b) if self._started else None

    def close(self) -> None:
        if self._started is not None:
            self._started.close()

    def _failed(self, error: BaseException) -> None:
        cause = error.__cause__ if isinstance(error, NvmlUnavailableError) else error
        absent = getattr(cause, "value", None) == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
        self.backend = "none" if absent and self._asked == "auto" else "nvml"
        self.reason = f"NVML could not be loaded: {nvml_message(error)}; {SIMULATE_HINT}" if absent else (
            f"{NVML_NOT_STARTED}: {nvml_message(error)} (nvidia-smi says more about the NVIDIA driver); tried "
            f"again every {self.RETRY_SECONDS:.0f} s")  # fmt: skip


def create_inventory(
    backend: str,
    simulated_gpus: str = "0",
    usage_file: Path | None = None,
    *,
    nvml: Any = pynvml,
    visible: str | None = None,
) -> GpuInventory:
    """Build the inventory GPU_BACKEND asks for; a missing NVML gives NoGpuInventory, never an exception.

    Raises ValueError only for an unknown backend name or a bad `simulated_gpus`, which Settings
    already rejects at start-up.
    """
    name = (backend.value if isinstance(backend, Enum) else str(backend)).strip().lower()
    if name == "simulated":
        sizes = parse_simulated_gpus(simulated_gpus)
        return SimulatedInventory(len(sizes), sizes, usage_file)
    if name not in ("auto", "nvml"):
        raise ValueError(f"unknown GPU backend {backend!r}: expected auto, nvml or simulated")
    only = None
    if visible is not None:  # (CUDA_VISIBLE_DEVICES)
        only, stopped = parse_visible_devices(visible)
        if stopped:
            logger.warning("CUDA_VISIBLE_DEVICES={!r}: {}; read as CUDA reads it, up to there: {}", visible, stopped,
                           ",".join(only) or "no GPU")  # fmt: skip
    try:
        return NvmlInventory(nvml, only)
    except Exception as exc:
        starting = NvmlStarting(nvml, exc, name, only)
        logger.warning("GPU_BACKEND={}: {}", name, starting.reason)
        return starting


def gpu_summary(snapshot: GpuSnapshot, error: str | None) -> dict[str, Any]:
    """The reading's totals; `error` is what is wrong with it (`cluster_store.reading_error`)."""
    gpus = snapshot.gpus
    utilizations = [g.utilization for g in gpus if g.utilization is not None]
    return {
        "backend": snapshot.backend,
        "count": len(gpus),
        "memory_total_gb": round(sum(g.memory_total_mb for g in gpus) / 1024, 2),
        "memory_used_gb": round(sum(g.memory_used_mb for g in gpus) / 1024, 2),
        "memory_free_gb": round(sum(g.memory_free_mb for g in gpus) / 1024, 2),
        "mean_utilization": round(sum(utilizations) / len(utilizations), 1) if utilizations else None,
        "driver_version": snapshot.driver_version,
        "error": error,
    }
