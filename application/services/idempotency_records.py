"""Idempotency-Key records in Redis (services/idempotency.py): a first request's claim, renewed while it works,
then its answer; each changed only by the request whose claim it still is.

`ClusterStore` extends this class (callers use it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class IdempotencyRecords:
    r: Any
    # The leader lock's scripts (the same compare, expire and delete) and CLAIM_ANSWER, registered by the store.
    _renew: Any
    _release: Any
    _claim_answer: Any

    async def claim_idempotency(self, key: str, claim: str, lease: float) -> dict[str, Any] | None:
        """Claim `key` for a first request with the record `claim` (its state running) for `lease` seconds (returns
        None), or return what an earlier request with it stored (None's stand-in when it lapsed meanwhile)."""
        if await self.r.set(key, claim, nx=True, px=int(lease * 1000)):
            return None
        raw = await self.r.get(key)
        return json.loads(raw) if raw else {**json.loads(claim), "state": "gone"}

    async def renew_idempotency(self, key: str, claim: str, lease: float) -> bool:
        """Extend the claim while it is still this one (the leader lock's script: the same compare and expire)."""
        return bool(await self._renew(keys=[key], args=[json.dumps({"value": claim, "ttl_ms": int(lease * 1000)})]))

    async def finish_idempotency(self, key: str, claim: str, status: int, body: str, ttl: int,
                                 headers: Mapping[str, str]) -> None:  # fmt: skip
        """The answer in place of `claim`, if the key is still claimed by it."""
        answer = json.dumps({"fingerprint": json.loads(claim)["fingerprint"], "state": "done", "status": status,
                             "body": body, "headers": dict(headers)})  # fmt: skip
        await self._claim_answer(keys=[key], args=[json.dumps({"value": claim, "answer": answer, "ttl_s": ttl})])

    async def release_idempotency(self, key: str, claim: str) -> None:
        """Free the key for a retry, if it is still claimed by `claim`."""
        await self._release(keys=[key], args=[json.dumps({"value": claim})])
