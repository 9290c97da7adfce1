"""GET /metrics: Prometheus text that a Prometheus parser reads, with the jobs, queue, GPUs, scheduling latency,
running jobs and HTTP durations, summed across API worker processes."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, ALICE_KEY, KEYS_SETTING, ApiServer, auth, job_body, wait_for
from tests.test_gpu_pool import a100_80gb, snapshot


def scrape(server: ApiServer, key: str | None = None) -> dict[str, list[tuple[dict[str, str], float]]]:
    root = server.base.split("/api/v1")[0]
    r = httpx.get(f"{root}/metrics", headers=auth(key) if key else {}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return parsed(r.text)


def parsed(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return next(v for lab, v in metrics[name] if all(lab.get(k) == want for k, want in labels.items()))


def test_metrics_parse_and_describe_jobs_queue_gpus_and_requests(server_factory: Callable[..., ApiServer],
                                                                 workspace: Path) -> None:  # fmt: skip
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "API_WORKERS": "2"})
    http = httpx.Client(base_url=server.base, headers=auth(ADMIN_KEY), timeout=30)
    for name in ("m1", "m2"):
        r = http.post("/jobs", json=job_body(workspace, name, hang_after_steps=3, auto_start=True,
                                             training={"max_steps": 50, "logging_steps": 1}))  # fmt: skip
        assert r.status_code == 201 and r.json()["status"] == "running", r.text
    assert http.post("/jobs", json=job_body(workspace, "m3", auto_start=True)).json()["status"] == "queued"
    wait_for(lambda: all((http.get(f"/jobs/{n}").json()["progress"]["current_step"] or 0) >= 3 for n in ("m1", "m2")))
    for _ in range(20):  # requests spread over both workers
        http.get("/jobs")

    m = scrape(server, ADMIN_KEY)
    assert value(m, "swift_api_jobs", status="running") == 2 and value(m, "swift_api_jobs", status="queued") == 1
    assert value(m, "swift_api_queue_length") == 1 and value(m, "swift_api_queue_oldest_wait_seconds") >= 0
    held = {lab["job_id"] for lab, v in m["swift_api_gpu_held"] if v == 1}
    assert held == {"m1", "m2"}
    assert value(m, "swift_api_gpu_memory_total_bytes", gpu="0") == 80 * 1024**3
    assert value(m, "swift_api_job_step", job_id="m1") == 3 and value(m, "swift_api_job_max_steps", job_id="m1") == 50
    assert value(m, "swift_api_job_loss", job_id="m2") > 0
    assert value(m, "swift_api_scheduling_latency_seconds_count") >= 2
    assert value(m, "swift_api_scheduling_latency_seconds_bucket", le="+Inf") >= 2
    # Both workers' requests are counted, whichever worker answers the scrape.
    listed = value(m, "swift_api_http_request_duration_seconds_count", method="GET",
                   route="/jobs", status="2xx")  # fmt: skip
    assert listed >= 20
    again = scrape(server, ADMIN_KEY)
    assert value(again, "swift_api_http_request_duration_seconds_count", method="GET",
                 route="/jobs", status="2xx") == listed  # fmt: skip
    # Every metric the example Grafana dashboard charts exists.
    dashboard = (Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json").read_text()
    charted = set(re.findall(r"swift_api_[a-z_]+", dashboard))
    assert charted and charted <= set(m), charted - set(m)
    root = server.base.split("/api/v1")[0]
    assert httpx.get(f"{root}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{root}/metrics", headers=auth(ALICE_KEY), timeout=10).status_code == 403
    for name in ("m1", "m2", "m3"):
        http.post(f"/jobs/{name}/stop")
    http.close()


async def test_a_gpu_reading_no_scheduler_renews_is_not_exported_as_current(app_factory: Callable[..., Any]) -> None:
    # With every scheduler down, /metrics served the last reading's memory and utilization for ever, as if live.
    async with app_factory(scheduler=False) as client:
        cluster = client.app.state.training.cluster
        root = str(client.base_url).split("/api/v1")[0]

        async def scrape_here(age: float) -> dict[str, list[tuple[dict[str, str], float]]]:
            await cluster.put_gpu_snapshot(replace(snapshot(a100_80gb(0)), taken_at=time.time() - age).to_dict())
            r = await client.get(f"{root}/metrics")
            assert r.status_code == 200, r.text
            return parsed(r.text)

        fresh = await scrape_here(2)
        assert value(fresh, "swift_api_gpu_memory_total_bytes", gpu="0") > 0
        assert 2 <= value(fresh, "swift_api_gpu_reading_age_seconds") < 30
        stale = await scrape_here(120)
        assert "swift_api_gpu_memory_total_bytes" not in stale and "swift_api_gpu_utilization_percent" not in stale
        assert value(stale, "swift_api_gpu_reading_age_seconds") >= 120
        assert value(stale, "swift_api_gpu_held", gpu="0") == 0  # (leases are Redis's own, never stale)
