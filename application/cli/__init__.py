"""The `swift-api` command line client (see app.py for the commands and exit codes)."""

from application.cli.app import main

__all__ = ["main"]
