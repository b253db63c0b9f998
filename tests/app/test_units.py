"""The API's pieces without processes: settings, keys, the webhook allow-list, pictures,
error fields, event ids."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from PIL import Image

from app.auth import OPEN, KeyAuth, hash_key, new_key
from app.errors import ApiError, _field
from app.media import animation_gif, grid_png
from app.openai.mapping import native_request
from app.openai.models import ImageGenerationRequest
from app.openai.output import Output
from app.openai.wait import partial_event
from app.routes.generations import _check_webhook
from app.settings import ApiSettings
from app.streams import StreamEvent, _with, check_event_id, client_data
from contract.events import Event, EventType
from contract.limits import MAX_IMAGES, STREAM_MAX_BYTES
from contract.spec import ModelInfo


def test_settings_take_comma_lists_and_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    d1, d2 = hash_key("a"), hash_key("b")
    monkeypatch.setenv("DDPM_API_KEYS", f"{d1}, sha256:{d2.upper()}")
    monkeypatch.setenv("DDPM_WEBHOOK_ALLOW_HOSTS", "Hooks.Example.com,.corp.example")
    s = ApiSettings()
    assert s.api_keys == [d1, d2]
    assert s.webhook_allow_hosts == ["hooks.example.com", ".corp.example"]
    monkeypatch.setenv("DDPM_API_KEYS", "the-raw-key-itself")
    with pytest.raises(ValueError, match="digests"):
        ApiSettings()


def test_keys_are_checked_against_digests() -> None:
    key, digest = new_key()
    assert digest == hashlib.sha256(key.encode()).hexdigest() and key.startswith("ddpm_")
    auth = KeyAuth([digest, hash_key("other")])
    who = auth.identify(f"Bearer {key}", "10.0.0.1")
    assert who.owner == digest[:16] and who.client == f"key:{digest[:16]}"
    assert who.owns(digest[:16]) and not who.owns(hash_key("other")[:16]) and not who.owns(None)
    for header in (None, "", "Bearer", f"Basic {key}", f"Bearer {key}x", "Bearer " + "k" * 600):
        with pytest.raises(ApiError) as e:
            auth.identify(header, "10.0.0.1")
        assert e.value.status == 401 and e.value.headers == {"WWW-Authenticate": "Bearer"}


def test_open_service_identifies_callers_by_address() -> None:
    who = KeyAuth([]).identify(None, "10.0.0.9")
    assert who.owner == OPEN and who.client == "ip:10.0.0.9" and who.owns("anyone")


@pytest.mark.parametrize(("url", "ok"), [
    ("https://hooks.example.com/x", True),
    ("http://HOOKS.example.com:8080/x", True),
    ("https://a.corp.example/x", True),
    ("https://corp.example/x", True),
    ("https://evilcorp.example/x", False),
    ("https://hooks.example.com.evil.net/x", False),
    ("http://127.0.0.1/x", False),
    ("http://169.254.169.254/latest", False),
    ("http:///nohost", False),
])
def test_webhook_allow_list(url: str, ok: bool) -> None:
    s = ApiSettings(webhook_allow_hosts=["hooks.example.com", ".corp.example"])
    if ok:
        _check_webhook(url, s)
    else:
        with pytest.raises(ApiError) as e:
            _check_webhook(url, s)
        assert e.value.status == 422 and e.value.field == "webhook"
    with pytest.raises(ApiError):           # default: no webhooks at all
        _check_webhook("https://hooks.example.com/x", ApiSettings())


def _png(value: int, mode: str = "L", size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_grid_tiles_and_scales_small_images() -> None:
    grid = Image.open(io.BytesIO(grid_png([_png(10), _png(20), _png(30)])))
    # 3 images → 2 columns × 2 rows of 64 px cells (16 px scaled ×4) with 2 px padding.
    assert grid.size == (2 * 66 + 2, 2 * 66 + 2) and grid.mode == "L"
    assert grid.getpixel((2, 2)) == 10 and grid.getpixel((68, 2)) == 20
    assert grid.getpixel((2, 68)) == 30 and grid.getpixel((68, 68)) == 0


def test_animation_has_a_frame_per_snapshot_step_then_the_finals() -> None:
    snaps = [(2, 0, _png(50)), (2, 1, _png(60)), (4, 0, _png(70)), (4, 1, _png(80))]
    gif = Image.open(io.BytesIO(animation_gif(2, snaps, [_png(200), _png(210)])))
    assert gif.n_frames == 3
    gif.seek(2)
    assert gif.convert("L").getpixel((2, 2)) == 200
    only_final = Image.open(io.BytesIO(animation_gif(2, [], [_png(1), None])))
    assert only_final.n_frames == 1
    with pytest.raises(ValueError):
        animation_gif(2, [], [None, None])


@pytest.mark.parametrize(("loc", "field"), [
    (("body", "steps"), "steps"), (("body",), None), (("header", "idempotency-key"),
                                                      "Idempotency-Key"),
    (("query", "last_event_id"), "last_event_id"), (("body", "a", 0), "a.0"),
])
def test_error_fields(loc: tuple, field: str | None) -> None:
    assert _field(loc) == field


def test_event_ids() -> None:
    assert check_event_id(None, "x") == "0-0" and check_event_id("", "x") == "0-0"
    assert check_event_id("1700000000000-3", "x") == "1700000000000-3"
    assert check_event_id("5", "x") == "5"
    for bad in ("abc", "1-2-3", "1 -2", "-1", "1" * 30):
        with pytest.raises(ApiError) as e:
            check_event_id(bad, "Last-Event-ID")
        assert e.value.status == 422 and e.value.field == "Last-Event-ID"


@pytest.mark.parametrize(("data", "extra", "expected"), [
    ('{"index":0,"step":4}', {"png": "QUJD"}, {"index": 0, "step": 4, "png": "QUJD"}),
    ("{}", {"png": None}, {"png": None}),
    (" {} ", {"url": "/u"}, {"url": "/u"}),
    ("{ }", {"url": "/u"}, {"url": "/u"}),
    ('{"index":1}', {"url": "/u", "png": None}, {"index": 1, "url": "/u", "png": None}),
    ('{"png":"old","a":[1,{"b":"}"}]}', {"png": "new"}, {"png": "new", "a": [1, {"b": "}"}]}),
])
def test_event_data_is_spliced_not_reparsed(data: str, extra: dict, expected: dict) -> None:
    out = _with(data, **extra)
    assert json.loads(out) == expected
    assert out.count('"png"') <= 1


def test_websocket_messages_wrap_the_data_as_is() -> None:
    for ev in (StreamEvent("done", '{"images":["/a"]}', "1-0"), StreamEvent("canceled")):
        assert json.loads(ev.as_message()) == {"id": ev.id, "event": ev.event,
                                               "data": json.loads(ev.data)}


# -- snapshot frames in any format ---------------------------------------------------------


def _encoded(fmt: str, size: int, value: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value, value, value)).save(
        buf, fmt.upper())
    return buf.getvalue()


def test_settings_hold_the_stream_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ApiSettings().stream_max_bytes == STREAM_MAX_BYTES
    monkeypatch.setenv("DDPM_STREAM_MAX_BYTES", "65536")
    assert ApiSettings().stream_max_bytes == 65536
    monkeypatch.setenv("DDPM_STREAM_MAX_BYTES", "100")
    with pytest.raises(ValueError):
        ApiSettings()


def test_snapshot_events_carry_the_frame_in_its_format() -> None:
    """A snapshot reaches clients as base64 `image` beside its `format` and `size`; one an
    older worker wrote (the frame under `png`, no format) reads as a PNG frame."""
    import asyncio
    import base64

    jpeg = _encoded("jpeg", 8, 90)
    new = Event(EventType.SNAPSHOT, {"index": 1, "step": 4, "kind": "xt", "format": "jpeg",
                                     "size": 8}, image=jpeg).to_fields()
    old = {"type": "snapshot", "data": '{"index":0,"step":2,"kind":"x0"}', "png": _png(5)}
    for fields, want_format, want in ((new, "jpeg", jpeg), (old, "png", _png(5))):
        raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
        ev = Event.from_fields(raw)     # the one codec
        assert ev.type == EventType.SNAPSHOT and ev.image == want
        doc = json.loads(asyncio.run(client_data(None, "j", ev, False)))
        assert doc["format"] == want_format and "png" not in doc
        assert base64.b64decode(doc["image"]) == want
    assert json.loads(asyncio.run(client_data(None, "j", Event.from_fields(new),
                                              False)))["size"] == 8


def test_animation_of_lossy_previews_smaller_than_the_images() -> None:
    """JPEG and WebP frames of 128 px (a 256 px model's default previews) animate at the
    frames' size: the final 256 px PNGs are shrunk into 128 px cells, not the frames
    enlarged (nor the finals pasted over their neighbours)."""
    snaps = [(5, 0, _encoded("jpeg", 128, 40)), (5, 1, _encoded("webp", 128, 60)),
             (10, 0, _encoded("jpeg", 128, 80)), (10, 1, _encoded("webp", 128, 100))]
    finals = [_png(200, "RGB", 256), _png(220, "RGB", 256)]
    gif = Image.open(io.BytesIO(animation_gif(2, snaps, finals)))
    assert gif.n_frames == 3 and gif.size == (2 * 130 + 2, 128 + 4)
    shown = []
    for i in range(3):
        gif.seek(i)
        im = gif.convert("RGB")
        shown.append([im.getpixel((2 + 64, 66))[0], im.getpixel((132 + 64, 66))[0]])
        assert im.getpixel((131, 66)) == (0, 0, 0)          # the padding between stays dark
    for (a, b), want in zip(shown, ([40, 60], [80, 100], [200, 220]), strict=True):
        assert abs(a - want[0]) <= 3 and abs(b - want[1]) <= 3, shown
    # Frames that are not images are skipped; the rest still animates.
    gif = Image.open(io.BytesIO(animation_gif(1, [(1, 0, b"junk"), (2, 0, snaps[0][2])],
                                              [None])))
    assert gif.n_frames == 1


# -- the OpenAI routes' partial images ------------------------------------------------------


@pytest.mark.parametrize(("image_size", "channels"), [(8, 1), (28, 1), (64, 3), (65, 3),
                                                      (256, 3), (1024, 3)])
def test_openai_partial_images_fit_the_default_stream_budget(image_size: int,
                                                             channels: int) -> None:
    """No legal request of the OpenAI routes trips the default budget: at most 2 ×
    partial_images frames per image at the default preview, whatever the steps."""
    info = ModelInfo("m", image_size, channels, 1000)
    worst = 0
    for steps in range(1, 1001):
        for partial in (1, 2, 3):
            req = native_request(info, {"model": "m", "num_images": MAX_IMAGES,
                                        "steps": steps}, partial)
            worst = max(worst, req.snapshot_frames
                        * req.preview(image_size).frame_bytes(channels))
    assert 0 < worst <= STREAM_MAX_BYTES


def test_openai_partial_images_over_a_small_budget_name_partial_images() -> None:
    info = ModelInfo("m", 256, 3, 1000)
    fields = {"model": "m", "num_images": 4, "steps": 20}
    req = native_request(info, fields, 3)
    need = req.snapshot_frames * req.preview(256).frame_bytes(3)
    assert native_request(info, fields, 3, need).snapshot_every == req.snapshot_every
    with pytest.raises(ApiError) as e:
        native_request(info, fields, 3, need - 1)
    assert e.value.status == 400 and e.value.field == "partial_images"
    assert native_request(info, fields, 0, 1024).snapshot_every == 0     # no previews


@pytest.mark.parametrize(("frame_format", "output_format", "magic"), [
    ("jpeg", "png", b"\x89PNG"), ("png", "jpeg", b"\xff\xd8\xff"),
    ("jpeg", "jpeg", b"\xff\xd8\xff"), ("webp", "webp", b"RIFF")])
def test_a_partial_image_is_in_the_requested_output_format(
        frame_format: str, output_format: str, magic: bytes) -> None:
    """OpenAI's partial images come in the request's `output_format` (as its final images
    do), whatever the frames' format; `size` is the frame's own."""
    import asyncio
    import base64

    info = ModelInfo("m", 256, 3, 1000)
    out = Output("image_generation", info, ImageGenerationRequest(output_format=output_format),
                 "http://test/")
    frame = _encoded(frame_format, 128, 120)
    ev = Event(EventType.SNAPSHOT, {"index": 0, "step": 5, "format": frame_format,
                                    "size": 128}, image=frame)   # as the stream holds it
    text = asyncio.run(partial_event(out, ev, partial_image_index=0, image_index=0)).decode()
    event, payload = text.split("\n")[:2]
    doc = json.loads(payload.removeprefix("data: "))
    assert event == "event: image_generation.partial_image"
    assert doc["output_format"] == output_format and doc["size"] == "128x128"
    got = base64.b64decode(doc["b64_json"])
    assert got.startswith(magic) and Image.open(io.BytesIO(got)).size == (128, 128)
    if frame_format == output_format:
        assert got == frame                                  # passed on as it is

