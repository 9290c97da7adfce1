"""The disk of a job's folder when a launch or a run fails: what the failure says, and whether it is the whole of
OUTPUT_ROOT's disk (the queue then waits) or the job's folder alone."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from application.services import disk_space
from application.services.disk_space import (
    disk_state,
    disk_trouble,
    free_bytes,
    launch_error,
    start_refused,
    whole_disk,
    write_refused,
)
from tests.conftest import job_body, kill_processes_under, make_model, wait_job


def test_a_launch_on_a_full_or_read_only_disk_says_which_folder_and_what_to_change() -> None:
    # It said "the runner could not be started: [Errno 28] No space left on device": no folder, no fix.
    logs = Path("/srv/out/j/logs")
    full = launch_error(OSError(errno.ENOSPC, "No space left on device"), logs)
    assert "no space left for the job's logs (/srv/out/j/logs)" in full and "free space" in full
    # A job that never saved a checkpoint cannot be resumed (409 "create a new job"): it was told to (hunt BW).
    assert full.endswith("then create the job again")
    assert launch_error(OSError(errno.EDQUOT, "Disk quota exceeded"), logs, "resume the job").endswith("resume the job")
    locked = launch_error(PermissionError(errno.EACCES, "Permission denied"), logs)
    assert (
        "cannot be written (/srv/out/j/logs: Permission denied)" in locked and "OUTPUT_ROOT must be writable" in locked
    )
    # An export's runner, in the same words (it gave the raw errno).
    export = launch_error(OSError(errno.EROFS, "Read-only file system"), logs, "export again", "export")
    assert export.startswith("the export could not be started: the job's logs folder cannot be written")


def test_a_launch_that_fails_for_its_own_folder_does_not_hold_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = free_bytes(tmp_path)
    assert free is not None and free > 0
    assert free_bytes(tmp_path / "missing") is None
    # OUTPUT_ROOT takes a file: the job's folder alone failed (a mount of its own), its run fails.
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        assert not whole_disk(OSError(code, "refused"), tmp_path)
    # A little room left there, which a probe fits in and a launch did not: full (review CB).
    monkeypatch.setattr(disk_space, "DISK_FULL_BYTES", free + (1 << 40))
    assert whole_disk(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert not whole_disk(OSError(errno.EROFS, "Read-only file system"), tmp_path)
    assert write_refused(tmp_path) is None and list(tmp_path.iterdir()) == []  # (the probe is removed)
    assert disk_state(OSError(errno.EROFS, "Read-only file system"), tmp_path) == "read-only"
    assert disk_state(OSError(errno.ENOSPC, "No space left on device"), tmp_path).startswith("full (")


# ---- on a real disk that fills up: a tmpfs as OUTPUT_ROOT ----------------------------------------------------


@contextlib.contextmanager
def tmpfs(target: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `target` (made) with `options`, unmounted after. Mounting needs root (CAP_SYS_ADMIN):
    the test is skipped where it is refused."""
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "swift-api-test", str(target)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here ({done.stderr.strip()})")
    try:
        yield target
    finally:
        kill_processes_under(target.parent)
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB disk where the tests' settings put OUTPUT_ROOT, to fill up."""
    with tmpfs(tmp_path / "output", "size=16m") as disk:
        yield disk


def fill(disk: Path) -> Path:
    """Writes a file until the disk is full; the file, to free it again."""
    filler = disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as f:
        while True:
            f.write(b"\0" * (64 * 1024))
            f.flush()
    return filler


async def poll(read: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not done(value := await read()):
        assert time.monotonic() < deadline, value
        await asyncio.sleep(0.1)
    return value


@pytest.fixture
def short_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starts held for the disk for a second, not DISK_HOLD_SECONDS: the tests wait for the hold to end."""
    from application.services import run_start

    monkeypatch.setattr(run_start, "DISK_HOLD_SECONDS", 1.0)


async def health_of(client: Any) -> Any:
    return (await client.get("/health")).json()


async def test_a_full_output_disk_holds_the_queue_and_fails_no_job(
    app_factory: Callable[..., Any], tmp_path: Path, small_disk: Path, short_hold: None
) -> None:
    # Each job that came to the head failed at its launch, one after another, saying "free space, then resume
    # the job", and its resume was then 409 "left no checkpoint": the whole queue lost to the operator's disk.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        filler = fill(small_disk)
        for name in ("first", "second"):
            body = job_body(tmp_path, name, auto_start=True, training={"max_steps": 2})
            assert (await client.post("/jobs", json=body)).status_code == 201

        health = functools.partial(health_of, client)

        held = await poll(health, lambda h: h["scheduler"].get("starts_held"))
        assert held["status"] == "degraded"
        assert held["scheduler"]["starts_held"].startswith("no run starts: OUTPUT_ROOT's disk is full ("), held
        # Not "create the job again", with another job's folder, on every waiting job (review BZ).
        assert "the waiting jobs start by themselves" in held["scheduler"]["starts_held"]
        # The disk looked at before each start: not started and given back at each try (two events a try).
        passes = client.scheduler.processor.stats.passes
        await poll(health, lambda _: client.scheduler.processor.stats.passes >= passes + 3)
        # Still waiting, in their places, as they were: no run recorded, nothing failed.
        first = (await client.get("/jobs/first")).json()
        assert first["status"] == "queued" and first["attempts"] == [] and first["started_at"] is None, first
        # Looked at by a round (once a second) or before a start: at most one run started and given back.
        events = (await client.get("/jobs/first/events")).json()["events"]
        back = [e for e in events if e["message"].startswith("not started, back in its place in the queue: ")]
        assert len(back) <= 1 and all("OUTPUT_ROOT's disk is full" in e["message"] for e in back), events
        queue = (await client.get("/queue")).json()
        assert [e["job_id"] for e in queue["entries"]] == ["first", "second"], queue
        filler.unlink()
        for name in ("first", "second"):
            done = await wait_job(client, name, lambda j: j["status"] in ("completed", "failed"), timeout=60)
            assert done["status"] == "completed" and len(done["attempts"]) == 1, done
        assert (await poll(health, lambda h: not h["scheduler"].get("starts_held")))["status"] == "healthy"


async def test_a_stop_asked_for_as_a_launch_fails_on_the_full_disk_is_not_undone(
    app_factory: Callable[..., Any], tmp_path: Path, small_disk: Path, short_hold: None
) -> None:
    # The job went back to the queue with the flags it had before its start: the user's stop, taken by then
    # (answered 200), was undone, and the job ran once the disk was freed (review BZ).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        starter = client.scheduler.processor.starter
        launch = starter.launcher.launch
        filled: list[Path] = []

        async def stopped_then_full(*args: Any, **kwargs: Any) -> Any:
            assert (await client.post("/jobs/late/stop")).status_code == 200
            filled.append(fill(small_disk))
            raise OSError(errno.ENOSPC, "No space left on device")

        starter.launcher.launch = stopped_then_full
        body = job_body(tmp_path, "late", auto_start=True, training={"max_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "late", lambda j: bool(filled))
        starter.launcher.launch = launch
        filled[0].unlink()
        job = await wait_job(client, "late", lambda j: j["status"] in ("cancelled", "stopped", "completed"), timeout=60)
        assert job["status"] == "cancelled" and job["attempts"] == [], job


async def test_a_disk_that_does_not_answer_stops_no_round_and_takes_one_thread(
    app_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hung NFS mount under OUTPUT_ROOT: each round waited for its look, every pass stopped with it, GPU readings
    # too, and each round took another thread (review CF).
    import threading

    from application.services import run_start

    answer = threading.Event()
    looks: list[Path] = []

    def hung(root: Path) -> str | None:
        looks.append(root)
        answer.wait(30)
        return None

    monkeypatch.setattr(run_start, "disk_trouble", hung)
    monkeypatch.setattr(run_start, "LOOK_SECONDS", 0.05)
    async with app_factory() as client:
        starter = client.scheduler.processor.starter
        for _ in range(3):
            await starter.look_at_disk()  # (returns: the disk's answer is waited for no longer)

        health = functools.partial(health_of, client)

        passes = client.scheduler.processor.stats.passes
        await poll(health, lambda _: client.scheduler.processor.stats.passes >= passes + 2)  # (rounds go on)
        assert len(looks) == 1, looks
        answer.set()
        await poll(health, lambda _: len(looks) > 1)  # (looked at again once that look ended)


def test_a_full_or_read_only_disk_is_told_from_its_figures_alone(tmp_path: Path) -> None:
    # What each pass looks at, writing nothing: the starts wait before a run fails on the disk.
    with tmpfs(tmp_path / "small", "size=16m") as disk:
        assert disk_trouble(disk) is None  # (a small volume, empty: not full at its 16 MiB)
        filler = fill(disk)
        assert (disk_trouble(disk) or "").startswith("full ("), disk_trouble(disk)
        filler.unlink()
        assert start_refused(disk) is None and list(disk.iterdir()) == []
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert disk_trouble(disk) == "read-only" and start_refused(disk) == "read-only"


async def test_health_says_the_output_disk_is_full_while_no_job_waits(
    app_factory: Callable[..., Any], small_disk: Path, short_hold: None
) -> None:
    # It said healthy over a full OUTPUT_ROOT for as long as no job came to start (hunt BW).
    async with app_factory(AUTO_EXPORT=False) as client:
        health = functools.partial(health_of, client)

        assert (await health())["status"] == "healthy"
        # The processor stopped by its operator, too: only a pass looked (review CF).
        assert (await client.post("/queue/processor/stop")).status_code == 200
        filler = fill(small_disk)
        held = await poll(health, lambda h: h["scheduler"].get("starts_held"))
        assert held["status"] == "degraded", held
        assert held["scheduler"]["starts_held"].startswith("no run starts: OUTPUT_ROOT's disk is full ("), held
        filler.unlink()
        assert (await poll(health, lambda h: not h["scheduler"].get("starts_held")))["status"] == "healthy"


def test_a_disk_out_of_inodes_is_full_whatever_bytes_it_has(tmp_path: Path) -> None:
    # Empty files took every inode of OUTPUT_ROOT's disk with 200 MB free: each job failed at its launch, told
    # to free space, rather than waiting (review BZ).
    with tmpfs(tmp_path / "inodes", "size=16m,nr_inodes=64") as disk:
        assert write_refused(disk) is None
        with contextlib.suppress(OSError):
            for n in range(1000):
                (disk / str(n)).touch()
        assert free_bytes(disk) == 0 and whole_disk(OSError(errno.ENOSPC, "No space left on device"), disk)
        refused = write_refused(disk)
        assert refused is not None and disk_state(refused, disk) == "full (no file can be made there)"


async def test_a_run_the_full_disk_cut_short_fails_saying_the_disk_is_full(
    app_factory: Callable[..., Any], tmp_path: Path, small_disk: Path
) -> None:
    # Its error was a fragment of the traceback the full disk cut ("swift exited with code 1:     (run_dir /
    # "runs" / name).w"), and "No space left on device" was nowhere (hunt BW).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(AUTO_EXPORT=False) as client:
        training = {"max_steps": 200, "save_steps": 5, "logging_steps": 1}
        body = job_body(tmp_path, "cut", auto_start=True, step_seconds=0.1, training=training)
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "cut", lambda j: (j["progress"]["current_step"] or 0) >= 2)
        filler = fill(small_disk)
        job = await wait_job(client, "cut", lambda j: j["status"] not in ("running",), timeout=60)
        assert job["status"] == "failed" and job["error_code"] == "disk_full", job
        assert job["error_message"].startswith("the disk of the job's output folder is full ("), job
        assert "free space on it (OUTPUT_ROOT)" in job["error_message"]
        filler.unlink()

        async def gpus() -> Any:
            return (await client.get("/gpus")).json()["gpus"]

        await poll(gpus, lambda listed: all(g["job_id"] is None for g in listed))  # (its GPU is free again)
