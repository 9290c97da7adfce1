"""Server-Sent Events as the server writes them: `id:`, `event:`, `data:` lines, comments as heartbeats, and a
final `event: end`. `follow` survives dropped connections by reconnecting with Last-Event-ID."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from application.cli.client import EXIT_UNREACHABLE, Api, CliError, unreachable

# How long a stream that was once connected keeps trying to come back before the CLI gives up (exit 3): long
# enough to ride out a server restart.
RECONNECT_SECONDS = 60.0
BACKOFF_MAX = 5.0


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
    server that restarts) is reopened with the last id seen, so nothing is lost or repeated; a server that never
    answered, or stays away RECONNECT_SECONDS, is exit 3."""
    last_id: str | None = None
    connected = False
    down_since: float | None = None
    attempt = 0
    while True:
        try:
            with api.stream(path, params or {}, last_id) as lines:
                connected, down_since, attempt = True, None, 0
                for message in parse(lines):
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
            # 4xx (the job was deleted, a bad request) ends the stream; 5xx (Redis away) may pass.
            if e.code != EXIT_UNREACHABLE or not connected:
                raise
            error = e
        else:
            error = ConnectionError("the stream closed before the job ended")
        now = time.monotonic()
        down_since = down_since or now
        if now - down_since > RECONNECT_SECONDS:
            raise unreachable(api.url, error)
        time.sleep(min(0.25 * 2**attempt, BACKOFF_MAX))
        attempt += 1
