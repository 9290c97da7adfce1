"""A job's local inputs checked again just before swift reads them (a run, an export). They were sandboxed at
the create; a symlink made since (on a path's way, or inside a model or data folder) must not have swift read
what lies outside DATA_ROOTS and MODEL_ROOTS, the server's own files, or another owner's job folders and uploads
when the create kept them out."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from application.auth import USER, Caller
from application.config import Settings
from application.exceptions import Invalid, Unavailable
from application.models.training_model import Job
from application.services import clock
from application.services.files import UPLOADS_DIR, FileStore
from application.services.job_store import JobStore
from application.services.media_refs import check_media, media_columns
from application.services.path_sandbox import (
    Guard,
    all_of,
    real_output_root,
    relinked_folder,
    relinked_input,
    without_sample,
)
from application.services.preflight import own_files
from application.services.swift_arguments import DATA_ARGUMENTS, MODEL_ARGUMENTS

# A data file's modification time is the file system's clock, the create's this server's: a file written this
# little before the create is read again too.
CLOCK_SLACK = 2.0


def local_inputs(job: Job, base_model: bool = False) -> list[tuple[str, str, bool]]:
    """The job's local inputs as stored (field, value, whether a data set); hub ids are not paths. `base_model`:
    only the model an export of its checkpoints loads (swift export takes it from the checkpoint's args.json)."""
    if base_model:
        return [("model_path", job.model_path, False)]
    arguments = job.training.model_dump()
    found = [("data_path", job.data_path, True), ("model_path", job.model_path, False)]
    for name in sorted(DATA_ARGUMENTS | MODEL_ARGUMENTS):
        value = arguments.get(name)
        found += [(name, v, name in DATA_ARGUMENTS) for v in (value if isinstance(value, list) else [value])
                  if isinstance(v, str)]  # fmt: skip
    return found


@dataclass(frozen=True)
class InputGuards:
    """Where a job's inputs may lead, and what its create kept them from."""

    settings: Settings
    store: JobStore
    files: FileStore

    @classmethod
    def of(cls, settings: Settings, store: JobStore) -> InputGuards:
        return cls(settings, store, FileStore(settings, store.r, store.keys))

    @functools.cached_property
    def roots(self) -> tuple[tuple[Path, ...], tuple[Path, ...], tuple[Path, ...], Guard]:
        """DATA_ROOTS, MODEL_ROOTS, the areas of those whose files are their owners', the server's own files."""
        data = self.settings.data_roots()
        owned = (self.settings.OUTPUT_ROOT, *(r / UPLOADS_DIR for r in data))
        return data, self.settings.model_roots(), owned, own_files(self.settings)

    async def of_job(self, job: Job) -> Guard | None:
        """What the job's create kept its paths from: the server's files; another owner's job folders and uploads
        for a user's job (an admin's may use anyone's)."""
        own = self.roots[3]
        if not job.owner_checked or job.owner is None:
            return own
        owner = Caller(job.owner, USER)
        root = real_output_root(self.settings.OUTPUT_ROOT)
        return all_of(own, await self.store.folders.guard(root, owner, indexed=True), self.files.upload_guard(owner))

    async def moved(self, job: Job | None, base_model: bool = False) -> str | None:
        """`inputs_moved` for the job (`base_model`: an export of its checkpoint), in a worker thread; a link
        whose folder's owner Redis did not tell in time is a reason too (try again)."""
        if job is None:
            return None
        guard = await self.of_job(job)
        try:
            return await asyncio.to_thread(inputs_moved, local_inputs(job, base_model), self.roots, guard)
        except Unavailable as exc:
            return f"the links in the job's model folder could not be checked: {exc.detail}"

    async def folders_moved(self, job: Job, inputs: list[tuple[str, str, bool]], guard: Guard | None) -> str | None:
        """`relinked_folder`, then `remedia` of the data files changed since the job's create, in a worker thread.
        Unavailable when whose folder a path leads into could not be read in time: a run does not start
        unchecked, nor fails for a slow Redis (its job waits for the next pass)."""
        data, models, _, _ = self.roots
        columns = media_columns(job.training.model_dump())
        # The create's time on this host's clock, which file times are on: on Redis's (the create's), a file
        # changed after the create looked older than it when Redis's clock ran ahead (hunt BH: 90 s).
        since = job.created_at - (clock.now() - time.time())

        def check() -> str | None:
            return relinked_folder(inputs, data, models, guard) or remedia(inputs, data, guard, columns, since)

        return await asyncio.to_thread(check)

    async def of_run(self, job: Job) -> tuple[list[tuple[str, str, bool]], Guard | None]:
        """What a run of the job reads, and the guard to check it with. A quantized export's job reads its parent's
        checkpoint, the data set to calibrate on and the base model the checkpoint's args.json names, its parent's
        files under its parent's create's guards."""
        parent = None
        if job.kind == "export" and job.export_of:
            with contextlib.suppress(ValueError):  # (a record that cannot be read: as a parent deleted meanwhile)
                parent = await self.store.get(job.export_of)
        if parent is None:
            return local_inputs(job), await self.of_job(job)
        return [*local_inputs(job), *local_inputs(parent, base_model=True)], await self.of_job(parent)


def inputs_moved(inputs: list[tuple[str, str, bool]],
                 roots: tuple[tuple[Path, ...], tuple[Path, ...], tuple[Path, ...], Guard],
                 guard: Guard | None) -> str | None:  # fmt: skip
    """Why one of the inputs now leads where its create would not have let it (None when none does). Blocking:
    in a worker thread (`guard` may read Redis through the event loop)."""
    return relinked_input(inputs, *roots) or relinked_folder(inputs, roots[0], roots[1], guard)


def remedia(inputs: list[tuple[str, str, bool]], roots: tuple[Path, ...], guard: Guard | None,
            columns: tuple[str, ...], since: float) -> str | None:  # fmt: skip
    """Why a data file changed since `since` (its job's create, on this host's clock) now names media its create
    would have refused (a path out of DATA_ROOTS, another owner's upload): swift opens what a row names. Only a
    changed file is read again (a scan costs what the create's did). Its inode's change time counts too: its
    writer can set its modification time back (`touch -d`), not that. Blocking."""
    for field, value, data in inputs:
        path = without_sample(value)
        if not data or not os.path.isabs(path):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue  # gone: swift says so, as it would have before
        if not stat.S_ISREG(st.st_mode) or max(st.st_mtime, st.st_ctime) < since - CLOCK_SLACK:
            continue
        try:
            check_media(field, Path(path), roots, guard, columns)
        except Invalid as exc:
            return f"{field} {path} changed since the job was created: {exc.detail}"
    return None
