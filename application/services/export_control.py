"""Exports asked for over the API: a merge of a chosen checkpoint on the CPU (run by a runner the watchdog
launches), or a quantized export queued as a GPU job of its own (services/quant_exports.py); and the list of a
job's exports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path
from typing import Any

from application.auth import Caller
from application.exceptions import Conflict, Unavailable, refused
from application.models.job_request import ExportRequest
from application.models.job_responses import ActionResponse
from application.models.training_model import ExportInfo, ExportStatus, Job
from application.services import clock
from application.services.exports import ENDED_WITH_SWIFT, as_export, as_they_stand, prepare_export, put_export
from application.services.idempotency import claim_lost
from application.services.job_store import Claim, Refusal, TransitionRefused
from application.services.lost_replies import created_anyway
from application.services.quant_exports import (
    CALIBRATED,
    check_quantization,
    prepare_quant_job,
    wants_quantization,
)
from application.services.redis_service import REDIS_AWAY
from application.services.swift_arguments import require_usable_swift
from application.services.training_service import TrainingService
from application.utils.gpu_types import snapshot_of

# How long one export request may hold its job's exports (a stalled one loses them after), and how long another
# waits for them.
REQUEST_TTL = 30.0
REQUEST_WAIT = 10.0


class ExportControl:
    def __init__(self, service: TrainingService) -> None:
        self.service = service
        self.store = service.store
        self.cluster = service.cluster

    async def export(self, job_id: str, caller: Caller, request: ExportRequest | None = None,
                     claim: Claim | None = None) -> ActionResponse:  # fmt: skip
        """Prepare the export and ask for it; the scheduler's watchdog launches its runner (a quantized export
        is queued as a GPU job of its own instead: services/quant_exports.py). `claim`: the request's
        Idempotency-Key claim, which must still hold when a quantized export's job is stored."""
        await self.service.require(job_id, caller)
        # One request of a job at a time, from reading its exports to recording the new one: a merge and a
        # quantized export asked for at once into one output_name both saw it free, and both were accepted.
        async with self.cluster.holding(self.store.keys.export_request(job_id), REQUEST_TTL, REQUEST_WAIT) as held:
            if not held:  # (a 503: an Idempotency-Key is released for the retry, not bound to this answer)
                raise Unavailable(f"another export request of job '{job_id}' is being handled: retry in a moment",
                                  {"Retry-After": "5"})  # fmt: skip
            job = await self.service.require(job_id, caller)
            if request is not None and wants_quantization(request):
                return await self._quantize(job, request, caller, claim)
            return await self._merge(job, request, caller, claim)

    async def _merge(self, job: Job, request: ExportRequest | None, caller: Caller,
                     claim: Claim | None) -> ActionResponse:  # fmt: skip
        job_id = job.job_id
        # Its quantized exports as their jobs stand: the name of one that failed is free again.
        job = job.model_copy(update={"exports": await as_they_stand(self.store, job)})
        info = await asyncio.to_thread(prepare_export, job, self.service.settings, auto=False, request=request)
        if info.output_dir is not None:
            await self._claim(info.output_dir, {"of": job_id, "export": info.export_id})
        try:
            await put_export(
                self.store, job_id, info, statuses=ENDED_WITH_SWIFT, created_at=job.created_at,
                refuse_export=(ExportStatus.RUNNING,), actor=caller.actor, exporting=True, claim=claim,
                event=("export_started", f"export of {info.checkpoint} requested",
                       {"checkpoint": info.checkpoint, "auto": False}),
            )  # fmt: skip
        except TransitionRefused as exc:
            if exc.reason == Refusal.EXPORT_STATE:
                raise Conflict(f"an export of job '{job_id}' is already running: wait for it to end") from None
            if exc.reason == Refusal.CLAIM_LOST:  # (a worker stalled past its lease: a retry exported meanwhile)
                raise claim_lost() from None
            raise refused(job_id, exc, "job '{id}' is {status}: it cannot export now") from None
        # The leading scheduler's watchdog launches it: with none, it waits (as a queued job does, and says so).
        try:
            await self.cluster.publish_wakeup(f"export:{job_id}")
            leading: bool | None = await self.cluster.leader() is not None
        except REDIS_AWAY:  # recorded: a 503 "try again" would be refused (running)
            leading = None
        cap = self.service.settings.MAX_RUNNING_PER_OWNER
        # (the watchdog holds an owner's exports past the cap back: this one may wait, which its events say)
        started = f"Export of {info.checkpoint} started" if not (cap and job.owner) else \
            f"Export of {info.checkpoint} requested: it starts now, or once fewer than {cap} of '{job.owner}''s " \
            "exports run (MAX_RUNNING_PER_OWNER)"  # fmt: skip
        message = started if leading else \
            f"Export of {info.checkpoint} requested: no scheduler is running, it starts when one leads " \
            "(python start.py scheduler)" if leading is False else \
            f"Export of {info.checkpoint} requested: Redis went away as it was recorded; it starts once Redis " \
            "answers again"  # fmt: skip
        return ActionResponse(job_id=job_id, status=job.status, export=info, message=message)

    async def _quantize(self, job: Job, request: ExportRequest, caller: Caller,
                        claim: Claim | None) -> ActionResponse:  # fmt: skip
        published, meta = await self.cluster.published()
        require_usable_swift(meta)
        check_quantization(request, await self.service.swift_info(meta), len(snapshot_of(published).gpus))
        # An id no record of this job's exports names (a deleted export job's record must not take a new one's).
        named = {e.job_id for e in (*job.exports, job.export) if e.job_id}
        # Its quantized exports as their jobs stand: one whose job was deleted before it ran holds no name.
        job = job.model_copy(update={"exports": await as_they_stand(self.store, job)})
        before: dict[str, str | None] = {}  # by folder: the claim there before this request's first one
        for attempt in range(1, 20):
            # Past the first few, a random one: another owner could take <id>-quant-2 ... -99 (their own jobs'
            # ids, any name), and no export of this job could be queued any more.
            suffix = "" if attempt == 1 else f"-{attempt}" if attempt < 10 else f"-{secrets.token_hex(4)}"
            child_id = f"{job.job_id}-quant{suffix}"
            if child_id in named:
                continue
            settings = self.service.settings
            child, info = await asyncio.to_thread(prepare_quant_job, job, request, settings.SWIFT_BIN,
                                                  settings.OUTPUT_ROOT, child_id, clock.now())  # fmt: skip
            replaced, claimed = await self._claim(str(info.output_dir), {"of": job.job_id, "job": child_id})
            before.setdefault(str(info.output_dir), replaced)
            try:
                # A job of its own: the owner's queue cap and the uploads it reads count as for any job.
                message = f"quantized export of {info.checkpoint} (job '{job.job_id}') queued"
                # Only awq and gptq read the data set (they calibrate on it): only they hold its upload.
                reads = [child.data_path] if request.quant_method in CALIBRATED else []
                try:
                    await self.store.create(child, actor=caller.actor, max_waiting=self.service.limits.max_waiting,
                                            uploads=self.service.files.uploads_named(reads, caller),
                                            message=message, claim=claim)  # fmt: skip
                except REDIS_AWAY as exc:  # (it may have been stored all the same: looked for, then listed)
                    await created_anyway(self.store, child, exc)
                break
            except TransitionRefused as exc:
                if exc.reason != Refusal.EXISTS:  # refused: the folder's claim as it was (each one stayed for good)
                    await self.cluster.claim_export_target(str(info.output_dir), claimed,
                                                           before[str(info.output_dir)] or "")  # fmt: skip
                if exc.reason == Refusal.WAITING_CAP:  # (the owner's cap: not an admin's who asked)
                    raise self.service.limits.over_cap(job.owner, int(exc.detail or 0)) from None
                if exc.reason == Refusal.UPLOAD_GONE:
                    raise Conflict(f"{request.quant_method} calibrates on the job's data set, and its uploaded file "
                                   f"'{exc.detail}' has been deleted: quantize with bnb or fp8, which need no "
                                   "data") from None  # fmt: skip
                if exc.reason == Refusal.OUTPUT_DIR_BUSY:
                    raise Conflict(f"an export into {info.output_dir} is already waiting or running") from None
                if exc.reason == Refusal.CLAIM_LOST:
                    raise claim_lost() from None
                if exc.reason != Refusal.EXISTS:
                    raise Conflict(f"the export job could not be stored ({exc.reason.value}): try again") from None
        else:
            raise Conflict(f"no free export job id from '{job.job_id}-quant' on was found: try again")
        try:
            await put_export(self.store, job.job_id, info, current=False, actor=caller.actor, created_at=job.created_at,
                             event=("export_started", f"quantized export of {info.checkpoint} queued as job "
                                    f"'{child_id}' (it needs a GPU)", {"job_id": child_id}))  # fmt: skip
        except TransitionRefused:
            pass  # deleted meanwhile: the export job runs anyway, and lists itself
        when = "it starts on a free GPU"
        with contextlib.suppress(*REDIS_AWAY):  # (recorded: a 503 "try again" would queue a second export)
            if stopped := await self.service.placement.processor_stopped():  # (nothing starts it on a free GPU)
                when = f"it waits: {stopped}"
        return ActionResponse(
            job_id=job.job_id,
            status=job.status,
            export=as_export(info, child, job.job_id),  # as GET .../exports shows it: with its job's status
            message=f"Quantized export queued as job '{child_id}': {when}",
        )

    async def _claim(self, target: str, writer: dict[str, Any]) -> tuple[str | None, str]:
        """`target` claimed for this export (`writer`: the job it exports, and its export id or its export job's
        id); (the claim it replaced, its own). Conflict while an export of another job writes it: jobs that share
        an output folder share its exports/, and each job's own checks see only its own exports. The next request
        takes a claim over once that export has ended (a refused request puts back the claim it replaced)."""
        value = json.dumps({**writer, "at": clock.now()})
        for _ in range(5):
            held = await self.cluster.export_target(target)
            holder = json.loads(held) if held is not None else None
            if holder is not None and holder["of"] != writer["of"] and await self._writing(holder):
                raise Conflict(f"an export of another job in this output folder is writing {Path(target).name}: wait "
                               "for it to end, or choose another output_name")  # fmt: skip
            if await self.cluster.claim_export_target(target, held, value):
                return held, value
        raise Unavailable("other export requests are claiming this folder: retry in a moment", {"Retry-After": "5"})

    async def _writing(self, held: dict[str, Any]) -> bool:
        """Whether the export that claimed a folder may still write it. One claimed moments ago may not be
        recorded yet (its request records it after claiming)."""
        young = clock.now() - float(held.get("at", 0)) < REQUEST_TTL
        if "job" in held:  # a quantized export: a job of its own, while it is not over
            child = await self.store.get(held["job"])
            if child is None or child.export_of != held["of"]:
                return young
            return not child.status.is_terminal()
        parent = await self.store.get(held["of"])
        if parent is None:
            return False
        if parent.export.export_id == held.get("export"):
            return parent.export.status == ExportStatus.RUNNING
        return young

    async def exports(self, job_id: str, caller: Caller) -> list[ExportInfo]:
        """Every export of the job, oldest first; a quantized one as its own job now stands."""
        job = await self.service.require(job_id, caller)
        current = [job.export] if job.export.status != ExportStatus.NONE else []
        return sorted([*await as_they_stand(self.store, job), *current], key=lambda e: e.started_at or 0.0)
