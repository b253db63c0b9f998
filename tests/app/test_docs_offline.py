"""`/docs` (Swagger UI) and `/redoc` (ReDoc) in a real browser with no network but the API:
Debian's chromium driven by Playwright, every request to another host aborted and recorded.
The pages must render every operation from the server's own files and ask no other host for
anything (FastAPI's default pages load their scripts from a CDN: offline, a white page)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

RENDER_TIMEOUT_MS = 30_000

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")



# Every Content-Security-Policy refusal, kept on the page: a load the CSP blocks never
# reaches the network (no request to abort), only the console.
RECORD_CSP = ("window.cspViolations = []; document.addEventListener('securitypolicyviolation',"
              " e => window.cspViolations.push(e.blockedURI + ' (' + e.violatedDirective + ')'));")


class Offline:
    """A browser page whose requests reach only `origin`; the others are aborted and kept,
    as are the page's errors and the console's."""

    def __init__(self, browser: Any, origin: str) -> None:
        self.origin = origin
        self.elsewhere: list[str] = []
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": 1200, "height": 900},
                                           service_workers="block")
        self.context.route("**/*", self._route)
        self.context.add_init_script(RECORD_CSP)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console",
                     lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def _route(self, route: Any) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or f"{parts.scheme}://{parts.netloc}" == self.origin:
            route.continue_()
        else:
            self.elsewhere.append(url)
            route.abort("internetdisconnected")


@pytest.fixture
def offline(browser: Any, start_api: Callable[..., Any]) -> Iterator[Offline]:
    api = start_api()
    view = Offline(browser, api.url)
    yield view
    view.context.close()


def _operations(origin: str) -> list[tuple[str, str, str]]:
    doc = httpx.get(f"{origin}/openapi.json", timeout=10).json()
    return [(method.upper(), path, op.get("summary", ""))
            for path, item in doc["paths"].items() for method, op in item.items()]


def test_swagger_ui_renders_every_operation_offline(offline: Offline) -> None:
    ops = _operations(offline.origin)
    page = offline.page
    page.goto(offline.origin + "/docs")
    try:
        page.wait_for_selector(".opblock", timeout=RENDER_TIMEOUT_MS)
    except sync_api.TimeoutError:
        pytest.fail(f"/docs rendered no operation; requests to other hosts (aborted): "
                    f"{offline.elsewhere}; page errors: {offline.errors}")
    shown = page.eval_on_selector_all(
        ".opblock", "bs => bs.map(b => [b.querySelector('.opblock-summary-method').innerText,"
                    " b.querySelector('.opblock-summary-path').innerText.replace(/\\u200b/g, '')])")
    assert sorted(tuple(s) for s in shown) == sorted((m, p) for m, p, _ in ops)
    assert page.locator(".info .title").inner_text().startswith("ddpm-serve")
    assert offline.elsewhere == [], "the page asked other hosts for files"
    assert offline.errors == []


def test_redoc_renders_every_operation_offline(offline: Offline) -> None:
    ops = _operations(offline.origin)
    page = offline.page
    page.goto(offline.origin + "/redoc")
    try:
        page.wait_for_selector("h2", timeout=RENDER_TIMEOUT_MS)
    except sync_api.TimeoutError:
        pytest.fail(f"/redoc rendered no operation; requests to other hosts (aborted): "
                    f"{offline.elsewhere}; page errors: {offline.errors}")
    headings = set(page.eval_on_selector_all("h2", "hs => hs.map(h => h.innerText.trim())"))
    missing = [summary for _, _, summary in ops if summary not in headings]
    assert missing == [], f"operations /redoc does not show: {missing}"
    assert page.locator("h1").first.inner_text().startswith("ddpm-serve")
    # ReDoc's sidebar shows a logo, which its script asks cdn.redoc.ly for: the CSP would
    # refuse the load (and the console say so). Once the logo has loaded or failed:
    page.wait_for_function("() => { const a = document.querySelector('a[href*=\"redocly\"]');"
                           " return a && [...a.querySelectorAll('img')].every(i => i.complete);"
                           " }", timeout=RENDER_TIMEOUT_MS)
    origin = offline.origin
    sources = page.eval_on_selector_all("img", "is => is.map(i => i.currentSrc || i.src)")
    assert [s for s in sources if not s.startswith(("data:", "blob:", origin))] == []
    assert page.evaluate("() => window.cspViolations") == []
    assert offline.elsewhere == [], "the page asked other hosts for files"
    assert offline.errors == []
