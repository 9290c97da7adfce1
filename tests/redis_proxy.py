"""A TCP proxy in front of a real Redis server that makes an outage happen at an exact moment: after the command
that matches a pattern has run, its reply is delivered or lost, every connection is cut and new ones are refused
for a while. A stopped Redis cannot do this: the moment between "Redis took the write" and "its answer came
back" is what a runner must get right."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit


class RedisProxy:
    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        if parts.scheme == "unix":
            # The suite's own Redis (no TEST_REDIS_URL: the README's test command) listens on a unix socket: the
            # proxy is reached over TCP all the same, on that socket's database. (It read the URL's missing port
            # as 6379, proxied nothing, and 29 tests failed outside CI.)
            self.upstream: tuple[int, str | tuple[str, int]] = (socket.AF_UNIX, unquote(parts.path))
            db = parse_qs(parts.query).get("db", ["0"])[0]
            self.url = f"redis://127.0.0.1:{self.port}/{db}"
        else:
            self.upstream = (socket.AF_INET, ("127.0.0.1", parts.port or 6379))
            self.url = urlunsplit(parts._replace(netloc=f"127.0.0.1:{self.port}"))
        self.fired = threading.Event()
        self._trigger: tuple[re.Pattern[bytes], bool, float] | None = None
        self._down_until = 0.0
        self._down_seconds = 0.0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def cut_after(self, pattern: bytes, *, lose_reply: bool, down_seconds: float) -> None:
        """Once a command matching `pattern` has run: lose its reply (or deliver it), cut every connection and
        refuse new ones for `down_seconds`."""
        self._trigger = (re.compile(pattern), lose_reply, down_seconds)

    def down_for(self, seconds: float) -> None:
        """Cut every connection now and refuse new ones for `seconds`."""
        self._down_until = time.monotonic() + seconds
        self._cut()

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.listener.close()
        self._cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if time.monotonic() < self._down_until:
                client.close()
                continue
            upstream = socket.socket(self.upstream[0], socket.SOCK_STREAM)
            try:
                upstream.settimeout(5)
                upstream.connect(self.upstream[1])
            except OSError:
                upstream.close()
                client.close()
                continue
            upstream.settimeout(None)
            state = {"cut": False, "lose": False}
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, state), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, state: dict[str, bool]) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                trigger = self._trigger
                if trigger is not None and trigger[0].search(data):
                    self._trigger = None
                    state["lose"], state["cut"] = trigger[1], True
                    self._down_seconds = trigger[2]
                upstream.sendall(data)
        self._close(client, upstream)

    def _replies(self, upstream: socket.socket, client: socket.socket, state: dict[str, bool]) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if state["cut"]:  # the command ran: its reply is the first one back after it was sent
                    # Down and fired before the client can see anything: it may reconnect (or a test look) at once.
                    self._down_until = time.monotonic() + self._down_seconds
                    self.fired.set()
                    if not state["lose"]:
                        client.sendall(data)
                    self._cut()
                    return
                client.sendall(data)
        self._close(client, upstream)

    def _close(self, *sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        self._close(*sockets)
