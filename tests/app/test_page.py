"""The web page in a real browser: Debian's chromium driven by Playwright, against a real
API, worker and Redis. Generate, watch frames change, get the final images, cancel."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.auth import new_key
from contract.spec import GenerationSpec

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
    page redraws at most once per DRAW_INTERVAL_MS (measured between its own passes) and
    draws only the latest frame of each image per pass. Those frames are more than the
    default stream byte budget allows (a 422 naming snapshot_every): the API and the
    worker get a budget that holds them."""
    spec = GenerationSpec(model="tiny", num_images=64, steps=100, snapshot_every=1)
    budget = {"DDPM_STREAM_MAX_BYTES": str(spec.snapshot_frames
                                           * spec.preview(16).frame_bytes(3))}
    spawn_worker("--max-batch", "64", env=budget)
    api = start_api(budget)
    _open_with_model(page, api.url, "tiny")
    _fill(page, steps="100", num_images="64", snapshot_every="1")
    heap_before = page.evaluate("() => performance.memory.usedJSHeapSize")
    page.click("#generate")
    page.wait_for_selector("#status[data-status=succeeded]", timeout=180_000)
    page.wait_for_function("() => [...document.querySelectorAll('#frames canvas')]"
                           ".every(c => c.dataset.final === '1')", timeout=30_000)
    stats = page.evaluate("() => ({...window.ddpmStats})")
    assert stats["frames"] >= 64 * 50, stats          # most frames reached the page
    assert stats["draws"] >= 2 and stats["minGap"] >= stats["interval"] - 1, stats
    assert stats["drawn"] <= stats["draws"] * 64, stats       # ≤ one frame per image a pass
    assert page.evaluate("() => document.querySelectorAll('#frames canvas').length") == 64
    page.evaluate("() => new Promise(r => setTimeout(r, 300))")
    heap_after = page.evaluate("() => performance.memory.usedJSHeapSize")
    assert heap_after - heap_before < 30 * 2**20, (heap_before, heap_after)


def test_lossy_frames_smaller_than_the_image_fill_the_canvas(
        page: Any, spawn_worker: Callable[..., Any], start_api: Callable[..., Any]) -> None:
    """JPEG frames of 8 px (the request's snapshot_format and snapshot_size, added on the
    way out) are decoded and drawn over the whole 16 px canvas, not into a corner."""
    spawn_worker()
    api = start_api()
    _open_with_model(page, api.url, "tiny")

    def small_jpeg_frames(route: Any) -> None:
        body = json.loads(route.request.post_data or "{}")
        route.continue_(post_data=json.dumps({**body, "snapshot_format": "jpeg",
                                              "snapshot_size": 8}))

    page.route("**/v1/generations", small_jpeg_frames)
    _fill(page, steps="1000", num_images="1", snapshot_every="5")
    page.click("#generate")
    page.wait_for_function("() => +document.querySelector('#frames canvas')?.dataset.step > 0",
                           timeout=60_000)
    drawn = page.evaluate("""() => {
        const c = document.querySelector('#frames canvas');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let opaque = 0;
        for (let i = 3; i < px.length; i += 4) opaque += px[i] === 255;
        return {final: c.dataset.final === '1', side: c.width, opaque,
                pixels: px.length / 4};
    }""")
    assert not drawn["final"] and drawn["side"] == 16, drawn
    assert drawn["opaque"] == drawn["pixels"], drawn       # every pixel drawn from the frame
    job_id = page.text_content("#job-id")
    job = httpx.get(f"{api.url}/v1/generations/{job_id}").json()
    assert (job["request"]["snapshot_format"], job["request"]["snapshot_size"]) == ("jpeg", 8)
    page.click("#cancel")
    page.wait_for_selector("#status[data-status=canceled]", timeout=30_000)


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


def _submit_job(page: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Click Generate; the JSON body the page sent and the job the API answered, both parsed
    by Python (whose integers are exact, unlike a JavaScript number past 2^53)."""
    with page.expect_response(lambda r: r.request.method == "POST"
                              and r.url.endswith("/v1/generations")) as answered:
        page.click("#generate")
    response = answered.value
    return json.loads(response.request.post_data), response.json()


def _history(page: Any, n: int) -> list[str]:
    page.wait_for_function("n => document.querySelectorAll('#history li').length === n", arg=n,
                           timeout=30_000)
    return page.eval_on_selector_all("#history li", "ls => ls.map(l => l.textContent)")


def test_seeds_past_2_to_the_53_stay_exact(page: Any, spawn_worker: Callable[..., Any],
                                          start_api: Callable[..., Any]) -> None:
    """Seeds are 63-bit, past what a JavaScript number holds (2^53): a typed seed reaches
    the job digit for digit, and the history shows the seed each job ran with, one the
    server drew too, also after a reload (the history lives in localStorage)."""
    spawn_worker()
    api = start_api()
    _open_with_model(page, api.url, "tiny")
    typed = 3610434497286911892
    assert int(float(typed)) != typed          # a double cannot hold it
    _fill(page, steps="2", num_images="1", snapshot_every="0", seed=str(typed))
    sent, job = _submit_job(page)
    assert sent["seed"] == typed
    ran = httpx.get(f"{api.url}/v1/generations/{job['id']}").json()["request"]["seed"]
    assert ran == typed
    assert f"seed {typed} ·" in _history(page, 1)[0]

    _fill(page, seed="")                        # the server draws one: 63 random bits
    sent, job = _submit_job(page)
    assert "seed" not in sent
    drawn = httpx.get(f"{api.url}/v1/generations/{job['id']}").json()["request"]["seed"]
    page.wait_for_selector("#status[data-status=succeeded]", timeout=60_000)
    history = _history(page, 2)
    assert f"seed {drawn} ·" in history[0] and f"seed {typed} ·" in history[1], (drawn, history)
    page.reload()
    assert _history(page, 2) == history
    page.wait_for_load_state("networkidle")     # nothing in flight as the API stops


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


# -- the edit panel: an input image, a painted mask, a second image --------------------------


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _decode(data_url: str) -> bytes:
    return base64.b64decode(data_url.split(",", 1)[1] if data_url.startswith("data:")
                            else data_url)


def _set_range(page: Any, selector: str, value: str) -> None:
    """A range input as a user's drag leaves it: value set, `input` fired."""
    page.eval_on_selector(selector, "(e, v) => { e.value = v; "
                          "e.dispatchEvent(new Event('input', {bubbles: true})); }", value)


def _drag(page: Any, box: dict[str, float], size: int, y: float, x0: float, x1: float) -> None:
    """A mouse drag along row `y` from x0 to x1, in the image's pixel coordinates."""
    def at(x: float, yy: float) -> tuple[float, float]:
        return box["x"] + x * box["width"] / size, box["y"] + yy * box["height"] / size

    page.mouse.move(*at(x0, y))
    page.mouse.down()
    page.mouse.move(*at(x1, y), steps=8)
    page.mouse.up()


def _submit(page: Any) -> dict[str, Any]:
    """Click Generate; the JSON body the page sent."""
    with page.expect_request(lambda r: r.method == "POST"
                             and r.url.endswith("/v1/generations")) as sent:
        page.click("#generate")
    return json.loads(sent.value.post_data)


def _wait_final(page: Any, n: int) -> None:
    page.wait_for_selector("#status[data-status=succeeded]", timeout=120_000)
    page.wait_for_function("n => { const cs = [...document.querySelectorAll('#frames canvas')];"
                           " return cs.length === n && cs.every(c => c.dataset.final === '1'); }",
                           arg=n, timeout=30_000)


def test_inpaint_keeps_the_unpainted_pixels(page: Any, spawn_worker: Callable[..., Any],
                                            start_api: Callable[..., Any]) -> None:
    """Upload a 16×16 image (the tiny model's size, so no resizing), paint its left part
    with mouse drags, generate: the downloaded result equals the upload, 8-bit exactly,
    where nothing was painted and differs where paint was. The page lists the samplers
    /v1/models names and sends the mask as a greyscale PNG of the upload's own size."""
    spawn_worker()
    api = start_api()
    _open_with_model(page, api.url, "tiny")
    samplers = httpx.get(api.url + "/v1/models").json()["samplers"]
    assert {"ddpm", "ddim", "dpm++2m"} <= set(samplers)
    assert page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)") \
        == samplers
    assert page.input_value("#sampler") == "dpm++2m"

    size = 16
    upload = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    page.click("#edit-box summary")
    page.set_input_files("#init_file", files=[{"name": "in.png", "mimeType": "image/png",
                                               "buffer": _png(upload)}])
    page.wait_for_selector("#stage:not([hidden])")
    assert page.eval_on_selector("#mask_canvas", "c => [c.width, c.height]") == [size, size]
    assert page.input_value("#edit_mode") == "img2img"
    assert page.input_value("#strength") == "0.75"

    # A brush 3 px wide dragged along every other row from x = 0.5 to 5.5 covers columns
    # 0-5 entirely (and reaches at most column 7): columns 9-15 stay unpainted.
    _set_range(page, "#brush", "3")
    box = page.locator("#mask_canvas").bounding_box()
    assert box["width"] > 4 * size                      # shown scaled up
    for y in range(0, size, 2):
        _drag(page, box, size, y + 0.5, 0.5, 5.5)
    painted, kept = (slice(None), slice(0, 6)), (slice(None), slice(9, size))
    assert page.input_value("#edit_mode") == "inpaint"  # painting picked it
    assert page.input_value("#strength") == "1"         # and its default strength

    _fill(page, steps="10", num_images="1", seed="3", snapshot_every="1")
    body = _submit(page)
    assert _decode(body["init_image"]) == _png(upload)  # the upload's own bytes
    assert body["strength"] == 1.0 and "interpolate_to" not in body
    sent = Image.open(io.BytesIO(_decode(body["mask"])))
    assert (sent.mode, sent.size) == ("L", (size, size))
    mask = np.asarray(sent)
    assert set(np.unique(mask)) <= {0, 255}

    _wait_final(page, 1)
    job_id = page.text_content("#job-id")
    page.wait_for_selector("#inputs img[data-name=mask]")
    got = httpx.get(f"{api.url}/v1/generations/{job_id}/images/0")
    assert got.status_code == 200
    result = np.asarray(Image.open(io.BytesIO(got.content)).convert("RGB"))
    assert result.shape == upload.shape
    assert np.array_equal(result[kept], upload[kept]), "the unpainted region changed"
    assert np.array_equal(result[mask == 0], upload[mask == 0])
    changed = (result[painted] != upload[painted]).any(axis=-1).mean()
    assert changed > 0.5, f"only {changed:.0%} of the painted pixels were regenerated"
    history = page.text_content("#history li")
    assert "inpaint" in history and "succeeded" in history


def test_edit_results_into_an_interpolation(page: Any, spawn_worker: Callable[..., Any],
                                            start_api: Callable[..., Any]) -> None:
    """The "edit" and "B" buttons of two finished images load them into the panel; the
    interpolation between them is sent with both images' exact bytes, followed like any
    job, and its inputs are shown; Remove goes back to plain generation. The sampler
    choices are what /v1/models lists."""
    spawn_worker()
    api = start_api()
    _open_with_model(page, api.url, "tiny")
    _fill(page, steps="3", num_images="2", seed="1", snapshot_every="0")
    assert "init_image" not in _submit(page)
    _wait_final(page, 2)
    first = page.text_content("#job-id")
    images = [httpx.get(f"{api.url}/v1/generations/{first}/images/{i}").content
              for i in (0, 1)]

    page.click("#frames figure:nth-child(1) .pick-init")
    page.wait_for_selector("#stage:not([hidden])")
    page.click("#frames figure:nth-child(2) .pick-b")
    page.wait_for_selector("#stage-b:not([hidden])")
    assert page.input_value("#edit_mode") == "interpolate"
    assert page.input_value("#strength") == "0.5"
    assert not page.is_visible("#mask-tools")
    _fill(page, num_images="3", steps="5")
    body = _submit(page)
    assert _decode(body["init_image"]) == images[0]
    assert _decode(body["interpolate_to"]) == images[1]
    assert "mask" not in body and body["num_images"] == 3 and body["strength"] == 0.5
    _wait_final(page, 3)
    assert page.text_content("#job-id") != first
    names = page.eval_on_selector_all("#inputs img", "is => is.map(i => i.dataset.name)")
    assert sorted(names) == ["init_image", "interpolate_to"]

    page.click("#edit-remove")
    assert page.is_hidden("#stage") and page.input_value("#num_images") == "3"
    assert page.input_value("#edit_mode") == "img2img"   # not left on interpolate
    body = _submit(page)
    assert not {"init_image", "mask", "interpolate_to", "strength"} & set(body)
    _wait_final(page, 3)
    assert page.is_hidden("#inputs")
    # An image loaded after the removal starts a plain img2img, not an interpolation.
    page.set_input_files("#init_file", files=[{"name": "a.png", "mimeType": "image/png",
                                               "buffer": images[0]}])
    page.wait_for_selector("#stage:not([hidden])")
    assert page.input_value("#edit_mode") == "img2img" and page.is_hidden("#b-row")

    # The sampler choices are whatever /v1/models lists (none is built into the page).
    listed = httpx.get(api.url + "/v1/models").json()
    listed["samplers"] = ["ddim", "new-sampler"]
    page.route("**/v1/models", lambda route: route.fulfill(json=listed))
    page.reload()
    page.wait_for_selector("#sampler option", state="attached")
    assert page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)") \
        == ["ddim", "new-sampler"]


def _frame_contrast(page: Any, selector: str) -> float:
    """How far the element's outermost pixels are from the page around it: the share of its
    edge pixels that differ clearly (> 48 in some channel) from the page's commonest colour
    in a 4 px ring outside it. 0: its edge melts into the page."""
    box = page.locator(selector).bounding_box()
    pad = 4
    shot = page.screenshot(clip={"x": box["x"] - pad, "y": box["y"] - pad,
                                 "width": box["width"] + 2 * pad,
                                 "height": box["height"] + 2 * pad})
    px = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    scale = px.shape[1] / (box["width"] + 2 * pad)           # device pixels per CSS pixel
    p = round(pad * scale)
    ring = np.concatenate([px[:p].reshape(-1, 3), px[-p:].reshape(-1, 3),
                           px[:, :p].reshape(-1, 3), px[:, -p:].reshape(-1, 3)])
    colours, counts = np.unique(ring, axis=0, return_counts=True)
    page_colour = colours[counts.argmax()]
    inner = px[p:-p, p:-p]
    edge = np.concatenate([inner[0], inner[-1], inner[:, 0], inner[:, -1]])
    return float((np.abs(edge - page_colour).max(axis=-1) > 48).mean())


def test_a_refused_submit_replaces_the_job_shown(page: Any, spawn_worker: Callable[..., Any],
                                                 start_api: Callable[..., Any]) -> None:
    """An inpainting of the whole image: its mask, shown above the result, is all white and
    still stands out from the (white) page. Then a submit the API refuses: the error names
    its field once, and takes the place of the job shown before (no green "succeeded", no
    images, inputs or links that would read as this request's outcome)."""
    spawn_worker()
    api = start_api()
    _open_with_model(page, api.url, "tiny")
    upload = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    page.click("#edit-box summary")
    page.set_input_files("#init_file", files=[{"name": "in.png", "mimeType": "image/png",
                                               "buffer": _png(upload)}])
    page.wait_for_selector("#stage:not([hidden])")
    page.click("#mask-invert")                            # every pixel: generate
    assert page.input_value("#edit_mode") == "inpaint"
    _fill(page, steps="2", num_images="1", snapshot_every="0")
    page.click("#generate")
    _wait_final(page, 1)
    mask = "#inputs img[data-name=mask]"
    page.wait_for_function("s => document.querySelector(s)?.complete", arg=mask,
                           timeout=30_000)
    assert page.evaluate("s => document.querySelector(s).naturalWidth", mask) == 16
    assert _frame_contrast(page, mask) > 0.9

    # Past the form's own check (digits), past the API's bound (2^63 - 1).
    _fill(page, seed="9" * 19)
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    page.errors.remove("Failed to load resource: the server responded with a status of 422 "
                       "(Unprocessable Entity)")
    error = page.text_content("#error")
    assert error.startswith("seed: ") and error.count("seed") == 1, error
    assert page.eval_on_selector("#status", "s => s.dataset.status") != "succeeded"
    assert "succeeded" not in page.text_content("#status")
    assert page.eval_on_selector_all("#frames canvas", "cs => cs.length") == 0
    assert not page.is_visible("#inputs") and not page.is_visible("#downloads")
    assert page.text_content("#job-id") == ""
    assert "succeeded" in _history(page, 1)[0]            # the job itself is still listed
