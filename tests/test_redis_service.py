"""The embedded Redis of `python start.py`: one per data folder, and only its own leftovers are stopped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from application.services.redis_service import EmbeddedRedis, find_redis_server


def embedded(folder: Path) -> EmbeddedRedis:
    binary = find_redis_server()
    assert binary
    return EmbeddedRedis(folder, binary)


def test_a_second_start_on_the_same_data_folder_leaves_the_first_running(tmp_path: Path) -> None:
    # A command typed twice: the second took the first one's Redis away (SIGTERM to its pid file's pid),
    # then failed on the busy port, and the first server answered 503 for good.
    first = embedded(tmp_path / "redis")
    first.start()
    try:
        with pytest.raises(RuntimeError, match=r"is in use by another swift-api \(pid \d+\)"):
            embedded(tmp_path / "redis").start()
        assert first.process is not None and first.process.poll() is None and first._ping()
    finally:
        first.stop()
    again = embedded(tmp_path / "redis")  # once the first has stopped, the folder is free
    again.start()
    again.stop()


def test_a_stale_pid_file_never_stops_a_process_that_is_not_its_redis(tmp_path: Path) -> None:
    # After a crash or a reboot the pid in redis.pid may be anyone's: it was sent SIGTERM whatever it was.
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        (tmp_path / "redis").mkdir()
        (tmp_path / "redis" / "redis.pid").write_text(str(bystander.pid))
        server = embedded(tmp_path / "redis")
        server.start()
        server.stop()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
