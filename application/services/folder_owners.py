"""Whose job folders are whose: one owner's job may not write into, or read from, another owner's job folder.

Every job's output folder is recorded with its owner when the job is created (`Keys.folder_owners`, kept
after the job goes, as its files stay). A caller with a key that is not an admin's is then refused

* an `output_dir` that is another owner's job folder, lies inside one, or holds one (its artifacts would
  list the other job's files, its runs write among them): by the create script, atomically with the store,
  before it says that a job or a file is there;
* a model, data set or training argument path inside OUTPUT_ROOT that overlaps another owner's job folder
  (their checkpoints, merged models, logs), or that holds OUTPUT_ROOT: by `FolderGuard`, which the path
  sandbox calls before it looks at whether the path exists, so its answer is the same either way.

Jobs without an owner (created while no keys were configured) count as another owner's for every key but an
admin's. Without keys, nothing is refused, but every folder is recorded, for when keys are configured.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from application.auth import Caller
from application.exceptions import Conflict, Invalid, Unavailable
from application.services import lua, lua_cluster
from application.services.index_pages import advance_mark, walk_by_score, walk_from
from application.services.job_codec import script_arg
from application.services.keys import Keys

# How long a check run in a thread waits for its Redis read on the event loop.
READ_TIMEOUT = 30.0
FOLDERS_NOT_INDEXED = ("the scheduler has not recorded whose job folders are whose yet (it does so as it starts, "
                       "once after an upgrade): try again in a few seconds, or start a scheduler if none runs "
                       "(one of this version: a scheduler not yet upgraded does not record them)")  # fmt: skip


def folder_arg(folder: Path, root: Path, owner: str | None) -> dict[str, Any]:
    """What the scripts need to find another owner's folder overlapping `folder` (a resolved path inside the
    resolved OUTPUT_ROOT `root`)."""
    # As strings: pathlib's `root in p.parents` for every parent cost a create a twentieth of its time.
    path, top = str(folder), str(root)
    inside = top if top.endswith("/") else top + "/"
    ancestors = [path]
    child, parent = path, posixpath.dirname(path)
    # (dirname('//') is '//': a path that no longer shortens has no parent left)
    while parent != top and len(parent) < len(child) and parent.startswith(inside):  # strictly inside OUTPUT_ROOT
        ancestors.append(parent)
        child, parent = parent, posixpath.dirname(parent)
    return {"owner": owner or "", "ancestors": ancestors, "prefix": path.rstrip("/") + "/"}


def foreign_output_dir(requested: str) -> Conflict:
    return Conflict(f"output_dir '{requested}' overlaps the folder of another owner's job (it is that folder, lies "
                    "inside it or holds it): choose another folder")  # fmt: skip


class FolderGuard:
    """Refuses a path that overlaps another owner's job folder; called by the path sandbox, in a worker thread
    (`preflight.check_request`), with each resolved path before anything looks at whether it exists."""

    def __init__(self, root: Path, owner: str, read: Callable[[dict[str, Any]], Coroutine[Any, Any, str | None]],
                 loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        self.root = root
        self.owner = owner
        self.read = read
        self.loop = loop
        self._loop_thread = threading.get_ident()

    def __call__(self, field: str, value: str, real: Path) -> None:
        if real == self.root or real in self.root.parents:
            raise Invalid(f"{field} '{value}' is or holds OUTPUT_ROOT, and with it every owner's job folders: name a "
                          "path inside MODEL_ROOTS / DATA_ROOTS, or one of your own jobs' outputs")  # fmt: skip
        if self.root not in real.parents:
            return
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("FolderGuard reads Redis through the event loop: call it from a worker thread")
        future = asyncio.run_coroutine_threadsafe(self.read(folder_arg(real, self.root, self.owner)), self.loop)
        try:
            foreign = future.result(READ_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise Unavailable(f"Redis did not answer within {READ_TIMEOUT:g} s: try again") from None
        if foreign:
            raise Invalid(f"{field} '{value}' overlaps the folder of another owner's job (under OUTPUT_ROOT): use "
                          "your own jobs' outputs, or a path inside MODEL_ROOTS / DATA_ROOTS")  # fmt: skip


class FolderIndex:
    """The Redis side: reads for `FolderGuard`, and the folders of jobs stored before it was kept."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._foreign = client.register_script(lua.FOREIGN_FOLDER)
        self._mark_if_empty = client.register_script(lua_cluster.MARK_FOLDERS_INDEXED_IF_EMPTY)
        self._record_missing_script = client.register_script(lua_cluster.RECORD_MISSING_FOLDERS)

    async def guard(self, root: Path, caller: Caller, indexed: bool = False) -> FolderGuard | None:
        """The `FolderGuard` for a caller's paths (OUTPUT_ROOT resolved is `root`): None for an admin, or on a
        server without keys. Unavailable until the folders of jobs an older version stored are recorded, unless
        `indexed` says they are."""
        if caller.name is None or caller.is_admin:
            return None
        if not indexed and not await self.mark_indexed_if_empty():
            raise Unavailable(FOLDERS_NOT_INDEXED, {"Retry-After": "5"})
        return FolderGuard(root, caller.name, self.foreign, asyncio.get_running_loop())

    async def mark_indexed_if_empty(self) -> bool:
        """True when nothing needs recording: it is done, or no job is stored (a new install), so none is of an
        older version."""
        k = self.keys
        return bool(await self._mark_if_empty(keys=[k.jobs_index, k.folders_indexed, k.folders, k.folders_recorded]))

    async def foreign(self, folder: dict[str, Any]) -> str | None:
        """Where `folder` (`folder_arg`) overlaps another owner's job folder: the first folder it lies in (or
        itself) that is another owner's, or itself when it holds one; None when neither."""
        k = self.keys
        found = await self._foreign(keys=[k.folder_owners], args=[script_arg({"folder": folder, "k": {
            "owners": k.folder_owners, "folders": k.folders, "mine": k.owner_folders(folder["owner"])}})])  # fmt: skip
        return str(found) if found else None

    async def backfill(self, batch: int = 500) -> int:
        """At a scheduler's start: once after an upgrade, record the folders of jobs stored by a version that did
        not, each as the owner's of the first job that wrote there (an admin's create, unchecked, since the upgrade
        may have recorded one of them as theirs), then put each recorded folder in its owner's `owner_folders`.
        Users' creates wait for this (FOLDERS_NOT_INDEXED). At each later start, only those still unrecorded (a
        downgrade's jobs), nothing recorded overwritten. Returns how many folders it recorded."""
        k = self.keys
        if await self.r.exists(k.folders_indexed):
            # Recorded once; but a version from before that (a downgrade, then this one again) stored jobs without
            # recording their folders, and another owner's create took such a folder, read its files and had it
            # recorded as theirs (hunt CC). Each start records those it finds unrecorded among the jobs created
            # since the last start looked (a day before: clocks of other hosts; all of them took 2.4 s of 100,000).
            return await self._record_missing(batch)
        recorded = 0
        if not await self.r.exists(k.folders_recorded):
            recorded = await self._record_from_jobs(batch)
            await self.r.set(k.folders_recorded, "1")
        # By rank, a page at a time: folders are only ever added, so one added meanwhile (its create puts it in
        # its owner's set itself) moves those after it along, and a page reads one again rather than missing one.
        start = 0
        while folders := await self.r.zrange(k.folders, start, start + batch - 1):
            start += batch
            owners = await self.r.hmget(k.folder_owners, folders)
            async with self.r.pipeline(transaction=True) as pipe:
                for folder, owner in zip(folders, owners, strict=True):
                    if owner is not None:
                        pipe.zadd(k.owner_folders(owner), {folder: 0})
                await pipe.execute()
        await self.r.set(k.folders_indexed, "1")
        return recorded

    async def _record_from_jobs(self, batch: int) -> int:
        k = self.keys
        first: dict[str, str] = {}
        start = 0
        while ids := await self.r.zrange(k.jobs_index, start, start + batch - 1):  # oldest first
            start += batch
            async with self.r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(k.job(job_id), ["output_dir", "owner"])
                rows = await pipe.execute()
            for output_dir, owner in rows:
                if output_dir:
                    first.setdefault(json.loads(output_dir), json.loads(owner or "null") or "")
        items = list(first.items())
        for i in range(0, len(items), batch):
            part = dict(items[i : i + batch])
            before = await self.r.hmget(k.folder_owners, list(part))
            async with self.r.pipeline(transaction=True) as pipe:  # (a folder's owner and its index entries together)
                pipe.hset(k.folder_owners, mapping=part)
                pipe.zadd(k.folders, {folder: 0 for folder in part})
                for (folder, owner), was in zip(part.items(), before, strict=True):
                    if was is not None and was != owner:  # (an admin's create since the upgrade)
                        pipe.zrem(k.owner_folders(was), folder)
                    pipe.zadd(k.owner_folders(owner), {folder: 0})
                await pipe.execute()
        return len(items)

    async def _record_missing(self, batch: int) -> int:
        """By score (creation time), oldest first: HSETNX then gives a folder to its first job's owner."""
        k = self.keys
        mark = await self.r.get(k.folders_scanned)
        start, recorded, newest = walk_from(mark), 0, None
        async for fresh, newest_of_page in walk_by_score(self.r, k.jobs_index, start, batch):
            newest = newest_of_page
            async with self.r.pipeline(transaction=False) as pipe:
                for job_id in fresh:
                    pipe.hmget(k.job(job_id), ["output_dir", "owner"])
                rows_read = await pipe.execute()
            jobs = [job for d, o in rows_read if d and (job := _folder_and_owner(d, o)) is not None]
            there = await self.r.hmget(k.folder_owners, [folder for folder, _ in jobs]) if jobs else []
            absent = [{"folder": folder, "owner": owner, "mine": k.owner_folders(owner)}
                      for (folder, owner), was in zip(jobs, there, strict=True) if was is None]  # fmt: skip
            if absent:
                recorded += int(await self._record_missing_script(
                    keys=[k.folder_owners], args=[script_arg({"folders": absent, "all": k.folders})]))  # fmt: skip
        await advance_mark(self.r, k.folders_scanned, mark, newest)
        return recorded


def _folder_and_owner(output_dir: str, owner: str | None) -> tuple[str, str] | None:
    """A stored job's folder and owner ("" for none); None for a record written by hand that holds neither as JSON:
    read at every start now, one such record must not keep a scheduler from leading."""
    try:
        folder, name = json.loads(output_dir), json.loads(owner or "null") or ""
    except ValueError:
        return None
    return (folder, name) if isinstance(folder, str) and isinstance(name, str) else None
