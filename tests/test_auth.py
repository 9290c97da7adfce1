"""API keys: who may call what. Every route, every kind of caller, in this process against a real Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from application.auth import ANONYMOUS, KeyRing
from application.config import SettingsError, load_settings
from application.exceptions import Unauthorized
from application.key_list import ApiKeyEntry, parse_api_keys
from tests.conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, KEYS_SETTING, ROOT, auth, job_body, make_model

PUBLIC = {("GET", "/api/v1/training/health")}
# What a pending job refuses (nothing to export, pause or resume yet), whoever asks.
PENDING_CONFLICTS = {("POST", "/jobs/{job_id}/export"), ("POST", "/jobs/{job_id}/pause"),
                     ("POST", "/jobs/{job_id}/resume")}  # fmt: skip


def test_keyring_identifies_each_key_and_refuses_others() -> None:
    ring = KeyRing([ApiKeyEntry("alice", "user", ALICE_KEY), ApiKeyEntry("root", "admin", ADMIN_KEY)])
    assert ring.identify(ALICE_KEY).name == "alice" and not ring.identify(ALICE_KEY).is_admin
    assert ring.identify(ADMIN_KEY).is_admin
    for wrong in (None, "", ALICE_KEY[:-1], ALICE_KEY + "x", "x" * 100_000):
        with pytest.raises(Unauthorized) as exc:
            ring.identify(wrong)
        assert exc.value.headers == {"WWW-Authenticate": "Bearer"}
    assert KeyRing([]).identify(None) == ANONYMOUS  # no keys configured: one open, single-user server
    # The longest key with anything appended: it was cut to 512 characters before the comparison, and taken.
    longest = "k" * 512
    ring = KeyRing([ApiKeyEntry("carol", "user", longest)])
    assert ring.identify(longest).name == "carol"
    with pytest.raises(Unauthorized):
        ring.identify(longest + "anything-else")


def test_key_settings_fail_fast_with_one_line(tmp_path: Path) -> None:
    assert [e.name for e in parse_api_keys(f"a:user:{ALICE_KEY}, b:admin:{BOB_KEY}", None)] == ["a", "b"]
    keyfile = tmp_path / "keys.json"
    keyfile.write_text('{"carol": {"role": "user", "key": "carol-key-0123456789"}}')
    assert [(e.name, e.role) for e in parse_api_keys(None, keyfile)] == [("carol", "user")]
    bad = {
        "a:root:" + ALICE_KEY: "role must be admin or user",
        "a:user:short": "16-512 printable ASCII characters",
        # Never matched what a request can send: keys are cut to 512 characters, headers read as Latin-1.
        "a:user:" + "x" * 600: "16-512 printable ASCII characters",
        "a:user:ключ-0123456789abcdef": "16-512 printable ASCII characters",
        "a:user": "name:role:key",
        f"a:user:{ALICE_KEY},a:admin:{BOB_KEY}": "its own name",
        f"a:user:{ALICE_KEY},b:admin:{ALICE_KEY}": "share one key",
        # The server's own actors in job events: a key so named made its owner's actions the scheduler's.
        f"scheduler:user:{ALICE_KEY}": "the server's own actor",
        f"anonymous:user:{ALICE_KEY}": "the server's own actor",
        # Joined with ';': one key for a, holding b's entry; b's key never worked, and nothing said so.
        f"a:user:{ALICE_KEY};b:user:{BOB_KEY}": "separate entries with ','",
    }
    for value, words in bad.items():
        with pytest.raises(SettingsError) as exc:
            load_settings(API_KEYS=value)
        assert words in str(exc.value) and ALICE_KEY not in str(exc.value), str(exc.value)


def test_an_open_server_refuses_to_listen_on_the_network(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "APP_HOST": "0.0.0.0"}
    out = subprocess.run([sys.executable, str(ROOT / "start.py")], env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "APP_HOST=0.0.0.0" in lines[0] and "API_KEYS" in lines[0], out.stderr
    assert load_settings(APP_HOST="0.0.0.0", ALLOW_UNAUTHENTICATED=True).bind_host == "0.0.0.0"
    # Only the roles that listen refuse it: a runner (which gets no keys) read APP_HOST=0.0.0.0 from env/.env.prod
    # and refused to start, so every run of a server started with ENVIRONMENT=prod failed as 'runner_lost'.
    assert "APP_HOST=0.0.0.0" in (load_settings(APP_HOST="0.0.0.0").open_to_the_network() or "")
    assert load_settings(APP_HOST="0.0.0.0", API_KEYS=KEYS_SETTING).open_to_the_network() is None
    assert load_settings().bind_host == "127.0.0.1"
    assert load_settings(API_KEYS=KEYS_SETTING).bind_host == "0.0.0.0"


def _create_body(workspace: Path, name: str) -> dict[str, Any]:
    return job_body(workspace, name, dataset="data", hang_after_steps=1)


FILE_ROW = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


def _request_for(method: str, path: str, job_id: str, workspace: Path,
                 file_id: str = "") -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:  # fmt: skip
    # The client's base URL is the API's; a route outside it (/metrics) is named in full.
    url = path.removeprefix("/api/v1/training") if path.startswith("/api/v1/training") else f"http://test{path}"
    url = url.replace("{job_id}", job_id).replace("{file_id}", file_id)
    if "{path}" in url:
        # A file the job's output folder holds (settings_for: OUTPUT_ROOT is <workdir>/output).
        note = workspace / "output" / job_id / "notes.txt"
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text("what the owner may download\n")
        url = url.replace("{path}", "notes.txt")
    body: dict[str, Any] | None = None
    files: dict[str, Any] | None = None
    if method == "POST" and url == "/jobs":
        body = _create_body(workspace, f"new-{job_id}")
    elif method == "POST" and url == "/files":
        files = {"file": ("train.jsonl", FILE_ROW * 3)}
    elif method == "PATCH":
        body = {"priority": 3}
    return url, body, files


async def test_every_route_needs_a_key_and_users_see_only_their_own_jobs(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(
        API_KEYS=KEYS_SETTING, CREATE_RATE_LIMIT="0", WEBHOOK_SECRET="a-webhook-secret-0123456789"
    ) as client:
        spec = client.app.openapi()
        routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
        assert len(routes) >= 20
        counter = 0
        conflicts: set[tuple[str, str]] = set()

        async def alices_job() -> str:
            nonlocal counter
            counter += 1
            name = f"own{counter}"
            r = await client.post("/jobs", json=_create_body(tmp_path, name), headers=auth(ALICE_KEY))
            assert r.status_code == 201, r.text
            return str(r.json()["job_id"])

        async def alices_file() -> str:
            r = await client.post("/files", files={"file": ("own.jsonl", FILE_ROW * 3)}, headers=auth(ALICE_KEY))
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

        for method, path in routes:
            if (method, path) in PUBLIC:
                assert (await client.request(method, path.removeprefix("/api/v1/training"))).status_code == 200
                continue
            admin_only = "/queue/processor/" in path or path == "/metrics"
            on_a_job = "{job_id}" in path or "{file_id}" in path  # another user's job or file: 404
            outcomes: dict[str, int] = {}
            for who, headers in [("nobody", {}), ("wrong", auth("not-a-key-0123456789")),
                                 ("wrong-x", {"X-API-Key": "not-a-key-0123456789"}), ("other", auth(BOB_KEY)),
                                 ("owner", auth(ALICE_KEY)), ("owner-x", {"X-API-Key": ALICE_KEY}),
                                 ("admin", auth(ADMIN_KEY))]:  # fmt: skip
                job_id = await alices_job()
                if path.endswith("/stream"):
                    # A stream follows its job until the job ends: end it first, so the answer ends too.
                    await client.post(f"/jobs/{job_id}/stop", headers=auth(ALICE_KEY))
                file_id = await alices_file() if "{file_id}" in path else ""
                url, body, files = _request_for(method, path, job_id, tmp_path, file_id)
                r = await client.request(method, url, json=body, files=files, headers=headers)
                outcomes[who] = r.status_code
                if who in ("nobody", "wrong", "wrong-x"):
                    assert r.status_code == 401, (method, path, who, r.text)
                    # (a HEAD answer has no body to say why)
                    assert r.headers["WWW-Authenticate"] == "Bearer" and (method == "HEAD" or r.json()["detail"])
                elif who == "other" and on_a_job:
                    assert r.status_code == 404, (method, path, r.text)
                    assert (await client.get(f"/jobs/{job_id}", headers=auth(ALICE_KEY))).status_code == 200
                elif admin_only and who in ("other", "owner", "owner-x"):
                    assert r.status_code == 403 and "admin" in r.json()["detail"], (method, path, r.text)
                else:
                    assert r.status_code in (200, 201, 204, 409), (method, path, who, r.text)
            # What the owner may do, an admin may do too.
            assert outcomes["admin"] == outcomes["owner"] or admin_only, (method, path, outcomes)
            if outcomes["owner"] == 409:
                conflicts.add((method, path.removeprefix("/api/v1/training")))
        # A 409 is the job's state refusing the action (a fresh job is pending), never the key's doing.
        assert conflicts == PENDING_CONFLICTS, conflicts

        # Lists: a user sees only their own jobs; an admin sees all and may filter by owner.
        await client.post("/jobs", json=_create_body(tmp_path, "bobs"), headers=auth(BOB_KEY))
        mine = (await client.get("/jobs", params={"limit": 500}, headers=auth(BOB_KEY))).json()
        assert mine["total"] >= 1 and {j["owner"] for j in mine["jobs"]} == {"bob"}
        # Another owner's filter matches nothing this key may see: not bob's own jobs under alice's name.
        sneaky = (await client.get("/jobs", params={"owner": "alice"}, headers=auth(BOB_KEY))).json()
        assert sneaky["jobs"] == [] and sneaky["total"] == 0, sneaky
        own = (await client.get("/jobs", params={"owner": "bob", "limit": 500}, headers=auth(BOB_KEY))).json()
        assert own["total"] == mine["total"]
        everyone = (await client.get("/jobs", params={"limit": 500}, headers=auth(ADMIN_KEY))).json()
        assert {j["owner"] for j in everyone["jobs"]} == {"alice", "bob", "root"}
        alices = (await client.get("/jobs", params={"owner": "alice", "limit": 500}, headers=auth(ADMIN_KEY))).json()
        assert {j["owner"] for j in alices["jobs"]} == {"alice"} and alices["total"] < everyone["total"]
        # Events say who did what.
        job_id = await alices_job()
        await client.post(f"/jobs/{job_id}/stop", headers=auth(ADMIN_KEY))
        events = (await client.get(f"/jobs/{job_id}/events", headers=auth(ALICE_KEY))).json()["events"]
        assert [(e["type"], e["actor"]) for e in events] == [("created", "alice"), ("status_cancelled", "root")]


async def test_a_key_or_an_idempotency_key_given_twice_is_refused(app_factory: Callable[..., Any],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    # Two keys: the first was used (the job was alice's); two Idempotency-Keys: the first alone was kept (hunt AO).
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(API_KEYS=KEYS_SETTING) as client:
        body = _create_body(tmp_path, "twice")
        for headers in ([("Authorization", f"Bearer {ALICE_KEY}"), ("Authorization", f"Bearer {BOB_KEY}")],
                        [("X-API-Key", ALICE_KEY), ("x-api-key", BOB_KEY)],
                        [("X-API-Key", ALICE_KEY), ("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")]):  # fmt: skip
            r = await client.post("/jobs", json=body, headers=httpx.Headers(headers))
            name = headers[-1][0]
            assert r.status_code == 422, r.text
            assert r.json()["detail"].lower() == f"the {name.lower()} header is given more than once: send it once"
        assert (await client.get("/jobs/twice", headers=auth(ADMIN_KEY))).status_code == 404
        # One of each is as before, and no key at all is still told so first.
        r = await client.post("/jobs", json=body, headers=[("X-API-Key", ALICE_KEY), ("Idempotency-Key", "k1")])
        assert r.status_code == 201, r.text
        assert (await client.get("/jobs", headers=[("X-API-Key", "nope"), ("X-API-Key", "x")])).status_code == 401


async def test_a_body_without_a_valid_key_is_refused_before_it_is_read(app_factory: Callable[..., Any]) -> None:
    # FastAPI reads a route's body before it solves the key's dependency: 200 connections without a key, each
    # sending 1 MiB less a byte and then waiting, took an API worker from 109 MB to 211 MB (hunt BY).
    path = "/api/v1/training/jobs"

    async def post(app: Any, given: list[tuple[bytes, bytes]]) -> tuple[bool, list[dict[str, Any]]]:
        """Whether the body was asked for, and what was sent: a POST whose 1,000 bytes of body never come."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"host", b"test"), (b"content-type", b"application/json"), (b"content-length", b"1000"),
                             *given], "client": ("127.0.0.1", 1), "server": ("test", 80)}  # fmt: skip
        asked = asyncio.Event()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            asked.set()
            await asyncio.Event().wait()
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        answer = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait({answer, asyncio.create_task(asked.wait())}, timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        answer.cancel()
        return asked.is_set(), sent

    async with app_factory(API_KEYS=KEYS_SETTING) as client:
        for given, refused in ([], "this server needs an API key"), ([(b"x-api-key", b"nope")], "the API key is not"):
            asked, sent = await post(client.app, given)
            assert not asked and sent[0]["status"] == 401, sent
            assert (b"www-authenticate", b"Bearer") in sent[0]["headers"]
            assert refused in sent[1]["body"].decode(), sent
        asked, sent = await post(client.app, [(b"authorization", f"Bearer {ALICE_KEY}".encode())])
        assert asked and not sent  # a valid key: its body is read, as before


async def test_without_keys_everything_is_open_to_the_local_user(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory() as client:
        r = await client.post("/jobs", json=_create_body(tmp_path, "open"))
        assert r.status_code == 201, r.text
        assert r.headers["Location"] == "/api/v1/training/jobs/open"
        assert (await client.get("/jobs/open")).json()["owner"] is None
        assert (await client.get("/queue/processor/status")).status_code == 200
        assert (await client.get("/jobs/open/events")).json()["events"][0]["actor"] == "anonymous"


async def test_health_and_docs_need_no_key(app_factory: Callable[..., Any]) -> None:
    async with app_factory(API_KEYS=KEYS_SETTING) as client:
        assert (await client.get("/health")).status_code == 200
        root = httpx.URL("http://test")
        assert (await client.get(root.join("/openapi.json"))).status_code == 200
        assert (await client.get(root.join("/docs"))).status_code == 200
        assert (await client.get("/jobs")).status_code == 401


async def test_health_without_a_key_tells_what_is_up_but_not_where_or_which(app_factory: Callable[..., Any]) -> None:
    # An outsider learnt Redis's address (in its error), the leader's host and pid, SWIFT_BIN's path and versions.
    async with app_factory(API_KEYS=KEYS_SETTING) as client:
        deadline = time.monotonic() + 30
        while not (full := (await client.get("/health", headers=auth(ALICE_KEY))).json())["swift"]["bin"]:
            assert time.monotonic() < deadline, f"the scheduler never published ms-swift's facts: {full}"
            await asyncio.sleep(0.05)
        assert full["scheduler"]["leader"] and full["version"], full
        for headers in ({}, auth("not-a-key")):
            r = await client.get("/health", headers=headers)
            assert r.status_code == 200
            public = r.json()
            assert public["status"] == full["status"] and public["redis"] == {"ok": True}
            assert public["scheduler"]["ok"] is True and public["scheduler"]["gpu_reading_age_seconds"] is not None
            assert public["swift"] == {"ok": full["swift"]["ok"], "probed": full["swift"]["probed"]}
            assert public["version"] is None and "API key" in public["detail"]
            for secret in (full["scheduler"]["leader"], full["swift"]["bin"], full["redis"]["redis_version"]):
                assert secret not in r.text
