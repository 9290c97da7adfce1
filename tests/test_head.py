"""HEAD on every GET route (api/head.py): GET's status and headers, no body, and a stream ended at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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


async def test_head_on_downloads_leaves_no_file_open_and_the_apis_own_head_takes_no_slot(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # A HEAD run as GET ends its body before the first chunk: the file a download had opened was left to the
    # garbage collector (an unclosed-file warning; the suite's error), as for any client gone that soon.
    import gc

    from tests.conftest import make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(DOWNLOADS_PER_OWNER=1) as client:
        body = job_body(tmp_path, "d", auto_start=True, training={"max_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        job = await wait_job(client, "d", lambda j: j["status"] == "completed")
        run = Path(job["run_dir"]).name
        (Path(job["run_dir"]) / "big.bin").write_bytes(b"x" * (3 << 20))
        ui = f"http://test/ui/jobs/d/files/{run}"
        for _ in range(3):
            for url in (f"{ui}/logging.jsonl", f"{ui}/big.bin", f"{ui}.tar", f"/jobs/d/artifacts/{run}/big.bin"):
                r = await client.head(url)
                assert r.status_code == 200 and r.content == b"", (url, r.status_code)
            gc.collect()  # (an unclosed file would warn here)
        # The API's download has a HEAD of its own (nothing read, no slot); the dashboard's link is GET's.
        slot = await client.app.state.download_slots.take(None)
        try:
            assert (await client.head(f"/jobs/d/artifacts/{run}/big.bin")).status_code == 200
            assert (await client.head(f"{ui}/big.bin")).status_code == 429
        finally:
            await slot.release()


async def test_a_head_is_counted_under_its_route_in_the_request_metrics(app_factory: Callable[..., Any]) -> None:
    # Monitors probing with HEAD were counted as route="unmatched", with the 404s, and never under their routes.
    async with app_factory(scheduler=False) as client:
        for path in ("/health", "/jobs", "/jobs"):
            assert (await client.head(path)).status_code == 200, path
        assert (await client.head("/no-such-route")).status_code == 404
        metrics = (await client.get("http://test/metrics")).text
    counts = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("swift_api_http_request_duration_seconds_count{") and 'method="HEAD"' in line
    }
    assert counts == {
        'swift_api_http_request_duration_seconds_count{method="HEAD",route="/health",status="2xx"}': 1,
        'swift_api_http_request_duration_seconds_count{method="HEAD",route="/jobs",status="2xx"}': 2,
        'swift_api_http_request_duration_seconds_count{method="HEAD",route="unmatched",status="4xx"}': 1,
    }, counts
