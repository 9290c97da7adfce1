"""The error answers of the API: one handler per kind of exception, each a JSON `{"detail": ...}` that says what to
change (domain errors carry their own status, `exceptions.ApiError`), and a 503 for a Redis that is away or
refuses, whose outages the operator sees in the log (`OutageLog`)."""

from __future__ import annotations

import errno
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from loguru import logger
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from application.api.route_path import route_path
from application.config import Settings
from application.exceptions import ApiError, error_json
from application.models.file_model import FILE_ID_HELP
from application.models.job_request import JOB_ID_HELP
from application.services.redis_service import lost_reply_detail, may_have_run, redis_refusal
from application.utils.logger import OutageLog

# A Redis this server may not use as configured (a wrong password, a missing ACL right): the operator's to fix,
# told in the log; the caller learns only that it is not theirs.
REDIS_REFUSED_DETAIL = "this server cannot use its Redis (its operator's setup: see the server's log): try again later"


class ErrorResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return error_json(content)


# The refusals a 422 lists: a body of 60,000 unknown keys (1 MB) was answered with each, twice (9 MB).
ERRORS_SHOWN = 20


# What a query, path or header value that does not match its pattern should be, in words: the regex was the
# message, and a bad cursor never reached parse_cursor's plain one (hunt CJ).
PATTERN_WORDS = {
    "cursor": "not one this server gave: pass a page's next_cursor as it came",
    "after": "not an event id: pass the id of the last event already seen, as it came (such as 1733450000000-0)",
    "owner": "an owner's name is 1-64 characters: letters, digits, '_', '.', '-'",
    "job_id": f"not a job id: {JOB_ID_HELP}",
    "file_id": f"not a file id: {FILE_ID_HELP}",
    "Idempotency-Key": "1-255 printable ASCII characters, no spaces: a key of your own per request (a UUID)",
}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    errors = exc.errors()
    for err in errors[:ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        given = err.get("input")
        if isinstance(given, float) and not math.isfinite(given):
            msg = f"{given} is not a number this field takes: send a finite number"
        elif err.get("type") == "string_pattern_mismatch" and (words := _pattern_words(err.get("loc", ()))):
            msg = words
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field: remove it (see the schema at /docs)"
        elif err.get("type") == "json_invalid":
            where = err.get("loc", ("body", None))[-1]
            reason = (err.get("ctx") or {}).get("error", "not JSON")
            loc, msg = "body", f"not valid JSON ({reason}, at character {where}): send one JSON object"
        elif err.get("type") in ("model_attributes_type", "dict_type") and tuple(err.get("loc", ())) == ("body",):
            # What curl -d sends without -H: form-encoded text, never read as JSON.
            msg = "send one JSON object, with the header Content-Type: application/json"
        parts.append(f"{loc}: {msg}")
    if len(errors) > ERRORS_SHOWN:
        parts.append(f"and {len(errors) - ERRORS_SHOWN} more")
    return "; ".join(parts)


def _pattern_words(loc: tuple[Any, ...] | list[Any]) -> str | None:
    return PATTERN_WORDS.get(str(loc[-1])) if len(loc) == 2 and loc[0] in ("query", "path", "header") else None


def _without_script(exc: Exception) -> str:
    """Redis's error less the script's hash and line ("script: cd3c1c…, on @user_script:9."): our internals, of no
    use to a caller (hunt CI)."""
    return re.sub(r"\s*script: [0-9a-f]{40}, on @user_script:\d+\.?", "", str(exc)).strip() or str(exc)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods of the resource at `path`, as the published schema lists them.

    The most specific documented path wins: /queue/process is its own resource, although /queue/{job_id}
    also matches it. Paths outside the schema fall back to what the routes answer.
    """
    matching: list[tuple[int, list[str]]] = []
    for template, ops in app.openapi()["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            matching.append((template.count("{"), sorted(m.upper() for m in ops)))
    if matching:
        fewest = min(n for n, _ in matching)
        return sorted({m for n, methods in matching if n == fewest for m in methods})
    allowed: list[str] = []
    for method in _METHODS:
        scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": []}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def install_error_handlers(app: FastAPI, settings: Settings, outages: OutageLog) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return ErrorResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors: list[dict[str, Any]] = [
            {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")),
             "type": str(e.get("type"))}
            for e in exc.errors()[:ERRORS_SHOWN]
        ]  # fmt: skip
        return ErrorResponse({"detail": _validation_message(exc), "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route that matched the path; list them all.
            headers["Allow"] = ", ".join(_allowed_methods(app, route_path(request.scope, settings.ROOT_PATH)))
        detail = str(exc.detail)
        if exc.status_code == 400 and isinstance(exc.__cause__, (RecursionError, ValueError)):
            # FastAPI's "There was an error parsing the body": JSON its parser gave up on, said plainly.
            cause = exc.__cause__
            why = str(cause)[:100]
            if isinstance(cause, RecursionError):
                why = "nested too deeply"
            elif isinstance(cause, UnicodeDecodeError):  # (JSON is UTF-8, whatever charset a Content-Type names)
                why = f"byte {cause.start} is not UTF-8: JSON is sent as UTF-8, whatever charset it declares"
            elif "digits" in why:
                why = "a number with more than 4300 digits"
            detail = f"body: not JSON this server can read ({why}): send one JSON object"
        path = route_path(request.scope, settings.ROOT_PATH)
        if exc.status_code == 404 and detail == "Not Found" and not path.startswith("/static/"):
            # No route has the path: "curl host:8000/health" got a bare "Not Found" (hunt BM). Still "Not Found"
            # first, which clients (the CLI) tell a wrong URL by.
            root = settings.ROOT_PATH  # (behind a proxy at a sub-path)
            api = f"{root}{settings.API_PREFIX}/training"
            detail = (f"Not Found: no route answers {request.method} {request.url.path[:200]}; this server's API is "
                      f"under {api} (its health: {api}/health), and {root}/docs lists its routes")  # fmt: skip
            if any(ord(c) < 32 or ord(c) == 127 for c in path):
                # A newline in a file's path matched no route (Starlette's paths stop at one), and the message
                # showed the path without it: another path than the one asked for (hunt CP).
                detail = ("Not Found: the path holds a control character (a newline, a tab, ...), which no route "
                          "or artifact name here takes: percent-encode only printable characters")  # fmt: skip
        return ErrorResponse({"detail": detail}, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> Response:
        # The client hung up mid-body (a cut upload): what was received is already cleaned up; a traceback
        # logged as an error for each would let any client fill the logs.
        logger.info("{} {}: the client disconnected before its request body ended", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        # (a wrong password is a ConnectionError to redis-py: not one to wait out)
        refused = redis_refusal(exc, settings.REDIS_KEY_PREFIX)
        # The operator's to see (these were INFO access lines alone); the error's text, with Redis's address, is
        # not the caller's.
        outages.seen(exc, f"requests answered 503: {refused or f'Redis does not answer ({exc})'}")
        if refused:
            return JSONResponse({"detail": REDIS_REFUSED_DETAIL}, status_code=503)
        if request.method not in ("GET", "HEAD") and may_have_run(exc):
            # Sent, and its answer lost: "try again" would do it twice, or be refused for what it already did (no
            # Retry-After, as an Idempotency-Key's kept answer has none).
            return JSONResponse({"detail": lost_reply_detail(request.method, exc)}, status_code=503)
        return JSONResponse({"detail": "Redis does not answer; try again when it is back"}, status_code=503,
                            headers={"Retry-After": "5"})  # fmt: skip

    @app.exception_handler(OSError)
    async def _out_of_files(_: Request, exc: OSError) -> JSONResponse:
        # A worker at its limit on open files failed wherever a request opened one (/proc for /system/status):
        # a bare 500 with a traceback, for what is the load of the moment (hunt BY). Any other stays a 500.
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise exc
        outages.seen(exc, f"requests answered 503: this API worker has run out of open files ({exc})")
        return ErrorResponse({"detail": "the server has too many connections open right now: try again shortly"},
                             status_code=503, headers={"Retry-After": "5"})  # fmt: skip

    @app.exception_handler(RedisError)
    async def _redis_error(_: Request, exc: Exception) -> JSONResponse:
        # e.g. a read-only replica or OOM: the store cannot take the change now
        refused = redis_refusal(exc, settings.REDIS_KEY_PREFIX)
        outages.seen(exc, f"requests answered 503: {refused or f'Redis refused an operation ({exc})'}")
        detail = REDIS_REFUSED_DETAIL if refused else f"Redis refused the operation ({_without_script(exc)})"
        return JSONResponse({"detail": detail}, status_code=503)
