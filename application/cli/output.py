"""Where the CLI writes: the API's JSON for scripts (`--json`, one document per line), rich for people."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console, RenderableType


class Output:
    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        # Piped (to awk, grep, a file) without COLUMNS, rich would lay tables out 80 wide, cutting job ids with
        # an ellipsis and wrapping rows: a line per row at its natural width instead.
        wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        self.console = _Console(highlight=False, width=100_000 if wide else None)
        self.errors = _Console(stderr=True, highlight=False)

    def show(self, body: Any, render: Callable[[Any], RenderableType]) -> None:
        if self.json:
            self.emit(body)
        else:
            self.console.print(render(body))

    def emit(self, body: Any) -> None:
        # One compact document per line: a followed job's messages then read as JSON Lines. Non-ASCII text stays
        # readable, but json.dumps passes C1 controls (U+009B is a CSI some terminals obey, like ESC [) and the
        # line separators U+2028/2029 (line ends to some readers) through raw: those go out escaped.
        document = _RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(body, ensure_ascii=False))
        sys.stdout.write(document + "\n")
        sys.stdout.flush()

    def line(self, raw: str) -> None:
        """A log line as swift wrote it (no markup, no wrapping), less its control characters: a job's log holds
        text its owner chose (data set rows echoed), and escape sequences would drive the reader's terminal."""
        sys.stdout.write(printable(raw) + "\n")
        sys.stdout.flush()

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


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# (json.dumps escapes C0 controls itself; it leaves these in strings as they are)
_RAW_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """`text` without C0/C1 control characters (tabs and line breaks kept)."""
    return _CONTROL.sub("", text)
