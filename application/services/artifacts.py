"""A job's output folder over HTTP: what it holds, one file (with Range), one folder as a tar stream.

Hostile paths: the text is checked before any filesystem call (no `..`, `.` or empty parts, no absolute path,
no control or invisible characters, the bounds of path_sandbox.check_text). It is then resolved (symlinks
followed) and must land inside the job's output folder, and what it names is opened one component at a time
with O_NOFOLLOW, so a symlink swapped in after the check cannot lead out either. Every refusal is the same
NotFound as a missing file: no answer tells what lies outside the folder, or whether it exists.

The disk work is synchronous; `listing` and `download` run it in a worker thread.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from application.exceptions import Invalid, NotFound, RangeNotSatisfiable
from application.models.artifact_model import (
    ArtifactFile,
    ArtifactFolder,
    ArtifactLink,
    ArtifactList,
    FileKind,
    FolderKind,
)
from application.models.training_model import Job
from application.services import clock
from application.services.artifact_tar import (
    CHUNK,
    DIR_FLAGS,
    FILE_FLAGS,
    PATH_FLAGS,
    OwnedFd,
    link_inside,
    real_path,
    tar_chunks,
    walk,
)
from application.services.path_sandbox import check_text, output_folder

# One listing looks at this many entries at most: a folder of millions of files costs one bounded walk.
MAX_ENTRIES = 5000

_RUN_RE = re.compile(r"^v\d+-\d{8}-\d{6}\Z")
_CHECKPOINT_RE = re.compile(r"^checkpoint-\d+\Z")
_MERGED_RE = re.compile(r"^checkpoint-\d+-merged\Z")
# One table, not `mimetypes`: that one reads /etc/mime.types, so its answers differ from machine to machine.
MEDIA_TYPES = {
    ".json": "application/json",
    ".png": "image/png",
    ".tar": "application/x-tar",
    ".md": "text/markdown; charset=utf-8",
    ".jsonl": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".jinja": "text/plain; charset=utf-8",
}
DEFAULT_MEDIA_TYPE = "application/octet-stream"
TAR_MEDIA_TYPE = "application/x-tar"


def not_found(job_id: str) -> NotFound:
    # The path is not echoed: the answer for `../../etc/passwd` is word for word the one for a missing file.
    return NotFound(
        f"no such file or folder in the output of job '{job_id}': list them with GET .../jobs/{job_id}/artifacts"
    )


@dataclass
class Download:
    """What a download answers: status, headers and a body read lazily in chunks (sync: run in a thread)."""

    status: int
    media_type: str
    body: Iterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)


# ---- paths ------------------------------------------------------------------------------------------------


def _parts(text: str) -> list[str] | None:
    """The components of a requested relative path, or None when no filesystem call should ever see it."""
    try:
        check_text("path", text)
    except Invalid:
        return None
    parts = text.split("/")
    if any(p in ("", ".", "..") for p in parts):  # also refuses "/abs" (a leading empty part) and "a//b"
        return None
    return parts


def job_folder(job: Job, output_root: Path) -> Path | None:
    """The job's output folder, resolved; None when it is missing, (moved) outside OUTPUT_ROOT, or leads to
    another folder than the one resolved at its create (a link made since: to another owner's folder)."""
    return output_folder(Path(job.output_dir), output_root)[0]


def open_folder(base: Path) -> int:
    """An fd of the folder `base` (a resolved path), opened one component at a time from `/` without following
    any link: a link swapped in on its way since it was resolved (and checked) is ELOOP or ENOTDIR, not followed
    to another owner's folder."""
    parts = base.parts[1:]
    # (O_PATH on the way: a folder above may be one its user can pass through, not read)
    fd = os.open("/", PATH_FLAGS if parts else DIR_FLAGS)
    try:
        for i, part in enumerate(parts):
            child = os.open(part, DIR_FLAGS if i == len(parts) - 1 else PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_inside(base: Path, parts: list[str]) -> tuple[int, os.stat_result] | None:
    """Open base/parts (already free of symlinks) without following any link: (fd, fstat), or None."""
    try:
        fd = open_folder(base)
    except OSError:
        return None
    try:
        for i, part in enumerate(parts):
            child = os.open(part, FILE_FLAGS if i == len(parts) - 1 else DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        os.close(fd)
        return None
    return fd, st


def resolve(base: Path, text: str) -> tuple[int, os.stat_result, Path] | None:
    """(fd, fstat, real path) of what `text` names inside `base`, symlinks inside followed; None for anything
    missing, outside, or not a plain file or folder."""
    parts = _parts(text)
    if parts is None:
        return None
    real = real_path(base.joinpath(*parts))  # (bounded, and no exception for a link swapped while it is read)
    if real is None or real == base:
        return None
    if base not in real.parents:
        return None
    opened = _open_inside(base, list(real.relative_to(base).parts))
    return (*opened, real) if opened else None


# ---- listing ----------------------------------------------------------------------------------------------


def _listable(name: str) -> bool:
    # Names a download could not ask for (control characters, bytes that are not UTF-8) are left out.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return _parts(name) is not None


def _named_export(folders: list[str]) -> bool:
    """exports/<name>: an export asked for by name (`output_name`); exports/.<name>.job is its GPU job's."""
    return len(folders) >= 2 and folders[0] == "exports" and not folders[1].startswith(".")


def file_kind(parts: list[str]) -> FileKind:
    folders, name = parts[:-1], parts[-1]
    if _named_export(folders):
        return "merged"
    for folder in folders:
        if _MERGED_RE.match(folder):
            return "merged"
        if _CHECKPOINT_RE.match(folder):
            return "checkpoint"
    if "runs" in folders or name.startswith("events.out.tfevents."):
        return "tensorboard"
    if "images" in folders and name.endswith(".png"):
        return "image"
    if name == "logging.jsonl":
        return "logging"
    if name == "args.json":
        return "args"
    if folders[:1] == ["logs"] or name.endswith(".log"):
        return "log"
    return "other"


def folder_kind(parts: list[str]) -> FolderKind | None:
    name = parts[-1]
    if _MERGED_RE.match(name) or (len(parts) == 2 and _named_export(parts)):
        return "merged"
    if _CHECKPOINT_RE.match(name):
        return "checkpoint"
    if len(parts) == 1 and _RUN_RE.match(name):
        return "run"
    return None


def _run_of(parts: list[str]) -> str | None:
    return parts[0] if len(parts) > 1 and _RUN_RE.match(parts[0]) else None


def list_artifacts(job: Job, output_root: Path) -> ArtifactList:
    """Blocking: the walk of the job's output folder, at most MAX_ENTRIES entries."""
    files: list[ArtifactFile] = []
    folders: dict[str, ArtifactFolder] = {}
    links: list[ArtifactLink] = []
    truncated = False
    base, not_read = output_folder(Path(job.output_dir), output_root)  # (job_folder's, said why)
    try:
        fd = open_folder(base) if base else None
    except OSError:
        base = fd = None
    try:
        for seen, (rel, name, parent_fd, st) in enumerate(walk(fd) if fd is not None else iter(())):
            if seen >= MAX_ENTRIES:
                truncated = True
                break
            parts = rel.split("/")
            # (the whole path as a download asks for it: a tree may be deeper than a request's path may be long)
            if not _listable(f"{rel}.tar" if stat.S_ISDIR(st.st_mode) else rel):
                continue
            if stat.S_ISREG(st.st_mode):
                files.append(ArtifactFile(path=rel, size=st.st_size, mtime=clock.from_local(st.st_mtime),
                                          kind=file_kind(parts), run=_run_of(parts)))  # fmt: skip
            elif stat.S_ISDIR(st.st_mode) and (kind := folder_kind(parts)):
                folders[rel] = ArtifactFolder(path=rel, kind=kind, run=parts[0] if _RUN_RE.match(parts[0]) else None,
                                              tar=f"{rel}.tar", size=0)  # fmt: skip
            elif stat.S_ISLNK(st.st_mode) and base is not None:
                target = link_inside(base, rel, name, parent_fd)
                if target is not None:
                    links.append(ArtifactLink(path=rel, target=target))
    except OSError:
        pass  # the folder went away mid-walk: what was seen so far
    finally:
        if fd is not None:
            os.close(fd)
    for f in files:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            if (folder := folders.get("/".join(parts[:i]))) is not None:
                folder.size += f.size
    files.sort(key=lambda f: f.path)
    return ArtifactList(job_id=job.job_id, files=files, folders=sorted(folders.values(), key=lambda f: f.path),
                        links=sorted(links, key=lambda link: link.path), total_bytes=sum(f.size for f in files),
                        truncated=truncated, not_read=not_read)  # fmt: skip


async def listing(job: Job, output_root: Path) -> ArtifactList:
    return await asyncio.to_thread(list_artifacts, job, output_root)


# ---- one file, with Range -----------------------------------------------------------------------------------

# Numbers of any length: a start too long for 64 bits is still past the end (416), not a malformed range.
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
# Larger than any file: what a number too long to convert cheaply stands for (int() of thousands of digits is
# slow, and refused past sys.int_info's limit).
_HUGE = 2**64


def _value(digits: str) -> int:
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 19 else _HUGE


def _order(digits: str) -> tuple[int, str]:
    """Sorts decimal numbers of any length as their values do, without converting them."""
    significant = digits.lstrip("0")
    return len(significant), significant


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) a Range header asks for; None means the whole file. Several ranges, another unit or
    a malformed value are ignored (RFC 9110 14.2 lets a server answer 200 with everything)."""
    m = _RANGE_RE.match(header) if header else None
    if m is None or m.groups() == ("", ""):
        return None
    first, last = m.groups()
    if first == "":  # bytes=-n: the last n bytes
        if _value(last) == 0 or size == 0:
            raise RangeNotSatisfiable(f"the range '{header}' asks for no bytes: the file is {size} bytes", size)
        return max(0, size - _value(last)), size
    if last != "" and _order(last) < _order(first):
        return None
    start = _value(first)
    if start >= size:
        raise RangeNotSatisfiable(f"the range '{header}' starts past the end: the file is {size} bytes", size)
    return start, size if last == "" else min(_value(last) + 1, size)


def media_type(name: str) -> str:
    return MEDIA_TYPES.get(os.path.splitext(name)[1].lower(), DEFAULT_MEDIA_TYPE)


def disposition(name: str) -> str:
    quoted = quote(name)
    if quoted == name:
        return f'attachment; filename="{name}"'
    # An ASCII name beside the exact one (RFC 6266): curl -OJ reads only `filename`, and saved the quoted form.
    plain = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=utf-8''{quoted}"


def _chunks(f: OwnedFd, start: int, end: int) -> Iterator[bytes]:
    try:
        pos = start
        while pos < end:
            data = os.pread(f.fd, min(CHUNK, end - pos), pos)
            if not data:
                return  # the file shrank since it was opened: the client sees a body shorter than announced
            pos += len(data)
            yield data
    finally:
        f.close()


def _file_download(fd: int, st: os.stat_result, name: str, range_header: str | None, if_range: str | None,
                   head: bool) -> Download:  # fmt: skip
    # Owns the fd from here: closed by the body, or when dropped (a body never started: a client gone before its
    # first chunk; a file object left an unclosed-file warning then).
    f = OwnedFd(fd)
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    modified = email.utils.formatdate(st.st_mtime, usegmt=True)
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "Last-Modified": modified,
               "Content-Disposition": disposition(name)}  # fmt: skip
    # If-Range: a client resuming a download of a file that has changed since gets all of it again. Only the ETag
    # (exact to the nanosecond) resumes: a file rewritten within the second of its Last-Modified, same size,
    # kept that date, and a resume by date spliced the two versions (a date is a weak validator, RFC 9110 13.1.5).
    asked = range_header if if_range is None or if_range == etag else None
    span = parse_range(asked, st.st_size)
    start, end = span or (0, st.st_size)
    headers["Content-Length"] = str(end - start)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{st.st_size}"
    if head:
        f.close()
    return Download(206 if span else 200, media_type(name), iter(()) if head else _chunks(f, start, end), headers)


def prepare_download(job: Job, output_root: Path, path: str, range_header: str | None = None,
                     if_range: str | None = None, head: bool = False) -> Download:  # fmt: skip
    """Blocking: open what `path` names (a real file first; else `<folder>.tar` for a folder) and say how to
    send it. The body reads lazily; `head`: the answer without a body (nothing is left open)."""
    base = job_folder(job, output_root)
    found = resolve(base, path) if base else None
    if found is not None and stat.S_ISREG(found[1].st_mode):
        return _file_download(found[0], found[1], path.rsplit("/", 1)[-1], range_header, if_range, head)
    # (inside the job's folder: it may say so; a folder named d.tar is one too, unless d is a folder to tar)
    is_folder = found is not None and stat.S_ISDIR(found[1].st_mode)
    if found is not None:
        os.close(found[0])
    if is_folder and not path.endswith(".tar"):
        raise _a_folder(job, path)
    if base is not None and path.endswith(".tar") and (folder := resolve(base, path[: -len(".tar")])):
        fd, st, real = folder
        if stat.S_ISDIR(st.st_mode):
            name = path[: -len(".tar")].rsplit("/", 1)[-1]
            headers = {"Content-Disposition": disposition(f"{name}.tar"), "Accept-Ranges": "none"}
            if head:
                os.close(fd)
                return Download(200, TAR_MEDIA_TYPE, iter(()), headers)
            return Download(200, TAR_MEDIA_TYPE, tar_chunks(OwnedFd(fd), real, name), headers)
        os.close(fd)
    if is_folder:
        raise _a_folder(job, path)
    raise not_found(job.job_id)


def _a_folder(job: Job, path: str) -> NotFound:
    named = path.rstrip("/")
    return NotFound(f"'{named}' is a folder of job '{job.job_id}''s output: download it as '{named}.tar'")


def as_asked(path: str, url_path: str) -> str:
    """A route's `{path:path}` as the URL had it: Starlette's pattern ends in `$`, which matches before a final
    line break, so `file%0a` would have served `file` (a control character must answer like a missing file)."""
    return path + "\n" if url_path.endswith("\n") and not path.endswith("\n") else path


async def download(job: Job, output_root: Path, path: str, range_header: str | None = None,
                   if_range: str | None = None, head: bool = False) -> Download:  # fmt: skip
    return await asyncio.to_thread(prepare_download, job, output_root, path, range_header, if_range, head)
