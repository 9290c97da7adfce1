"""The pinned schemathesis run (tests/schemathesis.toml): every check, keys configured, no 5xx, no schema break."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY, KEYS_SETTING, ROOT, ApiServer

pytestmark = pytest.mark.timeout(300)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server_factory: Callable[..., ApiServer],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "CREATE_RATE_LIMIT": "0", "LOG_LEVEL": "WARNING"})
    st = Path(sys.executable).with_name("schemathesis")
    assert st.exists(), "schemathesis is a dev dependency: pip install -e '.[dev]'"
    root = server.base.split("/api/v1")[0]
    out = subprocess.run(
        [str(st), "--config-file", str(ROOT / "tests" / "schemathesis.toml"), "run", f"{root}/openapi.json",
         "-H", f"Authorization: Bearer {ADMIN_KEY}", "--checks", "all", "--max-examples", "8", "--seed", "20261130",
         "--workers", "1", "--no-color", "--output-truncate", "false", "--report", "junit",
         "--report-dir", str(tmp_path / "schemathesis-report")],
        capture_output=True, text=True, timeout=280, cwd=tmp_path, check=False,
    )  # fmt: skip
    summary = out.stdout[out.stdout.find("=== FAILURES") :] if "FAILURES" in out.stdout else out.stdout[-3000:]
    assert out.returncode == 0, summary + out.stderr[-2000:]
    assert "failures" not in out.stdout.split("SUMMARY")[-1].lower(), summary
    log = (server.workdir / f"server-{server.port}.log").read_text(errors="replace")
    assert "Traceback" not in log  # client errors never put a traceback in the log
