"""What every answer carries (api/response_headers.py): nosniff, and redirects to this server written as paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


async def test_a_trailing_slash_redirect_stays_on_this_server_whatever_host_the_request_names(
    app_factory: Callable[..., Any],
) -> None:
    # Starlette wrote the request's Host header into the Location: a forged Host (or a cache keyed without it)
    # sent the client to another server.
    async with app_factory(scheduler=False) as client:
        r = await client.get("/jobs/?limit=1", headers={"Host": "evil.example"})
        assert r.status_code == 307
        assert r.headers["location"] == "/api/v1/training/jobs?limit=1"
        r = await client.get("/jobs/", headers={"Host": "evil.example"}, follow_redirects=True)
        assert r.status_code == 200 and r.json()["jobs"] == []


async def test_a_redirect_to_another_server_and_a_scheme_relative_path_are_left_as_they_are() -> None:
    from application.api.response_headers import ResponseHeaders

    async def app(scope: Any, receive: Any, send: Any) -> None:
        location = scope["path"].removeprefix("/to/").encode()
        await send({"type": "http.response.start", "status": 302, "headers": [(b"location", location)]})
        await send({"type": "http.response.body", "body": b""})

    async def location_of(target: str, headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        async def receive() -> Any:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": "/to/" + target, "headers": headers, "server": ("127.0.0.1", 8000)}
        await ResponseHeaders(app)(scope, receive, send)
        return dict(sent[0]["headers"])

    host = [(b"host", b"api.example:8000")]
    assert (await location_of("http://api.example:8000/x?a=1", host))[b"location"] == b"/x?a=1"
    assert (await location_of("https://API.example:8000", host))[b"location"] == b"/"
    assert (await location_of("http://other.example/x", host))[b"location"] == b"http://other.example/x"
    # As a path, "//other.example/x" names another host to a browser.
    assert (await location_of("http://api.example:8000//other.example/x", host))[b"location"] == (
        b"http://api.example:8000//other.example/x"
    )
    # Without a Host header (HTTP/1.0) Starlette writes the server's address.
    assert (await location_of("http://127.0.0.1:8000/y", []))[b"location"] == b"/y"
    assert (await location_of("http://127.0.0.1/y", []))[b"location"] == b"http://127.0.0.1/y"
    assert (await location_of("/z", host))[b"x-content-type-options"] == b"nosniff"


@pytest.mark.parametrize("path", ["/jobs/no-such-job", "/no-such-route", "/health", "/jobs?limit=0"])
async def test_json_answers_tell_a_browser_not_to_sniff_them(app_factory: Callable[..., Any], path: str) -> None:
    # A 404's detail quotes the job id from the path: a browser that sniffed it as a page would run what it held.
    async with app_factory(scheduler=False) as client:
        r = await client.get(path)
        assert r.headers["content-type"].startswith("application/json"), r.headers
        assert r.headers.get_list("x-content-type-options") == ["nosniff"], (path, r.status_code)


async def test_the_dashboards_own_headers_are_not_doubled(app_factory: Callable[..., Any]) -> None:
    async with app_factory(scheduler=False) as client:
        r = await client.get("http://test/docs")
        assert r.status_code == 200
        assert r.headers.get_list("x-content-type-options") == ["nosniff"]
