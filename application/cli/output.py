"""Where the CLI writes: the API's JSON for scripts (`--json`, one document per line), rich for people."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, RenderableType

from application.cli.client import EXIT_UNREACHABLE, CliError


class Output:
    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        # Piped (to awk, grep, a file) without COLUMNS, rich would lay tables out 80 wide, cutting job ids with
        # an ellipsis and wrapping rows: a line per row at its natural width instead.
        wide = sys.stdout is not None and not sys.stdout.isatty() and "COLUMNS" not in os.environ  # (None: closed)
        self.console = _Console(highlight=False, width=100_000 if wide else None)
        self.errors = _Console(stderr=True, highlight=False)

    def show(self, body: Any, render: Callable[[Any], RenderableType]) -> None:
        if self.json:
            self.emit(body)
            return
        with self.answer_shape():
            shown = render(body)
        self.console.print(shown)

    @contextmanager
    def answer_shape(self) -> Iterator[None]:
        """Reading the server's answer: one of another shape than this server's (another service at that URL, a
        proxy's JSON) is one line and exit 3, not a traceback and exit 1 (which says a job failed)."""
        try:
            yield
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CliError("the server's answer is not what a swift-api server sends: is SWIFT_API_URL (or --url) "
                           "a swift-api server of this version?", EXIT_UNREACHABLE) from e  # fmt: skip

    def emit(self, body: Any) -> None:
        # One compact document per line: a followed job's messages then read as JSON Lines. Non-ASCII text stays
        # readable, but json.dumps passes C1 controls (U+009B is a CSI some terminals obey, like ESC [) and the
        # line separators U+2028/2029 (line ends to some readers) through raw: those go out escaped.
        # An output in another encoding than UTF-8 (a Windows console's GBK) gets \u escapes, which any JSON reader
        # takes: the encoder's own escapes of what GBK cannot hold (`\U0001f389`) are no JSON.
        utf = (getattr(sys.stdout, "encoding", None) or "utf-8").lower().replace("_", "-").startswith("utf")
        document = _RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(body, ensure_ascii=not utf))
        sys.stdout.write(document + "\n")
        sys.stdout.flush()

    def line(self, raw: str) -> None:
        """A log line as swift wrote it (no markup, no wrapping), less its control characters: a job's log holds
        text its owner chose (data set rows echoed), and escape sequences would drive the reader's terminal."""
        sys.stdout.write(printable(raw) + "\n")
        sys.stdout.flush()

    def footer(self, message: str) -> None:
        """A listing's last line (how many, the next page's command), with the listing on stdout."""
        self.console.print(printable(message), style="dim", markup=False, soft_wrap=True)

    def note(self, message: str, style: str = "dim") -> None:
        self.errors.print(printable(message), style=style, markup=False, soft_wrap=True)

    def error(self, message: str) -> None:
        self.errors.print(f"error: {printable(message)}", style="red", markup=False, soft_wrap=True)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich exits 1 itself when the reader has gone (`swift-api ls | head`), which this CLI means as "the job
        failed": the error goes on to the CLI's own handler, which exits 0 for it, as it does for --json output.
        Messages on a closed stderr are dropped, and the command's own exit code stands."""
        self.quiet = True  # (nothing more is written, here or by a live display's last refresh)
        if not self.stderr:
            raise BrokenPipeError


# Whole escape sequences (an OSC that sets the window title left "]0;TITLE" behind once its ESC went), then
# C0/C1 controls, and the bidi and zero-width controls that reorder or hide what a line shows.
_CONTROL = re.compile(
    r"(?:\x1b\]|\x9d)[^\x07\x1b\x9c\n]*(?:\x07|\x1b\\|\x9c)?"  # OSC (a title), to its BEL or ST, not past its line
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b[@-_]?"  # CSI (ESC [ or C1's), and any other ESC
    # (not ZWNJ/ZWJ, U+200C/D: Persian words and emoji sequences need them)
    "|[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
# (json.dumps escapes C0 controls itself; it leaves these in strings as they are)
_RAW_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """`text` without C0/C1 control characters (tabs and line breaks kept)."""
    return _CONTROL.sub("", text)
