"""A local data set as ms-swift would read it: a readable .jsonl, .json or .csv file whose first rows are a format
its preprocessors accept (`messages`/`conversations`, query/response-style columns, alpaca's instruction/input/
output), with what the kind of training needs per row (a rejected answer, a KTO label, or a prompt alone), after
the `columns` argument's renames (each row's rules: `dataset_rows`). A refusal names the file, the row and what
is wrong; the row count is recorded for the scheduler.

Synchronous and bounded: only the first HEAD_BYTES (or the first row, up to FIRST_ROW_MAX) are parsed, and
counting rows reads at most COUNT_MAX_BYTES.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from application.exceptions import Invalid
from application.services.dataset_rows import (
    CSV_TYPED_ROWS,
    MESSAGE_KEYS,
    CsvColumns,
    Needs,
    label_kind,
    renamed,
    row_format,
)
from application.utils.regular_files import open_regular

HEAD_BYTES = 8 << 20  # rows checked come from the first 8 MiB
FIRST_ROW_MAX = 64 << 20  # ... or from the first row, when it is longer
SAMPLE_ROWS = 20
LAST_LINE_MAX = 1 << 20  # a file's last line is decoded too, when it is no longer than this
COUNT_MAX_BYTES = 2 << 30  # exact row counts up to 2 GiB; past that an estimate
JSON_ARRAY_MAX_BYTES = 64 << 20
CSV_FIELD_MAX = 64 << 20


@dataclass(frozen=True)
class DatasetInfo:
    rows: int | None
    rows_exact: bool
    format: str


def _loads(raw: bytes | str) -> Any:
    """A row as ms-swift's reader (datasets' JSON) takes it: no unpaired surrogate escape. (Content that is an
    object or a number, and NaN, it takes: a tool call's arguments, a score.)"""
    try:
        value = json.loads(raw, object_pairs_hook=_unique)  # (JSON lines: pyarrow's; an array is read otherwise)
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # (Python's own limit, whose message names its setting)
            raise ValueError("a number of more than 4300 digits") from None
        raise
    if _SURROGATE_ESCAPE.search(raw if isinstance(raw, bytes) else raw.encode()):
        _paired(value)
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are each there once: pyarrow, which ms-swift's reader loads JSON with, refuses one
    with a key twice ("Column(/response) was specified twice": hunt BK); Python keeps the last."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key '{twice[:40]}' appears twice in one object, which ms-swift's reader refuses")
    return obj


def _paired(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a \\ud800-\\udfff escape with no pair: that is no character") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _paired(k)
            _paired(v)
    elif isinstance(value, list):
        for v in value:
            _paired(v)


def _not_utf8(head: bytes, complete: bool) -> str | None:
    """Why the file is no UTF-8 text, or None. ms-swift's readers (pyarrow's JSON, pandas' CSV) take UTF-8 only;
    json.loads guessed UTF-16 from the bytes and took such a file, which then failed after the job's wait."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not complete and exc.reason == "unexpected end of data":
            return None  # (a character cut by the 8 MiB read)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            return "the file is UTF-16 text: save it as UTF-8, which ms-swift reads"
        line = head.count(b"\n", 0, exc.start) + 1
        byte = head[exc.start]
        return f"line {line} is not UTF-8 text (byte 0x{byte:02x}): save the file as UTF-8, which ms-swift reads"
    if (nul := text.find("\x00")) != -1:
        return (f"line {text.count(chr(10), 0, nul) + 1} holds a NUL byte, which no text data set has (UTF-16 "
                "without its byte order mark, or not text at all): save the file as UTF-8")  # fmt: skip
    return None


_BLANKS = re.compile(rb"\s*")


def _ends_lines(head: bytes, lines: int) -> bool:
    """Whether `head` ends `lines` lines with text in them (blank ones skipped), in linear time."""
    pos = 0
    for _ in range(lines):
        pos = _BLANKS.match(head, pos).end()  # type: ignore[union-attr]  # (\s* always matches)
        ends = [i for i in (head.find(b"\n", pos), head.find(b"\r", pos)) if i >= 0]
        if pos >= len(head) or not ends:
            return False
        pos = min(ends) + 1
    return True


def _head(path: Path, limit: int = HEAD_BYTES, lines: int = 1) -> bytes:
    """The first `limit` bytes, or more, up to FIRST_ROW_MAX, until they end `lines` lines with text (a CSV's
    header and its first row): a first row longer than the head (inline media) was refused as "no rows found",
    though ms-swift reads it."""
    with open_regular(path) as f:
        head = f.read(limit)
        while len(head) < FIRST_ROW_MAX and not _ends_lines(head, lines):
            more = f.read(min(HEAD_BYTES, FIRST_ROW_MAX - len(head)))
            if not more:
                break
            head += more
        return head


def _jsonl_rows(head: bytes, complete: bool) -> Iterator[tuple[int, Any]]:
    lines = head.split(b"\n")
    if not complete:
        lines = lines[:-1]  # the last one may be cut by the 8 MiB read
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield number, _loads(raw)
        except ValueError as exc:
            raise Invalid(f"line {number} is not valid JSON ({exc})") from None
        except RecursionError:  # (Python's decoder recurses per level: a 500 with a traceback, before)
            raise Invalid(f"line {number} is nested too deeply to be a data set row") from None


def _json_array_rows(head: bytes, complete: bool) -> Iterator[tuple[int, Any]]:
    text = head.decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()  # (datasets reads an array with ujson, which keeps a key's last value)
    escapes = bool(_SURROGATE_ESCAPE.search(head))
    pos = text.index("[") + 1
    n = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            value, pos = decoder.raw_decode(text, pos)
            if escapes:
                _paired(value)
        except ValueError as exc:
            if "integer string conversion" in str(exc):
                exc = ValueError("a number of more than 4300 digits")
            if not complete and n > 0:
                return  # cut by the 8 MiB read
            raise Invalid(f"element {n + 1} of the JSON array is not valid JSON ({exc})") from None
        except RecursionError:
            raise Invalid(f"element {n + 1} of the JSON array is nested too deeply to be a data set row") from None
        n += 1
        yield n, value


# A field may hold a long document (pandas, which ms-swift's CSV loader is, takes it): the csv module's default
# limit, 128 KiB, is not ms-swift's. (The limit is the process's: every reader here wants this one.)
csv.field_size_limit(CSV_FIELD_MAX)


def csv_records(
    lines: Iterable[str], header: Callable[[Sequence[str]], None] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """A CSV file's records, numbered from 2 (the header is 1), as ms-swift's reader takes them; Invalid for
    what it refuses. `lines`: read with newline="" (a bare CR ends a line, as it does to pandas). `header` may
    refuse the column names."""
    reader = csv.DictReader(lines)
    try:
        if not reader.fieldnames:
            raise Invalid("the CSV file has no header row")
        if header is not None:
            header(reader.fieldnames)
        for number, row in enumerate(reader, start=2):
            if None in row:  # (DictReader keeps what is past the header's columns under None)
                raise Invalid(f"line {reader.line_num} has more fields than the header row: ms-swift's CSV reader "
                              "would misread or refuse it (quote a field that holds a comma)")  # fmt: skip
            yield number, row
    except csv.Error as exc:
        raise Invalid(f"line {reader.line_num}: not CSV that ms-swift can read ({exc})") from None


def _csv_rows(head: bytes, complete: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    text = head.decode("utf-8-sig", errors="replace")
    if not complete:
        text = text[: max(text.rfind("\n"), text.rfind("\r")) + 1]  # (lines may end with a bare CR)
    return csv_records(io.StringIO(text, newline=""))


def _unclosed_quote(head: bytes) -> int | None:
    """The line a quoted field opens on that the file never closes (pandas refuses it: "EOF inside string");
    the csv module takes it to the end of the file unless strict, which it is only here (strict also refuses
    text pandas reads, such as a quote inside an unquoted field: those are let through)."""
    reader = csv.reader(io.StringIO(head.decode("utf-8-sig", errors="replace"), newline=""), strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as exc:
        return reader.line_num if "unexpected end of data" in str(exc) else None
    return None


# A newline that a blank line (spaces at most) follows: blank lines are not rows (ms-swift skips them).
_BLANK_NEXT = re.compile(rb"\n(?=[ \t\r\f\v]*\n)")


def _count_lines(path: Path, size: int, cr_ends: bool = False) -> tuple[int, bool]:
    """Lines with something on them (a last line without a newline counts too); an estimate past
    COUNT_MAX_BYTES. Read in blocks: the line a block begins with may have begun in the blocks before.
    `cr_ends`: lines end with a bare CR (an old Mac CSV)."""
    count, read, open_row = 0, 0, False  # open_row: what the blocks before ended with has content
    with open_regular(path) as f:
        while read < COUNT_MAX_BYTES:
            block = f.read(1 << 20)
            if not block:
                break
            read += len(block)
            if cr_ends:
                block = block.replace(b"\r", b"\n")
            first = block.find(b"\n")
            if first == -1:
                open_row = open_row or bool(block.strip())
                continue
            # Every line this block ends, less the blank ones: the first (its start may be in the blocks before)
            # and those after each newline.
            blank_first = not open_row and not block[:first].strip()
            count += block.count(b"\n") - blank_first - len(_BLANK_NEXT.findall(block))
            open_row = bool(block[block.rfind(b"\n") + 1 :].strip())
    if read >= size:
        return count + open_row, True
    return int(count * size / max(read, 1)), False


def check_dataset(field: str, path: Path, *, needs: Needs = None, columns: Mapping[str, str] | None = None,
                  ) -> DatasetInfo:  # fmt: skip
    """Raise Invalid naming the file and row when ms-swift could not train on it (its columns renamed as the
    `columns` argument says, see `renamed_columns`); else its format and size."""
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise Invalid(f"{field} '{name}': ms-swift data sets here must be .jsonl, .json or .csv files")
    if path.suffix != suffix:  # (its loader maps 'jsonl' to the json reader, not 'JSONL': that went to the hub)
        raise Invalid(f"{field} '{name}': ms-swift reads a data file's type from its suffix in lower case only: "
                      f"rename it to '{path.stem}{suffix}'")  # fmt: skip
    try:
        if not path.is_file():
            raise Invalid(f"{field} '{path}' is not a file")
        size = path.stat().st_size
        # (a JSON array that size is read whole below anyway: its first element may be longer than the head)
        head = _head(path, size if suffix == ".json" and size <= JSON_ARRAY_MAX_BYTES else HEAD_BYTES,
                     lines=2 if suffix == ".csv" else 1)  # fmt: skip
    except PermissionError:
        raise Invalid(f"{field} '{path}' cannot be read by the server (permissions)") from None
    except OSError as exc:
        raise Invalid(f"{field} '{path}' cannot be read ({exc.strerror})") from None
    if size == 0 or not head.strip():
        raise Invalid(f"{field} '{path}' is empty")
    complete = len(head) >= size
    if why := _not_utf8(head, complete):
        raise Invalid(f"{field} '{path}': {why}")
    stripped = head.lstrip()
    array = False
    rows: Iterator[tuple[int, Any]]
    if suffix == ".csv":
        rows, unit = _csv_rows(head, complete), "line"
    elif array := stripped.startswith(b"["):
        # (a .jsonl holding one JSON array too: datasets reads it as one when its lines are not JSON lines)
        rows, unit = _json_array_rows(head, complete), "element"
    else:
        rows, unit = _jsonl_rows(head, complete), "line"
    formats: set[str] = set()
    labels: set[str | None] = set()
    typed = CsvColumns(needs)
    seen = 0
    try:
        for number, row in rows:
            formats.add(row_format(row, f"{unit} {number}", needs=needs, text=suffix == ".csv", columns=columns))
            if columns and isinstance(row, dict):
                row = renamed(row, columns)
            if suffix == ".csv":
                typed.add(row)
            if suffix == ".csv" and needs in ("label", "either") and isinstance(row, dict) and "label" in row:
                labels.add(label_kind(row["label"], True))
                if {"bool", "number"} <= labels:
                    raise Invalid(f"{unit} {number}: its 'label' column mixes true/false with 1/0: the CSV reader "
                                  "then keeps it as text, which KTO cannot sum; use one of them")  # fmt: skip
            seen += 1
            if seen >= SAMPLE_ROWS:
                break
    except Invalid as exc:
        raise Invalid(f"{field} '{path}': {exc.detail}") from None
    if seen == 0:
        if complete:
            raise Invalid(f"{field} '{path}': no rows found")
        raise Invalid(f"{field} '{path}': its first row is longer than {FIRST_ROW_MAX >> 20} MiB, more than the server "
                      "checks: keep rows shorter (media as file paths rather than inline)")  # fmt: skip
    if "messages" in formats and len(formats) > 1:
        # ms-swift reads a file in one format, by its columns: the rows of the other were dropped (review BO)
        others = ", ".join(sorted(formats - {"messages"}))
        raise Invalid(f"{field} '{path}': its rows mix conversations with {others} rows: ms-swift reads the file as "
                      "conversations and drops the others; use one format")  # fmt: skip
    # A row of the other kind past those sampled (two files joined with cat) does the same, in either order: the
    # file's columns are all its rows' (review BP). Each row's kind is looked at, as far as the head reads (a JSON
    # array's: as it is counted).
    kinds = _Kinds("messages" in formats, unit, columns, after=number if seen >= SAMPLE_ROWS else None)
    if suffix != ".csv" and unit == "line" and kinds.after is not None:
        try:
            kinds.lines(head, complete)
        except Invalid as exc:
            raise Invalid(f"{field} '{path}': {exc.detail}") from None
    fmt = formats.pop() if len(formats) == 1 else "mixed"
    if suffix != ".csv" and array:
        if size > JSON_ARRAY_MAX_BYTES:
            return DatasetInfo(None, False, fmt)
        try:
            with open_regular(path) as f:
                length = _array_length(f.read().decode("utf-8"), kinds.row if kinds.after is not None else None)
        except Invalid as exc:
            raise Invalid(f"{field} '{path}': {exc.detail}") from None
        except (OSError, ValueError) as exc:
            raise Invalid(f"{field} '{path}' is not a valid JSON array ({exc})") from None
        except RecursionError:
            raise Invalid(f"{field} '{path}' is nested too deeply to be a data set") from None
        return DatasetInfo(length, True, fmt)
    if suffix == ".csv" and not complete:
        try:  # (the column types of the rows past those sampled, as far as the head reads: see CsvColumns)
            for _, row in itertools.islice(rows, max(0, CSV_TYPED_ROWS - seen)):
                typed.add(renamed(row, columns) if columns else row)
            typed.check()
        except Invalid as exc:
            raise Invalid(f"{field} '{path}': {exc.detail}") from None
    if suffix == ".csv" and complete:
        if (line := _unclosed_quote(head)) is not None:
            raise Invalid(f"{field} '{path}': a quoted field is still open at its end (line {line}): ms-swift's "
                          "CSV reader refuses it; close the quote")  # fmt: skip
        # Records, not lines: a quoted field may hold line breaks (the header is the reader's, blank lines none).
        # The sampled rows' reader goes on to the end: the file is read once more, not twice.
        try:
            count = seen
            for _, row in rows:  # (their column types too: pandas types a column by all of it)
                typed.add(renamed(row, columns) if columns else row)
                count += 1
            typed.check()
            return DatasetInfo(count, True, fmt)
        except Invalid as exc:  # a record past the rows sampled
            raise Invalid(f"{field} '{path}': {exc.detail}") from None
    try:
        count, exact = _count_lines(path, size, cr_ends=suffix == ".csv" and b"\n" not in head and b"\r" in head)
        # (whenever rows were left undecoded: past the sample, or past the head, rows long enough that fewer than
        # the sample fit in it, review DE)
        last = _last_line(path) if suffix != ".csv" and (seen >= SAMPLE_ROWS or not complete) else None
    except OSError as exc:  # opened again to count: the file may have gone since its head was read
        raise Invalid(f"{field} '{path}' cannot be read ({exc.strerror})") from None
    if last is not None:
        try:
            _loads(last)
        except (ValueError, RecursionError) as exc:
            # (an interrupted copy, a full disk: the rows past the sample were not decoded, and the job failed in
            # ms-swift's reader after its wait, hunt DD)
            raise Invalid(f"{field} '{path}': its last line is not valid JSON ({exc}): the file looks cut short "
                          "(an interrupted copy, a disk that filled up); copy it again") from None  # fmt: skip
    if suffix == ".csv":
        # Lines less the header: an estimate, as quoted fields may hold line breaks.
        return DatasetInfo(max(0, count - 1), False, fmt)
    return DatasetInfo(count, exact, fmt)


def _last_line(path: Path, most: int = LAST_LINE_MAX) -> bytes | None:
    """The file's last line with any text, when it is at most `most` bytes (else None: not read)."""
    with open_regular(path) as f:
        end = f.seek(0, 2)
        f.seek(max(0, end - most - 2))
        tail = f.read().rstrip(b" \t\r\n")
    cut = tail.rfind(b"\n")
    return tail[cut + 1 :] if cut >= 0 or end <= most + 2 else None


_BLANK = re.compile(r"[ \t\n\r]*")
# A conversation's key as a key (a string followed by ':' is one): the word in a text is none (review BV).
_CONVERSATION_KEY = re.compile(rb'"(?:' + b"|".join(k.encode() for k in MESSAGE_KEYS) + rb')"\s*:')
KIND_ROWS = 50_000  # rows past the sample whose kind is looked at: of tiny rows, 8 MiB took seconds (review BV)


class _Kinds:
    """Whether each row past the `after` sampled ones is a conversation as they are (`conversations`): Invalid at
    the first that is not."""

    def __init__(self, conversations: bool, unit: str, columns: Mapping[str, str] | None, after: int | None) -> None:
        self.conversations = conversations
        self.unit = unit
        self.columns = columns
        self.after = after
        # With `columns`, the names renamed to a conversation's too, in any case (as `renamed` takes them).
        names = [*MESSAGE_KEYS, *(old for old, new in (columns or {}).items() if new in MESSAGE_KEYS)]
        either = b"|".join(re.escape(n.encode()) for n in names)
        self.key = re.compile(rb'"(?:' + either + rb')"\s*:', re.IGNORECASE) if columns else _CONVERSATION_KEY

    def row(self, number: int, row: Any) -> None:
        if not 0 < number - (self.after or 0) <= KIND_ROWS or not isinstance(row, dict):
            return
        if self.columns:
            row = renamed(row, self.columns)
        if any(k in row for k in MESSAGE_KEYS) != self.conversations:
            this = "not a conversation, where the rows before it are" if self.conversations else \
                "a conversation, where the rows before it are not"  # fmt: skip
            raise Invalid(f"{self.unit} {number} is {this}: ms-swift reads the file as conversations and drops the "
                          "other rows; use one format")  # fmt: skip

    def lines(self, head: bytes, complete: bool) -> None:
        """The head's JSON lines past the sample (KIND_ROWS of them): a line is decoded only when its bytes could
        make it the other kind (one naming a conversation key where none is expected, or none where one is), so
        the scan costs little more than reading them (decoding each line of 8 MiB took 100 ms a create)."""
        start = self.after or 0
        lines = head.split(b"\n", start + KIND_ROWS)
        if len(lines) > start + KIND_ROWS or not complete:
            lines = lines[:-1]  # the rest, past the rows looked at; or a line the head's read may have cut
        for number, raw in enumerate(lines[start:], start=start + 1):
            if bool(self.key.search(raw)) == self.conversations:
                continue
            if raw.strip():
                try:
                    self.row(number, _loads(raw))
                except ValueError as exc:
                    raise Invalid(f"line {number} is not valid JSON ({exc})") from None
                except RecursionError:
                    raise Invalid(f"line {number} is nested too deeply to be a data set row") from None


def _array_length(text: str, each: Callable[[int, Any], None] | None = None) -> int:
    """The rows of a JSON array, decoded one at a time: json.loads of the whole holds the GIL throughout (3 s for
    60 MB), and this runs in a thread beside the event loop, which it stalled that long. ValueError if the text
    is not one JSON array. `each(number, row)` is shown each row."""
    decoder = json.JSONDecoder()
    at = _BLANK.match(text).end()  # type: ignore[union-attr]
    if text[at : at + 1] != "[":
        raise ValueError("it does not start with '['")
    at = _BLANK.match(text, at + 1).end()  # type: ignore[union-attr]
    rows = 0
    if text[at : at + 1] != "]":
        while True:
            row, at = decoder.raw_decode(text, at)
            rows += 1
            if each is not None:
                each(rows, row)
            at = _BLANK.match(text, at).end()  # type: ignore[union-attr]
            mark = text[at : at + 1]
            if mark == "]":
                break
            if mark != ",":
                raise ValueError(f"',' or ']' expected at character {at}")
            at = _BLANK.match(text, at + 1).end()  # type: ignore[union-attr]
    if _BLANK.match(text, at + 1).end() != len(text):  # type: ignore[union-attr]
        raise ValueError(f"extra data after the array, at character {at + 1}")
    return rows
