"""A request's path as the routes see it: behind a proxy at a sub-path (ROOT_PATH), uvicorn hands the app
`scope["path"]` with the root path in front, and Starlette's router takes it off before matching."""

from __future__ import annotations

from starlette.types import Scope


def root_of(scope: Scope) -> str:
    """The path in front of the app's routes as the client sees it ('' or '/swift'): for links and redirects."""
    return str(scope.get("root_path", "")).rstrip("/")


def route_path(scope: Scope, root: str | None = None) -> str:
    """`root`: the app's own root path (ROOT_PATH), where the scope's may hold a mount's too (/static's files)."""
    path: str = scope["path"]
    root = scope.get("root_path", "") if root is None else root
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path
