"""The web page with results in object storage (moto's S3 over HTTP), in a real browser
(Debian's chromium, Playwright): a finished image picked for editing is fetched from its
URL, the API's 307 followed to the store, without the API key."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from app.auth import new_key
from tests.app.test_page import _fill, _submit, _wait_final, _wait_ready, page  # noqa: F401
from tests.s3_moto import MotoS3, moto_s3

pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    with moto_s3() as s:
        yield s


def test_the_page_shows_images_from_redirected_urls(page: Any,  # noqa: F811
                                                    s3: MotoS3,
                                                    spawn_worker: Callable[..., Any],
                                                    start_api: Callable[..., Any]) -> None:
    key, digest = new_key()
    s3.bucket("pics")
    env = {**s3.env(), "DDPM_RESULTS_URL": "s3://pics/p"}
    spawn_worker(env=env)
    api = start_api(env={**env, "DDPM_API_KEYS": digest})
    _wait_ready(api.url, {"Authorization": f"Bearer {key}"})
    store: list[Any] = []
    page.on("requestfinished",
            lambda q: store.append(q) if q.url.startswith(s3.endpoint) else None)
    page.goto(api.url + "/")
    page.wait_for_function("() => document.querySelector('#health').textContent"
                           ".includes('API key')")
    page.errors.remove("Failed to load resource: the server responded with a status of 401 "
                       "(Unauthorized)")      # the page's first look, before the key
    page.fill("#api_key", key)
    page.dispatch_event("#api_key", "change")
    page.wait_for_selector("#model option", state="attached")
    page.select_option("#model", "tiny")
    _fill(page, steps="3", num_images="2", seed="1", snapshot_every="0")
    _submit(page)
    _wait_final(page, 2)
    job = page.text_content("#job-id")
    stored = httpx.get(f"{api.url}/v1/generations/{job}/images/0", follow_redirects=True,
                       headers={"Authorization": f"Bearer {key}"}).content

    with page.expect_response(lambda r: r.url.startswith(f"{s3.endpoint}/pics/p/{job}/")
                              and r.status == 200):
        page.click("#frames figure:nth-child(1) .pick-init")      # GET …/images/0 → 307
    page.wait_for_selector("#stage:not([hidden])")
    assert store, "the browser never reached the store"
    for request in store:
        assert "authorization" not in request.all_headers()      # the key stayed home
    body = _submit(page)                                          # the picked image's bytes
    assert base64.b64decode(body["init_image"].split(",")[-1]) == stored
    _wait_final(page, 2)           # the img2img job ends: its input shown, from the store too
    page.wait_for_function("() => [...document.querySelectorAll('#inputs img')]"
                           ".some(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
