"""Reading what ms-swift prints while it trains or exports (what it leaves on disk: `run_outputs`; the error
that ended a failed run: `swift_errors`).

Everything here is checked against captured real output (tests/fixtures/swift, ms-swift 4.6.0 and
3.5.3). The formats differ by version:

* 4.x prints per-step dicts whose values are all strings (``'loss': '8.264'``,
  ``'train_speed(s/it)': '0.1074'``), with no 'percentage'.
* 3.x prints numbers, plus ``'percentage': '5.00%'``, ``'memory(GiB)'`` and
  ``'train_speed(iter/s)'`` (the inverse of 4.x's seconds per step).

The log being parsed is stdout and stderr in one file, so tqdm bars (rewritten with \\r on stderr)
and the step dicts (stdout) interleave: input is split on both \\r and \\n, and markers are searched
for anywhere in a segment, not only at its start.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from application.models.training_model import Progress
from application.services import clock
from application.services.path_sandbox import RealFolder
from application.services.step_dicts import (
    duration_text,
    finite,
    parse_duration,
    parse_step_dict,
)

# Linear in the line's length, however it repeats their words (a trainer's line is not ours to trust; the runner
# parses in its event loop, and one that stops beating is killed as hung): matched against a segment with its
# trailing blanks cut (`parse_segment`), so a path ends the line, with the logger's name bounded, and `run sh`
# tried at its first place only. Written as `(.+?)\s*$` and `[^\]]*`, a path followed by 300 KB of blanks, or
# "[INFO:" said 16,000 times, took seconds to minutes.
_RUN_DIR_RE = re.compile(r"\[INFO:[^\]]{0,64}\] output_dir: (?P<path>.+)$")
_SAVING_RE = re.compile(r"Saving model checkpoint to (?P<path>.+)$")
_LAST_CKPT_RE = re.compile(r"\[INFO:[^\]]{0,64}\] last_model_checkpoint: (?P<path>.*)$")
_BEST_CKPT_RE = re.compile(r"\[INFO:[^\]]{0,64}\] best_model_checkpoint: (?P<path>.*)$")
# 4.x: "saved in `/x-merged`."; 3.x: "saved in /x-merged."
_MERGED_RE = re.compile(r"Successfully merged LoRA and saved in (?P<path>.+)$")
_RUN_SH = "run sh: `"
_RUN_SH_RE = re.compile(r"run sh: `(?P<cmd>.*)`$")
# swift echoes a data set's first sample as it starts ([INPUT], [LABELS], [CHOSEN_INPUT], ...): the user's text,
# line by line, up to its next logger line.
_SAMPLE_RE = re.compile(r"\[INFO:swift\] \[[A-Z_]+\] ")
_LOGGER_LINE_RE = re.compile(r"\[(?:INFO|WARNING|ERROR|DEBUG|CRITICAL):\w[\w.]*\] ")
# The trainer's tqdm bar, redrawn every optimizer step, while step dicts only come every
# logging_steps: "Train:  38%|███▊      | 1150/3000 [00:25<00:38, 47.81it/s]" (or "2.50s/it").
_TRAIN_BAR_RE = re.compile(
    r"Train:\s*\d+%\|[^|]*\|\s*(?P<n>\d{1,18})/(?P<total>\d{1,18})\s*"
    r"\[(?P<elapsed>[\d:]{1,20})<(?P<remaining>[\d:]{1,20}|\?)"
    r"(?:,\s*(?:(?P<rate>[\d.]+)(?P<unit>it/s|s/it)|\?it/s))?"
)


# A segment with no \r or \n for this long is not a log line (binary junk, or a bar that never
# ends); it is dropped rather than held in memory forever.
_MAX_PARTIAL_BYTES = 1 << 20
SEEN_POINTS_KEPT = 1024  # (step, kind) keys remembered to skip the same step's dict from another rank


def _dict_kind(d: dict[str, Any]) -> str:
    if "train_runtime" in d:
        return "summary"
    if "eval_loss" in d or any(k.startswith("eval_") for k in d):
        return "eval"
    if "loss" in d:
        return "train"
    if "current_step" in d and _metrics(d):
        # A trainer that logs no `loss` (PPO: objective/*, loss/policy_avg, lr...): its step is a point all the
        # same, with those numbers (its history was empty).
        return "train"
    return "other"


def _merge_progress(previous: Progress | None, d: dict[str, Any], kind: str) -> Progress:
    """The progress after one step dict; fields the dict lacks keep their earlier values (an eval
    dict has no training loss, the summary has neither)."""
    data = previous.model_dump() if previous is not None else {}
    if "current_step" in d:
        data["current_step"] = d["current_step"]
        data["max_steps"] = d["max_steps"]
    pct = finite(d.get("percentage"))
    if pct is None and data.get("current_step") is not None and data.get("max_steps"):
        pct = round(100.0 * data["current_step"] / data["max_steps"], 2)
    if pct is not None:
        data["percentage"] = pct
    if (epoch := finite(d.get("epoch"))) is not None:
        data["epoch"] = epoch
    # A figure the dict has but that is no number (a diverged run's nan) is no value now, not the last good one.
    if kind == "train":
        for key in ("loss", "learning_rate", "grad_norm", "token_acc"):
            if key in d:
                data[key] = finite(d[key])
        if "learning_rate" not in d and "lr" in d:
            data["learning_rate"] = finite(d["lr"])
    if kind == "eval" and "eval_loss" in d:
        data["eval_loss"] = finite(d["eval_loss"])
    for key in ("elapsed_time", "remaining_time"):
        if d.get(key) is not None:
            data[key] = duration_text(str(d[key]))
    if d.get("remaining_time") is not None:
        data["remaining_seconds"] = parse_duration(str(d["remaining_time"]))
    if (spi := finite(d.get("train_speed(s/it)"))) is not None:
        data["train_speed"] = spi
    elif (ips := finite(d.get("train_speed(iter/s)"))) is not None:
        data["train_speed"] = 1.0 / ips if ips > 0 else None
    if (mem := finite(d.get("memory(GiB)"))) is not None:
        data["memory_gib"] = mem
    data["updated_at"] = clock.now()
    return Progress(**data)


def _merge_bar(previous: Progress | None, m: re.Match[str], anchor: tuple[int, float] | None = None) -> Progress | None:
    """The progress after a tqdm Train bar, or None when it says nothing new (a redraw). `anchor`: the step and
    epoch of the last step dict, which the epoch between logged steps is scaled from."""
    n, total = int(m.group("n")), int(m.group("total"))
    if total <= 0:
        return None
    data = previous.model_dump() if previous is not None else {}
    current = data.get("current_step")
    if current is not None and (n < current or (n == current and data.get("max_steps") == total)):
        return None
    # The epoch is the last step dict's, logged every logging_steps: carried as it was, it lagged the bar's step
    # (step 4 of 6 at epoch 1.5 with 2 steps an epoch: hunt DH). Epochs go as steps do, from that dict's own
    # (scaled from the last bar's, the rounding compounded: 1.19 for 1.0, or 0 for good: review DL).
    if anchor is not None and anchor[0] > 0 and anchor[1] > 0:
        data["epoch"] = round(anchor[1] * n / anchor[0], 4)
    data["current_step"] = n
    data["max_steps"] = total
    data["percentage"] = round(100.0 * n / total, 2)
    data["elapsed_time"] = duration_text(m.group("elapsed"))
    remaining = m.group("remaining")
    if remaining != "?":
        data["remaining_time"] = duration_text(remaining)
        data["remaining_seconds"] = parse_duration(remaining)
    rate = finite(m.group("rate"))
    if rate is not None and rate > 0:
        data["train_speed"] = rate if m.group("unit") == "s/it" else 1.0 / rate
    data["updated_at"] = clock.now()
    return Progress(**data)


# A step dict's keys that are a point's own fields, or say where the run is and how fast: every other number is
# one of the run's metrics (DPO's rewards/margins and logps/*, KTO's kl, ORPO's nll_loss, token_acc, eval_*).
# PPO (trl) names its learning rate `lr`.
_POINT_KEYS = frozenset({"loss", "eval_loss", "learning_rate", "lr", "grad_norm", "epoch", "global_step/max_steps",
                         "current_step", "max_steps", "percentage", "elapsed_time", "remaining_time",
                         "train_speed(s/it)", "train_speed(iter/s)", "memory(GiB)"})  # fmt: skip
MAX_METRICS = 32


def _metrics(d: dict[str, Any]) -> dict[str, float]:
    found = ((key, finite(value)) for key, value in d.items() if key not in _POINT_KEYS and len(key) <= 64)
    return dict(itertools.islice(((key, value) for key, value in found if value is not None), MAX_METRICS))


def _history_point(d: dict[str, Any], kind: str, when: float | None) -> dict[str, Any]:
    """A point shaped like the API's LossPoint."""
    point = {
        "step": d["current_step"],
        "loss": finite(d.get("loss")) if kind == "train" else None,
        "eval_loss": finite(d.get("eval_loss")) if kind == "eval" else None,
        "learning_rate": finite(d["learning_rate"] if "learning_rate" in d else d.get("lr")),
        "grad_norm": finite(d.get("grad_norm")),
        "epoch": finite(d.get("epoch")),
        "time": when,
    }
    if metrics := _metrics(d):
        point["metrics"] = metrics
    return point


def checkpoint_value(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "None", "null") or "\x00" in text else text


# ---------------------------------------------------------------------------------------------
# What a run left behind


@dataclass
class RunFacts:
    """What a run's output says about it, from its log (the parser) or its logging.jsonl; merged at the end."""

    progress: Progress | None = None
    run_dir: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    train_loss: float | None = None
    train_runtime: float | None = None
    # The trainer got to its end (swift printed last_model_checkpoint, or the summary line was written).
    finished: bool = False

    def merged(self, other: RunFacts | None) -> RunFacts:
        """These facts, with what they lack taken from `other` (the log may lack lines logging.jsonl has)."""
        if other is None:
            return self
        return RunFacts(
            progress=self.progress or other.progress,
            run_dir=self.run_dir or other.run_dir,
            checkpoints=self.checkpoints or other.checkpoints,
            last_checkpoint=self.last_checkpoint or other.last_checkpoint,
            best_checkpoint=self.best_checkpoint or other.best_checkpoint,
            train_loss=self.train_loss if self.train_loss is not None else other.train_loss,
            train_runtime=self.train_runtime if self.train_runtime is not None else other.train_runtime,
            finished=self.finished or other.finished,
        )


# ---------------------------------------------------------------------------------------------
# Incremental parser


@dataclass
class ParseResult:
    """What one `feed` found; fields stay None / empty when the chunk said nothing about them."""

    progress: Progress | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: str | None = None
    checkpoints_saved: list[str] = field(default_factory=list)
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    train_loss: float | None = None
    train_runtime: float | None = None
    merged_path: str | None = None
    command_line: str | None = None
    # Set when swift printed `last_model_checkpoint:` (its end-of-training lines), even as 'None':
    # the trainer finished or was interrupted, rather than died mid-step.
    training_ended: bool = False
    # The first step whose training loss was no number (nan, inf): the run diverged. Once per run.
    diverged_at: int | None = None

    def changed(self) -> bool:
        return bool(
            self.progress is not None
            or self.history
            or self.run_dir is not None
            or self.checkpoints_saved
            or self.last_checkpoint is not None
            or self.best_checkpoint is not None
            or self.train_loss is not None
            or self.train_runtime is not None
            or self.merged_path is not None
            or self.command_line is not None
            or self.training_ended
        )


class SwiftLogParser:
    """Incremental parser for swift's combined stdout+stderr log, fed raw bytes as the file grows.

    Besides each `feed`'s ParseResult, it keeps the state so far as attributes.
    """

    def __init__(self, started_at: float | None = None, root: str | None = None) -> None:
        # The job's output folder: a path the log names outside it is not the run's. swift echoes a data set's
        # first row into its log, so a row can print "[INFO:swift] last_model_checkpoint: <another owner's
        # checkpoint>", which an export would then have merged into this owner's folder.
        self._root = RealFolder(root) if root else None
        # When the trainer's clock started, as well as the log tells: a step ran at this + its elapsed_time.
        # Every live reading (read time - elapsed) can only be late, so the earliest is the best; a run's
        # process start bounds it from below.
        self._clock_floor = started_at
        self._clock: float | None = None
        self._partial = b""
        self._in_sample = False
        self._epoch_at: tuple[int, float] | None = None  # the last step dict's step and epoch (`_merge_bar`)
        self._unreadable = 0  # lines skipped because reading them raised
        # The newest points only: ranks print a step's dict within lines of each other, and a set of every step
        # held 130 B per step for the whole run (a runner at 19 steps/s grew for ever: hunt AN).
        self._seen_points: dict[tuple[int, str], None] = {}
        self._diverged = False
        self.progress: Progress | None = None
        self.run_dir: str | None = None
        self.command_line: str | None = None
        self.checkpoints: list[str] = []
        self._saved: set[str] = set()  # (the checkpoints, to look up: a log of 200,000 saves took 198 s, hunt BX)
        self.last_checkpoint: str | None = None
        self.best_checkpoint: str | None = None
        self.train_loss: float | None = None
        self.train_runtime: float | None = None
        self.merged_path: str | None = None
        self.training_ended = False
        self.resumed_at: int | None = None  # the step a resumed run goes on from

    def resume_from(self, progress: Progress) -> None:
        """A resumed run: its progress goes on from where the job stood (`current_step`, its checkpoint's step)."""
        self.progress = progress
        self.resumed_at = progress.current_step

    def feed(self, data: bytes) -> ParseResult:
        """Parse the complete segments in `data` (plus what was left over); a trailing segment with
        no \\r or \\n yet waits for the next call."""
        result = ParseResult()
        buf = self._partial + data
        cut = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
        if cut < 0:
            self._partial = buf
        else:
            self._partial = buf[cut + 1 :]
            self._parse_block(buf[:cut], result)
        if len(self._partial) > _MAX_PARTIAL_BYTES:
            self._partial = b""
        # tqdm writes its newest frame with no \r after it until the next redraw: read a complete bar now
        # (without consuming it), or progress would lag one step behind, forever on a hung trainer.
        if self._partial.lstrip().startswith(b"Train:") and self._partial.rstrip().endswith(b"]"):
            self._safely(self._read_bar, self._partial.decode("utf-8", errors="replace"), result)
        return result

    def _read_bar(self, tail: str, result: ParseResult) -> None:
        if m := _TRAIN_BAR_RE.search(tail):
            progress = _merge_bar(self.progress, m, self._epoch_at)
            if progress is not None:
                self.progress = result.progress = progress

    def _safely(self, parse: Callable[[str, ParseResult], None], seg: str, result: ParseResult) -> None:
        try:
            parse(seg, result)
        except (ValueError, ArithmeticError, RecursionError) as exc:
            # What the trainer prints is not ours to trust (a number of 400 digits, a NUL in a path): raised on,
            # it ended the runner, and a run that trained to its end was "runner lost".
            if not self._unreadable:
                logger.warning("a log line this parser cannot read was skipped ({}: {})", type(exc).__name__,
                               str(exc)[:200])  # fmt: skip
            self._unreadable += 1

    def facts(self) -> RunFacts:
        return RunFacts(
            progress=self.progress, run_dir=self.run_dir, checkpoints=list(self.checkpoints),
            last_checkpoint=self.last_checkpoint, best_checkpoint=self.best_checkpoint, train_loss=self.train_loss,
            train_runtime=self.train_runtime,
            finished=self.training_ended or self.train_runtime is not None or self.last_checkpoint is not None,
        )  # fmt: skip

    def flush(self) -> ParseResult:
        """Parse what is left after the last \\r or \\n (call once the process has exited)."""
        result = ParseResult()
        partial, self._partial = self._partial, b""
        if partial:
            self._parse_block(partial, result)
        return result

    def _parse_block(self, block: bytes, result: ParseResult) -> None:
        for raw in re.split(rb"[\r\n]", block):
            if raw.strip():
                self._safely(self.parse_segment, raw.decode("utf-8", errors="replace"), result)

    def parse_segment(self, seg: str, result: ParseResult) -> None:
        """One \\r/\\n-delimited piece of the log."""
        seg = seg.rstrip()
        # A data set's text is no training output: a row holding step dicts, bars or "Saving model checkpoint"
        # lines (a model taught to read logs) set the progress, a loss point and a checkpoint that never was.
        if self._in_sample and not _LOGGER_LINE_RE.match(seg):
            return
        self._in_sample = _SAMPLE_RE.match(seg) is not None
        if self._in_sample:
            return
        # Real logs put swift's lines right after a bar with no separator ("...| 10/20 [00:00<00:00,
        # 30.29it/s][INFO:swift] Saving model checkpoint to ..."), so a bar does not end the search.
        if "Train:" in seg and (m := _TRAIN_BAR_RE.search(seg)):
            progress = _merge_bar(self.progress, m, self._epoch_at)
            if progress is not None:
                self.progress = result.progress = progress
        if "{'" in seg:
            d = parse_step_dict(seg)
            if d is not None:
                self.handle_step_dict(d, result)
                return
        if "output_dir: " in seg and (m := _RUN_DIR_RE.search(seg)):
            # The first: swift prints it as it starts, before it echoes any of the data.
            if self.run_dir is None and self._inside(m.group("path")):
                self.run_dir = result.run_dir = m.group("path")
        elif "Saving model checkpoint to " in seg and (m := _SAVING_RE.search(seg)):
            path = m.group("path")
            if path not in self._saved and self._inside(path):
                self._saved.add(path)
                self.checkpoints.append(path)
                result.checkpoints_saved.append(path)
        elif "_model_checkpoint: " in seg:
            if m := _LAST_CKPT_RE.search(seg):
                if (value := checkpoint_value(m.group("path"))) is None or self._inside(value):
                    self.last_checkpoint = result.last_checkpoint = value
                    self.training_ended = result.training_ended = True
            elif m := _BEST_CKPT_RE.search(seg):
                if (value := checkpoint_value(m.group("path"))) is None or self._inside(value):
                    self.best_checkpoint = result.best_checkpoint = value
        elif "Successfully merged LoRA" in seg and (m := _MERGED_RE.search(seg)):
            path = m.group("path")
            if path.endswith("."):
                path = path[:-1]
            if self._inside(path.strip("`")):
                self.merged_path = result.merged_path = path.strip("`")
        elif (at := seg.find(_RUN_SH)) >= 0 and (m := _RUN_SH_RE.match(seg, at)):
            self.command_line = result.command_line = m.group("cmd")

    def _inside(self, path: str | None) -> bool:
        return self._root is None or (path is not None and self._root.holds(path))

    def handle_step_dict(self, d: dict[str, Any], result: ParseResult, live: bool = True,
                         now: float | None = None) -> None:  # fmt: skip
        """Fold one normalized step dict (from stdout or logging.jsonl) into the state. History
        points get the current time only when `live` (read as the run goes, not afterwards)."""
        kind = _dict_kind(d)
        if kind == "other" and "current_step" not in d:
            return
        if kind == "summary" and self.resumed_at is not None and d.get("current_step") == self.resumed_at:
            # A run resumed from the last step's checkpoint (paused as its training ended) trains no step: its
            # summary's loss (0.0), runtime and speed are no training's, and replaced the job's (hunt CY).
            return
        self.progress = result.progress = _merge_progress(self.progress, d, kind)
        if kind == "train" and self.progress.current_step and self.progress.epoch is not None:
            self._epoch_at = (self.progress.current_step, self.progress.epoch)
        if kind == "summary":
            if (train_loss := finite(d.get("train_loss"))) is not None:
                self.train_loss = result.train_loss = train_loss
            if (runtime := finite(d.get("train_runtime"))) is not None:
                self.train_runtime = result.train_runtime = runtime
            return
        if kind not in ("train", "eval") or "current_step" not in d:
            return
        # On a CPU multi-process run every rank prints its own dict for the same step.
        key = (int(d["current_step"]), kind)
        if key in self._seen_points:
            return
        self._seen_points[key] = None
        if len(self._seen_points) > SEEN_POINTS_KEPT:
            del self._seen_points[next(iter(self._seen_points))]  # (the oldest: dicts keep insertion order)
        if kind == "train" and "loss" in d and d["loss"] is None and not self._diverged:
            # (normalized: a loss printed as nan or inf is None here; swift prints no step dict without one)
            self._diverged = True
            result.diverged_at = key[0]
        result.history.append(_history_point(d, kind, self._ran_at(d, now or clock.now()) if live else None))

    def _ran_at(self, d: dict[str, Any], now: float) -> float:
        """When a step ran: the trainer's start plus the step's elapsed time (not when its line was read, which
        may be much later: a poll that finds many steps at once)."""
        elapsed = parse_duration(str(d["elapsed_time"])) if d.get("elapsed_time") is not None else None
        if elapsed is None:
            return now
        start = now - elapsed
        if self._clock is None or start < self._clock:
            self._clock = max(start, self._clock_floor) if self._clock_floor is not None else start
        return min(now, self._clock + elapsed)
