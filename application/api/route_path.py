"""A request's path as the routes see it: behind a proxy at a sub-path (ROOT_PATH), uvicorn hands the app
`scope["path"]` with the root path in front, and Starlette's router takes it off before matching."""

from __future__ import annotations

from starlette.types import Scope


def route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path
