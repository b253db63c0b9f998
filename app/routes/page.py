"""The web page at `/`: static files, no build step; the page talks to the public API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[1] / "static"

# The page loads only its own script and style, and draws frames from data: and blob: URLs;
# with a result store (DDPM_RESULTS_URL) it also fetches images from the store's origin
# (the 307 of an image endpoint leads there): `connect-src` names it (page_headers).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def page_headers(store_origin: str | None) -> dict[str, str]:
    """PAGE_HEADERS, its `connect-src` also allowing the result store's origin if any."""
    if not store_origin:
        return PAGE_HEADERS
    csp = PAGE_HEADERS["Content-Security-Policy"].replace(
        "connect-src 'self'", f"connect-src 'self' {store_origin}")
    return {**PAGE_HEADERS, "Content-Security-Policy": csp}


@router.api_route("/", methods=["GET", "HEAD"])
def index(request: Request) -> FileResponse:
    store = request.app.state.shards.default.jobs.results   # one store for all
    return FileResponse(STATIC / "index.html", media_type="text/html",
                        headers=page_headers(store.origin() if store is not None else None))
