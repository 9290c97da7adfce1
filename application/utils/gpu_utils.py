"""What the GPUs on this host hold right now, from NVML or from a simulation.

Every backend answers `snapshot()` without raising: the scheduler polls it through
`asyncio.to_thread`, and a driver hiccup must become a readable `error`, never a dead poll loop.

Memory figures are MiB (1024**2 bytes) although the fields say `_mb`, because that is the unit
nvidia-smi prints and operators compare against; the `_gb` figures in `gpu_summary` are GiB.

NVML indices are physical (PCI bus order) and ignore CUDA_VISIBLE_DEVICES, as nvidia-smi's do.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil
import pynvml
from loguru import logger

from application.config import parse_simulated_gpus

MIB = 1024 * 1024
SIMULATE_HINT = "set GPU_BACKEND=simulated with SIMULATED_GPUS=4 to simulate GPUs"

# Higher is a better path between two GPUs. NVLink and a shared board both avoid PCIe entirely;
# after that each NVML topology level adds a hop, ending with the inter-socket link.
LINK_SCORE_NVLINK = 6
LINK_SCORE_BY_TOPOLOGY: dict[int, int] = {
    pynvml.NVML_TOPOLOGY_INTERNAL: 5,
    pynvml.NVML_TOPOLOGY_SINGLE: 4,
    pynvml.NVML_TOPOLOGY_MULTIPLE: 3,
    pynvml.NVML_TOPOLOGY_HOSTBRIDGE: 2,
    pynvml.NVML_TOPOLOGY_NODE: 1,
    pynvml.NVML_TOPOLOGY_SYSTEM: 0,
}
SIMULATED_LINK_SCORE = 1

# Codes meaning "this variant of the call does not exist here", so an older variant may still work.
_MISSING_VARIANT_CODES = frozenset(
    {
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
        pynvml.NVML_ERROR_NOT_SUPPORTED,
    }
)

T = TypeVar("T")


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


class GpuInventory(Protocol):
    backend: str

    def snapshot(self) -> GpuSnapshot: ...

    def link_score(self, a: int, b: int) -> int | None: ...

    def close(self) -> None: ...


class NvmlUnavailableError(RuntimeError):
    """NVML could not be started; the message is NVML's own reason."""


def _nvml_message(exc: BaseException) -> str:
    # NVMLError.__str__ calls back into the library for unknown codes, which can fail in turn.
    try:
        text = str(exc)
    except Exception:
        text = ""
    return text or type(exc).__name__


def _is_missing_variant(exc: Exception) -> bool:
    if isinstance(exc, AttributeError):
        return True  # an older nvidia-ml-py without this binding
    return getattr(exc, "value", None) in _MISSING_VARIANT_CODES


class NvmlInventory:
    """Live readings through NVML.

    `nvml` is the pynvml module; tests hand in a stand-in for the library boundary.
    Raises NvmlUnavailableError from the constructor only; after that nothing raises.
    """

    backend: str = "nvml"

    def __init__(self, nvml: Any = pynvml) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._closed = False
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError, or OSError from a half-installed driver
            raise NvmlUnavailableError(_nvml_message(exc)) from exc
        try:
            self._count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self._shutdown()
            raise NvmlUnavailableError(f"NVML started but could not count GPUs: {_nvml_message(exc)}") from exc
        self._driver_version: str | None = self._optional(nvml.nvmlSystemGetDriverVersion)
        self._handles: dict[int, Any] = {}
        self._identity: dict[int, tuple[str, str]] = {}
        # Which variant of a versioned call works, per (call, GPU), so old drivers pay one failure, once.
        self._variant: dict[tuple[str, int], int] = {}
        self._links: dict[tuple[int, int], int | None] = {}
        self._last_error: str | None = None

    @property
    def count(self) -> int:
        return self._count

    def snapshot(self) -> GpuSnapshot:
        try:
            with self._lock:
                return self._snapshot_locked()
        except Exception as exc:  # a bug here must still not break the caller's poll loop
            logger.exception("GPU snapshot failed")
            return GpuSnapshot(self.backend, (), f"GPU query failed unexpectedly: {exc!r}", None, time.time())

    def link_score(self, a: int, b: int) -> int | None:
        if a == b or not (0 <= a < self._count and 0 <= b < self._count):
            return None
        key = (min(a, b), max(a, b))
        try:
            with self._lock:
                if self._closed:
                    return None
                if key not in self._links:
                    known, score = self._read_link(*key)
                    if not known:
                        return score
                    self._links[key] = score
                return self._links[key]
        except Exception:
            logger.exception("GPU topology query failed")
            return None

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            logger.debug("nvmlShutdown failed: {}", _nvml_message(exc))

    def _snapshot_locked(self) -> GpuSnapshot:
        if self._closed:
            return GpuSnapshot(self.backend, (), "GPU inventory is closed", self._driver_version, time.time())
        gpus: list[GpuInfo] = []
        problems: list[str] = []
        for index in range(self._count):
            try:
                gpus.append(self._read_gpu(index))
            except pynvml.NVMLError as exc:
                # A reset or re-attached GPU comes back with a new handle.
                self._handles.pop(index, None)
                self._identity.pop(index, None)
                problems.append(f"GPU {index}: {_nvml_message(exc)}")
        error: str | None = None
        if problems:
            # Leaving a failing GPU out beats a stale "free" reading the scheduler would trust.
            error = "NVML could not read " + "; ".join(problems) + " (left out of this snapshot)"
        elif self._count == 0:
            error = "NVML is loaded but reports no GPUs"
        if error != self._last_error and error is not None:
            logger.warning("GPU inventory: {}", error)
        self._last_error = error
        return GpuSnapshot(self.backend, tuple(gpus), error, self._driver_version, time.time())

    def _handle(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            self._handles[index] = handle
        return handle

    def _read_gpu(self, index: int) -> GpuInfo:
        nvml = self._nvml
        handle = self._handle(index)
        identity = self._identity.get(index)
        if identity is None:
            identity = (str(nvml.nvmlDeviceGetUUID(handle)), str(nvml.nvmlDeviceGetName(handle)))
            self._identity[index] = identity
        # v2 leaves driver-reserved memory out of `used`, matching nvidia-smi; `free` is the same either way.
        memory = self._first_available(
            "memory",
            index,
            (
                lambda: nvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2),
                lambda: nvml.nvmlDeviceGetMemoryInfo(handle),
            ),
        )
        rates = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        temperature = self._optional(
            self._first_available,
            "temperature",
            index,
            (
                lambda: nvml.nvmlDeviceGetTemperatureV(handle, pynvml.NVML_TEMPERATURE_GPU),
                lambda: nvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            ),
        )
        power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = self._optional(
            self._first_available,
            "power_limit",
            index,
            (
                lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle),
                lambda: nvml.nvmlDeviceGetPowerManagementLimit(handle),
            ),
        )
        return GpuInfo(
            index=index,
            uuid=identity[0],
            name=identity[1],
            memory_total_mb=memory.total / MIB,
            memory_used_mb=memory.used / MIB,
            memory_free_mb=memory.free / MIB,
            utilization=None if rates is None else float(rates.gpu),
            memory_utilization=None if rates is None else float(rates.memory),
            temperature_c=None if temperature is None else float(temperature),
            power_w=None if power_mw is None else power_mw / 1000.0,
            power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
            processes=self._processes(index, handle),
        )

    def _processes(self, index: int, handle: Any) -> tuple[GpuProcess, ...]:
        nvml = self._nvml
        used: dict[int, float | None] = {}
        for kind in ("Compute", "Graphics"):
            procs = self._optional(
                self._first_available,
                kind,
                index,
                (
                    lambda kind=kind: getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses_v3")(handle),
                    lambda kind=kind: getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses_v2")(handle),
                ),
            )
            for proc in procs or ():
                pid = int(proc.pid)
                # None means NVML cannot attribute memory (WDDM, some MIG setups), not zero.
                mb = None if proc.usedGpuMemory is None else proc.usedGpuMemory / MIB
                previous = used.get(pid)
                # A process in both lists is one process; keep the larger figure rather than double-count.
                used[pid] = mb if previous is None else max(previous, mb or 0.0)
        return tuple(GpuProcess(pid, mb, self._process_name(pid)) for pid, mb in sorted(used.items()))

    def _process_name(self, pid: int) -> str | None:
        try:
            return str(psutil.Process(pid).name())
        except psutil.Error:
            pass
        # Inside a container NVML reports host PIDs that psutil cannot see; NVML can still name them.
        name = self._optional(self._nvml.nvmlSystemGetProcessName, pid)
        return os.path.basename(str(name)) if name else None

    def _read_link(self, a: int, b: int) -> tuple[bool, int | None]:
        """(whether the answer may be cached, score)."""
        nvml = self._nvml
        try:
            ha, hb = self._handle(a), self._handle(b)
        except pynvml.NVMLError:
            return False, None
        try:
            if nvml.nvmlDeviceGetP2PStatus(ha, hb, pynvml.NVML_P2P_CAPS_INDEX_NVLINK) == pynvml.NVML_P2P_STATUS_OK:
                return True, LINK_SCORE_NVLINK
        except pynvml.NVMLError:
            pass  # no NVLink query on this driver; the PCIe topology below still ranks the pair
        try:
            level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(ha, hb))
        except pynvml.NVMLError as exc:
            # Only a permanent "not supported" is worth remembering; anything else may clear up.
            return getattr(exc, "value", None) == pynvml.NVML_ERROR_NOT_SUPPORTED, None
        return True, LINK_SCORE_BY_TOPOLOGY.get(level)

    def _first_available(self, call: str, index: int, variants: Sequence[Callable[[], T]]) -> T:
        key = (call, index)
        start = self._variant.get(key, 0)
        for position in range(start, len(variants)):
            try:
                value = variants[position]()
            except (pynvml.NVMLError, AttributeError) as exc:
                if position + 1 < len(variants) and _is_missing_variant(exc):
                    continue
                raise
            self._variant[key] = position
            return value
        raise AssertionError("unreachable: the last variant either returns or raises")

    @staticmethod
    def _optional(fn: Callable[..., T], *args: Any) -> T | None:
        # A field the GPU cannot report (power on some boards, utilization under MIG) is unknown, not fatal.
        try:
            return fn(*args)
        except (pynvml.NVMLError, AttributeError):
            return None


@dataclass(frozen=True)
class _Usage:
    memory_used_mb: float
    utilization: float
    processes: tuple[GpuProcess, ...]


def _number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _parse_process(raw: Any, where: str) -> GpuProcess:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object with pid and used_memory_mb")
    unknown = set(raw) - {"pid", "used_memory_mb", "name"}
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
    pid = raw.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"{where}.pid must be a positive integer, got {pid!r}")
    mb = raw.get("used_memory_mb")
    used = None if mb is None else _number(mb, f"{where}.used_memory_mb", 0, math.inf)
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{where}.name must be a string")
    return GpuProcess(pid, used, name)


def _parse_usage(data: Any, count: int, memory_gb: float) -> dict[int, _Usage]:
    """Validate the whole file strictly, so a typo is reported instead of silently meaning "free"."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError('top level must be an object such as {"0": {"memory_used_gb": 70}}')
    usage: dict[int, _Usage] = {}
    for key, entry in data.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < count):
            known = f"0-{count - 1}" if count else "there are none"
            raise ValueError(f"key {key!r} is not a simulated GPU index ({known})")
        where = f"GPU {key}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object")
        unknown = set(entry) - {"memory_used_gb", "utilization", "processes"}
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
        raw_procs = entry.get("processes", [])
        if not isinstance(raw_procs, list):
            raise ValueError(f"{where}.processes must be a list")
        procs = tuple(_parse_process(p, f"{where}.processes[{i}]") for i, p in enumerate(raw_procs))
        if "memory_used_gb" in entry:
            used_mb = _number(entry["memory_used_gb"], f"{where}.memory_used_gb", 0, memory_gb) * 1024
        else:
            # Without an explicit figure the GPU holds what its processes hold.
            used_mb = sum(p.used_memory_mb or 0.0 for p in procs)
            if used_mb > memory_gb * 1024:
                raise ValueError(f"{where}: processes use {used_mb:g} MiB, more than the GPU's {memory_gb:g} GiB")
        utilization = _number(entry.get("utilization", 0), f"{where}.utilization", 0, 100)
        usage[int(key)] = _Usage(used_mb, utilization, procs)
    return usage


class SimulatedInventory:
    """Pretend GPUs whose usage tests can change, in-process (`set_usage`) or through `usage_file`.

    `usage_file` (JSON, keys are GPU indices as strings) is re-read whenever its mtime, size or inode
    changes; write it with a temporary file and os.replace so a reader never sees half of it.
    In-process `set_usage` wins over the file for the GPUs it names.
    """

    backend: str = "simulated"

    def __init__(self, count: int, memory_gb: float, usage_file: Path | None = None) -> None:
        if count < 0:
            raise ValueError("count must be >= 0")
        if not memory_gb > 0:
            raise ValueError("memory_gb must be positive")
        self.count = count
        self.memory_gb = float(memory_gb)
        self.usage_file = usage_file
        self._lock = threading.Lock()
        self._overrides: dict[int, _Usage] = {}
        self._file_key: tuple[int, int, int] | None = None
        self._file_usage: dict[int, _Usage] = {}
        self._file_error: str | None = None

    def set_usage(
        self,
        index: int,
        *,
        memory_used_gb: float = 0.0,
        utilization: float = 0.0,
        processes: Sequence[GpuProcess] = (),
    ) -> None:
        """Replace GPU `index`'s in-process usage; raises ValueError on values no GPU could have."""
        if not 0 <= index < self.count:
            raise ValueError(f"GPU index {index} is not one of 0-{self.count - 1}")
        used = _number(memory_used_gb, "memory_used_gb", 0, self.memory_gb)
        util = _number(utilization, "utilization", 0, 100)
        with self._lock:
            self._overrides[index] = _Usage(used * 1024, util, tuple(processes))

    def clear_usage(self, index: int | None = None) -> None:
        with self._lock:
            if index is None:
                self._overrides.clear()
            else:
                self._overrides.pop(index, None)

    def snapshot(self) -> GpuSnapshot:
        try:
            with self._lock:
                file_usage, error = self._read_usage_file()
                usage = {**file_usage, **self._overrides}
            if self.count == 0 and error is None:
                error = f"no simulated GPUs (SIMULATED_GPUS=0); {SIMULATE_HINT}"
            gpus = tuple(self._gpu(i, usage.get(i)) for i in range(self.count))
            return GpuSnapshot(self.backend, gpus, error, None, time.time())
        except Exception as exc:  # the contract is never to raise
            logger.exception("simulated GPU snapshot failed")
            return GpuSnapshot(self.backend, (), f"GPU query failed unexpectedly: {exc!r}", None, time.time())

    def link_score(self, a: int, b: int) -> int | None:
        if a == b or not (0 <= a < self.count and 0 <= b < self.count):
            return None
        # Every pair alike, so a caller ranking by link quality falls back to index order.
        return SIMULATED_LINK_SCORE

    def close(self) -> None:
        pass

    def _gpu(self, index: int, usage: _Usage | None) -> GpuInfo:
        total = self.memory_gb * 1024
        used = usage.memory_used_mb if usage else 0.0
        return GpuInfo(
            index=index,
            uuid=f"GPU-sim-{index}",
            name="Simulated GPU",
            memory_total_mb=total,
            memory_used_mb=used,
            memory_free_mb=total - used,
            utilization=usage.utilization if usage else 0.0,
            memory_utilization=None,
            temperature_c=None,
            power_w=None,
            power_limit_w=None,
            processes=usage.processes if usage else (),
        )

    def _read_usage_file(self) -> tuple[dict[int, _Usage], str | None]:
        path = self.usage_file
        if path is None:
            return {}, None
        try:
            st = path.stat()
        except FileNotFoundError:
            # No file means nothing is busy; forget the old contents so a re-created file is read afresh.
            self._file_key, self._file_usage, self._file_error = None, {}, None
            return {}, None
        except OSError as exc:
            return {}, f"cannot read simulated GPU usage file {path}: {exc}"
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key != self._file_key:
            self._file_key = key
            try:
                self._file_usage = _parse_usage(
                    json.loads(path.read_text(encoding="utf-8")), self.count, self.memory_gb
                )
                self._file_error = None
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                self._file_usage = {}
                self._file_error = f"simulated GPU usage file {path} is malformed ({exc}); its usage is ignored"
                logger.warning("{}", self._file_error)
        return self._file_usage, self._file_error


class NoGpuInventory:
    """No GPUs at all, with the reason shown to whoever asks."""

    backend: str = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def snapshot(self) -> GpuSnapshot:
        return GpuSnapshot(self.backend, (), self.reason, None, time.time())

    def link_score(self, a: int, b: int) -> int | None:
        return None

    def close(self) -> None:
        pass


def create_inventory(
    backend: str,
    simulated_gpus: str = "0",
    usage_file: Path | None = None,
    *,
    nvml: Any = pynvml,
) -> GpuInventory:
    """Build the inventory GPU_BACKEND asks for; a missing NVML gives NoGpuInventory, never an exception.

    Raises ValueError only for an unknown backend name or a bad `simulated_gpus`, which Settings
    already rejects at start-up.
    """
    name = (backend.value if isinstance(backend, Enum) else str(backend)).strip().lower()
    if name == "simulated":
        count, memory_gb = parse_simulated_gpus(simulated_gpus)
        return SimulatedInventory(count, memory_gb, usage_file)
    if name not in ("auto", "nvml"):
        raise ValueError(f"unknown GPU backend {backend!r}: expected auto, nvml or simulated")
    try:
        return NvmlInventory(nvml)
    except Exception as exc:
        reason = f"NVML could not be loaded: {_nvml_message(exc)}; {SIMULATE_HINT}"
        logger.warning("GPU_BACKEND={}: {}", name, reason)
        return NoGpuInventory(reason)


def gpu_summary(snapshot: GpuSnapshot) -> dict[str, Any]:
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
        "error": snapshot.error,
    }
