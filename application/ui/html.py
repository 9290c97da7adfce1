"""HTML building blocks for the dashboard's server-rendered pages (no template engine is installed).

Everything that comes from a request, a job or the host (ids, paths, messages, names) goes through `esc`
before it reaches a page; helpers here return markup that is already safe to concatenate.
"""

from __future__ import annotations

import html
import math
import re
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse

from application.api.route_path import root_of

TEMPLATES = Path(__file__).resolve().parent / "templates"
NAV = (("jobs", "/ui/jobs", "Jobs"), ("queue", "/ui/queue", "Queue"), ("gpus", "/ui/gpus", "GPUs"),
       ("new", "/ui/new", "New job"))  # fmt: skip
# Pages show other people's jobs and paths: never cached, never framed. The CSP is a second line behind `esc`:
# scripts only from our /static (no inline script anywhere), fetches only to this origin. Inline style
# attributes stay allowed: the bars' widths are set with them.
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
}


# Bidi embedding, override and isolate controls: in a trainer's error or an event they reversed what the page
# shows after them ("(edoc_tixe)", an actor's name); shown as U+FFFD instead.
_BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")


def esc(value: Any) -> str:
    """Text for an element or a quoted attribute; None shows as an empty string."""
    return "" if value is None else html.escape(_BIDI_CONTROLS.sub("\ufffd", str(value)), quote=True)


@cache
def template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class PageContext:
    """What every page needs to know about where it is served and who looks at it."""

    root: str  # the app's root_path (behind a proxy at a sub-path)
    api: str  # root + API_PREFIX + /training: the JavaScript's base for API calls
    keys: bool  # API keys are configured: the browser must send one
    user: str | None  # the key's name (None: no keys)
    role: str

    @classmethod
    def of(cls, request: Request, user: str | None, role: str) -> PageContext:
        root = root_of(request.scope)
        prefix = request.app.state.settings.API_PREFIX
        return cls(root, f"{root}{prefix}/training", bool(request.app.state.keys.enabled), user, role)

    def url(self, path: str) -> str:
        return f"{self.root}{path}"


def page(ctx: PageContext, title: str, body: str, *, active: str = "", scripts: tuple[str, ...] = (),
         status_code: int = 200) -> HTMLResponse:  # fmt: skip
    """The whole document: nav, the page's body, and its scripts (dashboard.js first: the shared helpers)."""
    nav = "".join(
        f'<a href="{esc(ctx.url(href))}"{" aria-current=page" if key == active else ""}>{label}</a>'
        for key, href, label in NAV
    )
    if ctx.keys and ctx.user:
        who = (
            f'<form method="post" action="{esc(ctx.url("/ui/logout"))}" class="logout" data-logout>'
            f'<span>{esc(ctx.user)} ({esc(ctx.role)})</span> <button type="submit">Log out</button></form>'
        )
    else:
        who = '<span class="muted">no API keys configured</span>' if not ctx.keys else ""
    js = "".join(
        f'<script src="{esc(ctx.url("/static/" + name))}" defer></script>' for name in ("dashboard.js", *scripts)
    )
    doc = template("base.html").substitute(
        title=esc(title), root=esc(ctx.root), api=esc(ctx.api), keys="true" if ctx.keys else "false",
        nav=nav, who=who, body=body, scripts=js, static=esc(ctx.url("/static")),
    )  # fmt: skip
    return HTMLResponse(doc, status_code=status_code, headers=HEADERS)


# ---- formatting ---------------------------------------------------------------------------------------------


def when(ts: float | None) -> str:
    """A <time> element in UTC; dashboard.js rewrites it into the reader's local time."""
    if ts is None:
        return '<span class="muted">—</span>'
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    return f'<time datetime="{iso}">{time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))}</time>'


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    s = max(0, round(seconds))
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {s:02d}s" if m else f"{s}s"


def number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def size(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def bar(fraction: float | None, label: str, *, kind: str = "") -> str:
    """A horizontal bar with its label on it; readable without JavaScript or colours."""
    if fraction is None or not math.isfinite(fraction):
        return f'<div class="bar empty"><span class="label">{esc(label)}</span></div>'
    pct = min(100.0, max(0.0, fraction * 100))
    return (f'<div class="bar {esc(kind)}" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
            f'aria-valuenow="{pct:.0f}"><span class="fill" style="width:{pct:.1f}%"></span>'
            f'<span class="label">{esc(label)}</span></div>')  # fmt: skip


def badge(status: str | None) -> str:
    return f'<span class="badge s-{esc(status)}" data-status>{esc(status)}</span>'


def progress_cell(progress: dict[str, Any] | None) -> str:
    """step/total as a bar; the label says the step when the total is unknown."""
    p = progress or {}
    step, total = p.get("current_step"), p.get("max_steps")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        return bar(step / total, f"{step}/{total}")
    return bar(None, f"step {step}" if step is not None else "—")


def eta(progress: dict[str, Any] | None, status: str | None) -> str:
    if status != "running":
        return "—"
    p = progress or {}
    seconds = p.get("remaining_seconds")
    if isinstance(seconds, int | float):
        return esc(duration(float(seconds)))
    return esc(p.get("remaining_time") or "—")


def table(headers: list[str], rows: list[str], *, empty: str, attrs: str = "") -> str:
    head = "".join(f"<th scope=col>{esc(h)}</th>" for h in headers)
    body = "".join(rows) or f'<tr><td colspan="{len(headers)}" class="muted">{esc(empty)}</td></tr>'
    return f'<div class="table-scroll"><table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
