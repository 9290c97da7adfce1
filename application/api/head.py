"""HEAD on every GET route, as RFC 9110 asks of a general-purpose server: GET's answer without its body.

FastAPI gives a GET route no HEAD, so uptime checks on /health and download tools probing the dashboard's file
links got 405. A HEAD request runs as GET here; its body is dropped, and a streamed one (a log stream, a tar) is
ended after its first chunk, as for a client that hung up, not sent on into the void. A route with a HEAD of its own
(the API's artifact downloads: no slot taken, nothing read) answers itself.
"""

from __future__ import annotations

import asyncio
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from application.api.route_path import route_path


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._head_paths: list[re.Pattern[str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or self._has_head(scope):
            await self.app(scope, receive, send)
            return
        answered = asyncio.Event()
        started: list[bool] = []

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.append(True)
                await send(message)
            elif message["type"] == "http.response.body":
                answered.set()

        async def gone_once_answered() -> Message:
            # As if the client went once the headers were out: a stream stops (its generator is cancelled where
            # it waits, so it gives its slot back at once), as it does for a client that hangs up.
            if answered.is_set():
                return {"type": "http.disconnect"}
            message = asyncio.ensure_future(receive())
            done = asyncio.ensure_future(answered.wait())
            await asyncio.wait({message, done}, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            if message.done():
                return message.result()
            message.cancel()
            return {"type": "http.disconnect"}

        inner = {**scope, "method": "GET"}
        try:
            await self.app(inner, gone_once_answered, headers_only)
        finally:
            # The route the router matched, for the metrics around this (HEAD was counted as "unmatched": hunt CJ).
            if "route" in inner:
                scope["route"] = inner["route"]
        if started:  # (ended once the route is done: what it holds, a download's or a stream's slot, is back)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _has_head(self, scope: Scope) -> bool:
        # From the published schema, as main._allowed_methods: FastAPI builds an included router's routes on
        # its first request, so the app's route list does not show them (a HEAD route looked absent).
        if self._head_paths is None:
            app = scope.get("app")
            paths = app.openapi()["paths"] if app is not None and hasattr(app, "openapi") else {}
            self._head_paths = [re.compile(_pattern(t)) for t, ops in paths.items() if "head" in ops]
        path = route_path(scope)
        return any(p.match(path) for p in self._head_paths)


def _pattern(template: str) -> str:
    """A path template's regex: a parameter is one segment, the last one any rest (`{path:path}`)."""
    parts = re.split(r"(\{[^/]+?\})", template)
    last = len(parts) - 2
    body = "".join((".+" if i == last else "[^/]+") if i % 2 else re.escape(part) for i, part in enumerate(parts))
    return f"^{body}$"
