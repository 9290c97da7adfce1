"""The API key list (API_KEYS, API_KEYS_FILE): parsed once at start-up with the other settings, so that a bad
entry stops the server with one line naming it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("admin", "user")
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
MIN_KEY_LENGTH = 16
MAX_KEY_CHARS = 512
# Names the server writes as an event's actor for what no key did: a key of that name made its owner's actions
# look like the scheduler's (or keyless access) in every job's events.
RESERVED_NAMES = frozenset({"scheduler", "anonymous"})
# `a:user:k1;b:user:k2`: two entries joined with something else than ',' read as one key holding the second entry.
_JOINED_ENTRY_RE = re.compile(r"[;|\s][A-Za-z0-9_.-]{1,64}:(?:admin|user):")
# What a request can carry as it is: header values are read as Latin-1 bytes, so a key with other characters
# (Cyrillic, say) was taken at start and then never matched.
_KEY_RE = re.compile(r"[\x21-\x7e]+")
_KEY_HINT = 'generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'


@dataclass(frozen=True)
class ApiKeyEntry:
    name: str
    role: str
    key: str = field(repr=False)


def _entry(name: Any, role: Any, key: Any, where: str) -> ApiKeyEntry:
    if not isinstance(name, str) or not _KEY_NAME_RE.match(name):
        raise ValueError(f"{where}: the name must be 1-64 letters, digits, '_', '.' or '-'")
    if name in RESERVED_NAMES:
        raise ValueError(f"{where}: the name {name!r} is the server's own actor in job events: choose another")
    if role not in ROLES:
        raise ValueError(f"{where} ({name}): role must be admin or user, not {role!r}")
    if not isinstance(key, str) or not MIN_KEY_LENGTH <= len(key) <= MAX_KEY_CHARS or not _KEY_RE.fullmatch(key):
        raise ValueError(f"{where} ({name}): the key must be {MIN_KEY_LENGTH}-{MAX_KEY_CHARS} printable ASCII "
                         f"characters without spaces (',' separates entries in API_KEYS); {_KEY_HINT}")  # fmt: skip
    return ApiKeyEntry(name, role, key)


class _Twice(ValueError):
    pass


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal names: an admin key written twice became a user, without a word.
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise _Twice(", ".join(sorted({n for n in names if names.count(n) > 1})))
    return dict(pairs)


def parse_api_keys(text: str | None, file: Path | None) -> tuple[ApiKeyEntry, ...]:
    """API_KEYS (`name:role:key,...`) and API_KEYS_FILE (`{"name": {"role": ..., "key": ...}}`) together."""
    entries: list[ApiKeyEntry] = []
    for i, raw in enumerate((text or "").split(",")):
        raw = raw.strip()
        if not raw:
            continue
        parts = raw.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"API_KEYS entry {i + 1} must be name:role:key (role admin or user)")
        where = f"API_KEYS entry {i + 1}"
        if _JOINED_ENTRY_RE.search(parts[2]):
            raise ValueError(f"{where} ({parts[0].strip()}): the key holds another entry (name:role:...): separate "
                             "entries with ','")  # fmt: skip
        entries.append(_entry(parts[0].strip(), parts[1].strip(), parts[2].strip(), where))
    listed = len(entries)
    if file is not None:
        try:
            data = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=_once_each)
        except OSError as exc:
            raise ValueError(f"API_KEYS_FILE {file} cannot be read: {exc.strerror}") from None
        except _Twice as exc:
            raise ValueError(f"API_KEYS_FILE {file} names {exc} twice: each key needs its own name") from None
        except ValueError as exc:
            raise ValueError(f"API_KEYS_FILE {file} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f'API_KEYS_FILE {file} must hold an object {{"<name>": {{"role": ..., "key": ...}}}}')
        for name, spec in data.items():
            if not isinstance(spec, dict):
                raise ValueError(f'API_KEYS_FILE entry {name!r} must be {{"role": ..., "key": ...}}')
            entries.append(_entry(name, spec.get("role"), spec.get("key"), f"API_KEYS_FILE entry {name!r}"))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        # (where each is: alice in API_KEYS and in the file said only "each key needs its own name: alice")
        where = " in API_KEYS and in API_KEYS_FILE" if set(twice) & set(names[listed:]) else " in API_KEYS"
        raise ValueError(f"each key needs its own name: {', '.join(twice)} named twice{where}")
    if len({e.key for e in entries}) != len(entries):
        raise ValueError("two names share one key: give each its own")
    return tuple(entries)
