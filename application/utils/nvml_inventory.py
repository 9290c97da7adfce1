"""The NVML backend of the GPU inventory: live readings, per-field failures tolerated."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psutil
import pynvml
from loguru import logger

from application.services import clock
from application.utils.gpu_types import MIB, GpuInfo, GpuProcess, GpuSnapshot, unreadable_gpu

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
# Codes meaning "this variant of the call does not exist here", so an older variant may still work.
_MISSING_VARIANT_CODES = frozenset(
    {
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
        pynvml.NVML_ERROR_NOT_SUPPORTED,
    }
)

T = TypeVar("T")
CLOSE_WAIT_SECONDS = 2.0


class NvmlUnavailableError(RuntimeError):
    """NVML could not be started; the message is NVML's own reason."""


def nvml_message(exc: BaseException) -> str:
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
    LINK_RETRY_SECONDS = 60.0

    def __init__(self, nvml: Any = pynvml, visible: tuple[str, ...] | None = None) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._closed = False
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError, or OSError from a half-installed driver
            raise NvmlUnavailableError(nvml_message(exc)) from exc
        try:
            self._count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self._shutdown()
            raise NvmlUnavailableError(f"NVML started but could not count GPUs: {nvml_message(exc)}") from exc
        self._driver_version: str | None = self._optional(nvml.nvmlSystemGetDriverVersion)
        self._handles: dict[int, Any] = {}
        self._identity: dict[int, tuple[str, str]] = {}
        # Which variant of a versioned call works, per (call, GPU), so old drivers pay one failure, once.
        self._variant: dict[tuple[str, int], int] = {}
        self._links: dict[tuple[int, int], int | None] = {}
        self._link_retry: dict[tuple[int, int], float] = {}  # a pair NVML could not tell: when to ask again
        self._last_error: str | None = None
        self._last_read: dict[int, GpuInfo] = {}
        self._indices = list(range(self._count)) if visible is None else self._visible(visible)

    @property
    def count(self) -> int:
        return len(self._indices)

    def _visible(self, visible: tuple[str, ...]) -> list[int]:
        """The indices CUDA_VISIBLE_DEVICES leaves (indices kept as NVML's: what /gpus, leases and runs say), read
        as CUDA reads it: up to the first entry that names no GPU, or more than one (review DQ)."""
        kept: set[int] = set()
        uuids: list[str] | None = None  # (read once, and only when an entry names a uuid)
        for entry in visible:
            if entry.isdigit():
                found = [int(entry)] if int(entry) < self._count else []
            else:
                uuids = uuids if uuids is not None else [self._uuid(i) for i in range(self._count)]
                found = [i for i, uuid in enumerate(uuids) if uuid.startswith(entry)]
            if len(found) != 1:
                why = "starts the uuids of several GPUs" if found else "names no GPU NVML lists"
                logger.warning("CUDA_VISIBLE_DEVICES={}: {} {} (NVML lists {}; in a container it numbers the GPUs it "
                               "was given from 0: name them by uuid, or leave CUDA_VISIBLE_DEVICES unset); read as "
                               "CUDA reads it, up to there", ",".join(visible), entry, why, self._count)  # fmt: skip
                break
            kept.update(found)
        logger.info("CUDA_VISIBLE_DEVICES={}: the scheduler uses GPUs {} of the {} NVML lists", ",".join(visible),
                    sorted(kept), self._count)  # fmt: skip
        return sorted(kept)

    def _uuid(self, index: int) -> str:
        try:
            return str(self._nvml.nvmlDeviceGetUUID(self._handle(index)))
        except pynvml.NVMLError as exc:
            logger.warning("GPU {}'s uuid could not be read ({}): CUDA_VISIBLE_DEVICES cannot name it", index,
                           nvml_message(exc))  # fmt: skip
            return ""

    def snapshot(self) -> GpuSnapshot:
        try:
            with self._lock:
                return self._snapshot_locked()
        except Exception as exc:  # a bug here must still not break the caller's poll loop
            logger.exception("GPU snapshot failed")
            return GpuSnapshot(self.backend, (), f"GPU query failed unexpectedly: {exc!r}", None, clock.now())

    def link_score(self, a: int, b: int) -> int | None:
        """From what the snapshots read (never NVML itself: the scheduler asks while it plans, on its event loop,
        where one slow topology call stalled everything, its lead lost: hunt DO)."""
        return self._links.get((min(a, b), max(a, b)))

    def close(self) -> None:
        # A snapshot hung in NVML holds the lock for good: shutting down must not wait for it (the scheduler was
        # left running with no parent: hunt DO).
        if not self._lock.acquire(timeout=CLOSE_WAIT_SECONDS):
            logger.warning("NVML is still busy with a GPU reading: not shut down")
            return
        try:
            if not self._closed:
                self._closed = True
                self._shutdown()
        finally:
            self._lock.release()

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            logger.debug("nvmlShutdown failed: {}", nvml_message(exc))

    def _snapshot_locked(self) -> GpuSnapshot:
        if self._closed:
            return GpuSnapshot(self.backend, (), "GPU inventory is closed", self._driver_version, clock.now())
        gpus: list[GpuInfo] = []
        problems: list[str] = []
        for index in self._indices:
            try:
                gpu = self._read_gpu(index)
            except Exception as exc:  # NVMLError mostly; anything else from one GPU must not blank the others
                # A reset or re-attached GPU comes back with a new handle.
                self._handles.pop(index, None)
                self._identity.pop(index, None)
                problem = f"GPU {index}: {nvml_message(exc)}"
                problems.append(problem)
                # Busy rather than gone: left out, it read as a GPU that does not exist (creates naming it
                # refused, a pinned job's reservation dropped for a pass); nor free on a stale reading.
                gpus.append(unreadable_gpu(index, self._last_read.get(index), f"NVML could not read it: {problem}"))
                continue
            self._last_read[index] = gpu
            gpus.append(gpu)
        self._read_links([g.index for g in gpus if g.error is None])
        error: str | None = None
        if problems:
            error = "NVML could not read " + "; ".join(problems) + " (counted as busy until it reads again)"
        elif self._count == 0:
            error = "NVML is loaded but reports no GPUs"
        elif not self._indices:
            error = f"CUDA_VISIBLE_DEVICES leaves none of the {self._count} GPUs NVML lists"
        if error != self._last_error and error is not None:
            logger.warning("GPU inventory: {}", error)
        self._last_error = error
        return GpuSnapshot(self.backend, tuple(gpus), error, self._driver_version, clock.now())

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

    def _read_links(self, readable: list[int]) -> None:
        """Each pair of readable GPUs' link, once (a transient failure: again after LINK_RETRY_SECONDS)."""
        now = time.monotonic()
        for key in itertools.combinations(readable, 2):
            if key in self._links or self._link_retry.get(key, 0.0) > now:
                continue
            try:
                known, score = self._read_link(*key)
            except Exception:
                logger.exception("GPU topology query failed")
                known, score = False, None
            if known:
                self._links[key] = score
                self._link_retry.pop(key, None)
            else:
                self._link_retry[key] = now + self.LINK_RETRY_SECONDS

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
