"""HEAD on every GET route (api/head.py): GET's status and headers, no body, and a stream ended at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ApiServer, job_body, wait_for


def test_head_answers_every_get_route_as_get_would_without_a_body(server_factory: Callable[..., ApiServer],
                                                                   workspace: Path) -> None:  # fmt: skip
    # FastAPI gives GET routes no HEAD: uptime checks on /health and download tools probing the dashboard's
    # file links got 405 (hunt).
    server = server_factory(env={"STREAMS_PER_OWNER": "1", "DOWNLOADS_PER_OWNER": "1"})
    r = server.create(**job_body(workspace, "done", auto_start=True, training={"max_steps": 2}))
    assert r.status_code == 201, r.text
    job = server.wait_status("done", "completed")
    log = Path(job["run_dir"]) / "logging.jsonl"
    root = server.base.removesuffix("/api/v1/training")
    with httpx.Client(timeout=10) as http:
        for url in (f"{server.base}/health", f"{server.base}/jobs", f"{server.base}/jobs/done", f"{root}/ui/jobs",
                    f"{root}/ui/jobs/done", f"{root}/metrics"):  # fmt: skip
            head, get = http.head(url), http.get(url)
            assert head.status_code == get.status_code == 200 and head.content == b"", (url, head.status_code)
            assert head.headers["content-type"] == get.headers["content-type"], url
        file = f"{root}/ui/jobs/done/files/{Path(job['run_dir']).name}/logging.jsonl"
        head = http.head(file)
        assert head.status_code == 200 and head.content == b"", head.headers
        assert int(head.headers["content-length"]) == log.stat().st_size
        assert http.head(f"{root}/ui/jobs/done/files/no-such-file").status_code == 404
        # A stream answers its headers and ends, giving its slot back (one per owner here).
        head = http.head(f"{server.base}/jobs/done/events/stream")
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
        wait_for(lambda: http.get(f"{server.base}/jobs/done/events/stream").status_code == 200, timeout=10,
                 what="the stream's slot back after a HEAD")  # fmt: skip
        # A route without GET says so, as before; the API's download keeps its own HEAD (no slot, no read).
        stop = http.head(f"{server.base}/jobs/done/stop")
        assert stop.status_code == 405 and "POST" in stop.headers["allow"], stop.headers
        tar = http.head(f"{server.base}/jobs/done/artifacts/{Path(job['run_dir']).name}.tar")
        assert tar.status_code == 200 and "content-length" not in tar.headers
