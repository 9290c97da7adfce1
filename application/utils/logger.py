"""Loguru set-up: one console sink and one rotating file under LOG_DIR; stdlib logging routed into it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from loguru import logger


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
        logger.add(log_dir / f"{name}.log", level=level, rotation="50 MB", retention=10, enqueue=False)
    # Records below the sinks' level are not built at all: uvicorn's access line alone is a few % of a request.
    logging.basicConfig(handlers=[_InterceptHandler()], level=logger.level(level.upper()).no, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = [_InterceptHandler()]
        logging.getLogger(name).propagate = False
    # httpx logs every request's URL at INFO: a webhook's URL often carries its token.
    for quiet in ("httpx", "httpcore"):
        logging.getLogger(quiet).setLevel(max(logging.WARNING, logger.level(level.upper()).no))
