"""GPU inventory: the simulated backend end to end, and NvmlInventory against a stand-in for the NVML
library (the only thing faked here), plus the real "NVML is missing" path on machines without a GPU."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pynvml
import pytest

from application.config import GpuBackend, load_settings
from application.utils.gpu_utils import (
    LINK_SCORE_BY_TOPOLOGY,
    LINK_SCORE_NVLINK,
    GpuInventory,
    GpuProcess,
    NoGpuInventory,
    NvmlInventory,
    NvmlStarting,
    NvmlUnavailableError,
    SimulatedInventory,
    create_inventory,
    gpu_summary,
)
from application.utils.nvml_inventory import CLOSE_WAIT_SECONDS
from tests.conftest import wait_for
from tests.fake_nvml import NO_SUCH_PID, FakeNvml


def _real_nvml_loads() -> bool:
    try:
        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


needs_no_nvml = pytest.mark.skipif(_real_nvml_loads(), reason="NVML loads on this machine")


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml()


@pytest.fixture
def nvml_inventory(fake: FakeNvml) -> Iterator[NvmlInventory]:
    inv = NvmlInventory(fake)
    yield inv
    inv.close()


def write_usage(path: Path, data: Any) -> None:
    # Atomic replace, as the server's tests should do: new inode, so the change is always noticed.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


# --- simulated backend -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "count", "memory_gb"),
    [("4", 4, 80.0), ("2x24", 2, 24.0), (" 3 X 40.5 ", 3, 40.5), ("1x80", 1, 80.0)],
)
def test_simulated_count_and_memory(spec: str, count: int, memory_gb: float) -> None:
    inv = create_inventory("simulated", spec)
    snap = inv.snapshot()
    assert inv.backend == snap.backend == "simulated"
    assert snap.error is None
    assert [g.index for g in snap.gpus] == list(range(count))
    for g in snap.gpus:
        assert g.uuid == f"GPU-sim-{g.index}"
        assert g.name == "Simulated GPU"
        assert g.memory_total_mb == memory_gb * 1024
        assert g.memory_free_mb == memory_gb * 1024
        assert g.memory_used_mb == 0
        assert g.utilization == 0
        assert g.processes == ()


def test_backend_enum_is_accepted() -> None:
    assert create_inventory(GpuBackend.SIMULATED, "2").backend == "simulated"


def test_simulated_zero_gpus_explains_itself() -> None:
    snap = create_inventory("simulated", "0").snapshot()
    assert snap.gpus == ()
    assert snap.error is not None and "SIMULATED_GPUS=4" in snap.error


@pytest.mark.parametrize("spec", ["", "four", "4x0", "65", "4x-1"])
def test_bad_simulated_spec_is_a_config_error(spec: str) -> None:
    with pytest.raises(ValueError):
        create_inventory("simulated", spec)


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown GPU backend"):
        create_inventory("cuda")


def test_usage_file_changes_are_picked_up(tmp_path: Path) -> None:
    usage = tmp_path / "usage.json"
    inv = create_inventory("simulated", "4x80", usage)
    assert all(g.memory_used_mb == 0 for g in inv.snapshot().gpus)

    write_usage(
        usage,
        {
            "0": {
                "memory_used_gb": 70,
                "utilization": 95,
                "processes": [{"pid": 123, "used_memory_mb": 1000}],
            },
            "2": {"processes": [{"pid": 7, "used_memory_mb": 512, "name": "train"}, {"pid": 8}]},
        },
    )
    snap = inv.snapshot()
    assert snap.error is None
    g0, g1, g2, _ = snap.gpus
    assert (g0.memory_used_mb, g0.memory_free_mb, g0.utilization) == (70 * 1024, 10 * 1024, 95)
    assert g0.processes == (GpuProcess(123, 1000.0, None),)
    assert g1.memory_used_mb == 0
    # Without memory_used_gb a GPU holds what its processes hold.
    assert g2.memory_used_mb == 512
    assert g2.processes == (GpuProcess(7, 512.0, "train"), GpuProcess(8, None, None))

    write_usage(usage, {"1": {"memory_used_gb": 5}})
    g0, g1, *_ = inv.snapshot().gpus
    assert (g0.memory_used_mb, g1.memory_used_mb) == (0, 5 * 1024)

    usage.unlink()
    snap = inv.snapshot()
    assert snap.error is None
    assert all(g.memory_used_mb == 0 for g in snap.gpus)


def test_usage_file_is_only_reread_when_it_changes(tmp_path: Path) -> None:
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps({"0": {"memory_used_gb": 10}}), encoding="utf-8")
    inv = SimulatedInventory(1, 80, usage)
    assert inv.snapshot().gpus[0].memory_used_mb == 10 * 1024

    # Same size, same inode, mtime put back: the stat key is unchanged, so the cached reading stands.
    before = usage.stat()
    usage.write_text(json.dumps({"0": {"memory_used_gb": 20}}), encoding="utf-8")
    os.utime(usage, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert inv.snapshot().gpus[0].memory_used_mb == 10 * 1024

    os.utime(usage, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert inv.snapshot().gpus[0].memory_used_mb == 20 * 1024


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "malformed"),
        ("[1, 2]", "top level"),
        ({"9": {"memory_used_gb": 1}}, "'9' is not a simulated GPU index (0-1)"),
        ({"x": {}}, "'x'"),
        ({"0": {"memory_used_gb": 81}}, "between 0 and 80"),
        ({"0": {"memory_used_gb": "70"}}, "must be a number"),
        ({"0": {"utilization": 101}}, "utilization"),
        ({"0": {"memory_used": 70}}, "unknown keys ['memory_used']"),
        ({"0": {"processes": [{"pid": 0}]}}, "pid must be a positive integer"),
        ({"0": {"processes": [{"pid": 1, "used_memory_mb": 90000}]}}, "more than the GPU's"),
        ({"0": []}, "must be an object"),
    ],
)
def test_malformed_usage_file_is_an_error_not_a_crash(tmp_path: Path, content: Any, fragment: str) -> None:
    usage = tmp_path / "usage.json"
    inv = SimulatedInventory(2, 80, usage)
    write_usage(usage, {"0": {"memory_used_gb": 30}})
    assert inv.snapshot().gpus[0].memory_used_mb == 30 * 1024

    write_usage(usage, content)
    snap = inv.snapshot()
    assert snap.error is not None
    assert str(usage) in snap.error and "malformed" in snap.error
    assert fragment in snap.error
    # Still listed, but busy: usage that cannot be read is not "nothing in use" (a job would start on GPU 0).
    assert [(g.memory_free_mb, g.error == snap.error) for g in snap.gpus] == [(0, True)] * 2

    write_usage(usage, {"1": {"utilization": 50}})
    snap = inv.snapshot()
    assert snap.error is None
    assert snap.gpus[1].utilization == 50


def test_usage_path_that_is_a_directory_is_reported(tmp_path: Path) -> None:
    snap = SimulatedInventory(1, 80, tmp_path).snapshot()
    assert snap.error is not None and "malformed" in snap.error
    assert len(snap.gpus) == 1


def test_set_usage_in_process(tmp_path: Path) -> None:
    usage = tmp_path / "usage.json"
    write_usage(usage, {"0": {"memory_used_gb": 1}, "1": {"memory_used_gb": 2}})
    inv = SimulatedInventory(3, 24, usage)
    inv.set_usage(1, memory_used_gb=20, utilization=99, processes=[GpuProcess(42, 20480.0, "python")])
    inv.set_usage(2, utilization=10)
    g0, g1, g2 = inv.snapshot().gpus
    assert g0.memory_used_mb == 1024  # from the file
    assert (g1.memory_used_mb, g1.memory_free_mb, g1.utilization) == (20 * 1024, 4 * 1024, 99)
    assert g1.processes == (GpuProcess(42, 20480.0, "python"),)
    assert (g2.memory_used_mb, g2.utilization) == (0, 10)

    inv.clear_usage(1)
    assert inv.snapshot().gpus[1].memory_used_mb == 2 * 1024
    inv.clear_usage()
    assert inv.snapshot().gpus[2].utilization == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"index": 3}, {"index": -1}, {"index": 0, "memory_used_gb": 25}, {"index": 0, "utilization": -1}],
)
def test_set_usage_rejects_impossible_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulatedInventory(3, 24).set_usage(**kwargs)


def test_simulated_link_scores_are_all_equal() -> None:
    inv = SimulatedInventory(4, 80)
    scores = {inv.link_score(a, b) for a in range(4) for b in range(4) if a != b}
    assert scores == {1}
    assert inv.link_score(0, 0) is None
    assert inv.link_score(0, 4) is None


def test_concurrent_snapshots_and_writes(tmp_path: Path) -> None:
    usage = tmp_path / "usage.json"
    inv = SimulatedInventory(2, 80, usage)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(200):
                snap = inv.snapshot()
                assert len(snap.gpus) == 2 and snap.error is None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(100):
        write_usage(usage, {"0": {"memory_used_gb": i % 80}})
        inv.set_usage(1, utilization=i % 100)
    for t in threads:
        t.join()
    assert errors == []


# --- no NVML on this machine -------------------------------------------------------------------


@needs_no_nvml
@pytest.mark.parametrize("backend", ["auto", "nvml", GpuBackend.AUTO, GpuBackend.NVML])
def test_missing_nvml_gives_no_gpu_inventory(backend: str) -> None:
    inv = create_inventory(backend, "4")
    assert isinstance(inv, NoGpuInventory)
    snap = inv.snapshot()
    # (a GPU host only when asked for NVML: /health says degraded then)
    assert (snap.backend, snap.gpus, snap.driver_version) == ("none" if "auto" in backend else "nvml", (), None)
    assert snap.error is not None
    assert snap.error.startswith("NVML could not be loaded: ")
    assert "GPU_BACKEND=simulated" in snap.error and "SIMULATED_GPUS=4" in snap.error
    assert inv.link_score(0, 1) is None
    inv.close()


@needs_no_nvml
def test_nvml_inventory_constructor_raises_a_clear_error() -> None:
    with pytest.raises(NvmlUnavailableError) as info:
        NvmlInventory()
    assert str(info.value)


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "Driver Not Loaded"),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "Library"),
    ],
)
def test_nvml_init_failure_falls_back(fake: FakeNvml, code: int, text: str) -> None:
    fake.fail["nvmlInit"] = code
    inv = create_inventory("nvml", nvml=fake)
    assert isinstance(inv, NoGpuInventory)
    assert inv.snapshot().error is not None
    assert text in str(inv.snapshot().error)


def test_nvml_that_could_not_start_is_started_again(fake: FakeNvml) -> None:
    # A driver/library mismatch at start-up (an upgrade not yet rebooted) left the scheduler without GPUs, saying
    # healthy, until someone restarted it.
    fake.fail["nvmlInit"] = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    inv = create_inventory("auto", nvml=fake)
    snap = inv.snapshot()
    assert (snap.backend, snap.gpus) == ("nvml", ())  # (a GPU host in trouble, not one without GPUs)
    assert "NVML could not start: " in str(snap.error) and "tried again every 30 s" in str(snap.error)
    assert isinstance(inv, NvmlStarting)
    inits = fake.calls.count("nvmlInit")
    inv.snapshot()
    assert fake.calls.count("nvmlInit") == inits  # (not at every reading)
    del fake.fail["nvmlInit"]
    inv._next = 0.0  # (as when its time is up)
    snap = inv.snapshot()
    assert (snap.backend, len(snap.gpus), snap.error) == ("nvml", 2, None)
    assert inv.backend == "nvml"
    inv.close()
    assert fake.calls.count("nvmlShutdown") == 1


def test_nvml_count_failure_falls_back_and_shuts_down(fake: FakeNvml) -> None:
    fake.fail["nvmlDeviceGetCount"] = pynvml.NVML_ERROR_UNKNOWN
    inv = create_inventory("auto", nvml=fake)
    assert isinstance(inv, NoGpuInventory)
    assert "could not count GPUs" in inv.reason
    assert fake.calls.count("nvmlShutdown") == 1


# --- NvmlInventory against the NVML stand-in ---------------------------------------------------


def test_nvml_snapshot_fields(fake: FakeNvml) -> None:
    inv = create_inventory("nvml", nvml=fake)
    assert isinstance(inv, NvmlInventory)
    snap = inv.snapshot()
    assert (snap.backend, snap.error, snap.driver_version) == ("nvml", None, "550.54.15")
    g0, g1 = snap.gpus
    assert (g0.index, g0.uuid, g0.name) == (0, "GPU-fake-0", "NVIDIA H100 80GB HBM3")
    assert g0.memory_total_mb == 80 * 1024
    # v2 figures: reserved memory is neither used nor free.
    assert g0.memory_used_mb == 10 * 1024
    assert g0.memory_free_mb == 80 * 1024 - 10 * 1024 - 512
    assert (g0.utilization, g0.memory_utilization, g0.temperature_c) == (37.0, 12.0, 41.0)
    assert (g0.power_w, g0.power_limit_w) == (123.456, 700.0)
    own, other = g0.processes
    assert own.pid == os.getpid()
    assert own.used_memory_mb == 2048  # compute and graphics entries merged, larger figure kept
    assert own.name == psutil.Process().name()
    # psutil cannot see it (as with host PIDs in a container), so NVML names it.
    assert other == GpuProcess(NO_SUCH_PID, None, "host-trainer")
    assert g1.uuid == "GPU-fake-1" and g1.processes == ()
    json.dumps(snap.to_dict())
    inv.close()


def test_unsupported_fields_become_none(fake: FakeNvml, nvml_inventory: NvmlInventory) -> None:
    for name in (
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetPowerManagementLimit",
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetComputeRunningProcesses_v2",
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        "nvmlDeviceGetGraphicsRunningProcesses_v2",
    ):
        fake.fail[name] = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.fail["nvmlSystemGetDriverVersion"] = pynvml.NVML_ERROR_UNKNOWN
    snap = NvmlInventory(fake).snapshot()
    assert snap.error is None and snap.driver_version is None
    g0 = snap.gpus[0]
    assert (g0.utilization, g0.memory_utilization, g0.temperature_c, g0.power_w, g0.power_limit_w) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert g0.processes == ()
    assert g0.memory_used_mb == 10 * 1024


def test_older_call_variants_are_used_and_remembered(fake: FakeNvml, nvml_inventory: NvmlInventory) -> None:
    fake.fail["nvmlDeviceGetMemoryInfo_v2"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    fake.fail["nvmlDeviceGetEnforcedPowerLimit"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    fake.fail["nvmlDeviceGetComputeRunningProcesses_v3"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    for _ in range(3):
        g0 = nvml_inventory.snapshot().gpus[0]
        # v1 counts the reservation as used.
        assert g0.memory_used_mb == 10 * 1024 + 512
        assert g0.power_limit_w == 650.0
        assert [p.pid for p in g0.processes] == sorted([os.getpid(), NO_SUCH_PID])
    # Each missing variant costs one failed call per GPU, not one per snapshot.
    assert fake.calls.count("nvmlDeviceGetMemoryInfo_v2") == 2
    assert fake.calls.count("nvmlDeviceGetEnforcedPowerLimit") == 2
    assert fake.calls.count("nvmlDeviceGetComputeRunningProcesses_v3") == 2
    assert fake.calls.count("nvmlDeviceGetMemoryInfo") == 6


def test_identity_is_read_once(fake: FakeNvml, nvml_inventory: NvmlInventory) -> None:
    for _ in range(3):
        nvml_inventory.snapshot()
    assert fake.calls.count("nvmlDeviceGetUUID") == 2
    assert fake.calls.count("nvmlDeviceGetHandleByIndex") == 2


def test_a_gpu_that_cannot_be_read_stays_listed_as_busy_and_comes_back(
    fake: FakeNvml, nvml_inventory: NvmlInventory
) -> None:
    good = nvml_inventory.snapshot().gpus[1]
    fake.fail["nvmlDeviceGetMemoryInfo_v2@1"] = pynvml.NVML_ERROR_GPU_IS_LOST
    snap = nvml_inventory.snapshot()
    assert snap.error is not None and "GPU 1: GPU is lost" in snap.error
    # Left out, it read as a GPU that does not exist; kept with its last reading's size, nothing of it free.
    lost = snap.gpus[1]
    assert [g.index for g in snap.gpus] == [0, 1] and snap.gpus[0].error is None
    assert lost.error is not None and "GPU is lost" in lost.error
    assert (lost.uuid, lost.memory_total_mb, lost.memory_usable_mb, lost.memory_free_mb) == (
        good.uuid, good.memory_total_mb, good.memory_usable_mb, 0.0)  # fmt: skip

    # After a failure the handle is fetched afresh, and the fresh fetch can fail too.
    del fake.fail["nvmlDeviceGetMemoryInfo_v2@1"]
    fake.fail["nvmlDeviceGetHandleByIndex@1"] = pynvml.NVML_ERROR_GPU_IS_LOST
    snap = nvml_inventory.snapshot()
    assert snap.gpus[1].error is not None and "GPU 1" in str(snap.error)

    del fake.fail["nvmlDeviceGetHandleByIndex@1"]
    snap = nvml_inventory.snapshot()
    assert [g.error for g in snap.gpus] == [None, None] and snap.error is None and snap.gpus[1] == good


def test_handle_getter_failing_for_every_gpu_lists_them_unreadable(fake: FakeNvml) -> None:
    fake.fail["nvmlDeviceGetHandleByIndex"] = pynvml.NVML_ERROR_UNKNOWN
    inv = NvmlInventory(fake)
    snap = inv.snapshot()
    assert [(g.index, g.memory_free_mb, g.error is not None) for g in snap.gpus] == [(0, 0.0, True), (1, 0.0, True)]
    assert snap.error is not None
    assert "GPU 0: Unknown Error" in snap.error and "GPU 1: Unknown Error" in snap.error
    assert inv.link_score(0, 1) is None
    inv.close()


def test_an_unexpected_error_reading_one_gpu_does_not_blank_the_others(
    fake: FakeNvml, nvml_inventory: NvmlInventory
) -> None:
    fake.crash["nvmlDeviceGetMemoryInfo_v2"] = RuntimeError("driver exploded")
    snap = nvml_inventory.snapshot()
    assert len(snap.gpus) == 2 and all(g.error and "driver exploded" in g.error for g in snap.gpus)
    assert snap.error is not None and "driver exploded" in snap.error


@pytest.mark.parametrize(("visible", "kept"), [
    ("2,3", [2, 3]), ("3,1", [1, 3]), ("GPU-fake-2", [2]), ("GPU-fake-0,3", [0, 3]), ("1,7", [1]), ("", []),
    # As CUDA reads it: up to the first entry it cannot take (these were refused at start, every role with them).
    ("-1", []), ("NoDevFiles", []), ("1,-1,2", [1]), ("2,MIG-4f1e-aa,3", [2]),
    # (up to the first entry that names no GPU, or several: review DQ)
    ("0,5,1", [0]), ("01,2", [1, 2]), ("GPU-fake", []), ("GPU-fake-1,GPU-nope,2", [1]),
])  # fmt: skip
def test_cuda_visible_devices_leaves_gpus_out_and_keeps_their_indices(visible: str, kept: list[int]) -> None:
    # The operator's CUDA_VISIBLE_DEVICES=2,3 was ignored: runs got GPUs 0 and 1, held back for someone else.
    fake = FakeNvml(gpus=4)
    inv = create_inventory("auto", nvml=fake, visible=load_settings(CUDA_VISIBLE_DEVICES=visible).CUDA_VISIBLE_DEVICES)
    snap = inv.snapshot()
    assert [g.index for g in snap.gpus] == kept and [g.uuid for g in snap.gpus] == [f"GPU-fake-{i}" for i in kept]
    assert snap.error == (None if kept else "CUDA_VISIBLE_DEVICES leaves none of the 4 GPUs NVML lists")
    inv.close()


def test_nvml_with_no_gpus_says_so() -> None:
    inv = NvmlInventory(FakeNvml(gpus=0))
    snap = inv.snapshot()
    assert snap.gpus == () and snap.error == "NVML is loaded but reports no GPUs"
    inv.close()


def test_link_scores_follow_topology_and_are_cached() -> None:
    fake = FakeNvml(gpus=3, nvlink=frozenset({(1, 2)}))
    inv = NvmlInventory(fake)
    inv.snapshot()  # (where they are read)
    assert inv.link_score(0, 1) == LINK_SCORE_BY_TOPOLOGY[pynvml.NVML_TOPOLOGY_SINGLE]
    assert inv.link_score(1, 0) == inv.link_score(0, 1)
    assert inv.link_score(0, 2) == LINK_SCORE_BY_TOPOLOGY[pynvml.NVML_TOPOLOGY_SYSTEM] == 0
    assert inv.link_score(2, 1) == LINK_SCORE_NVLINK
    assert LINK_SCORE_NVLINK > inv.link_score(0, 1) > inv.link_score(0, 2)  # type: ignore[operator]
    assert inv.link_score(1, 1) is None
    assert inv.link_score(0, 3) is None
    asked = fake.calls.count("nvmlDeviceGetTopologyCommonAncestor")
    inv.snapshot()
    assert fake.calls.count("nvmlDeviceGetTopologyCommonAncestor") == asked == 2  # (1-2 is NVLink: none)
    inv.close()


def test_link_score_never_calls_nvml(fake: FakeNvml) -> None:
    # The scheduler asks while it plans, on its event loop: one slow topology call stalled it all, its lead lost.
    inv = NvmlInventory(fake)
    fake.hang["nvmlDeviceGetTopologyCommonAncestor"] = threading.Event()  # (never set: a call would hang)
    fake.hang["nvmlDeviceGetP2PStatus"] = threading.Event()
    assert inv.link_score(0, 1) is None  # (not read yet: unknown, at once)
    del fake.hang["nvmlDeviceGetTopologyCommonAncestor"], fake.hang["nvmlDeviceGetP2PStatus"]
    inv.snapshot()
    calls = len(fake.calls)
    assert inv.link_score(0, 1) == LINK_SCORE_BY_TOPOLOGY[pynvml.NVML_TOPOLOGY_SINGLE]
    assert len(fake.calls) == calls
    inv.close()


def test_link_score_unknown_when_nvml_cannot_tell(fake: FakeNvml) -> None:
    fake.fail["nvmlDeviceGetP2PStatus"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.fail["nvmlDeviceGetTopologyCommonAncestor"] = pynvml.NVML_ERROR_UNKNOWN
    inv = NvmlInventory(fake)
    inv.snapshot()
    assert inv.link_score(0, 1) is None
    # A transient failure is not remembered, and not asked again at every reading either.
    del fake.fail["nvmlDeviceGetTopologyCommonAncestor"]
    asked = fake.calls.count("nvmlDeviceGetTopologyCommonAncestor")
    inv.snapshot()
    assert fake.calls.count("nvmlDeviceGetTopologyCommonAncestor") == asked
    inv.LINK_RETRY_SECONDS = 0.0
    inv._link_retry.clear()  # (as when its time is up)
    inv.snapshot()
    assert inv.link_score(0, 1) == LINK_SCORE_BY_TOPOLOGY[pynvml.NVML_TOPOLOGY_SINGLE]
    inv.close()


def test_close_does_not_wait_for_a_hung_reading(fake: FakeNvml) -> None:
    # Shutting down waited for the lock a hung snapshot held: the scheduler was left running with no parent.
    inv = NvmlInventory(fake)
    gate = fake.hang["nvmlDeviceGetMemoryInfo_v2"] = threading.Event()
    reading = threading.Thread(target=inv.snapshot, daemon=True)
    reading.start()
    wait_for(lambda: "nvmlDeviceGetMemoryInfo_v2" in fake.calls, what="the reading to hang")
    started = time.monotonic()
    inv.close()
    assert time.monotonic() - started < CLOSE_WAIT_SECONDS + 1
    assert "nvmlShutdown" not in fake.calls  # (not under a call still in the library)
    gate.set()
    reading.join(5)


def test_close_shuts_nvml_down_once(fake: FakeNvml) -> None:
    inv: GpuInventory = NvmlInventory(fake)
    inv.close()
    inv.close()
    assert fake.calls.count("nvmlShutdown") == 1
    snap = inv.snapshot()
    assert snap.gpus == () and snap.error == "GPU inventory is closed"
    assert inv.link_score(0, 1) is None


# --- summary and settings ----------------------------------------------------------------------


def test_gpu_summary() -> None:
    inv = SimulatedInventory(2, 24)
    inv.set_usage(0, memory_used_gb=6, utilization=80)
    summary = gpu_summary(inv.snapshot(), None)
    assert summary == {
        "backend": "simulated",
        "count": 2,
        "memory_total_gb": 48.0,
        "memory_used_gb": 6.0,
        "memory_free_gb": 42.0,
        "mean_utilization": 40.0,
        "driver_version": None,
        "error": None,
    }
    nothing = NoGpuInventory("no driver").snapshot()
    empty = gpu_summary(nothing, nothing.error)
    assert (empty["count"], empty["mean_utilization"], empty["error"]) == (0, None, "no driver")


def test_usage_file_setting(tmp_path: Path) -> None:
    settings = load_settings(SIMULATED_GPU_USAGE_FILE=str(tmp_path / "u.json"))
    assert settings.SIMULATED_GPU_USAGE_FILE == tmp_path / "u.json"


def test_simulated_gpus_of_mixed_sizes_each_have_their_own_memory(tmp_path: Path) -> None:
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps({"2": {"memory_used_gb": 20}}))
    inv = create_inventory("simulated", "2x80,1x24", usage)
    snap = inv.snapshot()
    assert [g.memory_total_mb for g in snap.gpus] == [80 * 1024, 80 * 1024, 24 * 1024] and snap.error is None
    assert snap.gpus[2].memory_free_mb == 4 * 1024
    usage.write_text(json.dumps({"2": {"memory_used_gb": 30}}))  # more than that GPU has, if not than GPU 0
    assert "memory_used_gb" in (inv.snapshot().error or "")
