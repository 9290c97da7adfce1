"""What swift leaves in its output folder: `v*-*/checkpoint-N` folders and the run's `logging.jsonl`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from application.services.log_parser import ParseResult, RunFacts, SwiftLogParser, checkpoint_value
from application.services.step_dicts import normalize_step_dict
from application.utils.regular_files import open_regular

_CHECKPOINT_DIR_RE = re.compile(r"checkpoint-(\d+)")
_VERSION_DIR_RE = re.compile(r"v(\d+)-.+")
# What is read of a logging.jsonl is its end: its last TAIL_BYTES (the last steps, the train summary, the final
# summary when it fits), and the head of its last line (the final summary, which holds the whole log_history,
# names the checkpoints first). All of it was read, with a point kept per step: 479 MB (3M steps) took a
# scheduler to 3.9 GB and minutes of the GIL its leader's renewals need, and a runner to 1.35 GB (hunt BX).
# A line longer than LINE_MAX_BYTES is none swift writes; the last line's start is looked for FILE_MAX_BYTES back.
TAIL_BYTES = 4 << 20
LINE_MAX_BYTES = 64 << 20
FILE_MAX_BYTES = 1 << 30
_HEAD_BYTES = 64 << 10
_SUMMARY_KEY = re.compile(rb'"(last_model_checkpoint|best_model_checkpoint)": *("(?:[^"\\]|\\.)*"|null)')


@dataclass
class LoggingJsonl(RunFacts):
    """What swift's `<run dir>/logging.jsonl` says (`finished` once its summary line is there), and its points."""

    history: list[dict[str, Any]] = field(default_factory=list)


def parse_logging_jsonl(path: Path | str, resumed_at: int | None = None) -> LoggingJsonl:
    """Read logging.jsonl's end (numeric JSON, one line per logged step, then a summary line holding
    last_model_checkpoint and log_history); for when stdout was lost. `history`: the points of the steps read. A
    missing file gives an empty result; a half-written last line is skipped. `resumed_at`: the step the run
    resumed from (its checkpoint's)."""
    result = LoggingJsonl()
    parser = SwiftLogParser()
    parser.resumed_at = resumed_at
    lines, last_head = _tail(path)
    for data in lines:
        if len(data) > LINE_MAX_BYTES:
            continue
        line = data.decode("utf-8", errors="replace").strip()
        if not line.startswith("{"):
            continue
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                continue
            if "last_model_checkpoint" in raw or "log_history" in raw:
                result.finished = True
                last = raw.get("last_model_checkpoint")
                best = raw.get("best_model_checkpoint")
                result.last_checkpoint = checkpoint_value(last) if isinstance(last, str) else None
                result.best_checkpoint = checkpoint_value(best) if isinstance(best, str) else None
                continue
            step_result = ParseResult()
            parser.handle_step_dict(normalize_step_dict(raw), step_result, live=False)
        except (ValueError, ArithmeticError, RecursionError):
            continue  # (a half-written last line; a value no number fits: 1 and 400 zeros)
        result.history.extend(step_result.history)
    if not result.finished and last_head.startswith(b"{"):
        # A final summary longer than what was read: its head names the checkpoints.
        named = {key: json.loads(value) for key, value in _SUMMARY_KEY.findall(last_head)}
        if b"last_model_checkpoint" in named:
            result.finished = True
            last, best = named.get(b"last_model_checkpoint"), named.get(b"best_model_checkpoint")
            result.last_checkpoint = checkpoint_value(last) if isinstance(last, str) else None
            result.best_checkpoint = checkpoint_value(best) if isinstance(best, str) else None
    result.progress = parser.progress
    result.train_loss = parser.train_loss
    result.train_runtime = parser.train_runtime
    return result


def _tail(path: Path | str) -> tuple[list[bytes], bytes]:
    """A regular file's whole lines among its last TAIL_BYTES, oldest first; when its last line is longer than
    those, that line's first _HEAD_BYTES and the whole lines among the TAIL_BYTES before it. Opened without
    following a last link and never blocking (a FIFO there held the runner, then the watchdog, for ever; /dev/zero
    behind a link filled their memory). Nothing for anything else, or a file that cannot be opened."""
    try:
        f = open_regular(path, follow=False)
    except (OSError, ValueError):
        return [], b""
    with f:
        end = f.seek(0, os.SEEK_END)
        lines = _lines_before(f, end)
        if lines is not None:
            return lines, b""
        last = _line_start(f, end - TAIL_BYTES, end)
        f.seek(last)
        head = f.read(_HEAD_BYTES)
        return _lines_before(f, last) or [], head


def _lines_before(f: BinaryIO, end: int) -> list[bytes] | None:
    """The whole lines among the TAIL_BYTES before `end`; None when the last of them starts before those."""
    start = max(0, end - TAIL_BYTES)
    f.seek(start)
    data = f.read(end - start)
    if start > 0:
        cut = data.find(b"\n", 0, len(data) - 1)  # (not the newline that ends the last line)
        if cut < 0:
            return None
        data = data[cut + 1 :]
    return [line for line in data.split(b"\n") if line]


def _line_start(f: BinaryIO, inside: int, end: int) -> int:
    """Where the line that holds offset `inside` starts: looked for backwards by blocks, FILE_MAX_BYTES at most."""
    pos = inside
    while pos > 0 and end - pos < FILE_MAX_BYTES:
        size = min(1 << 20, pos)
        f.seek(pos - size)
        found = f.read(size).rfind(b"\n")
        if found >= 0:
            return pos - size + found + 1
        pos -= size
    return pos


def job_checkpoints(output_dir: Path | str, run_dirs: Iterable[str | None]) -> list[str]:
    """The checkpoints of one job's runs (its attempts' run dirs), in the order of `find_checkpoints`; every
    one under `output_dir` when none of its run dirs is known yet."""
    dirs = tuple(dict.fromkeys(d.rstrip("/") for d in run_dirs if d))
    root = Path(output_dir)
    runs = [(Path(d), _VERSION_DIR_RE.fullmatch(Path(d).name)) for d in dirs]
    if dirs and all(m is not None and path.parent == root for path, m in runs):
        # Only its own run folders are listed: the folder may hold many other runs (and their files).
        found: list[tuple[tuple[int, str], int, str]] = []
        for path, m in runs:
            assert m is not None
            if not path.is_symlink():  # (a link made since leads out of the job's folder)
                _scan(path, (int(m.group(1)), path.name), found)
        return _in_order(found)
    on_disk = find_checkpoints(output_dir)
    prefixes = tuple(d + "/" for d in dirs)
    return [c for c in on_disk if c.startswith(prefixes)] if prefixes else on_disk


def find_checkpoints(output_dir: Path | str) -> list[str]:
    """Every `checkpoint-N` under the run dirs (`v<k>-<time>`) of `output_dir`, oldest run first,
    then by N; the last one is the newest on disk. `-merged` export dirs and the `last-checkpoint`
    symlink are left out. Checkpoints directly in `output_dir` (given a run dir) count too."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found: list[tuple[tuple[int, str], int, str]] = []
    _scan(root, (-1, ""), found)
    try:
        with os.scandir(root) as it:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it if _VERSION_DIR_RE.fullmatch(e.name)]
    except OSError:
        children = []
    for name, is_dir in children:
        vm = _VERSION_DIR_RE.fullmatch(name)
        if vm is None or not is_dir:
            continue
        # swift numbers each run one past the highest v<k> there: that is the runs' order. (A folder's mtime
        # is not: an export writing checkpoint-N-merged into an old run made it the "newest", and a resume
        # went back to its checkpoint.)
        _scan(root / name, (int(vm.group(1)), name), found)
    return _in_order(found)


def _scan(run_dir: Path, run_key: tuple[int, str], found: list[tuple[tuple[int, str], int, str]]) -> None:
    # scandir: the entry's type comes with its name, no stat per entry (a run folder may hold thousands of files)
    try:
        with os.scandir(run_dir) as it:
            for entry in it:
                m = _CHECKPOINT_DIR_RE.fullmatch(entry.name)
                if m and entry.is_dir(follow_symlinks=False):
                    found.append((run_key, int(m.group(1)), os.path.join(run_dir, entry.name)))
    except OSError:
        return


def _in_order(found: list[tuple[tuple[int, str], int, str]]) -> list[str]:
    found.sort(key=lambda item: (item[0], item[1]))
    return [path for _, _, path in found]
