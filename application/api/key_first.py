"""With API keys configured, a request that carries a body is answered 401 before its body is read when its key is
missing or wrong. FastAPI reads a route's body before it solves the route's dependencies, the key's among them:
200 connections without a key, each sending a 1 MiB body and then waiting, took an API worker from 109 MB to 211 MB
(hunt BY). Routes without a body are left to the route's own check (its words are the same)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from application.api.body_limit import json_answer
from application.api.route_path import route_path
from application.auth import KeyRing, presented_key
from application.exceptions import Unauthorized

_NO_BODY = (b"0", b"")


class KeyFirst:
    def __init__(self, app: ASGIApp, api_root: str) -> None:
        self.app = app
        self.api_root = api_root.rstrip("/") + "/"  # (the API's routes: the dashboard's login takes a form)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope).startswith(self.api_root):
            ring: KeyRing = scope["app"].state.keys
            if ring.enabled and _has_body(scope["headers"]):
                try:
                    ring.identify(presented_key(_first(scope["headers"], b"authorization"),
                                                _first(scope["headers"], b"x-api-key")))  # fmt: skip
                except Unauthorized as exc:
                    await json_answer(send, exc.status_code, exc.detail, exc.headers)
                    return
        await self.app(scope, receive, send)


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name in (b"content-length", b"transfer-encoding") and value.strip() not in _NO_BODY
               for name, value in headers)  # fmt: skip


def _first(headers: list[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    # (the first, as the route takes it: a header sent twice is the route's 400 to give)
    return next((value.decode("latin-1") for name, value in headers if name == wanted), None)
