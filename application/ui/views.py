"""The server-rendered lists: jobs, the GPU queue and the GPUs. Pure functions of what the services return,
so each page reads without JavaScript; dashboard.js only re-fetches a page and swaps its `data-refresh` part."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any
from urllib.parse import quote, urlencode

from application.models.training_model import JobStatus
from application.ui.html import PageContext, badge, bar, duration, esc, eta, number, progress_cell, table, when

REFRESH_MS = 3000
ERROR_SHOWN = 300  # characters of a job's error shown in its row of the jobs list


def job_link(ctx: PageContext, job_id: str | None) -> str:
    if not job_id:
        return '<span class="muted">—</span>'
    return f'<a href="{esc(ctx.url("/ui/jobs/" + quote(job_id, safe="")))}"><code>{esc(job_id)}</code></a>'


def job_ref(ctx: PageContext, job_id: str | None, own: Collection[str]) -> str:
    """A link to the job when the reader may open it; another owner's job is named, not linked (a 404)."""
    return job_link(ctx, job_id) if not job_id or job_id in own else f"<code>{esc(job_id)}</code>"


def short_path(value: str | None, keep: int = 2) -> str:
    """The last components of a long path: in a list, the file or folder names say more than the roots."""
    if not value or len(value) <= 40:
        return value or ""
    parts = value.rstrip("/").split("/")
    return "…/" + "/".join(parts[-keep:]) if len(parts) > keep + 1 else value


def path_cell(value: str | None) -> str:
    # The full path in a title; CSS cuts what is still too long to the cell's width.
    return f'<td class="path" title="{esc(value)}">{esc(short_path(value))}</td>'


def live(section_id: str, inner: str) -> str:
    return f'<section id="{section_id}" data-refresh="{REFRESH_MS}">{inner}</section>'


# ---- jobs ---------------------------------------------------------------------------------------------------


def _gpus(job: dict[str, Any]) -> str:
    ids = job.get("gpu_ids") or []
    asked = job.get("num_gpus")
    if ids:
        return f"{esc(asked)} <span class=muted>(#{esc(', #'.join(str(i) for i in ids))})</span>"
    return "CPU" if asked == 0 else esc(asked)


def _job_row(ctx: PageContext, job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    status = job.get("status")
    error = job.get("error_message")
    # An excerpt: a failed run's whole message (4,000 characters) made its row thousands of pixels tall and buried
    # everyone else's jobs; the job's page and the title show all of it.
    shown = f"{error[:ERROR_SHOWN]}…" if error and len(error) > ERROR_SHOWN else error
    err = f'<div class="error small" title="{esc(error)}">{esc(shown)}</div>' if error else ""
    return (
        f'<tr data-job="{esc(job.get("job_id"))}"><td>{job_link(ctx, job.get("job_id"))}</td>'
        f"<td>{badge(status)}{err}</td><td>{esc(job.get('owner') or '—')}</td><td>{esc(job.get('priority'))}</td>"
        f"<td>{_gpus(job)}</td>{path_cell(job.get('model_path'))}{path_cell(job.get('data_path'))}"
        f"<td>{progress_cell(progress)}</td><td>{eta(progress, status)}</td><td>{number(progress.get('loss'))}</td>"
        f"<td>{when(job.get('created_at'))}</td></tr>"
    )


def _filters(ctx: PageContext, status: str | None, owner: str | None, admin: bool) -> str:
    options = "".join(
        f'<option value="{s.value}"{" selected" if s.value == status else ""}>{s.value}</option>' for s in JobStatus
    )
    owner_field = (
        f'<label>Owner <input name="owner" value="{esc(owner)}" pattern="[A-Za-z0-9_.\\-]{{1,64}}" size="12"></label>'
        if admin
        else ""
    )
    return (
        f'<form method="get" action="{esc(ctx.url("/ui/jobs"))}" class="filters">'
        f'<label>Status <select name="status"><option value="">any</option>{options}</select></label>'
        f'{owner_field}<button type="submit">Filter</button> <a href="{esc(ctx.url("/ui/jobs"))}">clear</a></form>'
    )


def _pager(ctx: PageContext, path: str, params: dict[str, str], *, offset: int, limit: int, total: int, shown: int,
           next_offset: int | None, words: tuple[str, str] = ("newer", "older")) -> str:  # fmt: skip
    links = []
    if offset > 0:  # (from past the end: the last page that has rows, not the empty one before it)
        prev = urlencode({**params, "offset": max(0, min(offset, total) - limit), "limit": limit})
        links.append(f'<a href="{esc(ctx.url(f"{path}?{prev}"))}" rel="prev">← {words[0]}</a>')
    if next_offset is not None:
        nxt = urlencode({**params, "offset": next_offset, "limit": limit})
        links.append(f'<a href="{esc(ctx.url(f"{path}?{nxt}"))}" rel="next">{words[1]} →</a>')
    counted = f"{offset + 1}–{offset + shown} of {total}" if shown else f"0 of {total}"
    return f'<p class="pager">{esc(counted)} {" ".join(links)}</p>'


def jobs_body(ctx: PageContext, listing: dict[str, Any], status: str | None, owner: str | None, admin: bool,
              error: str = "") -> str:  # fmt: skip
    params = {k: v for k, v in (("status", status), ("owner", owner)) if v}
    headers = ["Job", "Status", "Owner", "Priority", "GPUs", "Model", "Data", "Progress", "ETA", "Loss", "Created"]
    rows = [_job_row(ctx, j) for j in listing["jobs"]]
    notice = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    grid = table(headers, rows, empty="No jobs match.", attrs='class="grid jobs"')
    return (
        f'<div class="title-row"><h1>Jobs</h1><a class="button push" href="{esc(ctx.url("/ui/new"))}">New job</a></div>'
        f"{_filters(ctx, status, owner, admin)}{notice}"
        + live(
            "jobs-live",
            grid
            + _pager(
                ctx,
                "/ui/jobs",
                params,
                offset=listing["offset"],
                limit=listing["limit"],
                total=listing["total"],
                shown=len(listing["jobs"]),
                next_offset=listing.get("next_offset"),
            ),
        )
    )


# ---- queue --------------------------------------------------------------------------------------------------


def _reason(ctx: PageContext, reason: dict[str, Any] | None, own: Collection[str]) -> str:
    if not reason:
        return '<span class="muted">starts at the next pass</span>'
    # (a reservation's job is the one the GPUs are held for; a preemption's, the run that makes way: its message
    # names it already)
    held = f" (for {job_ref(ctx, reason['job_id'], own)})" if reason.get("job_id") and reason.get("code") == \
        "reservation" else ""  # fmt: skip
    return f'<span class="reason r-{esc(reason.get("code"))}">{esc(reason.get("message"))}</span>{held}'


def _queue_row(ctx: PageContext, e: dict[str, Any], own: Collection[str]) -> str:
    wait = e.get("estimated_wait_time") or {}
    job = job_link(ctx, e["job_id"]) if e.get("mine") else f"<code>{esc(e['job_id'])}</code>"
    ids = e.get("gpu_ids")
    gpus = esc(e.get("num_gpus")) + (f" <span class=muted>(#{esc(', #'.join(map(str, ids)))})</span>" if ids else "")
    return (
        f'<tr data-job="{esc(e["job_id"])}"><td class="num">{esc(e["position"])}</td><td>{job}</td>'
        f"<td>{esc(e.get('owner') or '—')}</td><td>{esc(e.get('priority'))}</td><td>{gpus}</td>"
        f"<td>{esc(duration(e.get('waited_seconds')))}</td>"
        f"<td>{esc(wait.get('text') or 'unknown')}</td>"
        f"<td>{esc(duration(e.get('predicted_duration_seconds')))}</td>"
        f"<td>{_reason(ctx, e.get('pending_reason'), own)}</td></tr>"
    )


def queue_body(ctx: PageContext, overview: dict[str, Any], own: Collection[str]) -> str:
    s = overview["summary"]
    facts = [
        f"{s['length']} queued",
        f"{s['free_gpus']} of {s['total_gpus']} GPUs free",
        f"{s['running_jobs']} running",
        f"policy {s['policy']}",
        "processor running" if s["processor_running"] else "processor stopped",
    ]
    summary = " · ".join(esc(f) for f in facts)
    gpu_error = f'<p class="error">{esc(s["gpu_error"])}</p>' if s.get("gpu_error") else ""
    if s.get("starts_held"):  # (the GPUs look free, and nothing starts: why)
        gpu_error += f'<p class="error">{esc(s["starts_held"])}</p>'
    headers = ["#", "Job", "Owner", "Priority", "GPUs", "Waited", "Estimated wait", "Predicted run", "Why it waits"]
    rows = [_queue_row(ctx, e, own) for e in overview["entries"]]
    grid = table(headers, rows, empty="The queue is empty.", attrs='class="grid queue"')
    # (a queue longer than a page showed its first 100 with nothing to say there were more)
    offset, limit, length = s["offset"], s["limit"], s["length"]
    more = offset + limit if offset + limit < length else None
    pager = _pager(ctx, "/ui/queue", {}, offset=offset, limit=limit, total=length, shown=len(rows), next_offset=more,
                   words=("ahead", "behind"))  # fmt: skip
    return "<h1>GPU queue</h1>" + live("queue-live", f'<p class="summary">{summary}</p>{gpu_error}{grid}{pager}')


# ---- GPUs ---------------------------------------------------------------------------------------------------


def _gpu_row(ctx: PageContext, g: dict[str, Any], own: Collection[str]) -> str:
    total, used = g.get("memory_total_mb") or 0.0, g.get("memory_used_mb") or 0.0
    memory = bar(used / total if total else None, f"{used / 1024:.1f} / {total / 1024:.1f} GiB", kind="mem")
    if g.get("error"):  # its figures are not a reading (counted as busy meanwhile)
        memory = f'<span class="error">unreadable</span><div class="muted small">{esc(g["error"])}</div>'
    util = g.get("utilization")
    utilization = bar(util / 100 if util is not None else None, f"{util:.0f} %" if util is not None else "—")
    procs = "".join(
        f"<li>{esc(p.get('pid'))} {esc(p.get('name') or '')} "
        f"<span class=muted>{esc(number(p.get('used_memory_mb'), 6))} MiB</span></li>"
        for p in g.get("processes") or []
    )
    temp = f"{g['temperature_c']:.0f} °C" if g.get("temperature_c") is not None else "—"
    power = f"{g['power_w']:.0f} W" if g.get("power_w") is not None else "—"
    return (
        f'<tr data-gpu="{esc(g.get("index"))}"><td class="num">{esc(g.get("index"))}</td>'
        f'<td>{esc(g.get("name"))}<div class="muted small">{esc(g.get("uuid"))}</div></td>'
        f"<td>{memory}</td><td>{utilization}</td><td>{esc(temp)}</td><td>{esc(power)}</td>"
        f"<td>{job_ref(ctx, g.get('job_id'), own)}</td><td><ul class=plain>{procs}</ul></td></tr>"
    )


def gpus_body(ctx: PageContext, reading: dict[str, Any], own: Collection[str]) -> str:
    s = reading["summary"]
    mean = f"mean utilization {s['mean_utilization']} %" if s.get("mean_utilization") is not None else ""
    facts = [f"{s['count']} GPUs ({reading['backend']})",
             f"{s['memory_used_gb']} / {s['memory_total_gb']} GiB used", mean,
             f"driver {reading['driver_version']}" if reading.get("driver_version") else ""]  # fmt: skip
    taken = f" · read {when(reading['taken_at'])}" if reading.get("taken_at") else ""
    summary = " · ".join(esc(f) for f in facts if f) + taken
    error = f'<p class="error">{esc(reading["error"])}</p>' if reading.get("error") else ""
    headers = ["#", "GPU", "Memory", "Utilization", "Temp.", "Power", "Held by", "Processes"]
    rows = [_gpu_row(ctx, g, own) for g in reading["gpus"]]
    grid = table(headers, rows, empty="No GPUs.", attrs='class="grid gpus"')
    missing = "".join(f"<li>GPU {esc(m['index'])}: held by {job_ref(ctx, m['job_id'], own)}</li>"
                      for m in reading.get("missing") or [])  # fmt: skip
    if missing:
        missing = ('<p class="error">Held by a job but not in the reading (removed, or hidden since the job '
                   f'started); free again when that job ends:</p><ul id="gpus-missing">{missing}</ul>')  # fmt: skip
    return "<h1>GPUs</h1>" + live("gpus-live", f'<p class="summary">{summary}</p>{error}{grid}{missing}')
