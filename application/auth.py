"""API keys: who is calling, and what they may touch.

Keys come from API_KEYS / API_KEYS_FILE (see config). Only their SHA-256 digests stay in memory, and a
presented key is compared against every one of them in constant time, so neither the comparison nor an
early exit tells an attacker how close a guess was. With no keys configured every caller is the
anonymous admin (the server then binds to loopback only, see Settings).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from application.exceptions import Forbidden, Unauthorized
from application.key_list import MAX_KEY_CHARS, ApiKeyEntry

ADMIN = "admin"
USER = "user"


@dataclass(frozen=True)
class Caller:
    """The key's owner. `name` is what jobs record as their owner (None: no keys are configured)."""

    name: str | None
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def actor(self) -> str:
        """Who caused an event, as the event log shows it."""
        return self.name or "anonymous"

    def owns(self, owner: str | None) -> bool:
        return self.is_admin or (self.name is not None and owner == self.name)

    def require_admin(self, what: str) -> None:
        if not self.is_admin:
            raise Forbidden(f"{what} needs an admin key; the key '{self.name}' is a user key")


ANONYMOUS = Caller(None, ADMIN)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    def __init__(self, entries: Iterable[ApiKeyEntry]) -> None:
        self._entries = [(_digest(e.key), Caller(e.name, e.role)) for e in entries]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def identify(self, presented: str | None) -> Caller:
        if not self._entries:
            return ANONYMOUS
        if not presented:
            raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        # Bounded (a 60 KB header is not hashed whole), and one character past the longest key: cut to the longest,
        # a key with anything appended was taken.
        digest = _digest(presented[: MAX_KEY_CHARS + 1])
        found: Caller | None = None
        for known, caller in self._entries:  # no early exit: every key costs the same
            if hmac.compare_digest(known, digest):
                found = caller
        if found is None:
            raise Unauthorized("the API key is not valid: check it, or ask an admin for one")
        return found


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key:
        return x_api_key.strip()
    return None
