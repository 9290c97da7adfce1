"""Server-Sent Events as the server writes them: `id:`, `event:`, `data:` lines, comments as heartbeats, and a
final `event: end`. `follow` survives dropped connections by reconnecting with Last-Event-ID."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from application.cli.client import EXIT_UNREACHABLE, STREAM_READ_TIMEOUT, Api, CliError, unreachable

# How long a stream that was once connected keeps trying to come back before the CLI gives up (exit 3): long
# enough to ride out a server restart.
RECONNECT_SECONDS = 60.0
# How long a stream that stays open may say nothing (no message, no heartbeat) before the CLI gives up: past the
# longest STREAM_HEARTBEAT_SECONDS a server takes (300 s).
SILENCE_SECONDS = 330.0
BACKOFF_MAX = 5.0
# The longest a Retry-After is waited for at a time (a 429 names when a stream slot frees, a 503 a restart).
RETRY_AFTER_MAX = 30.0


@dataclass(frozen=True)
class Message:
    data: str
    id: str | None = None
    event: str | None = None

    @property
    def end(self) -> bool:
        return self.event == "end"

    def json(self) -> dict[str, Any]:
        value = json.loads(self.data) if self.data else {}
        return value if isinstance(value, dict) else {"data": value}


def parse(lines: Iterable[str]) -> Iterator[Message]:
    """The messages of an event stream; comments (heartbeats) carry nothing and are skipped."""
    data: list[str] = []
    event: str | None = None
    event_id: str | None = None
    for line in lines:
        if not line:
            if data or event:
                yield Message("\n".join(data), event_id, event)
            data, event, event_id = [], None, None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value


def follow(api: Api, path: str, params: dict[str, Any] | None = None) -> Iterator[Message]:
    """Every message of the stream at `path` up to and including its `end` event. A connection that drops (or a
    server that restarts, or is busy: 429, 503) is reopened with the last id seen, so nothing is lost or repeated;
    a server that never answered, or sends nothing for RECONNECT_SECONDS (SILENCE_SECONDS while its streams stay
    open), is exit 3."""
    last_id: str | None = None
    connected = False
    down_since: float | None = None
    last_heard = time.monotonic()
    attempt = 0
    while True:
        heard = [False]
        wait = 0.0
        answered: float | None = None
        try:
            with api.stream(path, params or {}, last_id) as lines:
                connected, answered = True, time.monotonic()
                for message in parse(_noting(lines, heard)):
                    if message.id is not None:
                        last_id = message.id
                    yield message
                    if message.end:
                        return
        except httpx.TransportError as e:
            if not connected:
                raise unreachable(api.url, e) from e
            error: Exception = e
        except CliError as e:
            # 4xx (the job was deleted, a bad request) ends the stream; 5xx (Redis away) may pass, and so may a 429
            # (the streams of a killed worker still counted against this owner's), after its Retry-After.
            if not connected or not (e.code == EXIT_UNREACHABLE or e.status == 429):
                raise
            error, wait = e, min(e.retry_after or 0.0, RETRY_AFTER_MAX)
        else:
            error = ConnectionError("the stream closed before the job ended")
        # Only a stream that said something (a message, a heartbeat), or stayed open a while (a server whose
        # STREAM_HEARTBEAT_SECONDS is longer than the client's read timeout), was back: one that closes at once,
        # again and again, is a server that cannot serve it, and must reach the give-up.
        now = time.monotonic()
        if heard[0]:
            last_heard = now
        if heard[0] or (answered is not None and now - answered >= STREAM_READ_TIMEOUT / 2):
            down_since, attempt = None, 0
        if now - last_heard > SILENCE_SECONDS:  # (open, and silent for longer than any heartbeat)
            raise unreachable(api.url, error, now - last_heard)
        if down_since is None:
            down_since = now
        left = down_since + RECONNECT_SECONDS - now
        if left < 0:
            # (it answered before: "set SWIFT_API_URL" sent people to fix a URL that was right, hunt CZ)
            raise unreachable(api.url, error, now - down_since)
        time.sleep(max(min(0.25 * 2**attempt, BACKOFF_MAX), min(wait, left)))
        attempt += 1


def _noting(lines: Iterable[str], heard: list[bool]) -> Iterator[str]:
    for line in lines:
        heard[0] = True
        yield line
