"""Uploaded data sets (POST /files), like OpenAI's Files API: stored on disk, described in Redis.

A file lives at `<first DATA_ROOTS folder>/uploads/<owner folder>/file-<24 hex><suffix>`: the server names it,
the client's file name is kept for display only. It is streamed to a hidden temp name in that folder, checked with
the pre-flight data set check, then renamed into place, so a listed file is always complete and valid.

Redis holds one JSON record per file (Keys.file) and two sorted sets by creation time (the owner's, everyone's);
one Lua script (STORE_FILE) writes them with the owner's byte count, refusing a file past FILE_QUOTA_BYTES, and
FORGET_FILE takes all of it back. A crash between the rename and the record leaves an unlisted file on disk, never
a record without its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from loguru import logger
from redis.exceptions import RedisError

from application.auth import Caller
from application.config import UPLOADS_DIR, Settings
from application.exceptions import Conflict, InsufficientStorage, Invalid, NotFound, TooLarge
from application.models.file_model import PURPOSES, FileList, FileObject, Purpose
from application.services import clock, lua_cluster
from application.services.check_pool import CheckPool
from application.services.datasets import check_dataset
from application.services.folder_owners import FolderIndex
from application.services.index_pages import cursor_text, ids_page, one_way
from application.services.job_codec import script_arg
from application.services.keys import Keys
from application.services.lost_replies import MaybeMade, landed, negated, never_sent
from application.services.media_refs import check_media
from application.services.owner_slots import upload_slots
from application.services.path_sandbox import all_of, real_output_root
from application.services.preflight import own_files
from application.services.redis_service import REDIS_AWAY
from application.services.upload_refs import ACTIVE_STATUSES, FILE_REF, UploadRefs, owner_folder
from application.services.upload_stream import ReceivedUpload, off_loop, receive_upload, until_idle

SUFFIXES = (".jsonl", ".json", ".csv")  # what check_dataset reads
RETRY = {"Retry-After": "5"}
# An upload file older than this with no record is left over from a crash (an upload takes far less).
ORPHAN_AGE = 6 * 3600.0
USERS_NAMED_MAX = 200  # a refused delete looks up this many of the file's jobs, to name the caller's own


# The most a multipart body holds besides the file: boundaries, part headers (a file name up to 255 bytes), the
# purpose field.
MULTIPART_FRAMING = 16 * 1024


def _not_found(file_id: str) -> NotFound:
    return NotFound(f"file '{file_id}' not found: list your files with GET .../training/files")


class FileStore(UploadRefs):
    def __init__(self, settings: Settings, client: aioredis.Redis, keys: Keys, checks: CheckPool | None = None) -> None:
        self.settings = settings
        self.checks = checks or CheckPool()  # where an upload's data set check runs (its threads made when used)
        # redis-py types replies as bytes|str unions even with decode_responses=True: treat them as str.
        self.r: Any = client
        self.keys = keys
        self._forget_file = client.register_script(lua_cluster.FORGET_FILE)
        self._store_file = client.register_script(lua_cluster.STORE_FILE)
        self.slots = upload_slots(client, keys, settings)
        self.folders = FolderIndex(client, keys)

    @property
    def root(self) -> Path:
        return self.settings.data_roots()[0] / UPLOADS_DIR

    # ---- upload ---------------------------------------------------------------------------------------------

    async def upload(self, chunks: AsyncIterator[bytes], content_type: str | None, content_length: str | None,
                     caller: Caller) -> FileObject:  # fmt: skip
        """Stream the body to disk, check it as a data set, store it; every failure leaves nothing behind. At most
        UPLOADS_PER_OWNER of one key's at once (429)."""
        await self._refuse_over_quota(content_length, caller)
        # Before the body: a 503 until the folders are indexed came after the whole file had been received.
        await self.folders.guard(real_output_root(self.settings.OUTPUT_ROOT), caller)
        slot = await self.slots.take(caller.name)
        chunks = until_idle(chunks, self.settings.UPLOAD_IDLE_SECONDS)
        if slot is None:
            return await self._upload(chunks, content_type, content_length, caller)
        try:
            return await self._upload(slot.renewing(chunks), content_type, content_length, caller)
        finally:
            await slot.release()

    async def _refuse_over_quota(self, content_length: str | None, caller: Caller) -> None:
        """413 before the first byte when the body's length alone (less room for its multipart framing) takes the
        owner's uploads over FILE_QUOTA_BYTES: an owner at the quota sent file after file, each received and checked
        whole before it was refused. The store still counts the exact bytes in the step that keeps the file."""
        quota = self.settings.FILE_QUOTA_BYTES
        if not quota or not content_length or not content_length.isdigit():
            return
        held = int(await self.r.get(self.keys.owner_file_bytes(owner_folder(caller.name))) or 0)
        if held + int(content_length) - MULTIPART_FRAMING > quota:
            raise TooLarge(f"this upload ({content_length} bytes with its form) would bring the uploads of "
                           f"'{caller.actor}' past FILE_QUOTA_BYTES={quota} (they hold {held} bytes): delete some "
                           "(DELETE /files/{id})")  # fmt: skip

    async def _upload(self, chunks: AsyncIterator[bytes], content_type: str | None, content_length: str | None,
                      caller: Caller) -> FileObject:  # fmt: skip
        folder = self.root / owner_folder(caller.name)
        try:
            await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
            # Resolved, as the path sandbox resolves a job's data_path: the stored path is the one jobs record.
            folder = await asyncio.to_thread(folder.resolve)
            uploads = Path(await asyncio.to_thread(os.path.realpath, self.root))
        except OSError as exc:
            raise InsufficientStorage(f"uploads cannot be stored in {folder} ({exc.strerror}): the first "
                                      "DATA_ROOTS folder must be writable") from None  # fmt: skip
        if folder != uploads / owner_folder(caller.name):
            # A link put there (by anyone who may write in the data root) led the owner's uploads out of the
            # uploads folder, where nothing keeps them the owner's: other keys could train on them.
            logger.warning("uploads of {} refused: {} leads to {}, out of the uploads folder", caller.name,
                           self.root / owner_folder(caller.name), folder)  # fmt: skip
            raise InsufficientStorage(f"uploads cannot be stored: {self.root / owner_folder(caller.name)} is a link "
                                      "out of the uploads folder; an operator must remove it")  # fmt: skip
        file_id = "file-" + secrets.token_hex(12)
        # Marked before its first byte: whatever a crash from here on leaves, the orphan sweep finds.
        marker = str(folder / file_id)
        await self.r.zadd(self.keys.uploads_writing, {marker: clock.now()})
        try:
            meta = await self._write(file_id, folder, chunks, content_type, content_length, caller)
        except MaybeMade:
            raise  # (its file and mark stay: the sweep finds the record, or none and removes the file)
        except BaseException:
            await self._unmark(marker)
            raise
        await self._unmark(marker)
        return meta

    async def _unmark(self, marker: str) -> None:
        with contextlib.suppress(RedisError):  # (left, it is the sweep's: it finds the record, or no file)
            await self.r.zrem(self.keys.uploads_writing, marker)

    async def _recorded(self, file_id: str) -> bool:
        return bool(await self.r.exists(self.keys.file(file_id)))

    async def _write(self, file_id: str, folder: Path, chunks: AsyncIterator[bytes], content_type: str | None,
                     content_length: str | None, caller: Caller) -> FileObject:  # fmt: skip
        try:
            received = await receive_upload(
                chunks, content_type, content_length, suffixes=SUFFIXES, max_file_bytes=self.settings.FILE_MAX_BYTES,
                temp_path=lambda suffix: folder / f".{file_id}.partial{suffix}",
            )  # fmt: skip
        except OSError as exc:
            # (it said only "the upload could not be written (Operation not permitted)": no folder, no fix)
            fix = "free space on its disk" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else \
                "the first DATA_ROOTS folder must be writable by the server"  # fmt: skip
            raise InsufficientStorage(f"the upload could not be written in {folder} ({exc.strerror}): {fix}") from None
        final = folder / f"{file_id}{received.suffix}"
        try:
            meta = await self._check(file_id, received, final, caller)
            await asyncio.to_thread(received.path.replace, final)  # atomic: same folder
        except BaseException:
            await off_loop(functools.partial(received.path.unlink, missing_ok=True))
            raise
        owner = owner_folder(caller.name)
        try:
            quota = self.settings.FILE_QUOTA_BYTES
            keys = [self.keys.file(file_id), self.keys.owner_files(owner), self.keys.files_index,
                    self.keys.owner_file_bytes(owner)]  # fmt: skip
            result, held = await self._store_file(keys=keys, args=[json.dumps({
                "id": file_id, "meta": meta.model_dump_json(), "created": meta.created_at, "bytes": meta.bytes,
                "quota": quota})])  # fmt: skip
            if result == "over":
                raise TooLarge(
                    f"this upload ({meta.bytes} bytes) would bring the uploads of '{caller.actor}' to "
                    f"{held} bytes, over FILE_QUOTA_BYTES={quota}: delete some (DELETE /files/{{id}})"
                )
        except REDIS_AWAY as exc:  # its reply lost: it may have been stored all the same (lost_replies)
            if never_sent(exc):
                await off_loop(functools.partial(final.unlink, missing_ok=True))
                raise
            found = await landed(lambda: self._recorded(file_id))
            if found:
                return meta
            # Its file and mark stay either way: a write still on its way may land later, and the sweep removes
            # the file only once no record came.
            maybe = "may have been stored" if found is None else "was not stored"
            raise MaybeMade(f"Redis did not answer in time: the upload {maybe} as {file_id}; look (GET /files) "
                            "before sending it again", RETRY) from exc  # fmt: skip
        except BaseException:
            await off_loop(functools.partial(final.unlink, missing_ok=True))
            raise
        return meta

    async def _forget(self, file_id: str, owner: str, size: int) -> list[str]:
        """Remove a file's record and indexes and give its bytes back to the owner's quota, unless an active job
        names it: ['ok'], ['gone'] or ['in_use', job ids...]."""
        keys = [self.keys.file(file_id), self.keys.owner_files(owner), self.keys.files_index,
                self.keys.owner_file_bytes(owner), self.keys.file_users(file_id)]  # fmt: skip
        active = [self.keys.status_index(s) for s in ACTIVE_STATUSES]
        return list(await self._forget_file(keys=keys, args=[script_arg({"id": file_id, "bytes": size,
                                                                          "active": active})]))  # fmt: skip

    async def _check(self, file_id: str, received: ReceivedUpload, final: Path, caller: Caller) -> FileObject:
        purpose = received.fields.get("purpose", "sft").strip()
        if purpose not in PURPOSES:
            raise Invalid(f"purpose '{purpose[:32]}' is not one of {', '.join(PURPOSES)}")
        try:
            info = await self.checks.run(caller.name, functools.partial(
                check_dataset, "file", received.path, needs="either" if purpose == "rlhf" else None))  # fmt: skip
            # Its rows' images, videos and audio as a job's create checks them (as this owner's), or every job
            # naming the file would be refused after it was kept.
            guard = all_of(await self.folders.guard(real_output_root(self.settings.OUTPUT_ROOT), caller),
                           self.upload_guard(caller), own_files(self.settings))  # fmt: skip
            await self.checks.run(caller.name, functools.partial(check_media, "file", received.path,
                                                                 self.settings.data_roots(), guard))  # fmt: skip
        except Invalid as exc:
            # Its message names the temp file; the client knows the file by its own name.
            detail = exc.detail.replace(str(received.path), received.filename)
            raise Invalid(detail.replace(f"'{received.path.name}'", f"'{received.filename}'")) from None
        return FileObject(id=file_id, owner=caller.name, filename=received.filename, purpose=cast(Purpose, purpose),
                          bytes=received.size, sha256=received.sha256, rows=info.rows, rows_exact=info.rows_exact,
                          format=info.format, created_at=clock.now(), path=str(final))  # fmt: skip

    # ---- read -----------------------------------------------------------------------------------------------

    async def _load(self, file_id: str) -> FileObject | None:
        raw = await self.r.get(self.keys.file(file_id))
        return FileObject.model_validate_json(raw) if raw else None

    async def get(self, file_id: str, caller: Caller) -> FileObject:
        """Another owner's file is not found, as a missing one is: ids do not tell whether they exist."""
        meta = await self._load(file_id)
        if meta is None or not caller.owns(meta.owner):
            raise _not_found(file_id)
        return meta

    async def list_files(self, caller: Caller, owner: str | None, offset: int, limit: int,
                         cursor: str | None = None) -> FileList:  # fmt: skip
        """Newest first, at an offset or after a cursor (index_pages). A user key lists its own; an admin key
        everyone's, or one owner's with `owner`."""
        after = one_way(offset, cursor)
        if not caller.is_admin and owner not in (None, caller.name):
            return FileList(files=[], total=0, offset=offset, limit=limit, next_offset=None, next_cursor=None)
        if not caller.is_admin:
            index = self.keys.owner_files(owner_folder(caller.name))
        elif owner is not None:
            index = self.keys.owner_files(owner_folder(owner))
        else:
            index = self.keys.files_index
        total, ids, nxt_cursor = await ids_page(self.r, index, offset, limit, after)
        raws = await self.r.mget([self.keys.file(i) for i in ids]) if ids else []
        files = [FileObject.model_validate_json(raw) for raw in raws if raw]
        nxt = offset + limit if offset + limit < total and after is None else None
        return FileList(files=files, total=total, offset=offset, limit=limit, next_offset=nxt,
                        next_cursor=cursor_text(nxt_cursor) if nxt_cursor else None)  # fmt: skip

    # ---- delete ---------------------------------------------------------------------------------------------

    async def delete(self, file_id: str, caller: Caller) -> None:
        """Remove the record, then the file. Refused (409) while a pending, queued, running or paused job names it:
        the store records each job's uploads in the create's own script, and this check runs in the delete's."""
        meta = await self.get(file_id, caller)
        # Marked first, as an upload is: a reply lost once the record is gone leaves the file to the orphan sweep.
        marker = str(Path(meta.path).parent / file_id)
        await self.r.zadd(self.keys.uploads_writing, {marker: clock.now()})
        try:
            reply = await self._forget(file_id, owner_folder(meta.owner), meta.bytes)
        except REDIS_AWAY as exc:  # (lost_replies)
            if never_sent(exc):
                await self._unmark(marker)
                raise
            gone = await landed(lambda: negated(self._recorded(file_id)))
            if not gone:  # (its mark stays: a delete still on its way may land later; the sweep looks)
                raise MaybeMade(f"Redis did not answer in time: file '{file_id}' may have been deleted; look "
                                f"(GET /files/{file_id}) before deleting it again", RETRY) from exc  # fmt: skip
            reply = ["ok"]
        if reply[0] == "in_use":
            await self._unmark(marker)
            raise Conflict(f"file '{file_id}' is the data set of {await self._users_text(reply[1:], caller)}: "
                           "delete it once they end")  # fmt: skip
        removed = await self._remove(meta.path)
        if removed:
            await self._unmark(marker)
        if reply[0] == "gone":  # a concurrent delete won, or this one's script ran twice: the file is no one's
            raise _not_found(file_id)

    async def _remove(self, path: str) -> bool:
        """The file of a record deleted: False, and left to the orphan sweep (its mark stays), when it cannot be
        removed now (a read-only mount): the delete is done all the same, not a 500."""
        try:
            await asyncio.to_thread(Path(path).unlink, missing_ok=True)
        except OSError as exc:
            logger.warning("upload file {} not removed ({}): the orphan sweep tries again", path, exc.strerror)
            return False
        return True

    async def _users_text(self, users: list[str], caller: Caller) -> str:
        """The active jobs using a file, as the caller may see them: their own by id, others' only counted (an
        admin may train on a user's upload; its id is as hidden here as anywhere else)."""
        looked = users[:USERS_NAMED_MAX]
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id in looked:
                pipe.hget(self.keys.job(job_id), "owner")
            owners = await pipe.execute()
        seen = [j for j, o in zip(looked, owners, strict=True) if caller.owns(json.loads(o) if o else None)]
        # (an admin sees every job, but only theirs are "your" jobs)
        mine = [j for j, o in zip(looked, owners, strict=True) if (json.loads(o) if o else None) == caller.name]
        theirs = [j for j in seen if j not in mine]
        parts = []
        for jobs, whose in ((mine, "your active job(s)"), (theirs, "the active job(s) of other owners")):
            if jobs:
                more = f" and {len(jobs) - 5} more" if len(jobs) > 5 else ""
                parts.append(f"{whose} {', '.join(jobs[:5])}{more} (stop them to delete it now)")
        if others := len(looked) - len(seen):
            parts.append(f"{others} active job(s) of other owners")
        if len(users) > len(looked):
            parts.append(f"{len(users) - len(looked)} more active job(s)")
        return " and ".join(parts)

    # ---- orphans --------------------------------------------------------------------------------------------

    async def sweep_orphans(self, min_age: float = ORPHAN_AGE, limit: int = 1000) -> list[Path]:
        """Remove what uploads that never got their record left on disk (a crash mid-upload, or between the write
        and the record), once `min_age` seconds old; the scheduler's watchdog calls this now and then.

        Only this deployment's uploads are looked at (`Keys.uploads_writing`): a sweep of every file in the
        uploads folders without a record under this REDIS_KEY_PREFIX deleted the uploads of another deployment
        sharing the data root (its records live under its own prefix), and failed its jobs."""
        markers = await self.r.zrangebyscore(self.keys.uploads_writing, "-inf", clock.now() - min_age, start=0,
                                             num=limit)  # fmt: skip
        if not markers:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for marker in markers:
                pipe.exists(self.keys.file(Path(marker).name))
            recorded = await pipe.execute()
        removed: list[Path] = []
        for marker, has_record in zip(markers, recorded, strict=True):
            if not has_record:
                gone, settled = await asyncio.to_thread(self._leftovers_of, Path(marker), min_age)
                removed += gone
                if not settled:
                    # Still being written, its folder unreadable now, or a file that cannot be removed: looked at
                    # again in `min_age`, behind the others (a thousand such marks held back every newer one).
                    await self.r.zadd(self.keys.uploads_writing, {marker: clock.now()}, xx=True)
                    continue
            await self.r.zrem(self.keys.uploads_writing, marker)
        if removed:
            logger.info("removed {} upload file(s) without a record: {}", len(removed),
                        ", ".join(p.name for p in removed[:10]))  # fmt: skip
        return removed

    def _leftovers_of(self, marker: Path, min_age: float) -> tuple[list[Path], bool]:
        """Remove the files of one upload that has no record, its temp file or its stored name, unless one was
        written within `min_age` seconds (an upload that lasts longer, still sending); whether it is settled
        (blocking). The mark's folder is resolved first: a mark leads nowhere outside the uploads folders."""
        file_id, folder = marker.name, Path(os.path.realpath(marker.parent))
        if not FILE_REF.match(file_id) or self._uploads_root(folder / file_id) is None:
            return [], True  # (not a mark this server writes)
        try:
            names = (f"{file_id}.", f".{file_id}.")
            with os.scandir(folder) as entries:
                found = [(e.path, e.stat(follow_symlinks=False).st_mtime) for e in entries
                         if e.name.startswith(names) and e.is_file(follow_symlinks=False)]  # fmt: skip
        except OSError:
            return [], False
        if any(time.time() - mtime < min_age for _, mtime in found):  # (this host's clock, as the file's)
            return [], False
        removed, settled = [], True
        for path, _ in found:
            try:
                os.unlink(path)
                removed.append(Path(path))
            except FileNotFoundError:
                pass
            except OSError as exc:  # (EACCES, EROFS: the mark stays, and the sweep goes on to the next one)
                logger.warning("upload file {} has no record but cannot be removed ({}): remove it by hand", path,
                               exc.strerror)  # fmt: skip
                settled = False
        return removed, settled
