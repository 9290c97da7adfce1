"""Pause, resume and checkpoints: a job's runs after the first (Determined's preemption from checkpoints, OpenAI's
fine-tuning pause/resume). A pause is a flag the run's runner acts on like a stop; a resume puts the job back in
the queue at its place, and the scheduler's next start of it adds --resume_from_checkpoint (`queue_processor`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

from application.auth import Caller
from application.exceptions import Conflict, JobNotFound, refused
from application.models.job_responses import ActionResponse, CheckpointList
from application.models.training_model import Attempt, ExportStatus, Job, JobStatus
from application.services.checkpoints import describe_checkpoints, newest_checkpoint, weights_only
from application.services.exports import while_running
from application.services.gpu_pool import impossible
from application.services.input_checks import InputGuards
from application.services.job_start import START_WAIT_SECONDS
from application.services.job_store import Refusal, TransitionRefused
from application.services.owner_caps import beyond_gpu_cap
from application.services.placement import NOT_QUEUED
from application.services.redis_service import REDIS_AWAY
from application.services.run_end import checkpoint_step, honoured_ask
from application.services.training_service import STOP_EXTRA_SECONDS, TrainingService

STOP_TRIES = 5
POLL_SECONDS = 0.05  # while an action waits for the run to end


async def await_job(svc: TrainingService, job_id: str, done: Callable[[Job], bool], timeout: float,
                    seen: Job) -> Job:  # fmt: skip
    """The job once `done`, or as it stands at `timeout`, for the answer to a request recorded already: while
    Redis does not answer it is the last reading (`seen` before any), not a 503 "try again" whose retry would
    be refused (the request took effect)."""
    deadline = time.monotonic() + timeout
    job = seen
    while True:
        try:
            job = await svc.job(job_id)
        except REDIS_AWAY:
            pass
        if done(job) or time.monotonic() >= deadline:
            return job
        await asyncio.sleep(POLL_SECONDS)


def _attempt(job: Job, run_id: str | None) -> Attempt | None:
    return next((a for a in reversed(job.attempts) if a.run_id == run_id), None)


async def _rest_as_asked(svc: TrainingService, job: Job, caller: Caller) -> Job:
    """The job whose run ended as a stop or pause came and went back to the queue (a retry, a preemption), rested
    as asked (`honoured_ask`, as the scheduler's pass does), or as it is now when it changed meanwhile."""
    if job.status != JobStatus.QUEUED:
        return job
    checkpoint = job.stop_requested and await asyncio.to_thread(newest_checkpoint, job) is not None
    asked = honoured_ask(job, checkpoint)
    if asked is None:
        return job
    try:
        await svc.store.transition(job.job_id, asked.status, expect=(JobStatus.QUEUED,), fields=asked.fields,
                                   message=asked.message, actor=caller.actor, created_at=job.created_at,
                                   unchanged=asked.unchanged)  # fmt: skip
    except TransitionRefused:
        return await svc.require(job.job_id, caller)
    return job.model_copy(update={"status": asked.status, **asked.fields})


def _run_end(job: Job, run_id: str | None) -> str | None:
    """How run `run_id` ended (its attempt's outcome: stopped, paused, completed, failed, preempted, retried), or
    None while it runs; whatever the job did since (resumed, started again by someone). A record without that
    attempt ends by its status."""
    attempt = _attempt(job, run_id)
    if attempt is None:
        return None if job.status == JobStatus.RUNNING else job.status.value
    return (attempt.outcome or "ended") if attempt.finished_at is not None else None


def _since(job: Job, outcome: str) -> str:
    """What became of the job after its run ended `outcome`, when someone resumed it since: a run that went back
    to the queue by itself (preempted, retried) is queued or running again as the scheduler left it."""
    if outcome in ("preempted", "retried") or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return ""
    return f"; it has been resumed since: {job.status.value} now"


class RunControl:
    def __init__(self, service: TrainingService) -> None:
        self.service = service

    async def _ask_once(self, job: Job, flag: str, caller: Caller) -> None:
        """Set a running job's `stop_requested` or `pause_requested` with its event, once: a request asked again
        while the run ends, or many at the same moment, add no event (the flag must still be as read when it is
        written: of requests that race, one writes it)."""
        if getattr(job, flag):
            return
        store = self.service.store
        ((raw,),) = await store.get_fields([job.job_id], [flag])
        if raw == "true":
            return
        what = flag.removesuffix("_requested")
        try:
            await store.update(job.job_id, {flag: True}, statuses=(JobStatus.RUNNING,), unchanged={flag: raw},
                               event=(flag, f"{what} requested: SIGTERM to the process group", None),
                               actor=caller.actor, created_at=job.created_at)  # fmt: skip
        except TransitionRefused as exc:
            if exc.reason != Refusal.CHANGED:
                raise

    async def stop(self, job_id: str, caller: Caller) -> ActionResponse:
        """Stop what the job does now: a run (SIGTERM to its group, grace, SIGKILL, by its runner), a wait (it
        is cancelled), a rest (a paused job is stopped), an export. A start, a resume or the scheduler may move
        the job on between the read and the write: it is then read again and stopped as it is."""
        job = await self.service.require(job_id, caller)
        for _ in range(STOP_TRIES):
            try:
                return await self._stop(job, caller)
            except TransitionRefused as exc:
                if exc.reason == Refusal.MISSING:
                    raise JobNotFound(job_id) from None
                was, job = job.status, await self.service.require(job_id, caller)
                if was == JobStatus.RUNNING and job.status.is_terminal():  # it ended by itself meanwhile
                    return ActionResponse(job_id=job_id, status=job.status,
                                          message=f"The job already ended ({job.status.value})")  # fmt: skip
        raise Conflict(f"job '{job_id}' keeps changing (it is {job.status.value} now): stop it again")

    async def _stop(self, job: Job, caller: Caller, stop_asked: bool = False) -> ActionResponse:
        """`stop_asked`: a paused job is stopped only while the stop it was asked as a run still stands (a resume since
        clears it, and a pause of a later run does not set it)."""
        svc, job_id = self.service, job.job_id
        still = {"stop_requested": "true"} if stop_asked else None
        grace = svc.settings.STOP_GRACE_SECONDS + STOP_EXTRA_SECONDS
        if job.status == JobStatus.PAUSED and job.export.status != ExportStatus.RUNNING:
            # Stopped, it is resumable only from a checkpoint: one that saved none is cancelled, as a job taken
            # out of the queue after a run that saved none is (`leave_queue`), not promised a resume refused later.
            # (the checkpoint its pause named counts too: a disk that cannot be read a moment shows none)
            newest = await asyncio.to_thread(newest_checkpoint, job)
            if job.resume_from is None and newest is None:
                await svc.store.transition(job_id, JobStatus.CANCELLED, expect=(JobStatus.PAUSED,),
                                           actor=caller.actor, message="cancelled while paused, with no checkpoint",
                                           created_at=job.created_at, unchanged=still)  # fmt: skip
                message = "The paused job was cancelled: it saved no checkpoint to resume from"
                return ActionResponse(job_id=job_id, status=JobStatus.CANCELLED, message=message)
            await svc.store.transition(job_id, JobStatus.STOPPED, expect=(JobStatus.PAUSED,), actor=caller.actor,
                                       message="stopped while paused", created_at=job.created_at,
                                       unchanged=still)  # fmt: skip
            # What a resume would take (its newest checkpoint: review DJ), or the one its pause named.
            checkpoint = newest or job.resume_from
            return ActionResponse(job_id=job_id, status=JobStatus.STOPPED, resume_from=checkpoint,
                                  resume_step=checkpoint_step(checkpoint),
                                  message="The paused job was stopped (POST .../resume still resumes it)")  # fmt: skip
        if job.status in (JobStatus.PENDING, JobStatus.QUEUED):
            to = await svc.leave_queue(job, "cancelled before it started", caller)
            if to == JobStatus.STOPPED:
                checkpoint = await asyncio.to_thread(newest_checkpoint, job) or job.resume_from
                return ActionResponse(job_id=job_id, status=to, resume_from=checkpoint,
                                      resume_step=checkpoint_step(checkpoint),
                                      message="The job was stopped while it waited to run again (POST .../resume "
                                      "still resumes it)")  # fmt: skip
            return ActionResponse(job_id=job_id, status=JobStatus.CANCELLED, message="The job was cancelled")
        if job.status == JobStatus.RUNNING:
            await self._ask_once(job, "stop_requested", caller)
            # The run's runner (or, when it is gone, the scheduler's watchdog) stops it: SIGTERM, grace, SIGKILL.
            # Judged by that run's own end: the job may be resumed or started again by someone else meanwhile.
            final = await await_job(svc, job_id, lambda j: _run_end(j, job.run_id) is not None, grace, job)
            outcome = _run_end(final, job.run_id)
            if outcome in ("preempted", "retried"):
                # Its run ended as the stop came and went back to the queue (a retry, a preemption): the stop
                # still holds, here or by the scheduler before any new run (not a resume someone asked for once
                # the stop had taken effect: that run's end was "stopped").
                final = await _rest_as_asked(svc, final, caller)
                if final.status in (JobStatus.STOPPED, JobStatus.CANCELLED):
                    outcome = final.status.value
            if outcome == "paused" and final.status == JobStatus.PAUSED and final.stop_requested and \
                    final.export.status != ExportStatus.RUNNING:  # fmt: skip
                # The stop was accepted while the run went on, after its runner (or a watchdog) had read the pause
                # alone for its end: it still holds, as a stop of the paused job (a resume since clears the flag).
                with contextlib.suppress(TransitionRefused):
                    return await self._stop(final, caller, stop_asked=True)
                final = await svc.require(job_id, caller)
                if final.status in (JobStatus.STOPPED, JobStatus.CANCELLED):  # (by a stop asked beside this one)
                    return ActionResponse(job_id=job_id, status=final.status,
                                          message=f"The paused job was {final.status.value} by a stop asked "
                                          "at the same time")  # fmt: skip
            if outcome is None:
                message = "Stop requested: the run has not ended yet; see its status"
            elif outcome == "stopped":
                how = f" ({final.stop_outcome or 'terminated'})" if final.status == JobStatus.STOPPED else ""
                message = f"Training stopped{how}" + _since(final, outcome)
                if final.status == JobStatus.STOPPED:
                    # What a resume would do, said where the user decides (as the pause's answer does).
                    checkpoint = await asyncio.to_thread(newest_checkpoint, final)
                    step = checkpoint_step(checkpoint)
                    lost = _lost_steps(final, job.run_id, step) if checkpoint else None
                    if checkpoint is None:
                        message += "; it saved no checkpoint: POST .../resume cannot resume it"
                    else:
                        message += f"; POST .../resume resumes it from {checkpoint} (step {step})"
                        message += (", the step after it trained again" if lost == 1 else
                                    f", the {lost} steps after it trained again" if lost else "")  # fmt: skip
                        message += await _fresh_schedule(checkpoint)
                    return ActionResponse(job_id=job_id, status=final.status, message=message, resume_from=checkpoint,
                                          resume_step=step, lost_steps=lost)  # fmt: skip
            elif outcome == "cancelled":
                message = "The job was cancelled: its run had ended and gone back to the queue, with no checkpoint"
            else:
                message = f"The run had already ended ({outcome})" + _since(final, outcome)
            return ActionResponse(job_id=job_id, status=final.status, message=message)
        if job.export.status == ExportStatus.RUNNING:
            # Only while the export this caller saw runs: one that ended meanwhile is not stopped, nor a new one.
            asked = ("export_stop_requested", "export stop requested", None)
            if await while_running(svc.store, job_id, job.export.export_id, lambda _: {"export_stop_requested": True},
                                   once="export_stop_requested", actor=caller.actor, event=asked) is None:  # fmt: skip
                now = await svc.require(job_id, caller)
                which = "it" if now.export.export_id == job.export.export_id else "another export now runs: it"
                message = f"The export had already ended; {which} is {now.export.status.value}"
                return ActionResponse(job_id=job_id, status=now.status, export=now.export, message=message)
            final = await await_job(svc, job_id, lambda j: j.export.status != ExportStatus.RUNNING, grace, job)
            message = f"Export stopped ({final.export.status.value})"
            if final.export.status == ExportStatus.COMPLETED:  # (it ended as the stop came: the model is whole)
                message = f"The export had already ended: completed, the merged model is in {final.export.path}"
            if final.status == JobStatus.PAUSED:
                message += "; the job stays paused (POST .../stop again stops it)"
            if final.export.status == ExportStatus.RUNNING:
                message = "Export stop requested: the export has not ended yet (is a scheduler running?)"
            return ActionResponse(job_id=job_id, status=final.status, export=final.export, message=message)
        raise Conflict(f"job '{job_id}' is already {job.status.value}: nothing to stop")

    async def pause(self, job_id: str, caller: Caller) -> ActionResponse:
        """Stop the run like a stop (its GPUs go back), keeping the job to resume from its last checkpoint."""
        job = await self.service.require(job_id, caller)
        if job.status != JobStatus.RUNNING:
            hint = " (resume it with POST .../resume)" if job.status == JobStatus.PAUSED else ""
            raise Conflict(f"job '{job_id}' is {job.status.value}: only a running job can be paused{hint}")
        try:
            await self._ask_once(job, "pause_requested", caller)
        except TransitionRefused as exc:
            raise refused(job_id, exc, "job '{id}' is {status} now: only a running job can be paused") from None
        # Judged by the run's own end, as a stop is: someone may resume the job as soon as it is paused.
        final = await await_job(self.service, job_id, lambda j: _run_end(j, job.run_id) is not None,
                                self.service.settings.STOP_GRACE_SECONDS + STOP_EXTRA_SECONDS, job)  # fmt: skip
        ended = _run_end(final, job.run_id)
        if ended in ("preempted", "retried"):
            # Its run went back to the queue as the pause came: it rests paused now (a retry waited out its
            # backoff queued: review DU), here or by the scheduler before any new run; stopped when a stop was
            # asked as well.
            final = await _rest_as_asked(self.service, final, caller)
        paused = ended == "paused" or (ended in ("preempted", "retried") and final.status == JobStatus.PAUSED)
        resume_step = checkpoint_step(final.resume_from) if paused else None
        # Only a pause that took effect has steps to train again; a stop or an end that won the race has none.
        lost = _lost_steps(final, job.run_id, resume_step) if paused else None
        if ended is None:
            message = "Pause requested: the run has not ended yet; see its status"
        elif paused:
            where = (
                f"{final.resume_from} (step {resume_step})" if final.resume_from else "the beginning (no checkpoint)"
            )
            steps = f"the {lost} steps" if lost != 1 else "the step"
            again = f"; {steps} after it will be trained again" if final.resume_from else \
                f"; {steps} it made will be trained again"  # fmt: skip
            fresh = await _fresh_schedule(final.resume_from)
            message = f"Paused: resumes from {where}" + (again if lost else "") + fresh + _since(final, ended)
        else:
            message = f"The run had already ended ({ended})" + _since(final, ended)
            if ended in ("preempted", "retried") and final.status in (JobStatus.STOPPED, JobStatus.CANCELLED):
                message += f"; a stop asked as well wins over the pause: the job is {final.status.value}"
        return ActionResponse(job_id=job_id, status=final.status, message=message,
                              resume_from=final.resume_from if paused else None, resume_step=resume_step,
                              lost_steps=lost)  # fmt: skip

    async def resume(self, job_id: str, caller: Caller) -> ActionResponse:
        """A paused job, or a stopped or failed one that left a checkpoint, goes back to the queue at its place
        (priority, original submission time) and resumes from its newest checkpoint."""
        job = await self.service.require(job_id, caller)
        resumable = (JobStatus.PAUSED, JobStatus.STOPPED, JobStatus.FAILED)
        if job.status not in resumable:
            raise Conflict(f"job '{job_id}' is {job.status.value}: only a paused job, or a stopped or failed one with a"
                           " checkpoint, can be resumed")  # fmt: skip
        if gone := await self.service.files.gone_uploads(job):
            raise _upload_gone(job_id, gone[0])
        # As a start: the GPUs may have changed since its last run (a restart with fewer), and queued it would
        # wait for ever.
        snapshot = await self.service.gpu_snapshot()
        never = impossible(job.num_gpus, job.gpu_ids_requested, job.min_gpu_memory_gb, snapshot) \
            if snapshot.taken_at else None  # fmt: skip
        if never:
            raise Conflict(f"job '{job_id}' can never run again here: {never}")
        if capped := beyond_gpu_cap(job.num_gpus, job.owner, self.service.settings.MAX_GPUS_PER_OWNER):
            raise Conflict(f"job '{job_id}' can never run again here: {capped}")
        # Its inputs where its run will look for them: an operator who narrowed DATA_ROOTS since had a paused job
        # fail at its start, and told "create the job again", which lost its checkpoints (hunt CE).
        if moved := await InputGuards.of(self.service.settings, self.service.store).moved(job):
            raise Conflict(f"job '{job_id}' cannot run again now, and stays {job.status.value}: {moved}")
        checkpoint = await asyncio.to_thread(newest_checkpoint, job)
        # (one failed as it started, for where its inputs led: nothing ran, nothing is lost by starting over)
        if checkpoint is None and job.status != JobStatus.PAUSED and job.error_code != "input_path":
            raise Conflict(f"job '{job_id}' is {job.status.value} and left no checkpoint to resume from: create a new "
                           "job to train again")  # fmt: skip
        step = checkpoint_step(checkpoint)
        where = f"checkpoint {checkpoint} (step {step})" if checkpoint else "the beginning: it has no checkpoint"
        try:
            await self.service.store.transition(
                job_id, JobStatus.QUEUED, expect=(job.status,), reopen=job.status != JobStatus.PAUSED,
                fields={"resume_from": checkpoint, "finished_at": None, "stop_requested": False,
                        "pause_requested": False, "preempt_for": None, "error_message": None, "error_code": None,
                        "gpu_ids": []},  # (the GPUs of its last run, another job's now)
                actor=caller.actor, message=f"resume requested: back in the queue, resumes from {where}",
                data={"resume_from": checkpoint, "resume_step": step}, max_waiting=self.service.limits.max_waiting,
                created_at=job.created_at, uploads=self.service.files.uploads_of(job),
                # (without an automatic export to skip, an export and the resumed run go on side by side)
                refuse_export=(ExportStatus.RUNNING,) if self.service.settings.AUTO_EXPORT and
                job.training.train_type != "full" else None,
            )  # fmt: skip
        except TransitionRefused as exc:
            if exc.reason == Refusal.EXPORT_STATE:
                # Its run's end would find the export running and skip the automatic export of its last
                # checkpoint: the job would read exported, from an earlier one.
                raise Conflict(f"an export of job '{job_id}' is running: wait for it to end (GET .../exports), or "
                               "stop it (POST .../stop), then resume") from None  # fmt: skip
            if exc.reason == Refusal.UPLOAD_GONE:  # deleted since the check above
                raise _upload_gone(job_id, exc.detail) from None
            if exc.reason == Refusal.WAITING_CAP:
                raise self.service.limits.over_cap(job.owner, int(exc.detail or 0)) from None
            if exc.reason == Refusal.OUTPUT_DIR_BUSY:
                raise Conflict(f"output_dir '{job.output_dir_requested}' is now used by another active job: wait "
                               "for it to end, then resume") from None  # fmt: skip
            raise refused(job_id, exc, "job '{id}' changed while this resume was made (it is {status} now): "
                          "ask again if it should still resume") from None  # fmt: skip
        if await self.service.cluster.leader() is not None:
            await self.service.cluster.request_pass(uuid.uuid4().hex, START_WAIT_SECONDS, only=[job_id])
        after = await self.service.job(job_id)
        message = f"Resuming from {where}{await _fresh_schedule(checkpoint)}" if checkpoint else \
            "No checkpoint: training starts from the beginning"  # fmt: skip
        if job.kind == "export":  # (a quantized export: it has no checkpoints of its own, and trains nothing)
            message = "The export runs again from its start (swift export does not resume)"
        if after.status == JobStatus.FAILED:  # (its run could not even start: a full disk, say)
            message = f"The resumed run failed as it started: {after.error_message}"
        info = await self.service.placement.queue_info(job_id) if after.status == JobStatus.QUEUED else NOT_QUEUED
        return ActionResponse(job_id=job_id, status=after.status, message=message, resume_from=checkpoint,
                              resume_step=step, queue_position=info.position, estimated_wait_time=info.estimate,
                              pending_reason=info.reason, gpu_ids=after.gpu_ids or None)  # fmt: skip

    async def checkpoints(self, job_id: str, caller: Caller, limit: int, offset: int = 0) -> CheckpointList:
        job = await self.service.require(job_id, caller)
        history = await self.service.store.history(job_id, self.service.settings.LOSS_HISTORY_LIMIT)
        return await asyncio.to_thread(describe_checkpoints, job, self.service.settings.OUTPUT_ROOT, history, limit,
                                     offset)  # fmt: skip


def _lost_steps(job: Job, run_id: str | None, resume_step: int | None) -> int | None:
    """Steps the run `run_id` trained past the checkpoint a resume starts from (all of them without one)."""
    attempt = _attempt(job, run_id)
    current = attempt.last_step if attempt is not None and attempt.last_step is not None else \
        job.progress.current_step  # fmt: skip
    return max(0, current - (resume_step or 0)) if current is not None else None


async def _fresh_schedule(checkpoint: str | None) -> str:
    """What a weights-only checkpoint (save_only_model, the default) means for the resumed run, said where the
    user decides: its optimizer and learning-rate schedule start over (the real swift's lr goes back to warmup)."""
    if checkpoint is None or not await asyncio.to_thread(weights_only, checkpoint):
        return ""
    return ("; the checkpoint holds weights only (save_only_model): the optimizer and the learning-rate schedule "
            "start again")  # fmt: skip


def _upload_gone(job_id: str, file_id: str | None) -> Conflict:
    return Conflict(f"job '{job_id}' trains on the uploaded file {file_id}, which has been deleted since: upload it "
                    "again and create a new job with it")  # fmt: skip
