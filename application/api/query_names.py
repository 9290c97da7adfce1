"""A query parameter the route does not take is a 422: `GET /jobs?stauts=running` listed every job, the typo
unsaid (hunt AO). Checked in the caller's dependency (deps.current_caller), once routing has named the route:
FastAPI's route tree is its own business, and differs from one release to the next."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.dependencies.models import Dependant

from application.exceptions import Invalid

_NAMES: dict[int, frozenset[str]] = {}  # id(route's call) -> the names it takes; routes live as long as the app


def refuse_unknown_query(request: Request) -> None:
    route: Any = request.scope.get("route")
    dependant: Dependant | None = getattr(route, "dependant", None)
    if dependant is None:
        return
    key = id(dependant.call)
    if (taken := _NAMES.get(key)) is None:
        taken = _NAMES[key] = frozenset(_query_names(dependant))
    for name in request.query_params:
        if name not in taken:
            known = ", ".join(sorted(taken)) or "none"
            raise Invalid(f"query parameter '{name[:64]}' is not one this route takes (it takes: {known})")


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route and its dependencies declare, by the names clients send."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names
