"""`Idempotency-Key` on creates and actions: a retry gets the first answer instead of doing it twice.

The first request with a key claims it in Redis (SET NX) for a short lease its worker renews while it works;
its answer is kept 24 h. Concurrent retries wait for that answer and return it; the same key with another
request is 409. Answers that a retry should not see again (429, 503, an unexpected failure) release the key
instead of being stored, except a change whose Redis reply was lost: it may have been made, so its 503 is the
key's answer (a retry would make it twice); a claim whose worker died (killed mid-request) lapses with its
lease, and a retry then runs the request. An answer is stored, or a key released, only by the worker that still
holds its claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from fastapi.responses import Response
from loguru import logger
from pydantic import BaseModel
from redis.exceptions import RedisError

from application.exceptions import ApiError, Conflict, Invalid, error_json
from application.services.cluster_store import ClusterStore
from application.services.heartbeat import beating
from application.services.job_store import Claim
from application.services.lost_replies import MaybeMade
from application.services.redis_service import REDIS_AWAY, lost_reply_detail, may_have_run

TTL_SECONDS = 24 * 3600
LEASE_SECONDS = 10.0
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}\Z")
WAIT_SECONDS = 30.0
REPLAY_HEADER = "Idempotent-Replayed"

Outcome = tuple[int, BaseModel, dict[str, str]]

# The claim of the request being handled, while its `call` runs: a create checks it still holds in the step that
# stores the job (a worker frozen past its lease, the job created meanwhile by a retry, created it again).
_HELD: ContextVar[Claim | None] = ContextVar("idempotency_claim", default=None)


def held_claim() -> Claim | None:
    return _HELD.get()


class ClaimLost(Conflict):
    """The request's claim no longer held when it would have made something: its answer is not the key's (the key
    is another request's, or free for the client's next try)."""


def claim_lost() -> ClaimLost:
    return ClaimLost(
        f"this request stalled past its Idempotency-Key's lease ({LEASE_SECONDS:g} s), so another request with the "
        "key may have been handled meanwhile: nothing was made by this one; send it again with the key to get that "
        "request's answer (or, if there was none, to make it now)"
    )


def fingerprint(method: str, path: str, body: bytes) -> str:
    # (A body is fingerprinted before any route reads it, also where the route takes none: JSON nested too deeply
    # to decode was a 500 on every action with a key, hunt CP; it counts as its bytes, as any body that is not JSON.)
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode() if body else b""
    except (ValueError, RecursionError):
        canonical = body
    return hashlib.sha256(method.encode() + b"\0" + path.encode() + b"\0" + canonical).hexdigest()


class Idempotency:
    def __init__(self, store: ClusterStore, lease: float = LEASE_SECONDS) -> None:
        self.store = store
        self.lease = lease

    async def run(
        self,
        owner: str | None,
        key: str | None,
        fingerprint_of: Callable[[], Awaitable[str]],
        call: Callable[[], Awaitable[Outcome]],
    ) -> Response:
        """`call`'s answer, or the answer of the first request with `key` (then `fingerprint_of` the request says
        whether it is the same request)."""
        if key is None:
            return _response(*await call())
        if not _KEY_RE.match(key):
            raise Invalid("Idempotency-Key must be 1-255 printable ASCII characters without spaces (e.g. a UUID)")
        print_ = await fingerprint_of()
        rkey = self.store.keys.idempotency(owner or "-", hashlib.sha256(key.encode()).hexdigest())
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            claim = json.dumps({"fingerprint": print_, "state": "running", "claim": uuid.uuid4().hex})
            record = await self.store.claim_idempotency(rkey, claim, self.lease)
            if record is None:
                return await self._first(rkey, claim, call)
            if record.get("fingerprint") != print_:
                raise Conflict("this Idempotency-Key was used for a different request: use a new key for a new request")
            if record.get("state") == "done":
                headers = {REPLAY_HEADER: "true", **record.get("headers", {})}
                return Response(record["body"], status_code=int(record["status"]), headers=headers,
                                media_type="application/json")  # fmt: skip
            if time.monotonic() >= deadline:
                raise Conflict("a request with this Idempotency-Key is still being handled: retry in a moment")
            await asyncio.sleep(0.05)

    async def _first(self, rkey: str, claim: str, call: Callable[[], Awaitable[Outcome]]) -> Response:
        try:
            # Renewed until the answer is stored (a renewal after it would cut its 24 h to a lease); ended by a
            # flag, not a cancellation redis-py may swallow (the claim was then renewed for ever).
            held = _HELD.set(Claim(rkey, claim))
            try:
                async with beating(lambda: self._renew(rkey, claim), self.lease / 3):
                    status, body, headers = await call()
            finally:
                _HELD.reset(held)
        except ApiError as exc:
            if isinstance(exc, ClaimLost):
                raise
            if exc.status_code in (429, 503):
                # Free for a retry, but not after a create that may have been made (Redis away: a retry would make
                # it again): that claim lapses with its lease. A release Redis does not take lapses too.
                if not isinstance(exc, MaybeMade):
                    with contextlib.suppress(RedisError):
                        await self.store.release_idempotency(rkey, claim)
                raise
            # As the error handler renders it (main._api_error), so that the replay is the same bytes.
            first = error_json({"detail": exc.detail}).decode()
            await self.store.finish_idempotency(rkey, claim, exc.status_code, first, TTL_SECONDS,
                                                exc.headers or {})  # fmt: skip
            raise
        except BaseException as exc:
            if isinstance(exc, Exception) and may_have_run(exc):
                # Its change may have been made (a reply Redis lost): a retry with the key gets this answer, not a
                # second run (an export ran twice). Should Redis not take it either, the claim lapses with its lease.
                answer = error_json({"detail": lost_reply_detail("POST", exc)}).decode()
                with contextlib.suppress(RedisError):  # (no Retry-After: the same key gets this answer for a day)
                    await self.store.finish_idempotency(rkey, claim, 503, answer, TTL_SECONDS, {})
                raise
            await asyncio.shield(self.store.release_idempotency(rkey, claim))
            raise
        response = _response(status, body, headers)
        try:
            await self.store.finish_idempotency(rkey, claim, status, bytes(response.body).decode(), TTL_SECONDS,
                                                headers)  # fmt: skip
        except REDIS_AWAY as exc:
            # Done all the same: answered, not a 503 for what was made (the claim lapses with its lease).
            logger.warning("the answer to Idempotency-Key {} was not kept ({}): a retry after {:g} s runs again",
                           rkey, exc, self.lease)  # fmt: skip
        return response

    async def _renew(self, rkey: str, claim: str) -> None:
        try:
            await self.store.renew_idempotency(rkey, claim, self.lease)
        except RedisError:
            pass  # the next renewal may get through before the lease is out


def _response(status: int, body: BaseModel, headers: dict[str, str]) -> Response:
    # Serialized by pydantic in one pass (not dumped to dicts and then through json.dumps).
    return Response(body.model_dump_json(), status_code=status, headers=headers or None, media_type="application/json")
