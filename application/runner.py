"""The runner: one process per run of a job, which owns that run from launch to its recorded end.

    python -m application.runner JOB_ID RUN_ID --launch SPEC   # the training run RUN_ID of JOB_ID
    python -m application.runner JOB_ID RUN_ID --export ID     # the export ID of JOB_ID

The scheduler launches it detached, in its own session. For a training run it first writes SPEC (swift's
argv, GPU variables, log file): this entry starts swift from it with the standard library alone, before
importing anything else, so GPUs handed from one run to the next idle for no import of ours. Everything
after that is `services/run_agent.py`: following the run, writing its progress and end to Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from application.utils.log_files import open_in_place  # (standard library only itself)

# What a runner renames its launch spec to (process_group.revoke_launch reads them): taken, then swift starting.
CLAIMED, STARTED = ".claimed", ".started"


def _early_start(spec_file: str, run_id: str) -> tuple[subprocess.Popen[bytes], float] | OSError:
    """swift, started from the scheduler's launch spec (stdlib only: this runs before any other import).

    The spec is the run's launch token: renamed to SPEC.claimed (stamped now) before it is read, and to
    SPEC.started just before swift starts (its log made by then), which goes once swift runs. A watchdog that
    gives the run up removes SPEC, or a claim too old (process_group.revoke_launch): a runner launched after
    that, by a scheduler that stalled between its last leader check and the launch, or that stalled itself
    after its claim, starts nothing; one that took the spec first is seen as launched."""
    claimed, started = spec_file + CLAIMED, spec_file + STARTED
    try:
        os.rename(spec_file, claimed)
    except FileNotFoundError:
        return OSError(f"launch spec {spec_file} is gone: its run was given up before this runner took it")
    except OSError as exc:
        return exc
    try:
        os.utime(claimed)
        spec = json.loads(Path(claimed).read_text())
        if spec.get("run_id") != run_id:
            return OSError(f"launch spec {spec_file} is of run {spec.get('run_id')}, not of run {run_id}")
        log_file = Path(spec["log_file"])
        log_file.parent.mkdir(parents=True, exist_ok=True)
        Path(spec["exit_file"]).unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in spec.get("unset", ())} | spec["env"]
        made = not os.path.lexists(log_file)
        # Emptied only once the run is still this runner's to start; never opened through a link its owner made.
        with open_in_place(log_file, "a") as log:
            try:
                os.rename(claimed, started)
            except FileNotFoundError:
                if made:
                    log_file.unlink(missing_ok=True)
                return OSError(f"launch spec {spec_file}: its run was given up while this runner was starting")
            log.truncate(0)
            popen = subprocess.Popen(spec["argv"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=spec["cwd"], env=env, start_new_session=True)  # fmt: skip
        return popen, time.time()
    except (OSError, ValueError, KeyError) as exc:
        return exc if isinstance(exc, OSError) else OSError(f"unreadable launch spec {spec_file}: {exc}")
    finally:
        Path(claimed).unlink(missing_ok=True)
        Path(started).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m application.runner", description=__doc__.split("\n")[0])
    parser.add_argument("job_id")
    parser.add_argument("run_id")
    parser.add_argument("--launch", metavar="SPEC", help="start swift from this spec before anything else")
    parser.add_argument("--export", metavar="EXPORT_ID", help="run this export of the job instead of training")
    args = parser.parse_args(argv)
    early = _early_start(args.launch, args.run_id) if args.launch else None
    from application.services.run_agent import run

    return run(args, early)


if __name__ == "__main__":
    sys.exit(main())
