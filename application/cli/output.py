"""Where the CLI writes: the API's JSON for scripts (`--json`, one document per line), rich for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console, RenderableType


class Output:
    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        self.console = Console(highlight=False)
        self.errors = Console(stderr=True, highlight=False)

    def show(self, body: Any, render: Callable[[Any], RenderableType]) -> None:
        if self.json:
            self.emit(body)
        else:
            self.console.print(render(body))

    def emit(self, body: Any) -> None:
        # One compact document per line: a followed job's messages then read as JSON Lines.
        sys.stdout.write(json.dumps(body, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def line(self, raw: str) -> None:
        """A log line exactly as swift wrote it (no markup, no wrapping)."""
        sys.stdout.write(raw + "\n")
        sys.stdout.flush()

    def note(self, message: str, style: str = "dim") -> None:
        self.errors.print(message, style=style, markup=False, soft_wrap=True)

    def error(self, message: str) -> None:
        self.errors.print(f"error: {message}", style="red", markup=False, soft_wrap=True)
