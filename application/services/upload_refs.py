"""How jobs name uploaded files: which data set paths are uploads, whose, and the jobs recorded as their users.

`FileStore` extends this class (callers use it); paths only here, no disk, except where a docstring says so.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from application.auth import Caller
from application.config import UPLOADS_DIR, Settings
from application.exceptions import Invalid
from application.models.file_model import FILE_ID_PATTERN, FileObject
from application.models.training_model import Job, JobStatus
from application.services.index_pages import advance_mark, walk_from
from application.services.job_store import JobStore
from application.services.keys import Keys
from application.services.path_sandbox import Guard, without_sample
from application.services.swift_arguments import DATA_ARGUMENTS

FILE_REF = re.compile(FILE_ID_PATTERN)
ANONYMOUS_FOLDER = "_"
_SAMPLE_SUFFIX = re.compile(r"#\d+$")  # data_path's "#N rows" as the sandbox keeps it
_STORED_NAME = re.compile(r"^(file-[0-9a-f]{24})\.")  # an upload's name on disk: its id and suffix
_SAFE_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# A job in one of these may still read its data set: its files cannot be deleted.
ACTIVE_STATUSES = (JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)


def owner_folder(owner: str | None) -> str:
    """The owner's folder (and index) name: the key's name when it is a safe folder name, `_` without keys.

    Key names allow '.', '..' and a leading '_'; those become `_` + a digest, which no plain name or the
    anonymous `_` can equal."""
    if owner is None:
        return ANONYMOUS_FOLDER
    if _SAFE_FOLDER.match(owner):
        return owner
    return "_" + hashlib.sha256(owner.encode()).hexdigest()[:16]


class UploadRefs:
    settings: Settings
    r: Any
    keys: Keys
    _load: Callable[[str], Awaitable[FileObject | None]]

    @functools.cached_property
    def real_roots(self) -> tuple[Path, ...]:
        """Every DATA_ROOTS entry's uploads folder, as the path sandbox resolves data paths (resolved once: creates
        compare with them). New uploads go to the first; those made while another root came first stay uploads,
        their owner's and kept while a job uses them."""
        return tuple(dict.fromkeys(Path(os.path.realpath(r / UPLOADS_DIR)) for r in self.settings.data_roots()))

    def _uploads_root(self, path: Path) -> Path | None:
        return next((root for root in self.real_roots if root in path.parents), None)

    async def backfill_users(self, jobs: JobStore) -> int:
        """Record the active jobs stored by a version whose creates did not record their uploads as those files'
        users, so that deleting one is refused while they may read it (at a scheduler's start; idempotent)."""
        # Only those created since the last start looked (a day before: other hosts' clocks): this version's creates
        # record their uploads, so only a downgrade's jobs can lack it (reading every active job held a new leader's
        # first pass back 1.7-2.6 s at 20,000 queued: hunt DX).
        mark = await self.r.get(self.keys.upload_users_scanned)
        created = await jobs.created_times(*ACTIVE_STATUSES, created_after=walk_from(mark))
        ids = list(created)
        rows = await jobs.get_fields(ids, ["data_path", "training", "created_at"])
        newest = max(created.values(), default=None)
        recorded = 0
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id, (data_path, training, created_at) in zip(ids, rows, strict=True):
                used = _data_values(json.loads(data_path) if data_path else None, json.loads(training or "null"))
                for file_id in self._upload_ids(used):
                    # The member the create script writes: the id and its creation time as stored (JSON).
                    pipe.sadd(self.keys.file_users(file_id), f"{job_id}|{created_at}")
                    recorded += 1
            await pipe.execute()
        await advance_mark(self.r, self.keys.upload_users_scanned, mark, newest)
        return recorded

    def uploads_of(self, job: Job) -> list[str]:
        """The ids of the uploads `job` reads (paths only, no disk). A quantized export's job reads its parent's
        data set only to calibrate (awq, gptq: its command's --dataset); bnb and fp8 read none, and their resume
        was refused once the parent's upload was deleted."""
        if job.kind == "export":
            argv = job.export_argv or []
            return self._upload_ids(argv[i + 1 : i + 2] if (i := _index(argv, "--dataset")) is not None else [])
        return self._upload_ids(_data_values(job.data_path, job.training.model_dump()))

    async def gone_uploads(self, job: Job) -> list[str]:
        """The uploads `job` trains on that have been deleted (allowed while it was not active): a resume must
        not queue a run that cannot read its data."""
        ids = self.uploads_of(job)
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for file_id in ids:
                pipe.exists(self.keys.file(file_id))
            there = await pipe.execute()
        return [file_id for file_id, n in zip(ids, there, strict=True) if not n]

    def _upload_ids(self, values: Iterable[str]) -> list[str]:
        """The ids of the uploads these data set paths name (paths only, no disk)."""
        found: list[str] = []
        for value in values:
            path = Path(_SAMPLE_SUFFIX.sub("", value))
            stored = _STORED_NAME.match(path.name) if path.is_absolute() and self._uploads_root(path) else None
            if stored and stored.group(1) not in found:
                found.append(stored.group(1))
        return found

    def uploads_named(self, values: Iterable[str], caller: Caller) -> list[str]:
        """The ids of the uploads these (sandbox-resolved) data set paths name, for the store to record the job
        as their user. Invalid when one lies in another owner's uploads folder: uploads sit inside DATA_ROOTS, and
        a user key must not train on what someone else uploaded. Paths only, no disk."""
        values = list(values)
        for value in values:
            path = Path(_SAMPLE_SUFFIX.sub("", value))
            if not path.is_absolute():
                continue
            if not caller.is_admin:
                self._refuse_foreign(value, path, caller)
            self._refuse_upload_folder(value, path)
        return self._upload_ids(values)

    def _refuse_upload_folder(self, named: str, path: Path) -> None:
        """Inside an uploads folder only an upload itself may be named (anyone's, an admin's too): swift reads
        every file of a folder, and none of them would be recorded as the job's, so each could be deleted under it."""
        root = self._uploads_root(path) or (path if path in self.real_roots else None)
        if root is None:
            return
        inside = path.relative_to(root).parts
        if len(inside) != 2 or not _STORED_NAME.match(inside[1]):
            raise Invalid(f"{named} lies in the uploads folder but is not an upload: name each uploaded file by its "
                          "id (file-...), so that the job is recorded as using it")  # fmt: skip

    def upload_guard(self, caller: Caller) -> Guard | None:
        """For the path sandbox (`preflight.check_request`): refuses a path in another owner's uploads folder
        before anything looks at whether it exists or reads it, so that the answer tells nothing of their files."""
        if caller.is_admin:
            return None

        def guard(field: str, value: str, real: Path) -> None:
            self._refuse_foreign(f"{field} '{value}'", real, caller)

        return guard

    def _refuse_foreign(self, named: str, path: Path, caller: Caller) -> None:
        root = self._uploads_root(path)
        if root is not None and path.relative_to(root).parts[0] != owner_folder(caller.name):
            raise Invalid(f"{named}: another owner's upload cannot be used: upload your own with POST /files")
        if any(path == r or path in r.parents for r in self.real_roots):  # a folder: swift would read every file
            raise Invalid(f"{named} holds the uploads of every owner: name your own upload (its file id) or a "
                          "file or folder inside DATA_ROOTS that holds none")  # fmt: skip

    async def with_upload_paths(
        self, data_path: str, extra: dict[str, Any], caller: Caller
    ) -> tuple[str, dict[str, Any]]:
        """A create's data_path and extra training arguments with the uploaded files they name (`file-<id>`) as
        their stored paths (a file this caller may not use is refused)."""
        data_path = await self.resolve_file_ref(data_path, caller) or data_path
        for name in DATA_ARGUMENTS:
            value = extra.get(name)
            if value is None:
                continue
            items = value if isinstance(value, list) else [value]
            resolved = [await self.resolve_file_ref(v, caller, f"training.{name}") or v if isinstance(v, str) else v
                        for v in items]  # fmt: skip
            extra[name] = resolved if isinstance(value, list) else resolved[0]
        return data_path, extra

    async def resolve_file_ref(self, value: str, caller: Caller, field: str = "data_path") -> str | None:
        """The stored path of an uploaded file named by its id, for a job's data set fields.

        None when `value` is not a file id (exactly `file-` and 24 hex digits): the caller goes on with it as a
        path or hub id. Invalid (422) when it is one the caller may not use (missing, or another owner's: the
        same answer) or whose file is gone from disk. Meant to run before the path sandbox, per field::

            path = await files.resolve_file_ref(req.data_path, caller)
            data_path = path or req.data_path
            val = req.training.val_dataset  # and each item of a list
            if val is not None:
                val = await files.resolve_file_ref(val, caller, "training.val_dataset") or val
        """
        # A file id takes `#N` (N rows sampled), as a path does (it was refused as neither path nor hub id: hunt DD).
        sample = value[len(without_sample(value)) :]
        value = value[: len(value) - len(sample)]
        if not FILE_REF.match(value):
            return None
        meta = await self._load(value)
        if meta is None or not caller.owns(meta.owner):
            raise Invalid(f"{field} {value}: no such file — upload it with POST /files")
        if not await asyncio.to_thread(Path(meta.path).is_file):
            raise Invalid(f"{field} {value}: its file is gone from the server — upload it again with POST /files")
        return meta.path + sample


def _index(argv: list[str], flag: str) -> int | None:
    return argv.index(flag) if flag in argv else None


def _data_values(data_path: str | None, training: Any) -> list[str]:
    """Every text a job's data set fields may name an upload by: data_path and its training arguments' values."""
    values: list[Any] = [data_path]
    for value in training.values() if isinstance(training, dict) else ():
        values.extend(value if isinstance(value, list) else [value])
    return [v for v in values if isinstance(v, str)]
