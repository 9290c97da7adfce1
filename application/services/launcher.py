"""How the scheduler starts a runner, behind one small interface (a cluster engine will launch them on other hosts).

`LocalLauncher` starts `python -m application.runner` on this host, detached in its own session, with an
explicit environment, its output in `<output_dir>/logs/<job_id>.runner.log`. The scheduler is its parent
while it lives, so it learns a runner's exit status (and the signal that killed it) at once; a runner
outlives the scheduler (it is re-parented to init) and is then watched by its pid and stamp (boot id, start
tick) or, from another host, by its heartbeat.
Where it cannot (a container ends with its main process), a stopping scheduler `terminate`s it first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from application.config import PROJECT_ROOT
from application.models.training_model import RunnerInfo
from application.services import clock
from application.services import process_group as pg

FORGET_AFTER = 600.0  # seconds an ended runner's exit status is kept for the watchdog
RUNNER_MODULE = "application.runner"


@dataclass(frozen=True)
class LiveRunner:
    job_id: str
    run_id: str
    export_id: str | None  # (None: a training run)
    ends_within: float = 0.0  # its stop grace and two polls, as it was started with: how long it may take to end


# A run (or an export) whose runner has not shown up this long after it was started is lost (the scheduler died in
# between).
RUNNER_START_GRACE = 15.0


class RunnerLauncher(Protocol):
    async def launch(self, job_id: str, run_id: str, log_dir: Path, *, export_id: str | None = None,
                     spec: Path | None = None) -> RunnerInfo:  # fmt: skip
        """Start the runner of one run (`spec`: how it starts swift) or export of a job; OSError when it cannot."""
        ...

    def exit_status(self, runner: RunnerInfo) -> int | None:
        """The runner's exit status if this launcher saw it end (negative: killed by that signal), else None."""
        ...

    def is_alive(self, runner: RunnerInfo) -> bool | None:
        """Whether the runner still runs; None when this launcher cannot tell (another host: ask the heartbeat)."""
        ...

    def forget(self, runner: RunnerInfo) -> None:
        """The runner's end has been recorded: nothing more to know about it."""
        ...

    def terminate(self, runner: RunnerInfo) -> bool:
        """Ask the runner to end its run now (SIGTERM: it stops swift and records the end); False when it is
        gone or not this launcher's to signal."""
        ...

    def kill(self, runner: RunnerInfo) -> bool:
        """End a runner that stopped answering (SIGKILL: it would not act on a SIGTERM); False when it is gone or
        not this launcher's to signal."""
        ...

    def reap(self) -> None:
        """Collect the runners that ended (no zombie stays behind), and in time forget them."""
        ...

    def outlived(self, runner: RunnerInfo) -> bool:
        """Whether the runner's host has started again since the runner did (a reboot, a container's restart):
        then it died with everything on its host, not of its own. False when this launcher cannot tell."""
        ...

    def runners(self) -> list[LiveRunner]:
        """This deployment's runners alive where this launcher launches, whoever launched them (blocking)."""
        ...


class LocalLauncher:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = {k: v for k, v in env.items() if k != "DIE_WITH_PARENT"}  # a runner outlives its scheduler
        self.env["PYTHONPATH"] = ":".join(p for p in (str(PROJECT_ROOT), self.env.get("PYTHONPATH", "")) if p)
        self.host = socket.gethostname()
        # This host's own start: its init, which in a container starts with the container (boot time does not).
        self.host_started = pg.process_start_time(1)
        self.host_stamp = pg.process_stamp(1)
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self._ended: dict[int, float] = {}  # pid -> when reap() first saw it ended (monotonic)

    async def launch(self, job_id: str, run_id: str, log_dir: Path, *, export_id: str | None = None,
                     spec: Path | None = None) -> RunnerInfo:  # fmt: skip
        argv = [sys.executable, "-m", "application.runner", job_id, run_id]
        if export_id:
            argv += ["--export", export_id]
        if spec:
            argv += ["--launch", str(spec)]
        log_dir.mkdir(parents=True, exist_ok=True)
        proc = pg.spawn(argv, self.env, log_dir.parent, log_dir / f"{job_id}.runner.log")
        self.children[proc.pid] = proc
        self._ended.pop(proc.pid, None)
        return RunnerInfo(host=self.host, pid=proc.pid, start_time=pg.process_start_time(proc.pid),
                          stamp=pg.process_stamp(proc.pid), launched_at=clock.now())  # fmt: skip

    def exit_status(self, runner: RunnerInfo) -> int | None:
        proc = self.children.get(runner.pid or -1)
        return None if proc is None else proc.poll()  # poll() also reaps it: no zombie stays behind

    def is_alive(self, runner: RunnerInfo) -> bool | None:
        if runner.host != self.host:
            return None
        proc = self.children.get(runner.pid or -1)
        if proc is not None:
            return proc.poll() is None
        return pg.is_alive(runner.pid, runner.start_time, runner.stamp)

    def forget(self, runner: RunnerInfo) -> None:
        proc = self.children.get(runner.pid or -1)
        if proc is not None and proc.poll() is not None:
            del self.children[proc.pid]
            self._ended.pop(proc.pid, None)

    def terminate(self, runner: RunnerInfo) -> bool:
        if not self.is_alive(runner) or not runner.pid:
            return False
        try:
            os.kill(runner.pid, signal.SIGTERM)  # the runner only: it stops swift's group itself, gracefully
        except ProcessLookupError:
            return False
        return True

    def kill(self, runner: RunnerInfo) -> bool:
        if not self.is_alive(runner) or not runner.pid:
            return False
        try:
            os.kill(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def outlived(self, runner: RunnerInfo) -> bool:
        if runner.host != self.host:
            return False
        if runner.stamp and pg.stamp_boot(runner.stamp) and self.host_stamp:
            # Another boot of this host (a reboot), or this boot's runner older than this init (a container
            # started again): exact, whatever the clock did meanwhile.
            rebooted = pg.stamp_boot(runner.stamp) != pg.stamp_boot(self.host_stamp)
            return rebooted or bool(pg.started_before(runner.stamp, self.host_stamp))
        # A record older than stamps: start times, right unless the clock was stepped in between.
        return runner.start_time is not None and self.host_started is not None and \
            runner.start_time < self.host_started  # fmt: skip

    def reap(self) -> None:
        """Collect the exit status of runners that ended, so that none stays a zombie (a runner that records its
        own end is never asked about), and forget those ended for FORGET_AFTER: the watchdog has judged them."""
        now = time.monotonic()
        for pid, proc in list(self.children.items()):
            if proc.poll() is None:
                continue
            if now - self._ended.setdefault(pid, now) > FORGET_AFTER:
                del self.children[pid]
                del self._ended[pid]

    def runners(self) -> list[LiveRunner]:
        # Known by their command line and the settings they were started with: the same key prefix and output
        # root (another deployment's on this host, or a test's, are not ours).
        ours = (self.env.get("REDIS_KEY_PREFIX"), os.path.realpath(self.env.get("OUTPUT_ROOT") or "."))
        found = []
        for p in psutil.process_iter(["cmdline"]):
            argv = p.info["cmdline"] or []
            if RUNNER_MODULE not in argv[:6] or len(argv) < argv.index(RUNNER_MODULE) + 3:
                continue
            try:
                env = p.environ()
            except (psutil.Error, OSError):
                continue
            if (env.get("REDIS_KEY_PREFIX"), os.path.realpath(env.get("OUTPUT_ROOT") or ".")) != ours:
                continue
            at = argv.index(RUNNER_MODULE)
            export = argv[argv.index("--export") + 1] if "--export" in argv[at:-1] else None
            found.append(LiveRunner(argv[at + 1], argv[at + 2], export, _ends_within(env)))
        return found


def _ends_within(env: Mapping[str, str]) -> float:
    try:
        return float(env.get("STOP_GRACE_SECONDS", 0)) + 2 * float(env.get("RUNNER_POLL_INTERVAL", 0)) + 1.0
    except ValueError:
        return 0.0
