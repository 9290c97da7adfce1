"""The `swift-api` CLI as a user runs it: a subprocess against a real server (fake swift, simulated GPUs),
judged by its exit code and what it prints. Streams are also checked in-process for reconnects."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from application.cli.app import action
from application.cli.client import Api, CliError, api_root, job_path
from application.cli.follow import tail, watch
from application.cli.output import Output
from application.cli.render import duration, gpus, text
from application.cli.sse import follow
from application.services.streams import _visible
from tests.conftest import ADMIN_KEY, ALICE_KEY, KEYS_SETTING, ROOT, ApiServer, free_port, job_body, wait_for


def cli(port: int, *args: str, key: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SWIFT_API_URL": f"http://127.0.0.1:{port}", "COLUMNS": "200"}
    env.pop("SWIFT_API_KEY", None)
    if key:
        env["SWIFT_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "application.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def cli_json(port: int, *args: str) -> Any:
    r = cli(port, "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def submit_args(workspace: Path, name: str, *extra: str, **fake_swift: Any) -> list[str]:
    body = job_body(workspace, name, **fake_swift)
    return ["submit", "--model", body["model_path"], "--data", body["data_path"], "--output-dir", name,
            "--job-id", name, *extra]  # fmt: skip


# ---- submit --follow ----------------------------------------------------------------------------------------


def test_submit_follow_exits_0_when_the_job_completes(server: ApiServer, workspace: Path) -> None:
    r = cli(server.port, *submit_args(workspace, "cli-ok", "--priority", "7", "--set", "max_steps=8",
                                      "--set", "logging_steps=1", "--set", "learning_rate=2e-4",
                                      "--set", "save_only_model=false", "--set", "time_limit=1h", "--follow",
                                      step_seconds=0.01))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cli-ok completed" in r.stdout and "8/8" in r.stdout
    job = server.job("cli-ok")
    assert job["status"] == "completed" and job["progress"]["current_step"] == 8 and job["priority"] == 7
    # --set routes training parameters into `training` (typed from JSON) and create fields to the top level.
    assert job["training"]["max_steps"] == 8 and job["training"]["learning_rate"] == 2e-4
    assert job["training"]["save_only_model"] is False and job["time_limit_seconds"] == 3600


def test_submit_follow_exits_1_when_the_job_fails(server: ApiServer, workspace: Path) -> None:
    r = cli(server.port, *submit_args(workspace, "cli-bad", "--set", "max_steps=10", "--set", "logging_steps=1",
                                      "--follow", fail_at_step=3))  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cli-bad failed" in r.stdout
    job = server.job("cli-bad")
    assert job["status"] == "failed" and job["error_message"] and job["error_message"] in r.stderr


def test_text_the_terminals_encoding_cannot_hold_is_escaped_not_a_traceback(server: ApiServer, workspace: Path) -> None:
    # A Windows console or redirect in GBK (no emoji), cp1252 (no CJK): `status` and `--json` were a traceback and exit
    # 1 ("the job failed"), `logs` blamed the server ("not what a swift-api server sends", exit 3).
    message = "RuntimeError: CUDA 内存不足 🎉"
    assert cli(server.port, *submit_args(workspace, "cli-gbk", "--follow", fail_at_step=2,
                                         fail_message=message)).returncode == 1  # fmt: skip
    env = {**os.environ, "SWIFT_API_URL": f"http://127.0.0.1:{server.port}", "COLUMNS": "200"}
    for encoding in ("gbk", "ascii"):
        for args in (["status", "cli-gbk"], ["--json", "status", "cli-gbk"], ["logs", "cli-gbk", "--lines", "3"]):
            r = subprocess.run([sys.executable, "-m", "application.cli", *args], cwd=ROOT, capture_output=True,
                               env={**env, "PYTHONIOENCODING": encoding}, timeout=60)  # fmt: skip
            assert r.returncode == 0 and b"Traceback" not in r.stderr, (encoding, args, r.stderr)
            if args[0] == "--json":  # JSON's own escapes, which any reader takes
                assert json.loads(r.stdout)["error_message"] == message, (encoding, r.stdout)
            else:
                assert b"\\U0001f389" in r.stdout, (encoding, args, r.stdout)


# ---- reading jobs -------------------------------------------------------------------------------------------


def test_json_ls_status_watch_and_rm_of_a_finished_job(server: ApiServer, workspace: Path) -> None:
    created = server.create(
        **job_body(workspace, "done", auto_start=True, training={"max_steps": 5, "logging_steps": 1})
    )
    assert created.status_code == 201, created.text
    server.wait_status("done", "completed")

    listed = cli_json(server.port, "ls", "--status", "completed")
    assert [j["job_id"] for j in listed["jobs"]] == ["done"] and listed["total"] == 1
    assert cli_json(server.port, "ls", "--status", "running")["jobs"] == []
    assert cli_json(server.port, "status", "done")["status"] == "completed"
    human = cli(server.port, "ls")
    assert human.returncode == 0 and "done" in human.stdout and "completed" in human.stdout
    assert "completed" in cli(server.port, "status", "done").stdout
    # A job yet to run shows how long it should take, and from what.
    assert server.create(**job_body(workspace, "later", time_limit="90m")).status_code == 201
    listing = cli(server.port, "ls").stdout
    row = next((line for line in listing.splitlines() if line.split()[:1] == ["later"]), listing)
    assert "~1:30:00 time_limit" in row, row
    assert row.split()[3:5] == ["1", "gpu"], row  # asked for, not held: not to be read as GPU #1
    # Held, they are named as GPUs (a bare "0" read like a count), in `status` as in `ls` (hunt CN).
    held = {"status": "running", "gpu_ids": [0], "num_gpus": 1}
    assert gpus(held) == "gpu 0" and gpus({**held, "gpu_ids": [0, 1], "num_gpus": 2}) == "gpus 0,1"
    assert gpus({**held, "status": "failed"}) == "1 gpu" and gpus({"num_gpus": 0}) == "cpu"
    shown = cli(server.port, "status", "done").stdout
    # (it was blank for a CPU job, then "cpu" for this one-GPU job once it ended: hunt CZ)
    assert re.search(r"gpus\s+1 gpu\s*$", shown, re.MULTILINE), shown
    # Past the first page: the footer names the next one, and --after reaches it (only --limit, up to 500, was
    # there: hunt AR).
    first = cli(server.port, "ls", "--limit", "1").stdout
    assert "1 of 2 jobs; the next page: ls --limit 1 --after " in first, first  # (its filters kept: hunt AW)
    after = first.rsplit("--after ", 1)[1].split()[0]
    rest = cli_json(server.port, "ls", "--limit", "1", "--after", after)
    assert [j["job_id"] for j in rest["jobs"]] == ["done"] and rest["next_cursor"] is None
    # An 80-column terminal cut the job id to 'qwen2.5…': the id is what every other command takes (hunt AW).
    long_id = "qwen2.5-7b-instruct-alpaca-lora-r16"
    assert server.create(**job_body(workspace, long_id)).status_code == 201
    env = {**os.environ, "SWIFT_API_URL": f"http://127.0.0.1:{server.port}", "COLUMNS": "80"}
    narrow = subprocess.run([sys.executable, "-m", "application.cli", "ls"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    # Folded onto more lines in its column, not cut, and the other columns still shown (review AX: a column held
    # at the id's width squeezed them to nothing).
    rows = narrow.stdout.splitlines()
    start, end = rows[0].index("JOB"), rows[0].index("STATUS")
    at = next((i for i, row in enumerate(rows) if i and long_id.startswith(row[start:end].strip() or "-")), 0)
    job_column = "".join(row[start:end].strip() for row in rows[at : at + 8])
    assert at and job_column.startswith(long_id), narrow.stdout
    assert "pending" in rows[at] and "later" in narrow.stdout and "done" in narrow.stdout, narrow.stdout
    assert all(name in rows[0] for name in ("GPUS", "STEP", "LOSS", "MODEL")), rows[0]

    # Off a terminal, plain lines: where the job stands, then its end (the bar drew nothing in a CI log: hunt CN).
    plain = cli(server.port, "watch", "done")
    assert plain.returncode == 0 and plain.stdout.splitlines()[-1].startswith("done completed 5/5"), plain.stdout
    # A finished job's progress stream replays its history, then ends: JSON Lines, one per point.
    r = cli(server.port, "watch", "done", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [p["step"] for p in lines[:-1]] == [1, 2, 3, 4, 5]
    assert lines[-1]["event"] == "end" and lines[-1]["status"] == "completed"
    assert lines[-1]["progress"]["current_step"] == 5

    assert cli(server.port, "rm", "done").returncode == 0
    gone = cli(server.port, "status", "done")
    assert gone.returncode == 2 and "done" in gone.stderr


def test_a_piped_listing_has_one_whole_line_per_job(server: ApiServer, workspace: Path) -> None:
    name = "a-job-id-longer-than-an-eighty-column-table-leaves-room-for"
    assert server.create(**job_body(workspace, name, job_id=name)).status_code == 201
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "SWIFT_API_KEY")}
    r = subprocess.run([sys.executable, "-m", "application.cli", "ls"], cwd=ROOT, capture_output=True, text=True,
                       env={**env, "SWIFT_API_URL": f"http://127.0.0.1:{server.port}"}, timeout=90)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:] if "jobs" not in line]  # (less the footer)
    assert [row[:2] for row in rows] == [[name, "pending"]], r.stdout  # so that `awk '{print $1}'` gets the id


def test_logs_follow_prints_every_line_and_ends_with_the_job(server: ApiServer, workspace: Path) -> None:
    body = job_body(workspace, "chatty", step_seconds=0.05, auto_start=True,
                    training={"max_steps": 20, "logging_steps": 1})  # fmt: skip
    assert server.create(**body).json()["status"] == "running"
    r = cli(server.port, "logs", "chatty", "-f")
    assert r.returncode == 0, r.stderr
    assert "completed" in r.stderr
    log = Path(server.job("chatty")["log_file"]).read_bytes()
    assert r.stdout.splitlines() == [_visible(raw) for raw in log.split(b"\n")[:-1]]

    last = server.http.get("/jobs/chatty/logs", params={"limit": 5}).json()["lines"]
    assert cli(server.port, "logs", "chatty", "--lines", "5").stdout.splitlines() == last
    assert cli_json(server.port, "logs", "chatty", "--lines", "3")["count"] == 3


def test_logs_of_a_quantized_export_are_its_export_jobs(server: ApiServer, workspace: Path) -> None:
    body = job_body(workspace, "q", auto_start=True, training={"max_steps": 4, "save_steps": 2})
    assert server.create(**body).status_code == 201
    # A job with no export: a usage error, not an empty log (exit 0) or "export none" (exit 1, "the job failed").
    assert server.create(**job_body(workspace, "idle")).status_code == 201
    for flags in ((), ("-f",)):
        none = cli(server.port, "logs", "idle", "--export", *flags)
        assert none.returncode == 2 and "job idle has no export" in none.stderr, (flags, none.stderr)
    wait_for(lambda: (j := server.job("q"))["status"] == "completed" and j["export"]["status"] == "completed",
             what="the run and its automatic export")  # fmt: skip
    r = server.http.post("/jobs/q/export", json={"checkpoint": "checkpoint-2", "quant_bits": 4, "quant_method": "bnb"})
    assert r.status_code == 200, r.text
    # It said "export none" at once: the quantized export runs as a job of its own, with the log.
    followed = cli(server.port, "logs", "q", "--export", "-f")
    assert followed.returncode == 0 and "runs as job q-quant" in followed.stderr, followed.stderr
    assert "q-quant: completed" in followed.stderr, followed.stderr
    log = Path(server.job("q-quant")["log_file"]).read_bytes()
    assert followed.stdout.splitlines() == [_visible(raw) for raw in log.split(b"\n")[:-1]] != []
    last = cli(server.port, "logs", "q", "--export", "--lines", "3")
    assert last.stdout.splitlines() == followed.stdout.splitlines()[-3:], last.stderr


# ---- steering -----------------------------------------------------------------------------------------------


def test_a_stop_that_takes_longer_than_the_clients_read_timeout_is_waited_for(
    server_factory: Callable[..., ApiServer], workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The server answers a stop once the run has ended, up to its STOP_GRACE_SECONDS (any length): the client's read
    # timeout (60 s) ended `swift-api stop` with "cannot reach the server" (exit 3) for a stop under way.
    server = server_factory(env={"STOP_GRACE_SECONDS": "3"})
    slow = job_body(workspace, "slow", auto_start=True, hang_after_steps=1, ignore_sigterm=True)
    assert server.create(**slow).json()["status"] == "running"
    wait_for(lambda: server.job("slow")["pid"], what="its process")
    with Api(f"http://127.0.0.1:{server.port}", timeout=1.0) as api:
        assert action("stop")(api, argparse.Namespace(job_id="slow"), Output(as_json=True)) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "stopped"


def test_priority_queue_pause_resume_stop_and_watch(server: ApiServer, workspace: Path) -> None:
    hog = job_body(workspace, "hog", step_seconds=0.1, auto_start=True, num_gpus=2,
                   training={"max_steps": 2000, "save_steps": 2, "logging_steps": 1})  # fmt: skip
    assert server.create(**hog).json()["status"] == "running"
    waiter = server.create(**job_body(workspace, "waiter", auto_start=True))
    assert waiter.json()["status"] == "queued", waiter.text

    r = cli(server.port, "priority", "waiter", "9")
    assert r.returncode == 0 and "priority 9" in r.stdout, r.stderr
    assert server.job("waiter")["priority"] == 9
    assert cli_json(server.port, "queue")["entries"][0]["job_id"] == "waiter"
    assert "waiter" in cli(server.port, "queue").stdout
    # A queue longer than a page says which positions these are and how to go on (it showed the first 100, no
    # more: hunt AW).
    assert server.create(**job_body(workspace, "waiter-two-with-a-long-name", auto_start=True)).status_code == 201
    paged = cli(server.port, "queue", "--limit", "1")
    assert "positions 1-1; the next page: queue --limit 1 --offset 1" in paged.stdout, paged.stdout
    assert "waiter-two-with-a-long-name" in cli(server.port, "queue", "--offset", "1").stdout
    refused = cli(server.port, "priority", "waiter", "42")
    assert refused.returncode == 2 and "priority" in refused.stderr

    wait_for(lambda: (server.job("hog")["progress"]["current_step"] or 0) >= 3, what="hog to pass a checkpoint")
    env = {**os.environ, "SWIFT_API_URL": f"http://127.0.0.1:{server.port}"}
    with following(env, ["watch", "hog"]) as watcher, following(env, ["logs", "hog", "-f"]) as tailer:
        said = {"watch": lines_of(watcher.stdout), "logs": lines_of(tailer.stderr), "log": lines_of(tailer.stdout)}
        wait_for(lambda: said["watch"], what="watch to show where the job stands")  # (then the pause is news)
        paused = cli(server.port, "pause", "hog")
        assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
        assert server.job("hog")["status"] == "paused"
        # Both followers say so, and follow on (a paused job showed "running": hunt CZ).
        wait_for(lambda: any(line.startswith("hog paused: still followed") for line in said["watch"]),
                 what="watch to say the job is paused")  # fmt: skip
        wait_for(lambda: any(line.startswith("-- hog paused") for line in said["logs"]), what="logs -f to say it")
        assert watcher.poll() is None and tailer.poll() is None
        assert "will be redone" not in paused.stdout  # the steps lost are said once, in the message
        shown = cli(server.port, "status", "hog")
        assert shown.returncode == 0 and "paused" in shown.stdout and "eta" not in shown.stdout, shown.stdout
        assert re.search(r"gpus\s+2 gpus", shown.stdout), shown.stdout  # (it said "cpu": hunt CZ)
        resumed = cli(server.port, "resume", "hog")
        assert resumed.returncode == 0, resumed.stderr
        assert server.job("hog")["status"] in ("queued", "running")
        stopped = cli(server.port, "stop", "hog")
        assert stopped.returncode == 0, stopped.stderr
        assert watcher.wait(timeout=60) == 1 and tailer.wait(timeout=60) == 1
    final = server.job("hog")["status"]
    assert final in ("stopped", "cancelled")
    out = "\n".join(said["watch"])
    assert f"hog {final}" in out and any(line.startswith("hog running") for line in said["watch"]), out


@contextmanager
def following(env: dict[str, str], args: list[str]) -> Iterator[subprocess.Popen[str]]:
    """A CLI command that follows a job, killed if the test ends before it does (Popen's own exit waited for it:
    a failed assertion hung the test until its timeout)."""
    with subprocess.Popen([sys.executable, "-m", "application.cli", *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def lines_of(stream: Any) -> list[str]:
    """The lines a follower prints, as it prints them (read in a thread)."""
    got: list[str] = []
    threading.Thread(target=lambda: got.extend(line.rstrip("\n") for line in stream), daemon=True).start()
    return got


# ---- exit codes ---------------------------------------------------------------------------------------------


def test_exit_3_when_no_server_listens() -> None:
    port = free_port()
    for args in (["ls"], ["watch", "some-job"], ["logs", "-f", "some-job"]):
        r = cli(port, *args, timeout=30)
        assert r.returncode == 3, (args, r.stdout, r.stderr)
        assert "cannot reach the server" in r.stderr


def test_exit_2_for_usage_errors_and_refused_requests(server: ApiServer, workspace: Path) -> None:
    missing = cli(server.port, "submit", "--data", "d.jsonl", "--output-dir", "x")
    assert missing.returncode == 2 and "--model" in missing.stderr
    assert cli(server.port, "ls", "--status", "sleeping").returncode == 2
    # Past what the API takes: the flag and its bounds are named, not the API's query parameter (`query.limit`).
    for args, flag, most in ((["ls", "--limit", "501"], "--limit", 500), (["logs", "x", "--lines", "10001"], "--lines",
                                                                          10_000)):  # fmt: skip
        too_many = cli(server.port, *args)
        assert too_many.returncode == 2 and f"argument {flag}: must be from 1 to {most}" in too_many.stderr, args
    outside = cli(server.port, "download", "some-job", "../../etc/passwd")
    assert outside.returncode == 2 and "without '..' parts" in outside.stderr, outside.stderr
    bad_set = cli(server.port, *submit_args(workspace, "x", "--set", "max_steps"))
    assert bad_set.returncode == 2 and "key=value" in bad_set.stderr

    # The refusal names the flag that sent the field too (hunt CZ: only `training.warp_speed`, `query.cursor`).
    unknown = cli(server.port, *submit_args(workspace, "y", "--set", "warp_speed=9"))
    assert unknown.returncode == 2 and "training.warp_speed (--set warp_speed): " in unknown.stderr, unknown.stderr
    # A number past a float's range is sent as the text typed, which the server refuses by name (a traceback).
    huge = cli(server.port, *submit_args(workspace, "y", "--set", "lora_rank=1e999"))
    assert huge.returncode == 2 and "training.lora_rank (--set lora_rank): " in huge.stderr, huge.stderr
    assert "Traceback" not in huge.stderr
    item = cli(server.port, *submit_args(workspace, "y", "--set", 'gpu_ids=[0, "x"]'))
    assert item.returncode == 2 and "gpu_ids.1 (--set gpu_ids): " in item.stderr, item.stderr
    limit = cli(server.port, *submit_args(workspace, "y", "--set", "time_limit=soon"))
    assert limit.returncode == 2 and "time_limit (--set time_limit): " in limit.stderr, limit.stderr
    cursor = cli(server.port, "ls", "--after", "x" * 300)
    assert cursor.returncode == 2 and "query.cursor (--after): " in cursor.stderr, cursor.stderr
    detail = server.http.get("/jobs/nope/status").json()["detail"]
    not_found = cli(server.port, "status", "nope")
    assert not_found.returncode == 2 and detail in not_found.stderr
    assert server.http.get("/jobs").json()["total"] == 0


@pytest.mark.parametrize("args", [["/"], ["."]])
def test_a_download_with_no_file_name_to_write_is_a_usage_error(args: list[str]) -> None:
    # The whole output folder has no name to save it under: this was a ValueError traceback (exit 1).
    r = cli(free_port(), "download", "some-job", *args, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "names no file to write" in r.stderr and "-o FILE" in r.stderr and "Traceback" not in r.stderr


def test_the_api_key_is_sent_as_a_bearer_token(server_factory: Callable[..., ApiServer]) -> None:
    server = server_factory(env={"API_KEYS": KEYS_SETTING})
    refused = cli(server.port, "ls")
    assert refused.returncode == 2 and "401" in refused.stderr
    assert cli(server.port, "ls", key=ALICE_KEY).returncode == 0
    assert cli(server.port, "--key", ALICE_KEY, "queue").returncode == 0
    # A proxy's user and password in the URL take the Authorization header: the key goes as X-API-Key (it was
    # dropped: 401, hunt CZ).
    behind = f"http://proxyuser:proxypw@127.0.0.1:{server.port}"
    r = subprocess.run([sys.executable, "-m", "application.cli", "--url", behind, "--key", ALICE_KEY, "--json", "ls"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "jobs" in json.loads(r.stdout), r.stderr


def test_signing_key_prints_the_key_alone_and_rotates_it(server_factory: Callable[..., ApiServer]) -> None:
    # What verifies a job's own notifications, for a receiver's configuration: it took curl (review DW).
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "WEBHOOK_SECRET": "hook-secret-0123456789abcdef"})
    shown = cli(server.port, "signing-key", key=ALICE_KEY)
    assert shown.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}\n", shown.stdout), (shown.stdout, shown.stderr)
    rotated = cli(server.port, "signing-key", "--rotate", key=ALICE_KEY)
    assert rotated.returncode == 0 and "rotated (generation 1)" in rotated.stderr, rotated.stderr
    assert re.fullmatch(r"[0-9a-f]{64}\n", rotated.stdout) and rotated.stdout != shown.stdout
    now = json.loads(cli(server.port, "--json", "signing-key", key=ALICE_KEY).stdout)
    assert now["signing_key"] == rotated.stdout.strip() and now["owner"] == "alice" and now["generation"] == 1
    # An admin replaces another owner's key (review EA: only through the API before); --owner alone shows no one's.
    by_admin = cli(server.port, "signing-key", "--rotate", "--owner", "alice", key=ADMIN_KEY)
    assert by_admin.returncode == 0 and "rotated (generation 2)" in by_admin.stderr, by_admin.stderr
    assert json.loads(cli(server.port, "--json", "signing-key", key=ALICE_KEY).stdout)["signing_key"] == \
        by_admin.stdout.strip()  # fmt: skip
    alone = cli(server.port, "signing-key", "--owner", "alice", key=ADMIN_KEY)
    assert alone.returncode == 2 and "--owner goes with --rotate" in alone.stderr, alone.stderr
    bare = server_factory()  # (no WEBHOOK_SECRET)
    none = cli(bare.port, "signing-key")
    assert none.returncode == 2 and "WEBHOOK_SECRET" in none.stderr, none.stderr


@pytest.mark.parametrize(("given", "root"), [
    ("http://h:8000", "http://h:8000/api/v1/training"),
    ("http://h:8000/", "http://h:8000/api/v1/training"),
    ("h:8000", "http://h:8000/api/v1/training"),
    ("https://h/proxy/api/v1/training/", "https://h/proxy/api/v1/training"),
    ("http://h:8000/training", "http://h:8000/training"),  # (API_PREFIX="")
    # A server behind a proxy at a sub-path: that is its root (it was taken for the API: every command a 404).
    ("https://h/swift", "https://h/swift/api/v1/training"),
    ("https://h/teams/swift/", "https://h/teams/swift/api/v1/training"),
    ("http://h:8000/api/v1", "http://h:8000/api/v1/training"),  # (the README's API_PREFIX)
    ("https://h/swift/api/", "https://h/swift/api/v1/training"),
])  # fmt: skip
def test_a_server_root_gets_the_api_path_and_a_url_of_the_api_is_kept(given: str, root: str) -> None:
    assert api_root(given) == root


@pytest.mark.parametrize("url", ["ftp://h", "http://[bad", "http://127.0.0.1:99999", "http://a b"])
def test_a_bad_server_url_is_a_usage_error(url: str) -> None:
    # (the last three were tried, and said "cannot reach the server": exit 3)
    with pytest.raises(CliError) as caught:
        api_root(url)
    assert caught.value.code == 2


# ---- a dropped stream ---------------------------------------------------------------------------------------


class Dropped(httpx.SyncByteStream):
    """A response body whose connection breaks after `chunks` (mid-message)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        raise httpx.ReadError("connection reset by peer")


def test_a_dropped_stream_resumes_from_the_last_event_id(capsys: pytest.CaptureFixture[str]) -> None:
    asked: list[str | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("Last-Event-ID"))
        sse = {"content-type": "text/event-stream"}
        if len(asked) == 1:
            broken = Dropped([b"id: 4\ndata: one\n\n: keep-alive\n\n", b"id: 8\ndata: two\n\nid: 14\ndata: thr"])
            return httpx.Response(200, headers=sse, stream=broken)
        return httpx.Response(
            200, headers=sse, content=b'id: 14\ndata: three\n\nevent: end\ndata: {"status": "stopped"}\n\n'
        )

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        assert tail(api, "job", "train", Output(as_json=False)) == 1
    printed = capsys.readouterr()
    assert printed.out.splitlines() == ["one", "two", "three"]
    assert asked == [None, "8"] and "stopped" in printed.err


def test_a_stream_that_never_connected_is_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with Api("http://swift-api.test", transport=httpx.MockTransport(refuse)) as api, pytest.raises(CliError) as caught:
        list(follow(api, "/jobs/job/progress/stream"))
    assert caught.value.code == 3


class Clock:
    """sse's time: sleeping moves it on at once, so that a test of backoffs and give-ups takes no time. A client
    that would wait for ever fails the test instead."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        assert len(self.slept) < 200, "the client never gives up"
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    from application.cli import sse

    fake = Clock()
    monkeypatch.setattr(sse, "time", fake)
    return fake


def test_a_429_on_a_reconnect_waits_for_its_retry_after_and_goes_on(
    clock: Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    # A killed API worker's stream slots are still counted for a while: the reconnect was refused with a 429,
    # and `logs -f` / `watch` ended with exit 2 although the job ran on.
    asked: list[str | None] = []
    sse = {"content-type": "text/event-stream"}

    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("Last-Event-ID"))
        if len(asked) == 1:
            return httpx.Response(200, headers=sse, stream=Dropped([b"id: 4\ndata: one\n\n"]))
        if len(asked) == 2:
            detail = {"detail": "owner 'alice' already has 1 streams open"}
            return httpx.Response(429, headers={"Retry-After": "5"}, json=detail)
        end = b'id: 9\ndata: two\n\nevent: end\ndata: {"status": "completed"}\n\n'
        return httpx.Response(200, headers=sse, content=end)

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        assert tail(api, "job", "train", Output(as_json=False)) == 0
    assert capsys.readouterr().out.splitlines() == ["one", "two"]
    assert asked == [None, "4", "4"] and clock.slept[-1] == 5


def test_a_429_before_the_stream_ever_connected_is_a_refusal(clock: Clock) -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "5"}, json={"detail": "already has 1 streams open"})

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        list(follow(api, "/jobs/job/logs/stream"))
    assert caught.value.code == 2 and "streams open" in str(caught.value) and clock.slept == []


def test_a_page_that_is_no_event_stream_is_not_a_swift_api_server(clock: Clock) -> None:
    # A proxy's or another server's HTML page, answered 200: `logs -f` read it as a stream that kept closing, and
    # reconnected for ever.
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/html"}, content=b"<html><body>hi</body></html>\n")

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        list(follow(api, "/jobs/job/logs/stream"))
    assert caught.value.code == 3 and "is it a swift-api server?" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [(404, {"content-type": "text/html"}, b"<!DOCTYPE HTML><html><body>File not found</body></html>"),
     (301, {"location": "http://elsewhere/"}, b""), (501, {"content-type": "text/html"}, b"<html>nope</html>")],
    ids=["page-404", "redirect", "page-501"],
)  # fmt: skip
def test_an_error_page_that_is_no_json_is_not_a_swift_api_server(status: int, headers: dict[str, str],
                                                                 body: bytes) -> None:  # fmt: skip
    # Another web server at the URL: `ls` exited 2 ("the request was wrong") and printed its whole page.
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, content=body)

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        api.get("/jobs")
    assert (
        caught.value.code == 3 and "is it a swift-api server?" in str(caught.value) and str(status) in str(caught.value)
    )
    assert "<" not in str(caught.value)


def test_a_refusal_in_json_is_still_a_usage_error() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Job 'x' not found"})

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        api.get("/jobs/x")
    assert caught.value.code == 2 and str(caught.value) == "404 Not Found: Job 'x' not found"


def test_a_refusal_that_names_a_route_names_the_command_that_calls_it() -> None:
    detail = ("job 'pr' is paused: resume it with POST .../jobs/pr/resume; see GET .../logs?attempt=2 and "
              "GET .../checkpoints, or POST .../stop")  # fmt: skip

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"detail": detail})

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        api.post("/jobs/pr/start")
    assert str(caught.value) == (
        "409 Conflict: job 'pr' is paused: resume it with POST .../jobs/pr/resume (swift-api resume); see GET "
        ".../logs?attempt=2 and GET .../checkpoints, or POST .../stop (swift-api stop)"
    )


def test_status_shows_a_running_jobs_time_limit_and_the_time_left_before_it() -> None:
    # Only swift's eta (8 minutes) was shown for a run its 30 s limit would stop (hunt DK). The time left is the
    # server's: worked out on this host's clock against the server's start, it was off by the clocks' skew (hunt DT).
    import time

    from rich.console import Console

    from application.cli import render

    body = {"job_id": "j", "status": "running", "time_limit_seconds": 30, "started_at": time.time() - 3600,
            "time_limit_left_seconds": 19.6,
            "progress": {"current_step": 3, "max_steps": 300, "remaining_time": "8m 14s"}}  # fmt: skip
    console = Console(width=200, record=True)
    console.print(render.job_status(body))
    shown = console.export_text()
    assert "eta" in shown and "8m 14s" in shown
    assert re.search(r"time limit\s+0:30 \(0:(19|20) left\)", shown), shown
    console.print(render.job_status({**body, "status": "failed"}))
    assert re.search(r"time limit\s+0:30 *\n", console.export_text()), shown


def test_an_answer_and_a_refusal_name_the_command_and_the_flag_the_user_typed() -> None:
    from rich.console import Console

    from application.cli import render
    from application.cli.app import build_parser, submit_flags

    stopped = {"job_id": "j", "status": "stopped", "message": "Training stopped; POST .../resume resumes it from x"}
    console = Console(width=200, record=True)
    console.print(render.action(stopped))
    assert "POST .../resume (swift-api resume) resumes it from x" in console.export_text()
    # (review DJ: `--set num_gpus=2` was named as --gpus)
    args = build_parser().parse_args(["submit", "--model", "m", "--data", "d", "--output-dir", "o", "--set",
                                      "num_gpus=2"])  # fmt: skip
    flags = submit_flags(args)
    assert flags["num_gpus"] == "--set num_gpus" and flags["model_path"] == "--model"
    assert flags["training.*"] == "--set" and flags["time_limit"] == "--set time_limit"


def test_a_download_writes_into_a_pipe_or_through_a_link_rather_than_replacing_it(tmp_path: Path) -> None:
    # `-o` a FIFO, a symlink or a device (/dev/null) was replaced by a file: written beside it, then renamed over it.
    content = b"0123456789" * 5000

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=content)

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_bytes()), daemon=True)
    reader.start()
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"old")
    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        assert api.download("/jobs/j/artifacts/f", pipe) == len(content)
        reader.join(30)
        assert read == [content] and stat.S_ISFIFO(pipe.lstat().st_mode)
        api.download("/jobs/j/artifacts/f", link)
        assert link.is_symlink() and real.read_bytes() == content
        api.download("/jobs/j/artifacts/f", plain)
        assert plain.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.bin", "pipe", "plain.bin", "real.bin"]


def test_a_stream_that_keeps_closing_at_once_is_given_up(clock: Clock) -> None:
    # Each reconnect that opened (and said nothing) reset the give-up: it never came.
    calls: list[int] = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        body = b"id: 1\ndata: one\n\n" if len(calls) == 1 else b""
        return httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"}, content=body)

    got: list[str] = []
    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        got.extend(message.data for message in follow(api, "/jobs/job/logs/stream"))
    assert got == ["one"] and caught.value.code == 3 and "closed before the job ended" in str(caught.value)
    assert 60 <= clock.now - 1000 <= 70
    # It answered before: no URL to fix (it said "set SWIFT_API_URL or --url": hunt CZ).
    assert str(caught.value).startswith("no stream from http://swift-api.test/api/v1/training for 6")
    assert "follow it again once the server answers" in str(caught.value) and "SWIFT_API_URL" not in str(caught.value)


class SilentUntilReadTimeout(httpx.SyncByteStream):
    """A stream that opens, says nothing, and times out the client's read (the test clock moved on that long)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __iter__(self) -> Iterator[bytes]:
        from application.cli.client import STREAM_READ_TIMEOUT

        self.clock.now += STREAM_READ_TIMEOUT
        raise httpx.ReadTimeout("timed out")
        yield b""  # (a generator)


def test_a_stream_whose_heartbeats_are_further_apart_than_the_read_timeout_is_followed_on(clock: Clock) -> None:
    # STREAM_HEARTBEAT_SECONDS may be up to 300 s: a stream that said nothing before the client's 60 s read timed
    # out counted as a server that could not serve it, and `logs -f` / `watch` gave up (exit 3) after two (a hunt).
    calls: list[int] = []
    sse = {"content-type": "text/event-stream"}

    def server(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) < 6:
            return httpx.Response(200, headers=sse, stream=SilentUntilReadTimeout(clock))
        return httpx.Response(200, headers=sse, content=b'event: end\ndata: {"status": "completed"}\n\n')

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        assert [m.event for m in follow(api, "/jobs/job/logs/stream")] == ["end"]
    assert len(calls) == 6


def test_a_stream_that_stays_open_and_says_nothing_is_given_up_past_the_longest_heartbeat(clock: Clock) -> None:
    # Counting a stream that stayed open as the server back (above), one that never said anything was followed
    # for ever, though the README promised exit 3 (a review).
    from application.cli.client import STREAM_READ_TIMEOUT
    from application.cli.sse import SILENCE_SECONDS

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=SilentUntilReadTimeout(clock))

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        list(follow(api, "/jobs/job/logs/stream"))
    assert caught.value.code == 3
    assert SILENCE_SECONDS < clock.now - 1000 <= SILENCE_SECONDS + STREAM_READ_TIMEOUT + 10


def test_upload_train_on_it_then_list_and_download_what_it_wrote(server: ApiServer, workspace: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    data = Path(job_body(workspace, "cli-up", step_seconds=0.01)["data_path"])
    up = cli_json(server.port, "upload", str(data))
    assert up["rows"] == 21 and up["id"].startswith("file-")
    assert any(f["id"] == up["id"] for f in cli_json(server.port, "files")["files"])
    second = cli_json(server.port, "upload", str(data))
    page = cli(server.port, "files", "--limit", "1")
    assert page.stdout.startswith(second["id"])
    # The footer is the last line of stdout, as ls's and queue's are (it went to stderr: hunt CJ).
    last = page.stdout.strip().splitlines()[-1]
    assert last.startswith("1-1 of 2 files; the next page: files --limit 1 --after "), page.stdout  # (review AX)
    after = last.rsplit("--after ", 1)[1].split()[0]
    rest = cli(server.port, "files", "--limit", "1", "--after", after)
    assert rest.stdout.startswith(up["id"]) and rest.stdout.strip().endswith("\n1 of 2 files"), rest.stdout
    assert cli(server.port, "files", "--limit", "1", "--offset", "1").stdout.startswith(up["id"])
    assert cli(server.port, "files", "--offset", "0").returncode == 0  # (0, the default, was refused)
    args = submit_args(workspace, "cli-up", "--set", "max_steps=4", "--set", "save_steps=2", "--follow")
    args[args.index("--data") + 1] = up["id"]
    r = cli(server.port, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    job = server.wait_status("cli-up", "completed")
    run = Path(job["run_dir"])
    listing = cli_json(server.port, "artifacts", "cli-up")
    tars = [f["tar"] for f in listing["folders"]]
    assert f"{run.name}/checkpoint-4.tar" in tars
    out = tmp_path / "logging.jsonl"
    got = cli_json(server.port, "download", "cli-up", f"{run.name}/logging.jsonl", "-o", str(out))
    assert got["bytes"] == out.stat().st_size and out.read_bytes() == (run / "logging.jsonl").read_bytes()
    # One the network cut goes on from what it kept, named by the file's ETag: the rest asked for, with If-Range.
    whole = out.read_bytes()
    out.unlink()
    tag = server.http.head(f"/jobs/cli-up/artifacts/{run.name}/logging.jsonl").headers["etag"].strip('"')
    (tmp_path / f".logging.jsonl.partial-{tag}").write_bytes(whole[:100])
    got = cli_json(server.port, "download", "cli-up", f"{run.name}/logging.jsonl", "-o", str(out))
    assert got["bytes"] == len(whole) and out.read_bytes() == whole and not list(tmp_path.glob(".logging.jsonl.*"))
    # A start kept of another version of the file: all of it again.
    (tmp_path / ".logging.jsonl.partial-0-1").write_bytes(b"not its start")
    (tmp_path / ".logging.jsonl.partial-x.partial").write_bytes(b"another target's")  # (logging.jsonl.partial-x's)
    cli_json(server.port, "download", "cli-up", f"{run.name}/logging.jsonl", "-o", str(out))
    assert out.read_bytes() == whole
    assert [p.name for p in tmp_path.glob(".logging.jsonl.*")] == [".logging.jsonl.partial-x.partial"]
    # `-o -` is standard output, as with curl (it wrote a file named '-' where the CLI ran).
    piped = cli(server.port, "download", "cli-up", f"{run.name}/logging.jsonl", "-o", "-")
    assert piped.returncode == 0 and piped.stdout == (run / "logging.jsonl").read_text(), piped.stderr
    assert not (ROOT / "-").exists() and f"{out.stat().st_size} bytes" in piped.stderr
    # A chosen checkpoint, exported into a named folder.
    wait_for(lambda: server.job("cli-up")["export"]["status"] != "running", what="the automatic export")
    exported = cli_json(server.port, "export", "cli-up", "--checkpoint", "checkpoint-2", "--output-name", "two")
    assert exported["export"]["checkpoint"] == str(run / "checkpoint-2")
    missing = cli(server.port, "download", "cli-up", "nope.bin", "-o", str(tmp_path / "nope.bin"))
    assert missing.returncode == 2 and "404" in missing.stderr and not (tmp_path / "nope.bin").exists()


def test_log_lines_and_messages_reach_the_terminal_without_control_sequences(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A log holds text a job's owner chose (rows swift echoes): an admin following it must not have their
    # terminal driven by it (colours, title, cursor moves, OSC 8 links).
    out = Output(as_json=False)
    out.line("step 1\x1b[2J\x1b]0;owned\x07\tloss 0.5\x9b31m")
    out.error("job 'x\x1b[1A' failed")
    got = capsys.readouterr()
    assert got.out == "step 1\tloss 0.5\n"  # (whole sequences: "[2J]0;owned" was left of them, hunt AW)
    assert "\x1b" not in got.err and "job 'x' failed" in got.err


def test_json_output_escapes_c1_controls_and_line_separators_and_keeps_other_text_readable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A job's error_message and log lines are text its owner chose: U+009B is an 8-bit CSI some terminals obey,
    # and U+2028/2029 end a line for some JSON Lines readers. A script still reads the same strings back.
    message = "boom\x9b2J\x7f\x85 caf\u00e9 \u65e5\u672c\u2028next\u2029para"
    Output(as_json=True).emit({"error_message": message})
    shown = capsys.readouterr().out
    assert not any(c in shown for c in "\x7f\x85\x9b\u2028\u2029"), ascii(shown)
    assert "caf\u00e9 \u65e5\u672c" in shown and shown.count("\n") == 1
    assert json.loads(shown) == {"error_message": message}


def test_tables_show_server_text_without_control_sequences(capsys: pytest.CaptureFixture[str]) -> None:
    # A failed job's error_message is a line of its log: `status` prints it through rich, which passes escape
    # sequences on as they are.
    Output(as_json=False).show({}, lambda _: text("training failed: \x1b]0;owned\x07boom\x1b[2J"))
    assert capsys.readouterr().out.strip() == "training failed: boom"


def test_watch_shows_log_text_without_control_sequences_or_markup(capsys: pytest.CaptureFixture[str]) -> None:
    # remaining_time is text of the run's log (swift's dict, literal_eval'd): a '[/x]' crashed rich's markup
    # (exit 1, as for a failed job), and an escape sequence cleared the screen and wrote the clipboard.
    hostile = "\x1b[2J\x1b]52;c;cHduZWQ=\x07[/oops] later"
    point = {"progress": {"current_step": 4, "max_steps": 10, "remaining_time": hostile}, "loss": 1.0}

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/status"):
            return httpx.Response(200, json={"job_id": "j", "status": "running", "progress": point["progress"]})
        body = f"id: 1\ndata: {json.dumps(point)}\n\nevent: end\ndata: {json.dumps({'status': 'completed'})}\n\n"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        assert watch(api, "j", Output(as_json=False)) == 0
    shown = capsys.readouterr().out
    assert "\x1b]52" not in shown and "\x1b[2J" not in shown and "[/oops] later" in shown


@pytest.mark.parametrize("key", ["alice-key-0123456789abcdef\r\n", " alice-key-0123456789abcdef "])
def test_a_copied_key_loses_its_line_break_and_spaces(key: str) -> None:
    sent: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["Authorization"])
        return httpx.Response(200, json={"jobs": []})

    with Api("http://swift-api.test", key, transport=httpx.MockTransport(server)) as api:
        api.get("/jobs")
    assert sent == [f"Bearer {ALICE_KEY}"]


@pytest.mark.parametrize("key", ["alice key-0123456789abcdef", "clé-0123456789abcdef", "a\x1bkey-0123456789abcdef"])
def test_a_key_no_header_can_carry_is_a_usage_error_that_does_not_show_it(key: str) -> None:
    with pytest.raises(CliError) as caught:
        Api("http://swift-api.test", key)
    assert caught.value.code == 2 and "0123456789abcdef" not in str(caught.value)


@pytest.mark.parametrize("job_id", [".", "..", "a/b", ""])
def test_dot_segments_and_slashes_are_not_job_ids(job_id: str) -> None:
    # ('': an unset $JOB asked for GET /status, answered as a server URL to fix, exit 3.)
    # The URL dropped the dots: `status ..` asked for GET /jobs and `rm ..` sent DELETE /jobs. A '/' (sent as
    # %2F) reached no job route: a bare "404 Not Found: Not Found".
    with pytest.raises(CliError) as caught:
        job_path(job_id, "/status")
    assert caught.value.code == 2 and "is not a job id" in str(caught.value)


def test_a_url_that_reaches_no_route_says_which_url_to_give() -> None:
    # SWIFT_API_URL=http://host:8000/v2/training (an API_PREFIX this server does not have): "404 Not Found: Not
    # Found", exit 2, as if the request were wrong.
    for answer in ("Not Found", "Not Found: no route answers GET /v2/training/jobs; this server's API is under ..."):

        def server(request: httpx.Request, answer: str = answer) -> httpx.Response:
            return httpx.Response(404, json={"detail": answer})

        with Api("http://swift-api.test/v2/training", transport=httpx.MockTransport(server)) as api, \
                pytest.raises(CliError) as caught:  # fmt: skip
            api.get("/jobs")
        said = str(caught.value)
        assert caught.value.code == 3 and "http://swift-api.test/v2/training/jobs" in said, said
        assert "/api/v1/training" in said and "SWIFT_API_URL" in said, said


def test_a_refused_key_names_where_the_cli_takes_it_from() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"detail": "an API key is required: send 'Authorization: Bearer <key>'"})

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        api.get("/jobs")
    assert caught.value.code == 2 and "SWIFT_API_KEY or --key" in str(caught.value), caught.value


def test_a_download_interrupted_by_ctrl_c_leaves_no_partial_file(tmp_path: Path) -> None:
    # KeyboardInterrupt went past the clean-up: a hidden .NAME.partial (of a checkpoint's tar: gigabytes) stayed.
    def chunks() -> Iterator[bytes]:
        yield b"x" * 65536
        raise KeyboardInterrupt

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(KeyboardInterrupt):
        api.download("/jobs/j/artifacts/big.bin", tmp_path / "big.bin")
    assert list(tmp_path.iterdir()) == []


def test_a_download_the_server_cut_says_so_not_that_the_server_cannot_be_reached(tmp_path: Path) -> None:
    # A download dropped for reading too slowly said "cannot reach the server at ...: peer closed connection
    # without sending complete message body" (hunt CA).
    def chunks() -> Iterator[bytes]:
        yield b"x" * 65536
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        api.download("/jobs/j/artifacts/big.bin", tmp_path / "big.bin")
    assert str(caught.value).startswith("the download was cut after 65,536 bytes (peer closed"), caught.value
    assert "cannot reach" not in str(caught.value) and caught.value.code == 3
    assert list(tmp_path.iterdir()) == []


def test_a_download_the_network_cut_goes_on_from_what_it_kept(tmp_path: Path) -> None:
    # A merged model's gigabytes started over at each cut.
    content = bytes(range(256)) * 1024
    cut = [True]

    def server(request: httpx.Request) -> httpx.Response:
        headers = {"ETag": '"abc-40000"', "Accept-Ranges": "bytes"}
        start = 0
        if request.headers.get("if-range") == '"abc-40000"' and (asked := request.headers.get("range")):
            start = int(asked.removeprefix("bytes=").rstrip("-"))
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"

        def chunks() -> Iterator[bytes]:
            yield content[start : start + 65536]
            if cut.pop() if cut else False:
                raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
            yield content[start + 65536 :]

        return httpx.Response(206 if start else 200, headers=headers, content=chunks())

    target = tmp_path / "big.bin"
    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        with pytest.raises(CliError) as caught:
            api.download("/jobs/j/artifacts/big.bin", target)
        assert "cut after 65,536 bytes" in str(caught.value) and "goes on from there" in str(caught.value)
        assert [p.name for p in tmp_path.iterdir()] == [".big.bin.partial-abc-40000"]
        assert api.download("/jobs/j/artifacts/big.bin", target) == len(content)
    assert target.read_bytes() == content and list(tmp_path.iterdir()) == [target]


def test_a_range_the_download_did_not_ask_for_is_never_saved_as_the_file(tmp_path: Path) -> None:
    # A 206 for another range than the rest of the kept start was written as the whole file: a file short of its
    # start, said to be downloaded (hunt CZ).
    content = bytes(range(256)) * 80

    def server(request: httpx.Request) -> httpx.Response:
        headers = {"ETag": '"abc-5000"', "Accept-Ranges": "bytes", "Content-Range": f"bytes 5-{len(content) - 1}/"
                   f"{len(content)}"}  # fmt: skip
        return httpx.Response(206, headers=headers, content=content[5:])

    target = tmp_path / "big.bin"
    (tmp_path / ".big.bin.partial-abc-5000").write_bytes(content[:10])
    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        api.download("/jobs/j/artifacts/big.bin", target)
    assert "another part of the file (bytes 5-20479/20480)" in str(caught.value) and caught.value.code == 3
    assert list(tmp_path.iterdir()) == []


def test_an_answer_shorter_than_its_length_is_a_cut_not_a_file(tmp_path: Path) -> None:
    # The size was never checked: an answer that ended early was renamed over the target as the whole file.
    content = b"y" * 70000

    def server(request: httpx.Request) -> httpx.Response:
        asked = request.headers.get("range")
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
        headers = {"ETag": '"t-1"', "Accept-Ranges": "bytes", "Content-Length": str(len(content) - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            return httpx.Response(206, headers=headers, content=iter([content[start:]]))
        return httpx.Response(200, headers=headers, content=iter([content[:65536]]))  # (then the body just ends)

    target = tmp_path / "big.bin"
    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        with pytest.raises(CliError) as caught:
            api.download("/jobs/j/artifacts/big.bin", target)
        assert "ended after 65,536 of its 70,000 bytes" in str(caught.value), caught.value
        assert "goes on from there" in str(caught.value) and not target.exists()
        assert api.download("/jobs/j/artifacts/big.bin", target) == len(content)
    assert target.read_bytes() == content and list(tmp_path.iterdir()) == [target]


def test_a_second_download_of_one_file_at_once_is_refused_and_leaves_the_first_whole(tmp_path: Path) -> None:
    # Two downloads of one file wrote one partial file at once: one of them exited 0 over a corrupt file (hunt CZ).
    content = bytes(range(256)) * 512
    target = tmp_path / "big.bin"
    second: list[BaseException] = []

    def server(request: httpx.Request) -> httpx.Response:
        def chunks() -> Iterator[bytes]:
            yield content[:65536]
            with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as again:
                try:
                    again.download("/jobs/j/artifacts/big.bin", target)
                except CliError as e:
                    second.append(e)
            yield content[65536:]

        return httpx.Response(200, headers={"ETag": '"x-1"', "Accept-Ranges": "bytes"}, content=chunks())

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        assert api.download("/jobs/j/artifacts/big.bin", target) == len(content)
    assert [str(e) for e in second] == [f"{target} is being downloaded by another command: wait for it to end, or "
                                        "stop it"]  # fmt: skip
    assert target.read_bytes() == content and list(tmp_path.iterdir()) == [target]


def test_submit_set_auto_start_false_creates_a_pending_job(server: ApiServer, workspace: Path) -> None:
    # `--set` takes any create field, but auto_start was then set to true over it: the job started at once.
    r = cli(server.port, "--json", *submit_args(workspace, "held", "--set", "auto_start=false"))
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "pending", (r.stdout, r.stderr)
    assert server.job("held")["status"] == "pending"
    # ... and started from the CLI too (there was no `start`: `resume` was refused, `watch` waited for ever).
    r = cli(server.port, "--json", "start", "held")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] in ("running", "queued"), (r.stdout, r.stderr)
    server.wait_status("held", "completed")


def test_a_submit_whose_follow_fails_says_the_job_was_created_with_its_own_exit_code() -> None:
    # A stream refused once the job existed (429: the key's STREAMS_PER_OWNER open) was exit 2, "refused": a
    # script that retries on it submitted the job again.
    from application.cli.app import build_parser, submit

    def server(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(201, json={"job_id": "made", "status": "running", "message": "Training started"})
        return httpx.Response(429, headers={"Retry-After": "5"}, json={"detail": "alice already has 4 streams open"})

    args = build_parser().parse_args(["submit", "--model", "m", "--data", "d", "--output-dir", "o", "--follow"])
    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        submit(api, args, Output(as_json=True))
    assert caught.value.code == 4 and "streams open" in str(caught.value), caught.value
    assert "job made was created: follow it with `swift-api watch made`" in str(caught.value)


def test_watch_json_passes_a_rewind_on_as_an_event(capsys: pytest.CaptureFixture[str]) -> None:
    # A resumed run's rewind is not a point: a script reading --json must be able to tell (it was printed as one).
    stream = (
        'id: 1.12-0\ndata: {"step": 12, "loss": 1.0}\n\nevent: rewind\ndata: {"step": 10}\n\n'
        'id: 2.11-0\ndata: {"step": 11, "loss": 0.9}\n\nevent: end\ndata: {"status": "completed"}\n\n'
    )

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/status"):
            return httpx.Response(200, json={"job_id": "j", "status": "running", "progress": {}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream.encode())

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        assert watch(api, "j", Output(as_json=True)) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"step": 12, "loss": 1.0}, {"event": "rewind", "step": 10}, {"step": 11, "loss": 0.9},
                     {"event": "end", "status": "completed"}]  # fmt: skip


def test_watch_of_a_job_that_had_ended_says_its_end_once(capsys: pytest.CaptureFixture[str]) -> None:
    # Its status, read first, and the stream's end said the same line twice (hunt EO).
    progress = {"current_step": 20, "max_steps": 20, "loss": 8.288, "remaining_seconds": 0}
    stream = f"event: end\ndata: {json.dumps({'status': 'completed', 'progress': progress})}\n\n"

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/status"):
            return httpx.Response(200, json={"job_id": "tiny", "status": "completed", "progress": progress})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream.encode())

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        assert watch(api, "tiny", Output(as_json=False)) == 0
    assert capsys.readouterr().out.splitlines() == ["tiny completed 20/20 loss 8.288 ETA 0:00"]


# ---- a reader that has gone ---------------------------------------------------------------------------------


class _QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """An HTTP server in a thread of this test; yields its port."""
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield httpd.server_address[1]
        httpd.shutdown()
        thread.join(10)


@pytest.fixture
def tiny_server() -> Iterator[int]:
    """An HTTP server answering what `ls` and `watch` of a completed job read, in a thread of this test."""

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            if self.path.endswith("/stream"):
                kind, body = "text/event-stream", b'event: end\ndata: {"status": "completed"}\n\n'
            elif self.path.endswith("/status"):
                kind, body = "application/json", b'{"job_id": "j", "status": "completed", "progress": {}}'
            else:
                listed = {"jobs": [{"job_id": f"job-{i}", "status": "completed"} for i in range(3)], "total": 3}
                kind, body = "application/json", json.dumps(listed).encode()
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with _serve(Handler) as port:
        yield port


@pytest.mark.parametrize("args", [["ls"], ["watch", "j"], ["download", "j", "x.bin", "-o", "-"]])
def test_output_to_a_reader_that_has_gone_exits_0(tiny_server: int, args: list[str]) -> None:
    # `swift-api watch j | true`: rich exited 1 itself on the broken pipe, which reads as "the job failed" (--json
    # output exited 0).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        env = {**os.environ, "SWIFT_API_URL": f"http://127.0.0.1:{tiny_server}"}
        r = subprocess.run([sys.executable, "-m", "application.cli", *args], cwd=ROOT, env=env, stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=30)  # fmt: skip
    finally:
        os.close(write_end)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["ls"], ["--json", "ls"], ["watch", "j"]])
def test_output_that_cannot_be_written_is_exit_2_not_a_failed_job(tiny_server: int, args: list[str]) -> None:
    # A full disk under `swift-api watch $ID > log || alert`: a traceback and exit 1, "the job failed".
    env = {**os.environ, "SWIFT_API_URL": f"http://127.0.0.1:{tiny_server}"}
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "application.cli", *args], cwd=ROOT, env=env, stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 2 and "cannot write the output" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_duration_below_zero_prints_as_none_yet() -> None:
    # (two hosts' clocks: it printed "-1:58:13" for a run 4 s old)
    assert (duration(-114.85), duration(0.4), duration(3725)) == ("0:00", "0:00", "1:02:05")


# ---- a server that is not swift-api, or not of this version (hunt AW) -------------------------------------------


@pytest.fixture
def strange_server() -> Iterator[int]:
    """JSON of another shape, HTML where JSON belongs, a body its Content-Encoding does not describe."""

    class Handler(_QuietHandler):
        def answer(self, kind: str, body: bytes, *headers: tuple[str, str]) -> None:
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.split("?")[0].endswith("/gpus"):
                self.answer("application/json", b"not gzip at all", ("content-encoding", "gzip"))
            elif self.path.split("?")[0].endswith("/files"):
                self.answer("application/json", b'{"files": 5, "total": 1}')
            elif self.path.split("?")[0].endswith("/logs"):
                self.answer("application/json", b'["a", "list"]')
            else:
                self.answer("application/json", b'{"jobs": "x", "entries": 7, "status": ["?"]}')

        def do_POST(self) -> None:
            sent = self.rfile.read(int(self.headers.get("content-length") or 0))
            if b"\r\n\r\npt\r\n" in sent:  # (`upload --purpose pt`: JSON of another shape)
                self.answer("application/json", b'{"detail": "stored"}')
            else:
                self.answer("text/html", b"<html>hello</html>")

    with _serve(Handler) as port:
        yield port


@pytest.mark.parametrize("args", [["ls"], ["queue"], ["status", "j"], ["files"], ["gpus"], ["upload", "DATA"],
                                  ["upload", "DATA", "--purpose", "pt"], ["logs", "j"]])  # fmt: skip
def test_a_server_answering_what_swift_api_does_not_is_one_line_and_exit_3(strange_server: int, tmp_path: Path,
                                                                          args: list[str]) -> None:  # fmt: skip
    # Each was a traceback and exit 1, which says a job failed.
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    r = cli(strange_server, *[str(data) if a == "DATA" else a for a in args], timeout=60)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert "swift-api server" in r.stderr, r.stderr


def test_a_password_in_the_url_is_never_printed_nor_a_closed_stdout_a_traceback() -> None:
    port = free_port()
    env = {**os.environ, "SWIFT_API_URL": f"http://user:SECRETPW@127.0.0.1:{port}"}
    r = subprocess.run([sys.executable, "-m", "application.cli", "ls"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 3 and "SECRETPW" not in r.stderr and "***@127.0.0.1" in r.stderr, r.stderr
    # `swift-api ls >&-`: stdout closed (an AttributeError on its isatty).
    r = subprocess.run([sys.executable, "-m", "application.cli", "ls"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=60, close_fds=True,
                       preexec_fn=lambda: os.close(1))  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["--json", "ls"], ["ls"], ["logs", "j"]])
def test_a_command_run_with_standard_output_closed_does_its_work_quietly(tiny_server: int, args: list[str]) -> None:
    # `>&-`: a traceback and exit 1 ("the job failed"), or "not what a swift-api server sends" (hunt CZ).
    env = {**os.environ, "SWIFT_API_URL": f"http://127.0.0.1:{tiny_server}"}
    r = subprocess.run([sys.executable, "-m", "application.cli", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=60, preexec_fn=lambda: os.close(1))  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_log_text_cannot_drive_or_reorder_the_terminal() -> None:
    # A title-setting OSC left "]0;TITLE" once its ESC went; bidi controls reordered the line (hunt AW).
    from application.cli.output import printable

    raw = "a\x1b]0;TITLE\x07b \x1b[31mred\x1b[0m \u202eevil\u202c z\u200bw \x07bell\ttab"
    assert printable(raw) == "ab red evil zw bell\ttab"


def test_an_explicit_empty_key_sends_none_and_no_key_given_takes_the_environments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `--key ''`, to try a call unauthenticated, sent SWIFT_API_KEY all the same (hunt CJ).
    monkeypatch.setenv("SWIFT_API_KEY", "env-key")
    sent: list[str | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"jobs": [], "total": 0})

    for key in ("", None, "own-key"):
        with Api("http://swift-api.test", key, transport=httpx.MockTransport(server)) as api:
            api.get("/jobs")
    assert sent == [None, "Bearer env-key", "Bearer own-key"]


@contextmanager
def download_stalled_midway(tmp_path: Path, ignore_sighup: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """`swift-api download j big.tar` into `tmp_path` from a server that sends 64 KiB of its 640 KiB and no more;
    yielded once the partial file holds them."""
    done = threading.Event()

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", str(10 * 65536))
            self.end_headers()
            self.wfile.write(b"z" * 65536)
            self.wfile.flush()
            done.wait(30)  # (the rest never comes)

    def nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    with _serve(Handler) as port:
        env = {**os.environ, "SWIFT_API_URL": f"http://127.0.0.1:{port}"}
        with subprocess.Popen([sys.executable, "-m", "application.cli", "download", "j", "big.tar"], env=env,
                              cwd=tmp_path, stderr=subprocess.PIPE,
                              preexec_fn=nohup if ignore_sighup else None) as proc:  # fmt: skip
            wait_for(lambda: any(p.stat().st_size for p in tmp_path.glob(".big.tar.partial*")), what="a partial file")
            try:
                yield proc
            finally:
                if proc.poll() is None:
                    proc.kill()
                done.set()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_download_killed_by_sigterm_or_sighup_leaves_no_partial_file(tmp_path: Path, signum: int) -> None:
    # Only Ctrl-C cleaned up: `kill` (a CI job cancelled, a closed terminal) left a hidden partial tar behind.
    with download_stalled_midway(tmp_path) as proc:
        proc.send_signal(signum)
        assert proc.wait(30) == 128 + signum
    assert list(tmp_path.iterdir()) == []


def test_download_into_a_folder_writes_the_file_in_it(tmp_path: Path) -> None:
    # `-o models/` wrote a file named `models`; `-o models` (a folder) was "Is a directory" (hunt CZ).
    from application.cli.app import build_parser, download

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"weights")

    (tmp_path / "there").mkdir()
    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        args = build_parser().parse_args(["download", "j", "ck/model.bin", "-o", f"{tmp_path / 'there'}/"])
        assert download(api, args, Output(True)) == 0
        args = build_parser().parse_args(["download", "j", "ck/other.bin", "-o", str(tmp_path / "there")])
        assert download(api, args, Output(True)) == 0
        # A folder that is not there is not made (as cp): said, and no file takes its name.
        args = build_parser().parse_args(["download", "j", "ck/model.bin", "-o", f"{tmp_path / 'new'}/"])
        with pytest.raises(CliError) as caught:
            download(api, args, Output(True))
        assert str(caught.value).endswith("new/model.bin: No such file or directory") and caught.value.code == 2
    assert sorted(p.name for p in (tmp_path / "there").iterdir()) == ["model.bin", "other.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]


def test_a_create_whose_answer_was_lost_is_sent_again_under_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # "cannot reach the server" (exit 3) for a job created all the same; the command run again made a second one.
    from application.cli import client

    monkeypatch.setattr(client, "RESEND_AFTER_SECONDS", 0.0)
    keys: list[str | None] = []
    lost = [False, True]  # (popped from the end: the first answer is lost)

    def server(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("idempotency-key"))
        if request.method == "POST" and (lost.pop() if lost else True):
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(201, json={"job_id": "made", "status": "queued", "message": "created"})

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api:
        assert api.post("/jobs", {"output_dir": "made"})["job_id"] == "made"
        assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
        # Never answered for RESEND_FOR_SECONDS: said it may have been done, not that the server cannot be reached.
        monkeypatch.setattr(client, "RESEND_FOR_SECONDS", 0.3)
        with pytest.raises(CliError) as caught:
            api.post("/jobs/made/stop")
        assert "it may have been done all the same" in str(caught.value) and caught.value.code == 3
        assert "cannot reach" not in str(caught.value)
        assert len(keys) > 3 and set(keys[2:]) == {keys[2]} != {keys[0]}
        # A GET is never keyed, nor sent again.
        lost.append(False)
        assert api.get("/jobs")["job_id"] == "made" and keys[-1] is None


def test_a_create_sent_again_to_a_server_that_restarts_says_it_may_have_been_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sent again to a port refused (the server restarting), it said "cannot reach the server (set SWIFT_API_URL)":
    # the job may exist, and the command run again made a second one (review DE). Over real sockets.
    from application.cli import client

    monkeypatch.setattr(client, "RESEND_FOR_SECONDS", 1.0)
    monkeypatch.setattr(client, "RESEND_AFTER_SECONDS", 0.1)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    heard: list[bytes] = []

    def take_one_then_go() -> None:
        conn, _ = listener.accept()
        with conn:
            heard.append(conn.recv(65536))  # the request, taken; no answer
        listener.close()  # (then refused, as a server between two lives)

    threading.Thread(target=take_one_then_go, daemon=True).start()
    with Api(f"http://127.0.0.1:{port}") as api, pytest.raises(CliError) as caught:
        api.post("/jobs", {"output_dir": "made"})
    assert "may have been done all the same" in str(caught.value) and "SWIFT_API_URL" not in str(caught.value)
    assert caught.value.code == 3 and b"idempotency-key: " in heard[0].lower()


def test_a_create_never_sent_is_unreachable_and_not_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request.method)
        raise httpx.ConnectError("Connection refused")

    with Api("http://swift-api.test", transport=httpx.MockTransport(server)) as api, pytest.raises(CliError) as caught:
        api.post("/jobs", {"output_dir": "x"})
    assert "cannot reach" in str(caught.value) and caught.value.code == 3 and sent == ["POST"]


def test_a_download_under_nohup_outlives_a_sighup(tmp_path: Path) -> None:
    # The handler that cleans up at SIGHUP was installed over nohup's SIG_IGN: a logout ended the download (review
    # DE).
    with download_stalled_midway(tmp_path, ignore_sighup=True) as proc:
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)  # (then this one ends it: had the first, it would say 129)
        assert proc.wait(30) == 128 + signal.SIGTERM


def test_a_followed_job_queued_for_the_first_time_is_not_said_to_be_back_in_the_queue() -> None:
    from application.cli.follow import _Status
    from application.cli.sse import Message

    queued = Message('{"status": "queued"}', event="status")
    first = _Status("j")
    assert first.worth(queued) == "queued" and first.text("queued") == "j queued: it is followed once it starts"
    again = _Status("j", "running")
    assert again.worth(queued) == "queued" and "back in the queue" in again.text("queued")


def test_a_refused_field_gets_its_flag_beside_it_whatever_its_message_says_next() -> None:
    # With the installed ms-swift's arguments read, the refusals put words between the field and any colon:
    # "training.lr is not an argument of ...: did you mean lr_scheduler_type?" showed no flag, or the message
    # twice with the flag inside it (review DS).
    from application.cli.client import _flags_named

    flags = {"training.*": "--set", "query.cursor": "--after"}
    assert _flags_named("training.target_module is not an argument of `swift sft` in ms-swift 4.6.0: did you mean "
                        "target_modules?", flags) == ("training.target_module (--set target_module) is not an "
                        "argument of `swift sft` in ms-swift 4.6.0: did you mean target_modules?")  # fmt: skip
    assert _flags_named("query.cursor: not a cursor; training.beta is an argument of `swift rlhf`", flags) == (
        "query.cursor (--after): not a cursor; training.beta (--set beta) is an argument of `swift rlhf`"
    )
    assert _flags_named("the body is not JSON: expecting value", flags) == "the body is not JSON: expecting value"
    assert _flags_named("training.lora-rank: unknown field: did you mean lora_rank?", flags) == (
        "training.lora-rank (--set lora-rank): unknown field: did you mean lora_rank?"
    )  # (a key as typed: review DV)
    # A field given with its value names it too (hunt EO: `--gpus 9` was answered without the flag).
    assert _flags_named("num_gpus=9 can never be met: this server has 4 GPUs", {"num_gpus": "--gpus"}) == (
        "num_gpus=9 (--gpus) can never be met: this server has 4 GPUs"
    )
    # So does a field the message tells the user to set (hunt EO).
    told = (
        "ms-swift cannot tell the model type of 'm' from its folder name, and its architecture Qwen2 fits several: "
        "set training.model_type (one of qwen2, qwen2_gte) and training.template (qwen2: qwen2_5)"
    )
    assert _flags_named(told, flags) == told.replace("model_type (", "model_type (--set model_type) (").replace(
        "template (", "template (--set template) ("
    )
    # An item's place names its list's flag (hunt DS: `gpu_ids.1` had none).
    assert _flags_named("training.target_modules.0: not a string", flags) == (
        "training.target_modules.0 (--set target_modules): not a string"
    )
