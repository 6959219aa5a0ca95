"""The web console: a static single-page app at /console that talks to the server's own HTTP API.

Three files (static/index.html, console.css, console.js), plain HTML/CSS/JS with no build step and nothing
fetched from elsewhere, so the console works offline and from an installed wheel (they are read as package
resources, not from the source tree). The page signs in with an API key or the admin token, keeps it in
sessionStorage and sends it as `Authorization: Bearer` to /v1/* and /admin/v1/* like any other client; the
console itself needs no authentication, it holds no data.

Every response carries a strict Content-Security-Policy: scripts, styles and connections only from this origin,
no inline script or style, no framing. With `script-src 'self'` an injected `<script>` or `onerror=` attribute
cannot run even if some server text were ever written as HTML (the page writes it with textContent anyway).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from lmforge.serve.errors import APIError

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate: a new server version must not run with an old console.js
}
FILES = {  # name -> media type; nothing else under static/ is served
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return resources.files("lmforge.serve").joinpath("static", name).read_bytes()


def _file(name: str) -> Response:
    if name not in FILES:
        raise APIError(404, f"The console has no file {name!r}.", code="not_found")
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/console", status_code=307)


@router.get("/console")
async def console() -> Response:
    return _file("index.html")


@router.get("/console/{name}")
async def console_file(name: str) -> Response:
    return _file(name)
