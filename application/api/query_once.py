"""A query parameter given more than once is a 422: every parameter here takes one value, and the last one given
was used without a word (`?status=running&status=queued` listed the queued jobs alone, read as "either")."""

from __future__ import annotations

from collections import Counter
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from application.api.body_limit import json_answer


class QueryOnce:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if b"&" in query:
            counts = Counter(name for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True))
            repeated = [(name, n) for name, n in counts.items() if n > 1]
            if repeated:
                name, n = repeated[0]
                await json_answer(send, 422, f"query parameter '{name[:64]}' is given {n} times: give it once (each "
                                             "takes one value)")  # fmt: skip
                return
        await self.app(scope, receive, send)
