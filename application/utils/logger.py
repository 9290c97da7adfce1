"""Loguru set-up: one console sink and one rotating file under LOG_DIR; stdlib logging routed into it."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger
from loguru._file_sink import FileSink  # (the sink loguru builds for a path; see LogFile)
from redis.exceptions import ResponseError

if TYPE_CHECKING:
    from loguru import Record

COMPLAIN_EVERY = 60.0  # seconds between two lines saying a log file cannot be written
# What may end or rewrite a log line inside a message: C0 controls but the tab (CR, LF, ESC), DEL, C1 controls
# (U+0085 NEL is a line break to Python's splitlines and Unicode-aware viewers, U+009B a CSI) and the Unicode line
# and paragraph separators. A client's X-Forwarded-For (believed from FORWARDED_ALLOW_IPS) reached uvicorn's
# access line as it came: "10.0.0.1<NEL>2026-... | INFO ... - 6.6.6.6:0 - ..." read as two lines, the second one
# forged (hunt ED).
_LINE_BREAKERS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def one_line(record: Record) -> None:
    """Loguru patcher: a record's message stays on its one line, its control characters shown escaped (\\x85).
    A traceback is the record's exception, formatted apart, and keeps its lines."""
    message = record["message"]
    if _LINE_BREAKERS.search(message):
        record["message"] = _LINE_BREAKERS.sub(_escaped, message)


class LogFile:
    """The file sink: loguru's own (rotated past 50 MB, the newest 10 old files kept), wrapped so that a write the
    disk refuses (full, read-only) costs one line on stderr a minute and the record is dropped. Added by its path,
    loguru printed "--- Logging error in Loguru Handler ---" and a ~2 KB traceback to stderr for every record,
    which under Docker lands on the same full disk.

    loguru's FileSink, not a rotation of our own: several API workers append to one file, and its rotation (a new
    file at once, old ones kept by time) loses none of a quiet worker's lines where a rotation by position did."""

    def __init__(self, path: Path, rotation: str = "50 MB", retention: int = 10) -> None:
        self.path = path
        self._complained = -math.inf
        # Opened now: a log file that cannot be opened at all stops the process as it starts (OSError).
        # watch: each write goes to the file at `path` now (one stat), not to the one this worker opened, which
        # another worker may have renamed as it rotated: then the two renamed each other's new files in turn, and
        # the current file held one worker's lines (review AT).
        self._sink = FileSink(str(path), rotation=rotation, retention=retention, watch=True)

    def write(self, message: str) -> None:
        try:
            try:
                self._sink.write(message)
            except FileNotFoundError:
                # Another worker rotated the shared file as this one did: its rename found no file (and its own
                # file was closed). Written again, into the file the other one started.
                self._sink.write(message)
        except OSError as exc:
            now = time.monotonic()
            if now - self._complained >= COMPLAIN_EVERY:
                self._complained = now
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(f"swift-api: cannot write {self.path} ({exc.strerror or exc}): log records are "
                                     "dropped until it can\n")  # fmt: skip

    def stop(self) -> None:
        """Called by loguru as the sink is removed (logger.remove)."""
        with contextlib.suppress(OSError):
            self._sink.stop()


class _InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(level: str, log_dir: Path | None, name: str = "swift-api") -> None:
    """Console sink, plus `<log_dir>/<name>.log` (the scheduler logs to scheduler.log, API workers to swift-api.log)."""
    logger.remove()
    logger.configure(patcher=one_line)
    # With the UTC offset: hosts (or containers) with another TZ wrote lines hours apart with nothing to say so.
    # Tracebacks without their frames' variables (loguru's `diagnose`): they printed a failed webhook's URLs, which
    # often carry a token, and whatever else a frame held (hunt BM).
    logger.add(sys.stderr, level=level, format="{time:YYYY-MM-DD HH:mm:ss.SSS Z} | {level: <7} | {process} | {message}",
               diagnose=False)  # fmt: skip
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        in_file = "{time:YYYY-MM-DD HH:mm:ss.SSS Z} | {level: <8} | {name}:{function}:{line} - {message}"
        logger.add(LogFile(log_dir / f"{name}.log"), level=level, colorize=False, enqueue=False, format=in_file,
                   diagnose=False)  # fmt: skip
    # Records below the sinks' level are not built at all: uvicorn's access line alone is a few % of a request.
    logging.basicConfig(handlers=[_InterceptHandler()], level=logger.level(level.upper()).no, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = [_InterceptHandler()]
        logging.getLogger(name).propagate = False
    # httpx logs every request's URL at INFO: a webhook's URL often carries its token.
    for quiet in ("httpx", "httpcore"):
        logging.getLogger(quiet).setLevel(max(logging.WARNING, logger.level(level.upper()).no))


class OutageLog:
    """Redis errors met again and again, as warnings in the log: at most one a minute for each kind of error (an
    outage fails every request, pass and sweep, with texts that differ by a detail), and at once for a new kind.
    `about`: what failed, each its own kind (a pass, a sweep)."""

    EVERY_SECONDS = 60.0

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def seen(self, exc: BaseException, text: str, about: str = "") -> None:
        now = time.monotonic()
        # Redis's own errors by their code too (MISCONF, NOPERM, OOM, READONLY: each the operator's to act on)
        code = str(exc).split(" ", 1)[0] if isinstance(exc, ResponseError) else ""
        kind = f"{about}|{type(exc).__module__}.{type(exc).__name__}:{code}"
        if now - self.last.get(kind, -math.inf) >= self.EVERY_SECONDS:
            self.last[kind] = now
            logger.warning("{}", text)
