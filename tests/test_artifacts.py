"""A job's output files over real HTTP: the listing, downloads with Range, folders as tar, and hostile paths that
all get the answer a missing file gets."""

from __future__ import annotations

import http.client
import io
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from application.exceptions import NotFound, RangeNotSatisfiable
from application.services.artifact_tar import CHUNK, OwnedFd, tar_chunks
from application.services.artifacts import MAX_ENTRIES, parse_range
from tests.conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, KEYS_SETTING, ApiServer, auth, job_body, wait_for


def finished_job(server: ApiServer, workspace: Path, name: str, headers: dict[str, str] | None = None) -> Path:
    """A job that trained 20 steps (checkpoints 10 and 20) and was exported; its output folder."""
    body = job_body(workspace, name, auto_start=True, training={"max_steps": 20, "save_steps": 10})
    r = server.http.post("/jobs", headers=headers, json=body)
    assert r.status_code == 201, r.text
    wait_for(lambda: (j := server.http.get(f"/jobs/{name}", headers=headers).json())["status"] == "completed"
             and j["export"]["status"] == "completed", what=f"job {name} to complete and export")  # fmt: skip
    return Path(server.http.get(f"/jobs/{name}", headers=headers).json()["output_dir"])


def raw_get(server: ApiServer, path: str) -> tuple[int, bytes]:
    """GET exactly this path: httpx would remove the `..` segments before they reach the server."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", f"/api/v1/training{path}")
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_listing_downloads_ranges_and_tar_of_a_finished_job(server: ApiServer, workspace: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    out = finished_job(server, workspace, "arts")
    [run] = [p.name for p in out.iterdir() if p.name.startswith("v0-")]
    r = server.http.get("/jobs/arts/artifacts")
    assert r.status_code == 200, r.text
    listing = r.json()
    files: dict[str, Any] = {f["path"]: f for f in listing["files"]}
    assert listing["job_id"] == "arts" and listing["truncated"] is False
    for rel, kind in [(f"{run}/checkpoint-10/adapter_model.safetensors", "checkpoint"),
                      (f"{run}/checkpoint-20/trainer_state.json", "checkpoint"),
                      (f"{run}/checkpoint-20-merged/model.safetensors", "merged"),
                      (f"{run}/logging.jsonl", "logging"), (f"{run}/args.json", "args"),
                      (f"{run}/images/train_loss.png", "image")]:  # fmt: skip
        assert files[rel]["kind"] == kind and files[rel]["run"] == run, (rel, files.get(rel))
        assert files[rel]["size"] == (out / rel).stat().st_size
    assert {f["kind"] for f in files.values()} >= {"tensorboard", "log"}
    assert listing["total_bytes"] == sum(f["size"] for f in files.values())
    folders = {f["path"]: f for f in listing["folders"]}
    assert {(p, f["kind"]) for p, f in folders.items()} == {
        (run, "run"), (f"{run}/checkpoint-10", "checkpoint"), (f"{run}/checkpoint-20", "checkpoint"),
        (f"{run}/checkpoint-20-merged", "merged")}  # fmt: skip
    assert listing["links"] == [{"path": f"{run}/last-checkpoint", "target": f"{run}/checkpoint-20"}]

    # One file: the bytes on disk, named for saving, resumable.
    rel = f"{run}/logging.jsonl"
    data = (out / rel).read_bytes()
    assert len(data) > 20
    r = server.http.get(f"/jobs/arts/artifacts/{rel}")
    assert r.status_code == 200 and r.content == data
    assert r.headers["accept-ranges"] == "bytes" and r.headers["content-length"] == str(len(data))
    assert r.headers["content-disposition"] == 'attachment; filename="logging.jsonl"'
    png = server.http.get(f"/jobs/arts/artifacts/{run}/images/train_loss.png")
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    weights = server.http.get(f"/jobs/arts/artifacts/{run}/checkpoint-20/adapter_model.safetensors")
    assert weights.headers["content-type"] == "application/octet-stream"
    via_link = server.http.get(f"/jobs/arts/artifacts/{run}/last-checkpoint/adapter_model.safetensors")
    assert via_link.status_code == 200 and via_link.content == weights.content
    size = len(data)
    for asked, status, body, content_range in [
        ("bytes=0-9", 206, data[:10], f"bytes 0-9/{size}"),
        ("bytes=-5", 206, data[-5:], f"bytes {size - 5}-{size - 1}/{size}"),
        ("bytes=10-", 206, data[10:], f"bytes 10-{size - 1}/{size}"),
        (f"bytes=5-{size + 100}", 206, data[5:], f"bytes 5-{size - 1}/{size}"),
        ("bytes=0-1,5-6", 200, data, None),  # several ranges: the whole file
        # Numbers too long for 64 bits still mean what they say: to the end, or all of a shorter file.
        ("bytes=5-" + "9" * 30, 206, data[5:], f"bytes 5-{size - 1}/{size}"),
        ("bytes=-" + "9" * 30, 206, data, f"bytes 0-{size - 1}/{size}"),
        ("bytes=" + "0" * 25 + "3-4", 206, data[3:5], f"bytes 3-4/{size}"),
    ]:
        r = server.http.get(f"/jobs/arts/artifacts/{rel}", headers={"Range": asked})
        assert (r.status_code, r.content, r.headers.get("content-range")) == (status, body, content_range), asked
    # A start past the end, however many digits it takes (a long one was ignored: 200 with the whole file).
    for asked in (f"bytes={size}-", "bytes=" + "9" * 26 + "-", "bytes=" + "9" * 26 + "-" + "9" * 27):
        r = server.http.get(f"/jobs/arts/artifacts/{rel}", headers={"Range": asked})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}", (asked, r.text)
    etag = server.http.get(f"/jobs/arts/artifacts/{rel}").headers["etag"]
    r = server.http.get(f"/jobs/arts/artifacts/{rel}", headers={"Range": "bytes=0-9", "If-Range": etag})
    assert r.status_code == 206 and r.content == data[:10]
    r = server.http.get(f"/jobs/arts/artifacts/{rel}", headers={"Range": "bytes=0-9", "If-Range": '"changed"'})
    assert r.status_code == 200 and r.content == data
    # Only the ETag resumes: a file rewritten within the second of its Last-Modified (same size) kept that date,
    # and a resume by date spliced the two versions.
    fresh = out / run / "fresh.txt"
    fresh.write_bytes(b"A" * 10)
    ahead = int(time.time()) + 30.0  # the rewrite below lands in the same second, however slow this machine is
    os.utime(fresh, (ahead, ahead))
    first = server.http.get(f"/jobs/arts/artifacts/{run}/fresh.txt", headers={"Range": "bytes=0-4"})
    fresh.write_bytes(b"B" * 10)
    os.utime(fresh, (ahead + 0.001, ahead + 0.001))  # the same second: the same Last-Modified
    by_date = {"Range": "bytes=5-", "If-Range": first.headers["last-modified"]}
    r = server.http.get(f"/jobs/arts/artifacts/{run}/fresh.txt", headers=by_date)
    assert (first.content, r.status_code, r.content) == (b"A" * 5, 200, b"B" * 10)
    by_etag = {"Range": "bytes=5-", "If-Range": first.headers["etag"]}
    assert server.http.get(f"/jobs/arts/artifacts/{run}/fresh.txt", headers=by_etag).status_code == 200
    # A name that is not plain ASCII comes with a plain one too: curl -OJ reads only that, and saved "%C3%BC...".
    (out / run / 'ünï "q".txt').write_bytes(b"x")
    r = server.http.get(f'/jobs/arts/artifacts/{run}/ünï "q".txt')
    plain_and_exact = "attachment; filename=\"_n_ _q_.txt\"; filename*=utf-8''%C3%BCn%C3%AF%20%22q%22.txt"
    assert r.status_code == 200 and r.headers["content-disposition"] == plain_and_exact
    # HEAD, as download tools ask before they fetch: GET's answer without its body.
    whole = server.http.get(f"/jobs/arts/artifacts/{rel}")
    head = server.http.head(f"/jobs/arts/artifacts/{rel}")
    assert head.status_code == 200 and head.content == b""
    same = ("content-length", "content-type", "etag", "accept-ranges", "content-disposition")
    assert {k: head.headers.get(k) for k in same} == {k: whole.headers.get(k) for k in same}
    head = server.http.head(f"/jobs/arts/artifacts/{rel}", headers={"Range": "bytes=0-9"})
    assert (head.status_code, head.headers["content-range"], head.headers["content-length"]) == (
        206, f"bytes 0-9/{size}", "10")  # fmt: skip
    head = server.http.head(f"/jobs/arts/artifacts/{run}.tar")
    assert head.status_code == 200 and head.headers["content-type"] == "application/x-tar"
    assert "content-length" not in head.headers  # as GET: streamed, its length unknown (not 0)
    assert server.http.head(f"/jobs/arts/artifacts/{run}/no-such-file").status_code == 404
    # A folder of the job's, named without .tar: said to be one (it was "no such file or folder").
    unnamed = server.http.get(f"/jobs/arts/artifacts/{run}/checkpoint-20")
    assert unnamed.status_code == 404 and f"download it as '{run}/checkpoint-20.tar'" in unnamed.json()["detail"]
    # So is one whose name ends in .tar (it was "no such file or folder", as no folder d is there to tar).
    (out / run / "odd" / "d.tar").mkdir(parents=True)
    (out / run / "odd" / "d.tar" / "in.txt").write_text("x")
    dotted = server.http.get(f"/jobs/arts/artifacts/{run}/odd/d.tar")
    assert dotted.status_code == 404 and f"download it as '{run}/odd/d.tar.tar'" in dotted.json()["detail"], dotted.text
    assert server.http.get(f"/jobs/arts/artifacts/{run}/odd/d.tar.tar").status_code == 200

    # A folder as tar: the same files and bytes; the run's last-checkpoint link stays a link.
    for folder in (f"{run}/checkpoint-20", run):
        name = folder.rsplit("/", 1)[-1]
        with server.http.stream("GET", f"/jobs/arts/artifacts/{folder}.tar") as r:
            assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
            assert r.headers["content-disposition"] == f'attachment; filename="{name}.tar"'
            assert "content-length" not in r.headers  # streamed as it is read
            body = r.read()
        dest = tmp_path / "extracted" / name
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
            members = {m.name: m for m in tar.getmembers()}
            tar.extractall(dest.parent, filter="data")
        expected = {p.relative_to(out / folder).as_posix() for p in (out / folder).rglob("*") if p.is_file()
                    and not p.is_symlink()}  # fmt: skip
        got = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and not p.is_symlink()}
        assert got == expected and expected
        for f in expected:
            assert (dest / f).read_bytes() == (out / folder / f).read_bytes(), f
    assert members[f"{run}/last-checkpoint"].issym() and members[f"{run}/last-checkpoint"].linkname == "checkpoint-20"
    assert members[f"{run}/checkpoint-20"].isdir() and members[f"{run}/checkpoint-20"].uname == ""


def test_hostile_paths_get_the_answer_a_missing_file_gets(server: ApiServer, workspace: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    out = finished_job(server, workspace, "safe")
    [run] = [p.name for p in out.iterdir() if p.name.startswith("v0-")]
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the output folder")
    (out / "to-secret").symlink_to(secret)
    (out / "to-tmp").symlink_to(tmp_path, target_is_directory=True)
    (out / run / "up").symlink_to("../../..")  # the folder above OUTPUT_ROOT
    os.mkfifo(out / "pipe")
    missing = raw_get(server, "/jobs/safe/artifacts/no-such-file")
    assert missing[0] == 404
    assert "no such file" in missing[1].decode()
    rel_secret = os.path.relpath(secret, out)
    for path in [f"../{out.name}/{run}/args.json", rel_secret, f"%2e%2e/{out.name}/{run}/args.json",
                 f"%2E%2E%2F{out.name}%2F{run}%2Fargs.json", f"{run}/../{run}/args.json", f"./{run}/args.json",
                 f"{run}//args.json", f"/{secret}", f"%2F{str(secret)[1:]}", "/etc/passwd", "to-secret",
                 "to-tmp/secret.txt", "to-tmp.tar", f"{run}/up/secret.txt", f"{run}/up.tar",
                 f"{run}/args.json%00", "%00", f"{run}%09/args.json", f"{run}/args.json%0a", f"{run}/args.json%0A",
                 "pipe", ".tar",
                 f"{run}/checkpoint-20/.tar", ""]:  # fmt: skip
        assert raw_get(server, f"/jobs/safe/artifacts/{path}") == missing, path
    # A line break never matches a route (Starlette's `.` stops there): the router's own 404.
    assert raw_get(server, f"/jobs/safe/artifacts/{run}%0a/args.json")[0] == 404
    # The planted links are not listed as files or links, and nothing from outside shows up.
    listing = server.http.get("/jobs/safe/artifacts").json()
    paths = {f["path"] for f in listing["files"]} | {link["path"] for link in listing["links"]}
    assert not paths & {"to-secret", "to-tmp", f"{run}/up", "pipe"}
    assert not any("secret" in p for p in paths)
    # A tar of the run leaves the link that leads out, and what lies behind it, out.
    names = tarfile.open(fileobj=io.BytesIO(server.http.get(f"/jobs/safe/artifacts/{run}.tar").content)).getnames()
    assert f"{run}/args.json" in names and not any(n.startswith(f"{run}/up") for n in names)

    # A folder of many files: one listing looks at MAX_ENTRIES entries at most.
    many = out / "many"
    many.mkdir()
    for i in range(MAX_ENTRIES + 10):
        (many / f"f{i}").touch()
    listing = server.http.get("/jobs/safe/artifacts").json()
    assert listing["truncated"] is True and len(listing["files"]) + len(listing["folders"]) <= MAX_ENTRIES


def test_another_owners_job_is_missing(server_factory: Callable[..., ApiServer], workspace: Path) -> None:
    server = server_factory(env={"API_KEYS": KEYS_SETTING})
    out = finished_job(server, workspace, "mine", headers=auth(ALICE_KEY))
    [run] = [p.name for p in out.iterdir() if p.name.startswith("v0-")]
    assert server.http.get("/jobs/mine/artifacts", headers=auth(ALICE_KEY)).status_code == 200
    nobody = server.http.get("/jobs/nobody/artifacts/x", headers=auth(BOB_KEY))
    for path in ("/jobs/mine/artifacts", f"/jobs/mine/artifacts/{run}/args.json", f"/jobs/mine/artifacts/{run}.tar"):
        r = server.http.get(path, headers=auth(BOB_KEY))
        assert r.status_code == 404 and r.json()["detail"] == nobody.json()["detail"].replace("nobody", "mine")
    assert server.http.get(f"/jobs/mine/artifacts/{run}/args.json").status_code == 401


def test_an_output_folder_made_a_link_to_another_owners_after_create_gives_nothing_of_theirs(
    server_factory: Callable[..., ApiServer], workspace: Path
) -> None:
    # Someone who can make links in OUTPUT_ROOT (a shared filesystem) pointed their pending job's folder at
    # another owner's: its listing and downloads were that owner's files, and its run wrote into their folder.
    server = server_factory(env={"API_KEYS": KEYS_SETTING})
    theirs = finished_job(server, workspace, "theirs", headers=auth(BOB_KEY))
    body = job_body(workspace, "mine", training={"max_steps": 2})
    assert server.http.post("/jobs", headers=auth(ALICE_KEY), json=body).json()["status"] == "pending"
    mine = Path(server.http.get("/jobs/mine", headers=auth(ALICE_KEY)).json()["output_dir"])
    mine.symlink_to(theirs, target_is_directory=True)
    listing = server.http.get("/jobs/mine/artifacts", headers=auth(ALICE_KEY)).json()  # as for a folder not made yet
    assert listing["files"] == [] and listing["folders"] == [], listing
    assert server.http.get("/jobs/mine/artifacts/logs/theirs.train.log", headers=auth(ALICE_KEY)).status_code == 404
    before = sorted(p.relative_to(theirs) for p in theirs.rglob("*"))
    assert server.http.post("/jobs/mine/start", headers=auth(ALICE_KEY)).status_code == 200
    failed = wait_for(lambda: (j := server.http.get("/jobs/mine", headers=auth(ALICE_KEY)).json())["status"]
                      in ("failed", "completed") and j, what="the run to end")  # fmt: skip
    assert failed["status"] == "failed" and failed["error_code"] == "output_dir", failed
    assert "another folder" in failed["error_message"] and str(theirs) not in failed["error_message"]
    assert sorted(p.relative_to(theirs) for p in theirs.rglob("*")) == before  # nothing written there


def test_one_key_has_at_most_downloads_per_owner_in_progress(server_factory: Callable[..., ApiServer],
                                                              workspace: Path) -> None:  # fmt: skip
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "DOWNLOADS_PER_OWNER": "1", "API_WORKERS": "2"})
    out = finished_job(server, workspace, "big", headers=auth(ALICE_KEY))
    (out / "big.bin").write_bytes(os.urandom(1 << 20) * 64)  # more than the sockets buffer: sending it waits on us
    assert server.http.get("/jobs/big/artifacts/missing.bin", headers=auth(ALICE_KEY)).status_code == 404
    with httpx.Client(base_url=server.base, timeout=30) as http:
        with http.stream("GET", "/jobs/big/artifacts/big.bin", headers=auth(ALICE_KEY)) as slow:
            assert slow.status_code == 200  # (the 404 before gave its slot back)
            refused = server.http.get("/jobs/big/artifacts/big.bin", headers=auth(ALICE_KEY))
            assert refused.status_code == 429 and "DOWNLOADS_PER_OWNER=1" in refused.json()["detail"], refused.text
            # Another key's downloads are its own (an admin may read alice's job).
            assert len(server.http.get("/jobs/big/artifacts/big.bin", headers=auth(ADMIN_KEY)).content) == 64 << 20
        # Hung up halfway: its slot comes back (at once, not after it lapses).
    wait_for(lambda: server.http.get("/jobs/big/artifacts/big.bin", headers={**auth(ALICE_KEY), "Range": "bytes=0-9"})
             .status_code == 206, timeout=10, what="a download of alice's once hers was closed")  # fmt: skip


def test_a_large_log_page_takes_a_download_slot_while_it_is_sent(server_factory: Callable[..., ApiServer],
                                                                  workspace: Path) -> None:  # fmt: skip
    # Whole pages had no cap: one key's 250 pages of 8 MiB, never read, took the API workers to 1.4 GB each
    # (hunt DN).
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "DOWNLOADS_PER_OWNER": "1", "API_WORKERS": "2"})
    mine = auth(ALICE_KEY)
    assert server.http.post("/jobs", headers=mine, json=job_body(workspace, "loud", auto_start=True)).status_code == 201
    log = Path(wait_for(lambda: (j := server.http.get("/jobs/loud", headers=mine).json())["status"] == "completed"
                        and j["log_file"], what="the run to end"))  # fmt: skip
    with log.open("a") as f:
        f.writelines(f"{n:05d} " + "l" * 794 + "\n" for n in range(10_000))  # an 8 MB page: more than sockets hold
    with httpx.Client(base_url=server.base, timeout=30) as http:
        with http.stream("GET", "/jobs/loud/logs?limit=10000", headers=mine) as unread:
            assert unread.status_code == 200 and int(unread.headers["content-length"]) > 8_000_000
            refused = server.http.get("/jobs/loud/logs?limit=10000", headers=mine)
            assert refused.status_code == 429 and "DOWNLOADS_PER_OWNER=1" in refused.json()["detail"], refused.text
            assert refused.headers["retry-after"] == "5" and "ask for fewer lines" in refused.json()["detail"]
            small = server.http.get("/jobs/loud/logs?limit=10", headers=mine)  # (a small page takes none)
            assert small.status_code == 200 and len(small.json()["lines"]) == 10
        page = wait_for(lambda: (r := server.http.get("/jobs/loud/logs?limit=10000", headers=mine)).status_code
                        == 200 and r, timeout=10, what="its slot back once it was closed")  # fmt: skip
    lines = page.json()["lines"]
    assert len(lines) == 10_000 and lines[-1].startswith("09999 ") and lines[0].startswith("00000 ")


@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 10, None), ("bytes=0-0", 10, (0, 1)), ("bytes=2-", 10, (2, 10)), ("bytes=-3", 10, (7, 10)),
    ("bytes=-30", 10, (0, 10)), ("BYTES = 1 - 2", 10, (1, 3)), ("bytes=5-2", 10, None), ("items=0-1", 10, None),
    ("bytes=0-1,3-4", 10, None), ("bytes=-", 10, None), ("bytes=2-" + "9" * 30, 10, (2, 10)),
    ("bytes=-" + "9" * 30, 10, (0, 10)), ("bytes=" + "9" * 27 + "-" + "9" * 26, 10, None),
])  # fmt: skip
def test_range_header_forms(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=10-", 10),
        ("bytes=-0", 10),
        ("bytes=0-", 0),
        ("bytes=-1", 0),
        ("bytes=" + "9" * 30 + "-", 10),
        ("bytes=" + "9" * 5000 + "-" + "9" * 5000, 10),
    ],
)
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as exc:
        parse_range(header, size)
    assert exc.value.status_code == 416 and exc.value.headers == {"Content-Range": f"bytes */{size}"}


def test_a_tar_streams_in_bounded_chunks(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "big.bin").write_bytes(os.urandom(5 * CHUNK + 7))
    (folder / "small.json").write_text("{}")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    chunks = list(tar_chunks(OwnedFd(fd), folder, "checkpoint-1"))
    assert max(len(c) for c in chunks) <= 2 * CHUNK and len(chunks) > 3
    body = b"".join(chunks)
    assert len(body) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        big = tar.extractfile("checkpoint-1/big.bin")
        assert big is not None and big.read() == (folder / "big.bin").read_bytes()


def test_upload_train_and_download_round_trip(server_factory: Callable[..., ApiServer], workspace: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    """What a user outside the server does: upload a data set, train on it by its file id, then fetch the
    results over HTTP (logging.jsonl, the last checkpoint as tar), without ever touching the server's disk."""
    server = server_factory(env={"API_KEYS": KEYS_SETTING})
    alice, bob = auth(ALICE_KEY), auth(BOB_KEY)
    rows = Path(job_body(workspace, "rt", step_seconds=0.01)["data_path"]).read_bytes()
    up = server.http.post("/files", files={"file": ("mine.jsonl", rows)}, headers=alice)
    assert up.status_code == 201, up.text
    file_id = up.json()["id"]
    # Bob can name neither Alice's file id nor its path on the server.
    stored = up.json()["path"]
    body = job_body(workspace, "rt", data_path=file_id, auto_start=True, training={"max_steps": 6, "save_steps": 3})
    refused = server.http.post("/jobs", json={**body, "output_dir": "rt-bob"}, headers=bob)
    assert refused.status_code == 422 and "no such file" in refused.json()["detail"]
    by_path = server.http.post("/jobs", json={**body, "data_path": stored, "output_dir": "rt-bob2"}, headers=bob)
    assert by_path.status_code == 422 and "another owner's upload" in by_path.json()["detail"]

    r = server.http.post("/jobs", json=body, headers=alice)
    assert r.status_code == 201, r.text
    job = wait_for(lambda: (j := server.http.get("/jobs/rt", headers=alice).json())["status"] == "completed" and j,
                   what="the run on the uploaded data set")  # fmt: skip
    assert job["data_path"].endswith(f"{file_id}.jsonl") and job["dataset_rows"] == up.json()["rows"]
    # The data set swift read is the uploaded one, byte for byte.
    assert Path(job["data_path"]).read_bytes() == rows

    listing = server.http.get("/jobs/rt/artifacts", headers=alice).json()
    paths = {f["path"]: f for f in listing["files"]}
    run = Path(job["run_dir"]).name
    assert paths[f"{run}/logging.jsonl"]["kind"] == "logging"
    got = server.http.get(f"/jobs/rt/artifacts/{run}/logging.jsonl", headers=alice)
    assert got.status_code == 200 and got.content == (Path(job["run_dir"]) / "logging.jsonl").read_bytes()
    tar = server.http.get(f"/jobs/rt/artifacts/{run}/checkpoint-6.tar", headers=alice)
    assert tar.status_code == 200
    out = tmp_path / "fetched"
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as t:
        t.extractall(out, filter="data")
    for f in (Path(job["run_dir"]) / "checkpoint-6").rglob("*"):
        if f.is_file():
            fetched = out / "checkpoint-6" / f.relative_to(Path(job["run_dir"]) / "checkpoint-6")
            assert fetched.read_bytes() == f.read_bytes(), f
    assert server.http.get(f"/jobs/rt/artifacts/{run}/logging.jsonl", headers=bob).status_code == 404


def test_a_named_export_is_listed_as_an_exported_model() -> None:
    from application.services.artifacts import file_kind, folder_kind

    assert folder_kind(["exports", "X"]) == "merged" and file_kind(["exports", "X", "model.safetensors"]) == "merged"
    # The folder of a quantized export's own GPU job is not a model; nor is exports/ itself.
    assert folder_kind(["exports", ".X.job"]) is None and folder_kind(["exports"]) is None
    assert file_kind(["exports", ".X.job", "logs", "x.train.log"]) == "log"


def test_a_listing_names_only_paths_a_download_can_ask_for(tmp_path: Path) -> None:
    # A tree deeper than a request's path may be long: its files were listed, and each download was a 422.
    from application.models.job_request import TrainingParams
    from application.models.training_model import Job, JobStatus
    from application.services.artifacts import list_artifacts
    from application.services.path_sandbox import MAX_PATH_BYTES

    out = tmp_path / "out" / "deep-job"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "a.log").write_text("x")
    fd = os.open(out, os.O_RDONLY)
    try:
        for _ in range(MAX_PATH_BYTES // 200 + 2):  # (relative to a folder fd: past PATH_MAX for absolute paths)
            os.mkdir("y" * 200, dir_fd=fd)
            fd, old = os.open("y" * 200, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
        os.close(os.open("f.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    job = Job(job_id="deep-job", status=JobStatus.COMPLETED, priority=5, owner=None, data_path="d", model_path="m",
              output_dir=str(out), output_dir_requested="deep-job", num_gpus=1, training=TrainingParams(),
              created_at=0, updated_at=0)  # fmt: skip
    listing = list_artifacts(job, tmp_path / "out")
    assert "logs/a.log" in {f.path for f in listing.files}
    asked = [f.path for f in listing.files] + [f.tar for f in listing.folders] + [link.path for link in listing.links]
    assert asked and all(len(p.encode()) <= MAX_PATH_BYTES for p in asked), max(map(len, asked))


async def test_a_tar_download_whose_slot_lapsed_and_was_taken_is_cut_not_ended_as_if_whole(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # A client that stopped reading past its slot's life, while others took the cap, had its tar end cleanly
    # (the last chunk sent): with no Content-Length, curl and the CLI kept the short tar as the whole download.
    import asyncio

    from application.services.owner_slots import OwnerSlots, ResponseCut
    from tests.conftest import make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    async with app_factory() as client:
        assert (await client.post("/jobs", json=job_body(tmp_path, "tarred", auto_start=True))).status_code == 201
        job = await wait_job(client, "tarred", lambda j: j["status"] == "completed")
        run = Path(job["run_dir"]).name
        (Path(job["run_dir"]) / "big.bin").write_bytes(os.urandom(1 << 20) * 4)
        store = client.app.state.training.store
        slots = OwnerSlots(store.r, store.keys.open_downloads, cap=1, ttl=0.3, setting="DOWNLOADS_PER_OWNER",
                           what="downloads in progress", advice="wait")  # fmt: skip
        client.app.state.download_slots = slots
        path = f"/api/v1/training/jobs/tarred/artifacts/{run}.tar"
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"host", b"test")], "client": ("127.0.0.1", 1), "server": ("test", 80)}  # fmt: skip
        sent: list[dict[str, Any]] = []
        stalled, go_on = asyncio.Event(), asyncio.Event()

        requested: list[bool] = []

        async def receive() -> dict[str, Any]:
            if not requested:
                requested.append(True)
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # (no disconnect: the client is there, only slow)
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not stalled.is_set():
                stalled.set()
                await go_on.wait()  # the client stops reading

        download = asyncio.create_task(client.app(scope, receive, send))
        await stalled.wait()
        deadline = time.monotonic() + 10
        while True:  # its slot lapses; another download of the owner's takes the one the cap allows
            try:
                await slots.take(None)
                break
            except Exception:
                assert time.monotonic() < deadline, "the stalled download's slot never lapsed"
                await asyncio.sleep(0.05)
        go_on.set()
        with pytest.raises(ResponseCut):
            await asyncio.wait_for(download, 30)
        bodies = [m for m in sent if m["type"] == "http.response.body"]
        ended = [m.get("more_body", False) for m in bodies]
        assert sent[0]["status"] == 200 and ended and all(ended), ended  # no last chunk: the client sees a cut


async def test_after_output_root_moved_the_lists_say_why_they_are_empty_and_a_link_left_behind_mends_them(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """An operator moved OUTPUT_ROOT: every job's files and checkpoints listed as none (200, empty), and its
    export said its checkpoints had been removed, while all were on disk (hunt AI)."""
    from tests.conftest import make_model, wait_job

    make_model(tmp_path / "models" / "tiny-qwen2")
    prefix = f"test-moved-{time.time_ns()}"  # (one Redis state across the two servers)
    async with app_factory(AUTO_EXPORT=False, REDIS_KEY_PREFIX=prefix) as client:
        body = job_body(tmp_path, "moved", auto_start=True, training={"max_steps": 4, "save_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_job(client, "moved", lambda j: j["status"] == "completed")
        listed = (await client.get("/jobs/moved/artifacts")).json()
        assert listed["files"] and listed["not_read"] is None
    (tmp_path / "output").rename(tmp_path / "output2")
    async with app_factory(scheduler=False, OUTPUT_ROOT=str(tmp_path / "output2"), REDIS_KEY_PREFIX=prefix) as client:
        listed = (await client.get("/jobs/moved/artifacts")).json()
        assert listed["files"] == [] and "or OUTPUT_ROOT moved (a link at its old path" in listed["not_read"]
        checkpoints = (await client.get("/jobs/moved/checkpoints")).json()
        assert checkpoints["checkpoints"] == [] and "OUTPUT_ROOT moved" in checkpoints["not_read"]
        r = await client.post("/jobs/moved/export", json={})
        assert r.status_code == 409 and "or OUTPUT_ROOT moved since" in r.json()["detail"], r.text
        (tmp_path / "output").symlink_to(tmp_path / "output2")  # as the message advises
        listed = (await client.get("/jobs/moved/artifacts")).json()
        assert listed["files"] and listed["not_read"] is None
        assert (await client.get("/jobs/moved/checkpoints")).json()["total"] == 2
        # Its logs too: read as none (200, no line), their stream never ended (hunt CE).
        assert (await client.get("/jobs/moved/logs")).json()["lines"]
    # And a run or an export through it: refused as "a symbolic link leads to its folder" (hunt CE).
    async with app_factory(AUTO_EXPORT=False, OUTPUT_ROOT=str(tmp_path / "output2"), REDIS_KEY_PREFIX=prefix) as client:
        assert (await client.post("/jobs/moved/export", json={"output_name": "after"})).status_code == 200
        job = await wait_job(client, "moved", lambda j: j["export"]["status"] not in ("running", "pending"))
        assert job["export"]["status"] == "completed", job["export"]


def test_a_tar_step_returns_while_its_entries_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Links leading out are left out and write nothing: a step of the stream still returns every YIELD_SECONDS
    (with b""), so that a client's hang-up ends it; one step over 200,000 such links held its thread and its
    download slot for 16 s after the client left (hunt EB)."""
    from application.services import artifact_tar

    folder = tmp_path / "many-links"
    folder.mkdir()
    for i in range(300):
        os.symlink("/etc/passwd", folder / f"l{i}")
    monkeypatch.setattr(artifact_tar, "YIELD_SECONDS", 0.0)
    chunks = list(tar_chunks(OwnedFd(os.open(folder, os.O_RDONLY | os.O_DIRECTORY)), folder, "many-links"))
    assert len(chunks) > 100 and b"".join(chunks[:-1]) == b"".join(chunks)[: sum(map(len, chunks[:-1]))]
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
        assert tar.getnames() == ["many-links"]


def test_a_tar_keeps_permission_bits_only(tmp_path: Path) -> None:
    """Members are uid 0: a set-user-ID bit a job put on its file made a set-user-ID-root program where root
    extracted the tar with GNU tar (hunt EB)."""
    folder = tmp_path / "suid"
    (folder / "sg").mkdir(parents=True)
    (folder / "prog").write_bytes(b"#!/bin/sh\n")
    os.chmod(folder / "prog", 0o4755)
    os.chmod(folder / "sg", 0o3777)
    body = b"".join(tar_chunks(OwnedFd(os.open(folder, os.O_RDONLY | os.O_DIRECTORY)), folder, "suid"))
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert {m.name: m.mode for m in tar} == {"suid": (folder.stat().st_mode & 0o777), "suid/prog": 0o755,
                                                  "suid/sg": 0o777}  # fmt: skip


def test_an_output_folder_swapped_for_a_link_while_it_is_read_gives_nothing_of_theirs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The output folder was resolved twice, once to check it, once to read it: a job whose code swapped its
    folder for a link to another owner's between the two read that one's files (hunt EB). The folder read is
    the one checked, and it is opened without following a link on its way."""
    from application.models.job_request import TrainingParams
    from application.models.training_model import Job, JobStatus
    from application.services import artifacts

    root = tmp_path / "output"
    mine, theirs = root / "alice-job", root / "bob-job"
    mine.mkdir(parents=True)
    theirs.mkdir()
    (theirs / "secret.txt").write_text("bob's")
    (theirs / "ckpt").mkdir()
    job = Job(job_id="alice-job", status=JobStatus.COMPLETED, priority=5, owner="alice", data_path="d", model_path="m",
              output_dir=str(mine), output_dir_requested="alice-job", num_gpus=0, training=TrainingParams(),
              created_at=0, updated_at=0)  # fmt: skip
    real_realpath = os.path.realpath

    def swap_after_first(path: Any, *args: Any, **kwargs: Any) -> str:
        resolved = real_realpath(path, *args, **kwargs)
        if str(path) == str(mine) and not (tmp_path / "swapped").exists():  # the check saw the folder: swap now
            (tmp_path / "swapped").touch()
            mine.rename(tmp_path / "alice-job.real")
            mine.symlink_to(theirs)
        return resolved

    def put_back() -> None:
        (tmp_path / "swapped").unlink()
        mine.unlink()
        (tmp_path / "alice-job.real").rename(mine)

    monkeypatch.setattr(os.path, "realpath", swap_after_first)
    with pytest.raises(NotFound):
        artifacts.prepare_download(job, root, "secret.txt")
    put_back()
    with pytest.raises(NotFound):
        artifacts.prepare_download(job, root, "ckpt.tar")
    put_back()
    assert [f.path for f in artifacts.list_artifacts(job, root).files] == []


def test_links_are_resolved_by_the_kernel_with_its_bound(tmp_path: Path) -> None:
    """os.path.realpath follows any number of links: a job's 4,000 links of `a0/a1/...` (800 links to `.`) took
    one listing 68 s of CPU in the default executor, and six listings stalled other owners' downloads (hunt EB).
    A link is now resolved as the kernel resolves it (40 links at most): one beyond that leads nowhere."""
    from application.services.artifact_tar import real_path
    from application.services.artifacts import resolve

    base = tmp_path / "out"
    base.mkdir()
    (base / "file").write_text("x")
    for i in range(50):
        os.symlink(f"c{i + 1}" if i < 49 else "file", base / f"c{i}")
    for i in range(100):
        os.symlink(".", base / f"a{i}")
    os.symlink("/".join(f"a{i}" for i in range(100)) + "/file", base / "long")
    os.mkfifo(base / "pipe")
    assert real_path(base / "c45") == base / "file" and real_path(base / "c0") is None
    assert real_path(base / "long") is None and real_path(base / "missing") is None
    assert real_path(base / "pipe") == base / "pipe"  # (O_PATH: not opened for reading, no wait for a writer)
    # A name that truly ends in the kernel's mark of an unlinked file is that file (it was a 404, review EC)...
    (base / "report (deleted)").write_text("y")
    assert real_path(base / "report (deleted)") == base / "report (deleted)"
    # ... and an unlinked one is nothing, even beside a file named as its mark.
    (base / "gone").write_text("z")
    fd = os.open(base / "gone", os.O_RDONLY)
    try:
        os.unlink(base / "gone")
        (base / "gone (deleted)").write_text("other")
        assert real_path(f"/proc/self/fd/{fd}") is None
    finally:
        os.close(fd)
    found = resolve(base, "c45")
    assert found is not None and found[2] == base / "file"
    os.close(found[0])
    assert resolve(base, "c0") is None and resolve(base, "long") is None
