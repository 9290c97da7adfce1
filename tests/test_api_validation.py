"""Bad input gets a 4xx that says what to change, and changes nothing stored; health, system, GPUs, docs."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

from application.services.embedded_redis import EmbeddedRedis
from application.services.keys import Keys
from tests.conftest import (
    QUICK_TO_GIVE_UP,
    ROOT,
    ApiServer,
    fake_dataset,
    job_body,
    make_model,
    seed_swift_probe,
    settings_for,
    wait_for,
)

MODEL_DIR = "models/tiny-qwen2"


def valid(workspace: Path, name: str = "ok", **extra: Any) -> dict[str, Any]:
    return {"data_path": fake_dataset(workspace, "data"), "model_path": str(workspace / MODEL_DIR),
            "output_dir": name, **extra}  # fmt: skip


def stored_state(r: redis.Redis, prefix: str) -> dict[str, Any]:
    """Everything the server keeps under its prefix (heartbeats aside), for before/after comparisons."""
    state: dict[str, Any] = {}
    for key in sorted(r.scan_iter(f"{prefix}:*")):
        # Rate counters, and what the scheduler publishes on its own (GPU reading, ms-swift facts, pass
        # statistics, its lock, runner heartbeats), are not records a request could corrupt.
        if any(part in key for part in (":rate:", ":scheduler:", ":runner:", ":queue:processor")) or \
                key.endswith((":gpus", ":swift")):  # fmt: skip
            continue
        kind = r.type(key)
        if kind == "hash":
            state[key] = r.hgetall(key)
        elif kind == "zset":
            state[key] = r.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            state[key] = sorted(r.smembers(key))
        elif kind == "list":
            state[key] = r.lrange(key, 0, -1)
        elif kind == "stream":
            state[key] = r.xrange(key)
        else:
            state[key] = r.get(key)
    return state


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


# ---- create: bad bodies -----------------------------------------------------------------------------------


def test_rejected_creates_are_4xx_with_helpful_messages_and_change_nothing(
    server: ApiServer, workspace: Path, rdb: redis.Redis
) -> None:
    outside = workspace / "elsewhere"
    outside.mkdir()
    server.output_root.mkdir(parents=True, exist_ok=True)
    (server.output_root / "escape").symlink_to(outside, target_is_directory=True)
    first = server.create(**valid(workspace, "busy"))
    assert first.status_code == 201 and first.json()["status"] == "pending"
    before = stored_state(rdb, server.prefix)
    assert any(k.endswith(":job:busy") for k in before)

    base = valid(workspace, "fresh")
    cases: list[tuple[dict[str, Any], int, list[str]]] = [
        ({**base, "learning_rate": 1}, 422, ["learning_rate", "unknown field"]),
        ({**base, "training": {"lora_rnk": 8}}, 422, ["training.lora_rnk", "unknown field"]),
        ({**base, "priority": "high"}, 422, ["priority"]),
        ({**base, "priority": 11}, 422, ["priority", "10"]),
        ({**base, "priority": -1}, 422, ["priority", "0"]),
        ({**base, "priority": 2.5}, 422, ["priority"]),
        ({**base, "priority": "5"}, 422, ["priority"]),
        ({**base, "priority": True}, 422, ["priority"]),
        ({**base, "model_path": "--help"}, 422, ["model_path", "'-'"]),
        ({**base, "data_path": "-x.jsonl"}, 422, ["data_path", "'-'"]),
        ({**base, "output_dir": "a" * 300}, 422, ["output_dir", "255"]),
        ({**base, "num_gpus": "two"}, 422, ["num_gpus"]),
        ({**base, "auto_start": "maybe"}, 422, ["auto_start"]),
        ({**base, "training": []}, 422, ["training"]),
        ({**base, "training": {"lora_rank": 0}}, 422, ["training.lora_rank"]),
        ({**base, "training": {"max_steps": 10**400}}, 422, ["training.max_steps", "100,000,000"]),  # was a 500
        ({**base, "training": {"save_steps": 10**12}}, 422, ["training.save_steps"]),
        ({**base, "training": {"train_type": "qlora-ish"}}, 422, ["training.train_type"]),
        ({**base, "data_path": ""}, 422, ["data_path"]),
        ({**base, "model_path": "   "}, 422, ["model_path", "blank"]),
        ({**base, "output_dir": ""}, 422, ["output_dir"]),
        ({k: v for k, v in base.items() if k != "data_path"}, 422, ["data_path", "required"]),
        ({**base, "job_id": "bad id!"}, 422, ["job_id"]),
        ({**base, "job_id": "hog\n"}, 422, ["job_id"]),  # `$` would match before the break: no route could reach it
        ({**base, "output_dir": ".."}, 422, ["output_dir", "OUTPUT_ROOT"]),
        ({**base, "output_dir": "../sneaky"}, 422, ["output_dir", "outside OUTPUT_ROOT"]),
        ({**base, "output_dir": "a/../../sneaky"}, 422, ["outside OUTPUT_ROOT"]),
        ({**base, "output_dir": str(outside / "job")}, 422, ["outside OUTPUT_ROOT"]),
        ({**base, "output_dir": "/etc/swift-job"}, 422, ["outside OUTPUT_ROOT"]),
        ({**base, "output_dir": "escape/job"}, 422, ["outside OUTPUT_ROOT"]),
        ({**base, "output_dir": "."}, 422, ["OUTPUT_ROOT"]),
        ({**base, "output_dir": "busy"}, 409, ["busy", "in use"]),
        ({**base, "output_dir": str(server.output_root / "busy")}, 409, ["in use"]),
        ({**base, "gpu_ids": [5]}, 422, ["gpu_ids", "2 GPUs"]),
        ({**base, "gpu_ids": [0, 0]}, 422, ["gpu_ids", "distinct"]),
        ({**base, "gpu_ids": []}, 422, ["gpu_ids"]),
        ({**base, "num_gpus": 3}, 422, ["num_gpus=3", "2 GPUs"]),
        ({**base, "num_gpus": 2, "gpu_ids": [0]}, 422, ["num_gpus", "gpu_ids"]),
        # (it was taken, and the memory asked for ignored)
        ({**base, "num_gpus": 0, "min_gpu_memory_gb": 10}, 422, ["min_gpu_memory_gb", "num_gpus 0"]),
        ({**base, "min_gpu_memory_gb": 100}, 422, ["min_gpu_memory_gb", "2 GPUs", "80"]),
        ({**base, "num_gpus": 0, "training": {"torch_dtype": "bfloat16"}}, 422, ["bfloat16", "float32"]),
        ({**base, "job_id": "busy"}, 409, ["busy", "taken"]),
        # (the union's two refusals, "time_limit.int: ...; time_limit.str: ...", said neither what it takes)
        ({**base, "time_limit": 1.5}, 422, ["time_limit is whole seconds (3600) or text such as '90m'"]),
        ({**base, "time_limit": True}, 422, ["time_limit is whole seconds"]),
    ]
    for payload, code, words in cases:
        r = server.http.post("/jobs", json=payload)
        assert r.status_code == code, (payload, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail, r.text
        for word in words:
            assert word in detail, (payload, word, detail)
    r = server.http.post("/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("body: not valid JSON (Expecting property name")
    assert "send one JSON object" in r.json()["detail"]
    # NaN is no number a field takes (it was "should be less than or equal to 4096").
    r = server.http.post("/jobs", content=json.dumps({**base, "min_gpu_memory_gb": float("nan")}).encode(),
                         headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 422 and "min_gpu_memory_gb: nan is not a number" in r.json()["detail"], r.text
    # A body of many unknown keys is answered with the first refusals, not each (1 MB of keys made 9 MB).
    r = server.http.post("/jobs", json={**base, **{f"x{i}": i for i in range(500)}})
    assert r.status_code == 422 and r.json()["detail"].endswith("; and 480 more") and len(r.json()["errors"]) == 20
    r = server.http.post("/jobs", json=["a", "list"])
    assert r.status_code == 422 and "send one JSON object" in r.json()["detail"], r.text
    # curl -d without -H sends the JSON as a form: say what to add (it said "Input should be a valid dictionary").
    r = server.http.post("/jobs", content=json.dumps(base).encode(),
                         headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"], r.text

    assert stored_state(rdb, server.prefix) == before
    assert server.http.get("/jobs").json()["total"] == 1
    assert not (outside / "job").exists() and not Path("/etc/swift-job").exists()
    # The same body with a valid folder is accepted: the rejections were about the field named.
    ok = server.create(**{**base, "output_dir": str(server.output_root / "inside" / "abs")})
    assert ok.status_code == 201 and ok.json()["job_id"] == "abs"
    # A folder freed by its job's end can be used again.
    assert server.http.post("/jobs/busy/stop").json()["status"] == "cancelled"
    gone = server.http.delete("/queue/busy")
    assert gone.status_code == 409 and "cancelled: it has left the queue already" in gone.json()["detail"]
    again = server.create(**valid(workspace, "busy"))
    assert again.status_code == 201 and again.json()["job_id"] == "busy-2"


def test_gpu_requests_that_fit_are_accepted(server: ApiServer, workspace: Path) -> None:
    for extra in ({"gpu_ids": [1]}, {"num_gpus": 2}, {"min_gpu_memory_gb": 80}, {"num_gpus": 0}):
        r = server.create(**valid(workspace, f"fits{len(server.http.get('/jobs').json()['jobs'])}", **extra))
        assert r.status_code == 201, (extra, r.text)
        assert r.json()["status"] == "pending"


def test_actions_that_make_no_sense_for_the_status_are_409(server: ApiServer, workspace: Path,
                                                           rdb: redis.Redis) -> None:  # fmt: skip
    r = server.create(
        **valid(workspace, "run", auto_start=True, data_path=fake_dataset(workspace, "hang", hang_after_steps=1))
    )
    assert r.json()["status"] == "running"
    wait_for(lambda: server.job("run")["pid"], what="the pid")
    server.create(**valid(workspace, "idle"))
    before = stored_state(rdb, server.prefix)
    before_events = list(rdb.xrange(Keys(server.prefix).job_events("run")) or ())
    checks = [
        ("POST", "/jobs/run/start", None, ["running"]),
        ("POST", "/jobs/run/export", None, ["running"]),
        ("DELETE", "/jobs/run", None, ["stop it first"]),
        ("PATCH", "/jobs/run", {"priority": 1}, ["running", "pending or queued"]),
        ("DELETE", "/queue/run", None, ["not queued"]),
        ("DELETE", "/queue/idle", None, ["not queued"]),
        ("POST", "/jobs/idle/export", None, ["pending"]),
    ]
    for method, path, payload, words in checks:
        resp = server.http.request(method, path, json=payload)
        assert resp.status_code == 409, (method, path, resp.text)
        for word in words:
            assert word in resp.json()["detail"], (path, resp.json())
    bad_patches: list[dict[str, Any]] = [{"priority": 11}, {"priority": "x"}, {}, {"priority": 3, "extra": 1}]
    for bad in bad_patches:
        resp = server.http.patch("/jobs/idle", json=bad)
        assert resp.status_code == 422, (bad, resp.text)
    after = stored_state(rdb, server.prefix)
    keys = Keys(server.prefix)
    run = {keys.job("run"), keys.job_summary("run"), keys.job_events("run"), keys.job_history("run")}
    for key in set(before) | set(after):
        if key not in run:
            assert before.get(key) == after.get(key), key
    # The running job's own progress may move while the refusals come; nothing a refusal could touch does.
    moving = {"progress", "updated_at", "log_offset", "log_tail", "run_dir"}
    was, now = before[keys.job("run")], after[keys.job("run")]
    assert {k: v for k, v in was.items() if k not in moving} == {k: v for k, v in now.items() if k not in moving}
    assert json.loads(now["status"]) == "running" and json.loads(now["priority"]) == 5
    events = list(rdb.xrange(keys.job_events("run")) or ())
    assert [e for e in events if e not in before_events] == [], "a refusal left an event"


# ---- health, system, GPUs, docs ---------------------------------------------------------------------------


def test_health_system_status_and_gpus(server: ApiServer, workspace: Path) -> None:
    r = server.http.get("/health")
    assert r.status_code == 200
    health = r.json()
    assert health["status"] == "healthy" and health["redis"]["ok"] is True
    assert health["redis"]["latency_ms"] >= 0 and health["gpu"]["count"] == 2

    server.create(**valid(workspace, "a", auto_start=True, data_path=fake_dataset(workspace, "h", hang_after_steps=1)))
    server.create(**valid(workspace, "b"))
    running = wait_for(lambda: (j := server.job("a"))["pid"] and j)
    sysr = server.http.get("/system/status")
    assert sysr.status_code == 200
    s = sysr.json()
    assert s["cpu"]["count"] >= 1 and 0 <= s["cpu"]["percent"] <= 100
    assert s["memory"]["total_gb"] > 0 and 0 <= s["memory"]["percent"] <= 100
    assert s["disk"]["path"] == str(server.output_root) and s["disk"]["free_gb"] > 0
    disk = s["disk"]  # df's Use%: of used + available, not of a total that holds reserved blocks too
    assert abs(disk["percent"] - 100 * disk["used_gb"] / (disk["used_gb"] + disk["free_gb"])) < 0.5, disk
    assert set(s["load"]) == {"1m", "5m", "15m"}
    assert s["gpus"]["count"] == 2 and s["gpus"]["backend"] == "simulated"
    assert s["gpus"]["memory_total_gb"] == pytest.approx(160)
    assert s["jobs"]["running"] == 1 and s["jobs"]["pending"] == 1 and s["jobs"]["completed"] == 0
    assert s["redis"]["ok"] is True and s["redis"]["latency_ms"] >= 0
    assert s["version"] and s["uptime_seconds"] > 0
    assert s["swift"]["version"] == "4.6.0"

    g = server.http.get("/gpus").json()
    assert g["backend"] == "simulated" and len(g["gpus"]) == 2
    for i, gpu in enumerate(g["gpus"]):
        assert gpu["index"] == i
        assert gpu["uuid"] and gpu["name"]
        assert gpu["memory_total_mb"] == pytest.approx(80 * 1024)
        assert gpu["memory_used_mb"] + gpu["memory_free_mb"] == pytest.approx(gpu["memory_total_mb"])
        for key in ("utilization", "temperature_c", "processes"):
            assert key in gpu
    holders = {gpu["index"]: gpu["job_id"] for gpu in g["gpus"]}
    assert holders[running["gpu_ids"][0]] == "a" and list(holders.values()).count(None) == 1


async def test_a_worker_out_of_open_files_answers_503_not_a_bare_500(
    app_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # At its limit on open files a worker failed wherever a request opened one: /system/status reads /proc, and
    # answered a bare "500 Internal Server Error" 23 times under a load of idle connections (hunt BY).
    import errno

    import psutil

    async with app_factory() as client:

        def out_of_files() -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(psutil, "virtual_memory", out_of_files)
        r = await client.get("/system/status")
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert r.json()["detail"] == "the server has too many connections open right now: try again shortly"
        monkeypatch.undo()
        assert (await client.get("/system/status")).status_code == 200


def test_health_is_503_with_the_reason_when_redis_is_gone(server_factory: Callable[..., ApiServer],
                                                          own_redis: EmbeddedRedis) -> None:  # fmt: skip
    server = server_factory(env={"REDIS_URL": own_redis.url, **QUICK_TO_GIVE_UP})
    assert server.http.get("/health").status_code == 200
    own_redis.stop()
    r = wait_for(lambda: (resp := server.http.get("/health")).status_code == 503 and resp, timeout=15)
    assert r.json()["status"] == "unhealthy" and "Redis does not answer" in r.json()["detail"]
    assert r.headers.get("retry-after") == "5", r.headers  # as every route's 503 while Redis does not answer
    jobs = server.http.get("/jobs")
    # Redis's address and the error are the operator's, in the log (they were told to every caller, and nothing
    # above an INFO access line was logged: hunt AP).
    assert (jobs.status_code, jobs.json()["detail"]) == (503, "Redis does not answer; try again when it is back")
    wait_for(lambda: "WARNING" in (log := server.server_log()) and "requests answered 503: Redis does not answer ("
             in log, what="the outage in the server's log")  # fmt: skip
    assert server.proc is not None and server.proc.poll() is None  # the server stays up


def test_docs_and_openapi_list_every_route(server: ApiServer) -> None:
    root = server.base.split("/api/v1")[0]
    docs = server.http.get(f"{root}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = server.http.get(f"{root}/openapi.json").json()
    p = "/api/v1/training"
    expected = {
        (f"{p}/jobs", "post"), (f"{p}/jobs", "get"), (f"{p}/jobs/{{job_id}}", "get"),
        (f"{p}/jobs/{{job_id}}", "delete"), (f"{p}/jobs/{{job_id}}", "patch"),
        (f"{p}/jobs/{{job_id}}/start", "post"), (f"{p}/jobs/{{job_id}}/stop", "post"),
        (f"{p}/jobs/{{job_id}}/export", "post"), (f"{p}/jobs/{{job_id}}/status", "get"),
        (f"{p}/jobs/{{job_id}}/progress", "get"), (f"{p}/jobs/{{job_id}}/logs", "get"),
        (f"{p}/jobs/{{job_id}}/events", "get"), (f"{p}/gpus", "get"), (f"{p}/system/status", "get"),
        (f"{p}/health", "get"), (f"{p}/queue", "get"), (f"{p}/queue/process", "post"),
        (f"{p}/queue/{{job_id}}", "delete"), (f"{p}/queue/{{job_id}}/status", "get"),
        (f"{p}/queue/processor/start", "post"), (f"{p}/queue/processor/stop", "post"),
        (f"{p}/queue/processor/status", "get"),
    }  # fmt: skip
    listed = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert expected <= listed, expected - listed
    create = spec["paths"][f"{p}/jobs"]["post"]
    assert {"201", "409", "422"} <= set(create["responses"])
    assert "204" in spec["paths"][f"{p}/jobs/{{job_id}}"]["delete"]["responses"]
    # A resume, and a quantized export, count as a create against MAX_QUEUED_PER_OWNER: Swagger showed their
    # 429 as undocumented.
    for action in ("resume", "export"):
        assert "429" in spec["paths"][f"{p}/jobs/{{job_id}}/{action}"]["post"]["responses"], action
    # What "Try it out" sends for an export is its first example: a plain merge (one made up from the fields'
    # examples asked for a 1-bit awq quantization, refused with a 422).
    examples = spec["paths"][f"{p}/jobs/{{job_id}}/export"]["post"]["requestBody"]["content"]["application/json"]
    assert next(iter(examples["examples"].values()))["value"] == {}
    assert "409" in spec["paths"][f"{p}/jobs/{{job_id}}"]["delete"]["responses"]
    assert "404" in spec["paths"][f"{p}/jobs/{{job_id}}/start"]["post"]["responses"]


def test_query_values_redis_cannot_take_are_422_not_500(server: ApiServer, workspace: Path) -> None:
    r = server.create(**valid(workspace, "q"))
    assert r.status_code == 201
    for path in ("/jobs/q/events?after=99999999999999999999999-0", "/jobs?offset=100000000000000000000",
                 "/queue?offset=100000000000000000000"):  # fmt: skip
        resp = server.http.get(path)
        assert resp.status_code == 422, (path, resp.text)
        assert resp.json()["detail"]
    # A parameter given twice: the last one was used without a word (status=running&status=queued: queued alone).
    resp = server.http.get("/jobs?status=running&status=queued")
    assert resp.status_code == 422 and "query parameter 'status' is given 2 times" in resp.json()["detail"], resp.text
    assert server.http.get("/jobs?status=pending&limit=5").json()["total"] == 1
    # One the route does not take: a typo listed every job, unsaid (hunt AO); a HEAD, and a page, as well.
    resp = server.http.get("/jobs?stauts=running")
    assert resp.status_code == 422 and resp.json()["detail"].startswith(
        "query parameter 'stauts' is not one this route takes (it takes: "
    ), resp.text
    assert "status" in resp.json()["detail"] and "limit" in resp.json()["detail"]
    assert server.http.head("/jobs/q?verbose=1").status_code == 422
    assert "(it takes: none)" in server.http.post("/jobs/q/start?now=1").json()["detail"]
    assert server.http.get("/jobs/q/progress?history_limit=3").status_code == 200
    root = server.base.split("/api/")[0]
    assert httpx.get(f"{root}/ui/login?next=/ui/jobs/q&whatever=1").status_code == 200  # (pages are no API route)


def test_a_relative_local_model_path_means_what_it_meant_to_the_caller(server: ApiServer, workspace: Path) -> None:
    relative = os.path.relpath(workspace / MODEL_DIR, ROOT)  # the server runs in the project folder
    r = server.create(**{**valid(workspace, "rel"), "model_path": relative})
    assert r.status_code == 201, r.text
    job = server.job("rel")
    assert job["model_path"] == str((workspace / MODEL_DIR).resolve())


# ---- what the published schema promises ---------------------------------------------------------------------


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 512):
        yield body[i : i + 512]


async def test_every_answer_the_body_limit_gives_and_head_are_in_the_schema(app_factory: Callable[..., Any]) -> None:
    # The body limit refuses an oversized body before any route runs, whatever the method, but only the routes
    # that read a body listed 413 (not /start, /stop, /pause, /resume); HEAD of an artifact was not listed.
    async with app_factory(scheduler=False, MAX_REQUEST_BYTES=1024) as client:
        spec = (await client.get("http://test/openapi.json")).json()
        prefix = "/api/v1/training"
        download = spec["paths"][f"{prefix}/jobs/{{job_id}}/artifacts/{{path}}"]
        assert {"200", "206", "404", "416"} <= set(download["head"]["responses"])
        r = await client.head("/jobs/nojob/artifacts/a.txt")
        assert r.status_code == 404 and str(r.status_code) in download["head"]["responses"]
        checked = []
        for template, operations in spec["paths"].items():
            path = template.replace("{job_id}", "nojob").replace("{file_id}", "nofile").replace("{path}", "a.txt")
            for method, operation in operations.items():
                # Uploads stream to disk under their own limit (FILE_MAX_BYTES); not every method of their path
                # (GET /files took a body of any size).
                if (method, template) == ("post", f"{prefix}/files"):
                    continue
                r = await client.request(method.upper(), f"http://test{path}", content=b"x" * 2048)
                assert r.status_code == 413, (method, template, r.status_code)
                assert "413" in operation["responses"], (method, template)
                # Sent chunked (no Content-Length), a route that never reads its body ran its action anyway.
                r = await client.request(method.upper(), f"http://test{path}", content=chunks(b"x" * 2048))
                assert r.status_code == 413, (method, template, r.status_code, "chunked")
                r = await client.request(method.upper(), f"http://test{path}", content=gzip.compress(b"{}"),
                                         headers={"Content-Encoding": "gzip"})  # fmt: skip
                assert r.status_code == 415, (method, template, r.status_code)
                assert method == "head" or "send it uncompressed" in r.json()["detail"], (method, template)
                assert "415" in operation["responses"], (method, template)
                checked.append((method, template))
        assert ("post", f"{prefix}/jobs/{{job_id}}/start") in checked and ("get", f"{prefix}/files") in checked
        assert len(checked) > 20


async def test_the_schema_and_the_server_agree(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    from tests.conftest import make_model

    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory() as client:
        spec = client.app.openapi()
        create = spec["paths"]["/api/v1/training/jobs"]["post"]
        assert create["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "ValidationErrorResponse"
        )
        assert "400" in create["responses"] and "413" in create["responses"] and "429" in create["responses"]
        gpu_ids = spec["components"]["schemas"]["JobCreate"]["properties"]["gpu_ids"]
        assert gpu_ids["anyOf"][0]["minItems"] == 1 and gpu_ids["uniqueItems"] is True
        assert gpu_ids["anyOf"][0]["items"] == {"type": "integer", "minimum": 0, "maximum": 1023}
        body = {"data_path": fake_dataset(tmp_path, "d"), "model_path": str(tmp_path / "models" / "tiny-qwen2"),
                "output_dir": "s", "priority": 7.0, "num_gpus": 1.0}  # fmt: skip
        r = await client.post("/jobs", json=body)
        assert r.status_code == 201, r.text  # 7.0 is an integer to JSON Schema
        r = await client.patch("/jobs/s", json={"priority": 3.0})
        assert r.status_code == 200 and r.json()["priority"] == 3
        r = await client.patch("/jobs/s", json={"priority": 3.5})
        assert r.status_code == 422
        err = r.json()
        assert isinstance(err["detail"], str) and err["errors"][0]["loc"] == ["body", "priority"]
        # Unsupported methods: 405 with every method the path has.
        r = await client.request("OPTIONS", "/jobs/s")
        assert r.status_code == 405 and set(r.headers["Allow"].split(", ")) >= {"GET", "PATCH", "DELETE"}
        r = await client.put("/jobs")
        assert r.status_code == 405 and set(r.headers["Allow"].split(", ")) >= {"GET", "POST"}
        # Unreadable and oversized bodies.
        r = await client.post("/jobs", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = await client.post("/jobs", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "MAX_REQUEST_BYTES" in r.json()["detail"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: found too large while it is read
            for _ in range(3):
                yield b" " * (1 << 20)

        r = await client.post("/jobs", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "MAX_REQUEST_BYTES" in r.json()["detail"], r.text
        # (A Latin-1 body: its declared charset was ignored, and Python's codec error was all it was told.)
        for raw, why, kind in (
            (b"[" * 50_000 + b"]" * 50_000, "nested too deeply", "application/json"),
            (b'{"priority": ' + b"9" * 5000 + b"}", "a number with more than 4300 digits", "application/json"),
            (
                '{"data_path": "caf\u00e9"}'.encode("latin-1"),
                "byte 18 is not UTF-8: JSON is sent as UTF-8, whatever charset it declares",
                "application/json; charset=latin-1",
            ),
        ):
            r = await client.post("/jobs", content=raw, headers={"content-type": kind})
            assert r.status_code == 400 and r.json()["detail"] == (
                f"body: not JSON this server can read ({why}): send one JSON object"), r.text  # fmt: skip
        # history_limit=0 means no points.
        assert (await client.get("/jobs/s/progress", params={"history_limit": 0})).json()["history"] == []


async def test_system_status_says_no_queue_processor_runs_without_a_scheduler(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Only API workers: the switch is on, but nothing runs the queue (GET /queue said so, /system/status did not).
    async with app_factory(scheduler=False) as client:
        await client.scheduler.cluster.init_processor_switch(True)  # as a scheduler that ran before left it
        status = (await client.get("/system/status")).json()
        processor = (await client.get("/queue/processor/status")).json()
        assert status["queue_processor"]["running"] is False and processor["running"] is False, status
        assert status["queue_processor"]["enabled"] == processor["enabled"]


async def test_health_answers_503_in_seconds_when_redis_hangs(own_redis: EmbeddedRedis, tmp_path: Path) -> None:
    # A stopped (or swapping) Redis held /health for the client's timeout times its retries, 20 s: longer than
    # any health check waits (the image's HEALTHCHECK: 5 s), so the container was never seen unhealthy.
    import httpx

    from application.main import create_app

    assert own_redis.process is not None
    app = create_app(settings_for(own_redis.url, tmp_path))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test/api/v1/training", timeout=60
        ) as client,  # fmt: skip
    ):
        assert (await client.get("/health")).status_code == 200
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        r = await client.get("/health")
        took = time.monotonic() - started
        # /metrics too: it held a scrape 20 s, past Prometheus's scrape timeout, and scrapes piled up.
        started = time.monotonic()
        m = await client.get("http://test/metrics")
        took_metrics = time.monotonic() - started
        os.kill(own_redis.process.pid, signal.SIGCONT)
        assert r.status_code == 503 and "did not answer within 3 s" in r.json()["detail"], r.text
        assert took < 4.5, took
        assert m.status_code == 503 and "did not answer within 5 s" in m.json()["detail"], m.text
        assert took_metrics < 7.0, took_metrics
        assert (await client.get("http://test/metrics")).status_code == 200  # and back once Redis is


@pytest.fixture
def snapshotting_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Redis of the test's own that snapshots into a folder of its own (save points set): (its URL, the folder)."""
    import subprocess

    from application.services.embedded_redis import find_redis_server
    from tests.conftest import free_port

    binary, port, data = find_redis_server(), free_port(), tmp_path / "redis-data"
    assert binary
    data.mkdir()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save",
                               "3600 1", "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"redis://127.0.0.1:{port}/0"
        with redis.Redis.from_url(url) as direct:
            wait_for(lambda: _pings(direct), what="the Redis")
        yield url, data
    finally:
        server.kill()
        server.wait()


async def test_health_says_when_redis_refuses_writes_though_it_answers_reads(
    snapshotting_redis: tuple[str, Path], tmp_path: Path
) -> None:
    # A full disk under Redis's files: every create was 503 (MISCONF) while /health said healthy, redis ok.
    import shutil

    import httpx

    from application.main import create_app

    url, data = snapshotting_redis
    app = create_app(settings_for(url, tmp_path))
    direct = redis.asyncio.Redis.from_url(url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/api/v1/training") as client,
    ):  # fmt: skip
        before = (await client.get("/health")).json()
        assert before["redis"]["ok"] is True and "error" not in before["redis"], before
        shutil.rmtree(data)  # (its snapshot cannot be written: as on a full disk)
        await direct.bgsave()
        deadline = time.monotonic() + 10
        while (await direct.info("persistence"))["rdb_last_bgsave_status"] != "err":
            assert time.monotonic() < deadline, "the save did not fail"
            await asyncio.sleep(0.05)
        with pytest.raises(redis.ResponseError, match="MISCONF"):
            await direct.set("a", "b")
        r = await client.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "degraded", r.text
        assert r.json()["redis"]["ok"] is False and "refuses writes" in r.json()["redis"]["error"], r.text
    await direct.aclose()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


async def test_gpus_says_when_its_reading_is_stale(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    # With no scheduler publishing, /gpus showed a minutes-old reading (free memory, holders) with no error.
    async with app_factory(scheduler=False) as client:
        cluster = client.scheduler.cluster
        gpu = {"index": 0, "uuid": "GPU-0", "name": "sim", "memory_total_mb": 81920.0, "memory_used_mb": 0.0,
               "memory_free_mb": 81920.0, "utilization": 0.0, "memory_utilization": 0.0, "temperature_c": None,
               "power_w": None, "power_limit_w": None, "processes": []}  # fmt: skip
        reading = {"backend": "simulated", "gpus": [gpu], "error": None, "driver_version": None}
        await cluster.put_gpu_snapshot({**reading, "taken_at": time.time()})
        assert (await client.get("/gpus")).json()["error"] is None
        await cluster.put_gpu_snapshot({**reading, "taken_at": time.time() - 300})
        gpus = (await client.get("/gpus")).json()
        error = gpus["error"]
        assert error.startswith("this reading is 300 s old") and "is one running?" in error, error
        # Every view of the same reading says so: /queue and /system/status showed its free GPUs and memory as if
        # they were current.
        assert gpus["summary"]["error"] == error, gpus
        assert (await client.get("/queue")).json()["summary"]["gpu_error"] == error
        assert (await client.get("/system/status")).json()["gpus"]["error"] == error
        assert (await client.get("/health")).json()["gpu"]["error"] == error


async def test_a_lone_surrogate_in_training_arguments_is_a_422_and_stores_nothing(app_factory: Any,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    # "\ud800" in an argument's value was stored, and the job could not be read again: every route on it a 500,
    # and a queued one failed every queue pass (no job of anyone's started). In a message, it was a 500 too.
    seed_swift_probe(tmp_path)
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory() as client:
        for name, training in (("s1", {"system": "\ud800"}), ("s2", {"target_modules": ["q", "\ud800"]}),
                               ("s3", {"deepspeed": {"zero_optimization": {"x": "\ud800"}}}),
                               ("s4", {"model_kwargs": {"\ud800": 1}})):  # fmt: skip
            typed = {**training, "model_type": "qwen2", "template": "qwen2_5", "torch_dtype": "float32"}
            raw = json.dumps(job_body(tmp_path, name, num_gpus=0, training=typed)).encode()  # "\ud800" escaped
            r = await client.post("/jobs", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and "lone surrogate" in r.json()["detail"], (name, r.text)
            assert (await client.get(f"/jobs/{name}")).status_code == 404
        listed = (await client.get("/jobs")).json()
        assert listed["total"] == 0


async def test_a_path_no_route_answers_names_where_the_api_is(app_factory: Callable[..., Any]) -> None:
    # `curl localhost:8000/health` got a bare {"detail": "Not Found"} (hunt BM).
    async with app_factory(scheduler=False) as client:
        r = await client.get("http://test/health")
        assert r.status_code == 404, r.text
        detail = r.json()["detail"]
        assert detail.startswith("Not Found: no route answers GET /health;") and "/api/v1/training/health" in detail
        assert "/docs" in detail
        # A 404 of ours keeps its own words, and a file the dashboard's static folder lacks is not found there.
        assert (await client.get("/jobs/nope")).json()["detail"].startswith("job 'nope' not found")
        assert (await client.get("http://test/static/nope.js")).json()["detail"] == "Not Found"
        # A newline in a path (an artifact's name): no route takes it, and it is said so, not as another path.
        r = await client.get("/jobs/nope/artifacts/a%0Ab")
        assert r.status_code == 404 and "the path holds a control character" in r.json()["detail"], r.text


async def test_the_first_system_status_of_a_worker_says_the_cpu_in_use(app_factory: Callable[..., Any]) -> None:
    # psutil measures from the calling thread's previous call: read in a worker thread, the first answer said
    # 0.0 % while the host's load was 4.4 on 2 cores (hunt BM).
    async with app_factory(scheduler=False) as client:
        end = time.process_time() + 0.3
        while time.process_time() < end:  # this process keeps a core busy
            pass
        percent = (await client.get("/system/status")).json()["cpu"]["percent"]
        assert percent > 0, percent


async def test_swagger_uis_cpu_example_is_created_as_it_is_on_a_server_without_gpus(
    app_factory: Callable[..., Any], workspace: Path
) -> None:
    # Both earlier examples ask for a GPU: on the quick start's server, without one, "Try it out" got a 422.
    async with app_factory(GPU_BACKEND="auto", MODEL_ROOTS=str(workspace / "models")) as client:
        spec = (await client.get("http://test/openapi.json")).json()
        body = spec["paths"]["/api/v1/training/jobs"]["post"]["requestBody"]["content"]["application/json"]
        cpu = body["examples"]["cpu"]["value"]
        r = await client.post("/jobs", json={**cpu, "auto_start": False})
        assert r.status_code == 201, r.text


async def test_a_query_path_or_header_value_of_the_wrong_shape_is_told_in_words_not_as_a_regex(
    app_factory: Any,
) -> None:
    # A bad cursor was answered with the cursor's regex; its plain message in parse_cursor was never reached.
    asked = {
        ("GET", "/jobs?cursor=garbage"): "query.cursor: not one this server gave: pass a page's next_cursor",
        ("GET", "/files?cursor=x"): "query.cursor: not one this server gave",
        ("GET", "/jobs/a/events?after=x"): "query.after: not an event id: pass the id of the last event",
        ("GET", "/jobs?owner=a%20b"): "query.owner: an owner's name is 1-64 characters",
        ("GET", "/jobs/-bad"): "path.job_id: not a job id: 1-128 characters",
        ("GET", "/files/nope"): "path.file_id: not a file id: a file's id, as POST /files answered it",
    }
    async with app_factory(scheduler=False) as client:
        for (method, url), said in asked.items():
            r = await client.request(method, url)
            assert r.status_code == 422 and r.json()["detail"].startswith(said), (url, r.text)
            assert "pattern" not in r.json()["detail"], r.text  # (the errors list keeps pydantic's own words)
        r = await client.post("/jobs", json={}, headers={"Idempotency-Key": "a b"})
        assert r.status_code == 422 and "header.Idempotency-Key: 1-255 printable ASCII" in r.json()["detail"], r.text
