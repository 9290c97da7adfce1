"""Following a job until it ends: `watch` (a live progress bar) and `logs -f`. Both exit 0 when the job completed
and 1 when it ended any other way (failed, stopped, cancelled, deleted); a pause or a preemption is said, and
followed on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from rich.progress import BarColumn, Progress, TaskID, TextColumn

from application.cli import render
from application.cli.client import EXIT_JOB_FAILED, EXIT_OK, Api, job_path
from application.cli.output import Output, printable
from application.cli.sse import Message, follow

# Off a terminal (a CI log, a file) the bar draws nothing until the end: a plain line at most this often instead.
PLAIN_EVERY_SECONDS = 10.0


def exit_for(status: str | None) -> int:
    return EXIT_OK if status == "completed" else EXIT_JOB_FAILED


class _Status:
    """What a stream's `event: status` says, for people: any status but running, then running again once one was
    said (a paused job showed "running" for as long as it stayed paused, hunt CZ)."""

    def __init__(self, job_id: str, start: str | None = None) -> None:
        self.job_id = job_id
        self.last = start
        self.ran = start not in (None, "pending", "queued")  # (queued again, or for the first time)

    def worth(self, message: Message) -> str | None:
        """The message's status, when it is one worth saying; None otherwise."""
        status = str(message.json().get("status"))
        worth = status != self.last and (status != "running" or self.last is not None)
        self.last = status
        self.ran = self.ran or status not in ("pending", "queued")
        return status if worth else None

    def text(self, status: str) -> str:
        if status == "paused":
            return f"{self.job_id} paused: still followed; it goes on once resumed (`swift-api resume {self.job_id}`)"
        if status == "queued" and self.ran:
            return f"{self.job_id} queued: back in the queue, it goes on when it starts again"
        if status == "queued":
            return f"{self.job_id} queued: it is followed once it starts"
        return f"{self.job_id} {status}"


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
    if not out.console.is_terminal:
        end = _plain(job_id, start, stream, out)
    else:
        end = _bar(job_id, start, stream, out)
    final = end.get("status")
    if final in ("failed", "stopped"):
        error = api.get(job_path(job_id, "/status")).get("error_message")
        if error:
            out.note(error, style="red")
    return exit_for(final)


def _plain(job_id: str, start: dict[str, Any], stream: Iterator[Message], out: Output) -> dict[str, Any]:
    """One line per PLAIN_EVERY_SECONDS, and the last: in a CI log `watch` showed nothing until the job ended
    (hunt CN)."""

    said_last = ""

    def line(status: str, progress: dict[str, Any]) -> None:
        current, total = progress.get("current_step"), progress.get("max_steps")
        steps = f" {current}/{total or '?'}" if current is not None else ""
        eta = progress.get("remaining_time") or render.duration(progress.get("remaining_seconds"))
        loss = render.number(progress.get("loss"))
        text = f"{job_id} {status}{steps}" + (f" loss {loss}" if loss else "") + (f" ETA {eta}" if eta else "")
        say(text)

    def say(text: str) -> None:
        nonlocal said_last
        if text != said_last:  # (a job that had ended: its start and its end said the same, twice)
            out.line(text)
            said_last = text

    line(start["status"], start.get("progress") or {})
    said = time.monotonic()
    shown = _Status(job_id, start["status"])
    for message in stream:
        if message.event == "rewind":
            continue
        if message.event == "status":
            if now := shown.worth(message):
                say(shown.text(now))
            continue
        body = message.json()
        progress = body.get("progress") or {}
        if message.end:
            line(str(body.get("status")), progress)
            return dict(body)
        if time.monotonic() - said >= PLAIN_EVERY_SECONDS:
            line(shown.last or "running", {**progress, "loss": body.get("loss", progress.get("loss"))})
            said = time.monotonic()
    return {}


def _bar(job_id: str, start: dict[str, Any], stream: Iterator[Message], out: Output) -> dict[str, Any]:
    # markup=False, and fields printable(): they hold text of the run's log (a '[/x]' broke rich's markup, an
    # escape sequence drove the terminal).
    columns = (TextColumn("{task.description}", markup=False), BarColumn(),
               TextColumn("{task.fields[steps]}", markup=False), TextColumn("loss {task.fields[loss]}", markup=False),
               TextColumn("ETA {task.fields[eta]}", markup=False))  # fmt: skip
    end: dict[str, Any] = {}
    with Progress(*columns, console=out.console) as bar:
        task = bar.add_task(f"{job_id} {start['status']}", total=None, steps="", loss="", eta="")
        _update(bar, task, start.get("progress") or {})
        shown = _Status(job_id, start["status"])
        for message in stream:
            if message.event == "rewind":
                continue  # the bar shows the newest step only
            if message.event == "status":
                if now := shown.worth(message):
                    bar.update(task, description=f"{job_id} {now}")
                    if now in ("paused", "queued"):
                        bar.console.print(printable(shown.text(now)), style="dim", markup=False)
                continue
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
    return end


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
    shown = _Status(job_id)
    for message in follow(api, job_path(job_id, "/logs/stream"), {"kind": kind}):
        if message.end:
            end = message.json()
        elif message.event == "status":
            if out.json:
                out.emit({"event": "status", **message.json()})
            elif now := shown.worth(message):
                out.note(f"-- {shown.text(now)}")
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
