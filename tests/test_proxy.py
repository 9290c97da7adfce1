"""Behind a reverse proxy: a real server (start.py) sent what a proxy such as nginx sends it. At a sub-path
(`location /swift/ { proxy_pass http://127.0.0.1:8000/; }`) the proxy takes the prefix off, and the server must
put it back (ROOT_PATH) in everything a browser or a client follows; X-Forwarded-For names the client (hunt BS)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from application.cli.client import Api, CliError
from application.config import Settings
from tests.conftest import ALICE_KEY, KEYS_SETTING, ApiServer, auth, job_body

MESSAGES = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_at_a_sub_path_the_docs_links_uploads_and_login_carry_the_proxys_prefix(
    server_factory: Callable[..., ApiServer], workspace: Path, request: pytest.FixtureRequest
) -> None:
    server = server_factory(env={"ROOT_PATH": "/swift", "API_KEYS": KEYS_SETTING, "MAX_REQUEST_BYTES": "1024"})
    site = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30)  # (the proxy's upstream)
    request.addfinalizer(site.close)
    # Swagger UI and ReDoc loaded their scripts and the schema from the host's root: a blank page.
    for page in ("/docs", "/redoc"):
        html = site.get(page).text
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
        assert urls and all(u.startswith("/swift/") for u in urls), urls
        for url in urls:
            assert site.get(url.removeprefix("/swift")).status_code == 200, url
    # "Try it out" calls the schema's server, the proxy's prefix.
    assert site.get("/openapi.json").json()["servers"] == [{"url": "/swift"}]
    r = server.http.post("/jobs", json=job_body(workspace, "behind"), headers=auth(ALICE_KEY))
    assert r.status_code == 201 and r.headers["Location"] == "/swift/api/v1/training/jobs/behind", r.headers
    # Uploads are exempt from MAX_REQUEST_BYTES: the exemption missed the path with its prefix (a 413).
    body = (json.dumps(MESSAGES) + "\n").encode() * 40
    assert len(body) > 1024
    r = server.http.post("/files", files={"file": ("t.jsonl", body, "application/octet-stream")},
                         headers=auth(ALICE_KEY))  # fmt: skip
    assert r.status_code == 201, r.text
    assert server.http.post("/jobs", content=b" " * 2048, headers=auth(ALICE_KEY)).status_code == 413
    # HEAD answers as GET does on the prefixed path too (it was a 405).
    assert server.http.head("/jobs/behind/logs/stream", headers=auth(ALICE_KEY)).status_code == 200
    # A path no route has is told where the API is, as the proxy's clients reach it.
    lost = site.get("/health").json()["detail"]
    assert "API is under /swift/api/v1/training (its health: /swift/api/v1/training/health), and /swift/docs" in lost
    # The login cookie holds the key: its path is the server's own, not every site's on the host.
    login = site.post("/ui/login", data={"key": ALICE_KEY, "next": "/"}, headers={"Sec-Fetch-Site": "same-origin"})
    assert login.status_code == 303 and login.headers["location"] == "/swift/", login.text
    assert "Path=/swift/;" in login.headers["set-cookie"] or login.headers["set-cookie"].endswith("Path=/swift/")


def test_a_server_without_keys_refuses_what_a_proxy_passes_on_from_elsewhere(
    server_factory: Callable[..., ApiServer],
) -> None:
    server = server_factory()  # no keys: it answers its own host only
    # The proxy on this host names the client (X-Forwarded-For; the proxy, 127.0.0.1, is in FORWARDED_ALLOW_IPS).
    r = server.http.get("/jobs", headers={"X-Forwarded-For": "192.0.2.2"})
    assert r.status_code == 403, r.text
    assert r.json()["detail"] == ("this server has no API keys, so it answers its own host only, and this request "
                                  "came from 192.0.2.2 through a proxy: its operator must configure API_KEYS (or "
                                  "set ALLOW_UNAUTHENTICATED=true to open it to everyone)")  # fmt: skip
    assert server.http.get("/jobs", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    assert server.http.get("/jobs").status_code == 200
    # Any entry of any forwarding header, whoever is trusted: with every proxy trusted, uvicorn takes the first
    # entry of X-Forwarded-For, which a client writes itself when the proxy appends (review BT).
    trusting = server_factory(env={"FORWARDED_ALLOW_IPS": "*"})
    for headers in ({"X-Forwarded-For": "127.0.0.1, 192.0.2.2"}, {"X-Forwarded-For": "unknown"},
                    {"X-Real-IP": "192.0.2.2"}, {"Forwarded": 'for=127.0.0.1, for="[2001:db8::1]:4711"'}):  # fmt: skip
        assert trusting.http.get("/jobs", headers=headers).status_code == 403, headers
    for headers in ({"X-Forwarded-For": "127.0.0.1, ::1"}, {"Forwarded": 'for="[::1]:80";proto=http'}):
        assert trusting.http.get("/jobs", headers=headers).status_code == 200, headers


def test_with_keys_a_trusted_proxys_https_makes_the_login_cookie_secure(
    server_factory: Callable[..., ApiServer], request: pytest.FixtureRequest
) -> None:
    server = server_factory(env={"API_KEYS": KEYS_SETTING, "FORWARDED_ALLOW_IPS": "127.0.0.1,10.0.0.0/8"})
    site = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30)
    request.addfinalizer(site.close)
    assert server.http.get("/jobs", headers={"X-Forwarded-For": "192.0.2.2", **auth(ALICE_KEY)}).status_code == 200
    login = site.post("/ui/login", data={"key": ALICE_KEY, "next": "/"},
                      headers={"X-Forwarded-Proto": "https", "Sec-Fetch-Site": "same-origin"})  # fmt: skip
    assert login.status_code == 303 and "secure" in login.headers["set-cookie"].lower(), login.headers


@pytest.mark.parametrize(("value", "error"), [
    ("/swift/", None), ("swift", "must start with '/'"), ("/a b", "must be path segments"), ("/x/../y", "'.' or '..'"),
])  # fmt: skip
def test_root_path_is_checked_at_start(value: str, error: str | None) -> None:
    if error is None:
        assert Settings(_env_file=None, ROOT_PATH=value).ROOT_PATH == "/swift"
        return
    with pytest.raises(ValueError, match=re.escape(error)):
        Settings(_env_file=None, ROOT_PATH=value)


def test_forwarded_allow_ips_is_checked_at_start() -> None:
    assert Settings(_env_file=None, FORWARDED_ALLOW_IPS="*").FORWARDED_ALLOW_IPS == "*"
    with pytest.raises(ValueError, match="'nginx' is not an address or a network"):
        Settings(_env_file=None, FORWARDED_ALLOW_IPS="127.0.0.1, nginx")


def test_the_cli_says_when_a_proxy_refused_the_body_or_gave_up_waiting() -> None:
    def proxy(request: httpx.Request) -> httpx.Response:
        status = 413 if request.method == "POST" else 504
        return httpx.Response(status, headers={"content-type": "text/html"}, text="<html>nginx</html>")

    api = Api("http://h/swift", transport=httpx.MockTransport(proxy))
    with pytest.raises(CliError, match="a proxy in front of the server refused the body as too large"):
        api.post("/jobs", {})
    with pytest.raises(CliError, match="gave up waiting for its answer"):
        api.get("/jobs")
    down = Api("http://h/swift", transport=httpx.MockTransport(lambda _: httpx.Response(502, text="<html>")))
    with pytest.raises(CliError, match="could not reach it: is the server running"):
        down.get("/jobs")
