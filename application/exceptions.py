"""Domain errors carry their HTTP status; one handler in main.py turns them into `{"detail": ...}`."""

from __future__ import annotations

import json
from typing import Any

from application.services.refusals import Refusal, TransitionRefused


def error_json(content: Any) -> bytes:
    """An error answer's body, ASCII-escaped: a message may repeat the request's text, and a lone surrogate in it
    (JSON's "\\ud800") cannot be written as UTF-8 (the answer was a 500 and a reset connection)."""
    return json.dumps(content, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    status_code = 400

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class Unauthorized(ApiError):
    status_code = 401

    def __init__(self, detail: str) -> None:
        super().__init__(detail, {"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status_code = 403


class JobNotFound(ApiError):
    status_code = 404

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job '{job_id}' not found: list jobs with GET .../training/jobs")
        self.job_id = job_id


class NotFound(ApiError):
    """Something inside a job that is not there (an attempt it never made)."""

    status_code = 404


class Conflict(ApiError):
    status_code = 409


class RangeNotSatisfiable(ApiError):
    """A Range that starts past the end of the file; Content-Range says how long the file is."""

    status_code = 416

    def __init__(self, detail: str, size: int) -> None:
        super().__init__(detail, {"Content-Range": f"bytes */{size}"})


class Invalid(ApiError):
    status_code = 422


class TooLarge(ApiError):
    status_code = 413


class UnsupportedMediaType(ApiError):
    status_code = 415


class InsufficientStorage(ApiError):
    """The server could not store an upload (disk full, read-only data root)."""

    status_code = 507


class RequestTimeout(ApiError):
    status_code = 408


class TooMany(ApiError):
    status_code = 429

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail, {"Retry-After": str(max(1, round(retry_after)))})


class Unavailable(ApiError):
    """The server cannot do this now (ms-swift missing, ...): the detail says what an operator must fix."""

    status_code = 503


def refused(job_id: str, exc: TransitionRefused, detail: str) -> ApiError:
    """What a change the store refused answers: 404 when the job was deleted meanwhile, else 409 with `detail`
    (`{id}` and `{status}`, the job's status now, filled in)."""
    if exc.reason == Refusal.MISSING:
        return JobNotFound(job_id)
    return Conflict(detail.format(id=job_id, status=exc.current))
