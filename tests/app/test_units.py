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
from app.routes.generations import _check_webhook
from app.settings import ApiSettings
from app.streams import StreamEvent, _with, check_event_id


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
