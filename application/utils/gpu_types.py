"""GPU readings as every inventory backend reports them (MiB in `_mb` fields, like nvidia-smi)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

MIB = 1024 * 1024
SIMULATE_HINT = "set GPU_BACKEND=simulated with SIMULATED_GPUS=4 to simulate GPUs"
# How readings begin whose GPUs are unknown, not absent: none of them is judged impossible meanwhile.
NVML_NOT_STARTED = "NVML could not start"
READING_HUNG = "the GPU reading has not come back"


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_mb: float | None
    name: str | None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total_mb: float
    memory_used_mb: float
    memory_free_mb: float
    utilization: float | None
    memory_utilization: float | None
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None
    processes: tuple[GpuProcess, ...]
    # Why this is not a live reading (the GPU could not be read): it then counts as busy, never as gone or free.
    error: str | None = None

    @property
    def memory_usable_mb(self) -> float:
        """What a job can have of it with nothing else running: the driver's reservation never comes free. NVML's
        v2 figures leave that reservation out of `used` (free + used is total less it); v1's count it as used."""
        return self.memory_free_mb + self.memory_used_mb

    @property
    def size_unknown(self) -> bool:
        """Never read (failing since start-up): no request is judged impossible on it."""
        return self.error is not None and not self.memory_total_mb

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unreadable_gpu(index: int, last: GpuInfo | None, error: str) -> GpuInfo:
    """A GPU whose reading failed: still there (a job pinned to it, or a count of GPUs, is not refused as
    impossible, and a reservation on it holds), but nothing of it is free. Its size is the last one read."""
    return GpuInfo(index=index, uuid=last.uuid if last else f"GPU-{index}", name=last.name if last else "unknown",
                   memory_total_mb=last.memory_total_mb if last else 0.0,
                   memory_used_mb=last.memory_usable_mb if last else 0.0, memory_free_mb=0.0, utilization=None,
                   memory_utilization=None, temperature_c=None, power_w=None, power_limit_w=None, processes=(),
                   error=error)  # fmt: skip


@dataclass(frozen=True)
class GpuSnapshot:
    backend: str
    gpus: tuple[GpuInfo, ...]
    error: str | None
    driver_version: str | None
    taken_at: float

    @property
    def gpus_unknown(self) -> bool:
        """NVML could not start, or its first reading hung: how many GPUs there are is unknown, not none."""
        return not self.gpus and (self.error or "").startswith((NVML_NOT_STARTED, READING_HUNG))

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "error": self.error,
            "driver_version": self.driver_version,
            "taken_at": self.taken_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuSnapshot:
        """The inverse of to_dict (the scheduler publishes its readings in Redis for the API workers)."""
        gpus = tuple(
            GpuInfo(**{**g, "processes": tuple(GpuProcess(**p) for p in g.get("processes", ()))})
            for g in data.get("gpus", ())
        )
        return cls(data.get("backend", "none"), gpus, data.get("error"), data.get("driver_version"),
                   float(data.get("taken_at", 0.0)))  # fmt: skip


class GpuInventory(Protocol):
    backend: str

    def snapshot(self) -> GpuSnapshot: ...

    def link_score(self, a: int, b: int) -> int | None: ...

    def close(self) -> None: ...


NO_READING = GpuSnapshot("none", (), "no GPU reading yet: is a scheduler running? (python start.py)", None, 0.0)


def snapshot_of(data: dict[str, Any] | None) -> GpuSnapshot:
    """The reading a scheduler published (`GpuSnapshot.to_dict`), or NO_READING before any."""
    return GpuSnapshot.from_dict(data) if data is not None else NO_READING
