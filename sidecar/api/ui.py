"""The dashboard at `/ui/`: three static files shipped in the package, no build step.

The page reads the same JSON API and WebSocket as any client, so it needs nothing of its
own on the server but these routes. The files are read once and kept in memory (a few
KiB). Its Content-Security-Policy allows only its own script, style and connections:
rule text is shown as text, and even an injected tag could run nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from sidecar.errors import NotFoundError

__all__ = ["ui_routes"]

STATIC = Path(__file__).with_name("static")
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated by ETag: a new sidecar image shows at once
}


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str


def _assets() -> dict[str, _Asset]:
    assets = {}
    for path in sorted(STATIC.iterdir()):
        if path.suffix in _TYPES:
            body = path.read_bytes()
            etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
            assets[path.name] = _Asset(body, _TYPES[path.suffix], etag)
    return assets


def ui_routes() -> list[web.RouteDef]:
    assets = _assets()

    async def get_asset(request: web.Request) -> web.Response:
        name = request.match_info.get("asset", "index.html")
        asset = assets.get(name)
        if asset is None:
            raise NotFoundError("dashboard file", name)
        headers = {**_HEADERS, "ETag": asset.etag}
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=asset.body, headers={**headers, "Content-Type": asset.content_type}
        )

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=301, headers={"Location": "/ui/"})

    return [
        web.get("/ui", redirect),
        web.get("/ui/", get_asset),
        web.get("/ui/{asset}", get_asset),
    ]
