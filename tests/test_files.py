"""Uploaded data sets (POST/GET/DELETE /files) against a real server process (or the app in this process) and a real
Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from loguru import logger

from application.auth import Caller
from application.exceptions import Invalid
from application.services.files import FileStore
from application.services.keys import Keys
from tests.conftest import (
    ADMIN_KEY,
    ALICE_KEY,
    BOB_KEY,
    KEYS_SETTING,
    ApiServer,
    auth,
    job_body,
    make_model,
    settings_for,
    wait_for,
)

MESSAGES = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
VALID = (json.dumps(MESSAGES) + "\n").encode() * 20


def upload(server: ApiServer, content: bytes, name: str = "train.jsonl", key: str | None = ALICE_KEY,
           **form: str) -> httpx.Response:  # fmt: skip
    return server.http.post("/files", files={"file": (name, content, "application/octet-stream")}, data=form,
                            headers=auth(key) if key else {})  # fmt: skip


def stored_files(root: Path) -> list[Path]:
    """Every file under <data root>/uploads, temp files included."""
    uploads = root / "uploads"
    return sorted(p for p in uploads.rglob("*") if p.is_file()) if uploads.exists() else []


def test_upload_list_get_delete_and_owners(server_factory: Callable[..., ApiServer], tmp_path: Path,
                                           redis_url: str) -> None:  # fmt: skip
    server = server_factory(env={"API_KEYS": KEYS_SETTING})
    r = upload(server, VALID, "my data.jsonl")
    assert r.status_code == 201, r.text
    f = r.json()
    assert f["id"].startswith("file-") and len(f["id"]) == 29
    assert f["bytes"] == len(VALID) and f["sha256"] == hashlib.sha256(VALID).hexdigest()
    assert (f["rows"], f["rows_exact"], f["format"]) == (20, True, "messages")
    assert (f["owner"], f["filename"], f["purpose"], f["object"]) == ("alice", "my data.jsonl", "sft", "file")
    on_disk = tmp_path / "uploads" / "alice" / f"{f['id']}.jsonl"
    assert f["path"] == str(on_disk) and on_disk.read_bytes() == VALID
    assert stored_files(tmp_path) == [on_disk]  # no temp file left

    mine = server.http.get("/files", headers=auth(ALICE_KEY)).json()
    assert [x["id"] for x in mine["files"]] == [f["id"]] and mine["total"] == 1
    assert server.http.get(f"/files/{f['id']}", headers=auth(ALICE_KEY)).json() == f

    # Another user's key: the file does not exist for it.
    for method in ("GET", "DELETE"):
        other = server.http.request(method, f"/files/{f['id']}", headers=auth(BOB_KEY))
        assert other.status_code == 404 and "not found" in other.json()["detail"], other.text
    assert server.http.get("/files", headers=auth(BOB_KEY)).json()["total"] == 0
    assert server.http.get("/files", params={"owner": "alice"}, headers=auth(BOB_KEY)).json()["total"] == 0
    assert server.http.get("/files/file-" + "0" * 24, headers=auth(ALICE_KEY)).status_code == 404
    # An admin sees everyone's, or one owner's.
    bobs = upload(server, VALID, "b.jsonl", BOB_KEY, purpose="pt").json()
    everyone = server.http.get("/files", headers=auth(ADMIN_KEY)).json()
    assert [x["id"] for x in everyone["files"]] == [bobs["id"], f["id"]]  # newest first
    only = server.http.get("/files", params={"owner": "bob"}, headers=auth(ADMIN_KEY)).json()
    assert [x["id"] for x in only["files"]] == [bobs["id"]] and only["files"][0]["purpose"] == "pt"
    # A user's filter naming another owner matches nothing it may see (not its own files under that name).
    assert server.http.get("/files", params={"owner": "alice"}, headers=auth(BOB_KEY)).json()["files"] == []
    own = server.http.get("/files", params={"owner": "bob"}, headers=auth(BOB_KEY)).json()
    assert [x["id"] for x in own["files"]] == [bobs["id"]]
    page = server.http.get("/files", params={"limit": 1}, headers=auth(ADMIN_KEY)).json()
    assert page["total"] == 2 and page["next_offset"] == 1 and len(page["files"]) == 1
    assert server.http.get(f"/files/{f['id']}", headers=auth(ADMIN_KEY)).status_code == 200

    # A hostile name is display only: the file is stored under uploads/<owner>/ by its id.
    r = upload(server, VALID, "../../etc/passwd.jsonl")
    assert r.status_code == 201, r.text
    hostile = r.json()
    assert hostile["filename"] == "passwd.jsonl"
    assert Path(hostile["path"]).parent == tmp_path / "uploads" / "alice"
    assert not (tmp_path.parent / "etc").exists() and not (tmp_path / "etc").exists()

    # Deleting a file an unfinished job reads is refused; once the job ends it goes.
    body = job_body(tmp_path, "uses-upload", data_path=f["path"])
    job = server.http.post("/jobs", json=body, headers=auth(ALICE_KEY))
    assert job.status_code == 201, job.text
    job_id = job.json()["job_id"]
    busy = server.http.delete(f"/files/{f['id']}", headers=auth(ALICE_KEY))
    assert busy.status_code == 409 and job_id in busy.json()["detail"], busy.text
    assert server.http.post(f"/jobs/{job_id}/stop", headers=auth(ALICE_KEY)).status_code == 200
    assert server.http.delete(f"/files/{f['id']}", headers=auth(ALICE_KEY)).status_code == 204
    assert server.http.get(f"/files/{f['id']}", headers=auth(ALICE_KEY)).status_code == 404
    assert server.http.delete(f"/files/{f['id']}", headers=auth(ALICE_KEY)).status_code == 404
    assert not on_disk.exists()
    assert [x["id"] for x in server.http.get("/files", headers=auth(ALICE_KEY)).json()["files"]] == [hostile["id"]]
    # An admin may delete anyone's.
    assert server.http.delete(f"/files/{bobs['id']}", headers=auth(ADMIN_KEY)).status_code == 204
    assert stored_files(tmp_path) == [Path(hostile["path"])]
    # An owner's byte count goes with their last file (one per owner who ever uploaded stayed: hunt AN).
    direct = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = Keys(server.prefix)
        assert direct.get(keys.owner_file_bytes("bob")) is None
        assert direct.get(keys.owner_file_bytes("alice")) == str(hostile["bytes"])
    finally:
        direct.close()


def test_rejected_uploads_leave_nothing_behind(server_factory: Callable[..., ApiServer], tmp_path: Path) -> None:
    limit = 4096
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "FILE_MAX_BYTES": str(limit), "MAX_REQUEST_BYTES": "1024"})
    bad_rows = b'{"text_only_here": 1}\n' * 3
    r = upload(server, bad_rows, "mine.jsonl")
    assert r.status_code == 422 and "mine.jsonl" in r.json()["detail"], r.text
    assert "no columns ms-swift can train on" in r.json()["detail"] and str(tmp_path) not in r.json()["detail"]
    r = upload(server, b"", "empty.jsonl")
    assert r.status_code == 422 and "empty" in r.json()["detail"], r.text
    r = upload(server, b'{"messages":' + b"[" * 2000 + b"]" * 2000 + b"}\n", "deep.jsonl")  # was a 500
    assert r.status_code == 422 and "nested too deeply" in r.json()["detail"], r.text
    # Its images as a job's create checks them: a file every job naming it would be refused for is not kept.
    turns = [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "hello"}]
    for image, says in (("/etc/hostname", "must be a file inside DATA_ROOTS"), ("../x.png", "'..'")):
        r = upload(server, (json.dumps({"messages": turns, "images": [image]}) + "\n").encode() * 2, "pics.jsonl")
        assert r.status_code == 422 and "pics.jsonl" in r.json()["detail"] and says in r.json()["detail"], r.text
    r = upload(server, b"query,response\nhi,hello,see image\n", "extra.csv")  # was a 500
    assert r.status_code == 422 and "line 2 has more fields than the header" in r.json()["detail"], r.text
    r = upload(server, VALID, "train.txt")
    assert r.status_code == 422 and ".jsonl, .json, .csv" in r.json()["detail"], r.text
    r = upload(server, VALID, "train.jsonl", purpose="dpo")
    assert r.status_code == 422 and "sft, pt, rlhf" in r.json()["detail"], r.text
    r = upload(server, VALID, "train.jsonl", purpose="rlhf")  # preference data needs rejected answers
    assert r.status_code == 422 and "rejected_response" in r.json()["detail"], r.text
    r = server.http.post("/files", json={"file": "x"}, headers=auth(ALICE_KEY))
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"], r.text
    r = server.http.post(
        "/files", data={"purpose": "sft"}, files={"other": ("a.jsonl", VALID)}, headers=auth(ALICE_KEY)
    )
    assert r.status_code == 422 and "'file'" in r.json()["detail"], r.text
    # A field sent twice had its values joined: 'sftsft' is not a purpose.
    r = server.http.post("/files", data={"purpose": ["sft", "sft"]}, files={"file": ("a.jsonl", VALID)},
                         headers=auth(ALICE_KEY))  # fmt: skip
    assert r.status_code == 422 and "'purpose' is sent more than once" in r.json()["detail"], r.text
    r = upload(server, VALID, key=None)
    assert r.status_code == 401
    # A form of many small fields (each under its limit) would fill the worker's memory a field at a time.
    fields = {f"f{i}": "x" * 100 for i in range(20)}
    r = server.http.post("/files", data=fields, files={"file": ("a.jsonl", VALID)}, headers=auth(ALICE_KEY))
    assert r.status_code == 422 and "more than 16 parts" in r.json()["detail"], r.text

    # Over FILE_MAX_BYTES: found while streaming (the body is only a little larger than the limit) ...
    big = VALID * (limit // len(VALID) + 1)
    r = upload(server, big)
    assert r.status_code == 413 and "FILE_MAX_BYTES" in r.json()["detail"] and "4 KiB" in r.json()["detail"], r.text
    # ... sent without a Content-Length (chunked) ...
    boundary = "b0undary"

    def chunked() -> Iterator[bytes]:
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n\r\n').encode()
        for _ in range(10):
            yield VALID
        yield f"\r\n--{boundary}--\r\n".encode()

    r = server.http.post("/files", content=chunked(), headers={**auth(ALICE_KEY),
                         "Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert r.status_code == 413 and "FILE_MAX_BYTES" in r.json()["detail"], r.text
    # ... and a body whose declared length is beyond the limit is refused before it is read.
    r = upload(server, VALID * 1200)
    assert r.status_code == 413, r.text

    # A valid file at the limit is accepted, although the body is larger than MAX_REQUEST_BYTES (1 KiB here):
    # uploads have their own limit.
    fits = VALID * (limit // len(VALID))
    r = upload(server, fits)
    assert r.status_code == 201 and r.json()["bytes"] == len(fits) <= limit, r.text
    assert stored_files(tmp_path) == [Path(r.json()["path"])]
    assert server.http.get("/files", headers=auth(ADMIN_KEY)).json()["total"] == 1
    assert "Traceback" not in server.server_log()  # client errors, not server ones


async def test_without_keys_and_the_job_reference_helper(
    server_factory: Callable[..., ApiServer], tmp_path: Path, redis_url: str
) -> None:
    server = server_factory()
    csv = b"query,response\nhi,hello\nbye,see you\n"
    r = upload(server, csv, "pairs.CSV", key=None)
    assert r.status_code == 201, r.text
    f = r.json()
    assert f["owner"] is None and (f["rows"], f["format"]) == (2, "query/response")
    assert Path(f["path"]) == tmp_path / "uploads" / "_" / f"{f['id']}.csv"
    pref = (json.dumps({**MESSAGES, "rejected_response": "no"}) + "\n").encode() * 3
    r = upload(server, pref, "prefs.jsonl", key=None, purpose="rlhf")
    assert r.status_code == 201 and r.json()["purpose"] == "rlhf", r.text

    # What a job create will call for data_path and training.val_dataset.
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = Keys(server.prefix)
        settings = settings_for(redis_url, tmp_path, REDIS_KEY_PREFIX=server.prefix)
        files = FileStore(settings, client, keys)
        anyone = Caller(None, "admin")
        assert await files.resolve_file_ref(f["id"], anyone) == f["path"]
        for value in ("train.jsonl", "AI-ModelScope/alpaca#500", f["id"] + ".csv", " " + f["id"], "file-xyz"):
            assert await files.resolve_file_ref(value, anyone) is None
        for caller, file_id in [(Caller("bob", "user"), f["id"]), (anyone, "file-" + "0" * 24)]:
            try:
                await files.resolve_file_ref(file_id, caller, "training.val_dataset")
            except Invalid as exc:
                assert exc.status_code == 422
                assert exc.detail == f"training.val_dataset {file_id}: no such file — upload it with POST /files"
            else:
                raise AssertionError(f"{caller} may not use {file_id}")
    finally:
        await client.aclose()


async def test_an_upload_cut_by_a_crash_is_swept_and_no_other_deployments_uploads_are(
    server_factory: Callable[..., ApiServer], tmp_path: Path, redis_url: str
) -> None:
    # Two deployments on one Redis (two prefixes) sharing a data root: the sweep took every upload without a
    # record under its own prefix for an orphan, deleted the other's, and failed the jobs that named them.
    server = server_factory()
    other = server_factory(env={"DATA_DIR": str(tmp_path / "other-data"), "LOG_DIR": str(tmp_path / "other-logs"),
                                "OUTPUT_ROOT": str(tmp_path / "other-output")})  # fmt: skip
    kept, theirs = upload(server, VALID, key=None).json(), upload(other, VALID, key=None).json()
    folder = Path(kept["path"]).parent
    assert Path(theirs["path"]).parent == folder  # (one uploads folder: the anonymous owner's of both)
    boundary = "b0undary"
    head = (f"POST /api/v1/training/files HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {10 * len(VALID)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="cut.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip
    before = set(folder.iterdir())
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as cut:
        cut.sendall(head.encode() + VALID)
        wait_for(lambda: set(folder.iterdir()) - before, what="the cut upload's temp file")
        (partial,) = set(folder.iterdir()) - before
        server.kill_all()  # mid-upload: no cleanup runs
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        settings = settings_for(redis_url, tmp_path, REDIS_KEY_PREFIX=server.prefix)
        files = FileStore(settings, client, Keys(server.prefix))
        assert await files.sweep_orphans() == []  # (younger than ORPHAN_AGE: it may be an upload in progress)
        # An upload sending for longer than that (its file written a moment ago) is left alone (review).
        since = time.monotonic()
        while time.monotonic() - since < 0.5:
            os.utime(partial)
            assert await files.sweep_orphans(min_age=0.2) == []
            await asyncio.sleep(0.05)
        old = time.time() - 3600
        os.utime(partial, (old, old))
        swept: list[Path] = []
        deadline = time.monotonic() + 10
        while not swept and time.monotonic() < deadline:  # (its mark, looked at again, waits min_age once more)
            swept = await files.sweep_orphans(min_age=0.2)
            await asyncio.sleep(0.05)
        assert swept == [partial]
        assert await files.sweep_orphans(min_age=0) == []
        # A mark leads nowhere outside the uploads folders, whatever is written in Redis.
        victim = tmp_path / "victim" / "file-0123456789abcdef01234567.jsonl"
        victim.parent.mkdir()
        victim.write_bytes(VALID)
        crafted = folder.parent / ".." / ".." / "victim" / "file-0123456789abcdef01234567"
        assert files._leftovers_of(crafted, 0) == ([], True) and victim.exists()
    finally:
        await client.aclose()
    assert not partial.exists() and Path(kept["path"]).exists() and Path(theirs["path"]).exists()
    assert other.http.get(f"/files/{theirs['id']}").status_code == 200


async def test_an_orphan_the_sweep_cannot_delete_holds_back_no_other(
    redis_client: aioredis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One leftover it could not delete (EACCES, a read-only mount) raised out of every sweep, so each newer
    # leftover behind it stayed on disk for good (review, stop 43).
    settings = settings_for("redis://unused", tmp_path)
    files = FileStore(settings, redis_client, Keys(settings.REDIS_KEY_PREFIX))
    folder = files.root / "_"
    folder.mkdir(parents=True)
    folder = folder.resolve()
    old = time.time() - 3600
    stuck, swept = folder / f"file-{'a' * 24}.jsonl", folder / f"file-{'b' * 24}.jsonl"
    for path in (stuck, swept):
        path.write_bytes(VALID)
        os.utime(path, (old, old))
    marks = {str(folder / stuck.name.split(".")[0]): 1.0, str(folder / swept.name.split(".")[0]): 2.0}
    await redis_client.zadd(files.keys.uploads_writing, marks)
    unlink = os.unlink

    def refusing(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path) == str(stuck):
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing)
    warned: list[str] = []
    sink = logger.add(lambda m: warned.append(str(m)), level="WARNING", format="{message}")
    try:
        assert await files.sweep_orphans(min_age=60) == [swept]
    finally:
        logger.remove(sink)
    assert stuck.exists() and not swept.exists()
    # Its mark stays, behind newer ones (review: a thousand of them held back the rest), so a later sweep removes
    # it once it can; the operator is told which file and why.
    assert await redis_client.zrange(files.keys.uploads_writing, 0, -1) == [str(folder / stuck.name.split(".")[0])]
    assert (await redis_client.zscore(files.keys.uploads_writing, str(folder / stuck.name.split(".")[0])) or 0) > 2
    assert any(str(stuck) in w and "Permission denied" in w for w in warned), warned
    monkeypatch.setattr(os, "unlink", unlink)
    assert await files.sweep_orphans(min_age=60) == []  # (looked at again in min_age)
    await redis_client.zadd(files.keys.uploads_writing, {str(folder / stuck.name.split(".")[0]): 1.0})
    assert await files.sweep_orphans(min_age=60) == [stuck]
    assert await redis_client.zcard(files.keys.uploads_writing) == 0


def test_an_owner_keeps_uploads_up_to_the_quota(server_factory: Callable[..., ApiServer], tmp_path: Path) -> None:
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "FILE_QUOTA_BYTES": str(len(VALID) * 5 // 2)})
    first, second = upload(server, VALID), upload(server, VALID)
    assert first.status_code == 201 and second.status_code == 201
    third = upload(server, VALID)
    assert third.status_code == 413 and "FILE_QUOTA_BYTES" in third.json()["detail"]
    # A body too long for the quota by its length alone is refused before it is sent (hunt BC: each one was
    # received and checked whole first). Nothing of it is sent here: the answer comes all the same.
    host, port = server.base.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /api/v1/training/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n"
                     f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(VALID) + 20_000}\r\n"
                     "\r\n".encode())  # fmt: skip
        answer = b""
        while b"they hold" not in answer and (got := sock.recv(65536)):
            answer += got
    assert answer.startswith(b"HTTP/1.1 413") and b"they hold" in answer, answer
    assert server.http.get("/files", headers=auth(ALICE_KEY)).json()["total"] == 2
    assert len(stored_files(tmp_path)) == 2  # the refused one left nothing on disk
    assert upload(server, VALID, key=BOB_KEY).status_code == 201  # the quota is per owner
    assert server.http.delete(f"/files/{first.json()['id']}", headers=auth(ALICE_KEY)).status_code == 204
    assert upload(server, VALID).status_code == 201  # the bytes came back with the delete


async def test_a_delete_racing_creates_that_name_the_file_never_leaves_an_active_job_without_it(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The delete's check and the creates' writes overlap here: either the file stays (409, some job was created
    # naming it) or it goes (204) and every create naming it is refused.
    async with app_factory(scheduler=False) as client:
        for attempt in range(6):
            up = await client.post("/files", files={"file": ("t.jsonl", VALID, "application/octet-stream")})
            file_id = up.json()["id"]
            ref = file_id if attempt % 2 else up.json()["path"]  # by id, or by its stored path
            *made, deleted = await asyncio.gather(
                *(client.post("/jobs", json=job_body(tmp_path, f"race{attempt}-{i}", data_path=ref)) for i in range(4)),
                client.delete(f"/files/{file_id}"),
            )
            created = [r.json()["job_id"] for r in made if r.status_code == 201]
            assert all(r.status_code in (201, 422) for r in made), [r.text for r in made]
            if deleted.status_code == 204:
                assert created == [], (attempt, created)
                assert all("file" in r.json()["detail"] for r in made), [r.text for r in made]
            else:
                assert deleted.status_code == 409 and created, (attempt, deleted.text)
                # (it names the jobs it saw: those created after it may be missing)
                assert any(job_id in deleted.json()["detail"] for job_id in created), (created, deleted.text)
                assert (await client.get(f"/files/{file_id}")).status_code == 200


async def test_a_new_job_that_reuses_a_deleted_jobs_id_does_not_hold_the_old_jobs_file(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    async with app_factory(scheduler=False) as client:
        first, second = [(await client.post("/files", files={"file": (n, VALID, "application/octet-stream")})).json()
                         for n in ("a.jsonl", "b.jsonl")]  # fmt: skip
        assert (await client.post("/jobs", json=job_body(tmp_path, "exp", data_path=first["id"]))).status_code == 201
        assert (await client.post("/jobs/exp/stop")).status_code == 200
        assert (await client.delete("/jobs/exp")).status_code == 204
        assert (await client.post("/jobs", json=job_body(tmp_path, "exp", data_path=second["id"]))).status_code == 201
        # The active "exp" is another job than the one that named the first file.
        assert (await client.delete(f"/files/{first['id']}")).status_code == 204
        refused = await client.delete(f"/files/{second['id']}")
        assert refused.status_code == 409 and "exp" in refused.json()["detail"], refused.text


async def test_a_file_id_takes_a_sample_count_as_a_path_does(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    # `file-...#3` was refused as neither a path nor a hub id, where `data.jsonl#3` was taken (hunt DD).
    async with app_factory(scheduler=False) as client:
        up = (await client.post("/files", files={"file": ("a.jsonl", VALID, "application/octet-stream")})).json()
        r = await client.post("/jobs", json=job_body(tmp_path, "some", data_path=f"{up['id']}#3"))
        assert r.status_code == 201, r.text
        job = (await client.get("/jobs/some")).json()
        assert job["data_path"] == f"{up['path']}#3", job
        refused = await client.delete(f"/files/{up['id']}")  # (recorded as the job's)
        assert refused.status_code == 409 and "some" in refused.json()["detail"], refused.text
        r = await client.post("/jobs", json=job_body(tmp_path, "none", data_path="file-" + "0" * 24 + "#3"))
        assert r.status_code == 422 and "no such file" in r.json()["detail"], r.text


def multipart_upload(key: str, filename: str = "slow.jsonl") -> tuple[bytes, bytes]:
    """A raw upload request of VALID: its head, and its body."""
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + VALID
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (f"POST /api/v1/training/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()  # fmt: skip
    return head, body


def test_one_key_has_at_most_uploads_per_owner_in_progress(server_factory: Callable[..., ApiServer],
                                                            redis_url: str) -> None:  # fmt: skip
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "UPLOADS_PER_OWNER": "1", "API_WORKERS": "2"})
    head, body = multipart_upload(ALICE_KEY)
    slots = redis.Redis.from_url(redis_url, decode_responses=True)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow, slots:
        slow.sendall(head + body[:100])  # an upload in progress: the rest of its body comes later
        # (once its request has reached the server: a probe sent sooner could take the one slot first)
        wait_for(lambda: slots.zcard(Keys(server.prefix).open_uploads("alice")) == 1, what="the slow upload's slot")
        refused = upload(server, VALID)
        assert refused.status_code == 429 and "UPLOADS_PER_OWNER=1" in refused.json()["detail"], refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert upload(server, VALID, key=BOB_KEY).status_code == 201  # another key's uploads are its own
        slow.sendall(body[100:])
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
    assert upload(server, VALID).status_code == 201  # the slot came back with the end of the first


def test_a_stalled_upload_is_ended_before_its_slot_could_lapse(server_factory: Callable[..., ApiServer],
                                                              tmp_path: Path) -> None:  # fmt: skip
    """An upload whose client stopped sending kept its socket and partial file for ever, and its slot lapsed
    after a minute: one key could hold any number of partial uploads on disk, past UPLOADS_PER_OWNER."""
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "UPLOADS_PER_OWNER": "1", "UPLOAD_IDLE_SECONDS": "2"})
    head, body = multipart_upload(ALICE_KEY)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow:
        slow.sendall(head + body[: len(body) // 2])
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"UPLOAD_IDLE_SECONDS" in answer, answer
    assert stored_files(tmp_path) == []  # its partial file removed
    assert upload(server, VALID).status_code == 201  # and its slot given back
    # Sent on at a steady pace, however slowly in all, it is not idle.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as steady:
        steady.sendall(head)
        for start in range(0, len(body), len(body) // 4 + 1):
            steady.sendall(body[start : start + len(body) // 4 + 1])
            time.sleep(0.3)
        answer = steady.recv(65536)
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]


def test_an_owners_uploads_folder_that_is_a_link_out_of_the_uploads_folder_is_not_followed(
    server_factory: Callable[..., ApiServer], tmp_path: Path
) -> None:
    """A link planted as uploads/bob (by anyone who may write in the data root) led bob's uploads out of the
    uploads folder, where nothing kept them his: other keys trained on them, and a delete ignored his jobs."""
    shared = tmp_path / "shared" / "bobx"
    shared.mkdir(parents=True)
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "bob").symlink_to(shared)
    server = server_factory(env={"API_KEYS": KEYS_SETTING})
    r = upload(server, VALID, key=BOB_KEY)
    assert r.status_code == 507 and "is a link out of the uploads folder" in r.json()["detail"], r.text
    assert list(shared.iterdir()) == []
    assert upload(server, VALID).status_code == 201  # another owner's folder is no concern of it


def test_a_delete_whose_file_cannot_be_removed_now_is_done_and_leaves_the_file_to_the_sweep(
    server_factory: Callable[..., ApiServer], tmp_path: Path, redis_url: str
) -> None:
    # The record went first, then the unlink raised (a read-only mount): a 500 for a delete that was done.
    server = server_factory(env={"API_KEYS": KEYS_SETTING})
    f = upload(server, VALID).json()
    path = Path(f["path"])
    path.unlink()
    (path / "in-the-way").mkdir(parents=True)  # (unlink fails on it as on a read-only mount)
    r = server.http.delete(f"/files/{f['id']}", headers=auth(ALICE_KEY))
    assert r.status_code == 204, r.text
    assert server.http.get(f"/files/{f['id']}", headers=auth(ALICE_KEY)).status_code == 404
    marks = redis.Redis.from_url(redis_url, decode_responses=True)
    with marks:
        assert str(path.parent / f["id"]) in marks.zrange(Keys(server.prefix).uploads_writing, 0, -1)


def test_a_file_name_as_browsers_and_curl_escape_it_is_shown_as_it_was(server: ApiServer) -> None:
    # curl, httpx and browsers write '"' as %22 (and line ends as %0D%0A) in a multipart file name: it was shown as
    # `my data %22x%22.jsonl`.
    r = server.http.post("/files", files={"file": ('my data "x".jsonl', VALID, "application/octet-stream")})
    assert r.status_code == 201 and r.json()["filename"] == 'my data "x".jsonl', r.text


@pytest.mark.parametrize(
    "disposition",
    [
        # .NET's MultipartFormDataContent and PowerShell's -Form: an RFC 2047 word in `filename`, RFC 5987 `filename*`
        'filename="=?utf-8?B?6K6t57uDIOaVsOaNri5qc29ubA==?="; '
        "filename*=utf-8''%E8%AE%AD%E7%BB%83%20%E6%95%B0%E6%8D%AE.jsonl",
        "filename*=UTF-8''%E8%AE%AD%E7%BB%83%20%E6%95%B0%E6%8D%AE.jsonl",
        'filename="=?utf-8?B?6K6t57uDIOaVsOaNri5qc29ubA==?="',
    ],
)
def test_a_non_ascii_file_name_as_dotnet_clients_write_it_is_read(server: ApiServer, disposition: str) -> None:
    # It was 422 ("the name must end in .jsonl"): `filename*` was dropped, the encoded word taken as the name.
    body = (
        (
            f"--b0undary\r\nContent-Disposition: form-data; name=file; {disposition}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + VALID
        + b"\r\n--b0undary--\r\n"
    )
    r = server.http.post("/files", content=body, headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 201 and r.json()["filename"] == "训练 数据.jsonl", r.text


def test_a_filename_star_is_read_only_where_and_as_rfc_5987_has_it(server: ApiServer) -> None:
    def post(disposition: str, purpose: str = "") -> httpx.Response:
        body = (
            (
                f"--b0undary\r\nContent-Disposition: form-data; name=file; {disposition}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + VALID
            + b"\r\n"
        )
        if purpose:
            body += f"--b0undary\r\nContent-Disposition: form-data; name=purpose; {purpose}\r\n\r\nrlhf\r\n".encode()
        body += b"--b0undary--\r\n"
        return server.http.post("/files", content=body,
                                headers={"Content-Type": "multipart/form-data; boundary=b0undary"})  # fmt: skip

    # Only one that cannot be read: it said "must be a file part (with a filename), not a text field" (review EA).
    for unreadable in ("filename*=undefined''%41.jsonl", "filename*=utf-8''", "filename*=rot13''n.wfbay"):
        r = post(unreadable)
        assert r.status_code == 422 and "filename* cannot be read" in r.json()["detail"], (unreadable, r.text)
    # Inside a quoted filename it is no parameter: the name is the quoted one (it was shown as b.jsonl).
    r = post("filename=\"a.csv; filename*=utf-8''b.jsonl\"")
    assert r.status_code == 201 and r.json()["filename"] == "a.csv; filename*=utf-8''b.jsonl", r.text
    # Blanks around a quoted filename*'s '=' (its quotes were taken for a quoted value and emptied: review EC).
    r = post("filename*= \"utf-8''%E8%AE%AD.jsonl\"")
    assert r.status_code == 201 and r.json()["filename"] == "\u8bad.jsonl", r.text
    # A text field is a text field by its plain filename: a `purpose` part carrying a filename* was dropped (the
    # file then stored as sft).
    r = post('filename="t.jsonl"', purpose="filename*=utf-8''p.txt")
    assert r.status_code == 422 and "rejected_response" in r.json()["detail"], r.text


async def test_active_jobs_an_older_version_stored_are_recorded_as_users_of_their_uploads(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    async with app_factory(scheduler=False) as client:
        f = (await client.post("/files", files={"file": ("t.jsonl", VALID, "application/octet-stream")})).json()
        assert (await client.post("/jobs", json=job_body(tmp_path, "old", data_path=f["id"]))).status_code == 201
        training = client.app.state.training
        store = training.store
        await store.r.delete(store.keys.file_users(f["id"]))  # what a version before the record stored
        assert await training.files.backfill_users(store) == 1  # what a scheduler does as it starts
        assert await training.files.backfill_users(store) == 1  # (again: no harm)
        # A start looks only at the jobs created since a day before the last one looked (a walk of every active job
        # held a new leader's first pass back: hunt DX); this version's creates record their uploads themselves.
        # (as if created 3 days before the mark: its index score, put back after)
        old = await store.get("old")
        assert old is not None
        await store.r.zadd(store.keys.status_index(old.status), {"old": time.time() - 3 * 86400})
        await store.r.set(store.keys.upload_users_scanned, repr(time.time()))
        assert await training.files.backfill_users(store) == 0
        await store.r.zadd(store.keys.status_index(old.status), {"old": old.created_at})
        # A mark more than a day ahead (an older version let a clock ahead move it) is not trusted: all are looked at.
        await store.r.set(store.keys.upload_users_scanned, repr(time.time() + 2 * 86400))
        assert await training.files.backfill_users(store) == 1
        await store.r.delete(store.keys.upload_users_scanned)
        refused = await client.delete(f"/files/{f['id']}")
        assert refused.status_code == 409 and "old" in refused.json()["detail"], refused.text
        assert (await client.post("/jobs/old/stop")).status_code == 200
        # A deleted job is no longer recorded as a user: the record does not grow with every job that used it.
        assert (await client.delete("/jobs/old")).status_code == 204
        assert await store.r.scard(store.keys.file_users(f["id"])) == 0
        assert (await client.delete(f"/files/{f['id']}")).status_code == 204


async def test_a_user_may_not_name_a_folder_that_holds_everyones_uploads(redis_client: aioredis.Redis,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    files = FileStore(settings_for("redis://unused", tmp_path), redis_client, Keys("t"))
    root = files.real_roots[0]  # <first of DATA_ROOTS>/uploads, one folder per owner inside
    bob, admin = Caller("bob", "user"), Caller("root", "admin")
    for value in (str(root / "alice" / "x.jsonl"), str(root), str(root.parent), str(root.parent) + "#5"):
        with pytest.raises(Invalid) as exc:
            files.uploads_named([value], bob)  # a folder data set: swift would read every file in it
        assert "another owner's upload" in exc.value.detail or "holds the uploads of every owner" in exc.value.detail
    mine = root / "bob" / "file-0123456789abcdef01234567.jsonl"
    assert files.uploads_named([str(mine), str(tmp_path / "other" / "y.jsonl")], bob) == [mine.name[:29]]
    assert files.uploads_named([str(root.parent)], admin) == []  # an admin may name a whole data root
    # Inside the uploads, only uploads: swift reads a folder's every file, none recorded as the job's (deleted
    # under it), an admin's job too.
    for path, who in ((root / "bob", bob), (root / "bob" / "x.jsonl", bob), (root, admin), (root / "alice", admin),
                      (root / "alice" / "sub" / mine.name, admin)):  # fmt: skip
        with pytest.raises(Invalid, match="lies in the uploads folder but is not an upload"):
            files.uploads_named([str(path)], who)


async def test_uploads_made_while_another_data_root_came_first_stay_their_owners(redis_client: aioredis.Redis,
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    # Only <first of DATA_ROOTS>/uploads was looked at: after a root was put before it (the compose file's
    # /app/uploads), earlier uploads could be trained on by anyone and deleted under the jobs using them.
    earlier = tmp_path / "datasets"
    settings = settings_for("redis://unused", tmp_path, DATA_ROOTS=f"{tmp_path / 'new'},{earlier}")
    files = FileStore(settings, redis_client, Keys("t"))
    theirs = earlier.resolve() / "uploads" / "alice" / "file-0123456789abcdef01234567.jsonl"
    with pytest.raises(Invalid, match="another owner's upload"):
        files.uploads_named([str(theirs)], Caller("bob", "user"))
    assert files.uploads_named([str(theirs) + "#10"], Caller("alice", "user")) == ["file-0123456789abcdef01234567"]
    with pytest.raises(Invalid, match="holds the uploads of every owner"):
        files.uploads_named([str(earlier.resolve())], Caller("bob", "user"))


async def test_another_owners_upload_is_refused_before_anything_looks_at_it(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Whether Alice's upload exists, whether she uploaded at all, and what her file holds: Bob learns none of
    it from a create naming a path in her uploads folder (the answer used to come after the file was read)."""
    async with app_factory(API_KEYS=KEYS_SETTING) as client:
        upload_csv = await client.post("/files", files={"file": ("t.csv", b"query,response\nhi,hello\n")},
                                       headers=auth(ALICE_KEY))  # fmt: skip
        assert upload_csv.status_code == 201, upload_csv.text
        real = Path(upload_csv.json()["path"])
        root = real.parent.parent  # <first of DATA_ROOTS>/uploads
        body = job_body(tmp_path, "bq", kind="rlhf", rlhf_type="dpo")
        named = {
            "her file (no rejected answers: a preference set would say so)": str(real),
            "a file of hers that does not exist": str(real.parent / ("file-" + "a" * 24 + ".jsonl")),
            "her folder": str(real.parent),
            "an owner who never uploaded": str(root / "carol" / "x.jsonl"),
        }
        details = {}
        for what, path in named.items():
            r = await client.post("/jobs", json={**body, "data_path": path}, headers=auth(BOB_KEY))
            assert r.status_code == 422, (what, r.text)
            details[what] = r.json()["detail"].replace(path, "<path>")
        assert len(set(details.values())) == 1, details
        assert "another owner's upload cannot be used" in next(iter(details.values()))


async def test_a_refused_delete_names_only_the_callers_own_jobs(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # An admin may train on a user's upload: the user's refused delete named the admin's job, which every other
    # answer hides from her (GET says 404), and told her to stop it.
    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory(API_KEYS=KEYS_SETTING) as client:
        f = (await client.post("/files", files={"file": ("t.jsonl", VALID)}, headers=auth(ALICE_KEY))).json()
        for name, key in (("admins-secret-job", ADMIN_KEY), ("alices-job", ALICE_KEY)):
            r = await client.post("/jobs", json=job_body(tmp_path, name, data_path=f["id"]), headers=auth(key))
            assert r.status_code == 201, r.text
        assert (await client.get("/jobs/admins-secret-job", headers=auth(ALICE_KEY))).status_code == 404
        refused = await client.delete(f"/files/{f['id']}", headers=auth(ALICE_KEY))
        detail = refused.json()["detail"]
        assert refused.status_code == 409 and "admins-secret-job" not in detail, detail
        assert "your active job(s) alices-job" in detail and "1 active job(s) of other owners" in detail
        as_admin = (await client.delete(f"/files/{f['id']}", headers=auth(ADMIN_KEY))).json()["detail"]
        # (alice's job is not the admin's own: it was called "your active job")
        assert "your active job(s) admins-secret-job (" in as_admin, as_admin
        assert "the active job(s) of other owners alices-job (" in as_admin, as_admin


def test_a_client_hanging_up_mid_upload_is_one_log_line_not_a_traceback(server: ApiServer) -> None:
    # Each cut upload logged "Exception in ASGI application" with a ~28 KB traceback: any client could fill
    # the logs, and every flaky upload raised an error alert.
    boundary = "BB"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'.encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST /api/v1/training/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                  f"boundary={boundary}\r\nContent-Length: 100000\r\n\r\n".encode() + head + VALID)  # fmt: skip
    log = server.workdir / f"server-{server.port}.log"
    wait_for(lambda: "disconnected before its request body ended" in log.read_text(errors="replace"), timeout=15)
    text = log.read_text(errors="replace")
    assert "Exception in ASGI application" not in text and "ClientDisconnect" not in text, text[-3000:]
    assert server.http.get("/files").json()["total"] == 0


async def test_a_quantized_exports_job_reads_its_parents_upload_only_to_calibrate(redis_client: aioredis.Redis,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    # A paused bnb export could not be resumed once its parent's upload was deleted: bnb reads no data.
    from application.models.job_request import TrainingParams
    from application.models.training_model import Job, JobStatus

    files = FileStore(settings_for("redis://unused", tmp_path), redis_client, Keys("t"))
    upload = str(files.real_roots[0] / "alice" / "file-0123456789abcdef01234567.jsonl")

    def export_job(argv: list[str]) -> Job:
        return Job(job_id="j-quant", status=JobStatus.PAUSED, priority=5, owner="alice", data_path=upload,
                   model_path="/out/j/checkpoint-4", output_dir="/out/j/exports/.x.job", output_dir_requested="x",
                   num_gpus=1, kind="export", export_of="j", export_argv=argv, training=TrainingParams(),
                   created_at=0, updated_at=0)  # fmt: skip

    bnb = ["swift", "export", "--quant_method", "bnb", "--quant_bits", "4", "--output_dir", "/out/j/exports/x"]
    awq = ["swift", "export", "--quant_method", "awq", "--quant_bits", "4", "--dataset", upload, "--output_dir", "y"]
    assert files.uploads_of(export_job(bnb)) == []
    assert await files.gone_uploads(export_job(bnb)) == []
    assert files.uploads_of(export_job(awq)) == ["file-0123456789abcdef01234567"]


async def test_a_walk_by_cursor_lists_every_upload_once_while_others_are_deleted(
    app_factory: Callable[..., Any],
) -> None:
    # A clean-up script deleting old uploads page by page by next_offset skipped a file on every page.
    async with app_factory(scheduler=False, API_KEYS=KEYS_SETTING) as client:
        alice = auth(ALICE_KEY)
        ids = []
        for i in range(9):
            r = await client.post("/files", files={"file": (f"d{i}.jsonl", VALID)}, data={"purpose": "sft"},
                                  headers=alice)  # fmt: skip
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        seen: list[str] = []
        deleted: set[str] = set()
        page = (await client.get("/files", params={"limit": 2}, headers=alice)).json()
        while True:
            seen += [f["id"] for f in page["files"]]
            for f in page["files"]:  # the clean-up: everything listed goes
                assert (await client.delete(f"/files/{f['id']}", headers=alice)).status_code == 204
                deleted.add(f["id"])
            if page["next_cursor"] is None:
                break
            page = (await client.get("/files", params={"limit": 2, "cursor": page["next_cursor"]},
                                     headers=alice)).json()  # fmt: skip
        assert seen == ids[::-1]  # each once, newest first
        assert (await client.get("/files", headers=alice)).json()["total"] == 0
        r = await client.get("/files", params={"cursor": page["next_cursor"] or "1.0~file-x", "offset": 1},
                             headers=alice)  # fmt: skip
        assert r.status_code == 422 and "give offset or cursor, not both" in r.json()["detail"], r.text
