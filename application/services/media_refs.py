"""The images, videos and audio a data set's rows name: ms-swift opens a path that exists wherever it lies, and
fetches a URL (its `load_file`), so a row could read any file of the host, or another owner's, into training
(and its error in the job's log say whether it exists), or make the server call an internal address. Each
reference is checked as data_path is: a file inside DATA_ROOTS (and not another owner's folder), inline data
(`data:...;base64,...`), or a path relative to the run's folder without `..`; never a URL.

The whole file is read, in blocks: rows are parsed only where a block holds a media column's name, so a data
set of text alone costs one scan (about a second per GiB).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from application.exceptions import Invalid
from application.services.path_sandbox import Guard, check_text

# Columns ms-swift reads media from, in any case (the singular forms are mapped to the plural ones by its
# preprocessors; the `columns` argument may map others to them), and the key of an image block in a message's
# content (Anthropic's format: its `url` is fetched, or opened as a path).
MEDIA_KEYS = ("images", "videos", "audios", "image", "video", "audio", "rejected_images", "teacher_images")
_SOURCE = "source"
BLOCK = 8 << 20
JSON_ARRAY_MAX_BYTES = 64 << 20  # a JSON array with media columns is read whole: larger ones must be JSONL
_URL_PREFIXES = ("http:", "https:", "ftp:", "s3:", "oss:", "gs:", "file:", "hdfs:")


def media_columns(arguments: dict[str, Any]) -> tuple[str, ...]:
    """Every column name that holds media: ms-swift's own and those the `columns` argument maps to them."""
    mapped = arguments.get("columns")
    extra = [k for k, v in mapped.items() if isinstance(v, str) and v.lower() in MEDIA_KEYS] \
        if isinstance(mapped, dict) else []  # fmt: skip
    return (*MEDIA_KEYS, *(k.lower() for k in extra))


def check_media(field: str, path: Path, roots: Sequence[Path], guard: Guard | None,
                columns: Sequence[str] = MEDIA_KEYS) -> None:  # fmt: skip
    """Raise Invalid naming the row and column of a media reference that could reach outside DATA_ROOTS."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            header = next(csv.reader(io.StringIO(f.readline())), [])
        if found := sorted(h for h in header if h.lower() in columns):
            raise Invalid(f"{field} '{path.name}': its '{found[0]}' column names media: give data sets with images, "
                          "videos or audio as .jsonl (their paths are checked there)")  # fmt: skip
        return
    check = _Checker(field, path, roots, guard, tuple(columns))
    with open(path, "rb") as f:
        first = f.read(BLOCK)
        if first.lstrip().startswith(b"["):
            _check_array(check, f, first)
            return
        _check_lines(check, f, first)


class _Checker:
    def __init__(self, field: str, path: Path, roots: Sequence[Path], guard: Guard | None,
                 columns: tuple[str, ...]) -> None:  # fmt: skip
        self.field, self.path, self.roots, self.guard, self.columns = field, path, roots, guard, columns
        # What a row naming one holds (compared in lower case); or a \\u escape, which can spell a name in other
        # bytes.
        self.markers = (*(f'"{c}"'.encode() for c in (*columns, _SOURCE)), b"\\u")

    def marked(self, data: bytes) -> bool:
        lowered = data.lower()
        return any(marker in lowered for marker in self.markers)

    def row(self, row: Any, where: str) -> None:
        if not isinstance(row, dict):
            return  # (the format check says what a row must be)
        for key, value in row.items():
            if not isinstance(key, str):
                continue
            if key.lower() in self.columns:
                for ref in _strings(value):
                    self.reference(ref, f"{where}, '{key}'")
            elif isinstance(value, list):  # messages: content blocks with a source
                for ref in _sources(value):
                    self.reference(ref, f"{where}, '{key}'")

    def reference(self, ref: str, where: str) -> None:
        if ref.startswith("data:"):
            return
        said = f"{self.field} '{self.path.name}': {where}"
        if ref.lower().startswith(_URL_PREFIXES) or "://" in ref:
            raise Invalid(f"{said}: '{ref[:200]}' is a URL: the server does not fetch media; put the file inside "
                          "DATA_ROOTS (POST /files takes only data sets) and name its path")  # fmt: skip
        if ref.startswith(("/", "~")):
            check_text(said, ref)
            real = Path(os.path.realpath(os.path.expanduser(ref)))
            roots = [Path(os.path.realpath(root)) for root in self.roots]
            if not any(real == root or root in real.parents for root in roots):
                raise Invalid(f"{said}: '{ref[:200]}' must be a file inside DATA_ROOTS "
                              f"({', '.join(map(str, roots))})")  # fmt: skip
            if self.guard is not None:
                self.guard(said, ref, real)  # another owner's folder
        elif ".." in PurePosixPath(ref).parts:
            raise Invalid(f"{said}: '{ref[:200]}' leaves the run's folder: name a file inside DATA_ROOTS by its "
                          "absolute path")  # fmt: skip


def _sources(messages: list[Any]) -> Iterator[str]:
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            source = block.get(_SOURCE) if isinstance(block, dict) else None
            if isinstance(source, dict):
                yield from (v for k, v in source.items() if k in ("url", "path") and isinstance(v, str))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):  # {"path": ..., "bytes": ...}, as Hugging Face's Image feature stores them
        if isinstance(value.get("path"), str):
            yield value["path"]


def _check_lines(check: _Checker, f: io.BufferedReader, block: bytes) -> None:
    number, carry = 0, b""
    while block:
        data = carry + block
        cut = data.rfind(b"\n") + 1
        lines, carry = data[:cut], data[cut:]
        if check.marked(lines):
            for i, raw in enumerate(lines.split(b"\n")[:-1], start=number + 1):
                _check_line(check, raw, i)
        number += lines.count(b"\n")
        block = f.read(BLOCK)
    if carry.strip():
        _check_line(check, carry, number + 1)


def _check_line(check: _Checker, raw: bytes, number: int) -> None:
    if not check.marked(raw):
        return
    try:
        row = json.loads(raw)
    except (ValueError, RecursionError):
        raise Invalid(f"{check.field} '{check.path.name}': line {number} is not a valid JSON row") from None
    check.row(row, f"line {number}")


def _check_array(check: _Checker, f: io.BufferedReader, first: bytes) -> None:
    size = f.seek(0, 2)
    f.seek(0)
    if size > JSON_ARRAY_MAX_BYTES:
        tail = b""
        while block := f.read(BLOCK):
            if check.marked(tail + block):
                raise Invalid(f"{check.field} '{check.path.name}': a JSON array over {JSON_ARRAY_MAX_BYTES >> 20} MiB "
                              "with media columns: give it as .jsonl (one row per line)")  # fmt: skip
            tail = block[-16:]
        return
    data = f.read()
    if not check.marked(data):
        return
    try:
        rows = json.loads(data)
    except (ValueError, RecursionError):
        return  # (the format check says what is wrong with it)
    for n, row in enumerate(rows if isinstance(rows, list) else [], start=1):
        check.row(row, f"element {n}")
