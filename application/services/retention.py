"""Retention: the records of jobs that ended more than JOB_RETENTION_DAYS ago are deleted, oldest first (their
files stay). Run by the leading scheduler's watchdog."""

from __future__ import annotations

import time
from dataclasses import dataclass

from loguru import logger
from redis.exceptions import ResponseError

from application.config import Settings
from application.models.training_model import ExportStatus
from application.services import clock
from application.services.cluster_store import ClusterStore
from application.services.exports import as_they_stand, settle
from application.services.files import FileStore
from application.services.job_store import JobStore, Refusal, TransitionRefused

# A job kept for its running quantized export is looked at again after this (or the retention, if shorter): less
# than its export's end renews it by, which only moves a job's time on.
RECHECK_SECONDS = 3600.0

# How long one sweep may go on deleting while whole batches go (the watchdog's sweep waits for it).
BUDGET_SECONDS = 1.0


@dataclass(frozen=True)
class Retention:
    settings: Settings
    store: JobStore
    cluster: ClusterStore
    files: FileStore

    async def _expire_unreadable(self, job_id: str) -> bool:
        """Delete an expired record no model reads; whether it went. One the delete cannot take either leaves
        retention's index (a warning names the key to delete by hand), unless that may change by the next sweep."""
        try:
            await self.store.delete(job_id, ended_only=True)
            return True
        except (TransitionRefused, ResponseError) as why:  # (a field the script cannot decode either)
            refusal = why.reason if isinstance(why, TransitionRefused) else None
            if refusal == Refusal.MISSING and await self.store.forget_lost(job_id):
                return False  # (gone meanwhile; not one without a created_at, which the delete takes for gone)
            if refusal == Refusal.EXPORT_STATE or str(why).startswith(("BUSY", "OOM", "LOADING")):
                return False  # exporting right now, or Redis unable for a moment: the next sweep sees it again
            logger.warning("job {}: its record cannot be deleted either ({}): left to an operator (DEL {})", job_id,
                           why, self.store.keys.job(job_id))  # fmt: skip
            await self.store.unexpire(job_id)
            return False

    async def expire_old_jobs(self, batch: int = 100, budget: float = BUDGET_SECONDS) -> list[str]:
        """Delete the records of jobs that ended more than JOB_RETENTION_DAYS ago (their files stay): a batch, and
        more while a whole one went, for up to `budget` seconds. A batch a sweep (a minute) took 17 h over a backlog
        of 100,000 (retention turned on or lowered), its records in Redis's memory meanwhile (hunt CD)."""
        days = self.settings.JOB_RETENTION_DAYS
        if days <= 0:
            return []
        removed: list[str] = []
        deadline = time.monotonic() + budget
        while True:
            went, read = await self._expire_batch(days, batch)
            removed += went
            # (read, not removed: records lost, kept for an export or resumed, come in the backlogs too: review CF)
            if read < batch or not went or time.monotonic() >= deadline:
                break
        if removed:
            more = f" and {len(removed) - 20} more" if len(removed) > 20 else ""
            logger.info("removed {} job record(s) older than {} days: {}{}", len(removed), days,
                        ", ".join(removed[:20]), more)  # fmt: skip
        return removed

    async def _expire_batch(self, days: float, batch: int) -> tuple[list[str], int]:
        """(the records removed, how many expired ones were read)."""
        removed = []
        expired = await self.store.expired(clock.now() - days * 86400, batch)
        for job_id in expired:
            # The oldest first, every sweep: one left in place for good (a record gone, one no model reads) held
            # back every job behind it, and the sweep of orphaned uploads after it.
            try:
                job = await self.store.get(job_id)
            except ValueError as exc:  # (pydantic's ValidationError): its status is read by the script alone
                logger.warning("job {}: its record cannot be read ({}); removing it as retention would", job_id, exc)
                if await self._expire_unreadable(job_id):
                    removed.append(job_id)
                continue
            if job is None:
                await self.store.forget_lost(job_id)  # (its expiry entry, and whatever else it left)
                continue
            if not job.status.is_terminal():
                continue  # resumed since (it leaves the expiry set)
            if any(e.job_id and e.status == ExportStatus.RUNNING for e in await as_they_stand(self.store, job)):
                # Its quantized export's job has not ended (whose end keeps it the retention more): out of the
                # oldest the sweep reads until then, or a hundred such (paused exports) held back every job behind.
                await self.store.keep_until(job_id, clock.now() - days * 86400 + min(days * 86400, RECHECK_SECONDS))
                continue
            try:
                await settle(self.store, job)
                # (only the job read, still ended: not one created since under its id, nor one resumed since)
                await self.store.delete(job_id, self.files.uploads_of(job), created_at=job.created_at,
                                        ended_only=True)  # fmt: skip
                await self.cluster.release_export_targets(job)
                removed.append(job_id)
            except TransitionRefused:
                continue  # exporting right now, resumed or gone meanwhile: the next sweep sees it again
        return removed, len(expired)
