"""One owner's job may not write into, nor read from, another owner's job folder (application/services/folder_owners).

Through the API with keys (alice, bob, root the admin), in this process against a real Redis; and the store's
own atomic check, and the recording of folders stored by an older version."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from application.scheduler_process import Scheduler
from application.services.folder_owners import folder_arg
from application.services.job_store import JobStore, Refusal, TransitionRefused
from application.services.keys import Keys
from application.services.redis_service import RedisService
from tests.conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, KEYS_SETTING, auth, job_body, make_model, seed_swift_probe
from tests.test_job_store import make_job

FOREIGN = "overlaps the folder of another owner's job"


async def test_a_user_cannot_write_into_read_from_or_wrap_another_owners_job_folder(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    output = tmp_path / "output"  # OUTPUT_ROOT (tests.conftest.settings_for)
    seed_swift_probe(tmp_path)  # training arguments such as adapters are checked against swift's own list
    async with app_factory(API_KEYS=KEYS_SETTING, CREATE_RATE_LIMIT="0") as client:
        deadline = time.monotonic() + 30
        while not (await client.get("/health")).json()["swift"].get("probed"):
            assert time.monotonic() < deadline, "the scheduler did not publish swift's arguments"
            await asyncio.sleep(0.1)

        # A folder name ms-swift knows, so that it needs no model_type or template (as with the real registry).
        known = str(make_model(tmp_path / "models" / "Qwen2.5-0.5B-Instruct"))
        typed = {"model_type": "qwen2", "template": "qwen"}  # for a checkpoint's folder, whose name says nothing

        async def create(key: str, name: str, **fields: Any) -> tuple[int, str]:
            body = {**job_body(tmp_path, name.replace("/", "-"), dataset="data", model_path=known),
                    "output_dir": name, **fields}  # fmt: skip
            r = await client.post("/jobs", json=body, headers=auth(key))
            return r.status_code, r.text

        assert (await create(ALICE_KEY, "alicefast"))[0] == 201
        assert (await create(ALICE_KEY, "team1/run"))[0] == 201
        checkpoint = make_model(output / "alicefast" / "v0-x" / "checkpoint-6")

        # Bob's job may not be that folder, lie inside it, or hold it (its artifacts would list alice's files).
        for name in (
            "alicefast",
            "alicefast/sub",
            "alicefast/v0-x/checkpoint-6",
            "team1",
            "./team1/run/../run",
            "alicefast/v0-x/checkpoint-6/config.json",
        ):  # a file of hers: not said to be one
            status, text = await create(BOB_KEY, name)
            assert status == 409 and FOREIGN in text and "choose another folder" in text, (name, text)
        # Nor read from it: a model, or a path-taking training argument, whether or not the path exists (the
        # answer is the same, so it tells nothing of alice's files).
        answers: list[str] = []
        for where, value in [("model_path", str(checkpoint)), ("model_path", str(output / "alicefast" / "nope")),
                             ("model_path", "output/alicefast/v0-x/checkpoint-6"),
                             ("model_path", "alicefast/v0-x/checkpoint-6"),
                             ("training", {"adapters": str(checkpoint)})]:  # fmt: skip
            status, text = await create(BOB_KEY, f"bob-{len(answers)}", **{where: value})
            assert status == 422 and FOREIGN in text, (where, value, text)
            answers.append(text.replace(str(value), "X") if isinstance(value, str) else text)
        assert answers[0] == answers[1], answers
        # Nor OUTPUT_ROOT, or a folder that holds it (here DATA_ROOTS is the folder OUTPUT_ROOT lies in).
        status, text = await create(BOB_KEY, "bob-data", training={"val_dataset": [str(tmp_path)]})
        assert status == 422 and "is or holds OUTPUT_ROOT" in text, text
        status, text = await create(BOB_KEY, "bob-root", model_path=str(output))
        assert status == 422 and "is or holds OUTPUT_ROOT" in text, text
        # A file where a folder is asked for is said to be one: asked by its owner, who may know.
        status, text = await create(ALICE_KEY, "alicefast/v0-x/checkpoint-6/config.json")
        assert status == 422 and "is a file" in text, text
        status, text = await create(ALICE_KEY, "alicefast/v0-x/checkpoint-6/config.json/run")  # never made
        assert status == 422 and "is a file, or lies under one" in text, text
        # Nothing of this was stored.
        listed = (await client.get("/jobs", params={"limit": 500}, headers=auth(ADMIN_KEY))).json()
        assert sorted(j["job_id"] for j in listed["jobs"]) == ["alicefast", "run"]

        # Alice may use her own folders; bob his; the admin anyone's.
        status, text = await create(ALICE_KEY, "alicefast/again", model_path=str(checkpoint), training=typed)
        assert status == 201, text
        assert (await create(ALICE_KEY, "alice2", training={"adapters": str(checkpoint)}))[0] == 201
        assert (await create(BOB_KEY, "bobs"))[0] == 201
        assert (await create(BOB_KEY, "bobs/inside"))[0] == 201
        status, text = await create(ADMIN_KEY, "alicefast/root", model_path=str(checkpoint), training=typed)
        assert status == 201, text
        # A folder stays its owner's after its jobs are gone (their files stay).
        await client.post("/jobs/bobs/stop", headers=auth(BOB_KEY))
        assert (await client.delete("/jobs/bobs", headers=auth(BOB_KEY))).status_code == 204
        status, text = await create(ALICE_KEY, "bobs")
        assert status == 409 and FOREIGN in text, text

        # Until the scheduler has recorded the folders of jobs stored by an older version, users wait.
        store = client.app.state.training.store
        await store.r.delete(store.keys.folders_indexed)
        refused = await client.post("/jobs", json={**job_body(tmp_path, "bobs3"), "output_dir": "bobs3"},
                                    headers=auth(BOB_KEY))  # fmt: skip
        assert refused.status_code == 503 and "try again in a few seconds" in refused.text, refused.text
        assert refused.headers["Retry-After"] == "5"
        assert "a scheduler not yet upgraded does not record them" in refused.text
        # An upload is refused so too, before its body is read (it was, after the whole file had come in).
        received: list[int] = []

        async def body() -> AsyncIterator[bytes]:  # (a well-formed upload: read, it would be taken whole)
            received.append(1)
            yield (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
                   b"Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip
            row = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello"}]}).encode() + b"\n"  # fmt: skip
            for _ in range(62):
                received.append(1)
                yield row * 1000
            received.append(1)
            yield b"\r\n--b--\r\n"

        upload = await client.post("/files", content=body(), headers={
            **auth(BOB_KEY), "Content-Type": "multipart/form-data; boundary=b"})  # fmt: skip
        assert upload.status_code == 503 and "whose job folders are whose" in upload.text, upload.text
        assert len(received) < 64, len(received)
        assert (await create(ADMIN_KEY, "roots"))[0] == 201
        await store.folders.backfill()
        assert (await create(BOB_KEY, "bobs3"))[0] == 201


async def test_a_new_install_takes_users_jobs_before_any_scheduler_has_run(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # No job stored, so no folder of an older version to record: nothing for a user's create to wait for (it
    # was 503 until a scheduler had started once, for as long as none ran).
    async with app_factory(scheduler=False, API_KEYS=KEYS_SETTING) as client:
        body = {**job_body(tmp_path, "first", dataset="data"), "output_dir": "first"}
        r = await client.post("/jobs", json=body, headers=auth(BOB_KEY))
        assert r.status_code == 201, r.text


async def admin_then_user_create(client: Any, tmp_path: Path, within: float) -> None:
    """After Redis lost its data: an admin's create first (201), then a user's, refused only as waiting for the
    folders to be recorded, and taken `within` seconds."""
    body = {**job_body(tmp_path, "admins", dataset="data"), "output_dir": "admins"}
    r = await client.post("/jobs", json=body, headers=auth(ADMIN_KEY))
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + within
    while True:
        body = {**job_body(tmp_path, "bobs", dataset="data"), "output_dir": "bobs"}
        r = await client.post("/jobs", json=body, headers=auth(BOB_KEY))
        if r.status_code == 201:
            return
        assert r.status_code == 503 and "not recorded whose job folders" in r.text, r.text
        assert time.monotonic() < deadline, f"a user's create is still refused after the flush: {r.text}"
        await asyncio.sleep(0.2)


async def test_users_create_again_once_the_scheduler_leads_a_redis_that_lost_its_data(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Redis flushed (or replaced, or restored from a backup): the folders' marker went with it. An admin's create
    # came first, so the jobs index was not empty when a user's could set it, and the scheduler that led again
    # recorded nothing: every user's create was 503 "not recorded ... yet" until it was restarted (hunt CR).
    async with app_factory(API_KEYS=KEYS_SETTING, CREATE_RATE_LIMIT="0") as client:
        scheduler = client.scheduler
        await scheduler.cluster.r.flushdb()
        await admin_then_user_create(client, tmp_path, within=30)
        # (and the admin's folder is the admin's: another user may not take it)
        body = {**job_body(tmp_path, "into", dataset="data"), "output_dir": "admins/into"}
        r = await client.post("/jobs", json=body, headers=auth(ALICE_KEY))
        assert r.status_code == 409 and FOREIGN in r.text, r.text


async def test_a_standby_that_led_before_takes_over_a_flushed_redis_and_users_create_again(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The scheduler that took the lock a flush let go was the standby, not the leader that saw its lock gone: it
    # had led before, so it made no backfill, and every user's create was 503 until a restart (review CV).
    async with app_factory(API_KEYS=KEYS_SETTING, CREATE_RATE_LIMIT="0") as client:
        a: Scheduler = client.scheduler
        deadline = time.monotonic() + 20
        while not a.leader.leading:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        redis_b = RedisService(a.settings)
        await redis_b.connect()
        b = Scheduler(a.settings, redis_b)
        b._backfills_due = False  # (as after an earlier lead of its own: its backfills were made then)
        task_b = asyncio.create_task(b.run())
        try:
            await asyncio.sleep(0.5)
            # Flush until the standby, not the leader, takes the lock that Redis lost (it polls every 0.2 s, the
            # leader renews every TTL/3 = 1 s): the leader then hears "another scheduler holds the lock".
            for _ in range(5):
                await a.cluster.r.flushdb()
                deadline = time.monotonic() + 10
                while not (a.leader.leading ^ b.leader.leading):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.5)
                if b.leader.leading:
                    break
            assert b.leader.leading, "the standby never took the lead"
            await admin_then_user_create(client, tmp_path, within=15)
        finally:
            b.stopping.set()
            await asyncio.wait_for(task_b, 30)
            await redis_b.close()


async def test_without_keys_every_folder_is_open_and_recorded_for_when_keys_come(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    make_model(tmp_path / "output" / "open" / "v0-x" / "checkpoint-2")
    prefix = f"test-folders-{time.time_ns()}"  # one store for both servers
    async with app_factory(REDIS_KEY_PREFIX=prefix) as client:
        r = await client.post("/jobs", json={**job_body(tmp_path, "open", dataset="data"), "output_dir": "open"})
        assert r.status_code == 201, r.text
        body = {**job_body(tmp_path, "inside", dataset="data"), "output_dir": "open/inside",
                "model_path": str(tmp_path / "output" / "open" / "v0-x" / "checkpoint-2")}  # fmt: skip
        assert (await client.post("/jobs", json=body)).status_code == 201
    async with app_factory(REDIS_KEY_PREFIX=prefix, API_KEYS=KEYS_SETTING) as client:
        # Created by no key: another owner's folder for every key but an admin's.
        for key, expected in ((ALICE_KEY, 409), (ADMIN_KEY, 201)):
            body = {**job_body(tmp_path, "again", dataset="data"), "output_dir": "open/again"}
            r = await client.post("/jobs", json=body, headers=auth(key))
            assert r.status_code == expected, r.text


@pytest.fixture
def store(redis_client: aioredis.Redis) -> JobStore:
    return JobStore(redis_client, Keys("t"))


async def test_the_store_refuses_another_owners_folder_atomically_and_records_the_first_owner(
    store: JobStore,
) -> None:
    root = Path("/out")
    alice = make_job("a", owner="alice")
    await store.create(alice, message="created", actor="alice", folder=folder_arg(Path("/out/a"), root, "alice"))
    for job_id, folder in (("b", "/out/a/inside"), ("d", "/out")):
        job = make_job(job_id, owner="bob").model_copy(update={"output_dir": folder})
        with pytest.raises(TransitionRefused) as exc:
            await store.create(job, message="created", actor="bob",
                               folder={**folder_arg(Path(folder), root, "bob"), "check": True})  # fmt: skip
        assert exc.value.reason == Refusal.FOREIGN_FOLDER
        assert await store.get(job_id) is None
    # Unchecked (an admin's job): stored; the folder stays alice's.
    admin = make_job("e", owner="root").model_copy(update={"output_dir": "/out/a/admin"})
    await store.create(admin, message="created", actor="root", folder=folder_arg(Path("/out/a/admin"), root, "root"))
    assert await store.folders.foreign(folder_arg(Path("/out/a"), root, "bob")) == "/out/a"
    assert await store.folders.foreign(folder_arg(Path("/out/a"), root, "alice")) == "/out/a/admin"
    assert await store.folders.foreign(folder_arg(Path("/out/b"), root, "bob")) is None
    assert await store.folders.foreign(folder_arg(Path("/out/a0"), root, "bob")) is None  # a name, not a parent


async def test_the_folders_of_jobs_stored_by_an_older_version_are_recorded_and_a_downgrades_at_the_next_start(
    store: JobStore,
) -> None:
    root = Path("/out")
    for job_id, owner in (("old1", "alice"), ("old2", None)):
        await store.create(make_job(job_id, owner=owner), message="created", actor="x")
    # As an older version left them: no folder recorded.
    await store.r.delete(store.keys.folder_owners, store.keys.folders)
    assert await store.folders.foreign(folder_arg(Path("/out/old1/x"), root, "bob")) is None
    assert await store.folders.backfill() == 2
    assert await store.folders.foreign(folder_arg(Path("/out/old1/x"), root, "bob")) == "/out/old1"
    assert await store.folders.foreign(folder_arg(Path("/out/old2"), root, "bob")) == "/out/old2"
    assert await store.folders.foreign(folder_arg(Path("/out/old1"), root, "alice")) is None
    assert await store.folders.backfill() == 0  # (the next start: nothing more)
    # A downgrade to such a version, then this one again: the jobs it stored are recorded at the next start, as
    # their first job's owner's, and nothing recorded since is overwritten. Bob's create took alice's folder from
    # the downgrade, read her files and had it recorded as his (hunt CC).
    for job_id in ("old3", "old4"):
        await store.create(make_job(job_id, owner="alice"), message="created", actor="x")
    await store.r.hdel(store.keys.folder_owners, "/out/old3", "/out/old4")
    await store.r.zrem(store.keys.folders, "/out/old3", "/out/old4")
    await store.r.hset(store.keys.folder_owners, "/out/old4", "bob")  # (recorded since)
    # (a record written by hand, read at every start now: it must not keep a scheduler from leading)
    await store.r.hset(store.keys.job("by-hand"), mapping={"output_dir": "{not json", "owner": "7"})
    await store.r.zadd(store.keys.jobs_index, {"by-hand": time.time()})
    assert await store.folders.foreign(folder_arg(Path("/out/old3"), root, "bob")) is None
    assert await store.folders.backfill() == 1
    assert await store.folders.foreign(folder_arg(Path("/out/old3"), root, "bob")) == "/out/old3"
    assert await store.folders.foreign(folder_arg(Path("/out/old3"), root, "alice")) is None
    assert await store.r.hget(store.keys.folder_owners, "/out/old4") == "bob"
    assert await store.folders.backfill() == 0


async def test_a_folder_holding_thousands_of_the_owners_own_is_told_from_one_holding_another_owners(
    store: JobStore,
) -> None:
    """Whether a folder holds another owner's is counted, not walked: an owner with 100,000 folders under one
    made each such check walk them all in Redis (1.8 s, every other client waiting: hunt BI)."""
    root = Path("/out")
    mine = {f"/out/alice/r{n:05}": 0 for n in range(3000)}
    await store.r.hset(store.keys.folder_owners, mapping=dict.fromkeys(mine, "alice"))
    await store.r.zadd(store.keys.folders, mine)
    await store.r.zadd(store.keys.owner_folders("alice"), mine)
    assert await store.folders.foreign(folder_arg(Path("/out/alice"), root, "alice")) is None
    assert await store.folders.foreign(folder_arg(Path("/out/alice"), root, "bob")) == "/out/alice/r00000"
    # One of bob's among them, last in order: found all the same.
    bobs = Path("/out/alice/r99999")
    await store.create(make_job("b", owner="bob").model_copy(update={"output_dir": str(bobs)}), message="created",
                       actor="root", folder=folder_arg(bobs, root, "bob"))  # fmt: skip
    assert await store.folders.foreign(folder_arg(Path("/out/alice"), root, "alice")) == str(bobs)
    assert await store.folders.foreign(folder_arg(Path("/out/alice/r00001"), root, "alice")) is None
    # and one among them, found where it lies.
    among = Path("/out/alice/r01500b")
    await store.create(make_job("c", owner="bob").model_copy(update={"output_dir": str(among)}), message="created",
                       actor="root", folder=folder_arg(among, root, "bob"))  # fmt: skip
    assert await store.folders.foreign(folder_arg(Path("/out/alice"), root, "alice")) == "/out/alice/r01500b"
    assert await store.folders.foreign(folder_arg(Path("/out/alic"), root, "alice")) is None  # a name, not a parent


async def test_an_owners_folders_recorded_by_an_api_worker_not_yet_upgraded_are_taken_as_theirs_when_met(
    store: JobStore,
) -> None:
    """An API worker of the version before (a rolling upgrade, a downgrade and back) records folders without the
    owner's set: they read as another owner's, and alice got a 409 for her own folder, for good (hunt BJ)."""
    root = Path("/out")
    await store.folders.backfill()  # (the new version's scheduler ran: nothing more is migrated)
    old = {f"/out/alice/roll/{n:03}": 0 for n in range(100)}
    await store.r.hset(store.keys.folder_owners, mapping={**dict.fromkeys(old, "alice"), "/out/alice/roll/x": "bob"})
    await store.r.zadd(store.keys.folders, {**old, "/out/alice/roll/x": 0})
    # A check puts up to 64 of them in her set; past those, refused (the safe side) until the next one.
    assert await store.folders.foreign(folder_arg(Path("/out/alice/roll"), root, "alice")) == "/out/alice/roll"
    assert await store.r.zcard(store.keys.owner_folders("alice")) == 64
    assert await store.folders.foreign(folder_arg(Path("/out/alice/roll"), root, "alice")) == "/out/alice/roll/x"
    assert await store.r.zcard(store.keys.owner_folders("alice")) == 100
    await store.r.hdel(store.keys.folder_owners, "/out/alice/roll/x")
    await store.r.zrem(store.keys.folders, "/out/alice/roll/x")
    assert await store.folders.foreign(folder_arg(Path("/out/alice/roll"), root, "alice")) is None
    assert await store.folders.foreign(folder_arg(Path("/out/alice"), root, "bob")) == "/out/alice/roll/000"


async def test_folders_recorded_before_they_were_kept_by_owner_are_put_in_their_owners_sets_once(
    store: JobStore,
) -> None:
    root = Path("/out")
    for job_id, owner in (("a", "alice"), ("b", "bob"), ("n", None)):
        folder = Path(f"/out/x/{job_id}")
        await store.create(make_job(job_id, owner=owner).model_copy(update={"output_dir": str(folder)}),
                           message="created", actor="x", folder=folder_arg(folder, root, owner))  # fmt: skip
    # As the version before left them: folders recorded, no set per owner.
    for owner in ("alice", "bob", ""):
        await store.r.delete(store.keys.owner_folders(owner))
    await store.r.set(store.keys.folders_recorded, "1")
    assert await store.folders.backfill() == 0  # (nothing recorded again)
    assert await store.folders.foreign(folder_arg(Path("/out/x/a"), root, "alice")) is None
    assert await store.folders.foreign(folder_arg(Path("/out/x"), root, "alice")) == "/out/x/b"  # bob's (and none's)
    assert await store.r.zrange(store.keys.owner_folders(""), 0, -1) == ["/out/x/n"]
    await store.r.delete(store.keys.owner_folders("alice"))
    await store.folders.backfill()
    assert await store.r.zcard(store.keys.owner_folders("alice")) == 0  # once


async def test_a_folder_recorded_since_an_upgrade_goes_to_the_owner_of_its_first_job(store: JobStore) -> None:
    await store.create(make_job("old", owner="alice"), message="created", actor="x")
    await store.r.delete(store.keys.folder_owners, store.keys.folders, store.keys.folders_indexed)
    await store.r.hdel(store.keys.output_dirs, "/out/old")  # the old job has ended
    # An admin's create (not checked) in that folder, before the scheduler recorded the old ones.
    late = make_job("late", owner="root").model_copy(update={"output_dir": "/out/old"})
    await store.create(late, message="created", actor="root")
    assert await store.r.hget(store.keys.folder_owners, "/out/old") == "root"
    await store.folders.backfill()
    assert await store.r.hget(store.keys.folder_owners, "/out/old") == "alice"
    # and it is alice's own from then on, not root's.
    assert await store.folders.foreign(folder_arg(Path("/out"), Path("/"), "alice")) is None
    assert await store.r.zrange(store.keys.owner_folders("root"), 0, -1) == []


async def test_a_guard_whose_read_does_not_come_back_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    from application.exceptions import Unavailable
    from application.services import folder_owners

    async def stuck(_: dict[str, Any]) -> str | None:
        await asyncio.sleep(5)
        return None

    monkeypatch.setattr(folder_owners, "READ_TIMEOUT", 0.2)
    guard = folder_owners.FolderGuard(Path("/out"), "bob", stuck, asyncio.get_running_loop())
    with pytest.raises(Unavailable, match="try again"):
        await asyncio.to_thread(guard, "model_path", "/out/a/m", Path("/out/a/m"))
    with pytest.raises(RuntimeError, match="worker thread"):
        guard("model_path", "/out/a/m", Path("/out/a/m"))  # on the loop it would wait for itself


@pytest.mark.parametrize(("folder", "root", "ancestors"), [
    ("/out/a/b/c", "/out", ["/out/a/b/c", "/out/a/b", "/out/a"]),
    ("/out/a", "/out", ["/out/a"]),
    ("/out2/a", "/out", ["/out2/a"]),  # a name sharing the root's start is not inside it
    ("/srv/out/a/b", "/srv/out/", ["/srv/out/a/b", "/srv/out/a"]),
    ("/a/b", "/", ["/a/b", "/a"]),
    ("//a/b", "/", ["//a/b", "//a", "//"]),  # (realpath never gives '//'; it must still end)
])  # fmt: skip
def test_folder_arg_names_every_folder_between_the_job_folder_and_the_root(folder: str, root: str,
                                                                          ancestors: list[str]) -> None:  # fmt: skip
    arg = folder_arg(Path(folder), Path(root), None)
    assert arg == {"owner": "", "ancestors": ancestors, "prefix": folder.rstrip("/") + "/"}


async def test_an_upload_may_not_name_images_in_another_owners_job_folder(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # (Here DATA_ROOTS holds OUTPUT_ROOT.) Bob's upload whose rows named images in alice's job folder was kept,
    # counted in his quota, and then every create naming it was refused.
    async with app_factory(API_KEYS=KEYS_SETTING) as client:
        body = {**job_body(tmp_path, "alicepics", dataset="data"), "output_dir": "alicepics"}
        assert (await client.post("/jobs", json=body, headers=auth(ALICE_KEY))).status_code == 201
        picture = tmp_path / "output" / "alicepics" / "secret.png"
        picture.parent.mkdir(parents=True, exist_ok=True)
        picture.write_bytes(b"\x89PNG")
        turns = [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "hello"}]
        answers = []
        for image in (picture, picture.with_name("none.png")):  # the same answer whether or not it exists
            rows = (json.dumps({"messages": turns, "images": [str(image)]}) + "\n").encode() * 2
            r = await client.post("/files", files={"file": ("pics.jsonl", rows)}, headers=auth(BOB_KEY))
            assert r.status_code == 422 and FOREIGN in r.json()["detail"], r.text
            answers.append(r.json()["detail"].replace(image.name, "X"))
        assert answers[0] == answers[1], answers
        assert (await client.get("/files", headers=auth(BOB_KEY))).json()["files"] == []
        # Alice may (her own job's folder), as a create of hers may.
        r = await client.post("/files", files={"file": ("pics.jsonl", rows)}, headers=auth(ALICE_KEY))
        assert r.status_code == 201, r.text
