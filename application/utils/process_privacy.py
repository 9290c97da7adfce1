"""What a server process holds kept from the code its jobs run, on Linux: not dumpable, files of its own mode.

swift runs as the server's Unix user, and code a job brings (a hub model's remote code, a data set's loading
script) can read what that user can: `/proc/<pid>/environ` of start.py, the API workers and the scheduler gave it
API_KEYS (the admin's key among them) and WEBHOOK_SECRET (hunt DR). A process that is not dumpable keeps its
environment and memory from every other process of its user (root alone may read them, or attach a debugger);
runners stay dumpable, since the scheduler knows them by their environment, which holds neither. What the
server writes (uploads, checkpoints, logs, Redis's files) took the operator's umask, 022 mostly: every account
on the host could read every team's data sets and models.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def keep_private() -> bool:
    """Make this process not dumpable (Linux; elsewhere nothing). True when it is not dumpable now."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 or libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:  # (a libc without prctl, a seccomp profile that refuses it)
        from loguru import logger  # (here: this module is imported before any other, see start.py)

        logger.warning("this process stays dumpable (prctl: {}): code a job runs as this user can read its "
                       "environment, API_KEYS included", exc)  # fmt: skip
        return False
    return True
