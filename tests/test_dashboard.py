"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright's sync API) against a real
server process (`start.py`, fake swift, 2 simulated GPUs): the create form, live charts and log, the actions,
login with API keys, the lists without JavaScript, and escaping of hostile paths and ids.

Screenshots go to $SWIFT_API_TEST_ARTIFACTS (default: <repo>/test-results/dashboard/).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, Route, expect, sync_playwright

from application.services.embedded_redis import EmbeddedRedis
from application.ui import views
from application.ui.html import PageContext
from tests.conftest import (
    ADMIN_KEY,
    ALICE_KEY,
    BOB_KEY,
    KEYS_SETTING,
    MODEL_DIR,
    QUICK_TO_GIVE_UP,
    ROOT,
    ApiServer,
    auth,
    fake_dataset,
    gated_swift,
    job_body,
    make_model,
    seed_swift_probe,
    wait_for,
)

ARTIFACTS = Path(os.environ.get("SWIFT_API_TEST_ARTIFACTS") or ROOT / "test-results" / "dashboard")
COOKIE = "swift_api_key"
# A path that would run a script, add an element and break out of an attribute if anything were not escaped.
HOSTILE = 'evil"><img src=x onerror="window.__xss=1"><b id=pwn>'
HANG_AT = 90


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("no `chromium` on PATH: the dashboard tests need Debian's chromium (apt-get install chromium; "
                    ".ci/run installs it). Playwright's own browser download is not used.")  # fmt: skip
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class Tab:
    """A browser context and its page, collecting uncaught script errors (a test ends with none)."""

    def __init__(self, browser: Browser, base: str, *, javascript: bool = True, width: int = 1400) -> None:
        self.base = base
        self.context: BrowserContext = browser.new_context(
            viewport={"width": width, "height": 1000}, java_script_enabled=javascript
        )
        self.context.set_default_timeout(15_000)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def goto(self, path: str) -> Page:
        response = self.page.goto(self.base + path)
        assert response is not None and response.ok, f"{path}: {response.status if response else 'no response'}"
        return self.page

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def tabs(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Callable[..., Tab]]:
    opened: list[Tab] = []

    def open_tab(server: ApiServer, *, javascript: bool = True, width: int = 1400) -> Tab:
        tab = Tab(browser, f"http://127.0.0.1:{server.port}", javascript=javascript, width=width)
        opened.append(tab)
        return tab

    yield open_tab
    errors: list[str] = []
    for i, tab in enumerate(opened):
        # How each page looked at the end: what a failed run's artifacts need first.
        with contextlib.suppress(Exception):
            tab.shot(f"last-{request.node.name}-{i}")
        tab.context.close()
        errors += tab.errors
    assert not errors, f"uncaught script errors in the pages: {errors}"


def fill_form(page: Page, workspace: Path, name: str, fake: dict[str, Any] | None = None, **fields: str) -> None:
    """Type a job into /ui/new: the model folder, and a data set whose first row tells the fake swift its pace
    (and `fake`'s other options)."""
    model = make_model(workspace / MODEL_DIR) if not (workspace / MODEL_DIR).exists() else workspace / MODEL_DIR
    data = fake_dataset(workspace, name, **{"step_seconds": 0.1, **(fake or {})})
    values = {"data_path": data, "model_path": str(model), "output_dir": name, **fields}
    for field, value in values.items():
        page.fill(f"#f-{field}", value)


# ---- the create form, live charts and log, stop -----------------------------------------------------------


@pytest.mark.timeout(300)
def test_create_form_then_live_charts_log_and_stop(server: ApiServer, workspace: Path,
                                                    tabs: Callable[..., Tab]) -> None:  # fmt: skip
    tab = tabs(server)
    page = tab.goto("/ui/new")
    # swift writes its log through a descriptor of its own (not O_APPEND): a line appended while it writes would
    # be overwritten. So the run stops writing (hangs, still running) at step 90, and the test appends then.
    fill_form(page, workspace, "dash-live", {"hang_after_steps": HANG_AT}, max_steps="200", logging_steps="1",
              save_steps="50")  # fmt: skip
    expect(page.locator("#f-auto_start")).to_be_checked()
    page.click("#submit")
    expect(page).to_have_url(re.compile(r"/ui/jobs/dash-live$"))
    assert server.job("dash-live")["status"] in ("running", "queued", "pending")

    # The loss chart: the history first, then more points from the progress stream while the run goes on.
    page.wait_for_function("() => window.dashboard.lossPoints && window.dashboard.lossPoints() > 0", timeout=30_000)
    first = page.evaluate("window.dashboard.lossPoints()")
    page.wait_for_function("n => window.dashboard.lossPoints() > n", arg=first + 3, timeout=15_000)
    assert server.job("dash-live")["status"] == "running"
    expect(page.locator("#command")).to_contain_text("--max_steps 200")
    expect(page.locator("#job [data-status]")).to_have_text("running")

    # The log panel follows the file: a line written now shows within 2 s.
    page.wait_for_function("() => window.dashboard.logText().includes('global_step/max_steps')", timeout=15_000)
    expect(page.locator("#job-progress")).to_contain_text(f"{HANG_AT}/200", timeout=30_000)
    marker = f"dashboard-marker-{time.monotonic_ns()}"
    log_file = server.job("dash-live")["log_file"]
    started = time.monotonic()
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"\n{marker}\n")  # a newline first: the marker starts its own line whatever swift was writing
    page.wait_for_function("m => window.dashboard.logText().includes(m)", arg=marker, timeout=5_000)
    shown_after = time.monotonic() - started
    assert shown_after < 2.0, f"the log panel showed the line after {shown_after:.2f} s"
    tab.shot("job-running")

    # Stop from the page: a confirmation, then the job is stopped (the API answers once it is recorded).
    asked: list[str] = []

    def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    page.click("#actions button[data-action=stop]")
    expect(page.locator("#job [data-status]")).to_have_text("stopped", timeout=30_000)
    assert asked and "Stop job dash-live" in asked[0]
    assert server.job("dash-live")["status"] == "stopped"
    expect(page.locator("#action-result")).not_to_be_empty()
    expect(page.locator("#actions button[data-action=stop]")).to_be_disabled()
    expect(page.locator("#actions button[data-action=resume]")).to_be_enabled()
    expect(page.locator("#log-state")).to_have_text("ended", timeout=10_000)
    # What the run wrote while the page was open is offered without a reload, as the checkpoints table shows it.
    expect(page.locator("#checkpoints")).to_contain_text("checkpoint-50")
    expect(page.locator("#files")).to_contain_text("checkpoint-50.tar", timeout=10_000)
    href = page.locator("#files a", has_text="checkpoint-50.tar").get_attribute("href") or ""
    assert href.endswith("/checkpoint-50.tar"), href
    tab.shot("job-stopped")

    # An axis whose ticks differ in their fourth digit (a learning rate near its peak) labels each tick apart.
    labels = page.evaluate("window.dashboard.tickLabels([9.999e-05, 9.996e-05, 9.993e-05, 9.99e-05])")
    assert len(set(labels)) == 4, labels

    # The list shows it, with its progress bar.
    page = tab.goto("/")
    row = page.locator("tr[data-job='dash-live']")
    expect(row).to_contain_text("stopped")
    expect(row.locator(".bar")).to_contain_text("/200")
    tab.shot("jobs")

    # Resume from its page: the page loads again (the streams ended with the run) and still says what happened.
    page = tab.goto("/ui/jobs/dash-live")
    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_navigation(timeout=15_000):
        page.click("#actions button[data-action=resume]")
    expect(page.locator("#action-result")).to_contain_text("esum")
    expect(page.locator("#job [data-status]")).to_have_text(re.compile("running|queued"), timeout=15_000)


@pytest.mark.timeout(180)
def test_the_job_page_shows_progress_when_its_streams_are_refused(
    server_factory: Callable[..., ApiServer], workspace: Path, tabs: Callable[..., Tab]
) -> None:
    server = server_factory(env={"STREAMS_PER_OWNER": "1"})
    body = job_body(workspace, "crowded", step_seconds=0.05, hang_after_steps=12, auto_start=True,
                    training={"max_steps": 200, "logging_steps": 1})  # fmt: skip
    assert server.create(**body).status_code == 201
    with (
        httpx.Client(base_url=server.base, timeout=60) as http,
        http.stream("GET", "/jobs/crowded/events/stream") as held,
    ):
        assert held.status_code == 200  # the owner's one stream: the page's are refused
        page = tabs(server).goto("/ui/jobs/crowded")
        # The header follows the job's refreshes (it stayed at what the page was served with), and the charts
        # say why they do not move.
        expect(page.locator("#job-progress")).to_contain_text("12/200", timeout=30_000)
        expect(page.locator("#charts-state")).to_contain_text("too many open streams", timeout=15_000)


def test_the_job_page_shows_a_diverged_loss_and_trainer_text_that_cannot_reverse_the_page(
    server: ApiServer, workspace: Path, tabs: Callable[..., Tab]
) -> None:
    """A loss gone NaN kept showing the last good one in the header; a right-to-left override in a trainer's
    error reversed the code the page appends to it, '(edoc_tixe)' (found by the dashboard hunt)."""
    # (a real loss for 15 steps, 4.5 s: a loaded machine's page refreshed past 3 steps' window without showing one)
    body = job_body(workspace, "nan", step_seconds=0.3, nan_from_step=16, auto_start=True,
                    training={"max_steps": 200, "logging_steps": 1})  # fmt: skip
    assert server.create(**body).status_code == 201
    page = tabs(server).goto("/ui/jobs/nan")
    expect(page.locator("#job-loss")).not_to_have_text(re.compile(r"^(—)?$"), timeout=30_000)
    expect(page.locator("#job-loss")).to_have_text("—", timeout=30_000)
    assert server.http.post("/jobs/nan/stop").status_code == 200
    hostile = job_body(workspace, "rlo", fail_at_step=1, fail_message="RuntimeError: \u202eboom", auto_start=True)
    assert server.create(**hostile).status_code == 201
    server.wait_status("rlo", "failed")
    page = tabs(server).goto("/ui/jobs/rlo")
    page.wait_for_function("() => window.dashboard.jobStatus && window.dashboard.jobStatus() === 'failed'")
    page.evaluate("() => document.getElementById('job-error').textContent = ''")  # (what the script shows next)
    expect(page.locator("#job-error")).to_contain_text("boom", timeout=15_000)
    text = page.locator("#job-error").inner_text()
    assert "\u202e" not in text and "\ufffdboom" in text and text.endswith("(exit_code)"), text


def test_a_ppo_jobs_page_charts_its_reward_and_learning_rate(server_factory: Callable[..., ApiServer],
                                                               workspace: Path, tmp_path: Path,
                                                               tabs: Callable[..., Tab]) -> None:  # fmt: skip
    """PPO logs no loss and names its learning rate `lr`: both charts it had stayed empty (hunt AJ)."""
    seed_swift_probe(tmp_path)  # (reward_model is checked against swift's own argument list)
    server = server_factory()
    body = job_body(workspace, "ppo", kind="rlhf", rlhf_type="ppo", auto_start=True, step_seconds=0.05,
                    training={"max_steps": 30, "logging_steps": 1, "reward_model": str(workspace / MODEL_DIR),
                              "model_type": "qwen2", "template": "qwen2_5"})  # fmt: skip
    assert (r := server.create(**body)).status_code == 201, r.text
    server.wait_status("ppo", "completed")
    page = tabs(server).goto("/ui/jobs/ppo")
    expect(page.locator("#charts figcaption").first).to_contain_text("Reward")
    page.wait_for_function("() => window.dashboard.lossPoints && window.dashboard.lossPoints() === 30", timeout=30_000)
    assert page.evaluate("window.dashboard.lrPoints()") == 30
    history = server.http.get("/jobs/ppo/progress", params={"history_limit": 100}).json()["history"]
    assert history[-1]["learning_rate"] is not None and history[-1]["metrics"]["objective/rlhf_reward"] == 0.1


@pytest.mark.timeout(180)
def test_while_the_export_runs_the_job_page_offers_to_stop_it_not_to_export_or_delete(
    server_factory: Callable[..., ApiServer], workspace: Path, tmp_path: Path, tabs: Callable[..., Tab]
) -> None:
    # AUTO_EXPORT merges a LoRA job's model as soon as it completes: the page enabled Export and Delete (both
    # refused with 409 meanwhile) and disabled Stop, the one action that works then (it stops the export).
    wrapper, _gate = gated_swift(tmp_path)
    server = server_factory(env={"SWIFT_BIN": str(wrapper)})
    assert (
        server.create(**job_body(workspace, "merging", auto_start=True, training={"max_steps": 2})).status_code == 201
    )
    server.wait_status("merging", "completed")
    wait_for(lambda: server.job("merging")["export"]["pid"], what="the export to start")
    page = tabs(server).goto("/ui/jobs/merging")
    stop, export, delete = (page.locator(f"#actions button[data-action={a}]") for a in ("stop", "export", "delete"))
    expect(stop).to_have_text("Stop export")
    expect(stop).to_be_enabled()
    expect(export).to_be_disabled()
    expect(delete).to_be_disabled()

    asked: list[str] = []

    def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    stop.click()
    expect(page.locator("#action-result")).to_contain_text("Export stopped")
    assert asked and "export of job merging" in asked[0]
    assert server.job("merging")["export"]["status"] == "stopped"
    expect(stop).to_have_text("Stop")
    expect(stop).to_be_disabled()
    expect(export).to_be_enabled()
    expect(delete).to_be_enabled()


@pytest.mark.timeout(180)
def test_the_job_page_offers_resume_and_export_only_when_there_is_a_checkpoint(
    server_factory: Callable[..., ApiServer], workspace: Path, tabs: Callable[..., Tab]
) -> None:
    server = server_factory(env={"AUTO_EXPORT": "false"})
    body = job_body(workspace, "early", auto_start=True, fail_at_step=2, training={"max_steps": 10, "save_steps": 50})
    assert server.create(**body).status_code == 201
    body = job_body(workspace, "resting", auto_start=True, hang_after_steps=2,
                    training={"max_steps": 10, "save_steps": 50})  # fmt: skip
    assert server.create(**body).status_code == 201
    server.wait_status("early", "failed")
    wait_for(lambda: server.job("resting")["progress"].get("current_step"), what="a step of 'resting'")
    assert server.http.post("/jobs/resting/pause").json()["status"] == "paused"
    # What the server answers the buttons the page must not offer:
    assert server.http.post("/jobs/early/resume").status_code == 409
    assert server.http.post("/jobs/early/export").status_code == 409
    assert server.http.post("/jobs/resting/export").status_code == 409

    tab = tabs(server)
    # Until the page has the list, it does not know of a checkpoint: it offers neither (it offered both).
    listing: list[Route] = []
    tab.page.route(lambda url: url.endswith("/jobs/early/checkpoints"), hold_nth(listing, 1))
    page = tab.goto("/ui/jobs/early")
    wait_for(lambda: pumped(page, listing), what="the page's read of the checkpoints")
    assert page.locator("#actions button[data-action=resume]").is_disabled()
    assert page.locator("#actions button[data-action=export]").is_disabled()
    listing[0].continue_()
    expect(page.locator("#checkpoints-box")).to_contain_text("No checkpoint yet.")
    expect(page.locator("#actions button[data-action=delete]")).to_be_enabled()
    expect(page.locator("#actions button[data-action=resume]")).to_be_disabled()
    expect(page.locator("#actions button[data-action=export]")).to_be_disabled()
    # A paused job resumes from the beginning without one.
    page = tab.goto("/ui/jobs/resting")
    expect(page.locator("#checkpoints-box")).to_contain_text("No checkpoint yet.")
    expect(page.locator("#actions button[data-action=resume]")).to_be_enabled()
    expect(page.locator("#actions button[data-action=export]")).to_be_disabled()

    # A stopped job resumed from elsewhere (the API): the page follows the new run, its streams too (they had
    # ended with the stopped run: the badge moved on while the events, log and charts stood still).
    body = job_body(
        workspace, "saved", auto_start=True, hang_after_steps=2, training={"max_steps": 10, "save_steps": 1}
    )
    assert server.create(**body).status_code == 201
    wait_for(lambda: server.http.get("/jobs/saved/checkpoints").json()["total"], what="a checkpoint of 'saved'")
    assert server.http.post("/jobs/saved/stop").json()["status"] == "stopped"
    # The page's first read of the job is held until after the resume, so that read (not the periodic one)
    # is the first to see the new run: the race that left the page on the old run's ended streams.
    held: list[Route] = []

    def the_job(url: str) -> bool:
        return url.endswith("/jobs/saved") and "/ui/" not in url

    tab.page.route(the_job, lambda route: held.append(route))
    page = tab.goto("/ui/jobs/saved")
    expect(page.locator("#job [data-status]")).to_have_text("stopped")
    wait_for(lambda: pumped(page, held), what="the page's first read of the job")
    assert server.http.post("/jobs/saved/resume").status_code == 200
    held[0].continue_()
    tab.page.unroute(the_job)
    expect(page.locator("#events")).to_contain_text("resume requested", timeout=20_000)
    expect(page.locator("#job [data-status]")).to_have_text(re.compile("queued|running"))

    # An empty priority is refused on the page (it went as priority 0).
    assert server.create(**job_body(workspace, "waiting")).status_code == 201
    page = tab.goto("/ui/jobs/waiting")
    page.fill("#priority-input", "")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#actions button[data-action=priority]")
    expect(page.locator("#action-result")).to_contain_text("whole number from 0 to 10")
    assert server.job("waiting")["priority"] == 5


def stopped_with_a_checkpoint(server: ApiServer, workspace: Path, name: str) -> None:
    body = job_body(workspace, name, auto_start=True, hang_after_steps=2, training={"max_steps": 10, "save_steps": 1})
    assert server.create(**body).status_code == 201
    wait_for(lambda: server.http.get(f"/jobs/{name}/checkpoints").json()["total"], what=f"a checkpoint of {name!r}")
    assert server.http.post(f"/jobs/{name}/stop").json()["status"] == "stopped"


def hold_nth(held: list[Route], n: int) -> Callable[[Route], None]:
    """A route handler that holds the `n`th request it is given (1: the first) in `held` and lets the others
    through."""
    seen = 0

    def handle(route: Route) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            held.append(route)
        else:
            route.continue_()

    return handle


def pumped(page: Page, held: list[Route]) -> bool:
    page.evaluate("0")  # Playwright hands routes to their handler only inside one of its calls
    return bool(held)


@pytest.mark.timeout(180)
def test_a_resume_answered_while_a_read_of_the_job_was_under_way_keeps_its_answer_across_the_new_run(
    server: ApiServer, workspace: Path, tabs: Callable[..., Tab]
) -> None:
    # The page's own read of the job, begun before the click, came back after the resume with the job still
    # stopped: the click's handler took that for the job's state and did not start the page again, the periodic
    # refresh did, 3 s later, and the resume's answer was gone (it failed so in CI under load).
    stopped_with_a_checkpoint(server, workspace, "kept")
    held: list[Route] = []
    tab = tabs(server)
    # Its second read: after the first, the page lists the checkpoints, and only then offers resume.
    tab.page.route(lambda url: url.endswith("/jobs/kept") and "/ui/" not in url, hold_nth(held, 2))
    page = tab.goto("/ui/jobs/kept")
    wait_for(lambda: pumped(page, held), what="the page's next read of the job")
    stale = held[0].fetch()  # the server reads the job now, stopped; the page gets the answer after the resume
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#actions button[data-action=resume]")
    wait_for(lambda: page.evaluate("0") == 0 and server.job("kept")["status"] in ("queued", "running"),
             what="the resume to be recorded")  # fmt: skip
    with page.expect_navigation(timeout=15_000):
        held[0].fulfill(response=stale)
    expect(page.locator("#action-result")).to_contain_text("esum")
    expect(page.locator("#job [data-status]")).to_have_text(re.compile("queued|running"))


@pytest.mark.timeout(180)
def test_no_action_is_offered_again_while_one_is_under_way(server: ApiServer, workspace: Path,
                                                           tabs: Callable[..., Tab]) -> None:  # fmt: skip
    # A read of the job begun before the click, landing while the resume was under way, enabled the buttons its
    # stale status allowed: a second click sent a second resume (answered 409, whose text replaced the first's).
    stopped_with_a_checkpoint(server, workspace, "once")
    reads: list[Route] = []
    resumes: list[Route] = []
    listed: list[str] = []
    tab = tabs(server)
    tab.page.route(lambda url: url.endswith("/jobs/once") and "/ui/" not in url, hold_nth(reads, 2))
    tab.page.route(lambda url: url.endswith("/jobs/once/resume"), lambda route: resumes.append(route))
    tab.page.on("request", lambda r: listed.append(r.url) if r.url.endswith("/jobs/once/checkpoints") else None)
    page = tab.goto("/ui/jobs/once")
    wait_for(lambda: pumped(page, reads), what="the page's next read of the job")
    stale = reads[0].fetch()
    page.once("dialog", lambda dialog: dialog.accept())
    resume = page.locator("#actions button[data-action=resume]")
    resume.click()
    wait_for(lambda: pumped(page, resumes), what="the resume to be sent")
    before = len(listed)
    reads[0].fulfill(response=stale)  # the job as it was before the click: stopped, resume allowed
    # It shows the job, then reads the checkpoints: once that read is asked for, the page has shown the job.
    wait_for(lambda: page.evaluate("0") == 0 and len(listed) > before, what="the page to have shown that read")
    assert resume.is_disabled() and page.locator("#actions button[data-action=delete]").is_disabled()
    with page.expect_navigation(timeout=15_000):
        resumes[0].continue_()
    expect(page.locator("#action-result")).to_contain_text("esum")
    assert len(resumes) == 1


def watch_offered_again(page: Page, selector: str) -> None:
    """Record in sessionStorage (which outlives the page) whether the button at `selector` is enabled again after
    being disabled: "offered-again"."""
    page.evaluate(
        """(selector) => {
      const b = document.querySelector(selector);
      let was = b.disabled;
      new MutationObserver(() => {
        if (was && !b.disabled) sessionStorage.setItem("offered-again", "yes");
        was = b.disabled;
      }).observe(b, { attributes: true, attributeFilter: ["disabled"] });
    }""",
        selector,
    )


@pytest.mark.timeout(180)
def test_create_form_is_not_offered_again_once_the_job_is_created(server: ApiServer, workspace: Path,
                                                                  tabs: Callable[..., Tab]) -> None:  # fmt: skip
    # After the 201 the form's button came back while the job's page loaded: a second click posted the job again.
    tab = tabs(server)
    page = tab.goto("/ui/new")
    fill_form(page, workspace, "made-once")
    watch_offered_again(page, "#submit")  # (until the page leaves)
    page.click("#submit")
    expect(page).to_have_url(re.compile(r"/ui/jobs/made-once$"))
    assert page.evaluate("sessionStorage.getItem('offered-again')") is None
    assert server.http.get("/jobs").json()["total"] == 1


@pytest.mark.timeout(180)
def test_a_create_whose_answer_was_lost_is_sent_again_as_the_same_job(server: ApiServer, workspace: Path,
                                                                      tabs: Callable[..., Tab]) -> None:  # fmt: skip
    # The server created the job, the answer never came: the retry got "output_dir ... is in use by active job",
    # and a user who then changed the folder created a second job.
    tab = tabs(server)
    page = tab.goto("/ui/new")
    fill_form(page, workspace, "answer-lost")
    posts: list[Route] = []
    tab.page.route(lambda url: url.endswith("/training/jobs"), hold_nth(posts, 1))
    page.click("#submit")
    wait_for(lambda: pumped(page, posts), what="the create to be sent")
    assert posts[0].fetch().status == 201  # the server has the job
    posts[0].abort()
    expect(page.locator("#form-error")).to_contain_text("did not answer")
    page.click("#submit")
    expect(page).to_have_url(re.compile(r"/ui/jobs/answer-lost$"))
    listed = server.http.get("/jobs").json()
    assert [j["job_id"] for j in listed["jobs"]] == ["answer-lost"]


@pytest.mark.timeout(180)
def test_a_deleted_job_is_not_offered_for_deletion_again(server: ApiServer, workspace: Path,
                                                         tabs: Callable[..., Tab]) -> None:  # fmt: skip
    # After the delete was answered its buttons came back while the list loaded: a second click got a 404.
    assert server.create(**job_body(workspace, "deleted-once")).status_code == 201
    tab = tabs(server)
    page = tab.goto("/ui/jobs/deleted-once")
    delete = page.locator("#actions button[data-action=delete]")
    expect(delete).to_be_enabled()
    watch_offered_again(page, "#actions button[data-action=delete]")
    page.once("dialog", lambda dialog: dialog.accept())
    delete.click()
    expect(page).to_have_url(re.compile(r"/ui/jobs$"))
    assert page.evaluate("sessionStorage.getItem('offered-again')") is None
    assert server.http.get("/jobs/deleted-once").status_code == 404


@pytest.mark.timeout(180)
def test_create_form_shows_validation_messages_next_to_fields(server: ApiServer, workspace: Path,
                                                              tabs: Callable[..., Tab]) -> None:  # fmt: skip
    tab = tabs(server)
    page = tab.goto("/ui/new")
    # A field error (422 with `errors`): loc ["body", "training", "max_steps"].
    fill_form(page, workspace, "dash-invalid", max_steps="0")
    page.click("#submit")
    slot = page.locator('[data-error-for="training.max_steps"]')
    expect(slot).to_contain_text("greater than or equal to 1")
    expect(page.locator("#f-max_steps")).to_have_attribute("aria-invalid", "true")
    described = page.locator("#f-max_steps").get_attribute("aria-describedby")
    assert described and "greater than or equal to 1" in page.locator(f"#{described}").inner_text()
    expect(page.locator('[data-error-for="data_path"]')).to_be_empty()
    assert page.url.endswith("/ui/new")
    tab.shot("new-422-field")

    # A 422 with only a detail (the pre-flight check of the data set) goes next to the field it names.
    page.fill("#f-max_steps", "5")
    page.fill("#f-data_path", str(workspace / "missing.jsonl"))
    page.click("#submit")
    expect(page.locator('[data-error-for="data_path"]')).to_contain_text("missing.jsonl")
    expect(slot).to_be_empty()
    tab.shot("new-422-detail")

    # A number past what a double holds is refused, not sent as null (swift's default); a message about a key of
    # the JSON box names the key.
    page.fill("#f-data_path", str(workspace / "dash-invalid.jsonl"))
    page.fill("#f-max_steps", "1e400")
    page.fill("#f-training_extra", '{"eval_steps": "x"}')
    page.click("#submit")
    expect(slot).not_to_be_empty()
    expect(page.locator('[data-error-for="training"]')).to_contain_text("eval_steps: ")

    # A check of the whole body names its field in its message (loc ["body"]), as a training argument's detail
    # does: they went to the box under the form, no field marked.
    page.fill("#f-max_steps", "5")
    page.fill("#f-training_extra", '{"warmup_ratio": 1}')
    page.fill("#f-rlhf_type", "dpo")
    page.click("#submit")
    expect(page.locator('[data-error-for="rlhf_type"]')).to_contain_text("rlhf_type is for kind 'rlhf'")
    expect(page.locator("#f-rlhf_type")).to_have_attribute("aria-invalid", "true")
    page.fill("#f-rlhf_type", "")
    page.click("#submit")
    box = page.locator('[data-error-for="training"]')
    expect(box).to_have_text(re.compile(r"^training\.warmup_ratio must be less than 1"))
    expect(page.locator("#f-training_extra")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#form-error")).to_be_hidden()
    # A long path in a message wraps in its slot: it widened the page.
    page.fill("#f-training_extra", "")
    page.fill("#f-data_path", str(workspace / ("x" * 300 + ".jsonl")))
    page.click("#submit")
    expect(page.locator('[data-error-for="data_path"]')).not_to_be_empty()
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width
    assert server.http.get("/jobs").json()["total"] == 0


# ---- the SSE reader: fetch() + getReader(), since EventSource cannot send Authorization ------------------------


def test_the_lists_fit_a_phone_screen_their_tables_scrolling_in_their_own_box(
    server: ApiServer, workspace: Path, tabs: Callable[..., Tab]
) -> None:
    # The jobs table was 1147 px wide on a 375 px screen: the whole page, header included, panned sideways, and
    # badges broke inside their word ("queu/ed").
    for name in ("phone-a", "phone-b"):
        body = job_body(workspace, name, hang_after_steps=1, auto_start=True, num_gpus=2)
        assert server.create(**body).status_code == 201
    tab = tabs(server, width=375)
    for path in ("/ui/jobs", "/ui/queue", "/ui/gpus"):
        page = tab.goto(path)
        page.wait_for_selector("table.grid")
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], (path, width)
    page = tab.goto("/ui/jobs")
    badge = page.locator("tr[data-job='phone-b'] .badge")
    assert badge.evaluate("b => b.getClientRects().length") == 1  # one line: not broken inside its word
    # A job's facts ran four columns wide: a date ran into the next label, and paths broke every few letters
    # (hunt ET). Each fits its box now.
    page = tab.goto("/ui/jobs/phone-a")
    page.wait_for_selector("dl.facts dd")
    spilled = page.evaluate("[...document.querySelectorAll('dl.facts dd')].filter(d => d.scrollWidth > "
                            "d.clientWidth + 1).map(d => d.textContent)")  # fmt: skip
    assert spilled == [], spilled
    for name in ("phone-a", "phone-b"):
        server.http.post(f"/jobs/{name}/stop")


def test_sse_reader_parses_reconnects_with_last_event_id_and_stops_at_end(
    server: ApiServer, tabs: Callable[..., Tab]
) -> None:
    tab = tabs(server)
    page = tab.goto("/ui/new")  # any page: it loads dashboard.js, and this one opens no stream of its own
    asked: list[str | None] = []
    answers = [
        # A heartbeat, a multi-line message, then the connection drops in the middle of a message.
        "id: 1\ndata: first\n\n: keep-alive\n\nid: 2\nevent: progress\ndata: two\ndata: lines\n\ndata: cut sho",
        # After the reconnect: CRLF line ends, then `event: end` (nothing after it is read).
        'id: 3\r\ndata: third\r\n\r\nevent: end\ndata: {"status": "stopped"}\n\nid: 4\ndata: after\n\n',
    ]

    def answer(route: Route) -> None:
        asked.append(route.request.headers.get("last-event-id"))
        assert route.request.headers.get("accept") == "text/event-stream"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=answers[len(asked) - 1])

    page.route("**/api/v1/training/sse-test", answer)
    result = page.evaluate("""async () => {
        const got = [], states = [];
        await window.dashboard.stream("/sse-test", {
            onMessage: (m) => got.push(m), onEnd: (m) => got.push(m), onState: (s) => states.push(s)});
        return {got, states};
    }""")
    assert asked == [None, "2"]
    assert result["got"] == [
        {"id": "1", "event": "message", "data": "first"},
        {"id": "2", "event": "progress", "data": "two\nlines"},
        {"id": "3", "event": "message", "data": "third"},
        {"id": None, "event": "end", "data": '{"status": "stopped"}'},
    ]
    assert result["states"] == ["live", "reconnecting…", "live", "ended"]


# ---- API keys: the login form, the cookie, the lists ------------------------------------------------------


@pytest.mark.timeout(240)
def test_login_with_api_keys_then_lists_and_actions(server_factory: Callable[..., ApiServer], workspace: Path,
                                                     tabs: Callable[..., Tab]) -> None:  # fmt: skip
    server = server_factory(env={"API_KEYS": KEYS_SETTING})
    for key, name in ((ALICE_KEY, "alice-job"), (BOB_KEY, "bob-job")):
        r = server.http.post("/jobs", json=job_body(workspace, name), headers=auth(key))
        assert r.status_code == 201, r.text
    tab = tabs(server)
    page = tab.page
    page.goto(tab.base + "/ui/queue")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=%2Fui%2Fqueue$"))
    tab.shot("login")

    # A wrong key: the form says so and keeps nothing.
    page.fill("#key", "not-a-valid-key-0123456789")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    assert page.evaluate("localStorage.getItem('swiftApiKey')") is None
    assert not [c for c in tab.context.cookies() if c["name"] == COOKIE]
    # One no header can carry (a pasted en dash): fetch() threw, the form took that for a network failure and kept
    # the key, and every API call of every page then failed as "the server did not answer".
    page.fill("#key", ALICE_KEY.replace("-", "\u2013", 1) + "\u2013x")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("printable ASCII")
    assert page.evaluate("localStorage.getItem('swiftApiKey')") is None

    page.fill("#key", ALICE_KEY)
    page.click("#login-form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/queue$"))
    expect(page.locator("h1")).to_have_text("GPU queue")
    cookie = next(c for c in tab.context.cookies() if c["name"] == COOKIE)
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/")
    assert page.evaluate("localStorage.getItem('swiftApiKey')") == ALICE_KEY
    assert page.evaluate("document.cookie") == "", "the key cookie must not be readable by scripts"

    # A key like that stored before this check: dropped, so the page still refreshes (from its cookie).
    page.evaluate("localStorage.setItem('swiftApiKey', 'alice\u2013key-0123456789abcdef')")
    page = tab.goto("/")
    expect(page.locator("body")).to_have_attribute("data-refreshed", re.compile(r"\d+"), timeout=10_000)
    assert page.evaluate("localStorage.getItem('swiftApiKey')") is None
    page.evaluate(f"localStorage.setItem('swiftApiKey', {ALICE_KEY!r})")

    # The lists, as alice: her job only.
    page = tab.goto("/")
    expect(page.locator("tr[data-job='alice-job']")).to_contain_text("pending")
    expect(page.locator("tr[data-job='bob-job']")).to_have_count(0)
    expect(page.locator("header .who")).to_contain_text("alice (user)")
    tab.goto("/ui/gpus")
    expect(page.locator("tr[data-gpu]")).to_have_count(2)
    tab.shot("gpus")

    # The job page's API calls carry the key from localStorage: a change of priority goes through.
    page = tab.goto("/ui/jobs/alice-job")
    expect(page.locator("#actions button[data-action=priority]")).to_be_enabled()
    page.fill("#priority-input", "8")
    page.once("dialog", lambda d: d.accept())
    page.click("#actions button[data-action=priority]")
    expect(page.locator("[data-fact=priority]")).to_have_text("8")
    assert server.http.get("/jobs/alice-job", headers=auth(ALICE_KEY)).json()["priority"] == 8
    expect(page.locator("#notice")).to_be_hidden()
    tab.shot("job-keys")
    assert ALICE_KEY not in page.url

    # An admin may filter by owner; the cookie alone renders the list (plain HTTP, no script).
    with httpx.Client(base_url=tab.base, cookies={COOKIE: ADMIN_KEY}) as http:
        listed = http.get("/ui/jobs", params={"owner": "bob"})
        assert listed.status_code == 200 and "bob-job" in listed.text and "alice-job" not in listed.text
        assert http.get("/ui/jobs/bob-job").status_code == 200
    with httpx.Client(base_url=tab.base, cookies={COOKIE: BOB_KEY}) as http:
        assert http.get("/ui/jobs/alice-job").status_code == 404
        assert "alice-job" not in http.get("/").text
        # A user's list page has no owner filter: one in the URL shows their own jobs, not an empty page.
        theirs = http.get("/ui/jobs", params={"owner": "alice"}).text
        assert "bob-job" in theirs and "alice-job" not in theirs
    with httpx.Client(base_url=tab.base, cookies={COOKIE: "wrong-key-0123456789abc"}) as http:
        r = http.get("/ui/gpus")
        assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=%2Fui%2Fgpus"

    # Log out: the cookie and the stored key are gone, and so is one authorized in Swagger UI (/docs keeps it in
    # this origin's localStorage: the next person at this browser called the API as alice).
    swagger = {"HTTPBearer": {"name": "HTTPBearer", "schema": {"type": "http", "scheme": "bearer"}, "value": ALICE_KEY}}
    page.evaluate("(kept) => localStorage.setItem('authorized', kept)", json.dumps(swagger))
    page.click("header form[data-logout] button")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    assert not [c for c in tab.context.cookies() if c["name"] == COOKIE]
    assert page.evaluate("localStorage.getItem('swiftApiKey')") is None
    assert page.evaluate("localStorage.getItem('authorized')") is None


@pytest.mark.timeout(180)
def test_a_list_says_it_is_stale_while_redis_is_gone_and_a_reload_is_a_page(
    server_factory: Callable[..., ApiServer], own_redis: EmbeddedRedis, tabs: Callable[..., Tab], workspace: Path
) -> None:
    # During a Redis outage the queue page went on showing "2 of 2 GPUs free" without a word, and a reload showed
    # the API's JSON.
    server = server_factory(env={"REDIS_URL": own_redis.url, **QUICK_TO_GIVE_UP})
    tab = tabs(server)
    page = tab.goto("/ui/queue")
    expect(page.locator("body")).to_have_attribute("data-refreshed", re.compile(r"\d+"), timeout=10_000)
    expect(page.locator("#notice")).to_be_hidden()
    assert server.create(**job_body(workspace, "kept")).status_code == 201
    job_page = tabs(server).goto("/ui/jobs/kept")
    job_page.wait_for_function("() => window.dashboard.jobStatus && window.dashboard.jobStatus() === 'pending'")
    own_redis.stop()
    expect(page.locator("#notice")).to_contain_text("Not up to date: the server answered 503", timeout=15_000)
    # The job page says so too: its status and actions stood as they were with only "reconnecting…" by the log.
    expect(job_page.locator("#notice")).to_contain_text("Not up to date: Redis does not answer", timeout=15_000)
    # A Redis back without the job (one that keeps nothing): the page says it is gone and polls no more, so its
    # notice that it stands still went with it, not stood for good (hunt ET).
    job_page.route(re.compile(r".*/api/v1/training/jobs/kept$"), lambda route: route.fulfill(
        status=404, content_type="application/json", body='{"detail": "job \'kept\' not found"}'))  # fmt: skip
    job_page.wait_for_function("() => window.dashboard.jobStatus && window.dashboard.jobStatus() === 'deleted'",
                               timeout=15_000)  # fmt: skip
    expect(job_page.locator("#notice")).to_be_hidden()
    response = page.reload()
    assert response is not None and response.status == 503
    assert response.headers["content-type"].startswith("text/html") and response.headers["retry-after"] == "5"
    expect(page.locator("h1")).to_have_text("Not available")
    expect(page.locator("main")).to_contain_text("Redis) does not answer")


# ---- without JavaScript; escaping ---------------------------------------------------------------------------


def test_the_api_docs_load_and_fetch_nothing_from_anywhere_else(server: ApiServer, tabs: Callable[..., Tab]) -> None:
    """ReDoc's footer drew its logo from cdn.redoc.ly: every visit told a third party this server's address (and,
    offline, logged an error), where the README says the docs fetch nothing from a CDN."""
    tab = tabs(server)
    requested: list[str] = []
    errors: list[str] = []
    tab.page.on("request", lambda r: requested.append(r.url))
    tab.page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page = tab.goto("/docs")
    page.wait_for_selector(".opblock-summary", state="attached")
    page = tab.goto("/redoc")
    page.wait_for_selector('img[alt="redocly logo"]', state="attached")  # (drawn last, once the rest is)
    assert page.locator("h2").count() > 3  # (its operations, drawn from /openapi.json)
    elsewhere = [u for u in requested if not u.startswith((tab.base + "/", "data:", "blob:"))]
    assert elsewhere == [] and errors == [], (elsewhere, errors)
    for path in ("/docs", "/redoc"):
        policy = tab.context.request.get(tab.base + path).headers["content-security-policy"]
        assert "default-src 'self'" in policy and "img-src 'self' data:" in policy, policy


@pytest.mark.timeout(180)
def test_lists_render_without_javascript_and_escape_hostile_text(server: ApiServer, workspace: Path,
                                                                 tabs: Callable[..., Tab]) -> None:  # fmt: skip
    hostile = job_body(workspace, "hostile", output_dir=HOSTILE)
    hostile["data_path"] = fake_dataset(workspace, HOSTILE)
    created = server.create(**hostile)
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    assert server.create(**job_body(workspace, "plain", auto_start=True, step_seconds=0.1,
                                    training={"max_steps": 300})).status_code == 201  # fmt: skip
    server.wait_status("plain", "running")
    wait_for(lambda: server.job("plain")["progress"].get("current_step"), what="the first step of 'plain'")
    # Two GPUs asked while 'plain' holds one: it waits in the queue, and the queue page says why.
    wide = server.create(**job_body(workspace, "wide", auto_start=True, num_gpus=2))
    assert wide.status_code == 201 and wide.json()["status"] == "queued", wide.text

    tab = tabs(server, javascript=False)
    page = tab.goto("/")
    row = page.locator(f"tr[data-job='{job_id}']")
    expect(row).to_contain_text(HOSTILE)  # shown as text, in full
    expect(page.locator("#pwn, img[src=x]")).to_have_count(0)
    expect(page.locator("tr[data-job='plain'] .bar")).to_contain_text("/300")
    tab.shot("nojs-jobs")
    page = tab.goto("/?status=running")
    expect(page.locator("tr[data-job]")).to_have_count(1)
    expect(page.locator("tr[data-job='plain']")).to_have_count(1)
    page = tab.goto("/ui/jobs/" + quote(job_id))
    expect(page.locator("#job")).to_contain_text(HOSTILE)
    expect(page.locator("#pwn, img[src=x]")).to_have_count(0)
    tab.shot("nojs-job")
    page = tab.goto("/ui/gpus")
    expect(page.locator("tr[data-gpu] a")).to_have_text("plain")
    page = tab.goto("/ui/queue")
    queued = page.locator("tr[data-job='wide']")
    expect(queued).to_contain_text("1")  # its position
    expect(queued.locator(".reason")).not_to_be_empty()
    expect(page.locator(".summary")).to_contain_text("1 queued")
    tab.shot("nojs-queue")

    # With JavaScript: the list refreshes itself, and what the scripts add is text too.
    js = tabs(server)
    page = js.goto("/")
    bar = page.locator("tr[data-job='plain'] .bar")
    before = bar.inner_text()
    expect(bar).not_to_have_text(before, timeout=10_000)
    expect(page.locator("#pwn, img[src=x]")).to_have_count(0)
    page = js.goto("/ui/jobs/" + quote(job_id))
    page.wait_for_function("() => window.dashboard.jobStatus && document.querySelectorAll('#events li').length > 0")
    expect(page.locator("#attempts-box")).to_contain_text("No run yet.")
    assert page.evaluate("window.__xss") is None
    expect(page.locator("#pwn, img[src=x]")).to_have_count(0)

    # A hostile id in the URL comes back escaped, in a 404.
    with httpx.Client(base_url=tab.base) as http:
        bad = http.get("/ui/jobs/" + quote('x"><b id=pwn3>', safe=""))
        assert bad.status_code == 404
        assert "<b id=pwn3>" not in bad.text and "&lt;b id=pwn3&gt;" in bad.text
        text = http.get("/").text
        assert "<img src=x" not in text and "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;" in text


def test_the_job_page_lists_what_the_job_wrote_with_links_that_download_it(server_factory: Callable[..., ApiServer],
                                                                          workspace: Path) -> None:  # fmt: skip
    server = server_factory(env={"API_KEYS": KEYS_SETTING})
    body = job_body(workspace, "files", auto_start=True, training={"max_steps": 4, "save_steps": 2})
    assert server.http.post("/jobs", json=body, headers=auth(ALICE_KEY)).status_code == 201
    job = wait_for(lambda: (j := server.http.get("/jobs/files", headers=auth(ALICE_KEY)).json())["status"]
                   == "completed" and j, what="the job")  # fmt: skip
    run = Path(job["run_dir"])
    root = server.base.split("/api/v1")[0]
    with httpx.Client(base_url=root, cookies={COOKIE: ALICE_KEY}) as http:
        html = http.get("/ui/jobs/files").text
        links = dict(re.findall(r'<a href="(/ui/jobs/files/files/[^"]+)" download>([^<]+)</a>', html))
        assert f"/ui/jobs/files/files/{run.name}/logging.jsonl" in links
        assert f"/ui/jobs/files/files/{run.name}/checkpoint-4.tar" in links
        got = http.get(f"/ui/jobs/files/files/{run.name}/logging.jsonl")
        assert got.status_code == 200 and got.content == (run / "logging.jsonl").read_bytes()
        # What a job wrote is never run or sniffed as a page of the dashboard's origin.
        assert got.headers["x-content-type-options"] == "nosniff"
        assert got.headers["content-security-policy"] == "sandbox"
        part = http.get(f"/ui/jobs/files/files/{run.name}/logging.jsonl", headers={"Range": "bytes=0-9"})
        assert part.status_code == 206 and part.content == (run / "logging.jsonl").read_bytes()[:10]
        assert http.get("/ui/jobs/files/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd").status_code == 404
        assert http.get(f"/ui/jobs/files/files/{run.name}/logging.jsonl%0a").status_code == 404
    with httpx.Client(base_url=root, cookies={COOKIE: BOB_KEY}) as http:
        assert http.get(f"/ui/jobs/files/files/{run.name}/logging.jsonl").status_code == 404
    with httpx.Client(base_url=root) as http:
        r = http.get(f"/ui/jobs/files/files/{run.name}/logging.jsonl")
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")


def test_a_queue_reason_links_only_a_job_the_reader_may_open() -> None:
    ctx = PageContext("", "/api/v1/training", True, "bob", "user")
    entry = {"position": 1, "job_id": "his", "mine": True, "num_gpus": 2,
             "pending_reason": {"code": "reservation", "message": "held for a job", "job_id": "hers"}}  # fmt: skip
    summary = {"length": 1, "offset": 0, "limit": 100, "free_gpus": 0, "total_gpus": 2, "running_jobs": 1,
               "policy": "fifo", "processor_running": True}  # fmt: skip
    overview = {"summary": summary, "entries": [entry]}
    assert 'href="/ui/jobs/hers"' not in views.queue_body(ctx, overview, set())
    assert 'href="/ui/jobs/hers"' in views.queue_body(ctx, overview, {"hers"})
    # A preemption's job is the run that makes way, which its message names: "(for victim)" read as a wait for it.
    entry["pending_reason"] = {"code": "preemption", "message": "lower-priority run hers will make way for it",
                               "job_id": "hers"}  # fmt: skip
    assert "(for " not in views.queue_body(ctx, overview, {"hers"})


def test_the_queue_page_says_why_nothing_starts_while_starts_are_held() -> None:
    ctx = PageContext("", "/api/v1/training", True, "bob", "user")
    summary = {"length": 0, "offset": 0, "limit": 100, "free_gpus": 2, "total_gpus": 2, "running_jobs": 0,
               "policy": "fifo", "processor_running": True}  # fmt: skip
    assert "no run starts" not in views.queue_body(ctx, {"summary": summary, "entries": []}, set())
    summary["starts_held"] = "no run starts until 12:00:00: Redis restarted <since> the scheduler last looked"
    assert "no run starts until 12:00:00: Redis restarted &lt;since&gt;" in views.queue_body(
        ctx, {"summary": summary, "entries": []}, set()
    )


def test_a_queue_longer_than_its_page_says_so_and_links_the_rest() -> None:
    # The queue page showed its first 100 jobs with nothing to say that more waited, and no way to them.
    ctx = PageContext("", "/api/v1/training", True, "bob", "user")

    def shown(offset: int) -> str:
        entry = {"position": offset + 1, "job_id": f"j{offset}", "mine": True, "num_gpus": 1}
        summary = {"length": 3, "offset": offset, "limit": 1, "free_gpus": 0, "total_gpus": 2, "running_jobs": 1,
                   "policy": "backfill", "processor_running": True}  # fmt: skip
        return views.queue_body(ctx, {"summary": summary, "entries": [entry]}, set())

    first, last = shown(0), shown(2)
    assert (
        "1–1 of 3" in first
        and 'href="/ui/queue?offset=1&amp;limit=1" rel="next"' in first
        and 'rel="prev"' not in first
    )
    assert (
        "3–3 of 3" in last and 'href="/ui/queue?offset=1&amp;limit=1" rel="prev"' in last and 'rel="next"' not in last
    )


def test_a_jobs_row_shows_an_excerpt_of_its_error_with_no_bidi_control_and_a_page_past_the_end_links_back() -> None:
    """Found by the dashboard hunt: one failed job's 4,000-character error made its row 7,000 px tall (the admin's
    first page buried); a right-to-left override in it reversed the text after it ("(edoc_tixe)"); and from an
    offset past the end, "newer" led to another empty page, 19 clicks from any job."""
    ctx = PageContext("", "/api/v1/training", True, "root", "admin")
    error = "RuntimeError: \u202eboom" + "x" * 4000
    job = {"job_id": "j", "status": "failed", "error_message": error, "progress": {}}
    page = views.jobs_body(ctx, {"jobs": [job], "offset": 0, "limit": 50, "total": 1}, None, None, True)
    shown = page.split('class="error small"')[1].split("</div>")[0]
    assert "x" * views.ERROR_SHOWN not in shown.split(">", 1)[1] and "…" in shown
    assert "\u202e" not in page and "RuntimeError: \ufffdboom" in page
    past = views.jobs_body(ctx, {"jobs": [], "offset": 1000, "limit": 50, "total": 65}, None, None, True)
    assert "0 of 65" in past and 'href="/ui/jobs?offset=15&amp;limit=50" rel="prev"' in past


def test_refreshes_keep_a_selection_and_a_table_scrolled_sideways(server: ApiServer, workspace: Path,
                                                                  tabs: Callable[..., Tab]) -> None:  # fmt: skip
    # Every 3 s the job page rewrote its command and tables, and the lists swapped their sections in: a selection
    # (a checkpoint's path, to copy it) went, and a table scrolled sideways on a narrow screen went back (hunt DB).
    body = job_body(workspace, "sel", auto_start=True, training={"max_steps": 4, "save_steps": 2})
    assert server.create(**body).status_code == 201
    server.wait_status("sel", "completed")
    # (its automatic export done: the export's end rightly changes the checkpoints box, which one was exported)
    wait_for(lambda: server.job("sel")["export"]["status"] == "completed", what="the automatic export")
    running = job_body(workspace, "moving", step_seconds=0.2, auto_start=True, training={"max_steps": 2000})
    assert server.create(**running).status_code == 201
    page = tabs(server).goto("/ui/jobs/sel")
    page.wait_for_function("() => window.dashboard.jobReads() >= 1")
    for selector in ("#command", "#checkpoints-box code"):
        picked = page.evaluate(f"""() => {{
            const node = document.querySelector({selector!r});
            const range = document.createRange();
            range.selectNodeContents(node);
            getSelection().removeAllRanges();
            getSelection().addRange(range);
            return [getSelection().toString(), window.dashboard.jobReads()];
        }}""")
        assert picked[0], selector
        page.wait_for_function(f"() => window.dashboard.jobReads() >= {picked[1] + 2}")
        assert page.evaluate("() => getSelection().toString()") == picked[0], selector
    page = tabs(server, width=375).goto("/ui/jobs")
    scroller = page.locator(".table-scroll").first
    page.wait_for_function("() => document.body.dataset.refreshed")
    scrolled = scroller.evaluate("t => { t.scrollLeft = 150; return t.scrollLeft; }")
    assert scrolled > 0
    swaps = int(page.evaluate("() => document.body.dataset.swapped || 0"))
    page.wait_for_function(f"() => Number(document.body.dataset.swapped || 0) >= {swaps + 2}", timeout=30_000)
    assert page.locator(".table-scroll").first.evaluate("t => t.scrollLeft") == scrolled
    # A selection in a section that changes (the running job's progress) holds the swap back until it is let go.
    picked = page.evaluate("""() => {
        const node = document.querySelector("tr[data-job='moving'] td");
        const range = document.createRange();
        range.selectNodeContents(node);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        return [getSelection().toString(), Number(document.body.dataset.refreshed)];
    }""")
    page.wait_for_function(f"() => Number(document.body.dataset.refreshed) > {picked[1]}")
    refreshed = int(page.evaluate("() => document.body.dataset.refreshed"))
    page.wait_for_function(f"() => Number(document.body.dataset.refreshed) > {refreshed}")
    assert page.evaluate("() => getSelection().toString()") == picked[0] == "moving"
    swaps = int(page.evaluate("() => document.body.dataset.swapped || 0"))
    page.evaluate("() => getSelection().removeAllRanges()")
    page.wait_for_function(f"() => Number(document.body.dataset.swapped || 0) > {swaps}", timeout=30_000)
    server.http.post("/jobs/moving/stop")


def test_a_page_stops_following_once_another_tab_logs_in_as_someone_else(
    server_factory: Callable[..., ApiServer], workspace: Path, tabs: Callable[..., Tab]
) -> None:
    # Bob's login in a second tab made alice's open job page call her running job "deleted", and her list show
    # bob's jobs under her name (hunt DB).
    server = server_factory(env={"API_KEYS": KEYS_SETTING})
    body = job_body(workspace, "hers", step_seconds=0.2, auto_start=True, training={"max_steps": 2000})
    assert server.http.post("/jobs", json=body, headers=auth(ALICE_KEY)).status_code == 201
    tab = tabs(server)
    page = tab.page
    page.goto(tab.base + "/ui/login?next=%2Fui%2Fjobs%2Fhers")
    page.fill("#key", ALICE_KEY)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#log-state")).to_have_text("live")
    other = tab.context.new_page()
    other.goto(tab.base + "/ui/login")
    other.fill("#key", BOB_KEY)
    other.click("#login-form button[type=submit]")
    expect(other.locator("header .who")).to_contain_text("bob (user)")
    expect(page.locator("#notice")).to_contain_text("logged in or out in another tab: this page stopped following")
    expect(page.locator("#log-state")).to_have_text("stopped: the key changed in another tab")
    # Read with bob's key now, her job is not his to see: said so, not that it was deleted.
    expect(page.locator("section [data-status]").first).to_have_text("not visible")
    assert server.http.get("/jobs/hers", headers=auth(ALICE_KEY)).json()["status"] == "running"
    server.http.post("/jobs/hers/stop", headers=auth(ALICE_KEY))


def test_trainer_text_with_terminal_colours_and_bidi_controls_reaches_the_log_plain(
    server: ApiServer, workspace: Path, tabs: Callable[..., Tab]
) -> None:
    # The live log showed a right-to-left override reversing the line, and escape codes raw (hunt DB).
    hostile = job_body(workspace, "tty", fail_at_step=1, auto_start=True,
                       fail_message="RuntimeError: \u202eboom \x1b[1;31mred\x1b[0m done")  # fmt: skip
    assert server.create(**hostile).status_code == 201
    server.wait_status("tty", "failed")
    page = tabs(server).goto("/ui/jobs/tty")
    page.wait_for_function("() => window.dashboard.logText().includes('done')")
    line = next(x for x in page.evaluate("() => window.dashboard.logText()").splitlines() if "boom" in x)
    assert line == "RuntimeError: \ufffdboom red done", repr(line)
    expect(page.locator("#job-error")).to_contain_text("red done")
    assert "\x1b" not in page.locator("#job-error").inner_text()
