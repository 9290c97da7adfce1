"""Reading the end of, and following, swift's combined stdout+stderr log files.

Training logs reach hundreds of megabytes (tqdm rewrites its bar many times a second), so nothing
here reads a whole file.
"""

from __future__ import annotations

import os
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import BinaryIO

from application.utils.log_files import is_linked, open_in_place

# A log with no newline for megabytes (a tqdm bar that only ever writes \r) would otherwise make
# tail_lines read the whole file looking for line starts.
DEFAULT_TAIL_MAX_BYTES = 16 * 1024 * 1024
# What one line of a log may take where it is stored or sent (a failed job's tail and error, its events): a
# trainer that printed a 10 MB line made its job page 20 MB, and every list page holding it 3 MB.
STORED_LINE_CHARS = 4000
# What one line may take on a page of GET .../logs: a trainer's whole argument dump fits; a line of hundreds of
# megabytes (a bar that never printed a newline) made one line of a `limit=1` page up to 100 MB of JSON. The
# log stream and the log file itself (artifacts) have every byte.
PAGE_LINE_CHARS = 16 * 1024
# What a whole page's lines may take as JSON: a control character is six bytes there ("\\u0001"), so 1,100 lines of
# them made a 100 MB page (and a worker's memory grew by hundreds of MB under a few such requests).
PAGE_MAX_BYTES = 8 * 1024 * 1024


def newest_within(lines: list[str], max_bytes: int = PAGE_MAX_BYTES) -> list[str]:
    """The newest of `lines` whose JSON (escaped as ASCII: an upper bound) fits in `max_bytes`, oldest first."""
    kept, size = 0, 0
    for line in reversed(lines):
        size += len(encode_basestring_ascii(line)) + 1
        if size > max_bytes:
            break
        kept += 1
    return lines[len(lines) - kept :]


def clip_line(line: str, limit: int = STORED_LINE_CHARS) -> str:
    return line if len(line) <= limit else f"{line[:limit]} … ({len(line) - limit:,} more characters)"


def last_cr_segment(line: str) -> str:
    """What a terminal shows for a line tqdm rewrote with \\r: its last segment that has any text.

    tqdm clears its bar by writing blanks between two \\r, so a blank last segment says nothing.
    """
    if "\r" not in line:
        return line
    for segment in reversed(line.split("\r")):
        if segment.strip():
            return segment
    return ""


def _open(path: Path | str, in_place: bool) -> BinaryIO | None:
    """The file to read, None when it is missing (or, `in_place`, reached through a link: a job's log, see
    `log_files`)."""
    try:
        return open_in_place(path) if in_place else open(path, "rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        if in_place and is_linked(exc):
            return None
        raise


def _read_back(path: Path | str, newlines: int, block_size: int, max_bytes: int,
               in_place: bool = False) -> tuple[bytes, int, int] | None:  # fmt: skip
    """The file's end, read backwards by blocks until it holds more than `newlines` newlines, reaches the start
    or `max_bytes`: (those bytes, where they start, the file's size); None for a missing file."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    f = _open(path, in_place)
    if f is None:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        pos, blocks, seen = end, [], 0
        while pos > 0 and seen <= newlines and end - pos < max_bytes:
            size = min(block_size, pos, max_bytes - (end - pos))
            pos -= size
            f.seek(pos)
            blocks.append(f.read(size))
            seen += blocks[-1].count(b"\n")
    return b"".join(reversed(blocks)), pos, end


def tail_lines(path: Path | str, n: int, block_size: int = 65536, max_bytes: int = DEFAULT_TAIL_MAX_BYTES,
               line_chars: int | None = None, in_place: bool = False) -> list[str]:  # fmt: skip
    """The last `n` lines of a text log, read backwards by blocks from the end.

    Each line is shown as tqdm left it on screen (its last \\r segment), decoded with
    errors='replace', and without trailing whitespace. A missing file gives []. At most `max_bytes`
    are read, so the first line returned may be the tail end of a longer one. `line_chars`: each line
    clipped to that many characters (`clip_line`). `in_place`: a job's log, not read through a link (as missing).
    """
    if n <= 0:
        return []
    # n lines need n+1 newlines: the one that ends the line before the first, plus one that may
    # end the file. Reading one extra block in the no-final-newline case is harmless.
    found = _read_back(path, n, block_size, max_bytes, in_place)
    if found is None:
        return []
    data, pos, end = found
    if pos > 0:
        cut = data.find(b"\n")
        # Bytes before the first newline belong to a line that starts before what was read;
        # splitting bytes first also keeps a multi-byte character cut by the block edge out.
        if cut >= 0:
            data = data[cut + 1 :]
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data and (pos == 0 and end == 0):
        return []
    lines = data.split(b"\n")[-n:]
    found_lines = [last_cr_segment(raw.decode("utf-8", errors="replace")).rstrip() for raw in lines]
    return [clip_line(line, line_chars) for line in found_lines] if line_chars else found_lines


def page_lines(path: Path | str, n: int) -> list[str]:
    """A job log's last `n` lines as a page of GET .../logs shows them: each clipped to PAGE_LINE_CHARS, and no
    more of the newest than fit in PAGE_MAX_BYTES of JSON."""
    return newest_within(tail_lines(path, n, line_chars=PAGE_LINE_CHARS, in_place=True))


def tail_start(path: Path | str, n: int, block_size: int = 65536, max_bytes: int = DEFAULT_TAIL_MAX_BYTES,
               in_place: bool = False) -> int:  # fmt: skip
    """The byte offset where the last `n` lines of a log start (a last line without a newline counts), read
    backwards by blocks; 0 when it has no more than `n`. At most `max_bytes` are read: past them, the first
    line that starts inside them (or the end, when none does). A missing file gives 0."""
    found = _read_back(path, max(n, 0), block_size, max_bytes if n > 0 else 0, in_place)
    if found is None:
        return 0
    data, pos, end = found
    if n <= 0:
        return end
    # The last n lines start after the (n+1)-th newline from the end when the file ends with one, else the n-th.
    i = len(data)
    for _ in range(n + 1 if data.endswith(b"\n") else n):
        i = data.rfind(b"\n", 0, i)
        if i < 0:
            break
    if i >= 0:
        return pos + i + 1
    if pos == 0:
        return 0
    first = data.find(b"\n")  # bytes before it belong to a line that starts before what was read
    return pos + first + 1 if 0 <= first and pos + first + 1 < end else end


def read_from(path: Path | str, offset: int, max_bytes: int, in_place: bool = False) -> tuple[bytes, int]:
    """Bytes of a growing file from `offset` (at most `max_bytes`) and the offset to read from next.

    A missing file gives (b"", offset). A file now shorter than `offset` was replaced or truncated,
    so it is read again from the start.
    """
    if offset < 0:
        raise ValueError("offset must be >= 0")
    if max_bytes <= 0:
        return b"", offset
    f = _open(path, in_place)
    if f is None:
        return b"", offset
    with f:
        size = f.seek(0, os.SEEK_END)
        if size < offset:
            offset = 0
        f.seek(offset)
        data = f.read(max_bytes)
    return data, offset + len(data)
