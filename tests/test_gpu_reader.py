"""The scheduler's GPU reading given up on when NVML hangs, against the NVML stand-in."""

from __future__ import annotations

import threading
import time

import pynvml
import pytest

from application.services.gpu_pool import impossible
from application.utils.gpu_reader import GpuReader
from application.utils.gpu_types import NO_READING, GpuSnapshot
from application.utils.gpu_utils import NvmlInventory, create_inventory
from tests.fake_nvml import FakeNvml


async def test_a_hung_reading_counts_every_gpu_busy_and_is_not_waited_for_again() -> None:
    # A hung NVML call held the scheduler's pass for good, without a word: /queue showed every GPU free, /health
    # said healthy, and the scheduler could not shut down.
    fake = FakeNvml(gpus=2)
    inv = NvmlInventory(fake)
    reader = GpuReader(inv, timeout=0.5)
    first = await reader.read()
    assert [g.error for g in first.gpus] == [None, None]

    gate = fake.hang["nvmlDeviceGetMemoryInfo_v2"] = threading.Event()
    try:
        began = time.monotonic()
        hung = await reader.read()
        assert 0.4 < time.monotonic() - began < 5
        assert hung.error is not None and "the GPU reading has not come back" in hung.error
        assert [(g.index, g.memory_free_mb, g.uuid) for g in hung.gpus] == [(0, 0.0, "GPU-fake-0"),
                                                                            (1, 0.0, "GPU-fake-1")]  # fmt: skip
        assert all(g.error == hung.error for g in hung.gpus)
        # The next round looks, and does not start another reading behind the hung one.
        readings = fake.calls.count("nvmlDeviceGetMemoryInfo_v2")
        began = time.monotonic()
        again = await reader.read()
        assert time.monotonic() - began < 0.3 and again.error is not None
        assert fake.calls.count("nvmlDeviceGetMemoryInfo_v2") == readings
    finally:
        gate.set()
    del fake.hang["nvmlDeviceGetMemoryInfo_v2"]
    deadline = time.monotonic() + 10
    while (back := await reader.read()).error is not None:  # (the hung one comes back; then fresh ones)
        assert time.monotonic() < deadline, back.error
    assert [g.error for g in back.gpus] == [None, None]
    inv.close()


async def test_a_reading_that_raises_is_raised_to_the_caller() -> None:
    class Broken:
        backend = "nvml"
        fixed = False

        def snapshot(self) -> GpuSnapshot:
            if not self.fixed:
                raise RuntimeError("a bug")
            return NO_READING

        def link_score(self, a: int, b: int) -> None:
            return None

        def close(self) -> None:
            pass

    broken = Broken()
    reader = GpuReader(broken, timeout=5)
    with pytest.raises(RuntimeError, match="a bug"):
        await reader.read()
    broken.fixed = True
    assert await reader.read() is NO_READING  # (read afresh, not the failure again)


async def test_gpus_nvml_cannot_list_are_those_last_published_unreadable_not_none() -> None:
    # A hung first reading, or NVML not started after a restart (a driver upgrade), published no GPU: every GPU
    # create was refused as one that "can never be met", and jobs pinned to a GPU as naming one that does not exist.
    fake = FakeNvml(gpus=2)
    fake.fail["nvmlInit"] = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    reader = GpuReader(create_inventory("auto", nvml=fake), timeout=5)
    alone = await reader.read()
    assert alone.gpus == () and alone.gpus_unknown and impossible(1, [1], None, alone) is None  # (unknown: queues)
    published = GpuSnapshot.from_dict((await GpuReader(NvmlInventory(FakeNvml(gpus=2))).read()).to_dict())
    reader.remember(published)
    seen = await reader.read()
    assert [(g.index, g.uuid, g.memory_free_mb) for g in seen.gpus] == [(0, "GPU-fake-0", 0.0), (1, "GPU-fake-1", 0.0)]
    assert all(g.error and "NVML could not start" in g.error for g in seen.gpus) and seen.error == alone.error
    assert impossible(2, None, None, seen) is None and impossible(3, None, None, seen) is not None


async def test_a_first_reading_that_hangs_with_nothing_published_refuses_no_gpu_request() -> None:
    # (a fresh Redis, or a new key prefix: no earlier reading to list; every GPU create was a 422, review DQ)
    fake = FakeNvml(gpus=2)
    gate = fake.hang["nvmlDeviceGetMemoryInfo_v2"] = threading.Event()
    inv = NvmlInventory(fake)
    try:
        hung = await GpuReader(inv, timeout=0.3).read()
        assert hung.gpus == () and hung.gpus_unknown and impossible(1, [1], None, hung) is None
    finally:
        gate.set()
    inv.close()
