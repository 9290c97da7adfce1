"""A download's partial file, written beside its target and renamed over it once whole. One the network cut short
is kept, named by the ETag of the file it holds the start of, so that the same command run again asks for the
rest only (Range, If-Range: a file changed since comes whole again); `swift-api download` of a merged model's
gigabytes started over at each cut."""

from __future__ import annotations

import errno
import fcntl
import glob
import os
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


class NotTheRest(Exception):
    """A 206 whose range is not the rest of what was kept: no whole file, nor its end."""


class DownloadLock:
    """Held while a target is downloaded: a second download of it (another shell, a retry loop) raises
    BlockingIOError rather than writing the same partial file, which corrupted it (hunt CZ). The lock file,
    `.NAME.lock` beside the target, goes when the download ends."""

    def __init__(self, target: Path) -> None:
        self.path = target.with_name(f".{target.name}.lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in _NO_LOCKS:
                        raise
                    break  # (a filesystem with no locks, some FUSE and CIFS mounts: downloaded as before)
                if _same_file(fd, self.path):  # (not one the last holder removed as this one opened it)
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        self.fd = fd

    def release(self) -> None:
        self.path.unlink(missing_ok=True)  # (before the close: whoever locks it next opens a new one)
        os.close(self.fd)


_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def for_response(partial: Partial, target: Path, response: httpx.Response) -> tuple[Partial, bool]:
    """Where this answer goes: appended to `partial` (True: it sends the rest), or a partial file from its start,
    named by its ETag where the server takes ranges (the file then resumable), the old one removed."""
    if response.status_code == 206:
        if partial.offset and response.headers.get("content-range", "").startswith(f"bytes {partial.offset}-"):
            return partial, True
        # (saved as the whole file, it was a file short of its start: hunt CZ)
        partial.path.unlink(missing_ok=True)
        raise NotTheRest(response.headers.get("content-range", ""))
    partial.path.unlink(missing_ok=True)
    found = _TAG.match(response.headers.get("etag", ""))
    if found and response.headers.get("accept-ranges") == "bytes":
        return Partial(target.with_name(f".{target.name}.partial-{found.group(1)}"), found.group(1)), False
    return Partial(target.with_name(f".{target.name}.partial"), None), False


def expected_size(response: httpx.Response) -> int | None:
    """The whole file's bytes, as the answer gives them (Content-Range's total, else Content-Length where no
    encoding changes what is written), or None."""
    found = re.fullmatch(r"bytes \d+-\d+/(\d+)", response.headers.get("content-range", ""))
    if found:
        return int(found.group(1))
    length = response.headers.get("content-length", "")
    if response.status_code == 200 and length.isdigit() and "content-encoding" not in response.headers:
        return int(length)
    return None


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
