"""A page of the job list after a cursor: by creation time, not by rank.

Offsets count ranks, and a job deleted while a client walks the list by `next_offset` moves every later job down
a rank: one of them was never listed (hunt AR: 482 of 3,939 jobs nobody touched, while others were deleted). A
cursor names the last job listed, by its creation time and id, as the indexes are scored.
"""

from __future__ import annotations

import re

from application.exceptions import Invalid
from application.models.training_model import JobStatus
from application.services.job_store import JobStore

Cursor = tuple[float, str]  # (created_at, job_id) of the last job a page listed
CURSOR_PATTERN = r"^(-?[0-9]{1,20}(?:\.[0-9]{1,20})?(?:e[+-]?[0-9]{1,3})?)~([A-Za-z0-9_.-]{1,128})$"
_CURSOR = re.compile(CURSOR_PATTERN)


def cursor_text(cursor: Cursor) -> str:
    return f"{cursor[0]!r}~{cursor[1]}"


def parse_cursor(text: str) -> Cursor:
    m = _CURSOR.fullmatch(text)
    try:
        score = float(m.group(1)) if m else None
    except ValueError:
        score = None
    if m is None or score is None:
        raise Invalid("cursor: not one this server gave: pass a page's next_cursor as it came")
    return score, m.group(2)


async def page_at(store: JobStore, status: JobStatus | None, owner: str | None, offset: int,
                  limit: int) -> tuple[int, str, Cursor | None]:  # fmt: skip
    """As `page_after`, for the page at `offset`, whose ids come with their scores: the last one's is the next
    page's cursor (read apart, a job deleted between the reads left a page with more after it and no cursor)."""
    index = store.index_of(status, owner)
    async with store.r.pipeline(transaction=False) as pipe:
        pipe.zcard(index)
        pipe.zrevrange(index, offset, offset + limit - 1, withscores=True)
        total, scored = await pipe.execute()
    ids = [str(i) for i, _ in scored]
    more = offset + len(ids) < int(total)
    nxt = (float(scored[-1][1]), ids[-1]) if more and ids else None
    return int(total), await store.summaries_json(ids), nxt


async def page_after(store: JobStore, status: JobStatus | None, owner: str | None, cursor: Cursor,
                     limit: int) -> tuple[int, str, Cursor | None]:  # fmt: skip
    """(total, a JSON array of JobSummary, the next page's cursor or None) for the page after `cursor`, newest
    first."""
    index = store.index_of(status, owner)
    score = cursor[0]
    async with store.r.pipeline(transaction=False) as pipe:
        pipe.zcard(index)
        # Jobs created in the same instant as the cursor's come after it in reverse id order (ZREVRANGE's).
        pipe.zrangebyscore(index, repr(score), repr(score))
        pipe.zrevrangebyscore(index, f"({score!r}", "-inf", start=0, num=limit + 1, withscores=True)
        total, ties, older = await pipe.execute()
    found = [(str(i), score) for i in sorted(ties, reverse=True) if i < cursor[1]]
    found += [(str(i), float(sc)) for i, sc in older]
    more = len(found) > limit
    found = found[:limit]
    nxt = (found[-1][1], found[-1][0]) if more and found else None
    return int(total), await store.summaries_json([i for i, _ in found]), nxt
