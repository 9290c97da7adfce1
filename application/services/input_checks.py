"""A job's local inputs checked again just before swift reads them (a run, an export). They were sandboxed at
the create; a symlink made since (on a path's way, or inside a model or data folder) must not have swift read
what lies outside DATA_ROOTS and MODEL_ROOTS, the server's own files, or another owner's job folders and uploads
when the create kept them out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from application.auth import USER, Caller
from application.config import Settings
from application.models.training_model import Job
from application.services.files import UPLOADS_DIR, FileStore
from application.services.job_store import JobStore
from application.services.path_sandbox import Guard, all_of, real_output_root, relinked_folder, relinked_input
from application.services.preflight import own_files
from application.services.swift_arguments import DATA_ARGUMENTS, MODEL_ARGUMENTS


def local_inputs(job: Job, models_only: bool = False) -> list[tuple[str, str, bool]]:
    """The job's local inputs as stored (field, value, whether a data set); hub ids are not paths."""
    arguments = job.training.model_dump()
    found = [("data_path", job.data_path, True), ("model_path", job.model_path, False)]
    for name in sorted(DATA_ARGUMENTS | MODEL_ARGUMENTS):
        value = arguments.get(name)
        found += [(name, v, name in DATA_ARGUMENTS) for v in (value if isinstance(value, list) else [value])
                  if isinstance(v, str)]  # fmt: skip
    return [f for f in found if not (models_only and f[2])]


@dataclass(frozen=True)
class InputGuards:
    """Where a job's inputs may lead, and what its create kept them from."""

    settings: Settings
    store: JobStore
    files: FileStore

    @classmethod
    def of(cls, settings: Settings, store: JobStore) -> InputGuards:
        return cls(settings, store, FileStore(settings, store.r, store.keys))

    @property
    def roots(self) -> tuple[tuple[Path, ...], tuple[Path, ...], tuple[Path, ...], Guard]:
        """DATA_ROOTS, MODEL_ROOTS, the areas of those whose files are their owners', the server's own files."""
        data = self.settings.data_roots()
        owned = (self.settings.OUTPUT_ROOT, *(r / UPLOADS_DIR for r in data))
        return data, self.settings.model_roots(), owned, own_files(self.settings)

    async def of_job(self, job: Job) -> Guard | None:
        """What the job's create kept its paths from: the server's files; another owner's job folders and uploads
        for a user's job (an admin's may use anyone's)."""
        own = own_files(self.settings)
        if not job.owner_checked or job.owner is None:
            return own
        owner = Caller(job.owner, USER)
        root = real_output_root(self.settings.OUTPUT_ROOT)
        return all_of(own, await self.store.folders.guard(root, owner, indexed=True), self.files.upload_guard(owner))

    async def moved(self, job: Job | None, models_only: bool = False) -> str | None:
        """`inputs_moved` for the job (`models_only`: an export, which reads no data set), in a worker thread."""
        if job is None:
            return None
        guard = await self.of_job(job)
        return await asyncio.to_thread(inputs_moved, local_inputs(job, models_only), self.roots, guard)


def inputs_moved(inputs: list[tuple[str, str, bool]],
                 roots: tuple[tuple[Path, ...], tuple[Path, ...], tuple[Path, ...], Guard],
                 guard: Guard | None) -> str | None:  # fmt: skip
    """Why one of the inputs now leads where its create would not have let it (None when none does). Blocking:
    in a worker thread (`guard` may read Redis through the event loop)."""
    return relinked_input(inputs, *roots) or relinked_folder(inputs, roots[0], roots[1], guard)
