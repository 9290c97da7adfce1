"""`swift-api`: submit, follow and steer training jobs on a swift-api server.

Exit codes: 0 success; 1 a followed job ended failed, stopped or cancelled; 2 a usage error, or the server
refused the request (4xx: its `detail` is printed); 3 the server is unreachable or failing (5xx); 4 `submit
--follow` created the job but could not follow it (follow it with `watch ID`; do not submit it again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from application.cli import render
from application.cli.client import DEFAULT_URL, EXIT_NOT_FOLLOWED, EXIT_OK, EXIT_USAGE, Api, CliError, job_path
from application.cli.follow import tail, watch
from application.cli.output import Output
from application.models.job_request import JobCreate
from application.models.training_model import JobStatus

Command = Callable[[Api, argparse.Namespace, Output], int]

# --set routes a key to the request's top level when JobCreate has it, else into `training` (TrainingParams): a
# key that is neither is then refused by the server with a 422 naming it, the one authority on the schema.
TOP_LEVEL_FIELDS = frozenset(JobCreate.model_fields) - {"training"}


def _value(raw: str) -> Any:
    """JSON when it parses (20, 1e-4, false, null, [0,1]), else the text itself ("2h", "qwen2")."""

    def no_constants(name: str) -> Any:
        raise ValueError(name)  # NaN/Infinity are not JSON: the server would refuse the body

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):  # 1e999 is inf, which no JSON body can carry (it was a traceback: hunt DS)
            raise ValueError(number)
        return value

    try:
        return json.loads(raw, parse_constant=no_constants, parse_float=finite)
    except ValueError:
        return raw


def create_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    training: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"--set wants key=value, got {item!r}", EXIT_USAGE)
        (body if key in TOP_LEVEL_FIELDS else training)[key] = _value(raw)
    flags = {"model_path": args.model, "data_path": args.data, "output_dir": args.output_dir, "num_gpus": args.gpus,
             "priority": args.priority, "job_id": args.job_id}  # fmt: skip
    body.update({k: v for k, v in flags.items() if v is not None})
    body.setdefault("auto_start", True)  # (`--set auto_start=false` creates a pending job)
    if training:
        body["training"] = training
    return body


# The create's fields by the flag of `submit` that sends each, when given; any other is a --set.
SUBMIT_FLAGS = {"model_path": "--model", "data_path": "--data", "output_dir": "--output-dir", "num_gpus": "--gpus",
                "priority": "--priority", "job_id": "--job-id"}  # fmt: skip
AFTER_FLAG = {"query.cursor": "--after"}
EXPORT_FLAGS = {"checkpoint": "--checkpoint", "output_name": "--output-name", "quant_bits": "--quant-bits",
                "quant_method": "--quant-method"}  # fmt: skip


def submit_flags(args: argparse.Namespace) -> dict[str, str]:
    """The flag that sent each field of this create (`--set model_path=...` is named as such, not as --model)."""
    given = {"model_path": args.model, "data_path": args.data, "output_dir": args.output_dir, "num_gpus": args.gpus,
             "priority": args.priority, "job_id": args.job_id}  # fmt: skip
    return {
        **{field: f"--set {field}" for field in TOP_LEVEL_FIELDS},
        "training.*": "--set",
        **{field: flag for field, flag in SUBMIT_FLAGS.items() if given[field] is not None},
    }


def submit(api: Api, args: argparse.Namespace, out: Output) -> int:
    with api.naming(submit_flags(args)):
        created = api.post("/jobs", create_body(args))
    out.show(created, render.action)
    if not args.follow:
        return EXIT_OK
    made = f"job {created['job_id']} was created: follow it with `swift-api watch {created['job_id']}`, do not " \
           "submit it again"  # fmt: skip
    try:
        return watch(api, created["job_id"], out)
    except CliError as e:
        # Exit 2 or 3 told a script that retries on them to submit the job again: it exists, and runs.
        raise CliError(f"{e} ({made})", EXIT_NOT_FOLLOWED) from e


def list_jobs(api: Api, args: argparse.Namespace, out: Output) -> int:
    with api.naming(AFTER_FLAG):
        body = api.get("/jobs", status=args.status, owner=args.owner, limit=args.limit, cursor=args.after)
    # The next page's command keeps this one's filters (without them it listed every job).
    again = ["ls", *(["--status", args.status] if args.status else []), *(["--owner", args.owner] if args.owner else
             []), *(["--limit", str(args.limit)] if args.limit != 50 else [])]  # fmt: skip
    out.show(body, lambda b: render.jobs(b, again))
    return EXIT_OK


def logs(api: Api, args: argparse.Namespace, out: Output) -> int:
    job_id, kind = args.job_id, "export" if args.export else "train"
    # A quantized export runs as a job of its own, with the log of its run: its parent has no export log (the
    # stream ended at once with "export none").
    if kind == "export" and (child := _quantized_export_job(api, job_id, out)):
        out.note(f"-- the export of {job_id} is quantized: it runs as job {child}, whose log this is")
        job_id, kind = child, "train"
    if args.follow:
        return tail(api, job_id, kind, out)
    body = api.get(job_path(job_id, "/logs"), limit=args.lines, kind=kind)
    if out.json:
        out.emit(body)
        return EXIT_OK
    with out.answer_shape():
        for line in body.get("lines", []):
            out.line(line)
    return EXIT_OK


def _quantized_export_job(api: Api, job_id: str, out: Output) -> str | None:
    """The job its newest export runs as, when that export is a quantized one. A job with no export is a usage
    error: its log was empty and exit 0, or, followed, "export none" and exit 1, "the job failed" (hunt CZ)."""
    with out.answer_shape():
        exports = api.get(job_path(job_id, "/exports"))["exports"]
        child = exports[-1]["job_id"] if exports else None
    if not exports:
        raise CliError(f"job {job_id} has no export to show the log of: export it with `swift-api export {job_id}`",
                       EXIT_USAGE)  # fmt: skip
    return child if isinstance(child, str) else None


def action(verb: str) -> Command:
    # A stop or a pause is answered once the run has ended: up to the server's STOP_GRACE_SECONDS (the client's 60 s
    # read said "cannot reach the server" for a stop that was under way); up to an hour, then "may have been done".
    wait = verb in ("stop", "pause")

    def run(api: Api, args: argparse.Namespace, out: Output) -> int:
        out.show(api.post(job_path(args.job_id, f"/{verb}"), wait=wait), render.action)
        return EXIT_OK

    return run


def show(path: str, renderer: Callable[[Any], Any]) -> Command:
    def run(api: Api, args: argparse.Namespace, out: Output) -> int:
        job_id = getattr(args, "job_id", None)
        out.show(api.get(job_path(job_id, path) if job_id is not None else path), renderer)
        return EXIT_OK

    return run


def export(api: Api, args: argparse.Namespace, out: Output) -> int:
    options = {"checkpoint": args.checkpoint, "output_name": args.output_name, "quant_bits": args.quant_bits,
               "quant_method": args.quant_method}  # fmt: skip
    body = {k: v for k, v in options.items() if v is not None}
    with api.naming(EXPORT_FLAGS):
        answer = api.post(job_path(args.job_id, "/export"), body or None)
    out.show(answer, render.action)
    return EXIT_OK


def upload(api: Api, args: argparse.Namespace, out: Output) -> int:
    body = api.upload("/files", Path(args.file), args.purpose)
    if out.json:
        out.emit(body)
        return EXIT_OK
    with out.answer_shape():
        out.console.print(render.text(f"{body['id']}  {body['rows']} rows  {body['bytes']} bytes  sha256 "
                                      f"{body['sha256'][:12]}…  (use it as --data {body['id']})"))  # fmt: skip
    return EXIT_OK


def list_files(api: Api, args: argparse.Namespace, out: Output) -> int:
    with api.naming(AFTER_FLAG):
        body = api.get("/files", limit=args.limit, offset=args.offset or None, cursor=args.after)
    if out.json:
        out.emit(body)
        return EXIT_OK
    with out.answer_shape():
        for f in body["files"]:
            out.line(
                f"{f['id']}  {f['purpose']:5}  {f['rows'] or '?':>8} rows  {f['bytes']:>12} bytes  {f['filename']}"
            )
        # The next page by cursor: uploads deleted meanwhile (a clean-up walking the list) shift none out of it.
        limit = f" --limit {args.limit}" if args.limit != 50 else ""
        more = f"; the next page: files{limit} --after {body['next_cursor']}" if body.get("next_cursor") else ""
        shown = f"{args.offset + 1}-{args.offset + len(body['files'])}" if args.after is None else len(body["files"])
        # On stdout, as ls and queue write theirs: a script's `| tail -1` found the next page there only (hunt CJ).
        out.footer(f"{shown} of {body['total']} files{more}" if body["files"] else f"no files ({body['total']} in all)")
    return EXIT_OK


def queue(api: Api, args: argparse.Namespace, out: Output) -> int:
    body = api.get("/queue", limit=args.limit, offset=args.offset or None)
    out.show(body, lambda b: render.queue(b, args.offset, args.limit))
    return EXIT_OK


def artifacts(api: Api, args: argparse.Namespace, out: Output) -> int:
    body = api.get(job_path(args.job_id, "/artifacts"))
    if out.json:
        out.emit(body)
        return EXIT_OK
    with out.answer_shape():
        for f in body["files"]:
            out.line(f"{f['size']:>12}  {f['kind']:11}  {f['path']}")
        for d in body.get("folders", []):
            out.line(f"{d['size']:>12}  {d['kind'] + '/':11}  {d['tar']}")
    return EXIT_OK


def download(api: Api, args: argparse.Namespace, out: Output) -> int:
    """A file, or a folder as `<folder>.tar`, from the job's output folder."""
    if ".." in PurePosixPath(args.path).parts:
        # (the HTTP client would fold them into the URL, and the server answer a bare 404 for another path)
        raise CliError(f"{args.path!r}: name a path inside the job's output folder, without '..' parts "
                       f"(see: swift-api artifacts {args.job_id})", EXIT_USAGE)  # fmt: skip
    url = job_path(args.job_id, "/artifacts/" + quote(args.path.strip("/")))
    if args.output == "-":  # (as with curl -o -: the bytes to standard output, for a pipe; nothing else there)
        written = api.download(url, None)
        if not out.json:
            out.note(f"standard output: {written} bytes")
        return EXIT_OK
    name = PurePosixPath(args.path).name
    target = Path(args.output or name)
    if args.output and (args.output.endswith("/") or target.is_dir()) and name:
        target = target / name  # (as cp does: `-o models/` wrote a file named models, hunt CZ)
    if not target.name:
        # '/' or '.' asks for the whole output folder, which has no name of its own to save it under
        raise CliError(f"{args.output or args.path!r} names no file to write: name one with -o FILE, or give a PATH "
                       f"that names a file or folder (see: swift-api artifacts {args.job_id})", EXIT_USAGE)  # fmt: skip
    written = api.download(url, target)
    if out.json:
        out.emit({"job_id": args.job_id, "path": args.path, "file": str(target), "bytes": written})
    else:
        out.console.print(render.text(f"{target}: {written} bytes"))
    return EXIT_OK


def set_priority(api: Api, args: argparse.Namespace, out: Output) -> int:
    out.show(api.call("PATCH", job_path(args.job_id), body={"priority": args.priority}), render.priority)
    return EXIT_OK


def remove(api: Api, args: argparse.Namespace, out: Output) -> int:
    api.call("DELETE", job_path(args.job_id))
    if out.json:
        out.emit({"job_id": args.job_id, "deleted": True})
    else:
        out.console.print(render.text(f"{args.job_id} deleted (its output folder stays on disk)"))
    return EXIT_OK


def signing_key(api: Api, args: argparse.Namespace, out: Output) -> int:
    if args.owner is not None and not args.rotate:
        raise CliError("--owner goes with --rotate: an admin key replaces another owner's key (it shows no one's)",
                       EXIT_USAGE)  # fmt: skip
    if args.rotate:
        # (--owner "" goes to the API, which refuses it: left out, it rotated the admin's own key)
        owner = {"owner": args.owner} if args.owner is not None else None
        body = api.call("POST", "/webhooks/signing-key/rotate", params=owner)
    else:
        body = api.get("/webhooks/signing-key")
    if out.json:
        out.emit(body)
        return EXIT_OK
    with out.answer_shape():
        key, generation = str(body["signing_key"]), int(body.get("generation", 0))  # (a server before rotation)
    out.line(key)  # (alone on its line: `KEY=$(swift-api signing-key)`)
    if args.rotate:
        out.note(f"rotated (generation {generation}): your jobs' notifications are signed with this key from now on")
    return EXIT_OK


def run_watch(api: Api, args: argparse.Namespace, out: Output) -> int:
    return watch(api, args.job_id, out)


def _up_to(most: int, least: int = 1) -> Callable[[str], int]:
    """A count from `least` to the most the API's route takes: past it, its 422 named the query parameter
    (`limit`), which this command does not have."""

    def count(raw: str) -> int:
        value = int(raw)
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"must be from {least} to {most}, got {value}")
        return value

    count.__name__ = "count"  # argparse names the type in its "invalid count value" message
    return count


def build_parser() -> argparse.ArgumentParser:
    # The shared options are accepted before or after the command (`swift-api --json ls`, `swift-api ls --json`);
    # SUPPRESS keeps a subcommand's unset default from overwriting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help=f"server root or API URL (env SWIFT_API_URL, default {DEFAULT_URL})")  # fmt: skip
    common.add_argument("--key", default=argparse.SUPPRESS, help="API key (env SWIFT_API_KEY)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the API's JSON (one document per line) instead of tables")  # fmt: skip
    parser = argparse.ArgumentParser(prog="swift-api", parents=[common], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Command, summary: str, job: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=summary)
        sub.set_defaults(run=run)
        if job:
            sub.add_argument("job_id", metavar="ID")
        return sub

    sub = command("submit", submit, "create a job (auto_start) and optionally follow it", job=False)
    sub.add_argument("--model", required=True, help="hub id or model folder")
    sub.add_argument("--data", required=True, help="hub data set id or .jsonl/.json/.csv file")
    sub.add_argument("--output-dir", required=True, help="folder under the server's OUTPUT_ROOT")
    sub.add_argument("--gpus", type=int, help="number of GPUs (0: CPU only)")
    sub.add_argument("--priority", type=int, help="0-10, 10 first")
    sub.add_argument("--job-id", help="the job's id (default: chosen by the server)")
    sub.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="a training parameter (max_steps=20) or a create field (time_limit=2h, max_retries=2); "
                          "values are JSON when they parse; repeatable")  # fmt: skip
    sub.add_argument("--follow", action="store_true", help="then watch it; exit 0 if it completes, 1 if not")

    sub = command("ls", list_jobs, "list jobs, newest first", job=False)
    sub.add_argument("--status", choices=[s.value for s in JobStatus])
    sub.add_argument("--owner", help="another owner's jobs (admin key)")
    sub.add_argument("--limit", type=_up_to(500), default=50)
    sub.add_argument("--after", metavar="CURSOR", help="the page after this one (the cursor the last page printed)")

    command("status", show("/status", render.job_status), "a job's status, progress and error")

    sub = command("logs", logs, "a job's log")
    follow_help = (
        "print the current run's whole log (a resumed job's earlier runs: GET .../logs?attempt=N), then "
        "follow it until the job ends (exit 0 if it completed)"
    )
    sub.add_argument("-f", "--follow", action="store_true", help=follow_help)
    sub.add_argument("--lines", type=_up_to(10_000), default=100, help="last N lines (without -f)")
    sub.add_argument(
        "--export",
        action="store_true",
        help="the newest export's log instead of the training's (a quantized export's: its job's)",
    )

    command("watch", run_watch, "a live progress bar until the job ends; exit 0 if it completed, 1 if not")
    command("start", action("start"), "start a pending job (one submitted with --set auto_start=false while its "
            "GPUs were free; a queued one starts by itself)")  # fmt: skip
    command("stop", action("stop"), "stop a running job, or cancel a waiting one")
    command("pause", action("pause"), "pause a running job (it resumes from its last checkpoint)")
    command("resume", action("resume"), "resume a paused job, or a stopped/failed one with a checkpoint")
    sub = command("export", export, "merge a LoRA checkpoint (default: the last) into the model")
    sub.add_argument("--checkpoint", help="one of the job's checkpoints, e.g. checkpoint-20")
    sub.add_argument("--output-name", help="write it to <output_dir>/exports/<name>")
    sub.add_argument("--quant-bits", type=int, help="quantize (runs as a GPU job of its own), e.g. 4")
    sub.add_argument("--quant-method", help="awq, gptq, bnb or fp8")
    sub = command("upload", upload, "upload a data set (.jsonl/.json/.csv); prints its file id", job=False)
    sub.add_argument("file", metavar="FILE")
    sub.add_argument("--purpose", choices=["sft", "pt", "rlhf"], default="sft")
    sub = command("files", list_files, "your uploaded data sets, newest first", job=False)
    sub.add_argument("--limit", type=_up_to(500), default=50)
    sub.add_argument("--offset", type=_up_to(10_000_000, 0), default=0, help="skip the newest N")
    sub.add_argument("--after", metavar="CURSOR", help="the page after this one (the cursor the last page printed)")
    command("artifacts", artifacts, "the files a job wrote (checkpoints, logging.jsonl, images, ...)")
    sub = command("download", download, "download a job's file, or a folder as <folder>.tar")
    sub.add_argument("path", metavar="PATH", help="as `artifacts` lists it, e.g. v0-.../checkpoint-20.tar")
    sub.add_argument("-o", "--output", help="where to write it (default: its name, here; - for standard output)")
    sub = command("priority", set_priority, "change a waiting job's priority")
    sub.add_argument("priority", type=int, metavar="N", help="0-10, 10 first")
    sub = command("queue", queue, "the GPU queue in order", job=False)
    sub.add_argument("--limit", type=_up_to(500), default=100)
    sub.add_argument("--offset", type=_up_to(10_000_000, 0), default=0, help="from position N + 1")
    command("gpus", show("/gpus", render.gpu_list), "the GPUs and the jobs holding them", job=False)
    command("rm", remove, "delete a job's record (never its output on disk)")
    sub = command("signing-key", signing_key, "the key that signs the notifications to your jobs' own webhook_url "
                  "(X-Swift-Api-Signature)", job=False)  # fmt: skip
    sub.add_argument("--rotate", action="store_true", help="replace it first: the one before signs no more")
    sub.add_argument("--owner", help="with --rotate, an admin key: replace another owner's key (printed to you)")
    return parser


class _Signalled(BaseException):
    """SIGTERM or SIGHUP, raised where the command is, as Ctrl-C is: a download's clean-up then runs (killed,
    it left gigabytes of hidden partial file behind: hunt CZ)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: object) -> None:
    raise _Signalled(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits 2 on a usage error
    if sys.stdout is None:  # (started with standard output closed, `>&-`: what print() does, not a traceback)
        sys.stdout = open(os.devnull, "w")
    for stream in (sys.stdout, sys.stderr):
        # An output whose encoding cannot hold the text (a Windows console's or redirect's GBK or cp1252, a locale
        # without UTF-8): what it cannot hold goes out as \uXXXX, not a traceback (exit 1: "the job failed"), nor
        # a `logs` that blamed the server ("not what a swift-api server sends", exit 3).
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    out = Output(getattr(args, "json", False))
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # (`nohup swift-api download ...` must outlive a logout)
            signal.signal(signum, _raise_signalled)
    try:
        with Api(getattr(args, "url", None), getattr(args, "key", None)) as api:
            code: int = args.run(api, args, out)
            return code
    except CliError as e:
        out.error(str(e))
        return e.code
    except KeyboardInterrupt:
        return 130
    except _Signalled as e:
        return 128 + e.signum
    except BrokenPipeError:
        # `swift-api logs ID | head`: the reader has gone. Point stdout at /dev/null so that Python's own flush at
        # exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:
        # Writing the output failed (a full disk, an I/O error): not "the job failed" (1), nor a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        with contextlib.suppress(OSError):
            print(f"error: cannot write the output: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
