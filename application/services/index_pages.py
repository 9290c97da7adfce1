"""Pages of a sorted-set index, newest first: at an offset, or after a cursor.

Offsets count ranks, and an entry deleted while a client walks the list by `next_offset` moves every later one
down a rank: one of them was never listed (hunt AR: 482 of 3,939 jobs nobody touched, while others were deleted; a
script deleting old uploads page by page skips every other page's first). A cursor names the last entry listed, by
its score (its creation time) and id, as the indexes are scored.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from application.exceptions import Invalid
from application.services import clock

Cursor = tuple[float, str]  # (score, id) of the last entry a page listed
CURSOR_PATTERN = r"^(-?[0-9]{1,20}(?:\.[0-9]{1,20})?(?:e[+-]?[0-9]{1,3})?)~([A-Za-z0-9_.-]{1,128})$"
CURSOR_HELP = "a page's next_cursor: the page after it, which entries deleted meanwhile do not shift (offsets do)"
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


def one_way(offset: int, cursor: str | None) -> Cursor | None:
    """The parsed cursor; refused beside an offset."""
    after = parse_cursor(cursor) if cursor is not None else None
    if after is not None and offset:
        raise Invalid("give offset or cursor, not both: a cursor names where its page starts")
    return after


async def ids_page(r: Redis, index: str, offset: int, limit: int,
                   after: Cursor | None) -> tuple[int, list[str], Cursor | None]:  # fmt: skip
    """(entries in all, the ids of the page at `offset` or `after` a cursor, the next page's cursor or None)."""
    return await (_ids_at(r, index, offset, limit) if after is None else _ids_after(r, index, after, limit))


async def _ids_at(r: Redis, index: str, offset: int, limit: int) -> tuple[int, list[str], Cursor | None]:
    # The ids come with their scores: the last one's is the cursor (read apart, an entry deleted between the
    # reads left a page with more after it and no cursor).
    async with r.pipeline(transaction=False) as pipe:
        pipe.zcard(index)
        pipe.zrevrange(index, offset, offset + limit - 1, withscores=True)
        total, scored = await pipe.execute()
    ids = [str(i) for i, _ in scored]
    more = offset + len(ids) < int(total)
    return int(total), ids, (float(scored[-1][1]), ids[-1]) if more and ids else None


async def _ids_after(r: Redis, index: str, cursor: Cursor, limit: int) -> tuple[int, list[str], Cursor | None]:
    score = cursor[0]
    async with r.pipeline(transaction=False) as pipe:
        pipe.zcard(index)
        # Entries of the cursor's own score come after it in reverse id order (ZREVRANGE's).
        pipe.zrangebyscore(index, repr(score), repr(score))
        pipe.zrevrangebyscore(index, f"({score!r}", "-inf", start=0, num=limit + 1, withscores=True)
        total, ties, older = await pipe.execute()
    found = [(str(i), score) for i in sorted(ties, reverse=True) if i < cursor[1]]
    found += [(str(i), float(sc)) for i, sc in older]
    more = len(found) > limit
    found = found[:limit]
    return int(total), [i for i, _ in found], (found[-1][1], found[-1][0]) if more and found else None


async def walk_by_score(
    r: Any, key: str, start: float | None = None, batch: int = 500
) -> AsyncIterator[tuple[list[str], float]]:
    """Every member of the index `key` scored from `start` on (every one when None), oldest first, a page at a time:
    (its ids, the page's last score). By score, not by rank: a member deleted meanwhile moved every later one down a
    rank, and one of them was skipped. Members of the boundary's score are read again, and passed over once seen."""
    after = "-inf" if start is None else repr(start)
    seen: set[str] = set()
    while rows := await r.zrangebyscore(key, after, "+inf", start=0, num=batch, withscores=True):
        fresh = [member for member, _ in rows if member not in seen]
        if not fresh:
            if len(rows) < batch:
                return
            batch *= 2  # (more members of one score than a batch: read more at once)
            continue
        after = repr(rows[-1][1])
        seen = {member for member, score in rows if repr(score) == after}
        yield fresh, rows[-1][1]


# A start's walks look at the jobs created since a day before the last one's mark: other hosts' clocks.
MARK_SLACK_SECONDS = 86_400.0


def walk_from(mark: str | None) -> float | None:
    """Where a start's walk begins: a day before `mark`; every job (None) when there is none, or when it lies more
    than that day past this moment (an older version let one job stamped by a clock ahead move it there: the jobs
    created since were never looked at, review EA; one less ahead, another host's clock, is covered by the day)."""
    if mark is None or float(mark) > clock.now() + MARK_SLACK_SECONDS:
        return None
    return float(mark) - MARK_SLACK_SECONDS


async def advance_mark(r: Any, key: str, mark: str | None, newest: float | None) -> None:
    """Keep at `key` the creation time of the newest job a start's walk looked at (`newest`), past `mark` (what the
    key held), never past this moment: one job stamped by a clock ahead moved it for good, and the jobs created after
    it were never looked at (review DY); a mark already past it is brought back (review EA)."""
    if newest is None:
        return
    newest = min(newest, clock.now())
    if mark is None or newest > float(mark) or float(mark) > clock.now():
        await r.set(key, repr(newest))
