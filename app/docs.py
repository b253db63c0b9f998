"""The interactive API docs (`/docs`, Swagger UI; `/redoc`, ReDoc) served without a CDN,
and the OpenAPI document's security saying what the API really asks for.

FastAPI's own docs pages load Swagger UI and ReDoc from jsDelivr and the favicon from
fastapi.tiangolo.com: without internet (an air-gapped deployment, a server behind a strict
egress proxy) they are a white page. Here the pages are FastAPI's self-hosting recipe
(`get_swagger_ui_html`, `get_redoc_html`) pointed at the files that the `fastapi-offline`
wheel ships (Swagger UI 5, Apache-2.0; ReDoc 2, MIT; packaged under MIT), served from
`/docs-assets/`. A Content-Security-Policy holds the pages to this server. ReDoc's sidebar
always shows its logo from cdn.redoc.ly (no option turns it off): the script is served with
that address replaced by an inline image, so the page asks no other host for anything and
the browser logs no refused load.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, swagger_ui_default_parameters
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request

from contract.limits import MAX_SEED

ASSETS = "/docs-assets"
ASSETS_DIR = files("fastapi_offline") / "static"    # swagger-ui-bundle.js, swagger-ui.css,
                                                     # redoc.standalone.js, favicon.png
# No validator badge: Swagger UI would fetch it from validator.swagger.io.
SWAGGER_PARAMETERS = {**swagger_ui_default_parameters, "validatorUrl": None}
REDOC_JS = "redoc.standalone.js"
# ReDoc's sidebar logo, and what the served script shows instead: a transparent pixel (the
# link's text, "API docs by Redocly", stays).
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
BLANK_IMAGE = (b"data:image/gif;base64,"
               b"R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
# This server only; the inline start-up script by its hash; ReDoc's search runs in a worker
# made from a blob; both UIs set inline styles.
CSP = ("default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
       "worker-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _self_only(page: HTMLResponse) -> HTMLResponse:
    """`page` with a CSP allowing this server's files and the page's own inline scripts."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
        for m in INLINE_SCRIPT.findall(bytes(page.body).decode()))
    page.headers["Content-Security-Policy"] = CSP.format(hashes=hashes)
    page.headers["X-Content-Type-Options"] = "nosniff"
    page.headers["Referrer-Policy"] = "no-referrer"
    return page


@cache
def _redoc_script() -> tuple[bytes, str]:
    """ReDoc's script without its one outside address, and its ETag (read once: 1 MB)."""
    script = (ASSETS_DIR / REDOC_JS).read_bytes().replace(REDOC_LOGO, BLANK_IMAGE)
    return script, f'"{hashlib.sha256(script).hexdigest()[:32]}"'


def install_pages(app: FastAPI) -> None:
    """`/docs` and `/redoc` from local assets (create the app with `docs_url=None,
    redoc_url=None` so FastAPI's CDN pages are not registered first)."""

    # Before the mount, which would otherwise serve the file as the package ships it.
    @app.api_route(f"{ASSETS}/{REDOC_JS}", methods=["GET", "HEAD"], include_in_schema=False)
    async def redoc_script(request: Request) -> Response:
        script, etag = _redoc_script()
        headers = {"ETag": etag, "Cache-Control": "no-cache",
                   "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(script, media_type="text/javascript; charset=utf-8", headers=headers)

    app.mount(ASSETS, StaticFiles(directory=str(ASSETS_DIR)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _self_only(get_swagger_ui_html(
            openapi_url=root + openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS))

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _self_only(get_redoc_html(
            openapi_url=root + openapi_url, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/{REDOC_JS}",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png", with_google_fonts=False))


def install_document(app: FastAPI, keys_required: bool) -> None:
    """The document says what the API does:

    - without API keys the API is open: each operation's security requirement gets the
      empty alternative (`{}`, OpenAPI's "no authentication"), so generated clients and
      fuzzers do not insist on a key; with keys the bearer key stays required;
    - integer bounds are exact: FastAPI's OpenAPI model holds `maximum` as a float, which
      turns the seed's 2^63-1 into 2^63 (a seed the API refuses, valid by the document)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        doc = build()
        _exact_bounds(doc)
        if keys_required:
            return doc
        for item in doc.get("paths", {}).values():
            for op in item.values():
                if isinstance(op, dict) and op.get("security") and {} not in op["security"]:
                    op["security"].append({})
        schemes = doc.get("components", {}).get("securitySchemes", {})
        for scheme in schemes.values():
            if scheme.get("scheme") == "bearer":
                scheme["description"] = ("an API key (`Authorization: Bearer <key>`); this "
                                         "server has no keys configured, so none is needed")
        return doc

    app.openapi = openapi  # type: ignore[method-assign]



EXACT_BOUNDS = {float(b): b for b in (MAX_SEED,)}   # integer bounds past 2^53


def _exact_bounds(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("maximum", "minimum"):
                if isinstance(node.get(key), float) and node[key] in EXACT_BOUNDS:
                    node[key] = EXACT_BOUNDS[node[key]]
        for value in node.values():
            _exact_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _exact_bounds(value)
