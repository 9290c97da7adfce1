"""A page of the job list, at an offset or after a cursor (index_pages), as the JSON the list answers."""

from __future__ import annotations

from application.models.training_model import JobStatus
from application.services.index_pages import Cursor
from application.services.job_store import JobStore


async def page_at(store: JobStore, status: JobStatus | None, owner: str | None, offset: int,
                  limit: int) -> tuple[int, str, Cursor | None]:  # fmt: skip
    """(total, a JSON array of JobSummary, the next page's cursor or None) for the page at `offset`, newest first."""
    total, ids, nxt = await store.page(status, owner, offset, limit)
    return total, await store.summaries_json(ids), nxt


async def page_after(store: JobStore, status: JobStatus | None, owner: str | None, cursor: Cursor,
                     limit: int) -> tuple[int, str, Cursor | None]:  # fmt: skip
    """As `page_at`, for the page after `cursor`."""
    total, ids, nxt = await store.page_after(status, owner, cursor, limit)
    return total, await store.summaries_json(ids), nxt
