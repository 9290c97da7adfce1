"""Why the store refused a change (its Lua scripts answer with one of these), as the exception callers catch."""

from __future__ import annotations

from enum import Enum
from typing import Any


class Refusal(str, Enum):
    MISSING = "missing"
    EXISTS = "exists"
    BAD_STATE = "bad_state"
    OUTPUT_DIR_BUSY = "output_dir_busy"
    GPU_BUSY = "gpu_busy"
    EXPORT_STATE = "export_state"
    OTHER_RUN = "other_run"
    NOT_LEADER = "not_leader"
    PRIORITY_CHANGED = "priority_changed"
    WAITING_CAP = "waiting_cap"
    UPLOAD_GONE = "upload_gone"
    CHANGED = "changed"
    FOREIGN_FOLDER = "foreign_folder"
    OUTPUT_IS_FILE = "output_is_file"
    CLAIM_LOST = "claim_lost"


class TransitionRefused(Exception):
    def __init__(self, reason: Refusal, current: str | None = None, detail: str | None = None) -> None:
        super().__init__(f"{reason.value} (current: {current}, {detail})")
        self.reason = reason
        self.current = current
        self.detail = detail

    @classmethod
    def from_reply(cls, reply: list[Any]) -> TransitionRefused:
        return cls(Refusal(reply[0]), reply[1] or None if len(reply) > 1 else None,
                   reply[2] if len(reply) > 2 else None)  # fmt: skip
