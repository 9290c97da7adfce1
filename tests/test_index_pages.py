"""Walking a list by cursor (index_pages) while entries are deleted and created: none skipped, none twice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from application.models.training_model import JobStatus
from tests.test_job_store import make_job


async def test_a_walk_by_cursor_lists_every_job_once_while_others_are_deleted_and_created(
    app_factory: Callable[..., Any],
) -> None:
    # By next_offset, 482 of 3,939 jobs nobody touched were never listed while others were deleted (hunt AR).
    async with app_factory(scheduler=False) as client:
        store = client.app.state.training.store
        # Five created in one instant, across page boundaries (the cursor must tell them apart by id), the rest a
        # second apart.
        times = [1000.0 + i for i in range(10)] + [1010.5] * 5 + [1020.0 + i for i in range(8)]
        ids = [f"j{i:02d}" for i in range(len(times))]
        for job_id, created in zip(ids, times, strict=True):
            await store.create(make_job(job_id, JobStatus.PENDING, created=created), message="", actor="t")
        seen: list[str] = []
        deleted: set[str] = set()
        page = (await client.get("/jobs", params={"limit": 2})).json()
        while True:
            seen += [j["job_id"] for j in page["jobs"]]
            # Between pages: an older job not listed yet goes, and a listed one, and a new one comes.
            for gone in (ids[len(ids) - len(seen) - 2], seen[0]):
                if gone not in deleted and gone not in seen[-1:]:
                    assert (await client.delete(f"/jobs/{gone}")).status_code == 204
                    deleted.add(gone)
            await store.create(make_job(f"new{len(seen)}", created=2000.0 + len(seen)), message="", actor="t")
            if page["next_cursor"] is None:
                break
            assert page["next_offset"] is None or page["offset"] == 0
            page = (await client.get("/jobs", params={"limit": 2, "cursor": page["next_cursor"]})).json()
        assert len(seen) == len(set(seen)), seen
        untouched = [i for i in ids if i not in deleted]
        assert [i for i in untouched if i not in seen] == [], (seen, deleted)
        tied = [i for i in seen if i in ids[10:15]]
        assert tied == sorted(tied, reverse=True)  # (one instant: newest first means highest id first)
        # An offset page gives the next page's cursor too, which leads where its next_offset does (nothing changed).
        by_offset = (await client.get("/jobs", params={"limit": 3, "offset": 3})).json()
        after = (await client.get("/jobs", params={"limit": 3, "cursor": by_offset["next_cursor"]})).json()
        again = (await client.get("/jobs", params={"limit": 3, "offset": by_offset["next_offset"]})).json()
        assert after["jobs"] == again["jobs"] and len(after["jobs"]) == 3
        # A cursor with an offset, or one this server did not give, is a 422 saying what to pass.
        r = await client.get("/jobs", params={"cursor": "1000.0~j01", "offset": 4})
        assert r.status_code == 422 and "give offset or cursor, not both" in r.json()["detail"]
        r = await client.get("/jobs", params={"cursor": "yesterday"})
        assert r.status_code == 422 and r.json()["detail"].startswith("query.cursor: "), r.text
