"""Image-conditioned generation over HTTP: img2img, inpainting and interpolation through a
live `ddpm api` and `ddpm worker` (real Redis), as JSON with base64 images and as
multipart uploads; hostile images refused with a 422 naming the field, never a 500; an
image too large and a rest too large refused alike in both shapes."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.settings import ApiSettings
from contract.inputs import MAX_INPUT_BYTES
from contract.limits import INPUT_FIELDS
from tests.app.test_api import poll, ready

SIZE = 16                    # the `tiny` model: 16×16 RGB


def png(im: Image.Image, **save: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def picture(seed: int = 0, size: int = SIZE, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def lower_half_mask(size: int = SIZE) -> Image.Image:
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[size // 2:] = 255                    # white: generate
    return Image.fromarray(arr)


def pixels(client: httpx.Client, url: str) -> np.ndarray:
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def run(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/generations", json={"model": "tiny", "steps": 5, **body})
    assert r.status_code == 202, r.text
    done = poll(client, r.json()["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    return done


@pytest.fixture
def live(client: httpx.Client, spawn_worker: Callable[..., Any]) -> httpx.Client:
    spawn_worker()
    ready(client)
    return client


def test_inpainting_keeps_the_unmasked_pixels_and_streams_like_any_job(
        live: httpx.Client) -> None:
    image = picture(1)
    done = run(live, init_image=b64(png(image)), mask=b64(png(lower_half_mask())),
               num_images=2, seed=3, snapshot_every=2, jump_length=2, jump_n_sample=2)
    spec = done["request"]
    assert spec["init_image"].startswith("sha256:") and spec["mask"].startswith("sha256:")
    # 5 steps, a jump back every 2 (at 0 and 2), 2 passes: 5 + 2·2·1·2 = 13 per image.
    assert done["progress"]["steps_per_image"] == 13
    assert done["progress"]["image_steps"] == [13, 13]
    want = np.asarray(image)
    for url in done["images"]:
        out = pixels(live, url)
        assert np.array_equal(out[: SIZE // 2], want[: SIZE // 2])     # kept exactly
        assert not np.array_equal(out[SIZE // 2:], want[SIZE // 2:])   # generated
    # The inputs as the model saw them.
    fitted = pixels(live, f"{done['links']['self']}/inputs/init_image")
    assert np.array_equal(fitted, want)
    mask = np.asarray(Image.open(io.BytesIO(live.get(
        f"{done['links']['self']}/inputs/mask").content)))
    assert set(np.unique(mask)) == {0, 255} and mask[SIZE // 2:].all() and not mask[:8].any()
    assert live.get(f"{done['links']['self']}/inputs/interpolate_to").status_code == 404


def test_multipart_upload_equals_the_json_request(live: httpx.Client) -> None:
    image = png(picture(2))
    as_json = run(live, init_image=b64(image), strength=0.5, seed=11)
    r = live.post("/v1/generations", files={"init_image": ("a.png", image, "image/png")},
                  data={"request": '{"model": "tiny", "steps": 5, "strength": 0.5, '
                                   '"seed": 11}'})
    assert r.status_code == 202, r.text
    upload = poll(live, r.json()["id"], {"succeeded", "failed"})
    assert upload["request"] == as_json["request"]
    assert np.array_equal(pixels(live, upload["images"][0]), pixels(live, as_json["images"][0]))
    # img2img at 0.5 changes the image, but not beyond recognition of a plain job's noise.
    plain = run(live, seed=11)
    assert not np.array_equal(pixels(live, plain["images"][0]),
                              pixels(live, as_json["images"][0]))


def test_interpolation_ends_are_the_img2img_of_each_image(live: httpx.Client) -> None:
    a, b = b64(png(picture(4))), b64(png(picture(5)))
    frames = run(live, init_image=a, interpolate_to=b, num_images=3, seed=9)
    assert frames["request"]["interpolate_to"].startswith("sha256:")
    first = run(live, init_image=a, strength=0.5, seed=9)
    last = run(live, init_image=b, strength=0.5, seed=9)
    got = [pixels(live, u) for u in frames["images"]]
    assert np.array_equal(got[0], pixels(live, first["images"][0]))
    assert np.array_equal(got[2], pixels(live, last["images"][0]))
    assert not np.array_equal(got[1], got[0]) and not np.array_equal(got[1], got[2])


def _bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG header declaring width × height, with a tiny IDAT: decoding it
    would allocate gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def _animated(fmt: str) -> bytes:
    frames = [picture(i) for i in range(3)]
    return png(frames[0], format=fmt, save_all=True, append_images=frames[1:])


def _sixteen_bit() -> bytes:
    return png(Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16)))


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6                           # orientation: rotate 90° clockwise
    return png(picture(6, 20).crop((0, 0, 20, 12)), format="JPEG", exif=exif.tobytes())


HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("not an image", {"init_image": b64(b"hello, world")}, "init_image"),
    ("not base64", {"init_image": "%%%not base64%%%"}, "init_image"),
    ("truncated PNG", {"init_image": b64(png(picture(7))[:60])}, "init_image"),
    ("truncated JPEG", {"init_image": b64(png(picture(7), format="JPEG")[:200])},
     "init_image"),
    ("decompression bomb", {"init_image": b64(_bomb(50_000, 50_000))}, "init_image"),
    ("huge dimensions", {"init_image": b64(_bomb(100_000, 1))}, "init_image"),
    ("animated GIF", {"init_image": b64(_animated("GIF"))}, "init_image"),
    ("APNG", {"init_image": b64(_animated("PNG"))}, "init_image"),
    ("mask without image", {"mask": b64(png(lower_half_mask()))}, "mask"),
    ("mask of another size", {"init_image": b64(png(picture(1))),
                              "mask": b64(png(lower_half_mask(SIZE * 2)))}, "mask"),
    ("broken mask", {"init_image": b64(png(picture(1))), "mask": b64(b"GIF89a")}, "mask"),
    ("strength 0", {"init_image": b64(png(picture(1))), "strength": 0}, "strength"),
    ("strength 1.5", {"init_image": b64(png(picture(1))), "strength": 1.5}, "strength"),
    ("strength without image", {"strength": 0.5}, "strength"),
    ("steps beyond the strength", {"init_image": b64(png(picture(1))), "strength": 0.002,
                                   "steps": 5}, "steps"),
    ("one-frame interpolation", {"init_image": b64(png(picture(1))),
                                 "interpolate_to": b64(png(picture(2))), "num_images": 1},
     "interpolate_to"),
    ("resampling without a mask", {"init_image": b64(png(picture(1))), "jump_n_sample": 3},
     "jump_n_sample"),
]

# Odd but readable images are fitted, not refused.
FITTED: list[tuple[str, bytes]] = [
    ("16-bit grey", _sixteen_bit()),
    ("CMYK JPEG", png(picture(8).convert("CMYK"), format="JPEG")),
    ("EXIF-rotated JPEG", _exif_rotated()),
    ("palette PNG", png(picture(9).convert("P"))),
    ("RGBA, larger, not square", png(picture(10, 40).crop((0, 0, 40, 24)).convert("RGBA"))),
]


def test_hostile_images_get_a_422_naming_the_field(live: httpx.Client) -> None:
    for name, body, field in HOSTILE:
        r = live.post("/v1/generations", json={"model": "tiny", "steps": 5, **body})
        assert r.status_code == 422, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["field"] == field and err["message"], (name, err)
    for name, data in FITTED:
        r = live.post("/v1/generations", json={"model": "tiny", "steps": 5,
                                               "init_image": b64(data)})
        assert r.status_code == 202, (name, r.text)
        job = r.json()
        fitted = Image.open(io.BytesIO(live.get(f"{job['links']['self']}/inputs/init_image")
                                       .content))
        assert fitted.size == (SIZE, SIZE) and fitted.mode == "RGB", name
        assert live.delete(job["links"]["self"]).status_code in (200, 409)
    assert live.get("/metrics").text.count('status="500"') == 0


def test_multipart_mistakes_are_422s(live: httpx.Client) -> None:
    image = ("a.png", png(picture(1)), "image/png")
    cases = [
        ({"init_image": image}, {"request": "{not json"}, "request"),
        ({"init_image": image}, {"request": "[1, 2]"}, "request"),
        ({"init_image": image, "other": image}, {"request": "{}"}, "other"),
        ({"init_image": image}, {"request": '{"init_image": "abc"}'}, "init_image"),
        ({"mask": image}, {"request": '{"model": "tiny"}'}, "mask"),
    ]
    for files, data, field in cases:
        r = live.post("/v1/generations", files=files, data=data)
        assert r.status_code == 422, (files.keys(), data, r.text)
        assert r.json()["error"]["field"] == field, (data, r.json())
    r = live.post("/v1/generations", content=b"--x\r\nbroken",
                  headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 422, r.text
    assert live.get("/metrics").text.count('status="500"') == 0


def test_an_image_over_the_limit_is_refused_alike_as_json_or_as_a_file(
        start_api: Callable[..., Any]) -> None:
    """Issue 30: a too-large image in JSON got "String should have at most 5739832
    characters", as a file "larger than 4194304 bytes". Every way of sending one (base64,
    a data: URL, a file part, a text part) now gets one message, the image's size and the
    limit in bytes, for each image field (and on the OpenAI edit route). A body past the
    upload limit (6 MiB here: a 5 MB image is past it as base64, not as a file) is a 413
    giving the image limit in bytes."""
    upload = 6 * 2**20
    api = start_api(env={"DDPM_MAX_UPLOAD_BYTES": str(upload)})
    with httpx.Client(base_url=api.url, timeout=60) as c:
        request = '{"model": "tiny", "steps": 2}'
        for i, field in enumerate(INPUT_FIELDS):
            data = np.random.default_rng(i).bytes(MAX_INPUT_BYTES * 21 // 20 + 1000 * i)
            text = b64(data)
            replies = {
                "base64": c.post("/v1/generations", json={"model": "tiny", field: text}),
                "file": c.post("/v1/generations", files={field: ("a.png", data, "image/png")},
                               data={"request": request}),
            }
            if field == "init_image":
                replies["data URL"] = c.post("/v1/generations", json={
                    "model": "tiny", field: f"data:image/png;base64,{text}"})
                replies["text part"] = c.post("/v1/generations", files={field: (None, text)},
                                              data={"request": request})
            messages = set()
            for how, r in replies.items():
                assert r.status_code == 422, (field, how, r.text[:300])
                err = r.json()["error"]
                assert err["field"] == field and err["code"] == "invalid_request", (how, err)
                messages.add(err["message"])
            (message,) = messages                   # one wording, whatever the transport
            for words in (field, f"{len(data)} bytes", f"at most {MAX_INPUT_BYTES} bytes"):
                assert words in message, (words, message)
        # The OpenAI edit route says it the same way, as OpenAI's 400 naming `image`.
        edit = c.post("/v1/images/edits", files={"image": ("a.png", data, "image/png")},
                      data={"model": "tiny", "prompt": "0"})
        assert edit.status_code == 400, edit.text[:300]
        err = edit.json()["error"]
        assert err["param"] == "image", err
        assert err["message"] == (f"image: the image is {len(data)} bytes; at most "
                                  f"{MAX_INPUT_BYTES} bytes"), err
        big = np.random.default_rng(9).bytes(5 * 10**6)
        as_file = c.post("/v1/generations", files={"init_image": ("a.png", big, "image/png")},
                         data={"request": request})
        assert as_file.status_code == 422 and f"{len(big)} bytes" in as_file.text, as_file.text
        as_json = c.post("/v1/generations", json={"model": "tiny", "init_image": b64(big)})
        assert as_json.status_code == 413, as_json.text[:300]
        err = as_json.json()["error"]
        assert err["code"] == "payload_too_large", err
        for words in (f"{upload} bytes", f"image may be at most {MAX_INPUT_BYTES} bytes"):
            assert words in err["message"], (words, err)


def test_what_is_not_an_image_is_held_to_the_body_limit(live: httpx.Client) -> None:
    """Issue 30: every body on POST /v1/generations got the 20 MiB upload limit, so 20 KB
    of padding was accepted. What is not an image (a JSON body less its images, a form's
    `request` part) is held to DDPM_MAX_BODY_BYTES, a 413 that says so; the images keep
    their own limit, so a large image with a small rest still runs."""
    limit = ApiSettings.model_fields["max_body_bytes"].default
    photo = png(picture(3, size=96))                # noise: larger than the limit as PNG
    assert len(photo) > limit
    pad = " " * limit

    def as_json(image: bool, padded: bool) -> httpx.Response:
        text = ('{"model": "tiny", "steps": 2' + (pad if padded else "")
                + (f', "init_image": "{b64(photo)}"' if image else "") + "}")
        return live.post("/v1/generations", content=text.encode(),
                         headers={"content-type": "application/json"})

    def as_form(padded: bool) -> httpx.Response:
        return live.post("/v1/generations", files={"init_image": ("a.png", photo, "image/png")},
                         data={"request": '{"model": "tiny", "steps": 2'
                                          + (pad if padded else "") + "}"})

    for how, r in (("padding", as_json(False, True)), ("image and padding", as_json(True, True)),
                   ("padded request part", as_form(True))):
        assert r.status_code == 413, (how, r.text[:300])
        err = r.json()["error"]
        assert err["code"] == "payload_too_large", (how, err)
        for words in ("DDPM_MAX_BODY_BYTES", f"at most {limit} bytes"):
            assert words in err["message"], (how, words, err)
    for how, r in (("image", as_json(True, False)), ("file", as_form(False))):
        assert r.status_code == 202, (how, r.text[:300])
        assert poll(live, r.json()["id"], {"succeeded", "failed"})["status"] == "succeeded"
