"""A multipart/form-data upload streamed straight to disk: at most a small buffer of it is ever in memory.

python-multipart's streaming parser reads the body as it arrives. The one file part goes to a temp file (hashed on
the way), small text fields are kept, any other part is dropped. The limits hold while reading, not after: the file
part against `max_file_bytes`, the whole body against that plus ENVELOPE_BYTES, so a client cannot send more than
that however it frames the body. On any failure the temp file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.errors
import email.header
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import unquote

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from application.exceptions import ApiError, Invalid, RequestTimeout, TooLarge, UnsupportedMediaType

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

ENVELOPE_BYTES = 1 << 20  # boundaries, part headers and text fields around the file
FIELD_MAX_BYTES = 1024  # a text field (purpose) is a word; anything longer is not one
# The form is a file and a word or two: more parts are not an upload (they would only take the worker's memory, a
# field at a time, up to the whole body's limit). Part headers are bounded by the parser itself.
MAX_PARTS = 16
FLUSH_BYTES = 1 << 20  # file data goes to disk (in a thread) in writes of about this size
FILENAME_MAX_CHARS = 255


@dataclass
class ReceivedUpload:
    path: Path  # the temp file: the caller renames or removes it
    filename: str  # the client's name, sanitized: for display only
    suffix: str  # lower case, with its dot
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)


# How browsers, curl and httpx write these three in a multipart file name (HTML's form encoding, RFC 7578 4.2).
_FORM_ESCAPES = {"%22": '"', "%0A": "\n", "%0D": "\r", "%0a": "\n", "%0d": "\r"}


# RFC 5987 `filename*=utf-8''%E8%AE%AD.jsonl`, which python-multipart drops: .NET's MultipartFormDataContent and
# PowerShell's -Form send it beside a `filename` that holds an RFC 2047 word (`=?utf-8?B?6K6t?=`) for a non-ASCII name.
_STAR_RE = re.compile(rb"""(?:^|;)\s*filename\*\s*=\s*"?([A-Za-z0-9_-]+)'[^']*'([^;"\s]*)""", re.IGNORECASE)
# Quoted values (but `filename*`'s own, which some clients quote, blanks around its `=` too): a
# `filename="a; filename*=..."` names no `filename*`.
_QUOTED_RE = re.compile(rb'(\*\s*=\s*)?"(?:[^"\\]|\\.)*"')


def _unquoted(header: bytes) -> bytes:
    """`header` with every quoted value but `filename*`'s emptied."""
    return _QUOTED_RE.sub(lambda m: m.group(0) if m.group(1) else b'""', header)


# The two charsets RFC 5987 asks for: any Python codec (rot13, unicode_escape) was taken.
_STAR_CHARSETS = ("utf-8", "iso-8859-1")


def client_filename(header: bytes | None, plain: bytes | None) -> str | None:
    """The file name a part's Content-Disposition gives, sanitized (display_name): `filename*` when it is there and
    readable, else `filename` (an RFC 2047 encoded word in it decoded); None when the part names none. Invalid when
    it gives only a `filename*` that cannot be read."""
    if header and (m := _STAR_RE.search(_unquoted(header))):
        charset = m.group(1).decode("ascii").lower()
        try:
            if charset not in _STAR_CHARSETS or not m.group(2):
                raise LookupError(charset)
            name = unquote(m.group(2).decode("ascii"), encoding=charset, errors="strict")
            return display_name(name, form_escaped=False)
        except (LookupError, UnicodeError):
            if plain is None:
                raise Invalid(
                    "the file part's filename* cannot be read: send it as utf-8'' (or iso-8859-1'') and the name "
                    "percent-encoded, e.g. filename*=utf-8''%E8%AE%AD.jsonl, or send a plain filename"
                ) from None
    if plain is None:
        return None
    text = plain.decode("utf-8", "replace")
    if text.startswith("=?") and text.endswith("?="):
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except (LookupError, UnicodeError, ValueError, email.errors.HeaderParseError):
            pass
    return display_name(text)


def display_name(raw: str, form_escaped: bool = True) -> str:
    """The client's file name without any folder part or unprintable character, at most FILENAME_MAX_CHARS."""
    for escaped, char in _FORM_ESCAPES.items() if form_escaped else ():
        raw = raw.replace(escaped, char)
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()
    if len(name) > FILENAME_MAX_CHARS:
        suffix = suffix_of(name)[:16]
        name = name[: FILENAME_MAX_CHARS - len(suffix)] + suffix
    return name or "upload"


async def until_idle(chunks: AsyncIterator[bytes], seconds: float) -> AsyncIterator[bytes]:
    """`chunks`, ended with a 408 when none comes for `seconds` (UPLOAD_IDLE_SECONDS): a stalled upload held its
    socket and partial file for as long as its client liked, and its lapsed slot let the key open more."""
    it = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(seconds):
                chunk = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(f"nothing of the upload came for {seconds:g} s (UPLOAD_IDLE_SECONDS): it was "
                                 "ended; send it again") from None  # fmt: skip
        yield chunk


def suffix_of(name: str) -> str:
    return "." + name.rsplit(".", 1)[1].lower() if "." in name else ""


def size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


class _Receiver:
    """The parser's callbacks (synchronous, called from `MultipartParser.write`): they only record what arrived;
    the coroutine does the disk work between writes."""

    def __init__(self, file_field: str, suffixes: tuple[str, ...], max_file_bytes: int, limit_name: str) -> None:
        self.file_field = file_field
        self.suffixes = suffixes
        self.max_file_bytes = max_file_bytes
        self.limit_name = limit_name
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.headers: dict[str, bytes] = {}
        self.target: str | None = None  # "file", a field's name, or None: drop the part's data
        self.filename: str | None = None
        self.suffix = ""
        self.file_parts = 0
        self.file_bytes = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.fields: dict[str, bytearray] = {}
        self.parts = 0
        self.ended = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value_data,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise Invalid(f"the form has more than {MAX_PARTS} parts: send the file and 'purpose' only")
        self.headers = {}
        self.target = None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def header_value_data(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        self.headers[self.header_name.decode("latin-1").lower()] = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get("content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == self.file_field:
            raw_filename = client_filename(self.headers.get("content-disposition"), options.get(b"filename"))
            if raw_filename is None:
                raise Invalid(f"'{self.file_field}' must be a file part (with a filename), not a text field")
            self.file_parts += 1
            if self.file_parts > 1:
                raise Invalid(f"send one file per request: this body has more than one '{self.file_field}' part")
            self.filename = raw_filename
            self.suffix = suffix_of(self.filename)
            if self.suffix not in self.suffixes:
                raise Invalid(f"{self.file_field} '{self.filename}': the name must end in "
                              f"{', '.join(self.suffixes)} (the suffix tells the data set's format)")  # fmt: skip
            self.target = self.file_field
        elif name and options.get(b"filename") is None:
            # (a text field by its plain `filename` alone: a `purpose` part carrying a `filename*` was dropped)
            if name in self.fields:  # (its values were joined: purpose=sft twice read 'sftsft')
                raise Invalid(f"the form field '{name}' is sent more than once: send it once")
            self.target = name
            self.fields[name] = bytearray()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.target == self.file_field:
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                raise TooLarge(f"{self.file_field} '{self.filename}' is larger than {size_text(self.max_file_bytes)} "
                               f"({self.limit_name})")  # fmt: skip
            self.pending.append(data[start:end])
            self.pending_bytes += end - start
        elif self.target is not None:
            value = self.fields[self.target]
            value += data[start:end]
            if len(value) > FIELD_MAX_BYTES:
                raise Invalid(f"the form field '{self.target}' is longer than {FIELD_MAX_BYTES} bytes")

    def end(self) -> None:
        self.ended = True


class _Sink:
    """The temp file and its running hash. `write` runs in a thread: disk writes and hashing release the GIL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[bytes] | None = None
        self.hash = hashlib.sha256()

    def open(self) -> None:
        self.handle = open(self.path, "xb")  # "x": never onto a file that is already there

    def write(self, blocks: list[bytes]) -> None:
        assert self.handle is not None
        for block in blocks:
            self.handle.write(block)
            self.hash.update(block)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.close()
        self.path.unlink(missing_ok=True)


async def off_loop(cleanup: Callable[[], object]) -> None:
    """Run a clean-up in a thread (unlinking a file of up to FILE_MAX_BYTES stalled the event loop for a tenth
    of a second), and see it through even if this task is cancelled again meanwhile."""
    await asyncio.shield(asyncio.to_thread(cleanup))


async def receive_upload(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    content_length: str | None,
    *,
    temp_path: Callable[[str], Path],
    suffixes: tuple[str, ...],
    max_file_bytes: int,
    file_field: str = "file",
    limit_name: str = "FILE_MAX_BYTES",
) -> ReceivedUpload:
    """Read a multipart body from `chunks` into `temp_path(suffix)`; raise an ApiError (the temp file removed)
    when it is not a usable upload. The suffix is checked before any of the file's data is written."""
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise UnsupportedMediaType(f"send the data set as multipart/form-data with a '{file_field}' part "
                                   f"(curl -F {file_field}=@train.jsonl)")  # fmt: skip
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError("the multipart/form-data Content-Type has no boundary")
    max_body = max_file_bytes + ENVELOPE_BYTES
    if content_length is not None and content_length.isdigit() and int(content_length) > max_body:
        raise TooLarge(f"the upload is larger than {size_text(max_file_bytes)} ({limit_name})")
    receiver = _Receiver(file_field, suffixes, max_file_bytes, limit_name)
    try:
        parser = MultipartParser(boundary, receiver.callbacks())
    except FormParserError as exc:
        raise ApiError(f"the multipart body cannot be read: {exc}") from None
    sink: _Sink | None = None
    seen = 0
    try:
        async for chunk in chunks:
            seen += len(chunk)
            if seen > max_body:
                raise TooLarge(f"the upload is larger than {size_text(max_file_bytes)} ({limit_name})")
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise ApiError(f"the multipart body cannot be read: {exc}") from None
            if receiver.file_parts and sink is None:
                sink = _Sink(temp_path(receiver.suffix))
                await asyncio.to_thread(sink.open)
            if sink is not None and (receiver.pending_bytes >= FLUSH_BYTES or receiver.target != file_field):
                await _flush(receiver, sink)
            if receiver.ended:
                break
        if not receiver.ended:
            raise ApiError("the multipart body ended before its closing boundary")
        if sink is None:
            raise Invalid(f"send the data set as a file part named '{file_field}' (curl -F {file_field}=@train.jsonl)")
        await _flush(receiver, sink)
        await asyncio.to_thread(sink.close)
    except BaseException:
        # Also on cancellation and client disconnects: nothing half-written stays behind.
        if sink is not None:
            await off_loop(sink.discard)
        raise
    assert receiver.filename is not None
    fields = {k: v.decode("utf-8", "replace") for k, v in receiver.fields.items()}
    return ReceivedUpload(sink.path, receiver.filename, receiver.suffix, receiver.file_bytes, sink.hash.hexdigest(),
                          fields)  # fmt: skip


async def _flush(receiver: _Receiver, sink: _Sink) -> None:
    if receiver.pending:
        blocks, receiver.pending, receiver.pending_bytes = receiver.pending, [], 0
        await asyncio.to_thread(sink.write, blocks)
