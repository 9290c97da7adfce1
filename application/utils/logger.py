"""Loguru set-up: one console sink and one rotating file under LOG_DIR; stdlib logging routed into it."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import TextIO

from loguru import logger

COMPLAIN_EVERY = 60.0  # seconds between two lines saying a log file cannot be written


class LogFile:
    """The file sink: rotated past `max_bytes` (the last `keep` kept as `<name>.1` ... `<name>.<keep>`). A write the
    disk refuses (full, read-only) costs one line on stderr a minute, and the line is dropped: with loguru's own
    file sink each one printed a traceback of ~2 KB to stderr, which under Docker lands on the same full disk."""

    def __init__(self, path: Path, max_bytes: int = 50 * 1024 * 1024, keep: int = 10) -> None:
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        self._complained = -math.inf
        # Opened now: a log file that cannot be opened at all stops the process as it starts (OSError).
        self._file: TextIO | None = open(path, "a", encoding="utf-8")

    def write(self, message: str) -> None:
        try:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # (kept open between lines)
            self._file.write(message)
            self._file.flush()
            if self._file.tell() > self.max_bytes:
                self._rotate()
        except OSError as exc:
            self.close()
            now = time.monotonic()
            if now - self._complained >= COMPLAIN_EVERY:
                self._complained = now
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(f"swift-api: cannot write {self.path} ({exc.strerror or exc}): log lines are "
                                     "dropped until it can\n")  # fmt: skip

    def _rotate(self) -> None:
        self.close()
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def stop(self) -> None:
        """Called by loguru as the sink is removed (logger.remove)."""
        self.close()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


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
    logger.add(sys.stderr, level=level, format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {process} | {message}")
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        logger.add(LogFile(log_dir / f"{name}.log"), level=level, colorize=False, enqueue=False)
    # Records below the sinks' level are not built at all: uvicorn's access line alone is a few % of a request.
    logging.basicConfig(handlers=[_InterceptHandler()], level=logger.level(level.upper()).no, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = [_InterceptHandler()]
        logging.getLogger(name).propagate = False
    # httpx logs every request's URL at INFO: a webhook's URL often carries its token.
    for quiet in ("httpx", "httpcore"):
        logging.getLogger(quiet).setLevel(max(logging.WARNING, logger.level(level.upper()).no))
