"""How the API describes itself: tags that group the routes, and operation ids that make good client names."""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute

TAGS = [
    {"name": "jobs", "description": "Create, run, follow (including Server-Sent Events), pause and export jobs"},
    {"name": "files", "description": "Upload data sets (.jsonl, .json, .csv) and use their ids as a job's data_path"},
    {"name": "queue", "description": "The GPU queue: order, waits and why, the processor's switch"},
    {"name": "gpus", "description": "The GPUs the scheduler sees and which job holds each"},
    {"name": "system", "description": "Health, host status and metrics"},
]


def operation_id(route: APIRoute) -> str:
    """The route function's name (`create_job`, `get_job_progress`): stable, readable, unique in this API."""
    return route.name


# The unit of every time, duration and size in the answers, stated once here rather than on each model field.
UNITS = {
    "created_at": "Unix seconds", "updated_at": "Unix seconds", "queued_at": "Unix seconds",
    "started_at": "Unix seconds", "finished_at": "Unix seconds", "last_error_at": "Unix seconds",
    "last_pass_at": "Unix seconds", "process_start_time": "Unix seconds (the process's start)",
    "time": "Unix seconds", "since": "Unix seconds", "taken_at": "Unix seconds", "starts_at": "Unix seconds",
    "duration_seconds": "seconds", "waited_seconds": "seconds", "remaining_seconds": "seconds",
    "seconds": "seconds", "time_limit_seconds": "seconds", "poll_interval_seconds": "seconds",
    "gpu_reading_age_seconds": "seconds", "uptime_in_seconds": "seconds", "uptime_seconds": "seconds",
    "train_runtime": "seconds (swift's own measure of the training loop)", "last_pass_ms": "milliseconds",
    "latency_ms": "milliseconds", "elapsed_time": "time since the run started, as '1h 02m 03s'",
    "remaining_time": "swift's estimate of the time left, as '1h 02m 03s'",
    "memory_gib": "GiB (swift's reading on the device)", "min_gpu_memory_gb": "GB", "memory_free_gb": "GB",
    "memory_total_gb": "GB", "memory_used_gb": "GB", "memory_free_mb": "MiB", "memory_used_mb": "MiB",
    "used_memory_mb": "MiB", "size_bytes": "bytes", "percentage": "percent", "mean_utilization": "percent",
    "memory_utilization": "percent", "temperature_c": "degrees Celsius", "power_w": "watts",
    "power_limit_w": "watts", "bytes": "bytes",
}  # fmt: skip


def add_units(schema: dict[str, Any]) -> dict[str, Any]:
    """Give every listed property of the component schemas its unit (kept when a field already says more)."""
    for component in schema.get("components", {}).get("schemas", {}).values():
        for name, prop in component.get("properties", {}).items():
            unit = UNITS.get(name)
            if unit and "description" not in prop:
                prop["description"] = unit
            elif unit and unit.split(" ")[0] not in prop["description"]:
                prop["description"] = f"{prop['description']} ({unit})"
    return schema


def add_body_limit(schema: dict[str, Any], exempt: set[tuple[str, str]], description: str) -> dict[str, Any]:
    """List 413 on every operation the MAX_REQUEST_BYTES middleware covers, and 415 (a compressed body) on every
    one. It refuses such a body before any route sees it, whatever the method and whether the route reads a body,
    so a route's own `responses` would miss some (a body-less POST such as /start); `exempt` (method, path) pairs
    enforce a size limit of their own."""
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    answer = {"description": description, "content": content}
    compressed = {"description": "The body is compressed (Content-Encoding): send it uncompressed", "content": content}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.setdefault("415", compressed)
            if (method.upper(), path) not in exempt:
                responses.setdefault("413", answer)
    return schema
