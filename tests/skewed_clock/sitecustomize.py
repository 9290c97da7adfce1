"""Imported by Python at start when this folder is on PYTHONPATH: the process's wall clock (`time.time`) reads
SWIFT_API_TEST_CLOCK_SKEW seconds off, as on a host whose clock disagrees with the others'. Its monotonic clock
and the files it writes are left alone (what the server compares across hosts is `time.time`)."""

import os
import time

_skew = float(os.environ.get("SWIFT_API_TEST_CLOCK_SKEW") or 0)
if _skew:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _skew
    time.time_ns = lambda: _time_ns() + int(_skew * 1e9)
