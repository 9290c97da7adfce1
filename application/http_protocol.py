"""uvicorn's HTTP protocol with a bound on a request's head: its request line and headers (and chunked trailers).

httptools, which uvicorn picks when it is installed, keeps a header, and the URL, in memory until it ends, and
takes any number of headers: one request with no key and a 300 MB header took an API worker from 146 MB to 674 MB
before it was answered 401 (hunt AO). h11 bounds a head (16 KiB, answered 400) but parses in Python. This keeps
httptools and answers 431, then closes the connection, once a message's request line, headers and trailers pass
MAX_HEAD_BYTES, or once that much has arrived with nothing parsed out of it (one header line that never ends).
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from application.services.streams import end_streams

MAX_HEAD_BYTES = 64 * 1024  # nginx's default allows 4 x 8 KiB headers; API keys and cookies are far smaller

_BODY = json.dumps({"detail": f"the request line and headers exceed {MAX_HEAD_BYTES // 1024} KiB: send fewer or "
                              "shorter headers, or a shorter URL"}).encode()  # fmt: skip
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
              b"content-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY)  # fmt: skip


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # (uvicorn[standard] installs httptools on CPython)
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def http_protocol() -> type[asyncio.Protocol]:
    """What uvicorn.Config's `http` takes: the bounded httptools protocol, or h11 (which bounds heads itself)
    where httptools is not installed; either ends the open streams when the server stops."""
    return EndingH11Protocol if HttpToolsProtocol is None else BoundedHttpToolsProtocol


class EndingH11Protocol(H11Protocol):
    def shutdown(self) -> None:
        end_streams()  # (as BoundedHttpToolsProtocol's)
        super().shutdown()


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop the parse: httptools hands it to uvicorn as a parser error, whose 400
    answer `send_400_response` turns into the 431."""


if HttpToolsProtocol is not None:
    # (At module level: uvicorn's workers are spawned, and take the class by its name.)
    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0  # this message's request line, headers and trailers
        _unparsed = 0  # bytes received since the parser last handed anything over
        _parsed = False
        _too_large = False

        def _count(self, n: int) -> None:
            self._parsed = True
            self._head_bytes += n
            if self._head_bytes > MAX_HEAD_BYTES:
                self._too_large = True
                raise _HeadTooLarge

        def on_message_begin(self) -> None:
            self._head_bytes, self._parsed = 0, True
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)  # (": " and CRLF)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._parsed = True
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._parsed = True
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._parsed = True
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            self._parsed = False
            super().data_received(data)
            # A chunk the parser handed nothing of over is all part of one line it holds (a pipelined request's
            # body, or a head that ended in it, did hand something over).
            self._unparsed = 0 if self._parsed else self._unparsed + len(data)
            if self._unparsed > MAX_HEAD_BYTES and not self.transport.is_closing():
                self._too_large = True
                self.send_400_response("")

        def shutdown(self) -> None:
            # uvicorn's stop begins here, in each worker, before it waits out its grace for open requests.
            end_streams()
            super().shutdown()

        def send_400_response(self, msg: str) -> None:
            if not self._too_large:
                super().send_400_response(msg)
                return
            self.logger.warning("a request's head passed %d bytes: answered 431", MAX_HEAD_BYTES)
            self.transport.write(_TOO_LARGE)
            self.transport.close()
