"""What the API answers, as rich tables and lines for people (`--json` bypasses all of this)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from application.cli.client import commands_named
from application.cli.output import printable

STATUS_STYLES = {
    "completed": "green",
    "running": "cyan",
    "queued": "yellow",
    "pending": "yellow",
    "paused": "magenta",
    "failed": "bold red",
    "stopped": "red",
    "cancelled": "dim",
}
ENDED = frozenset({"completed", "failed", "stopped", "cancelled"})


def text(value: Any, style: str = "") -> Text:
    # Text, never a str: job ids, paths and server messages may hold [brackets] that rich would read as markup;
    # and no control characters (an error message is a log line, which rich would pass on as it is).
    return Text("" if value is None else printable(str(value)), style=style)


def status(value: str | None) -> Text:
    return text(value, STATUS_STYLES.get(value or "", ""))


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(max(0.0, seconds)), 60)  # (a server's clocks may disagree by a little)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def steps(progress: dict[str, Any]) -> str:
    current, total = progress.get("current_step"), progress.get("max_steps")
    if current is None:
        return ""
    pct = progress.get("percentage")
    return f"{current}/{total or '?'}" + (f" ({pct:.0f}%)" if pct is not None else "")


def gpus(job: dict[str, Any]) -> str:
    """The GPUs a running job holds ("gpu 0", "gpus 0,1"), else how many it asks for ("2 gpus", "cpu"): a bare
    count read like a GPU's index, a bare index like a count (hunt CN), and a job that ended no longer holds the
    GPUs its record names."""
    ids = job.get("gpu_ids") or []
    if ids and job.get("status") == "running":
        return ("gpus " if len(ids) > 1 else "gpu ") + ",".join(map(str, ids))
    n = int(job.get("num_gpus") or 0)
    return "cpu" if n == 0 else f"{n} gpu" + ("s" if n > 1 else "")


def estimate(job: dict[str, Any]) -> str:
    """A job that has yet to end: how long its run should take (and from what), e.g. '~1:30:00 time_limit'."""
    predicted = job.get("predicted_duration") or {}
    if job.get("status") in ENDED or predicted.get("seconds") is None:
        return ""
    return f"~{duration(predicted['seconds'])} {predicted.get('source') or ''}".rstrip()


def _table(*columns: str, whole: str) -> Table:
    """A table whose `whole` column folds onto more lines rather than end in an ellipsis: the job id is what every
    other command takes (an 80-column terminal showed 'qwen2.5…'), and a column held at its width squeezed the
    others out of sight (review AX)."""
    table = Table(box=None, header_style="bold")
    for name in columns:
        table.add_column(name, overflow="fold" if name == whole else "ellipsis")
    return table


def jobs(body: dict[str, Any], again: list[str] | None = None) -> RenderableType:
    table = _table("JOB", "STATUS", "PRI", "GPUS", "STEP", "LOSS", "EST", "CREATED", "MODEL", whole="JOB")
    for job in body.get("jobs", []):
        progress = job.get("progress") or {}
        table.add_row(text(job["job_id"]), status(job["status"]), text(job.get("priority")), text(gpus(job)),
                      text(steps(progress)), text(number(progress.get("loss"))), text(estimate(job)),
                      text(when(job.get("created_at"))), text(job.get("model_path")))  # fmt: skip
    shown = len(body.get("jobs", []))
    more = f"; the next page: {' '.join([*(again or ['ls']), '--after', body['next_cursor']])}" if \
        body.get("next_cursor") else ""  # fmt: skip
    footer = text(f"{shown} of {body.get('total', shown)} jobs{more}", "dim")
    return Group(table, footer) if shown else footer


def _wait(body: dict[str, Any]) -> str:
    estimate = body.get("estimated_wait_time") or {}
    reason = body.get("pending_reason") or {}
    parts = [f"position {body['queue_position']}" if body.get("queue_position") else "",
             f"starts in {estimate['text']}" if estimate.get("text") else "", reason.get("message") or ""]  # fmt: skip
    return "; ".join(p for p in parts if p)


def _limit(body: dict[str, Any]) -> str | None:
    """The run's time limit, and while it runs the time left before it stops the run (swift's eta may be later:
    hunt DK)."""
    limit = body.get("time_limit_seconds")
    if not limit:
        return None
    left = body.get("time_limit_left_seconds")  # (the server's clock: this host's may be off by minutes)
    if body["status"] != "running" or left is None:
        return duration(limit)
    return f"{duration(limit)} ({duration(left)} left)"


def job_status(body: dict[str, Any]) -> RenderableType:
    progress = body.get("progress") or {}
    export = body.get("export") or {}
    rows: list[tuple[str, Any]] = [
        ("job", text(body["job_id"], "bold")),
        ("status", status(body["status"])),
        ("priority", body.get("priority")),
        ("gpus", gpus(body)),
        ("queue", _wait(body)),
        ("step", steps(progress)),
        ("loss", number(progress.get("loss"))),
        (
            "eta",
            (progress.get("remaining_time") or duration(progress.get("remaining_seconds")))
            if body["status"] == "running"
            else None,
        ),
        ("time limit", _limit(body)),
        ("created", when(body.get("created_at"))),
        ("started", when(body.get("started_at"))),
        ("finished", when(body.get("finished_at"))),
        ("duration", duration(body.get("duration_seconds"))),
        ("error", text(body.get("error_message"), "red")),
        ("export", " ".join(str(v) for v in (export.get("status"), export.get("path")) if v and v != "none")),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in rows:
        cell = value if isinstance(value, Text) else text(value)
        if cell.plain:
            grid.add_row(name, cell)
    return grid


def action(body: dict[str, Any]) -> RenderableType:
    """The answer to create/stop/pause/resume/export: what happened, and where the job now stands."""
    # (a route the message names with the command that calls it, as refusals have it)
    said = commands_named(body["message"]) if isinstance(body.get("message"), str) else body.get("message")
    line = Text.assemble(text(body["job_id"], "bold"), " ", status(body["status"]), ": ", text(said))
    # The message already names the checkpoint a pause or resume goes back to, and the steps lost.
    wait = _wait(body)
    return Group(line, text(wait, "dim")) if wait else line


def queue(body: dict[str, Any], offset: int = 0, limit: int = 100) -> RenderableType:
    table = _table("#", "JOB", "OWNER", "PRI", "GPUS", "WAITED", "ESTIMATE", "REASON", whole="JOB")
    for e in body.get("entries", []):
        reason = (e.get("pending_reason") or {}).get("code")
        table.add_row(text(e["position"]), text(e["job_id"]), text(e.get("owner")), text(e["priority"]),
                      text(e["num_gpus"]), text(duration(e.get("waited_seconds"))),
                      text((e.get("estimated_wait_time") or {}).get("text")), text(reason))  # fmt: skip
    s = body.get("summary") or {}
    summary = text(f"{s.get('length', 0)} queued · {s.get('running_jobs', 0)} running · "
                   f"{s.get('free_gpus', 0)}/{s.get('total_gpus', 0)} GPUs free · policy {s.get('policy')}"
                   + ("" if s.get("processor_running", True) else " · processor stopped")
                   + (f" · {s['starts_held']}" if s.get("starts_held") else ""), "dim")  # fmt: skip
    entries = body.get("entries") or []
    after = offset + len(entries)
    if entries and (offset or after < s.get("length", 0)):  # (a page of a longer queue: which, and how to go on)
        shown = f" --limit {limit}" if limit != 100 else ""
        more = f"; the next page: queue{shown} --offset {after}" if after < s.get("length", 0) else ""
        return Group(table, summary, text(f"positions {offset + 1}-{after}{more}", "dim"))
    return Group(table, summary) if entries else summary


def gpu_list(body: dict[str, Any]) -> RenderableType:
    table = Table("GPU", "NAME", "MEMORY (MiB)", "UTIL", "TEMP", "JOB", box=None, header_style="bold")
    for g in body.get("gpus", []):
        util = g.get("utilization")
        temp = g.get("temperature_c")
        memory = "unreadable" if g.get("error") else f"{g['memory_used_mb']:.0f}/{g['memory_total_mb']:.0f}"
        table.add_row(text(g["index"]), text(g["name"]), text(memory),
                      text("" if util is None else f"{util:.0f}%"), text("" if temp is None else f"{temp:.0f}°C"),
                      text(g.get("job_id")))  # fmt: skip
    error = body.get("error")
    footer = text(f"backend {body.get('backend')}" + (f" · error: {error}" if error else ""), "dim")
    return Group(table, footer)


def priority(body: dict[str, Any]) -> RenderableType:
    return Text.assemble(text(body["job_id"], "bold"), " ", status(body["status"]), f": priority {body['priority']}")
