"""What every answer gets, whoever made it (a route, an error handler, a middleware's refusal, Starlette's 404 and
405); not the plain-text 500 of an unhandled error, which Starlette's outermost middleware writes.

- `X-Content-Type-Options: nosniff`: an error's JSON can quote what the request sent (a job id from the path), and
  a browser must not take it for a page. The dashboard's and the docs' pages set it themselves, with the rest of
  their policy.
- A redirect to this server is written as a path. Starlette's trailing-slash redirect (`/jobs/` to `/jobs`)
  writes the Host header the request sent into its Location: a forged Host sent a client, or a cache in front,
  to another server. A path takes the client back to the server it asked, behind a proxy or not.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import URL
from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")


class ResponseHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = _fixed(scope, int(message["status"]), list(message.get("headers", ())))
            await send(message)

        await self.app(scope, receive, sending)


def _fixed(scope: Scope, status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    sniff = True
    for i, (name, value) in enumerate(headers):
        low = name.lower()
        if low == b"x-content-type-options":
            sniff = False
        elif low == b"location" and 300 <= status < 400:
            headers[i] = (name, _relative(scope, value))
    if sniff:
        headers.append(NOSNIFF)
    return headers


def _relative(scope: Scope, location: bytes) -> bytes:
    """`location` as a path when it names this server as Starlette writes it for this request (from its Host
    header, else the server's address); any other address is left as it is."""
    url = urlsplit(location.decode("latin-1"))
    if not url.scheme or not url.netloc or url.netloc.lower() != (URL(scope=scope).netloc or "").lower():
        return location
    path = url.path or "/"
    # "//evil.example/x" as a path is another host to a browser: such a path keeps its absolute form.
    if path.startswith("//"):
        return location
    return (path + (f"?{url.query}" if url.query else "")).encode("latin-1")
