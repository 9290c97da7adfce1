"""uvicorn's HTTP protocol with a bound on a request's head (its request line and headers).

httptools, which uvicorn picks when it is installed, keeps a header, and the URL, in memory until it ends, with
no limit: one request with no key and a 300 MB header took an API worker from 146 MB to 674 MB before it was
answered 401 (hunt AO). h11 bounds it (16 KiB) but parses in Python. This keeps httptools and answers 431, then
closes the connection, once a head has taken more than MAX_HEAD_BYTES without ending.
"""

from __future__ import annotations

import asyncio
import json

MAX_HEAD_BYTES = 64 * 1024  # nginx's default allows 4 x 8 KiB headers; API keys and cookies are far smaller

_BODY = json.dumps({"detail": f"the request line and headers exceed {MAX_HEAD_BYTES // 1024} KiB: send fewer or "
                              "shorter headers, or a shorter URL"}).encode()  # fmt: skip
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
              b"content-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY)  # fmt: skip


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # (uvicorn[standard] installs httptools on CPython)
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def http_protocol() -> type[asyncio.Protocol] | str:
    """What uvicorn.Config's `http` takes: the bounded httptools protocol, or h11 (which bounds heads itself)
    where httptools is not installed."""
    return "h11" if HttpToolsProtocol is None else BoundedHttpToolsProtocol


if HttpToolsProtocol is not None:
    # (At module level: uvicorn's workers are spawned, and take the class by its name.)
    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_open = False
        _head_bytes = 0

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_open, self._head_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._head_open = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # A chunk that leaves the head still open was all head (bar a pipelined request's end before it).
            if self._head_open and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self.logger.warning("a request's head passed %d bytes: answered 431", MAX_HEAD_BYTES)
                    self.transport.write(_TOO_LARGE)
                    self.transport.close()
