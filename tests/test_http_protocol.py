"""The bound on a request's head, through a real server (start.py, uvicorn, httptools) and raw sockets."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import pytest

from application.http_protocol import MAX_HEAD_BYTES
from tests.conftest import ApiServer


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(20)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _send_until_answered(sock: socket.socket, head: bytes, filler: bytes, most: int) -> tuple[int, bytes]:
    """Sends `head`, then `filler` again and again (a head that never ends) until the server answers or closes,
    at most `most` bytes; returns how many were sent and the answer."""
    sock.sendall(head)
    sent = len(head)
    sock.settimeout(0.05)
    while sent < most:
        try:
            if answer := sock.recv(65536):
                return sent, answer + _answer(sock)
        except TimeoutError:
            pass
        try:
            sock.sendall(filler)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(filler)
    return sent, _answer(sock)


@pytest.mark.parametrize("part", ["header", "url"])
def test_a_request_whose_head_never_ends_is_answered_431_not_read_into_memory(
    server_factory: Callable[..., ApiServer], part: str
) -> None:
    # One request with no key and a 300 MB header took an API worker from 146 MB to 674 MB before its 401.
    server = server_factory(env={"API_WORKERS": "2"} if part == "url" else {})  # (the workers' path too)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = b"GET /api/v1/training/jobs HTTP/1.1\r\nHost: x\r\nX-Big: " if part == "header" else b"GET /"
        sent, answer = _send_until_answered(sock, head, b"a" * 16384, 64 * MAX_HEAD_BYTES)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert sent < 16 * MAX_HEAD_BYTES, sent  # answered as the limit passed, not after the client gave up
    detail = json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
    assert detail.startswith("the request line and headers exceed 64 KiB: send fewer or shorter headers"), detail
    # A head within the bound is served as before, on the same server.
    ok = server.http.get("/jobs", headers={f"X-Pad-{i}": "p" * 1000 for i in range(40)})
    assert ok.status_code == 200, ok.text
