"""Prometheus metrics (GET /metrics), correct across several API worker processes and hosts.

Most metrics describe shared state, so they are read from Redis when scraped: jobs by status, the queue, the
GPUs as the scheduler last read them, the running jobs' step and loss, and the scheduling-latency histogram
the scheduler keeps in Redis (it starts runs on another process or host). Only the HTTP request durations
are per process: with several API workers they go through prometheus-client's multiprocess mode (start.py
points PROMETHEUS_MULTIPROC_DIR at a fresh folder before the workers start) and every worker's scrape
sums them all.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from application.services import clock
from application.services.cluster_store import STALE_READING_SECONDS, ClusterStore
from application.services.job_store import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Queue-wait buckets, in seconds: from an instant start to a day in the queue.
LATENCY_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Running jobs exposed per job: bounded so a scrape stays small on a large cluster.
MAX_RUNNING = 500


def multiprocess_dir() -> str | None:
    # Read from the environment, not Settings: prometheus-client itself reads this variable (start.py sets it).
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class HttpMetrics:
    """Request durations by route template (not the raw path: job ids would make a series per job)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.duration = Histogram(
            "swift_api_http_request_duration_seconds", "HTTP request duration by route", ["method", "route", "status"],
            buckets=HTTP_BUCKETS, registry=self.registry,
        )  # fmt: skip

    def collect(self) -> bytes:
        if multiprocess_dir():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (no response buffering, so streams stay streams): times each HTTP request."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.duration.labels(scope["method"], path, f"{status // 100}xx").observe(
                time.perf_counter() - started
            )


async def record_scheduling_latency(cluster: ClusterStore, seconds: float) -> None:
    """Called by the scheduler for each run it starts: the time the job waited in the queue."""
    await cluster.record_scheduling_latency(seconds, LATENCY_BUCKETS)


class _Snapshot:
    """A collector over values already read from Redis (collectors are synchronous)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


async def shared_metrics(store: JobStore, cluster: ClusterStore) -> bytes:
    state = await cluster.metrics_state(MAX_RUNNING)
    fams: list[Metric] = []
    jobs = GaugeMetricFamily("swift_api_jobs", "Jobs by status", labels=["status"])
    for s, n in state.counts.items():
        jobs.add_metric([s.value], float(n))
    fams.append(jobs)
    fams.append(GaugeMetricFamily("swift_api_queue_length", "Jobs waiting in the GPU queue",
                                  value=float(state.queue_length)))  # fmt: skip
    # (a quantized export is a job of its own: counted in swift_api_jobs)
    fams.append(GaugeMetricFamily("swift_api_exports_running", "Merge exports running or waiting to be launched",
                                  value=float(state.exporting)))  # fmt: skip
    wait = clock.now() - state.oldest_queued_at if state.oldest_queued_at is not None else 0.0
    fams.append(GaugeMetricFamily("swift_api_queue_oldest_wait_seconds", "How long the oldest queued job has waited",
                                  value=max(0.0, wait)))  # fmt: skip
    taken = float((state.snapshot or {}).get("taken_at") or 0.0)
    age = max(0.0, clock.now() - taken) if taken else None
    if age is not None:
        fams.append(GaugeMetricFamily("swift_api_gpu_reading_age_seconds", "How old the GPU reading is: a leading "
                                      "scheduler publishes one every few seconds", value=age))  # fmt: skip
    # A reading no scheduler renews is not exported as if current (/gpus and /health say how old it is).
    fams.extend(_gpu_families(state.snapshot, state.leases, stale=age is not None and age > STALE_READING_SECONDS))
    fams.append(_latency_family(state.latency))
    fams.extend(await _running_families(store, state.running))
    registry = CollectorRegistry()
    registry.register(_Snapshot(fams))
    return generate_latest(registry)


def _gpu_families(snapshot: Mapping[str, Any] | None, leases: Mapping[str, str], *, stale: bool) -> list[Metric]:
    labels = ["gpu", "name"]
    used = GaugeMetricFamily("swift_api_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
    total = GaugeMetricFamily("swift_api_gpu_memory_total_bytes", "GPU memory", labels=labels)
    util = GaugeMetricFamily("swift_api_gpu_utilization_percent", "GPU utilization", labels=labels)
    held = GaugeMetricFamily("swift_api_gpu_held", "1 when one of our jobs holds the GPU", labels=[*labels, "job_id"])
    for gpu in (snapshot or {}).get("gpus", []):
        idx, name = str(gpu.get("index")), str(gpu.get("name", ""))
        mib = 1024 * 1024
        if not stale:
            used.add_metric([idx, name], float(gpu.get("memory_used_mb") or 0) * mib)
            total.add_metric([idx, name], float(gpu.get("memory_total_mb") or 0) * mib)
            if gpu.get("utilization") is not None:
                util.add_metric([idx, name], float(gpu["utilization"]))
        job = leases.get(idx)
        held.add_metric([idx, name, job or ""], 1.0 if job else 0.0)
    return [used, total, util, held]


def _latency_family(raw: Mapping[str, str]) -> Metric:
    fam = HistogramMetricFamily("swift_api_scheduling_latency_seconds",
                                "Time from queued to started, per run the scheduler started")  # fmt: skip
    buckets = [(repr(float(b)), float(raw.get(repr(float(b)), 0))) for b in LATENCY_BUCKETS]
    buckets.append(("+Inf", float(raw.get("+Inf", 0))))
    fam.add_metric([], buckets, sum_value=float(raw.get("sum", 0)))
    return fam


async def _running_families(store: JobStore, running: list[str]) -> list[Metric]:
    step = GaugeMetricFamily("swift_api_job_step", "Current step of a running job", labels=["job_id"])
    max_steps = GaugeMetricFamily("swift_api_job_max_steps", "Total steps of a running job", labels=["job_id"])
    loss = GaugeMetricFamily("swift_api_job_loss", "Last logged training loss of a running job", labels=["job_id"])
    rows = await store.get_fields(running, ["progress"]) if running else []
    for job_id, (raw,) in zip(running, rows, strict=True):
        p = json.loads(raw) if raw else {}
        for fam, key in ((step, "current_step"), (max_steps, "max_steps"), (loss, "loss")):
            if p.get(key) is not None:
                fam.add_metric([job_id], float(p[key]))
    return [step, max_steps, loss]
