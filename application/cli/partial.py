"""A download's partial file, written beside its target and renamed over it once whole. One the network cut short
is kept, named by the ETag of the file it holds the start of, so that the same command run again asks for the
rest only (Range, If-Range: a file changed since comes whole again); `swift-api download` of a merged model's
gigabytes started over at each cut."""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

import httpx

# The ETags kept in a file name: those of the server's files (hex mtime and size), or alike: no dot, so that
# `.NAME.partial-TAG` is never another target's partial file (`.a.partial-b.partial`, of `a.partial-b`).
_TAG = re.compile(r'^"([0-9A-Za-z_-]{1,80})"\Z')


@dataclass
class Partial:
    path: Path
    tag: str | None  # the ETag (without its quotes) of the file it holds the start of, when it can be resumed

    @property
    def offset(self) -> int:
        return self.path.stat().st_size if self.tag is not None and self.path.exists() else 0

    def headers(self) -> dict[str, str]:
        """What asks for the rest of the file (nothing: all of it)."""
        offset = self.offset
        return {"Range": f"bytes={offset}-", "If-Range": f'"{self.tag}"'} if offset else {}


def kept_or_new(target: Path) -> Partial:
    """The partial file of a download of `target` cut short before (the newest; others of it removed), else a new
    one. Only names `_named` would give are looked at: another target's file is never taken, nor removed."""
    prefix = f".{target.name}.partial-"
    found = [p for p in target.parent.glob(f"{glob.escape(prefix)}*") if _TAG.match(f'"{p.name[len(prefix) :]}"')]
    kept = sorted(found, key=_modified, reverse=True)
    for old in kept[1:]:
        old.unlink(missing_ok=True)
    if kept:
        return Partial(kept[0], kept[0].name[len(prefix) :])
    return Partial(target.with_name(f".{target.name}.partial"), None)


def for_response(partial: Partial, target: Path, response: httpx.Response) -> tuple[Partial, bool]:
    """Where this answer goes: appended to `partial` (True: it sends the rest), or a partial file from its start,
    named by its ETag where the server takes ranges (the file then resumable), the old one removed."""
    if response.status_code == 206 and partial.offset and \
            response.headers.get("content-range", "").startswith(f"bytes {partial.offset}-"):  # fmt: skip
        return partial, True
    partial.path.unlink(missing_ok=True)
    found = _TAG.match(response.headers.get("etag", ""))
    if found and response.headers.get("accept-ranges") == "bytes":
        return Partial(target.with_name(f".{target.name}.partial-{found.group(1)}"), found.group(1)), False
    return Partial(target.with_name(f".{target.name}.partial"), None), False


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
