"""Check NvmlInventory against nvidia-smi on a machine with real GPUs.

    .venv/bin/python benchmarks/device_check_nvml.py [--allocate-mib 1024] [--samples 20]

Prints the snapshot as JSON, then one PASS/FAIL line per GPU. Exit status: 0 all GPUs agree,
1 a field disagrees, 2 NVML or nvidia-smi is not usable here.

nvidia-smi is read just before and just after our snapshot, and a moving field (used memory,
utilization, temperature, processes) passes when it is within tolerance of either reading; a
single reading would make a busy GPU look like a bug.

With --allocate-mib N (default 1024, 0 to skip) a child process takes N MiB through the CUDA driver
API (libcuda via ctypes, no framework needed) so the process list and used memory are checked
against something non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from application.utils.gpu_utils import (
    GpuInfo,
    GpuSnapshot,
    NvmlInventory,
    NvmlUnavailableError,
)

GPU_QUERY = ",".join(
    (
        "index",
        "uuid",
        "name",
        "memory.total",
        "memory.used",
        "memory.free",
        "utilization.gpu",
        "temperature.gpu",
        "enforced.power.limit",
    )
)
APPS_QUERY = "gpu_uuid,pid,used_memory"

MEMORY_TOTAL_TOL_MIB = 1.0
# Used/free memory: 1% of the value or a few MiB, whichever is larger; nvidia-smi prints whole MiB.
MEMORY_REL_TOL = 0.01
MEMORY_ABS_TOL_MIB = 8.0
UTILIZATION_TOL = 10.0
TEMPERATURE_TOL_C = 3.0
POWER_LIMIT_TOL_W = 1.0

# The child keeps its allocation until its stdin closes, so it cannot outlive this script.
CUDA_CHILD = r"""
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
def check(ret, what):
    if ret != 0:
        print(f"error {what} {ret}", flush=True)
        sys.exit(1)
check(cuda.cuInit(0), "cuInit")
dev = ctypes.c_int()
check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p()
check(cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev), "cuCtxCreate_v2")
ptr = ctypes.c_uint64()
check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(int(sys.argv[1]) * 1024 * 1024)), "cuMemAlloc_v2")
print("ready", flush=True)
sys.stdin.read()
"""


@dataclass(frozen=True)
class SmiReading:
    gpus: dict[str, dict[str, float | str | None]]  # by uuid
    apps: dict[str, dict[int, float | None]]  # uuid -> pid -> used MiB


def _value(raw: str) -> float | str | None:
    text = raw.strip()
    if not text or text.startswith("[") or text.upper() in ("N/A", "NOT SUPPORTED"):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _smi(args: Sequence[str]) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *args, "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def read_smi() -> SmiReading:
    fields = GPU_QUERY.split(",")
    gpus: dict[str, dict[str, float | str | None]] = {}
    for row in _smi([f"--query-gpu={GPU_QUERY}"]):
        parsed = {field: _value(cell) for field, cell in zip(fields, row, strict=True)}
        gpus[str(parsed["uuid"])] = parsed
    apps: dict[str, dict[int, float | None]] = {uuid: {} for uuid in gpus}
    for row in _smi([f"--query-compute-apps={APPS_QUERY}"]):
        if len(row) != 3 or _value(row[1]) is None:
            continue
        mib = _value(row[2])
        apps.setdefault(row[0], {})[int(float(row[1]))] = mib if isinstance(mib, float) else None
    return SmiReading(gpus, apps)


def _near(ours: float | None, theirs: Sequence[float | str | None], tol: float) -> bool:
    if ours is None:
        return any(t is None for t in theirs)
    return any(isinstance(t, float) and abs(ours - t) <= tol for t in theirs)


def compare_gpu(gpu: GpuInfo, before: SmiReading, after: SmiReading) -> list[str]:
    """Every field that disagrees with both nvidia-smi readings, as 'field: ours=.. smi=..'."""
    rows = [r.gpus[gpu.uuid] for r in (before, after) if gpu.uuid in r.gpus]
    if not rows:
        return [f"uuid {gpu.uuid} not listed by nvidia-smi"]
    problems: list[str] = []

    def check(field: str, ours: object, ok: bool) -> None:
        if not ok:
            problems.append(f"{field}: ours={ours!r} smi={[r[field] for r in rows]!r}")

    check("index", gpu.index, all(r["index"] == float(gpu.index) for r in rows))
    check("name", gpu.name, any(r["name"] == gpu.name for r in rows))
    check(
        "memory.total",
        gpu.memory_total_mb,
        _near(gpu.memory_total_mb, [r["memory.total"] for r in rows], MEMORY_TOTAL_TOL_MIB),
    )
    for field, ours in (("memory.used", gpu.memory_used_mb), ("memory.free", gpu.memory_free_mb)):
        smi = [r[field] for r in rows]
        scale = max((v for v in smi if isinstance(v, float)), default=0.0)
        check(field, ours, _near(ours, smi, max(MEMORY_ABS_TOL_MIB, MEMORY_REL_TOL * scale)))
    check(
        "utilization.gpu",
        gpu.utilization,
        _near(gpu.utilization, [r["utilization.gpu"] for r in rows], UTILIZATION_TOL),
    )
    check(
        "temperature.gpu",
        gpu.temperature_c,
        _near(gpu.temperature_c, [r["temperature.gpu"] for r in rows], TEMPERATURE_TOL_C),
    )
    check(
        "enforced.power.limit",
        gpu.power_limit_w,
        _near(gpu.power_limit_w, [r["enforced.power.limit"] for r in rows], POWER_LIMIT_TOL_W),
    )
    # nvidia-smi's compute-apps list is NVML's compute list; we also merge graphics processes, which on
    # these headless machines is empty, so comparing PID sets is fair.
    ours_pids = {p.pid for p in gpu.processes}
    smi_pids = [set(r.apps.get(gpu.uuid, {})) for r in (before, after)]
    check("processes", sorted(ours_pids), ours_pids in smi_pids)
    for proc in gpu.processes:
        smi_mib = [r.apps.get(gpu.uuid, {}).get(proc.pid) for r in (before, after)]
        if proc.used_memory_mb is not None or any(m is not None for m in smi_mib):
            check(
                f"process {proc.pid} used_memory",
                proc.used_memory_mb,
                _near(proc.used_memory_mb, smi_mib, MEMORY_ABS_TOL_MIB),
            )
    return problems


def start_allocator(mib: int) -> subprocess.Popen[str] | None:
    if mib <= 0:
        return None
    child = subprocess.Popen(
        [sys.executable, "-c", CUDA_CHILD, str(mib)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if line != "ready":
        print(f"NOTE: could not allocate through libcuda ({line or 'no output'}); checking an idle GPU")
        stop_allocator(child)
        return None
    # NVML's per-process accounting lags the allocation a little.
    time.sleep(1.0)
    return child


def stop_allocator(child: subprocess.Popen[str] | None) -> None:
    if child is None:
        return
    try:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def time_snapshots(inventory: NvmlInventory, samples: int) -> list[float]:
    times: list[float] = []
    for _ in range(samples):
        start = time.perf_counter()
        inventory.snapshot()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allocate-mib", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=20, help="snapshots to time")
    args = parser.parse_args(argv)

    try:
        inventory = NvmlInventory()
    except NvmlUnavailableError as exc:
        print(f"FAIL NVML could not be loaded: {exc}")
        return 2
    child = None
    try:
        child = start_allocator(args.allocate_mib)
        try:
            before = read_smi()
            snapshot: GpuSnapshot = inventory.snapshot()
            after = read_smi()
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"FAIL nvidia-smi is not usable: {exc}")
            return 2
        print(json.dumps(snapshot.to_dict(), indent=2))

        failed = False
        if snapshot.error:
            print(f"FAIL snapshot error: {snapshot.error}")
            failed = True
        if len(snapshot.gpus) != len(before.gpus):
            print(f"FAIL GPU count: ours={len(snapshot.gpus)} nvidia-smi={len(before.gpus)}")
            failed = True
        for gpu in snapshot.gpus:
            problems = compare_gpu(gpu, before, after)
            label = f"gpu {gpu.index} {gpu.uuid} ({gpu.name})"
            if problems:
                failed = True
                print(f"FAIL {label}: " + "; ".join(problems))
            else:
                print(
                    f"PASS {label}: {gpu.memory_used_mb:.0f}/{gpu.memory_total_mb:.0f} MiB used, "
                    f"util {gpu.utilization}%, {gpu.temperature_c} C, "
                    f"{gpu.power_w} W of {gpu.power_limit_w} W, "
                    f"{len(gpu.processes)} process(es)"
                )
        if child is not None:
            mine = [p for g in snapshot.gpus for p in g.processes if p.pid == child.pid]
            if mine:
                print(f"INFO allocator child seen by pid: {mine[0]}")
            else:
                # Not a failure of ours: NVML reports PIDs from the host's namespace in a container.
                print(f"WARN allocator child pid {child.pid} not in NVML's process list (PID namespace?)")
        for a in range(len(snapshot.gpus)):
            for b in range(a + 1, len(snapshot.gpus)):
                print(f"INFO link_score({a}, {b}) = {inventory.link_score(a, b)}")
        times = time_snapshots(inventory, max(1, args.samples))
        print(
            f"INFO snapshot time over {len(times)} calls: "
            f"median {statistics.median(times):.2f} ms, max {max(times):.2f} ms"
        )
        print(f"INFO driver {snapshot.driver_version}, pid {os.getpid()}")
        return 1 if failed else 0
    finally:
        stop_allocator(child)
        inventory.close()


if __name__ == "__main__":
    sys.exit(main())
