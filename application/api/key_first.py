"""With API keys configured, a request that carries a body is answered 401 before its body is read when its key is
missing or wrong. FastAPI reads a route's body before it solves the route's dependencies, the key's among them:
200 connections without a key, each sending a 1 MiB body and then waiting, took an API worker from 109 MB to 211 MB
(hunt BY). Routes without a body are left to the route's own check (its words are the same)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from application.api.body_limit import carries_body, json_answer
from application.api.route_path import route_path
from application.auth import KeyRing, presented_key
from application.exceptions import Unauthorized


class KeyFirst:
    def __init__(self, app: ASGIApp, api_root: str) -> None:
        self.app = app
        self.api_root = api_root.rstrip("/") + "/"  # (the API's routes: the dashboard's login takes a form)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # (cheapest first: a keyless server, and a GET, pass after an attribute and a header scan)
        if scope["type"] == "http" and (ring := _ring(scope)).enabled and carries_body(scope["headers"]):
            if route_path(scope).startswith(self.api_root):
                headers = Headers(scope=scope)  # (.get: the first of a header sent twice, as the route takes it)
                try:
                    ring.identify(presented_key(headers.get("authorization"), headers.get("x-api-key")))
                except Unauthorized as exc:
                    await json_answer(send, exc.status_code, exc.detail, exc.headers)
                    return
        await self.app(scope, receive, send)


def _ring(scope: Scope) -> KeyRing:
    ring: KeyRing = scope["app"].state.keys
    return ring
