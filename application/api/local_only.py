"""Without API keys the server answers its own host only: it listens on loopback (Settings.bind_host). A reverse
proxy on that host passes on requests from anywhere, so a request whose client is elsewhere is refused here. The
client is what uvicorn put in the scope: the proxy's X-Forwarded-For when the proxy is in FORWARDED_ALLOW_IPS
(a proxy that sends none looks like this host: the README says to configure keys before adding one)."""

from __future__ import annotations

import ipaddress

from loguru import logger
from starlette.types import ASGIApp, Receive, Scope, Send

from application.api.body_limit import json_answer

_LOOPBACK = frozenset({"127.0.0.1", "::1"})  # (every request's, but through a proxy: no parse)


def is_local(client: tuple[str, int] | list[object] | None) -> bool:
    """Whether a scope's client is this host: no address (a unix socket) or a loopback one."""
    if not client or client[0] in _LOOPBACK:
        return True
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:  # (a name, as test clients give)
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class LocalOnly:
    """Installed only on a server without keys that ALLOW_UNAUTHENTICATED does not open."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_local(scope.get("client")):
            await self.app(scope, receive, send)
            return
        client = str(scope["client"][0])
        if not self.warned:
            self.warned = True
            logger.warning("a request from {} came through a proxy to this server without API keys, which answers "
                           "its own host only: refused (configure API_KEYS, or set ALLOW_UNAUTHENTICATED=true)",
                           client)  # fmt: skip
        await json_answer(send, 403, f"this server has no API keys, so it answers its own host only, and this "
                                     f"request came from {client[:64]} through a proxy: its operator must configure "
                                     "API_KEYS (or set ALLOW_UNAUTHENTICATED=true to open it to everyone)")  # fmt: skip
