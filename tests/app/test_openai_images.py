"""The OpenAI-compatible Images API, driven by the real `openai` SDK against a live stack
(`ddpm worker` serving the shipped `mnist` model, `ddpm api` with an API key, real Redis):
the digits come out as asked (judged by the shipped digit classifier), `url` links work,
streams carry real x̂0 previews before each image, edits keep the unmasked pixels,
variations stay variations, errors are the SDK's exception classes, and a request that
does not get its images (client gone, timeout) cancels its job."""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from openapi_spec_validator import validate
from PIL import Image

from app.auth import new_key
from app.errors import ApiError
from app.openai.mapping import class_label
from contract.spec import ModelInfo
from ddpm.redis_server import RedisServer
from tests.conftest import ApiProcess, WorkerProcess
from training.classifier import load_classifier, predict

ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER = ROOT / "checkpoints" / "mnist" / "digit-classifier.safetensors"
KEY, DIGEST = new_key()
FAST = {"steps": 12, "guidance_scale": 3.0}       # few dpm++2m steps: cheap on a CPU
LONG = {"steps": 1000, "guidance_scale": 3.0}     # minutes on a CPU at n = 8


@dataclass
class Stack:
    url: str
    redis_url: str
    tmp: Path
    api: ApiProcess


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    """One worker serving checkpoints/ (the `mnist` model) and one API that requires a key,
    for the whole module: starting them is most of its time."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("openai")
    worker = WorkerProcess(redis_server.url, ROOT / "checkpoints", tmp / "worker.log")
    api = ApiProcess(redis_server.url, tmp / "api.log", {"DDPM_API_KEYS": DIGEST})
    try:
        deadline = time.monotonic() + 120
        while httpx.get(f"{api.url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, f"no worker came up:\n{worker.log()[-3000:]}"
            time.sleep(0.1)
        yield Stack(api.url, redis_server.url, tmp, api)
    finally:
        api.stop()
        worker.stop()
        redis.Redis.from_url(redis_server.url).flushall()


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return load_classifier(CLASSIFIER)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def decoded(images: list[Any]) -> list[bytes]:
    return [base64.b64decode(im.b64_json) for im in images]


def digits(classifier: torch.nn.Module, pngs: list[bytes]) -> list[int]:
    batch = torch.from_numpy(np.stack([pixels(p) for p in pngs]))[:, None]
    return predict(classifier, batch).argmax(1).tolist()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def jobs(url: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/v1/generations", params={"limit": 100}, headers=auth(), timeout=10)
    assert r.status_code == 200, r.text
    return list(r.json()["generations"])


def wait_status(url: str, job_id: str, want: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = httpx.get(f"{url}/v1/generations/{job_id}", headers=auth(), timeout=10).json()
        if doc["status"] == want or time.monotonic() > deadline:
            return dict(doc)
        time.sleep(0.05)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


def created(url: str) -> float:
    return metric(url, 'ddpm_api_generations_created_total{model="mnist"}')


# -- generate ---------------------------------------------------------------------------


def test_generate_draws_the_digit_the_prompt_names(
        client: openai.OpenAI, stack: Stack, classifier: torch.nn.Module) -> None:
    before = created(stack.url)
    r = client.images.generate(model="mnist", prompt="7", n=4, extra_body={**FAST, "seed": 1})
    pngs = decoded(r.data or [])
    assert len(pngs) == 4 and r.size == "28x28" and r.output_format == "png"
    for png in pngs:
        im = Image.open(io.BytesIO(png))
        assert im.format == "PNG" and im.size == (28, 28) and im.mode == "L"
    assert digits(classifier, pngs) == [7, 7, 7, 7]
    assert r.usage is not None and r.usage.output_tokens == 4 * FAST["steps"]
    assert len({p for p in pngs}) == 4                     # each image its own noise
    assert created(stack.url) == before + 1                # the native API's metrics
    # The model may be left out (one is served); a class by index or name, any case.
    one = client.images.generate(prompt=" 2 ", extra_body={**FAST, "seed": 2})
    assert digits(classifier, decoded(one.data or [])) == [2]


def test_output_formats_and_url_links(client: openai.OpenAI, stack: Stack) -> None:
    b64 = client.images.generate(prompt="4", n=2, extra_body={**FAST, "seed": 5})
    linked = client.images.generate(prompt="4", n=2, response_format="url",
                                    extra_body={**FAST, "seed": 5})
    for want, item in zip(decoded(b64.data or []), linked.data or [], strict=True):
        assert item.url and item.url.startswith(f"{stack.url}/v1/generations/")
        assert item.b64_json is None
        got = httpx.get(item.url, headers=auth(), timeout=10)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert np.array_equal(pixels(got.content), pixels(want))   # same seed, same image
        assert httpx.get(item.url, timeout=10).status_code == 401    # the link takes the key
    for fmt, magic in (("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
        r = client.images.generate(prompt="4", output_format=fmt,   # type: ignore[arg-type]
                                   extra_body={**FAST, "seed": 5})
        data = decoded(r.data or [])[0]
        assert data.startswith(magic) and r.output_format == fmt
        assert Image.open(io.BytesIO(data)).size == (28, 28)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="4", response_format="url", output_format="jpeg")
    assert e.value.body["param"] == "output_format"  # type: ignore[index]


def test_stream_sends_real_previews_then_the_images(client: openai.OpenAI) -> None:
    events = list(client.images.generate(prompt="3", n=2, stream=True, partial_images=2,
                                         extra_body={**FAST, "seed": 3}))
    by_image: dict[int, list[Any]] = {0: [], 1: []}
    for ev in events:
        by_image[ev.image_index].append(ev)              # type: ignore[union-attr]
    for index, evs in by_image.items():
        kinds = [type(ev).__name__ for ev in evs]
        assert kinds == ["ImageGenPartialImageEvent"] * 2 + ["ImageGenCompletedEvent"], kinds
        assert [ev.partial_image_index for ev in evs[:2]] == [0, 1]
        assert all(ev.output_format == "png" and ev.size == "28x28" and
                   base64.b64decode(ev.b64_json).startswith(b"\x89PNG") for ev in evs[:2])
        assert evs[2].type == "image_generation.completed"
        assert evs[2].usage.output_tokens == FAST["steps"] and evs[2].size == "28x28"
        final = pixels(base64.b64decode(evs[2].b64_json)).astype(float)
        previews = [pixels(base64.b64decode(ev.b64_json)).astype(float) for ev in evs[:2]]
        # Earlier previews are blurrier: further from the final image, and less resolved
        # (more grey between ink and background; MNIST digits are nearly black and white).
        mad = [float(np.abs(p - final).mean()) for p in previews]
        grey = [float(((p > 32) & (p < 224)).mean()) for p in [*previews, final]]
        print(f"image {index}: mean |preview - final| {mad[0]:.1f} → {mad[1]:.1f}; grey "
              f"pixels {' → '.join(f'{g:.1%}' for g in grey)} (final)")
        assert mad[0] > mad[1] > 0
        assert grey[0] > grey[1] > grey[2]


@pytest.mark.parametrize(("fmt", "magic"), [("webp", b"RIFF"), ("jpeg", b"\xff\xd8\xff")])
def test_partial_images_come_in_the_requested_output_format(
        client: openai.OpenAI, fmt: str, magic: bytes) -> None:
    """Partial images are encoded as the request's `output_format` says, as the final
    images are, whatever format the worker's frames are in (PNG for MNIST)."""
    events = list(client.images.generate(prompt="3", stream=True, partial_images=1,
                                         output_format=fmt,  # type: ignore[arg-type]
                                         extra_body={**FAST, "seed": 3}))
    assert [ev.type for ev in events] == ["image_generation.partial_image",
                                          "image_generation.completed"]
    for ev in events:
        data = base64.b64decode(ev.b64_json)
        assert ev.output_format == fmt and data.startswith(magic), (ev.type, data[:12])
        assert Image.open(io.BytesIO(data)).size == (28, 28)


# -- edits and variations ---------------------------------------------------------------


def _seven(client: openai.OpenAI) -> bytes:
    r = client.images.generate(prompt="7", extra_body={**FAST, "seed": 1})
    return decoded(r.data or [])[0]


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_edit_with_a_mask_keeps_the_unmasked_pixels(client: openai.OpenAI) -> None:
    seven = _seven(client)
    alpha = np.full((28, 28), 255, dtype=np.uint8)
    alpha[14:] = 0                                        # transparent: edit (OpenAI)
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    mask = _png(Image.fromarray(rgba, "RGBA"))
    r = client.images.edit(image=("seven.png", seven, "image/png"),
                           mask=("mask.png", mask, "image/png"), prompt="1", n=2,
                           extra_body={**FAST, "seed": 4})
    want = pixels(seven)
    outs = [pixels(p) for p in decoded(r.data or [])]
    assert len(outs) == 2
    for out in outs:
        assert np.array_equal(out[:14], want[:14])          # kept exactly
        assert not np.array_equal(out[14:], want[14:])      # generated
    # The greyscale convention (white: edit) is the same mask.
    grey = _png(Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L"))
    again = client.images.edit(image=("seven.png", seven, "image/png"),
                               mask=("mask.png", grey, "image/png"), prompt="1", n=2,
                               extra_body={**FAST, "seed": 4})
    assert all(np.array_equal(a, pixels(b)) for a, b in zip(outs, decoded(again.data or []),
                                                             strict=True))
    # Streamed, an edit's events are image_edit.*.
    events = list(client.images.edit(image=("seven.png", seven, "image/png"),
                                     mask=("mask.png", mask, "image/png"), prompt="1",
                                     stream=True, partial_images=1,
                                     extra_body={**FAST, "seed": 4}))
    assert [ev.type for ev in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert np.array_equal(pixels(base64.b64decode(events[-1].b64_json)), outs[0])


def test_edit_without_a_mask_is_img2img(client: openai.OpenAI) -> None:
    seven = _seven(client)
    near = client.images.edit(image=("seven.png", seven, "image/png"), prompt="7",
                              extra_body={**FAST, "seed": 6, "strength": 0.2})
    far = client.images.edit(image=("seven.png", seven, "image/png"), prompt="7",
                             extra_body={**FAST, "seed": 6, "strength": 1.0})
    want = pixels(seven).astype(float)
    d_near = np.abs(pixels(decoded(near.data or [])[0]) - want).mean()
    d_far = np.abs(pixels(decoded(far.data or [])[0]) - want).mean()
    assert 0 < d_near < d_far


def test_variations_stay_variations(client: openai.OpenAI,
                                    classifier: torch.nn.Module) -> None:
    seven = _seven(client)
    r = client.images.create_variation(image=("seven.png", seven, "image/png"), n=8,
                                       extra_body={"steps": 20, "seed": 3})
    pngs = decoded(r.data or [])
    assert len(pngs) == 8 and r.usage is not None
    assert r.usage.output_tokens == 8 * 20
    assert all(not np.array_equal(pixels(p), pixels(seven)) for p in pngs)
    got = digits(classifier, pngs)
    assert got.count(7) >= 6, got


def test_uploads_get_the_upload_limit(client: openai.OpenAI, stack: Stack) -> None:
    """An edit or variation may carry an image of MiBs (DDPM_MAX_UPLOAD_BYTES); a JSON body
    only DDPM_MAX_BODY_BYTES (16 KiB), past which the 413 is in OpenAI's shape too."""
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    photo = _png(Image.fromarray(noise))
    assert len(photo) > 64 * 1024
    r = client.images.create_variation(image=("photo.png", photo, "image/png"),
                                       extra_body={"steps": 2, "seed": 1})
    assert Image.open(io.BytesIO(decoded(r.data or [])[0])).size == (28, 28)
    r2 = httpx.post(f"{stack.url}/v1/images/generations", headers=auth(), timeout=10,
                    json={"prompt": "7", "user": "x" * 20_000})
    assert r2.status_code == 413
    assert r2.json()["error"] == {"message": "request body exceeds 16384 bytes",
                                  "type": "invalid_request_error", "param": None,
                                  "code": "payload_too_large"}


# -- errors ------------------------------------------------------------------------------


def test_errors_are_the_sdks_exception_classes(client: openai.OpenAI, stack: Stack) -> None:
    def refused(exc: type[openai.APIStatusError], **kw: Any) -> dict[str, Any]:
        with pytest.raises(exc) as e:
            client.images.generate(**{"prompt": "7", **kw})
        body = e.value.body
        assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
        return body

    assert refused(openai.NotFoundError, model="nope")["code"] == "model_not_found"
    for n in (0, 65):
        assert refused(openai.BadRequestError, n=n)["param"] == "n"
    bad = refused(openai.BadRequestError, prompt="giraffe")
    assert bad["param"] == "prompt" and "0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in bad["message"]
    assert refused(openai.BadRequestError, size="1024x1024")["param"] == "size"
    assert refused(openai.BadRequestError, extra_body={"cfg": 3})["param"] == "cfg"
    assert refused(openai.BadRequestError, prompt="",
                   extra_body={"guidance_scale": 3})["param"] == "guidance_scale"
    assert refused(openai.BadRequestError, extra_body={"steps": 0})["param"] == "steps"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("x.png", b"not an image", "image/png"), prompt="7")
    assert e.value.body["param"] == "image"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("x.png", _png(Image.new("L", (28, 28))), "image/png"),
                           mask=("m.png", _png(Image.new("L", (14, 14))), "image/png"),
                           prompt="7")
    assert e.value.body["param"] == "mask"  # type: ignore[index]

    # The server has a key: a wrong one, or none, is refused; the right one works (above).
    wrong = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.images.generate(prompt="7")
    assert e.value.code == "invalid_api_key"
    r = httpx.post(f"{stack.url}/v1/images/variations", timeout=10,
                   files={"image": ("x.png", b"x", "image/png")})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "invalid_request_error"
    # The native routes keep their own error shape.
    r = httpx.post(f"{stack.url}/v1/generations", json={"model": "nope"}, headers=auth())
    assert r.status_code == 404 and set(r.json()["error"]) >= {"code", "message"}
    assert "type" not in r.json()["error"]


# -- requests that do not get their images cancel their job -------------------------------


def test_a_client_that_leaves_cancels_its_job(stack: Stack) -> None:
    body = {"prompt": "5", "n": 8, **LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.url}/v1/images/generations", json=body, headers=auth(),
                   timeout=httpx.Timeout(10, read=2))
    with httpx.stream("POST", f"{stack.url}/v1/images/generations", timeout=10,
                      json={**body, "stream": True, "partial_images": 1},
                      headers=auth()) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
    long = [j for j in jobs(stack.url) if j["request"]["steps"] == LONG["steps"]]
    assert len(long) == 2
    for job in long:
        assert wait_status(stack.url, job["id"], "canceled")["status"] == "canceled"
    # Each wait held a stream slot (it holds a Redis connection, as a stream does): freed.
    assert metric(stack.url, "ddpm_api_open_streams ") == 0


def test_a_wait_past_the_timeout_cancels_and_the_rate_limit_holds(stack: Stack) -> None:
    api = ApiProcess(stack.redis_url, stack.tmp / "api-timeout.log",
                     {"DDPM_API_KEYS": DIGEST, "DDPM_IMAGES_TIMEOUT_S": "1",
                      "DDPM_RATE_LIMIT": "1", "DDPM_RATE_WINDOW": "3600"})
    try:
        # Retries allowed: the 504 says not to retry (the job ran its time, it is canceled).
        sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=2)
        before = {j["id"] for j in jobs(api.url)}
        with pytest.raises(openai.InternalServerError) as e:
            sdk.images.generate(prompt="5", n=8, extra_body=LONG)
        assert e.value.status_code == 504 and e.value.code == "timeout"
        new = [j for j in jobs(api.url) if j["id"] not in before]
        assert len(new) == 1
        assert wait_status(api.url, new[0]["id"], "canceled")["status"] == "canceled"
        with pytest.raises(openai.RateLimitError) as e:
            sdk.with_options(max_retries=0).images.generate(prompt="5", extra_body=FAST)
        assert e.value.code == "rate_limit_exceeded"
    finally:
        api.stop()


# -- the document and the mapping --------------------------------------------------------


def test_the_openapi_document_lists_the_routes_and_validates(stack: Stack) -> None:
    doc = httpx.get(f"{stack.url}/openapi.json", timeout=10).json()
    validate(doc)
    for path in ("generations", "edits", "variations"):
        op = doc["paths"][f"/v1/images/{path}"]["post"]
        assert {"200", "400", "401", "404", "429"} <= set(op["responses"])
    gen = doc["paths"]["/v1/images/generations"]["post"]
    assert "text/event-stream" in gen["responses"]["200"]["content"]
    form = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert {"image", "mask", "prompt", "n", "strength"} <= set(
        form["multipart/form-data"]["schema"]["properties"])


def test_prompts_name_classes() -> None:
    cifar = ModelInfo("cifar", 32, 3, 1000, num_classes=3,
                      class_names=["airplane", "automobile", "bird"])
    assert class_label("airplane", cifar) == 0 and class_label(" Bird ", cifar) == 2
    assert class_label("1", cifar) == 1 and class_label("", cifar) is None
    for prompt in ("3", "ship", "-1", "a bird"):
        with pytest.raises(ApiError) as e:
            class_label(prompt, cifar)
        assert e.value.field == "prompt" and "airplane, automobile, bird" in e.value.message
    plain = ModelInfo("plain", 16, 3, 1000)
    assert class_label("  ", plain) is None
    with pytest.raises(ApiError, match="unconditional"):
        class_label("7", plain)
    unnamed = ModelInfo("unnamed", 16, 3, 1000, num_classes=2)
    assert class_label("1", unnamed) == 1
    with pytest.raises(ApiError):
        class_label("2", unnamed)


def test_the_readme_example_runs(stack: Stack, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `openai` example, as written, against the live stack."""
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
              if "from openai import OpenAI" in b]
    assert len(blocks) == 1
    code = blocks[0].replace('"http://localhost:8000/v1"', repr(f"{stack.url}/v1"))
    code = code.replace('api_key="unused"', f"api_key={KEY!r}")
    mask = np.full((28, 28, 4), 255, dtype=np.uint8)
    mask[20:, :, 3] = 0
    (tmp_path / "mask.png").write_bytes(_png(Image.fromarray(mask, "RGBA")))
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert sorted(p.name for p in tmp_path.glob("seven*.png")) == [
        f"seven{i}.png" for i in range(4)]
    assert len(scope["r"].data) == 4                        # the variations
