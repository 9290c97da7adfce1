"""What an export of a job will run: `swift export --adapters <checkpoint> --merge_lora true [--output_dir ...]`.

Prepared by whoever asks for it (an API worker, or the runner after a successful run) and carried out by a
runner. Preparing is synchronous: it looks at the disk (which checkpoint exists, whether the merged folder does).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from application.config import Settings
from application.exceptions import Conflict, Invalid
from application.models.job_request import ExportRequest
from application.models.training_model import ExportInfo, ExportStatus, Job, JobStatus, RunnerInfo
from application.services import clock
from application.services.checkpoints import holds_weights, own_checkpoints
from application.services.job_store import JobStore, Refusal, TransitionRefused
from application.services.outbox import until_answered
from application.services.path_sandbox import RealFolder, escaped_output_root
from application.services.swift_command import build_export_command
from application.utils.log_files import path_taken

# A paused job's checkpoint can be exported too (the merge only reads it).
ENDED_WITH_SWIFT = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.PAUSED)


def export_log(job: Job) -> Path:
    """A new log per export: the logs of earlier exports stay readable next to their records. Past EXPORTS_KEPT
    the records no longer count them all, so the names they hold and those on disk are skipped."""
    n = len(job.exports) + (job.export.status != ExportStatus.NONE)
    logs = Path(job.output_dir) / "logs"
    taken = {e.log_file for e in (*job.exports, job.export) if e.log_file}
    while True:
        path = logs / (f"{job.job_id}.export.log" if n == 0 else f"{job.job_id}.export-{n + 1}.log")
        if str(path) not in taken and not path_taken(path):
            return path
        n += 1


# Older exports kept in the job's record (each holds its command and paths: a few hundred bytes).
EXPORTS_KEPT = 50


def prepare_export(job: Job, settings: Settings, *, auto: bool, checkpoint: str | None = None,
                   request: ExportRequest | None = None) -> ExportInfo:  # fmt: skip
    """The export to run for `job`: Conflict when the job cannot export now, Invalid when the request is wrong."""
    request = request or ExportRequest()
    if job.status not in ENDED_WITH_SWIFT:
        raise Conflict(
            f"job '{job.job_id}' is {job.status.value}: export needs a finished training run "
            "(completed, stopped, failed or paused, with a checkpoint)"
        )
    if job.export.status == ExportStatus.RUNNING:
        raise Conflict(f"an export of job '{job.job_id}' is already running: wait for it to end")
    if job.training.train_type == "full" and request.merge_lora:
        raise Conflict(f"job '{job.job_id}' trained the full model: there is no LoRA adapter to merge")
    # A quantized export runs as a GPU job of its own (services/quant_exports.py); this one merges on the CPU.
    if not request.merge_lora:
        raise Invalid("merge_lora false without quant_bits leaves nothing to export: leave merge_lora true")
    checkpoint = pick_checkpoint(job, checkpoint or request.checkpoint, own_checkpoints(job, settings.OUTPUT_ROOT))
    output_dir = None
    if not request.output_name and merging_into_default(job, checkpoint):
        raise Conflict(f"a quantized export of {Path(checkpoint).name} writes {Path(checkpoint).name}-merged (its job "
                       "runs, or waits to run: see GET .../exports): wait for it to end, stop its job, or name another "
                       "folder with output_name")  # fmt: skip
    if request.output_name:
        output_dir = str(Path(job.output_dir) / "exports" / request.output_name)
        if name_taken(job, Path(output_dir)):
            raise Conflict(f"output_name '{request.output_name}' is taken by an earlier export: choose another")
    target = Path(output_dir) if output_dir else Path(f"{checkpoint}-merged")
    if why := export_escape(Path(job.output_dir), target, settings.OUTPUT_ROOT):
        raise Conflict(why)
    # A second merge of one checkpoint into its default folder needs --exist_ok true.
    exist_ok = output_dir is None and Path(f"{checkpoint}-merged").exists()
    return ExportInfo(
        status=ExportStatus.RUNNING, export_id=uuid.uuid4().hex, auto=auto, checkpoint=checkpoint,
        merge_lora=request.merge_lora, output_dir=output_dir,
        command=build_export_command(settings.SWIFT_BIN, checkpoint, exist_ok=exist_ok, output_dir=output_dir),
        log_file=str(export_log(job)), started_at=clock.now(),
    )  # fmt: skip


def pick_checkpoint(job: Job, wanted: str | None, on_disk: list[str]) -> str:
    """The checkpoint an export takes (blocking): the one `wanted`, or the last (its own: not any path its log
    named), else the newest, that a LoRA job's holds its adapter: a save cut short by a stop leaves an empty
    checkpoint-N, which swift refused after the export had started."""
    if wanted is not None:
        checkpoint: str | None = choose_checkpoint(job, wanted, on_disk)
    else:
        newest = [c for c in reversed(on_disk) if holds_weights(job, c)]
        checkpoint = job.last_checkpoint if job.last_checkpoint in newest else next(iter(newest), None)
        checkpoint = checkpoint or (on_disk[-1] if on_disk else None)  # (refused below, named)
    if checkpoint is None or not Path(checkpoint).is_dir():
        raise no_checkpoint(job)
    if not holds_weights(job, checkpoint):
        raise Conflict(f"{checkpoint} holds no whole LoRA adapter (adapter_config.json and its weights): its save "
                       "was cut short, or its files were removed; export another checkpoint (GET "
                       ".../checkpoints)")  # fmt: skip
    return checkpoint


def no_checkpoint(job: Job) -> Conflict:
    """Why a job has nothing to export: an export job has no checkpoints of its own ("yet" sent its users waiting),
    and a job whose checkpoints were removed from disk is not one that has not saved any."""
    if job.kind == "export":
        return Conflict(f"job '{job.job_id}' is an export of job '{job.export_of}': it has no checkpoints; export "
                        f"job '{job.export_of}''s instead")  # fmt: skip
    if job.checkpoints:
        return Conflict(f"job '{job.job_id}''s checkpoints are no longer in its folder ({len(job.checkpoints)} "
                        f"recorded, the newest {job.checkpoints[-1]}): removed, or a link on the folder's way leads "
                        "elsewhere now, or OUTPUT_ROOT moved since (GET .../checkpoints says which under "
                        "not_read); nothing to export")  # fmt: skip
    return Conflict(f"job '{job.job_id}' has no checkpoint yet: nothing to export")


async def owe_auto_export(store: JobStore, job_id: str) -> None:
    """Note, before a completed run's end is written, that its automatic export is still to be asked for (kept
    until `record_auto_export` has decided it): a scheduler asks for those whose runner died first."""
    await until_answered("the export owed", lambda: store.r.zadd(store.keys.exports_owed, {job_id: clock.now()}))


async def owed_auto_exports(store: JobStore, before: float) -> list[tuple[str, float]]:
    """(job id, since when) of the automatic exports owed since before `before`, the oldest first (100 at most)."""
    owed = await store.r.zrangebyscore(store.keys.exports_owed, "-inf", before, start=0, num=100, withscores=True)
    return [(job_id, float(since)) for job_id, since in owed]


async def forgive_auto_export(store: JobStore, job_id: str) -> None:
    await store.r.zrem(store.keys.exports_owed, job_id)


async def record_auto_export(store: JobStore, settings: Settings, job_id: str,
                             runner: RunnerInfo | None) -> ExportInfo | None:  # fmt: skip
    """The automatic export of a run that completed, recorded: as run by `runner` (the run's own, which goes
    on to run it), or, with None, requested (a scheduler launches a runner for it). None when there is none:
    a full-parameter run has nothing to merge; or an export was asked for meanwhile, and theirs runs. Whatever
    it decides, the export is no longer owed."""
    info = await _record_auto_export(store, settings, job_id, runner)
    # (not when that raised: the run's runner tries again, and if it dies first, a scheduler asks for it)
    await forgive_auto_export(store, job_id)
    return info


async def _record_auto_export(store: JobStore, settings: Settings, job_id: str,
                              runner: RunnerInfo | None) -> ExportInfo | None:  # fmt: skip
    job = await store.get(job_id)
    if job is None or job.training.train_type == "full":
        return None
    job = job.model_copy(update={"exports": await as_they_stand(store, job)})
    try:
        info = await asyncio.to_thread(prepare_export, job, settings, auto=True)
    except Exception as exc:  # a Conflict saying why there is nothing to export; or the disk failing
        detail = getattr(exc, "detail", str(exc))
        await store.add_event(job_id, "export_skipped", f"automatic export skipped: {detail}")
        return None
    info = info.model_copy(update={"runner": runner})
    event = ("export_started", f"automatic export of {info.checkpoint} {'started' if runner else 'requested'}",
             {"checkpoint": info.checkpoint, "auto": True})  # fmt: skip
    try:
        await put_export(store, job_id, info, statuses=ENDED_WITH_SWIFT, exporting=True,
                         refuse_export=(ExportStatus.RUNNING,), event=event)  # fmt: skip
    except TransitionRefused:
        return None
    return info


async def request_auto_export(store: JobStore, settings: Settings, job_id: str,
                              runner: Callable[[], RunnerInfo | None]) -> ExportInfo | None:  # fmt: skip
    """`record_auto_export` (as run by `runner()`, asked at each try), tried again until Redis answers. A try
    whose record Redis took and whose answer it lost is found by the next: an automatic export recorded since
    the first try began is the one asked for (trying again would find it running, and record a skip that
    never happened)."""
    since, tried = clock.now(), False

    async def once() -> ExportInfo | None:
        nonlocal tried
        if tried:
            job = await store.get(job_id)
            export = job.export if job is not None else None
            # (whatever its status: asked for by a scheduler while this runner could not reach Redis, it may have
            # run already, and recorded again it would merge a second time: review EN)
            if export is not None and export.auto and (export.started_at or 0.0) >= since:
                return export
        tried = True
        return await record_auto_export(store, settings, job_id, runner())

    # (raised out, the run stood recorded and no export was asked for: nobody would ask again)
    return await until_answered("the automatic export", once)


def merging_into_default(job: Job, checkpoint: str) -> bool:
    """Whether an export of `checkpoint` that has not ended writes `<checkpoint>-merged`: a merge into its default
    folder, or a quantized export of an adapter (swift merges into that folder first, or takes what it holds).
    `job.exports` as they stand (as_they_stand): a quantized export's stored record says running for ever."""
    pending = (e for e in (*job.exports, job.export) if e.status == ExportStatus.RUNNING)
    return any(e.checkpoint == checkpoint and ("--adapters" in (e.command or []) if e.job_id else e.output_dir is None)
               for e in pending)  # fmt: skip


STATUS_OF = {
    JobStatus.COMPLETED: ExportStatus.COMPLETED,
    JobStatus.FAILED: ExportStatus.FAILED,
    JobStatus.STOPPED: ExportStatus.STOPPED,
    JobStatus.CANCELLED: ExportStatus.STOPPED,
}


def as_export(info: ExportInfo, job: Job | None, parent: str) -> ExportInfo:
    """A quantized export's record (of job `parent`) as its job now stands; once its job is deleted, no longer
    running (a job that has its id since, anyone's, is not it)."""
    if job is not None and job.export_of != parent:
        job = None
    if job is None:
        if info.status != ExportStatus.RUNNING:
            return info
        return info.model_copy(update={"status": ExportStatus.STOPPED, "path": None,
                                       "error": f"its export job '{info.job_id}' was deleted before it ended (what "
                                                f"it wrote, if it ran, stays in {info.output_dir})"})  # fmt: skip
    status = STATUS_OF.get(job.status, ExportStatus.RUNNING)
    return info.model_copy(update={
        "status": status, "exit_code": job.exit_code, "finished_at": job.finished_at,
        "error": job.error_message if status != ExportStatus.COMPLETED else None,
        "path": info.output_dir if status == ExportStatus.COMPLETED else None,
        "log_file": job.log_file or info.log_file, "job_status": job.status.value,
    })  # fmt: skip


async def as_they_stand(store: JobStore, job: Job) -> list[ExportInfo]:
    """The job's kept export records, a quantized one's as its job now stands (its record keeps 'running')."""
    return await exports_as_they_stand(store, job.job_id, job.exports)


async def exports_as_they_stand(store: JobStore, job_id: str, exports: list[ExportInfo]) -> list[ExportInfo]:
    """`as_they_stand` of job `job_id`'s `exports`: only the export jobs still said to run are read."""
    running = [e.job_id for e in exports if e.job_id and e.status == ExportStatus.RUNNING]
    jobs = {j.job_id: j for j in await store.get_many(running)} if running else {}
    return [as_export(e, jobs.get(e.job_id), job_id) if e.job_id else e for e in exports]


def name_taken(job: Job, target: Path) -> bool:
    """An export folder written already, or one an export that has not ended will write (a merge, or a
    quantized export queued as a job of its own: two exports must not write into one folder)."""
    pending = (e for e in (*job.exports, job.export) if e.status == ExportStatus.RUNNING)
    return target.exists() or any(e.output_dir == str(target) for e in pending)


def merged_path(info: ExportInfo) -> str:
    """Where swift export writes the merged model: the folder the export named, else swift's default."""
    return info.output_dir or f"{info.checkpoint}-merged"


def run_again(info: ExportInfo, host_restart: bool = False) -> ExportInfo:
    """An export cut short by its host shutting down (or, `host_restart`, going down with it), requested again
    as its user asked for it: the next scheduler to lead runs it from the start (swift export does not resume),
    into the folder it may have begun to fill."""
    command = list(info.command or [])
    if "--exist_ok" not in command:
        command += ["--exist_ok", "true"]
    return info.model_copy(update={"runner": None, "pid": None, "process_start_time": None, "process_stamp": None,
                                   "command": command,
                                   "host_restarts": info.host_restarts + host_restart})  # fmt: skip


def export_escape(output_dir: Path, target: Path, output_root: Path) -> str | None:
    """Why an export into `target` would write out of the job's folder (a symlink made since: on the folder's
    way, or at exports/, the target or logs/ in it); None when it would not. Checked when the export is asked
    for and again just before swift starts (a training run's folder is checked so too)."""
    if why := escaped_output_root(output_dir, output_root):
        return why
    folder = RealFolder(output_dir)
    for path in (target, output_dir / "logs"):
        if not folder.holds(path):
            return (f"{path} leads out of the job's folder {output_dir} (a symlink on its way): remove the link, or "
                    "export into another output_name")  # fmt: skip
    return None


def choose_checkpoint(job: Job, wanted: str, on_disk: list[str]) -> str:
    """One of the job's checkpoints by its path, its path under output_dir, or its folder name (when only one
    run has a checkpoint of that name). Names that are not the job's own are refused, paths never opened."""
    wanted = wanted.rstrip("/") or wanted  # (the same folder: shell completion adds the slash)
    root = job.output_dir.rstrip("/") + "/"
    by_name: dict[str, list[str]] = {}
    for path in on_disk:
        by_name.setdefault(Path(path).name, []).append(path)
    for path in on_disk:
        if wanted in (path, path.removeprefix(root)):
            return path
    matches = by_name.get(wanted, [])
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(p.removeprefix(root) for p in on_disk[-10:]) or "none yet"
    if len(matches) > 1:
        raise Invalid(f"checkpoint '{wanted}' is in several runs: name one of {', '.join(matches)}")
    raise Invalid(f"checkpoint '{wanted}' is not one of job '{job.job_id}''s checkpoints ({names}): see "
                  "GET .../checkpoints")  # fmt: skip


EXPORT_LIST = TypeAdapter(list[ExportInfo])


async def while_running(store: JobStore, job_id: str, export_id: str | None,
                        fields: Callable[[ExportInfo], Mapping[str, Any] | None], *, once: str | None = None,
                        **update: Any) -> ExportInfo | None:  # fmt: skip
    """Write `fields(export)` only while `export_id` is the job's export and runs, judged from the record as it
    is at the write (not a copy read earlier: its runner, a new request or another scheduler may have written
    since); `fields` may look at that record and decline (None). The export written over, or None when it
    ended, was replaced, the job is gone or `fields` declined. `update`: JobStore.update's event, actor and
    `exporting`. `once`: a flag of the job (`export_stop_requested`) already set, by another request at the
    same moment say, is not written again, nor its event added: the export is answered as written over."""
    names = ["export", once] if once else ["export"]
    for _ in range(10):
        raw, *flag = (await store.get_fields([job_id], names))[0]
        current = ExportInfo.model_validate_json(raw) if raw not in (None, "null") else None
        if current is None or current.export_id != export_id or current.status != ExportStatus.RUNNING:
            return None
        if once and flag[0] == "true":
            return current
        wanted = fields(current)
        if wanted is None:
            return None
        unchanged = {"export": raw, **({once: flag[0]} if once else {})}
        try:
            await store.update(job_id, wanted, unchanged=unchanged, **update)
            return current
        except TransitionRefused as exc:
            if exc.reason != Refusal.CHANGED:
                return None
            # CHANGED: written since it was read (its runner's pid, say): judged again on the record as it is now
    return None


async def _kept(store: JobStore, job_id: str, exports: list[ExportInfo]) -> list[ExportInfo]:
    """The newest EXPORTS_KEPT, and any older quantized one whose job still waits or runs (dropped, it vanished
    from GET .../exports while its job ran, and a merge of its checkpoint was no longer refused). Its stored
    record says running for ever: its job, read now, says whether it is."""
    cut = len(exports) - EXPORTS_KEPT
    older = [e for e in exports[: max(cut, 0)] if e.status == ExportStatus.RUNNING and e.job_id]
    alive: set[str] = set()
    if older:
        rows = await store.get_fields([e.job_id or "" for e in older], ["status", "export_of"])
        for e, (status, of) in zip(older, rows, strict=True):
            if status and of and json.loads(of) == job_id and not JobStatus(json.loads(status)).is_terminal():
                alive.add(e.job_id or "")
    return [e for i, e in enumerate(exports) if i >= cut or (e.job_id or "") in alive]


async def settle(store: JobStore, job: Job) -> None:
    """A quantized export's job about to be deleted (by its user, or by retention): the record its parent keeps of
    it takes how it ended, which was read from this job (as_export). Gone, it turned a completed export into
    "deleted before it ended", with no path to the model it wrote. Best effort: the parent may be gone too."""
    if job.kind != "export" or job.export_of is None or not job.status.is_terminal():
        return
    parent = job.export_of

    async def change(raw_export: str | None, raw_list: str | None) -> dict[str, Any] | None:
        if raw_list in (None, "null"):
            return None
        exports = EXPORT_LIST.validate_json(raw_list or "")
        if not any(e.job_id == job.job_id and e.status == ExportStatus.RUNNING for e in exports):
            return None  # (settled already, or not this job's: another one of its id)
        return {"exports": [as_export(e, job, parent) if e.job_id == job.job_id else e for e in exports]}

    try:
        await _swap_exports(store, parent, change)
    except TransitionRefused:
        return


async def put_export(store: JobStore, job_id: str, info: ExportInfo, *, current: bool = True, **update: Any) -> str:
    """Record a new export: as the job's current one (the one before joins the list), or, `current=False`, in
    its list (a quantized export: a job of its own). From the fields as stored, written only if they did not
    change meanwhile, else read again: a merge and a quantized export asked for at once both stay. `update`:
    JobStore.update's conditions and event."""

    async def change(raw_export: str | None, raw_list: str | None) -> dict[str, Any]:
        earlier = EXPORT_LIST.validate_json(raw_list) if raw_list not in (None, "null") else []
        if not current:
            return {"exports": await _kept(store, job_id, [*earlier, info])}
        before = ExportInfo.model_validate_json(raw_export) if raw_export not in (None, "null") else None
        earlier += [before] if before is not None and before.status != ExportStatus.NONE else []
        return {"export": info, "export_stop_requested": False, "exports": await _kept(store, job_id, earlier)}

    written = await _swap_exports(store, job_id, change, **update)
    assert written is not None  # (change always has fields to write)
    return written


async def _swap_exports(store: JobStore, job_id: str,
                        change: Callable[[str | None, str | None], Awaitable[dict[str, Any] | None]],
                        **update: Any) -> str | None:  # fmt: skip
    """Write `change(export, exports)` (the two fields as stored) only if neither changed since they were read,
    else read them again: two writers of a job's export list (a merge and a quantized export, a settle) must
    not drop each other's entry. None when `change` has nothing to write; TransitionRefused for any other
    refusal, or CHANGED after 20 tries. `update`: JobStore.update's conditions and event."""
    for _ in range(20):
        raw_export, raw_list = (await store.get_fields([job_id], ["export", "exports"]))[0]
        fields = await change(raw_export, raw_list)
        if fields is None:
            return None
        try:
            return await store.update(job_id, fields, unchanged={"export": raw_export, "exports": raw_list}, **update)
        except TransitionRefused as exc:
            if exc.reason != Refusal.CHANGED:
                raise
    raise TransitionRefused(Refusal.CHANGED)
