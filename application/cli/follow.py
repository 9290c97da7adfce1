"""Following a job until it ends: `watch` (a live progress bar) and `logs -f`. Both exit 0 when the job completed
and 1 when it ended any other way (failed, stopped, cancelled, deleted)."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, Progress, TaskID, TextColumn

from application.cli import render
from application.cli.client import EXIT_JOB_FAILED, EXIT_OK, Api, job_path
from application.cli.output import Output, printable
from application.cli.sse import follow


def exit_for(status: str | None) -> int:
    return EXIT_OK if status == "completed" else EXIT_JOB_FAILED


def watch(api: Api, job_id: str, out: Output) -> int:
    # Asked first: a 404 is then a plain usage error, and the bar starts from where the job stands.
    start = api.get(job_path(job_id, "/status"))
    stream = follow(api, job_path(job_id, "/progress/stream"))
    end: dict[str, Any] = {}
    if out.json:
        for message in stream:
            body = message.json()
            # (a rewind: the points after its step are logged again by a resumed run, and replace those sent)
            out.emit({"event": message.event, **body} if message.event else body)
            end = body if message.end else end
        return exit_for(end.get("status"))
    # markup=False, and fields printable(): they hold text of the run's log (a '[/x]' broke rich's markup, an
    # escape sequence drove the terminal).
    columns = (TextColumn("{task.description}", markup=False), BarColumn(),
               TextColumn("{task.fields[steps]}", markup=False), TextColumn("loss {task.fields[loss]}", markup=False),
               TextColumn("ETA {task.fields[eta]}", markup=False))  # fmt: skip
    with Progress(*columns, console=out.console) as bar:
        task = bar.add_task(f"{job_id} {start['status']}", total=None, steps="", loss="", eta="")
        _update(bar, task, start.get("progress") or {})
        for message in stream:
            if message.event == "rewind":
                continue  # the bar shows the newest step only
            body = message.json()
            progress = body.get("progress") or {}
            if message.end:
                end = body
                bar.update(task, description=f"{job_id} {body.get('status')}")
            else:
                # The point's own loss is this step's; an evaluation point has none, so keep the run's last.
                progress = {**progress, "loss": body.get("loss", progress.get("loss"))}
                bar.update(task, description=f"{job_id} running")
            _update(bar, task, progress)
    final = end.get("status")
    if final in ("failed", "stopped"):
        error = api.get(job_path(job_id, "/status")).get("error_message")
        if error:
            out.note(error, style="red")
    return exit_for(final)


def _update(bar: Progress, task: TaskID, progress: dict[str, Any]) -> None:
    current, total = progress.get("current_step"), progress.get("max_steps")
    if current is None:
        return
    eta = progress.get("remaining_time") or render.duration(progress.get("remaining_seconds"))
    bar.update(task, completed=current, total=total, steps=printable(f"{current}/{total or '?'}"),
               loss=printable(render.number(progress.get("loss")) or "-"), eta=printable(str(eta or "-")))  # fmt: skip


def tail(api: Api, job_id: str, kind: str, out: Output) -> int:
    """`logs -f`: the log from its start, then each line as swift writes it, until the job (or export) ends."""
    end: dict[str, Any] = {}
    for message in follow(api, job_path(job_id, "/logs/stream"), {"kind": kind}):
        if message.end:
            end = message.json()
        elif out.json:
            out.emit({"id": message.id, "line": message.data})
        else:
            out.line(message.data)
    status = end.get("status")
    if out.json:
        out.emit({"event": "end", **end})
    else:
        out.note(f"-- {job_id}: {'export ' if kind == 'export' else ''}{status}")
    return exit_for(status)
