"""The dashboard's server-side rules, over HTTP in-process (no browser: test_dashboard.py's Playwright holds an
event loop of its own, which async tests there would clash with)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ALICE_KEY, BOB_KEY, KEYS_SETTING, auth, job_body

COOKIE = "swift_api_key"


async def test_another_sites_form_can_neither_log_in_nor_log_out(app_factory: Callable[..., Any]) -> None:
    # Logout had no check: any page the reader opened could end their session.
    async with app_factory(scheduler=False, API_KEYS=KEYS_SETTING) as client:
        form = {"key": ALICE_KEY, "next": "/"}
        for where in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}):
            r = await client.post("http://test/ui/login", data=form, headers=where)
            assert r.status_code == 403 and "set-cookie" not in r.headers, where
            r = await client.post("http://test/ui/logout", headers={**where, "Cookie": f"{COOKIE}={ALICE_KEY}"})
            assert r.status_code == 403 and "set-cookie" not in r.headers and "still logged in" in r.text, where
        same = {"Sec-Fetch-Site": "same-origin"}
        r = await client.post("http://test/ui/login", data=form, headers=same)
        assert r.status_code == 303 and r.headers["set-cookie"].startswith(f"{COOKIE}=")
        client.cookies.clear()
        r = await client.post("http://test/ui/logout", headers={**same, "Cookie": f"{COOKIE}={ALICE_KEY}"})
        assert r.status_code == 303 and r.headers["set-cookie"].startswith(f'{COOKIE}=""')


async def test_behind_a_proxy_prefix_the_login_returns_to_the_page_once_prefixed(
    app_factory: Callable[..., Any],
) -> None:
    # `next` carried the prefix and the login put it in front again: /swift/swift/ui/queue, a 404.
    async with app_factory(scheduler=False, API_KEYS=KEYS_SETTING) as client:
        transport = httpx.ASGITransport(app=client.app, root_path="/swift")
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as proxied:
            r = await proxied.get("/swift/ui/queue?limit=5")
            assert r.status_code == 303 and r.headers["location"] == "/swift/ui/login?next=%2Fui%2Fqueue%3Flimit%3D5"
            form = {"key": ALICE_KEY, "next": "/ui/queue?limit=5"}
            r = await proxied.post("/swift/ui/login", data=form, headers={"Sec-Fetch-Site": "same-origin"})
            assert r.status_code == 303 and r.headers["location"] == "/swift/ui/queue?limit=5"


async def test_another_owners_job_is_named_but_not_linked_on_the_gpu_page(app_factory: Callable[..., Any],
                                                                          tmp_path: Path) -> None:  # fmt: skip
    # Bob's GPU page linked Alice's running job: a link to a 404.
    async with app_factory(API_KEYS=KEYS_SETTING) as client:
        body = job_body(tmp_path, "hers", auto_start=True, hang_after_steps=1)
        assert (await client.post("/jobs", json=body, headers=auth(ALICE_KEY))).status_code == 201
        for key, linked in ((ALICE_KEY, True), (BOB_KEY, False)):
            shown = (await client.get("http://test/ui/gpus", headers={"Cookie": f"{COOKIE}={key}"})).text
            assert "<code>hers</code>" in shown and ('href="/ui/jobs/hers"' in shown) is linked, key
        await client.post("/jobs/hers/stop", headers=auth(ALICE_KEY))


async def test_gpus_whose_reading_fails_are_shown_unreadable_and_start_nothing(app_factory: Callable[..., Any],
                                                                               tmp_path: Path) -> None:  # fmt: skip
    usage = tmp_path / "usage.json"
    usage.write_text("{not json")
    async with app_factory(SIMULATED_GPU_USAGE_FILE=str(usage)) as client:
        gpus = (await client.get("/gpus")).json()["gpus"]
        assert len(gpus) == 2 and all("malformed" in (g["error"] or "") for g in gpus)
        page = (await client.get("http://test/ui/gpus")).text
        assert page.count(">unreadable<") == 2
        r = await client.post("/jobs", json=job_body(tmp_path, "waits", auto_start=True))
        assert r.status_code == 201 and r.json()["status"] == "queued", r.text
        # (it said healthy while no GPU could be read: hunt DO)
        health = (await client.get("/health")).json()
        assert health["status"] == "degraded" and "malformed" in health["gpu"]["error"], health
        usage.write_text("{}")
        deadline = time.monotonic() + 20
        while (health := (await client.get("/health")).json())["status"] != "healthy":
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.1)


@pytest.mark.parametrize(("given", "kept"), [
    ("/ui/jobs/x?status=running", True), ("/", True), ("/ui/queue", True),
    ("//evil.example/x", False), ("/\\evil", False), ("/ui/logout", False), ("/ui/login?next=/ui", False),
    ("/api/v1/training/jobs", False), ("/docs", False),
    ("/ui/../api/v1/training/jobs", False), ("/ui/%2e%2e/api/v1/training/jobs", False), ("/ui/./login", False),
    ("/ui//login", False), ("/ui/jobs/", True),
])  # fmt: skip
def test_a_login_goes_on_only_to_a_dashboard_page(given: str, kept: bool) -> None:
    # `next` led to the API (a JSON 401: it reads no cookie), a logout (405) or the login form again (hunt DB).
    from application.ui.session import safe_next

    assert safe_next(given) == (given if kept else "/")
