"""Who looks at a dashboard page: the API key from a cookie (set by the login form), or from the headers.

The browser keeps the key in two places: localStorage, from which dashboard.js sends `Authorization: Bearer`
on every API call, and an HttpOnly cookie, so that the server-rendered lists read without JavaScript. The
cookie is SameSite=Strict (no other site can make the browser send it) and HttpOnly (no script can read it);
the API itself never reads it, so a cookie alone cannot act on a job. Keys never appear in a URL.
"""

from __future__ import annotations

from urllib.parse import parse_qs, quote, unquote

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from application.api.route_path import root_of
from application.auth import MAX_KEY_CHARS, Caller, KeyRing, presented_key
from application.exceptions import Unauthorized
from application.ui.html import PageContext, esc, page, template

COOKIE = "swift_api_key"
COOKIE_MAX_AGE = 30 * 86400
# A login form holds one key and a path: anything longer is not ours.
MAX_FORM_BYTES = 8192

router = APIRouter(include_in_schema=False)


def _presented(request: Request) -> str | None:
    """The page's key: a header first (dashboard.js fetching a page to refresh it), then the cookie."""
    header = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if header:
        return header
    raw = request.cookies.get(COOKIE)
    return unquote(raw) if raw else None


def ui_caller(request: Request) -> Caller | None:
    """The caller, or None when keys are configured and no valid one came with the request."""
    ring: KeyRing = request.app.state.keys
    try:
        return ring.identify(_presented(request))
    except Unauthorized:
        return None


def safe_next(raw: str | None) -> str:
    """Only a page of this dashboard: `//host` or `/\\host` would send the reader elsewhere after logging in, and
    the API (which reads no cookie: a 401), the login form or a logout led nowhere (hunt DB)."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw or any(ord(c) < 0x20 for c in raw):
        return "/"
    path = raw.split("?", 1)[0].split("#", 1)[0]
    segments = unquote(path).split("/")[1:]
    if any(part in ("", ".", "..") for part in segments[:-1]) or segments[-1] in (".", ".."):
        return "/"  # (`/ui/../api/...`: the browser resolves it, review DE)
    if path != "/" and (not path.startswith("/ui/") or path.rstrip("/") in ("/ui/login", "/ui/logout")):
        return "/"
    return raw


def login_redirect(request: Request) -> RedirectResponse:
    root = root_of(request.scope)
    # `next` is a path below the root (the login prefixes the root again): behind a proxy's prefix it sent the
    # reader to /prefix/prefix/...
    path = request.url.path
    path = path[len(root) :] if root and path.startswith(root + "/") else path
    target = path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{root}/ui/login?next={quote(target, safe='')}", status_code=303)


def context(request: Request, caller: Caller | None) -> PageContext:
    return PageContext.of(request, caller.name if caller else None, caller.role if caller else "")


def _login_page(request: Request, next_path: str, error: str = "", status_code: int = 200) -> Response:
    ctx = context(request, None)
    if not ctx.keys:
        body = (
            '<section class="card narrow"><h1>Log in</h1><p>This server has no API keys configured: '
            f'nothing to log in to.</p><p><a href="{esc(ctx.url(next_path))}">Go on</a></p></section>'
        )
        return page(ctx, "Log in", body, status_code=status_code)
    message = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    body = template("login.html").substitute(action=esc(ctx.url("/ui/login")), next=esc(next_path), message=message)
    return page(ctx, "Log in", body, scripts=("login.js",), status_code=status_code)


@router.get("/ui/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    return _login_page(request, safe_next(next))


def _same_origin(request: Request) -> bool:
    """A form from another site must not log the reader in under someone else's key (login CSRF). Browsers
    say where a request comes from in Sec-Fetch-Site (right behind a proxy that rewrites Host, too); older
    ones send Origin."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"


@router.post("/ui/login")
async def login(request: Request) -> Response:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return _login_page(request, "/", "The form is too large.", 413)
    try:
        form = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=8)
    except ValueError:  # more fields than a login form has
        return _login_page(request, "/", "The form could not be read.", 400)
    key = (form.get("key") or [""])[0].strip()[: MAX_KEY_CHARS + 1]  # (as KeyRing.identify: longer is no key)
    next_path = safe_next((form.get("next") or ["/"])[0])
    root = root_of(request.scope)
    if not _same_origin(request):
        return _login_page(request, next_path, "This form was sent from another site: log in from this page.", 403)
    ring: KeyRing = request.app.state.keys
    if not ring.enabled:
        return RedirectResponse(f"{root}{next_path}", status_code=303)
    try:
        ring.identify(key)
    except Unauthorized as exc:
        return _login_page(request, next_path, exc.detail, 401)
    response = RedirectResponse(f"{root}{next_path}", status_code=303)
    # Its path is this server's own (behind a proxy at a sub-path, the other sites on the host got the key).
    response.set_cookie(COOKIE, quote(key, safe=""), max_age=COOKIE_MAX_AGE, path=f"{root}/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")  # fmt: skip
    return response


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    if not _same_origin(request):  # another site's form must not log the reader out (logout CSRF) either
        ctx = context(request, None)
        body = (
            '<section class="card narrow"><h1>Log out</h1><p class="error" role="alert">This form was sent from '
            f'another site: you are still logged in. <a href="{esc(ctx.url("/"))}">Go on</a></p></section>'
        )
        return page(ctx, "Log out", body, status_code=403)
    root = root_of(request.scope)
    response = RedirectResponse(f"{root}/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path=f"{root}/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")  # fmt: skip
    return response
