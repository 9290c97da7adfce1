"""What a browser gets: the dashboard's pages (`pages`), its static files, and the API docs with vendored
assets (Swagger UI at /docs, ReDoc at /redoc), so all of it works without internet."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from application.api.route_path import root_of
from application.ui import pages

STATIC = Path(__file__).resolve().parent / "static"
VENDOR = "/static/vendor"
# As the dashboard's pages (html.HEADERS), but for what the docs need: FastAPI's pages start Swagger UI and ReDoc
# with an inline script, and ReDoc's search runs in a worker made from a blob. Nothing may be fetched from
# elsewhere: the vendored bundles name outside addresses, and a browser sends this server's address with them.
DOCS_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
    "'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
}


def mount_ui(app: FastAPI) -> None:
    """Serve /static, /docs, /redoc and the dashboard (/ and /ui/...). Call on an app created with
    docs_url=None and redoc_url=None (FastAPI's own pages load their scripts from a CDN)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        # Behind a proxy at a sub-path (ROOT_PATH) the page's URLs need it in front, as the dashboard's links.
        root = root_of(request.scope)
        page = get_swagger_ui_html(
            openapi_url=root + openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{VENDOR}/swagger-ui-bundle.js", swagger_css_url=f"{root}{VENDOR}/swagger-ui.css",
            swagger_favicon_url=f"{root}{VENDOR}/favicon-32x32.png",
            swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
        )  # fmt: skip
        page.headers.update(DOCS_HEADERS)
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = root_of(request.scope)
        page = get_redoc_html(openapi_url=root + openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{VENDOR}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{VENDOR}/favicon-32x32.png",
                              with_google_fonts=False)  # fmt: skip
        page.headers.update(DOCS_HEADERS)
        return page

    app.include_router(pages.router)
