"""Domain errors carry their HTTP status; one handler in main.py turns them into `{"detail": ...}`."""

from __future__ import annotations


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


class Invalid(ApiError):
    status_code = 422


class TooMany(ApiError):
    status_code = 429

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail, {"Retry-After": str(max(1, round(retry_after)))})
