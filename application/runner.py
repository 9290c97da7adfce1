"""Process-group leader for one swift run: `python -m application.runner EXIT_FILE -- argv...`.

It runs the command as its child (same process group), ignores SIGTERM/SIGINT itself so it outlives the
command, and records the command's exit status in EXIT_FILE. The API can die and come back: the exit
status is still known (Ray's JobSupervisor does the same job). Standard library only: it must start fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m application.runner EXIT_FILE -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    exit_file, command = argv[1], argv[3:]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # The child must not inherit our SIG_IGN: restore default handlers in it.
        child = subprocess.Popen(command, restore_signals=True, preexec_fn=_default_signals)
    except OSError as exc:
        print(f"swift-api: cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        code = 127
    else:
        code = child.wait()
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"exit_code": code, "finished_at": time.time(), "pid": os.getpid()}, fh)
    os.replace(tmp, exit_file)
    return code if code >= 0 else 128 - code


def _default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
