"""Imported by Python at start when this folder is on PYTHONPATH: Redis's clock, as this process reads it (TIME),
steps by the seconds SWIFT_API_TEST_REDIS_STEP_FILE holds when a test writes them (a step of Redis's host's clock:
NTP, an operator, a VM resumed), and the process reads it every SWIFT_API_TEST_CLOCK_RESYNC seconds rather than
every 300. Its own clocks are left alone."""

import os

_file = os.environ.get("SWIFT_API_TEST_REDIS_STEP_FILE") or ""
try:
    from redis.asyncio.client import Redis
except ImportError:  # (an interpreter without redis-py: the fake swift's; it reads no clock of Redis's)
    _file = ""
if _file:
    _time = Redis.time

    async def _stepped(self, **kwargs):  # type: ignore[no-untyped-def]
        seconds, micros = await _time(self, **kwargs)
        try:
            with open(_file) as f:
                step = float(f.read().strip() or 0)
        except OSError:
            step = 0.0
        t = seconds + micros / 1e6 + step
        return int(t), round((t - int(t)) * 1e6) % 1_000_000

    Redis.time = _stepped  # type: ignore[method-assign,assignment]
    from application.services import clock

    clock.RESYNC_SECONDS = float(os.environ.get("SWIFT_API_TEST_CLOCK_RESYNC") or clock.RESYNC_SECONDS)
