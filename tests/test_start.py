"""`python start.py`: everything from one command on an embedded Redis, and one role at a time."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import psutil
import pytest
import redis

from start import metrics_folder
from tests.conftest import KEYS_SETTING, ROOT, ApiServer, _cmdline, job_body, kill_processes_under, wait_for


def test_one_command_runs_everything_on_an_embedded_redis_that_keeps_the_data(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path
) -> None:
    first = server_factory(env={"REDIS_URL": "", "DATA_DIR": str(tmp_path / "data")})
    health = first.http.get("/health").json()
    assert health["redis"]["embedded"] is True and health["scheduler"]["ok"] is True
    r = first.create(**job_body(workspace, "quick", num_gpus=0, auto_start=True,
                                training={"torch_dtype": "float32", "max_steps": 3}))  # fmt: skip
    assert r.status_code == 201, r.text
    first.wait_status("quick", "completed", timeout=30)
    assert first.proc is not None
    redis_server = [p for p in psutil.Process(first.proc.pid).children() if "redis-server" in " ".join(p.cmdline())]
    assert len(redis_server) == 1
    processes = first.processes() + redis_server  # not the runners: they outlive everything by design
    first.kill()  # SIGKILL: the embedded Redis and the scheduler die with it
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes),
             what="every process of the first start to end")  # fmt: skip
    second = server_factory(env={"REDIS_URL": "", "DATA_DIR": str(tmp_path / "data")}, prefix=first.prefix)
    assert second.job("quick")["status"] == "completed"  # append-only persistence: nothing lost


def test_a_single_role_needs_a_shared_redis(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path)}
    for role in ("api", "scheduler"):
        out = subprocess.run([sys.executable, str(ROOT / "start.py"), role], env=env, capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
        assert out.returncode == 1 and "REDIS_URL" in out.stderr and role in out.stderr, out.stderr
    out = subprocess.run([sys.executable, str(ROOT / "start.py"), "bogus"], env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 1 and "usage" in out.stderr
    # Asked for, the usage is an answer, not an error (it was exit 1, naming neither the roles nor the port).
    for ask in ("--help", "-h"):
        out = subprocess.run([sys.executable, str(ROOT / "start.py"), ask], env=env, capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
        assert out.returncode == 0 and "scheduler  the scheduler alone" in out.stdout and "APP_PORT" in out.stdout


def with_credentials(url: str, user: str, password: str) -> str:
    """`url` logging in as `user`: in its netloc, or, for the suite's own Redis on a unix socket (the README's test
    command, without TEST_REDIS_URL), as redis-py's query parameters (the netloc's were dropped: no login at all)."""
    if urlsplit(url).scheme == "unix":
        return f"{url}{'&' if '?' in url else '?'}username={quote(user)}&password={quote(password)}"
    return url.replace("redis://", f"redis://{user}:{password}@", 1)


def test_a_redis_that_refuses_the_servers_credentials_or_rights_stops_each_role_saying_what_to_change(
    redis_url: str, tmp_path: Path
) -> None:
    # A wrong password was worded as an outage ("try again when it is back"), for ever; a Redis 7 ACL user without
    # channel rights failed every create's script after its writes: a 503 for a job created and started.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "data"),
           "LOG_DIR": str(tmp_path / "logs"), "OUTPUT_ROOT": str(tmp_path / "output"), "REDIS_KEY_PREFIX": "refused",
           "APP_PORT": "1", "GPU_BACKEND": "simulated"}  # fmt: skip
    user = f"nochannels-{os.getpid()}"
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", user, "on", ">pw-0123456789", "~*", "+@all", "resetchannels")
    try:
        for password, said in (("pw-0123456789", "ACL SETUSER <user> ~refused:* &refused:* +@all"),
                               ("wrong-password", "Redis refused this server's credentials")):  # fmt: skip
            url = with_credentials(redis_url, user, password)
            for role in ("api", "scheduler", "all"):
                out = subprocess.run([sys.executable, str(ROOT / "start.py"), role], env={**env, "REDIS_URL": url},
                                     capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
                assert out.returncode == 2 and said in out.stderr and password not in out.stderr, (role, out.stderr)
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


async def test_a_redis_that_stops_taking_the_servers_password_is_not_an_outage_to_wait_out(
    app_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    wrong = with_credentials(redis_url, "nobody", "wrong-password")
    async with app_factory(scheduler=False, REDIS_URL=wrong, REDIS_RETRIES=0) as client:
        r = await client.get("/jobs")
        assert r.status_code == 503 and "Retry-After" not in r.headers, r.text
        # What to change is the operator's to read, in the log, from the worker's start on (it was told to every
        # caller, and nothing was logged above an INFO access line: hunt AP).
        assert r.json()["detail"].startswith("this server cannot use its Redis (its operator's setup"), r.text
        log = (tmp_path / "logs" / "swift-api.log").read_text()
        assert "WARNING  | " in log and "Redis refused this server's credentials" in log, log[-2000:]
        assert "requests are answered 503 until it does" in log and "wrong-password" not in log


def test_stopping_start_py_stops_its_processes_but_not_the_runners(server_factory: Callable[..., ApiServer],
                                                                  workspace: Path) -> None:  # fmt: skip
    server = server_factory(env={"STOP_GRACE_SECONDS": "1"})
    r = server.create(**job_body(workspace, "goes-on", auto_start=True, hang_after_steps=1))
    assert r.json()["status"] == "running", r.text
    job = wait_for(lambda: (j := server.job("goes-on"))["runner"] and j["pid"] and j, what="the run to start")
    running_stubborn = server.create(**job_body(workspace, "stubborn", auto_start=True, hang_after_steps=1,
                                                ignore_sigterm=True))  # fmt: skip
    assert running_stubborn.json()["status"] == "running"
    ours = server.processes()
    assert server.proc is not None
    # A client following the run's log, which never ends: it used to hold the stopped server up until it left.
    # A stop answers once its run has ended (here after the 1 s grace): cut short, it was a 500.
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as follower,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        follower.sendall(b"GET /api/v1/training/jobs/goes-on/logs/stream HTTP/1.1\r\nHost: t\r\n\r\n")
        assert follower.recv(4096).startswith(b"HTTP/1.1 200")
        stop = pool.submit(server.http.post, "/jobs/stubborn/stop")
        wait_for(lambda: server.job("stubborn")["stop_requested"], what="the stop to be asked")
        server.proc.send_signal(signal.SIGTERM)
        assert stop.result(30).status_code == 200
        server.proc.wait(30)
        # The stream ends whole at the stop, for its client to reconnect (it was cut at the end of the grace).
        rest = b""
        while chunk := follower.recv(65536):
            rest += chunk
        assert rest.endswith(b"\r\n0\r\n\r\n"), rest[-300:]
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ours),
             what="start.py's processes to end")  # fmt: skip
    assert psutil.pid_exists(job["runner"]["pid"]) and psutil.pid_exists(job["pid"])
    log = (server.workdir / f"server-{server.port}.log").read_text(errors="replace")
    assert "Cancel" not in log and "Exception in ASGI application" not in log


def test_sigterm_lets_start_py_stop_the_scheduler_and_this_hosts_runs_before_it_exits(
    server_factory: Callable[..., ApiServer], workspace: Path, redis_url: str
) -> None:
    # With one API worker uvicorn runs in start.py itself, and raised SIGTERM again after its own shutdown:
    # start.py died at once (-15), before its scheduler had sent this host's runs back to the queue (a
    # container's teardown then killed them: the job failed instead of resuming).
    server = server_factory(env={"STOP_RUNS_ON_SHUTDOWN": "true", "API_WORKERS": "1"})
    server.create(**job_body(workspace, "host", auto_start=True, step_seconds=0.1,
                             training={"max_steps": 200, "save_steps": 5}))  # fmt: skip
    wait_for(lambda: (server.job("host")["progress"]["current_step"] or 0) >= 7, what="a checkpoint")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(90) == 0
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    stored = json.loads(r.hget(f"{server.prefix}:job:host", "status") or "null")
    r.close()
    assert stored == "queued", stored  # back in the queue before start.py was gone


def test_the_scheduler_is_told_to_stop_as_the_stop_begins_not_once_the_api_has_drained(
    server_factory: Callable[..., ApiServer], workspace: Path, redis_url: str
) -> None:
    # A request in flight (an open stream, then) held the API for its whole grace before the scheduler was told:
    # the two graces one after the other outlasted `docker stop -t 60`, whose SIGKILL then came before this host's
    # runs went back to the queue. (Streams now end at once at a stop: a slow upload holds the API here.)
    from tests.test_files import multipart_upload

    server = server_factory(env={"STOP_RUNS_ON_SHUTDOWN": "true", "API_WORKERS": "2", "STOP_GRACE_SECONDS": "4"})
    server.create(**job_body(workspace, "drain", auto_start=True, step_seconds=0.1, training={"max_steps": 500}))
    wait_for(lambda: (server.job("drain")["progress"]["current_step"] or 0) >= 2, what="the run")
    head, body = multipart_upload("any-key")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as upload:
        upload.sendall(head + body[: len(body) // 2])  # (the rest never comes: the API drains it to its grace)
        wait_for(lambda: any(p.is_file() for p in (server.workdir / "uploads").rglob("*")), what="the upload's start")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        wait_for(lambda: json.loads(r.hget(f"{server.prefix}:job:drain", "status") or "null") == "queued",
                 timeout=60, what="the run back in the queue")  # fmt: skip
        r.close()
        upload.setblocking(False)
        try:
            ended = upload.recv(1) == b""
        except BlockingIOError:
            ended = False  # (still open: nothing came yet)
        assert not ended, "the run went back to the queue only once the API had let the upload go"
    assert server.proc.wait(90) == 0


def test_start_py_stops_when_its_embedded_redis_dies_so_that_its_supervisor_can_start_it_again(
    server_factory: Callable[..., ApiServer], tmp_path: Path
) -> None:
    # It lived on answering 503 for ever, and a container's restart policy never stepped in.
    server = server_factory(env={"REDIS_URL": "", "DATA_DIR": str(tmp_path / "data")})
    assert server.proc is not None
    [redis_server] = [p for p in psutil.Process(server.proc.pid).children() if "redis-server" in " ".join(p.cmdline())]
    redis_server.kill()
    assert server.proc.wait(60) == 1
    assert "the embedded redis-server exited" in server.server_log()


def test_start_py_stops_when_its_scheduler_keeper_is_stopped_by_someone_else(
    server_factory: Callable[..., ApiServer],
) -> None:
    # A SIGTERM that reached only the keeper (an operator's kill, a tool's) made it stop its scheduler and exit 0,
    # which start.py read as its own stop: it served on with no scheduler for ever (queued jobs never started).
    server = server_factory()
    assert server.proc is not None
    # (Where it listens is in its log: uvicorn's own line is off, and the port may be any.)
    assert f"ready on http://127.0.0.1:{server.port}: API under /api/v1/training" in server.server_log()
    server.scheduler_keeper().send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 1
    assert "the scheduler (start.py scheduler) exited" in server.server_log()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_stop_signal_to_all_of_start_py_at_once_is_a_stop_not_a_failure(
    server_factory: Callable[..., ApiServer], workers: str
) -> None:
    # A service manager may signal every process of the service at once (systemd's control-group stop): the
    # keeper may then end before start.py has finished its own stop, and that must not read as a death unbidden.
    server = server_factory(env={"API_WORKERS": workers})
    assert server.proc is not None
    keeper = server.scheduler_keeper()
    keeper.send_signal(signal.SIGTERM)
    keeper.wait(30)  # the keeper gone first: the order that tempts start.py to call it a failure
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.server_log()


def test_a_single_worker_start_py_serves_on_after_a_sighup_and_a_ctrl_c_stops_it_cleanly(
    server_factory: Callable[..., ApiServer],
) -> None:
    # With one API worker, a SIGHUP (a log rotation's) killed everything, which with API_WORKERS>1 only restarts
    # the workers; a Ctrl-C died of its SIGINT, with tracebacks, before its scheduler had stopped.
    server = server_factory(env={"API_WORKERS": "1"})
    proc = server.proc
    assert proc is not None
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP taken" in server.server_log() or proc.poll() is not None, what="the SIGHUP")
    assert proc.poll() is None and server.http.get("/health").status_code == 200
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    log = server.server_log()
    assert "Traceback" not in log and "stopped; runners go on" in log  # its scheduler stopped before it ended


def test_the_scheduler_role_serves_on_after_a_sighup(redis_url: str, tmp_path: Path) -> None:
    settings = ApiServer(redis_url, tmp_path)  # (its environment: never started)
    settings.http.close()
    output = tmp_path / "scheduler.out"
    with output.open("wb") as out:
        keeper = subprocess.Popen([sys.executable, str(ROOT / "start.py"), "scheduler"], cwd=ROOT, env=settings.env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: " leads " in output.read_text() or keeper.poll() is not None, what="the scheduler to lead")
        [scheduler] = psutil.Process(keeper.pid).children()
        # To the whole group, as a closed terminal sends it: the scheduler died of it and was started again.
        os.killpg(keeper.pid, signal.SIGHUP)
        wait_for(lambda: output.read_text().count("SIGHUP taken") == 2 or not scheduler.is_running(),
                 what="the SIGHUP")  # fmt: skip
        assert keeper.poll() is None and scheduler.is_running(), output.read_text()
        keeper.send_signal(signal.SIGTERM)
        assert keeper.wait(30) == 0, output.read_text()
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()
        kill_processes_under(tmp_path)


def test_a_single_worker_api_role_stopped_by_ctrl_c_exits_cleanly(redis_url: str, tmp_path: Path) -> None:
    settings = ApiServer(redis_url, tmp_path)  # (its environment: never started)
    settings.http.close()
    output = tmp_path / "api.out"
    env = {**settings.env, "API_WORKERS": "1"}
    with output.open("wb") as out:
        api = subprocess.Popen([sys.executable, str(ROOT / "start.py"), "api"], cwd=ROOT, env=env, stdout=out,
                               stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: "Application startup complete" in output.read_text() or api.poll() is not None,
                 what="the API to start")  # fmt: skip
        api.send_signal(signal.SIGINT)
        assert api.wait(30) == 0, output.read_text()  # (it died of its SIGINT, after a KeyboardInterrupt traceback)
        assert "Traceback" not in output.read_text()
    finally:
        if api.poll() is None:
            api.kill()
            api.wait()


def test_an_api_supervisor_killed_with_sigkill_leaves_no_metrics_folder_behind_once_started_again(
    redis_url: str, tmp_path: Path
) -> None:
    # Each start made a new random /tmp/swift-api-metrics-* that only a clean stop removed: a machine restarting its
    # API after kill -9s (the OOM killer) gathered one for good per start.
    settings = ApiServer(redis_url, tmp_path)  # (its environment: never started)
    settings.http.close()
    env = {**settings.env, "API_WORKERS": "2"}
    folder = metrics_folder(settings.port)  # (the port's own)
    output = tmp_path / "api.out"

    def run_until(stop: signal.Signals) -> None:
        with output.open("wb") as out:
            api = subprocess.Popen([sys.executable, str(ROOT / "start.py"), "api"], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_for(lambda: output.read_text().count("Application startup complete") == 2 or api.poll() is not None,
                     what="both API workers to start")  # fmt: skip
            for _ in range(4):
                httpx.get(f"http://127.0.0.1:{settings.port}/api/v1/training/health", timeout=10)
            wait_for(lambda: any(folder.iterdir()), what="the workers' metrics files")
            workers = psutil.Process(api.pid).children()
            api.send_signal(stop)
            api.wait(30)
            wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
                     what="the workers to end with their supervisor")  # fmt: skip
        finally:
            if api.poll() is None:
                api.kill()
                api.wait()

    try:
        run_until(signal.SIGKILL)
        assert folder.is_dir()  # (what a SIGKILL leaves: the next start on the port takes it again)
        run_until(signal.SIGTERM)
        assert not folder.exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # (not left in /tmp by a failure between the two)


def test_only_a_stop_signal_to_the_api_supervisor_counts_as_told_to_stop() -> None:
    """SIGHUP (restart the workers, as a log rotation sends), SIGTTIN and SIGTTOU reach the same queue: counted as
    a stop, a scheduler dying later was taken for part of a stop and the API served on without one."""
    import uvicorn

    import start

    supervisor = start._Multiprocess(uvicorn.Config("application.main:create_app", factory=True, workers=2),
                                     sockets=[])  # fmt: skip
    start.told_to_stop.clear()
    try:
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            supervisor.signal_queue.append(sig)
            supervisor.handle_signals()
        assert not start.told_to_stop.is_set()
        supervisor.signal_queue.append(signal.SIGTERM)
        supervisor.handle_signals()
        assert start.told_to_stop.is_set() and supervisor.should_exit.is_set()
    finally:
        start.told_to_stop.clear()


def test_a_redis_that_keeps_only_snapshots_is_warned_of(tmp_path: Path) -> None:
    # RDB only (stock redis.conf): back from its last snapshot, a stop since was undone and the job ran again, and a
    # run it forgot was started a second time (hunt, Redis rolled back); it was not warned of.
    from application.services.embedded_redis import find_redis_server
    from application.services.redis_service import _data_loss_warnings
    from tests.conftest import free_port

    binary = find_redis_server()
    assert binary
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "900 1",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)  # fmt: skip
    client = redis.Redis(port=port, decode_responses=True)
    try:
        wait_for(client.ping, what="the test's redis-server")
        assert _data_loss_warnings(client) == [
            "Redis keeps only its snapshots across a restart (appendonly no, save 900 1): a restart loses what was "
            "written since the last one; set appendonly yes"
        ]
        client.config_set("appendonly", "yes")
        assert _data_loss_warnings(client) == []
    finally:
        client.close()
        server.kill()
        server.wait(10)


def test_a_redis_that_would_lose_jobs_is_warned_of_at_start(tmp_path: Path) -> None:
    # With allkeys-lru, evicted job records stalled the queue and left GPUs leased to jobs no longer there; a Redis
    # without persistence lost every job at its restart: neither said a word (hunt).
    from application.services.embedded_redis import find_redis_server
    from tests.conftest import free_port

    binary = find_redis_server()
    assert binary
    port = free_port()
    redis_server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--maxmemory-policy", "allkeys-lru", "--dir", str(tmp_path)],
                                    stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: redis.Redis(port=port).ping(), what="the test's redis-server")
        with socket.socket() as busy:  # (so that the API stops right after its checks)
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "d"),
                   "LOG_DIR": str(tmp_path / "logs"), "OUTPUT_ROOT": str(tmp_path / "out"), "GPU_BACKEND": "simulated",
                   "APP_PORT": str(busy.getsockname()[1]), "REDIS_URL": f"redis://127.0.0.1:{port}/0"}  # fmt: skip
            out = subprocess.run([sys.executable, str(ROOT / "start.py"), "api"], env=env, capture_output=True,
                                 text=True, timeout=60, check=False)  # fmt: skip
        lines = out.stderr.strip().splitlines()
        assert lines[:2] == [
            "swift-api: warning: Redis evicts keys when full (maxmemory-policy allkeys-lru): jobs, leases and the "
            "queue can vanish; set maxmemory-policy noeviction",
            "swift-api: warning: Redis keeps nothing across its restart (appendonly no, no save points): every job "
            "is lost with it; set appendonly yes",
        ], out.stderr
    finally:
        redis_server.kill()
        redis_server.wait(10)


def test_a_low_soft_limit_on_open_files_is_raised_to_the_hard_one(server_factory: Callable[..., ApiServer]) -> None:
    # At a soft limit of 256, a worker reset every new connection (/health's too) once its clients held 256
    # files, without a word in any log, while the hard limit allowed far more (hunt BY).
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit on open files here is {hard}")
    server = server_factory(wrap=["sh", "-c", 'ulimit -Sn 256 && exec "$@"', "sh"])
    assert server.proc is not None
    limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
    soft_now, hard_now = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
    assert soft_now == hard_now and soft_now != "256", limits


def test_what_the_server_writes_is_its_users_alone(server_factory: Callable[..., ApiServer], workspace: Path,
                                                   tmp_path: Path) -> None:  # fmt: skip
    # At the operator's umask (022), every account on the host could read every team's uploads, checkpoints and
    # logs, and Redis's files (hunt DR): UMASK (077) masks what the server, its runners and swift write.
    server = server_factory(wrap=["sh", "-c", 'umask 022 && exec "$@"', "sh"])
    rows = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 20
    r = server.http.post("/files", files={"file": ("train.jsonl", rows, "application/octet-stream")})
    assert r.status_code == 201, r.text
    body = job_body(workspace, "private", auto_start=True, training={"max_steps": 3})
    assert server.create(**body).status_code == 201
    done = server.wait_status("private", "completed")
    wait_for(lambda: server.job("private")["export"]["status"] == "completed", what="the automatic export")
    written = [p for top in (Path(done["output_dir"]), tmp_path / "logs", tmp_path / "uploads")
               for p in [top, *top.rglob("*")]]  # fmt: skip
    assert any(p.suffix == ".jsonl" and "uploads" in p.parts for p in written), written
    assert any("checkpoint-" in p.name for p in written) and any(p.suffix == ".log" for p in written), written
    shared = [f"{oct(p.lstat().st_mode & 0o777)} {p}" for p in written if not p.is_symlink()
              and p.lstat().st_mode & 0o077]  # fmt: skip
    assert shared == [], "\n".join(shared)


def test_a_resource_tracker_started_again_has_no_secrets(server_factory: Callable[..., ApiServer]) -> None:
    # The API workers' resource tracker is dumpable and lives as long as the server: it is started without the
    # secrets (review DV). One that died (job code, as the server's user, may kill it) was started again by the
    # next worker spawned, from start.py's environment: API_KEYS and WEBHOOK_SECRET readable again (review DW).
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "WEBHOOK_SECRET": "hook-secret-0123456789abcdef",
                                 "API_WORKERS": "2"})  # fmt: skip

    def trackers() -> list[Any]:
        return [p for p in server.processes() if "resource_tracker" in " ".join(_cmdline(p))]

    first = trackers()
    assert first and not any({"API_KEYS", "WEBHOOK_SECRET"} & set(p.environ()) for p in first)
    for p in first:
        p.kill()
    worker = next(p for p in server.processes() if "multiprocessing" in " ".join(_cmdline(p)) and p not in first)
    worker.kill()  # uvicorn starts another, which starts a tracker
    wait_for(lambda: any(p.pid not in {f.pid for f in first} for p in trackers()), what="a tracker started again")
    again = [p for p in trackers() if p.pid not in {f.pid for f in first}]
    assert not any({"API_KEYS", "WEBHOOK_SECRET"} & set(p.environ()) for p in again), [p.environ() for p in again]
    wait_for(lambda: server.http.get("/health").status_code == 200, what="the API serving on")
