"""GPU readings as every inventory backend reports them (MiB in `_mb` fields, like nvidia-smi)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

MIB = 1024 * 1024
SIMULATE_HINT = "set GPU_BACKEND=simulated with SIMULATED_GPUS=4 to simulate GPUs"


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

    @property
    def memory_usable_mb(self) -> float:
        """What a job can have of it with nothing else running: the driver's reservation never comes free. NVML's
        v2 figures leave that reservation out of `used` (free + used is total less it); v1's count it as used."""
        return self.memory_free_mb + self.memory_used_mb

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuSnapshot:
    backend: str
    gpus: tuple[GpuInfo, ...]
    error: str | None
    driver_version: str | None
    taken_at: float

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
