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
