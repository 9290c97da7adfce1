"""Without API keys the server answers its own host only: it listens on loopback (Settings.bind_host). A reverse
proxy on that host passes on requests from anywhere, so a request from elsewhere is refused here: one whose
client (uvicorn's, from a proxy in FORWARDED_ALLOW_IPS) is not this host, or that names any client but this host
in a forwarding header, whoever is trusted (a proxy that appends to X-Forwarded-For keeps what the client wrote
first, which is all uvicorn reads when every proxy is trusted: review BT). A proxy that sends no forwarding
header looks like this host: the README says to configure keys before adding one."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

from loguru import logger
from starlette.types import ASGIApp, Receive, Scope, Send

from application.api.body_limit import json_answer

_LOOPBACK = frozenset({"127.0.0.1", "::1"})  # (every request's, but through a proxy: no parse)
_FORWARDING = frozenset({b"x-forwarded-for", b"x-real-ip", b"forwarded"})


def is_loopback(address: str) -> bool:
    """Whether `address` (as a forwarding header writes it: a port, brackets, quotes) is this host's."""
    if address in _LOOPBACK:
        return True
    text = address.strip().strip('"')
    if text.startswith("["):  # [::1]:8080
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:  # 127.0.0.1:8080
        text = text.partition(":")[0]
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:  # "unknown", an obfuscated name: not known to be this host
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return parsed.is_loopback


def forwarded_clients(headers: Iterable[tuple[bytes, bytes]]) -> Iterator[str]:
    """Every client a request's forwarding headers name (X-Forwarded-For, X-Real-IP, Forwarded's for=)."""
    for name, value in headers:
        if name not in _FORWARDING:
            continue
        for part in value.decode("latin-1").split(","):
            if name != b"forwarded":
                yield part.strip()
                continue
            for pair in part.split(";"):
                key, _, given = pair.strip().partition("=")
                if key.strip().lower() == "for":
                    yield given.strip()


def _elsewhere(scope: Scope) -> str | None:
    """Where the request came from when that is not this host, else None."""
    client = scope.get("client")
    if client and client[0] not in _LOOPBACK:
        try:
            ipaddress.ip_address(str(client[0]))
        except ValueError:  # (a name, as test clients give: no network address)
            pass
        else:
            if not is_loopback(str(client[0])):
                return str(client[0])
    return next((c for c in forwarded_clients(scope.get("headers") or ()) if not is_loopback(c)), None)


class LocalOnly:
    """Installed only on a server without keys that ALLOW_UNAUTHENTICATED does not open."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (client := _elsewhere(scope)) is None:
            await self.app(scope, receive, send)
            return
        if not self.warned:
            self.warned = True
            logger.warning("a request from {} came through a proxy to this server without API keys, which answers "
                           "its own host only: refused (configure API_KEYS, or set ALLOW_UNAUTHENTICATED=true)",
                           client[:64])  # fmt: skip
        await json_answer(send, 403, f"this server has no API keys, so it answers its own host only, and this "
                                     f"request came from {client[:64]} through a proxy: its operator must configure "
                                     "API_KEYS (or set ALLOW_UNAUTHENTICATED=true to open it to everyone)")  # fmt: skip
