"""The job page: what the server renders (facts, command, attempts, checkpoints, events), readable without
JavaScript; job.js then adds the live charts, the log and the actions, and keeps these sections current.
Elements job.js fills carry ids; keep the two in step."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from application.ui.html import (
    PageContext,
    badge,
    duration,
    esc,
    eta,
    number,
    progress_cell,
    size,
    table,
    when,
)

# Buttons in page order: (action, label, what the confirmation asks).
ACTIONS = (
    ("start", "Start", "Start job {id} now?"),
    ("stop", "Stop", "Stop job {id}? A running run is terminated; a waiting job is cancelled."),
    ("pause", "Pause", "Pause job {id}? Its GPUs go back; it resumes from its last checkpoint."),
    ("resume", "Resume", "Resume job {id} from its last checkpoint?"),
    ("export", "Export", "Merge the last LoRA checkpoint of {id} into the model?"),
    ("delete", "Delete", "Delete the record of job {id}? Its training output on disk stays."),
)


def _fact(label: str, value: str, key: str = "") -> str:
    attr = f' data-fact="{key}"' if key else ""
    return f"<dt>{esc(label)}</dt><dd{attr}>{value}</dd>"


def _facts(ctx: PageContext, job: dict[str, Any]) -> str:
    predicted = job.get("predicted_duration") or {}
    export = job.get("export") or {}
    gpus = ", ".join(f"#{i}" for i in job.get("gpu_ids") or []) or ("CPU" if job.get("num_gpus") == 0 else "—")
    items = [
        _fact("Owner", esc(job.get("owner") or "—")),
        _fact("Priority", esc(job.get("priority")), "priority"),
        _fact("GPUs", f"{esc(job.get('num_gpus'))} asked · {esc(gpus)}", "gpus"),
        _fact("Model", f"<code>{esc(job.get('model_path'))}</code>"),
        _fact("Data", f"<code>{esc(job.get('data_path'))}</code>"),
        _fact("Output", f"<code>{esc(job.get('output_dir'))}</code>"),
        _fact("Created", when(job.get("created_at"))),
        _fact("Started", when(job.get("started_at")), "started"),
        _fact("Finished", when(job.get("finished_at")), "finished"),
        _fact("Predicted run", esc(duration(predicted.get("seconds"))) + (
            f" <span class=muted>({esc(predicted.get('source'))})</span>" if predicted.get("source") else "")),
        _fact("Retries", f"{esc(job.get('retries', 0))} of {esc(job.get('max_retries', 0))}"),
        _fact("Export", esc(export.get("status") or "none") + (
            f" · <code>{esc(export.get('path'))}</code>" if export.get("path") else ""), "export"),
    ]  # fmt: skip
    return f'<dl class="facts">{"".join(items)}</dl>'


def _error(job: dict[str, Any]) -> str:
    message = job.get("error_message")
    hidden = "" if message else " hidden"
    code = f" ({job.get('error_code')})" if job.get("error_code") else ""
    return f'<p class="error" id="job-error" role="alert"{hidden}>{esc(message)}{esc(code) if message else ""}</p>'


def _actions(job: dict[str, Any]) -> str:
    # Disabled until job.js runs: without JavaScript there is nothing to send them with.
    buttons = "".join(
        f'<button type="button" data-action="{a}" data-confirm="{esc(q.format(id=job["job_id"]))}" disabled>'
        f"{esc(label)}</button>"
        for a, label, q in ACTIONS
    )
    priority = (
        f'<label class="inline">Priority <input type="number" id="priority-input" min="0" max="10" '
        f'value="{esc(job.get("priority"))}" disabled></label>'
        f'<button type="button" data-action="priority" data-confirm="Change the priority of {esc(job["job_id"])}?" '
        f"disabled>Set priority</button>"
    )
    return (
        f'<section class="actions card" id="actions">{buttons}<span class="sep"></span>{priority}'
        '<p id="action-result" role="status" class="small"></p>'
        "<noscript><p class=muted>The actions need JavaScript.</p></noscript></section>"
    )


def _code_or_dash(value: str | None) -> str:
    return f"<code>{esc(value)}</code>" if value else '<span class="muted">—</span>'


def attempts_table(job: dict[str, Any]) -> str:
    rows = [
        f"<tr><td class=num>{esc(a.get('number'))}</td><td>{when(a.get('started_at'))}</td>"
        f"<td>{when(a.get('finished_at'))}</td><td>{esc(a.get('outcome') or 'running')}</td>"
        f"<td>{esc(a.get('first_step') or 0)}–{esc(a.get('last_step') if a.get('last_step') is not None else '')}</td>"
        f"<td>{_code_or_dash(a.get('resumed_from'))}</td><td>{esc(a.get('error_message') or '')}</td></tr>"
        for a in job.get("attempts") or []
    ]
    headers = ["#", "Started", "Ended", "Outcome", "Steps", "Resumed from", "Error"]
    return table(headers, rows, empty="No run yet.", attrs='class="grid" id="attempts"')


def checkpoints_table(checkpoints: list[dict[str, Any]]) -> str:
    rows = []
    for c in checkpoints:
        marks = " ".join(m for m, on in (("resume", c.get("resume")), ("exported", c.get("exported")),
                                          ("incomplete", c.get("complete") is False)) if on)  # fmt: skip
        rows.append(
            f"<tr><td class=num>{esc(c.get('step'))}</td><td><code>{esc(c.get('path'))}</code></td>"
            f"<td>{when(c.get('time'))}</td><td>{number(c.get('loss'))}</td><td>{esc(size(c.get('size_bytes')))}</td>"
            f"<td>{esc(marks)}</td></tr>"
        )
    headers = ["Step", "Path", "Written", "Loss", "Size", ""]
    return table(headers, rows, empty="No checkpoint yet.", attrs='class="grid" id="checkpoints"')


FILES_SHOWN = 200


def files_table(ctx: PageContext, job_id: str, listing: dict[str, Any]) -> str:
    """What the job wrote, each a download link (served under /ui with the page's key): the folders as tar
    first (checkpoints, merged models, runs), then the files outside checkpoint folders (logs, plots, ...)."""
    base = ctx.url(f"/ui/jobs/{quote(job_id, safe='')}/files/")
    rows = [
        f'<tr><td><a href="{esc(base + quote(d["tar"]))}" download>{esc(d["tar"])}</a></td><td>{esc(d["kind"])}</td>'
        f"<td>{esc(size(d.get('size')))}</td></tr>"
        for d in listing.get("folders", [])
    ]
    loose = [f for f in listing.get("files", []) if f.get("kind") not in ("checkpoint", "merged")]
    rows += [
        f'<tr><td><a href="{esc(base + quote(f["path"]))}" download>{esc(f["path"])}</a></td><td>{esc(f["kind"])}</td>'
        f"<td>{esc(size(f.get('size')))}</td></tr>"
        for f in loose
    ]
    more = len(rows) - FILES_SHOWN
    note = f'<p class="muted small">and {more} more: GET .../artifacts lists them all.</p>' if more > 0 else ""
    return table(["File or folder", "Kind", "Size"], rows[:FILES_SHOWN], empty="Nothing written yet.",
                 attrs='class="grid" id="files"') + note  # fmt: skip


def events_list(events: list[dict[str, Any]]) -> str:
    items = "".join(
        f'<li data-event="{esc(e.get("id"))}">{when(e.get("time"))} <span class="ev-type">{esc(e.get("type"))}</span> '
        f'{esc(e.get("message"))} <span class="muted">{esc(e.get("actor") or "")}</span></li>'
        for e in events
    )
    return f'<ol class="events" id="events">{items}</ol>'


def job_body(ctx: PageContext, job: dict[str, Any], checkpoints: list[dict[str, Any]],
             events: list[dict[str, Any]], listing: dict[str, Any]) -> str:  # fmt: skip
    job_id = job["job_id"]
    status = job.get("status")
    progress = job.get("progress") or {}
    head = (
        f'<section class="job-head" id="job" data-job-id="{esc(job_id)}" data-status="{esc(status)}">'
        f'<div class="title-row"><h1>Job <code>{esc(job_id)}</code></h1>{badge(status)}</div>{_error(job)}'
        f'<div class="progress-row"><div id="job-progress">{progress_cell(progress)}</div>'
        f'<span>ETA <b id="job-eta">{eta(progress, status)}</b></span>'
        f'<span>loss <b id="job-loss">{number(progress.get("loss"))}</b></span></div>'
        f"{_facts(ctx, job)}</section>"
    )
    charts = (
        '<p id="charts-state" class="muted small" role="status"></p><section class="charts" id="charts">'
        + (
            "<figure><figcaption>Reward (<code>objective/rlhf_reward</code>)</figcaption>"
            '<div class="chart" id="chart-loss" data-series="reward"></div></figure>'
            if job.get("rlhf_type") == "ppo"  # (it logs no loss)
            else '<figure><figcaption>Loss and eval loss</figcaption><div class="chart" id="chart-loss"></div></figure>'
        )
        + '<figure><figcaption>Learning rate</figcaption><div class="chart" id="chart-lr"></div></figure>'
        '<figure><figcaption>Gradient norm</figcaption><div class="chart" id="chart-grad"></div></figure>'
        "<noscript><p class=muted>The charts need JavaScript.</p></noscript></section>"
    )
    log = (
        '<section class="card"><div class="title-row"><h2>Log</h2>'
        '<label class="inline"><input type="checkbox" id="log-follow" checked> follow</label>'
        '<span id="log-state" class="muted small"></span></div>'
        '<pre class="log" id="log" tabindex="0" aria-live="off"></pre>'
        "<noscript><p class=muted>The log needs JavaScript (or GET .../logs).</p></noscript></section>"
    )
    command = job.get("command_line") or ""
    details = (
        f'<section class="card"><h2>Command</h2><pre class="command" id="command">{esc(command) or "—"}</pre></section>'
        f'<section class="card"><h2>Attempts</h2><div id="attempts-box">{attempts_table(job)}</div></section>'
        f'<section class="card"><h2>Checkpoints</h2><div id="checkpoints-box">{checkpoints_table(checkpoints)}</div>'
        f'</section><section class="card"><h2>Files</h2><div id="files-box">{files_table(ctx, job_id, listing)}'
        "</div></section>"
        f'<section class="card"><h2>Events</h2>{events_list(events)}</section>'
    )
    return head + _actions(job) + charts + log + details


def missing_body(ctx: PageContext, job_id: str) -> str:
    return (
        f"<h1>Job not found</h1><p>No job <code>{esc(job_id)}</code> here (or it is not yours).</p>"
        f'<p><a href="{esc(ctx.url("/ui/jobs"))}">All jobs</a></p>'
    )
