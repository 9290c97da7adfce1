"""The images, videos and audio a data set's rows name: ms-swift opens a path that exists wherever it lies, and
fetches a URL (its `load_file`), so a row could read any file of the host, or another owner's, into training
(and its errors in the job's log say whether it exists), or make the server call an internal address. Each
reference is checked as data_path is: a file inside DATA_ROOTS (and not another owner's folder), inline data
(`data:...;base64,...`, or base64 longer than swift's 2,000-character path limit), or a path relative to the
run's folder without `..`; never a URL.

What ms-swift reads media from: columns `images`, `videos`, `audios` (and the singular forms), with the prefixes
`rejected_`, `positive_`, `negative_`, `teacher_`, `ref_`; columns the `columns` argument maps to those; and
content blocks in messages (`{"type": "image", "image": ...}`, `image_url`, Anthropic's `source`). So every value
under a key that names an image, a video or audio (or `source`), at any depth of a row, is checked.

The whole file is read, in blocks: rows are parsed only where a block holds such a key (or a `\\u` escape, which
can spell one in other bytes), so a data set of text alone costs one scan.
"""

from __future__ import annotations

import ast
import codecs
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from application.exceptions import Invalid
from application.services.datasets import csv_records
from application.services.path_sandbox import MAX_FOLDER_ENTRIES, Guard, check_text
from application.utils.regular_files import open_regular

_SOURCE = "source"
BLOCK = 8 << 20
# What one regex search or split takes at a time when a file is scanned: a call holds the GIL, and one over 8 MiB
# (124 ms) stalled the API's event loop for every user at each create or upload of a big data set (hunt DM). An
# array's elements are still decoded BLOCK at a time (each read re-joins what is left of the last).
SCAN_BLOCK = 256 << 10
MAX_ROW_BYTES = 64 << 20  # a row (a line, an array element) longer than this is refused, not read whole
SWIFT_PATH_MAX = 2000  # longer strings are base64 to ms-swift, never a path (its _check_path)


def media_columns(arguments: dict[str, Any]) -> tuple[str, ...]:
    """Columns the `columns` argument maps to a media column (lower case): their values are media too."""
    mapped = arguments.get("columns")
    if isinstance(mapped, str):  # (as the arguments' check leaves it: JSON text)
        try:
            mapped = json.loads(mapped)
        except ValueError:
            return ()
    if not isinstance(mapped, dict):
        return ()
    return tuple(k.lower() for k, v in mapped.items() if isinstance(v, str) and _is_media_key(v.lower()))


def check_media(field: str, path: Path, roots: Sequence[Path], guard: Guard | None,
                columns: Sequence[str] = ()) -> None:  # fmt: skip
    """Raise Invalid naming the row and key of a media reference that could reach outside DATA_ROOTS."""
    try:
        _check_media(field, path, _Checker(field, path, roots, guard, tuple(columns)))
    except OSError as exc:  # read once already: it may have gone since (an upload deleted meanwhile), or a folder
        raise Invalid(f"{field} '{path}' cannot be read ({exc.strerror or type(exc).__name__})") from None


def _check_media(field: str, path: Path, check: _Checker) -> None:
    with open_regular(path) as f:
        if not _marked_anywhere(check, f):
            return
    if path.suffix.lower() == ".csv":
        with io.TextIOWrapper(open_regular(path), encoding="utf-8-sig", errors="replace", newline="") as t:
            try:
                for number, row in csv_records(t, header=check.csv_header):
                    check.row(row, f"line {number}")
            except Invalid as exc:
                raise Invalid(f"{field} '{path.name}': {exc.detail}") from None
        return
    with open_regular(path) as f:
        head = f.read(BLOCK)
        f.seek(0)
        rows = _array_rows(check, f) if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[") else _lines(check, f)
        for where, row in rows:
            check.row(row, where)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_IMG_TAG = re.compile(r"<img>(.+?)</img>")  # as ms-swift's Template._replace_image_tags finds them
FOLDER_FILES_MAX = 10_000
_UNREADABLE = (".parquet", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".lz4")


def check_media_folder(field: str, folder: Path, roots: Sequence[Path], guard: Guard | None,
                       columns: Sequence[str] = ()) -> None:  # fmt: skip
    """A folder data set: ms-swift (Hugging Face's loader) reads every data file in it, so each is checked; a
    file whose rows cannot be read here (columnar, compressed) is refused. Its other files (the images of an
    image data set laid out beside its rows) are not counted against FOLDER_FILES_MAX, only against
    MAX_FOLDER_ENTRIES, which the link check applies too."""
    entries = data_files = 0
    # Into folders its links lead to, as swift's loader goes (the link check kept them inside the roots): the
    # data files there name media too. Each folder once, so a link to a folder above is no loop.
    seen = {os.path.realpath(folder)}
    for place, folders, names in os.walk(folder, followlinks=True):
        unseen = []
        for name in folders:
            real = os.path.realpath(os.path.join(place, name))
            if real not in seen:
                seen.add(real)
                unseen.append(name)
        folders[:] = unseen
        entries += len(folders) + len(names)
        if entries > MAX_FOLDER_ENTRIES:  # (it grew since the link check)
            raise Invalid(f"{field}: the folder holds more than {MAX_FOLDER_ENTRIES:,} files and folders: name a "
                          "folder with fewer")  # fmt: skip
        for name in sorted(names):
            path = Path(place) / name
            suffix = path.suffix.lower()
            if suffix in (".jsonl", ".json", ".csv"):
                data_files += 1
                if data_files > FOLDER_FILES_MAX:
                    raise Invalid(f"{field}: the folder holds more than {FOLDER_FILES_MAX:,} data files (.jsonl, "
                                  ".json, .csv): name fewer, or a folder of fewer")  # fmt: skip
                check_media(field, path, roots, guard, columns)
            elif suffix in _UNREADABLE:
                raise Invalid(f"{field}: the folder holds {path.relative_to(folder)}, whose rows the server cannot "
                              "check for the media they name: give the data set as .jsonl, .json or .csv")  # fmt: skip


def _is_media_key(key: str) -> bool:
    return "image" in key or "video" in key or "audio" in key or key == _SOURCE


class _Checker:
    def __init__(self, field: str, path: Path, roots: Sequence[Path], guard: Guard | None,
                 columns: tuple[str, ...]) -> None:  # fmt: skip
        self.field, self.path, self.roots, self.guard, self.columns = field, path, roots, guard, columns
        self.root_texts = [os.path.realpath(root) for root in roots]
        self.folders: dict[str, str] = {}
        self.keys: dict[str, bool] = {}
        self.guarded: set[str] = set()
        # What a block holding a media key holds (in lower case): a media word, a mapped column, an escape
        # (\u in JSON, \x in the Python literals swift also parses) that could spell one, or a string that opens
        # a list or an object (swift parses messages and history given as text).
        names = b"".join(b"|" + re.escape(c.encode()) for c in columns)
        self.markers = re.compile(rb'image|video|audio|source|img>|"type"|\\[ux]|"(?:\s|\\[nrtbf])*[\[{]' + names)
        self.overlap = 64 + max((len(c) for c in columns), default=0)

    def is_media_key(self, key: str) -> bool:
        known = self.keys.get(key)
        if known is None:  # (a data set's rows repeat a few keys: each is looked at once)
            if len(self.keys) > 10_000:
                self.keys.clear()
            known = self.keys[key] = _is_media_key(key.lower()) or key.lower() in self.columns
        return known

    def csv_header(self, names: Sequence[str]) -> None:
        if found := [h for h in names if self.is_media_key(h)]:
            raise Invalid(f"its '{found[0]}' column names media: give data sets with images, videos or audio as "
                          ".jsonl (their paths are checked there)")  # fmt: skip

    def marked(self, data: bytes) -> bool:
        return self.markers.search(data.lower()) is not None

    def row(self, row: Any, where: str, depth: int = 0) -> None:
        """Every string under a media key, at any depth, also inside strings swift parses as lists or objects."""
        if depth > 64:
            raise Invalid(f"{self.field} '{self.path.name}': {where} is nested too deeply")
        if isinstance(row, dict):
            if "content" in row:  # a message: its text as ms-swift builds it, for the <img> tags it loads
                text = _swift_text(row)
                for ref in _IMG_TAG.findall(text) if text and "<img>" in text else ():
                    self.reference(ref, f"{where}, '<img>'")
            for key, value in row.items():
                if self.is_media_key(key):
                    for ref in _strings(value):
                        self.reference(ref, f"{where}, '{key}'")
                else:
                    self.row(value, where, depth + 1)
        elif isinstance(row, list):
            for item in row:
                self.row(item, where, depth + 1)
        elif isinstance(row, str):
            if row.lstrip()[:1] in ("[", "{"):
                self.row(_parsed_text(row), where, depth + 1)
            if "<img>" in row:  # the templates of multimodal models load <img>path</img> from a message's text
                for ref in _IMG_TAG.findall(row):
                    self.reference(ref, f"{where}, '<img>'")

    def reference(self, ref: str, where: str) -> None:
        said = f"{self.field} '{self.path.name}': {where}"
        ref = ref.strip()  # as ms-swift does before it looks
        if len(ref) > SWIFT_PATH_MAX:
            return  # inline data: never a path to ms-swift
        # (any scheme: 'concat:' or 'subfile:' reach other files through ffmpeg, where an audio loader uses it)
        if ref.lower().startswith("http") or "://" in ref or (_SCHEME.match(ref) and not ref.startswith("data:")):
            raise Invalid(f"{said}: '{ref[:200]}' is a URL: the server does not fetch media; put the file inside "
                          "DATA_ROOTS and name its path")  # fmt: skip
        if ".." in ref.replace("\\", "/").split("/"):
            # (ms-swift normalizes what it did not find as a path: 'data:/../../x' is /x to it)
            raise Invalid(f"{said}: '{ref[:200]}' holds '..': name a file inside DATA_ROOTS by its absolute path, "
                          "or give inline data (data:...;base64,...)")  # fmt: skip
        if ref.startswith("data:"):
            return  # inline data
        if ref.startswith(("/", "~")):
            try:
                real, _ = self.resolved(ref)
            except ValueError:  # a NUL, a lone surrogate: text no path can hold
                check_text(said, ref)  # (says what is wrong with it)
                raise Invalid(f"{said}: {ref[:200]!r} cannot be a path: name a file inside DATA_ROOTS") from None
            if not any(real == root or real.startswith(root + os.sep) for root in self.root_texts):
                roots = ", ".join(self.root_texts)
                raise Invalid(f"{said}: '{ref[:200]}' must be a file inside DATA_ROOTS ({roots}), or inline data "
                              "(data:...;base64,...)")  # fmt: skip
            if self.guard is not None and real not in self.guarded:
                # Another owner's folder, or one of the server's own files: each file once (a file in a folder
                # its siblings passed may be the key file).
                self.guard(said, ref, Path(real))
                self.guarded.add(real)

    def resolved(self, ref: str) -> tuple[str, str]:
        """The reference's real path and its real folder: each folder resolved once (a data set names thousands
        of files in a few folders), the file itself only when it is a link."""
        parent, name = os.path.split(os.path.expanduser(ref))
        if name in ("", ".", ".."):
            real = os.path.realpath(os.path.expanduser(ref))
            return real, os.path.dirname(real)
        if len(self.folders) > 100_000:
            self.folders.clear()
        folder = self.folders.get(parent)
        if folder is None:
            folder = self.folders[parent] = os.path.realpath(parent)
        real = os.path.join(folder, name)
        if os.path.islink(real):
            real = os.path.realpath(real)
            return real, os.path.dirname(real)
        return real, folder


def _swift_text(message: dict[str, Any]) -> str | None:
    """A message's text as ms-swift builds it before its templates look for <img> tags: a tool call's content
    dumped as JSON, content blocks joined (a media block leaves its '<type>'); None when swift would not."""
    content = message.get("content")
    if message.get("role") in ("tool_call", "tool", "tool_response") and not isinstance(content, str):
        try:
            return json.dumps(content, ensure_ascii=False)
        except (TypeError, ValueError):
            return None
    if isinstance(content, str) or not isinstance(content, list):
        return content if isinstance(content, str) else None
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if not isinstance(kind, str):
            return None
        if kind == "text":
            parts.append(item.get("text") if isinstance(item.get("text"), str) else "")
        else:
            parts.append(f"<{kind.removesuffix('_url')}>")
    return "".join(parts)


def _parsed_text(text: str) -> Any:
    """A list or an object written as text, read as ms-swift reads it (JSON, else a Python literal); or None."""
    if len(text) > MAX_ROW_BYTES:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):  # {"path": ...}, {"url": ...}, a block's fields
        for item in value.values():
            yield from _strings(item)


def _marked_anywhere(check: _Checker, f: BinaryIO) -> bool:
    tail = b""
    while block := f.read(SCAN_BLOCK):
        if check.marked(tail + block):
            return True
        tail = block[-check.overlap :]
    return False


def _too_long(check: _Checker, where: str) -> Invalid:
    return Invalid(f"{check.field} '{check.path.name}': {where} is over {MAX_ROW_BYTES >> 20} MiB")


def _lines(check: _Checker, f: BinaryIO) -> Iterator[tuple[str, Any]]:
    number, parts, held = 0, [], 0
    while block := f.read(SCAN_BLOCK):
        cut = block.rfind(b"\n") + 1
        if cut == 0:  # no line ends here: kept, not searched again
            parts.append(block)
            held += len(block)
            if held > MAX_ROW_BYTES:
                raise _too_long(check, f"line {number + 1}")
            continue
        data = b"".join([*parts, block[:cut]])
        parts, held = [block[cut:]], len(block) - cut
        for raw in data.split(b"\n")[:-1]:
            number += 1
            yield from _parsed(check, raw, number)
    last = b"".join(parts)
    if last.strip():
        yield from _parsed(check, last, number + 1)


def _parsed(check: _Checker, raw: bytes, number: int) -> Iterator[tuple[str, Any]]:
    if not check.marked(raw):
        return
    try:
        yield f"line {number}", json.loads(raw)
    except (ValueError, RecursionError):
        raise Invalid(f"{check.field} '{check.path.name}': line {number} is not a valid JSON row") from None


def _array_rows(check: _Checker, f: BinaryIO) -> Iterator[tuple[str, Any]]:
    """The elements of a JSON array, read a block at a time (any size: a data set of text with \\u escapes
    is marked throughout)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, pos, eof, n = "", 0, False, 0

    def more() -> None:
        nonlocal text, pos, eof
        block = f.read(BLOCK)
        eof = not block
        text = text[pos:] + utf8.decode(block, final=eof)  # what was read is dropped only here
        pos = 0

    more()
    start = text.find("[")
    pos = start + 1 if start >= 0 else len(text)
    while True:
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,\ufeff":
                pos += 1
            if pos < len(text) or eof:
                break
            more()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            value, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            if eof:
                raise Invalid(f"{check.field} '{check.path.name}': element {n + 1} is not valid JSON") from None
            if len(text) - pos > MAX_ROW_BYTES:
                raise _too_long(check, f"element {n + 1}") from None
            more()
            continue
        n += 1
        yield f"element {n}", value
