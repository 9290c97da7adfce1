"""The simulated GPU backend: GPUs on machines without any, whose usage tests can change."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from application.services import clock
from application.utils.gpu_types import SIMULATE_HINT, GpuInfo, GpuProcess, GpuSnapshot, unreadable_gpu

SIMULATED_LINK_SCORE = 1


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


def _parse_usage(data: Any, sizes: Sequence[float]) -> dict[int, _Usage]:
    """Validate the whole file strictly, so a typo is reported instead of silently meaning "free"."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError('top level must be an object such as {"0": {"memory_used_gb": 70}}')
    usage: dict[int, _Usage] = {}
    count = len(sizes)
    for key, entry in data.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < count):
            known = f"0-{count - 1}" if count else "there are none"
            raise ValueError(f"key {key!r} is not a simulated GPU index ({known})")
        where, memory_gb = f"GPU {key}", sizes[int(key)]
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

    def __init__(self, count: int, memory_gb: float | Sequence[float], usage_file: Path | None = None) -> None:
        """`count` GPUs of `memory_gb` GiB each, or of the GiB each has in index order (SIMULATED_GPUS=2x80,2x24)."""
        if count < 0:
            raise ValueError("count must be >= 0")
        sizes = tuple(float(m) for m in memory_gb) if isinstance(memory_gb, Sequence) else (float(memory_gb),) * count
        if len(sizes) != count:
            raise ValueError(f"{len(sizes)} memory sizes for {count} GPUs")
        if not all(m > 0 for m in sizes):
            raise ValueError("memory_gb must be positive")
        self.count = count
        self.sizes = sizes
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
        used = _number(memory_used_gb, "memory_used_gb", 0, self.sizes[index])
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
                file_usage, file_error = self._read_usage_file()
                usage = {**file_usage, **self._overrides}
            error = file_error
            if self.count == 0 and error is None:
                error = f"no simulated GPUs (SIMULATED_GPUS=0); {SIMULATE_HINT}"
            if file_error is not None:
                # Usage that cannot be read is not "nothing busy": every GPU counts as busy until the file is fixed.
                gpus = tuple(unreadable_gpu(i, self._gpu(i, None), file_error) for i in range(self.count))
            else:
                gpus = tuple(self._gpu(i, usage.get(i)) for i in range(self.count))
            return GpuSnapshot(self.backend, gpus, error, None, clock.now())
        except Exception as exc:  # the contract is never to raise
            logger.exception("simulated GPU snapshot failed")
            return GpuSnapshot(self.backend, (), f"GPU query failed unexpectedly: {exc!r}", None, clock.now())

    def link_score(self, a: int, b: int) -> int | None:
        if a == b or not (0 <= a < self.count and 0 <= b < self.count):
            return None
        # Every pair alike, so a caller ranking by link quality falls back to index order.
        return SIMULATED_LINK_SCORE

    def close(self) -> None:
        pass

    def _gpu(self, index: int, usage: _Usage | None) -> GpuInfo:
        total = self.sizes[index] * 1024
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
                self._file_usage = _parse_usage(json.loads(path.read_text(encoding="utf-8")), self.sizes)
                self._file_error = None
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                self._file_usage = {}
                self._file_error = f"simulated GPU usage file {path} is malformed ({exc}): every GPU counts as busy"
                logger.warning("{}", self._file_error)
        return self._file_usage, self._file_error
