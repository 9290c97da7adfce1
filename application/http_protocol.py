"""uvicorn's HTTP protocol with bounds on what one connection may hold: its request's head, and time.

httptools, which uvicorn picks when it is installed, keeps a header, and the URL, in memory until it ends, and
takes any number of headers: one request with no key and a 300 MB header took an API worker from 146 MB to 674 MB
before it was answered 401 (hunt AO). h11 bounds a head (16 KiB, answered 400) but parses in Python. This keeps
httptools and answers 431, then closes the connection, once a message's request line, headers and trailers pass
MAX_HEAD_BYTES, or once that much has arrived with nothing parsed out of it (one header line that never ends).

uvicorn bounds no time but a kept-alive connection's idle one, and any byte resets that: 2,000 connections that
sent a header line every 20 s, or nothing at all, held their sockets (and a body each, read before the key was
looked at) for as long as they liked (hunt BY). So a request's line and headers must arrive within
CLIENT_HEAD_SECONDS, its body at BODY_MIN_RATE at least, over windows a little longer than UPLOAD_IDLE_SECONDS
(an idle upload's own 408 comes first), while the server reads it (408, closed); and a client that takes less than
BODY_MIN_RATE of a response over CLIENT_STALL_SECONDS is dropped (a stream stuck in its send held its
STREAMS_PER_OWNER slot past its lapse, and the cap let another one open in its place). `configure` sets them from
the settings, in each worker as it creates its app.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import socket
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from application.api.body_limit import carries_body
from application.config import Settings
from application.services.streams import end_streams

MAX_HEAD_BYTES = 64 * 1024  # nginx's default allows 4 x 8 KiB headers; API keys and cookies are far smaller
BODY_MIN_RATE = 500  # bytes per second, as Apache's mod_reqtimeout asks by default
LINGER_SECONDS = 2.0  # a 408's connection reads on, and drops what comes, this long before it closes


@dataclass(frozen=True)
class _Limits:
    head: float = 20.0
    body_window: float = 35.0
    stall: float = 30.0

    @property
    def body_min(self) -> int:
        return int(BODY_MIN_RATE * self.body_window)


_limits = _Limits()


def configure(settings: Settings) -> None:
    global _limits
    _limits = _Limits(settings.CLIENT_HEAD_SECONDS, settings.UPLOAD_IDLE_SECONDS + 5, settings.CLIENT_STALL_SECONDS)


_BODY = json.dumps({"detail": f"the request line and headers exceed {MAX_HEAD_BYTES // 1024} KiB: send fewer or "
                              "shorter headers, or a shorter URL"}).encode()  # fmt: skip
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
              b"content-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY)  # fmt: skip


def _bad_request(msg: str) -> bytes:
    # As every other error: JSON with a detail that says what to change (uvicorn answers text/plain).
    body = json.dumps({"detail": f"not a valid HTTP/1.1 request ({msg.rstrip('.') or 'unparsable'}): check the "
                                 "request line (an upper-case method, a URL of printable ASCII) and the headers "
                                 "(one Content-Length of digits, or chunked alone)"}).encode()  # fmt: skip
    return (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)  # fmt: skip


def _timed_out(detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)  # fmt: skip


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

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_bad_request(msg))  # (as BoundedHttpToolsProtocol's: JSON, not uvicorn's text)
        self.transport.close()


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
        _deadline: asyncio.TimerHandle | None = None  # the head's, or the body's window's
        _body_bytes = 0  # in the body's window
        _begun = False  # a byte of this request came
        _stall: asyncio.TimerHandle | None = None
        _unread: asyncio.TimerHandle | None = None  # idle, its last response not all taken yet
        _unread_left = 0  # what of it was left when last looked at (apart from `_unsent`: both rules may watch)
        _unsent = 0  # what was left to send when the response's writes were last seen to move
        _discarding = False  # answered and closing: what still comes is not read

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(_limits.head, self._head_late)
            # What the kernel holds for a client that keeps its window shut is dropped by the kernel after the stall
            # rule's time, whatever the server does meanwhile: closed after a `Connection: close` answer (uvicorn
            # closes as soon as it wrote it), or kept open by small requests that reset the rule's clocks, it stayed
            # for minutes (review DQ). Zero-window probes count against TCP_USER_TIMEOUT on Linux 5.11 and later.
            sock = transport.get_extra_info("socket")
            if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(_limits.stall * 1000))

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._deadline, self._stall, self._unread):
                if timer is not None:
                    timer.cancel()
            self._deadline = self._stall = self._unread = None
            super().connection_lost(exc)

        def _arm(self, seconds: float, late: Callable[[], None]) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_late(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # (the next request's head, pipelined behind a response still going: its time starts after it)
                self._arm(_limits.head, self._head_late)
                return
            if not self._begun:
                self.transport.close()  # (a connection that never sent a byte: closed without a word, as nginx does)
                return
            self.logger.info("a request's head did not arrive within %g s: answered 408", _limits.head)
            self._refuse(_timed_out(f"the request line and headers did not arrive within {_limits.head:g} s "
                                    "(CLIENT_HEAD_SECONDS): send them at once"))  # fmt: skip

        def _body_late(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self._body_bytes >= _limits.body_min or self.flow.read_paused:
                # (fast enough; or the server holds what came unread: not the client's to hurry)
                self._body_bytes = 0
                self._arm(_limits.body_window, self._body_late)
                return
            self.logger.info("a request's body came slower than %d bytes in %g s: answered 408", _limits.body_min,
                             _limits.body_window)  # fmt: skip
            if self.cycle is not None and self.cycle.response_started:
                self._cut_cycle()
                self.transport.close()  # (answered already, or answering: nothing to add, and no end to write)
                return
            self._refuse(_timed_out(f"the request body came slower than {BODY_MIN_RATE} bytes/s ({_limits.body_min:,} "
                                    f"bytes in {_limits.body_window:g} s): send it over a faster link, or through a "
                                    "proxy that takes the whole body first"))  # fmt: skip

        def _refuse(self, answer: bytes) -> None:
            """Writes `answer` and closes, reading on for a moment first: closed with what the client was still
            sending unread, the connection is reset, and the client may lose the answer (review BZ). A request
            still being served is told its client left: what it sends then goes nowhere (a write after the EOF
            raised, a traceback per request, review CB)."""
            self._discarding = True
            self._cut_cycle()
            self.transport.write(answer)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)

        def _cut_cycle(self) -> None:
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # (as at connection_lost: uvicorn's send then drops what comes)
                self.cycle.message_event.set()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall is None:
                self._unsent = self._pending()
                self._stall = self.loop.call_later(_limits.stall, self._stalled)

        def _pending(self) -> int:
            """What is written and not yet taken by the client: the transport's buffer, and the kernel's. The
            transport's alone moves in steps of a third of the kernel's (megabytes): a client reading 400 KB/s
            left it still for seconds."""
            pending = self.transport.get_write_buffer_size()
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    pending += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            return pending

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

        def _stalled(self) -> None:
            self._stall = None
            if not self.flow.write_paused:
                return
            # (closing too: a response that ended with Connection: close waits there for its unread data to go)
            unsent = self._pending()
            if self._unsent - unsent >= BODY_MIN_RATE * _limits.stall:
                # It read: a slow reader, not a stalled one (one reading 100 KB/s was cut 5.6 MB into an 8.4 MB
                # page of log, which has no Range to go on from: review BZ). At 500 bytes/s at least, as a body
                # must come: one taking 2 KB a window held a worker's 8 MB and a slot for 35 hours (review CB).
                self._unsent = unsent
                self._stall = self.loop.call_later(_limits.stall, self._stalled)
                return
            self.logger.info("a client took less than %d bytes/s of its response for %g s: dropped", BODY_MIN_RATE,
                             _limits.stall)  # fmt: skip
            self._drop()

        def timeout_keep_alive_handler(self) -> None:
            # Closed now, a connection whose client has not taken all of its last response leaves the rest with the
            # kernel for as long as the client keeps its window shut: 200 GETs of the Swagger bundle (no key needed)
            # left unread held 464 MB of the host's TCP memory, where the stall rule never saw them (hunt DN). It
            # stays open under that rule, and closes once all is taken.
            if not self.transport.is_closing() and (unsent := self._pending()):
                self._unread_left = unsent
                self._unread = self.loop.call_later(_limits.stall, self._idle_unread)
                return
            super().timeout_keep_alive_handler()

        def _idle_unread(self) -> None:
            self._unread = None
            if self.transport.is_closing():
                return
            unsent = self._pending()
            if unsent and self._unread_left - unsent >= BODY_MIN_RATE * _limits.stall:  # (slow, not stalled)
                self._unread_left = unsent
                self._unread = self.loop.call_later(_limits.stall, self._idle_unread)
            elif unsent:
                self.logger.info("a client took less than %d bytes/s of its last response for %g s: dropped",
                                 BODY_MIN_RATE, _limits.stall)  # fmt: skip
                self._drop()
            else:
                self.transport.close()

        def _drop(self) -> None:
            """Closes at once, and has the kernel throw away what it holds unsent (a reset): a plain close, or an
            abort, leaves that with the kernel, an orphan socket, for as long as the client holds it up."""
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

        def _count(self, n: int) -> None:
            self._parsed = True
            self._head_bytes += n
            if self._head_bytes > MAX_HEAD_BYTES:
                self._too_large = True
                raise _HeadTooLarge

        def on_message_begin(self) -> None:
            if self._unread is not None:  # (it asks again: what it left unread is this request's to wait for)
                self._unread.cancel()
                self._unread = None
            self._head_bytes, self._parsed, self._begun = 0, True, True
            if self._deadline is None:  # (the next request on a kept-alive connection)
                self._arm(_limits.head, self._head_late)
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)  # (": " and CRLF)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._parsed = True
            self._disarm()
            if carries_body(self.headers):
                self._body_bytes = 0
                self._arm(_limits.body_window, self._body_late)
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._parsed = True
            self._body_bytes += len(body)
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._parsed, self._begun = True, False
            self._disarm()
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                return
            self._parsed = False
            self._begun = True
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
                self.transport.write(_bad_request(msg))
                self.transport.close()
                return
            self.logger.warning("a request's head passed %d bytes: answered 431", MAX_HEAD_BYTES)
            self.transport.write(_TOO_LARGE)
            self.transport.close()
