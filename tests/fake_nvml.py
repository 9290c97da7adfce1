"""A stand-in for the pynvml module, the only thing faked in the GPU inventory's tests: calls, failures by
call or by GPU, topology and NVLink as a test sets them."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pynvml

from application.utils.gpu_utils import MIB

GIB = 1024 * MIB
# Above Linux's pid_max ceiling (2**22), so no process can have it.
NO_SUCH_PID = 2**22 + 17


class FakeNvml:
    """Stands in for the pynvml module. `fail` maps a call name, or "name@gpu", to an NVML error code."""

    def __init__(self, gpus: int = 2, nvlink: frozenset[tuple[int, int]] = frozenset()) -> None:
        self.gpus = gpus
        self.nvlink = nvlink
        self.fail: dict[str, int] = {}
        self.crash: dict[str, Exception] = {}
        self.calls: list[str] = []
        self.hang: dict[str, threading.Event] = {}  # a call that blocks until its event is set (a hung driver)
        self.used_bytes = 10 * GIB
        self.reserved_bytes = 512 * MIB
        self.topology = {
            (0, 1): pynvml.NVML_TOPOLOGY_SINGLE,
            (0, 2): pynvml.NVML_TOPOLOGY_SYSTEM,
            (1, 2): pynvml.NVML_TOPOLOGY_NODE,
        }
        self.processes: list[SimpleNamespace] = [
            SimpleNamespace(pid=os.getpid(), usedGpuMemory=2 * GIB),
            SimpleNamespace(pid=NO_SUCH_PID, usedGpuMemory=None),
        ]

    def _check(self, name: str, gpu: int | None = None) -> None:
        self.calls.append(name)
        if (gate := self.hang.get(name)) is not None:
            gate.wait()
        if name in self.crash:
            raise self.crash[name]
        code = self.fail.get(f"{name}@{gpu}", self.fail.get(name))
        if code is not None:
            raise pynvml.NVMLError(code)

    def nvmlInit(self) -> None:
        self._check("nvmlInit")

    def nvmlShutdown(self) -> None:
        self._check("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return self.gpus

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check("nvmlSystemGetDriverVersion")
        return "550.54.15"

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimpleNamespace:
        self._check("nvmlDeviceGetHandleByIndex", index)
        return SimpleNamespace(index=index)

    def nvmlDeviceGetUUID(self, h: SimpleNamespace) -> str:
        self._check("nvmlDeviceGetUUID", h.index)
        return f"GPU-fake-{h.index}"

    def nvmlDeviceGetName(self, h: SimpleNamespace) -> str:
        self._check("nvmlDeviceGetName", h.index)
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h: SimpleNamespace, version: int | None = None) -> SimpleNamespace:
        total = 80 * GIB
        if version is None:
            self._check("nvmlDeviceGetMemoryInfo", h.index)
            # v1 counts the driver's reservation as used.
            used = self.used_bytes + self.reserved_bytes
            return SimpleNamespace(total=total, used=used, free=total - used)
        assert version == pynvml.nvmlMemory_v2
        self._check("nvmlDeviceGetMemoryInfo_v2", h.index)
        free = total - self.used_bytes - self.reserved_bytes
        return SimpleNamespace(total=total, reserved=self.reserved_bytes, used=self.used_bytes, free=free)

    def nvmlDeviceGetUtilizationRates(self, h: SimpleNamespace) -> SimpleNamespace:
        self._check("nvmlDeviceGetUtilizationRates", h.index)
        return SimpleNamespace(gpu=37, memory=12)

    # No nvmlDeviceGetTemperatureV: like an older binding, so the fallback is what runs.
    def nvmlDeviceGetTemperature(self, h: SimpleNamespace, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        self._check("nvmlDeviceGetTemperature", h.index)
        return 41

    def nvmlDeviceGetPowerUsage(self, h: SimpleNamespace) -> int:
        self._check("nvmlDeviceGetPowerUsage", h.index)
        return 123_456

    def nvmlDeviceGetEnforcedPowerLimit(self, h: SimpleNamespace) -> int:
        self._check("nvmlDeviceGetEnforcedPowerLimit", h.index)
        return 700_000

    def nvmlDeviceGetPowerManagementLimit(self, h: SimpleNamespace) -> int:
        self._check("nvmlDeviceGetPowerManagementLimit", h.index)
        return 650_000

    def nvmlDeviceGetComputeRunningProcesses_v3(self, h: SimpleNamespace) -> list[SimpleNamespace]:
        self._check("nvmlDeviceGetComputeRunningProcesses_v3", h.index)
        return self.processes if h.index == 0 else []

    def nvmlDeviceGetComputeRunningProcesses_v2(self, h: SimpleNamespace) -> list[SimpleNamespace]:
        self._check("nvmlDeviceGetComputeRunningProcesses_v2", h.index)
        return self.processes if h.index == 0 else []

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, h: SimpleNamespace) -> list[SimpleNamespace]:
        self._check("nvmlDeviceGetGraphicsRunningProcesses_v3", h.index)
        # The same process in both lists must be counted once.
        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=1 * GIB)] if h.index == 0 else []

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, h: SimpleNamespace) -> list[SimpleNamespace]:
        self._check("nvmlDeviceGetGraphicsRunningProcesses_v2", h.index)
        return []

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        self._check("nvmlSystemGetProcessName")
        return "/opt/bin/host-trainer"

    def nvmlDeviceGetTopologyCommonAncestor(self, a: SimpleNamespace, b: SimpleNamespace) -> int:
        self._check("nvmlDeviceGetTopologyCommonAncestor")
        return self.topology[(a.index, b.index)]

    def nvmlDeviceGetP2PStatus(self, a: SimpleNamespace, b: SimpleNamespace, index: int) -> int:
        assert index == pynvml.NVML_P2P_CAPS_INDEX_NVLINK
        self._check("nvmlDeviceGetP2PStatus")
        # 4 is NVML_P2P_STATUS_NOT_SUPPORTED: NVML answers, and the answer is "no NVLink".
        return pynvml.NVML_P2P_STATUS_OK if (a.index, b.index) in self.nvlink else 4
