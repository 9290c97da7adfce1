"""Refuse request bodies larger than MAX_REQUEST_BYTES before reading them whole (413), and compressed ones (415).

`exempt` (method, path) pairs are routes that stream their bodies and enforce a limit of their own while reading
(uploads).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from application.api.route_path import route_path


class BodyTooLarge(HTTPException):
    """An HTTPException, so that a route reading the body (FastAPI turns any other error there into a 400)
    answers 413 too: a body without Content-Length (chunked) is only found too large while it is read."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than {max_bytes} bytes (MAX_REQUEST_BYTES)")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, exempt: Iterable[tuple[str, str]] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"", b"identity"):
            # (read as it came, a gzipped body was "not JSON this server can read ('utf-8' codec ...)")
            await json_answer(send, 415, f"the request body is compressed (Content-Encoding: "
                                     f"{encoding.decode('latin-1')[:32]}): send it uncompressed")  # fmt: skip
            return
        if (scope["method"], route_path(scope)) in self.exempt:  # (the upload, not every method of its path)
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        if declared is None and b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            # Read now: a route that never reads its body (start, stop, delete) was otherwise run, whatever it was
            # sent. At most MAX_REQUEST_BYTES are held, then handed to the route as they came.
            held: list[Message] = []
            size = 0
            while True:
                message = await receive()
                held.append(message)
                if message["type"] != "http.request":
                    break
                size += len(message.get("body", b""))
                if size > self.max_bytes:
                    await self._refuse(send)
                    return
                if not message.get("more_body"):
                    break
            outer = receive

            async def replay() -> Message:
                return held.pop(0) if held else await outer()

            receive = replay
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await json_answer(send, 413, f"the request body is larger than {self.max_bytes} bytes (MAX_REQUEST_BYTES)")


def carries_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's headers (lower-cased names, as uvicorn gives them) announce a body: a Content-Length
    other than 0, or a Transfer-Encoding."""
    return any(name in (b"content-length", b"transfer-encoding") and value.strip() not in (b"0", b"")
               for name, value in headers)  # fmt: skip


async def json_answer(send: Send, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail})
    more = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *more],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})
