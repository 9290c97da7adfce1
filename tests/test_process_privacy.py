"""A server process kept from the code its jobs run: not dumpable (its environment unreadable to its own user)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

HOLD = ("import ctypes, sys, time; from application.utils.process_privacy import keep_private; "
        "print(keep_private(), ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), flush=True); time.sleep(30)")  # fmt: skip


def test_a_private_process_is_not_dumpable_and_its_environment_is_kept_from_its_own_user() -> None:
    # (root may read any process's environment: what is told apart is a process of the server's own user)
    child = subprocess.Popen([sys.executable, "-c", HOLD], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "API_KEYS": "root:admin:not-for-job-code-0123456789"})  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["True", "0"]  # keep_private() held, and PR_GET_DUMPABLE says 0
        if os.geteuid() != 0:
            with pytest.raises(PermissionError):
                Path(f"/proc/{child.pid}/environ").read_bytes()
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


# Runs a server's entry point as its launcher does, and reads PR_GET_DUMPABLE as its first import after the
# privacy block (asyncio, in both) begins; exits there.
PROBE = """
import ctypes, runpy, sys
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "asyncio":
            print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), flush=True)
            raise SystemExit(0)
sys.meta_path.insert(0, Probe())
if sys.argv[1].endswith(".py"):
    runpy.run_path(sys.argv[1], run_name=sys.argv[2])
else:
    runpy.run_module(sys.argv[1], run_name=sys.argv[2], alter_sys=True)
"""


@pytest.mark.parametrize("entry, run_name", [("start.py", "__main__"), ("start.py", "__mp_main__"),
                                             ("application.scheduler_process", "__main__")])  # fmt: skip
def test_a_server_process_is_not_dumpable_before_its_imports(entry: str, run_name: str) -> None:
    # Not from its main(): its imports took 1.5 to 3.5 s, while job code (which may kill a scheduler or an API
    # worker to have it started again) could read API_KEYS and WEBHOOK_SECRET in its /proc (review DW). An API
    # worker runs start.py as __mp_main__ first.
    probe = subprocess.run([sys.executable, "-c", PROBE, entry, run_name], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert probe.returncode == 0 and probe.stdout.split() == ["0"], (probe.stdout, probe.stderr)
