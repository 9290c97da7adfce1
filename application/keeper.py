"""The scheduler's keeper (`start.py scheduler`): the scheduler in a child process, started again when it dies
without being told to (a crash, the OOM killer). What holds the keeper (a container's init, a service manager)
must not end for the death of one scheduler, since a container's end would take its runners with it.

Standard library only: `start.py all` starts a keeper at every start, on the way to its scheduler, and the keeper
it starts uses none of the server's other modules (importing them took 0.4 s of CPU at each start).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

SCHEDULER_MODULE = "application.scheduler_process"  # what the `scheduler` role runs (and keeps running)
# How long the keeper waits before it starts a scheduler that died again (doubling up to 30 s).
KEEPER_PAUSE = 1.0
# A scheduler that exits with this will fail the same way again (its settings, its folders): not started again.
CANNOT_START = 2
PR_SET_PDEATHSIG = 1
# Set by `start.py all` to its own pid in the environment of the keeper it starts.
STARTED_BY = "SWIFT_API_KEEPER_OF"


def die_with_parent() -> None:
    """In a child: SIGTERM when its parent dies (Linux), so a killed start.py leaves nothing serving behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def carry_on(sig: int, _: object) -> None:
    print(f"swift-api: {signal.Signals(sig).name} taken: nothing to restart or reopen (log files rotate "
          "themselves); serving on", file=sys.stderr, flush=True)  # fmt: skip


def keep_for_parent() -> None:
    """Keep the scheduler when this process is the keeper a `start.py all` started (`scheduler` its one argument,
    that start.py's pid in STARTED_BY), with nothing more imported: that start.py checked the settings and the
    folders, and this process inherited its umask and its limit on open files; the scheduler reads its own
    settings. Otherwise return."""
    parent = os.getppid()
    if sys.argv[1:] != ["scheduler"] or os.environ.get(STARTED_BY) != str(parent):
        return
    die_with_parent()
    if os.getppid() != parent:  # gone before it could take this process with it: nothing to keep
        sys.exit(0)
    keep_scheduler({k: v for k, v in os.environ.items() if k != STARTED_BY}, with_parent=False)
    sys.exit(0)


def keep_scheduler(env: Mapping[str, str], *, with_parent: bool) -> None:
    """Run the scheduler until told to stop (SIGTERM, SIGINT: passed on to it), then exit with its status."""
    if with_parent:
        die_with_parent()
    argv = [sys.executable, "-m", SCHEDULER_MODULE]
    stopping: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def forward(sig: int, _: object) -> None:
        stopping.append(sig)
        if child is not None and child.poll() is None:
            child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, carry_on)  # (it ended this keeper, and its scheduler with it)
    pause = KEEPER_PAUSE
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen(argv, env=dict(env),
                                 preexec_fn=die_with_parent if sys.platform == "linux" else None)  # fmt: skip
        if stopping:  # told to stop while it was starting
            child.send_signal(stopping[0])
        code = child.wait()
        if stopping:
            sys.exit(code if code >= 0 else 0)
        if code == CANNOT_START:
            print(f"swift-api: the scheduler cannot start (exit {code}: see the line above): not starting it again",
                  file=sys.stderr, flush=True)  # fmt: skip
            sys.exit(code)
        if time.monotonic() - started > 60:
            pause = KEEPER_PAUSE  # it ran a while: not a scheduler that keeps dying, which waits ever longer
        print(f"swift-api: the scheduler (pid {child.pid}) exited with {code}; starting another in {pause:g} s",
              file=sys.stderr, flush=True)  # fmt: skip
        deadline = time.monotonic() + pause
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        pause = min(pause * 2, 30.0)
