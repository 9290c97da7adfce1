"""The server as the CLI sees it: where it is, one httpx client, and every failure turned into an exit code."""

from __future__ import annotations

import math
import os
import re
import stat
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from application.cli import partial

DEFAULT_URL = "http://127.0.0.1:8000"
API_PATH = "/api/v1/training"

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOLLOWED = 4  # `submit --follow`: the job was created, but following it failed (do not submit it again)
# A stop's or a pause's answer: longer than any stop grace in use, yet not for ever (a server that hangs).
WAIT_READ_TIMEOUT = 3600.0

# A stream is reconnected losslessly (Last-Event-ID), so a read timeout only costs a reconnect; it must merely
# outlast the server's heartbeat (15 s by default) so that an idle stream is not torn down every few seconds.
STREAM_READ_TIMEOUT = 60.0
# A create or an action whose connection closed before its answer is sent again under its Idempotency-Key, every
# RESEND_AFTER_SECONDS for up to RESEND_FOR_SECONDS: a server that restarts takes its port again within seconds.
RESEND_AFTER_SECONDS = 1.0
RESEND_FOR_SECONDS = 15.0
# Each read or write of an upload (the server answers once it has checked the whole file: rows counted)
UPLOAD_STEP_TIMEOUT = 600.0
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]*\Z")  # what a Bearer token can carry


class CliError(Exception):
    """A message for the user and the exit code that goes with it; for a refused request, the HTTP status and the
    seconds its Retry-After asked to wait (None when it named none)."""

    def __init__(self, message: str, code: int, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_after = retry_after


def api_root(url: str) -> str:
    """The API's base URL: a URL whose path ends in /training is taken as it is (every API prefix's routes are under
    .../training); one ending in /api/v1 or /api gets the rest; any other is the server's root, at a proxy's
    sub-path too (http://host/swift), and gets /api/v1/training."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise CliError(f"bad server URL {url!r}: {e}", EXIT_USAGE) from e
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CliError(f"bad server URL {url!r}: want http(s)://host[:port][/path]", EXIT_USAGE)
    # (httpx takes these, percent-encoding what no host name holds: they failed later as "cannot reach")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise CliError(f"bad server URL {url!r}: the port must be 1-65535", EXIT_USAGE)
    if "%" in parsed.host and ":" not in parsed.host:
        raise CliError(f"bad server URL {url!r}: {parsed.host!r} is not a host name or address", EXIT_USAGE)
    url, path = url.rstrip("/"), parsed.path.rstrip("/")
    if path.endswith("/training"):
        return url
    # (the README's API_PREFIX, /api/v1, given without /training: its rest)
    given = next((p for p in ("/api/v1", "/api") if path.endswith(p)), "")
    return url + API_PATH[len(given) :]


def job_path(job_id: str, suffix: str = "") -> str:
    # quote(safe=""): an id with '?' must not reach another route; the server then names what is wrong.
    # '.' and '..' are path segments quote keeps and the URL then drops ("status .." asked for GET /jobs); a '/'
    # (even as %2F) splits the path, which then matches no route at all.
    if job_id in ("", ".", "..") or "/" in job_id:  # ('': an unset $JOB, which asked for GET /status)
        raise CliError(f"'{job_id}' is not a job id: list your jobs with `ls`", EXIT_USAGE)
    return f"/jobs/{quote(job_id, safe='')}{suffix}"


def shown_url(url: str | httpx.URL) -> str:
    """`url` as an error may print it: without a password written into it (the key never goes in a URL)."""
    parsed = httpx.URL(str(url))
    return str(parsed.copy_with(userinfo=b"***")) if parsed.userinfo else str(url)


def unreachable(url: str, error: Exception, lost_for: float | None = None) -> CliError:
    """`lost_for`: a stream's server, which answered before, has not been back for that long (no URL to fix)."""
    reason = str(error) or type(error).__name__
    if (parsed := httpx.URL(url)).userinfo:
        reason = reason.replace(parsed.userinfo.decode("ascii", "replace"), "***")
    if lost_for is not None:
        return CliError(f"no stream from {shown_url(url)} for {lost_for:.0f} s ({reason}): the job goes on there; "
                        "follow it again once the server answers", EXIT_UNREACHABLE)  # fmt: skip
    return CliError(f"cannot reach the server at {shown_url(url)}: {reason} (set SWIFT_API_URL or --url)",
                    EXIT_UNREACHABLE)  # fmt: skip


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    return str(detail if detail is not None else body)[:500]


def _is_json(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").partition(";")[0].strip().lower() == "application/json"


_PROXY_HINTS = {
    413: "a proxy in front of the server refused the body as too large (nginx: client_max_body_size)",
    502: "a proxy in front of the server could not reach it: is the server running?",
    503: "a proxy in front of the server could not reach it: is the server running?",
    504: "a proxy in front of the server gave up waiting for its answer, which may still come to pass (nginx: "
         "proxy_read_timeout); look at the job before trying again",
}  # fmt: skip


# The server's refusals name its routes and fields; the CLI's user typed commands and flags (hunt CZ).
_ROUTE_COMMANDS = {("POST", "resume"): "resume", ("POST", "start"): "start", ("POST", "stop"): "stop",
                   ("POST", "pause"): "pause", ("POST", "export"): "export", ("GET", "logs"): "logs",
                   ("GET", "artifacts"): "artifacts", ("GET", "status"): "status"}  # fmt: skip
# `POST .../resume`, `POST .../jobs/{id}/resume`, `POST .../jobs/pr/resume`; not `GET .../logs?attempt=N`,
# which no command does.
_ROUTE = re.compile(r"\b(GET|POST) \.\.\./(?:jobs/[^/\s?]+/)?([a-z]+)(?![\w?/{])")


def commands_named(detail: str) -> str:
    def add(m: re.Match[str]) -> str:
        command = _ROUTE_COMMANDS.get((m.group(1), m.group(2)))
        return f"{m.group(0)} (swift-api {command})" if command else m.group(0)

    return _ROUTE.sub(add, detail)


_FIELD = re.compile(r"[A-Za-z_][^\s:;]*(?=: | )")  # (a key as typed: `--set lora-rank=8`, review DV)
_SET_FIELD = re.compile(r"(?:\bset |\) and )training\.([A-Za-z_]\w*)(?! \(--)")


def _flags_named(detail: str, flags: Mapping[str, str]) -> str:
    """A 422's `field: what is wrong` parts with the flag that sent the field: `query.cursor (--after): ...`.
    `flags` maps a field to its flag; `training.*` names the flag of the fields under `training` (`--set`), which
    is followed by the field's own name."""

    def named(part: str) -> str:
        # (the field leads its part, followed by ': ' or by words: "training.lr is not an argument of ...: did
        # you mean ...?" got its flag in the middle of its message, the message repeated: review DS)
        m = _FIELD.match(part)
        if m is None:
            return part
        field = m.group(0).partition("=")[0]  # (`num_gpus=9 can never be met` names num_gpus: hunt EO)
        under, _, rest = field.partition(".")
        name = rest.partition(".")[0]  # (an item's place names its list's flag: `gpu_ids.1`, hunt DS)
        flag = flags.get(field) or flags.get(under) or (f"{flags['training.*']} {name}" if under == "training" and
                                                        name and "training.*" in flags else None)  # fmt: skip
        return f"{m.group(0)} ({flag}){part[m.end() :]}" if flag else part

    named_parts = "; ".join(named(part) for part in detail.split("; "))
    if "training.*" not in flags:
        return named_parts
    # A message that tells what to set: "set training.model_type (one of ...) and training.template (...)" (hunt EO).
    return _SET_FIELD.sub(lambda m: f"{m.group(0)} ({flags['training.*']} {m.group(1)})", named_parts)


def check(response: httpx.Response, flags: Mapping[str, str] | None = None) -> None:
    """4xx: the request was wrong (usage, exit 2); 5xx: the server cannot serve (exit 3). An answer without JSON
    (a web server's 404 page, a redirect, a proxy's 502) is no refusal of this server's: exit 3, its page unshown."""
    if response.is_success:
        return
    if not _is_json(response):
        # A proxy's own answers (the server's are JSON): they said to check the URL, which was right.
        hint = _PROXY_HINTS.get(response.status_code, "is it a swift-api server? (SWIFT_API_URL or --url)")
        raise CliError(f"{shown_url(response.request.url)} answered {response.status_code} {response.reason_phrase}, "
                       f"not JSON: {hint}", EXIT_UNREACHABLE, response.status_code,
                       _retry_after(response))  # fmt: skip
    detail = _detail(response)
    if response.status_code == 404 and (detail == "Not Found" or detail.startswith("Not Found: no route")):
        # The framework's own answer for a path no route has (every refusal of ours says what to do): the URL
        # given is this server's, but not its API's root.
        # (A server with an API_PREFIX of its own is found by its API's URL only: hunt CN.)
        raise CliError(f"{shown_url(response.request.url)} is no route of this server (404): give the server's root "
                       f"(http://host:port, or a proxy's http://host/path) or its API (...{API_PATH}; with an "
                       "API_PREFIX of its own, .../<API_PREFIX>/training) as SWIFT_API_URL or --url",
                       EXIT_UNREACHABLE, response.status_code)  # fmt: skip
    if response.status_code == 401:
        detail += " (the CLI sends the key given as SWIFT_API_KEY or --key)"
    detail = commands_named(_flags_named(detail, flags) if flags and response.status_code == 422 else detail)
    code = EXIT_UNREACHABLE if response.status_code >= 500 else EXIT_USAGE
    raise CliError(f"{response.status_code} {response.reason_phrase}: {detail}", code, response.status_code,
                   _retry_after(response))  # fmt: skip


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (an HTTP date, which this server never sends, counts as none)."""
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def not_swift_api(url: str, answered: str = "JSON") -> CliError:
    return CliError(f"{shown_url(url)} did not answer {answered}: is it a swift-api server?", EXIT_UNREACHABLE)


def may_be_done(url: str, method: str, path: str, what: str) -> CliError:
    return CliError(f"{shown_url(url)} {what} to {method} {path}: it may have been done all the same; look before "
                    "trying again (`swift-api status <job>`)", EXIT_UNREACHABLE)  # fmt: skip


def _discard(partial: Path | None) -> None:
    if partial is not None:
        partial.unlink(missing_ok=True)


class Api:
    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:  # fmt: skip
        self.url = api_root(url or os.environ.get("SWIFT_API_URL") or DEFAULT_URL)
        # An explicit --key '' is no key (to try a call unauthenticated), not SWIFT_API_KEY's (hunt CJ).
        key = (os.environ.get("SWIFT_API_KEY", "") if key is None else key).strip()  # (a key file's line break)
        if not _HEADER_SAFE.match(key):
            # Never echoed: the error would carry the key into a CI log.
            raise CliError("the API key (SWIFT_API_KEY or --key) holds spaces, control or non-ASCII characters, which "
                           "no key has: check how it was copied", EXIT_USAGE)  # fmt: skip
        # A URL with a user and password (a proxy's basic auth) takes the Authorization header: the key then goes
        # as X-API-Key, which the server reads as well (it was dropped, and the server answered 401: hunt CZ).
        header = "X-API-Key" if httpx.URL(self.url).userinfo else "Authorization"
        headers = {header: key if header == "X-API-Key" else f"Bearer {key}"} if key else {}
        # Stop and pause answer only once the run has ended (up to the server's stop grace), hence a long read.
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
                                 transport=transport)  # fmt: skip
        self.flags: Mapping[str, str] = {}  # the command's flags by the field each sends (`naming`)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    @contextmanager
    def naming(self, flags: Mapping[str, str]) -> Iterator[None]:
        """Refusals of the calls made meanwhile name the command's flags beside the API's fields."""
        self.flags = flags
        try:
            yield
        finally:
            self.flags = {}

    def call(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None,
             wait: bool = False) -> Any:  # fmt: skip
        """The answer's JSON (None for an empty answer such as DELETE's 204). `wait`: up to WAIT_READ_TIMEOUT for
        the answer (the server bounds its own wait: a stop's, up to its STOP_GRACE_SECONDS and 10 s)."""
        timeout = httpx.Timeout(WAIT_READ_TIMEOUT, connect=10.0) if wait else httpx.USE_CLIENT_DEFAULT
        # A create or an action whose answer was lost is sent again under the same key, which the server answers
        # with the first one's answer: "cannot reach the server" for a job created all the same, and a second job
        # for the same command run again (hunt CZ).
        headers = {"Idempotency-Key": uuid.uuid4().hex} if method == "POST" else {}
        sent_at: float | None = None  # when a request of these was first sent and its answer lost
        while True:
            try:
                response = self.http.request(method, path, params=params, json=body, timeout=timeout, headers=headers)
                break
            except httpx.UnsupportedProtocol as e:
                raise CliError(f"bad server URL {shown_url(self.url)}: {e}", EXIT_USAGE) from e
            except httpx.ReadTimeout as e:
                if method == "GET":
                    raise unreachable(self.url, e) from e
                # Sent and not answered in time: not "cannot reach the server", which says it was not done.
                raise may_be_done(self.url, method, path, "did not answer in time") from e
            except httpx.TransportError as e:
                never_sent = isinstance(e, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
                if method == "GET" or (never_sent and sent_at is None):
                    raise unreachable(self.url, e) from e
                # The answer lost (or, sent again, a server that restarts): under its key, until it answers.
                sent_at = sent_at if sent_at is not None else time.monotonic()
                if not headers or time.monotonic() - sent_at > RESEND_FOR_SECONDS:
                    raise may_be_done(self.url, method, path, f"did not answer ({e})") from e
                time.sleep(RESEND_AFTER_SECONDS)
            except httpx.DecodingError as e:  # (a body its Content-Encoding does not describe)
                raise not_swift_api(self.url) from e
        check(response, self.flags)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as e:
            raise not_swift_api(self.url) from e

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None, *, wait: bool = False) -> Any:
        return self.call("POST", path, body=body, wait=wait)

    def upload(self, path: str, file: Path, purpose: str) -> Any:
        """POST /files with the file streamed from disk (httpx sends a file object in chunks)."""
        try:
            with file.open("rb") as fh:
                # No bound on the whole upload (a big file takes its time), but on each step of it: a server that
                # takes the connection and then neither reads nor answers held the command for ever.
                response = self.http.post(path, files={"file": (file.name, fh)}, data={"purpose": purpose},
                                          timeout=httpx.Timeout(UPLOAD_STEP_TIMEOUT, connect=10.0))  # fmt: skip
        except OSError as e:
            raise CliError(f"cannot read {file}: {e.strerror}", EXIT_USAGE) from e
        except httpx.ReadTimeout as e:
            raise CliError(
                f"{shown_url(self.url)} did not answer the upload within {UPLOAD_STEP_TIMEOUT:g} s: it may "
                "have been stored all the same; look with `swift-api files`",
                EXIT_UNREACHABLE,
            ) from e
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from e
        except httpx.DecodingError as e:
            raise not_swift_api(self.url) from e
        check(response)
        try:
            return response.json()
        except ValueError as e:
            raise not_swift_api(self.url) from e

    def download(self, path: str, target: Path | None, again: bool = True) -> int:
        """GET `path` into `target` (None: standard output); the file's bytes. A new or plain file is written next
        to it first, then renamed over it (no one reads half a file); one the network cut is kept there, and the
        next download of it asks for the rest (`partial`). Anything else (a FIFO, a device, a symlink) is written
        into, as `curl -o` does: the rename replaced /dev/null, a pipe or a link with a file."""
        try:
            plain = target is not None and stat.S_ISREG(target.lstat().st_mode)
        except FileNotFoundError:
            plain = True
        except OSError as e:
            raise CliError(f"cannot write {target}: {e.strerror}", EXIT_USAGE) from e
        if target is None or not plain:
            return self._download(path, target, None, again)
        try:
            lock = partial.DownloadLock(target)
        except BlockingIOError as e:
            raise CliError(f"{target} is being downloaded by another command: wait for it to end, or stop it",
                           EXIT_USAGE) from e  # fmt: skip
        except OSError as e:
            raise CliError(f"cannot write {target}: {e.strerror}", EXIT_USAGE) from e
        try:
            return self._download(path, target, partial.kept_or_new(target), again)
        finally:
            lock.release()

    def _download(self, path: str, target: Path | None, part: partial.Partial | None, again: bool) -> int:
        """`download` into `part` (None: written into `target`, or standard output), the lock on it held."""
        name = "standard output" if target is None else str(target)
        written = 0
        started = False
        timeout = httpx.Timeout(STREAM_READ_TIMEOUT, connect=10.0)
        try:
            with self.http.stream("GET", path, timeout=timeout, headers=part.headers() if part else {}) as response:
                if response.status_code == 416 and part is not None and part.offset:
                    # (what was kept is no start of the file: all of it again, once)
                    complete = response.headers.get("content-range") == f"bytes */{part.offset}"
                    if complete and target is not None:
                        part.path.replace(target)
                        return part.offset
                    _discard(part.path)
                    if again and target is not None:
                        return self._download(path, target, partial.kept_or_new(target), again=False)
                if not response.is_success:
                    response.read()
                    check(response)
                started = True
                appending = False
                if part is not None and target is not None:
                    part, appending = partial.for_response(part, target, response)
                    written = part.offset if appending else 0
                elif response.status_code == 206:
                    raise CliError("the server answered part of the file only: run the command again", EXIT_UNREACHABLE)
                into = part.path if part is not None else target  # (a FIFO, a device, a link: written into)
                sink = into.open("ab" if appending else "wb") if into is not None else nullcontext(sys.stdout.buffer)
                with sink as fh:
                    for chunk in response.iter_bytes():
                        fh.write(chunk)
                        written += len(chunk)
                    fh.flush()
                expected = partial.expected_size(response)
            if expected is not None and written != expected:
                # (a connection closed at a chunk's end reads as a whole answer: renamed over the target, a short
                # file was said to be downloaded)
                raise httpx.ReadError(f"the answer ended after {written:,} of its {expected:,} bytes")
            if part is not None and target is not None:
                part.path.replace(target)
        except partial.NotTheRest as e:
            raise CliError(f"the server sent another part of the file ({e}) than the rest asked for: run the command "
                           "again", EXIT_UNREACHABLE) from e  # fmt: skip
        except BrokenPipeError:  # `-o - | head`: the reader has gone, as for every other command (exit 0)
            _discard(part.path if part else None)
            raise
        except OSError as e:
            _discard(part.path if part else None)
            raise CliError(f"cannot write {name}: {e.strerror}", EXIT_USAGE) from e
        except httpx.TransportError as e:
            kept = started and part is not None and part.tag is not None and written > 0
            if not kept:
                _discard(part.path if part else None)
            if started:  # (it answered: "cannot reach the server" sent people looking at the wrong thing, hunt CA)
                then = "run the command again: it goes on from there" if kept else "run the command again"
                raise CliError(f"the download was cut after {written:,} bytes ({e}): {then}; a client that reads "
                               "nothing for CLIENT_STALL_SECONDS (a slow pipe, say) is dropped",
                               EXIT_UNREACHABLE) from e  # fmt: skip
            raise unreachable(self.url, e) from e
        except BaseException as exc:  # a refusal, or Ctrl-C: nothing half-written stays behind (gigabytes for a tar)
            # (but what a cut kept, while the server is away for a moment: the next try goes on from it)
            away = isinstance(exc, CliError) and exc.status in (429, 502, 503, 504)
            if not (away and part is not None and part.tag is not None):
                _discard(part.path if part else None)
            raise
        return written

    @contextmanager
    def stream(self, path: str, params: dict[str, Any], last_id: str | None) -> Iterator[Iterator[str]]:
        """The lines of a text/event-stream answer. Transport errors are raised as they are: the caller decides
        between reconnecting and giving up."""
        headers = {"Last-Event-ID": last_id} if last_id else {}
        timeout = httpx.Timeout(STREAM_READ_TIMEOUT, connect=10.0)
        with self.http.stream("GET", path, params=params, headers=headers, timeout=timeout) as response:
            if not response.is_success:
                response.read()
                check(response)
            # A proxy's or another server's page answered 200: its lines are no stream, and reading them as one
            # reconnected for ever.
            if response.headers.get("content-type", "").partition(";")[0].strip().lower() != "text/event-stream":
                raise not_swift_api(self.url, "an event stream")
            yield _lines(response.iter_text())


def _lines(chunks: Iterator[str]) -> Iterator[str]:
    """SSE lines. Not httpx's iter_lines: that splits like str.splitlines, also on form feeds, \\x1c-\\x1e and
    U+2028, which a log line may hold and which SSE does not treat as line ends."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line.removesuffix("\r")
    if pending:
        yield pending.removesuffix("\r")
