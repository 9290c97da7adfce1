"""What failed, from the end of a failed run's log: the Python exception that ended it.

Checked against the failure tails captured from real ms-swift 4.6.0 and 3.5.3 runs (tests/fixtures/swift).
"""

from __future__ import annotations

import re

_EXC_LINE_RE = re.compile(
    r"(?P<name>(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit|Failure|Timeout))"
    r"(?::(?P<msg>.*))?"
)
# torch.distributed prefixes each rank's output like this.
_RANK_PREFIX_RE = re.compile(r"^\[(?:rank|default)\d+\]:\s?")
# What the launcher (swift's own `subprocess.run`, or torchrun) adds on top of the trainer's error.
_LAUNCHER_NOISE = frozenset({"KeyboardInterrupt", "CalledProcessError", "ChildFailedError", "SystemExit"})
_MAX_ERROR_CHARS = 4000
# torchrun's summary of a multi-process failure: the rank that failed first and how it ended.
_ROOT_CAUSE_RE = re.compile(r"^Root Cause \(first observed failure\):")
_FIELD_RE = re.compile(r"^\s*(?P<key>rank|exitcode)\s*:\s*(?P<value>-?\d+)")


def root_cause(lines: list[str]) -> tuple[int, int] | None:
    """(rank, exit code) of torchrun's "Root Cause" block in a failed multi-GPU run's log, or None. A rank the
    OOM killer took leaves no traceback: only this block says it was signal 9 (exit code -9)."""
    cleaned = [_clean_log_line(line) for line in lines]
    for i in range(len(cleaned) - 1, -1, -1):
        if _ROOT_CAUSE_RE.match(cleaned[i]):
            found = {m.group("key"): int(m.group("value")) for line in cleaned[i + 1 : i + 8]
                     if (m := _FIELD_RE.match(line))}  # fmt: skip
            if "exitcode" in found:
                return found.get("rank", -1), found["exitcode"]
            return None
    return None


def _clean_log_line(line: str) -> str:
    if "\r" in line:
        parts = [p for p in line.split("\r") if p.strip()]
        line = parts[-1] if parts else ""
    return _RANK_PREFIX_RE.sub("", line.rstrip())


def extract_error(lines: list[str]) -> str | None:
    """The Python exception that ended a failed run, from the end of its log.

    That is the last `SomeError: message` line that follows a traceback frame; the launcher's own
    KeyboardInterrupt / CalledProcessError / torchrun ChildFailedError only counts when no trainer
    error is above it. None when the lines hold no exception.
    """
    cleaned = [_clean_log_line(line) for line in lines]
    specific: str | None = None
    noise: str | None = None
    for i in range(len(cleaned) - 1, -1, -1):
        line = cleaned[i]
        if not line or line[0].isspace():
            continue
        m = _EXC_LINE_RE.fullmatch(line)
        if m is None:
            continue
        prev = cleaned[i - 1] if i > 0 else ""
        # Exception lines follow a frame ("  File ...", its source line, or the ^^^ marker) or the
        # Traceback header; a tail may also start right at one.
        if i > 0 and not (prev[:1].isspace() or prev.startswith("Traceback (most recent call last)")):
            continue
        short_name = m.group("name").rsplit(".", 1)[-1]
        if short_name in _LAUNCHER_NOISE:
            if noise is None:
                noise = line
            continue
        specific = line
        break
    found = specific or noise
    if found and found.startswith(_NO_ROWS_ERRORS) and (why := _no_rows_left(cleaned, found)):
        found = f"{found} ({why})"
    return found[:_MAX_ERROR_CHARS] if found else None


# swift's own account of a data set it emptied, which its final exception (a ZeroDivisionError in sample_dataset,
# a TypeError later on) does not give.
_FILTERED_TO_NONE_RE = re.compile(r"Dataset filtered, origin length: (?P<n>\d+), filtered dataset length: 0\b")
_ROWS_DELETED = "There are errors in the dataset, the data will be deleted"
# What swift 4.6 raises with no rows (sample_dataset divides by them; the trainer iterates None): swift logs its
# count for each data set, the validation set's too, so the hint is only for these.
_NO_ROWS_ERRORS = ("ZeroDivisionError", "TypeError: 'NoneType' object is not iterable")


def _no_rows_left(lines: list[str], error: str) -> str | None:
    """Why swift had no rows left to train on, when its log says so: every row longer than max_length, or every
    row dropped as one it could not read (then it fails dividing by the rows' count)."""
    for line in reversed(lines):
        if m := _FILTERED_TO_NONE_RE.search(line):
            return (f"swift had no rows left: 'Dataset filtered, origin length: {m['n']}, filtered dataset length: "
                    "0': each row was longer than max_length or could not be read (the log's warnings name "
                    "those)")  # fmt: skip
    if error.startswith("ZeroDivisionError") and any(_ROWS_DELETED in line for line in lines):
        return (f"swift had no rows left: '{_ROWS_DELETED}' for each row it could not read; the log's warnings "
                "above it name them")  # fmt: skip
    return None
