"""What swift leaves in its output folder: `v*-*/checkpoint-N` folders and the run's `logging.jsonl`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from application.services.log_parser import ParseResult, RunFacts, SwiftLogParser, checkpoint_value
from application.services.step_dicts import normalize_step_dict
from application.utils.regular_files import open_regular

_CHECKPOINT_DIR_RE = re.compile(r"checkpoint-(\d+)")
_VERSION_DIR_RE = re.compile(r"v(\d+)-.+")
# The summary line holds the whole log_history (megabytes for a long run): a line longer than this is none swift
# writes (read through in blocks, skipped), and no more than FILE_MAX_BYTES of a file is read.
LINE_MAX_BYTES = 64 << 20
FILE_MAX_BYTES = 1 << 30


@dataclass
class LoggingJsonl(RunFacts):
    """What swift's `<run dir>/logging.jsonl` says (`finished` once its summary line is there), and its points."""

    history: list[dict[str, Any]] = field(default_factory=list)


def parse_logging_jsonl(path: Path | str) -> LoggingJsonl:
    """Read logging.jsonl (numeric JSON, one line per logged step, then a summary line holding
    last_model_checkpoint and log_history); for when stdout was lost. A missing file gives an
    empty result; a half-written last line is skipped."""
    result = LoggingJsonl()
    parser = SwiftLogParser()
    for data in _lines(path):
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
    result.progress = parser.progress
    result.train_loss = parser.train_loss
    result.train_runtime = parser.train_runtime
    return result


def _lines(path: Path | str) -> Iterator[bytes]:
    """A regular file's lines, at most LINE_MAX_BYTES each: opened without following a last link and never
    blocking (a FIFO there held the runner, then the watchdog, for ever; /dev/zero behind a link filled their
    memory). Nothing for anything else, or a file that cannot be opened."""
    try:
        f = open_regular(path, follow=False)
    except (OSError, ValueError):
        return
    with f:
        read = 0
        while read < FILE_MAX_BYTES:
            line = f.readline(LINE_MAX_BYTES)
            read += len(line)
            if not line:
                return
            if len(line) < LINE_MAX_BYTES or line.endswith(b"\n"):
                yield line
                continue
            while read < FILE_MAX_BYTES and (rest := f.readline(1 << 20)):  # the rest of the long line
                read += len(rest)
                if rest.endswith(b"\n"):
                    break


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
