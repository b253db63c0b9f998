"""The web page in a real browser: Debian's chromium driven by Playwright, against a real
API, worker and Redis. Generate, watch frames change, get the final images, cancel."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.auth import new_key

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "page.png"

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")



@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.errors = errors  # a test that provokes an HTTP error removes the one it expects
    yield pg
    context.close()
    assert errors == [], errors


def _wait_ready(url: str, headers: dict[str, str] | None = None) -> None:
    with httpx.Client(base_url=url, headers=headers or {}) as c:
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                return


            time.sleep(0.1)
    pytest.fail("no worker became ready")


def _open_with_model(page: Any, url: str, model: str) -> None:
    _wait_ready(url)
    page.goto(url + "/")
    page.wait_for_selector("#model option", state="attached")
    page.select_option("#model", model)


def _steps(page: Any) -> list[int]:
    return page.eval_on_selector_all("#frames canvas", "cs => cs.map(c => +c.dataset.step)")


def _pixels(page: Any) -> list[str]:
    return page.eval_on_selector_all("#frames canvas", "cs => cs.map(c => c.toDataURL())")


def _fill(page: Any, **fields: str) -> None:
    for name, value in fields.items():
        page.fill(f"#{name}", value)


def test_generate_watch_and_download(page: Any, spawn_worker: Callable[..., Any],
                                     start_api: Callable[..., Any], models_dir: Path) -> None:
    served = ROOT / "checkpoints" if (ROOT / "checkpoints" / "mnist").is_dir() else models_dir
    spawn_worker(models=served)
    api = start_api()
    _wait_ready(api.url)
    response = page.goto(api.url + "/")
    assert response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert httpx.head(api.url + "/").status_code == 200
    page.wait_for_selector("#model option", state="attached")
    names = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    model = "mnist" if "mnist" in names else "tinycond"
    page.select_option("#model", model)
    assert page.is_visible("#class-row")
    page.select_option("#class_label", "3")
    assert page.is_visible("#guidance-row")
    page.select_option("#sampler", "ddim")
    _fill(page, steps="60", num_images="4", seed="7", snapshot_every="1")
    page.click("#generate")

    page.wait_for_function("() => [...document.querySelectorAll('#frames canvas')]"
                           ".some(c => +c.dataset.step > 0)", timeout=60_000)
    first_steps, first_pixels = _steps(page), _pixels(page)
    page.wait_for_function(
        "s => [...document.querySelectorAll('#frames canvas')].some(c => +c.dataset.step > s)",
        arg=max(first_steps) + 5, timeout=60_000)
    assert _pixels(page) != first_pixels, "the frames did not change while denoising"

    page.wait_for_selector("#status[data-status=succeeded]", timeout=120_000)
    page.wait_for_function("() => [...document.querySelectorAll('#frames canvas')]"
                           ".every(c => c.dataset.final === '1')", timeout=30_000)
    assert page.eval_on_selector("#progress", "p => p.value / p.max") == 1
    page.wait_for_selector("#downloads:not([hidden])")
    grid = page.get_attribute("#grid-link", "href")
    assert grid and grid.endswith("/grid.png")
    got = httpx.get(api.url + grid)
    assert got.status_code == 200 and got.content[:8] == b"\x89PNG\r\n\x1a\n"
    history = page.eval_on_selector_all("#history li", "ls => ls.map(l => l.textContent)")
    assert len(history) == 1 and "succeeded" in history[0] and "seed 7" in history[0]
    shot = SCREENSHOT if os.environ.get("DDPM_UPDATE_SCREENSHOT") else None
    if shot is not None:
        shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)

    # Re-opening a finished job from the history replays it to the same final images.
    final = _pixels(page)
    page.reload()
    page.wait_for_selector("#history li button")
    page.click("#history li button")
    page.wait_for_selector("#status[data-status=succeeded]", timeout=30_000)
    page.wait_for_function("() => [...document.querySelectorAll('#frames canvas')]"
                           ".every(c => c.dataset.final === '1')", timeout=30_000)
    assert _pixels(page) == final


def test_many_images_and_frames_are_drawn_throttled(page: Any,
                                                    spawn_worker: Callable[..., Any],
                                                    start_api: Callable[..., Any]) -> None:
    """64 images with a frame at every one of 100 steps: thousands of frames arrive, the
    page redraws at most ten times a second and keeps only the latest frame per image."""
    spawn_worker("--max-batch", "64")
    api = start_api()
    _open_with_model(page, api.url, "tiny")
    _fill(page, steps="100", num_images="64", snapshot_every="1")
    heap_before = page.evaluate("() => performance.memory.usedJSHeapSize")
    started = time.monotonic()
    page.click("#generate")
    page.wait_for_selector("#status[data-status=succeeded]", timeout=180_000)
    page.wait_for_function("() => [...document.querySelectorAll('#frames canvas')]"
                           ".every(c => c.dataset.final === '1')", timeout=30_000)
    seconds = time.monotonic() - started
    stats = page.evaluate("() => window.ddpmStats")
    assert stats["frames"] >= 64 * 50, stats          # most frames reached the page
    assert stats["draws"] <= seconds * 10 + 5, (stats, seconds)
    assert page.evaluate("() => document.querySelectorAll('#frames canvas').length") == 64
    page.evaluate("() => new Promise(r => setTimeout(r, 300))")
    heap_after = page.evaluate("() => performance.memory.usedJSHeapSize")
    assert heap_after - heap_before < 30 * 2**20, (heap_before, heap_after)


def test_cancel_a_running_job(page: Any, spawn_worker: Callable[..., Any],
                              start_api: Callable[..., Any], models_dir: Path) -> None:
    spawn_worker()
    api = start_api()
    _open_with_model(page, api.url, "tiny")
    _fill(page, steps="1000", num_images="8", snapshot_every="10")
    page.click("#generate")
    page.wait_for_selector("#status[data-status=running]", timeout=60_000)
    page.wait_for_function("() => document.querySelector('#progress').value > 0",
                           timeout=60_000)
    page.click("#cancel")
    page.wait_for_selector("#status[data-status=canceled]", timeout=30_000)
    assert page.is_disabled("#cancel")
    job_id = page.text_content("#job-id")
    status = httpx.get(f"{api.url}/v1/generations/{job_id}").json()["status"]
    assert status == "canceled"


def test_bad_request_shows_the_field(page: Any, spawn_worker: Callable[..., Any],
                                     start_api: Callable[..., Any]) -> None:
    spawn_worker()
    api = start_api()
    _open_with_model(page, api.url, "tiny")
    # Past the form's own check, so that the API answers.
    page.eval_on_selector("#steps", "e => { e.max = 5000; e.value = 5000; }")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "steps" in page.text_content("#error")
    page.errors.remove("Failed to load resource: the server responded with a status of 422 "
                       "(Unprocessable Entity)")


def test_with_api_keys_the_page_asks_for_one(page: Any, spawn_worker: Callable[..., Any],
                                             start_api: Callable[..., Any]) -> None:
    key, digest = new_key()
    spawn_worker()
    api = start_api(env={"DDPM_API_KEYS": digest})
    _wait_ready(api.url)
    page.goto(api.url + "/")
    page.wait_for_function("() => document.querySelector('#health').textContent"
                           ".includes('API key')")
    assert page.eval_on_selector("#key-box", "d => d.open")
    page.errors.remove("Failed to load resource: the server responded with a status of 401 "
                       "(Unauthorized)")
    page.fill("#api_key", key)
    page.dispatch_event("#api_key", "change")
    page.wait_for_selector("#model option", state="attached")
    page.select_option("#model", "tiny")
    _fill(page, steps="5", num_images="2", snapshot_every="1")
    page.click("#generate")
    page.wait_for_selector("#status[data-status=succeeded]", timeout=60_000)
    # The grid link is a blob fetched with the key: a plain link could not authenticate.
    page.wait_for_selector("#downloads:not([hidden])")
    assert page.get_attribute("#grid-link", "href").startswith("blob:")


def test_hidden_fields_and_links_are_not_shown(page: Any, spawn_worker: Callable[..., Any],
                                               start_api: Callable[..., Any]) -> None:
    """What the page hides is hidden as the user sees it (computed style, not the `hidden`
    attribute, which a CSS `display` rule would override): no Guidance field unless a class
    is chosen (a value typed there would be dropped), no Class field for an unconditional
    model, no download links until the job has succeeded."""
    spawn_worker()
    api = start_api()
    _open_with_model(page, api.url, "tinycond")
    assert page.is_visible("#class-row")
    assert page.input_value("#class_label") == ""          # any (unconditional)
    assert not page.is_visible("#guidance-row")
    assert not page.is_visible("#guidance_scale")
    page.select_option("#class_label", "3")
    assert page.is_visible("#guidance_scale")
    page.select_option("#class_label", "")
    assert not page.is_visible("#guidance_scale")
    page.select_option("#model", "tiny")
    assert not page.is_visible("#class-row") and not page.is_visible("#guidance-row")

    # A running job has no downloads yet (nor has a canceled one).
    _fill(page, steps="1000", num_images="8", snapshot_every="10")
    page.click("#generate")
    page.wait_for_selector("#status[data-status=running]", timeout=60_000)
    page.wait_for_function("() => document.querySelector('#progress').value > 0",
                           timeout=60_000)
    assert page.eval_on_selector("#status", "s => s.dataset.status") == "running"
    assert not page.is_visible("#downloads")
    assert not page.is_visible("#grid-link") and not page.is_visible("#gif-link")
    page.click("#cancel")
    page.wait_for_selector("#status[data-status=canceled]", timeout=30_000)
    assert not page.is_visible("#downloads")

    # A succeeded one shows them.
    _fill(page, steps="3", num_images="1", snapshot_every="1")
    page.click("#generate")
    page.wait_for_selector("#status[data-status=succeeded]", timeout=60_000)
    page.wait_for_selector("#grid-link", state="visible", timeout=30_000)
    assert page.is_visible("#gif-link")
