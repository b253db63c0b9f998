"""Input images of image-conditioned generation: hostile uploads refused, the rest fitted.

`contract.inputs` runs in the API process on bytes a client sent: every upload that is not a
usable single image must end as a `SpecError` naming the field with a message a user
understands, and nothing else may escape. Every image here is a few pixels, made by the
test itself; the decompression bombs are crafted headers, never decoded.
"""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from contract import inputs
from contract.inputs import (
    MAX_BASE64_CHARS,
    MAX_INPUT_BYTES,
    MAX_INPUT_PIXELS,
    FittedInput,
    decode_base64,
    decode_canonical,
    fit_image,
    image_input,
    input_digest,
    mask_input,
    open_image,
)
from contract.spec import SpecError

ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(16)


def _rand(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def _encode(im: Image.Image | np.ndarray, fmt: str = "PNG", **params: object) -> bytes:
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width×height grey pixels and whose IDAT holds one row:
    a few hundred bytes that a decoder would try to expand to width×height."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\0" * (width + 1), 9)) + _chunk(b"IEND", b""))


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (8, 8), (60 * i, 0, 0)) for i in range(3)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:])


def _refused(data: bytes, field: str = "init_image") -> str:
    """open_image refuses `data`: the SpecError names the field; its message is returned."""
    with pytest.raises(SpecError) as err:
        open_image(data, field)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    return err.value.message


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.array(im)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records the size of every image Pillow decodes (ImageFile.load) from now on."""
    seen: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> object:
        seen.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return seen


# -- the module stays light ----------------------------------------------------------------


def test_importing_inputs_imports_neither_torch_nor_numpy() -> None:
    """The API process imports contract.inputs; its image has no torch and no NumPy."""
    code = ("import sys, contract.inputs\n"
            "print(','.join(m for m in ('torch', 'numpy') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60, cwd=ROOT)
    assert proc.stdout.strip() == ""


def test_limits_are_the_documented_ones() -> None:
    assert MAX_INPUT_BYTES == 4 * 2**20
    assert MAX_INPUT_PIXELS == 4096 * 4096
    assert set(inputs.INPUT_FORMATS) == {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# -- hostile uploads ------------------------------------------------------------------------


def test_empty_upload() -> None:
    assert _refused(b"") == "is empty"


def test_upload_over_the_byte_limit_is_refused_before_decoding(
        loads: list[tuple[int, int]]) -> None:
    data = _encode(_rand(8, 8, 3))
    data += b"\0" * (MAX_INPUT_BYTES + 1 - len(data))  # a valid PNG followed by padding
    message = _refused(data, "mask")
    assert f"is {MAX_INPUT_BYTES + 1} bytes; the limit is 4 MiB" == message
    assert loads == []
    assert open_image(data[:MAX_INPUT_BYTES], "mask").size == (8, 8)  # the limit itself is fine


@pytest.mark.parametrize("data", [b"hello, world", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff",
                                  b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", bytes(range(256))])
def test_garbage_is_not_an_image(data: bytes) -> None:
    message = _refused(data)
    assert "PNG, JPEG, WebP, GIF, BMP or TIFF" in message or "truncated" in message or \
        "could not be decoded" in message, message


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "ICO", "PCX"])
def test_images_in_other_formats_are_refused(fmt: str) -> None:
    """Pillow reads dozens of formats (each a decoder to attack); only six are accepted."""
    data = _encode(_rand(8, 8, 3), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # a real image Pillow would decode
    assert _refused(data) == "is not a PNG, JPEG, WebP, GIF, BMP or TIFF image"


def test_decompression_bomb_is_refused_from_its_header(loads: list[tuple[int, int]]) -> None:
    """5000×5000: over our limit, under Pillow's own (89M pixels), so only our check stops
    it; and a valid image, so decoding it would have succeeded: the refusal must come
    before load()."""
    bomb = _png_header_only(5000, 5000)
    assert len(bomb) < 2000
    assert _refused(bomb) == "is 5000×5000 pixels; the limit is 16,777,216 pixels (4096×4096)"
    assert loads == []
    open_image(_encode(_rand(8, 8)), "init_image")
    assert loads and set(loads) == {(8, 8)}  # the recorder does see decoding


def test_image_at_the_pixel_limit_is_accepted() -> None:
    """4096×4096 is decoded (Pillow fills the rows the stream lacks); one more column is not."""
    assert open_image(_png_header_only(4096, 4096), "init_image").size == (4096, 4096)
    assert "is 4097×4096 pixels" in _refused(_png_header_only(4097, 4096))


@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (20_000, 20_000)])
def test_pillow_bomb_warning_and_error_become_the_same_refusal(
        width: int, height: int, loads: list[tuple[int, int]]) -> None:
    """Pillow warns above 89M pixels and raises above 179M, inside Image.open: neither may
    escape (a warning in the API's log, an unexpected exception type)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = _refused(_png_header_only(width, height))
    assert "pixels; the limit is 16,777,216 pixels" in message
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert loads == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt: str) -> None:
    data = _encode(_rand(64, 64, 3), fmt)
    message = _refused(data[: len(data) * 6 // 10])
    assert message == "is truncated: the image data ends early (an incomplete file?)"


def test_truncated_images_are_refused_even_if_pillow_is_told_to_accept_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """LOAD_TRUNCATED_IMAGES is process-wide: if anything turns it on, refuse loudly (a
    server fault, not a 422) rather than accept half images."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        open_image(_encode(_rand(8, 8)), "init_image")


def test_png_with_broken_chunk() -> None:
    """Pillow raises SyntaxError for some broken PNGs: still a SpecError."""
    broken = bytearray(_encode(_rand(8, 8, 3)))
    assert broken[37:41] == b"IDAT"
    broken[33:37] = struct.pack(">I", 10)
    assert "could not be decoded" in _refused(bytes(broken)) or \
        "truncated" in _refused(bytes(broken))


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "GIF"), ("PNG", "PNG"), ("WEBP", "WEBP"),
                                           ("TIFF", "TIFF")])
def test_animated_images_are_refused(fmt: str, name: str) -> None:
    """Animated GIF, APNG, animated WebP, multi-page TIFF: which frame was meant?"""
    data = _animated(fmt)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert _refused(data, "interpolate_to") == (
        f"has 3 frames (an animated or multi-page {name}); send a single still image")


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_single_frame_images_of_animation_formats_are_accepted(fmt: str) -> None:
    im = open_image(_encode(Image.new("RGB", (8, 8), (200, 0, 0)), fmt), "init_image")
    assert im.size == (8, 8)


def test_jpeg_with_extra_pictures_is_read_as_its_first() -> None:
    """Phone photos are often MPO: a JPEG plus a preview or depth map. Not an animation."""
    first, second = Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 200))
    data = _encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = _pixels(image_input(data, field="init_image", size=8, channels=3).png)
    assert np.abs(out.astype(int) - [200, 0, 0]).max() <= 3


@pytest.mark.parametrize(("width", "height"), [(0, 5), (5, 0), (0, 0)])
def test_zero_size_image(width: int, height: int) -> None:
    """Pillow refuses these at identification already; open_image also checks (a plugin may
    not)."""
    _refused(_png_header_only(width, height))


def test_unsupported_colour_mode() -> None:
    data = _encode(Image.new("LAB", (4, 4)), "TIFF")
    assert _refused(data).startswith("has colour mode LAB, which is not supported")


def _mutants(n: int) -> list[bytes]:
    """Damaged copies of valid images in every accepted format: bytes flipped, cut, spliced."""
    rng = np.random.default_rng(7)
    seeds = [_encode(_rand(12, 10, 3), f) for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")]
    seeds += [_animated("GIF"), _animated("PNG"), _encode(_rand(9, 9), "PNG", optimize=True)]
    out = []
    for i in range(n):
        data = bytearray(seeds[i % len(seeds)])
        kind = i % 3
        if kind == 0:
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        elif kind == 1:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            at = int(rng.integers(0, len(data)))
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        out.append(bytes(data))
    return out


def test_no_byte_string_raises_anything_but_spec_error() -> None:
    """Broken headers, chunks and streams raise SyntaxError, struct.error, IndexError,
    ValueError, zlib.error, EOFError, ... inside Pillow: all become SpecError."""
    refused = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in _mutants(360):
            try:
                im = image_input(data, field="init_image", size=8, channels=3)
            except SpecError as e:
                assert e.field == "init_image" and e.message
                refused += 1
            else:
                assert isinstance(im, FittedInput)
    assert refused > 50  # the mutants do exercise the refusals
    # Pillow's warnings about damaged files are the client's business, not the server log's.
    assert [str(w.message) for w in caught] == []


# -- accepted and fitted ---------------------------------------------------------------------


def test_16_bit_grey_png_is_scaled_not_saturated() -> None:
    wide = np.array([[0, 257, 32768, 65535]], np.uint16)
    data = _encode(wide)
    assert open_image(data, "init_image").mode.startswith("I;16")
    out = _pixels(image_input(data, field="init_image", size=4, channels=1).png)
    assert out[1].tolist() == [0, 1, 128, 255]  # the 4×1 row, padded to 4×4 at row 1
    rgb = _pixels(image_input(data, field="init_image", size=4, channels=3).png)
    assert rgb[1, :, 0].tolist() == rgb[1, :, 2].tolist() == [0, 1, 128, 255]


def test_16_bit_scaling_rounds_every_value() -> None:
    wide = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = np.asarray(fit_image(Image.fromarray(wide), size=256, channels=1)).astype(np.int64)
    assert np.array_equal(out, np.rint(wide / 257.0).astype(np.int64))


def test_32_bit_integer_and_float_grey_are_scaled() -> None:
    """Integers beyond 16 bits: the 32-bit range; floats in [0, 1]: × 255."""
    ints = np.array([[0, 2**30, 2**31 - 1, 70000]], np.int32)
    out = _pixels(image_input(_encode(ints, "TIFF"), field="init_image", size=4, channels=1).png)
    assert out[1].tolist() == [0, 128, 255, 0]
    floats = np.array([[0.0, 0.5, 1.0, 0.25]], np.float32)
    out = _pixels(image_input(_encode(floats, "TIFF"), field="init_image", size=4,
                              channels=1).png)
    assert out[1].tolist() == [0, 128, 255, 64]


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    data = _encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=95)  # cyan
    out = _pixels(image_input(data, field="init_image", size=8, channels=3).png)
    assert np.abs(out.astype(int) - [0, 255, 255]).max() <= 3


def _palette_with_transparency() -> bytes:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # 0: red (transparent), 1: green
    im.paste(1, (2, 0, 4, 4))
    return _encode(im, transparency=0)


def test_palette_png_with_transparency_is_composited_over_black() -> None:
    data = _palette_with_transparency()
    assert open_image(data, "init_image").mode == "P"
    out = _pixels(image_input(data, field="init_image", size=4, channels=3).png)
    assert out[:, :2].reshape(-1, 3).tolist() == [[0, 0, 0]] * 8      # transparent red → black
    assert out[:, 2:].reshape(-1, 3).tolist() == [[0, 255, 0]] * 8    # opaque green stays


def test_rgba_is_composited_over_black() -> None:
    rgba = np.zeros((2, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [0, 128, 255, 64]
    out = _pixels(image_input(_encode(rgba), field="init_image", size=4, channels=3).png)
    want = np.rint(200 * np.array([0, 128, 255, 64]) / 255)
    assert np.abs(out[1, :, 0].astype(int) - want).max() <= 1
    grey = _pixels(image_input(_encode(rgba), field="init_image", size=4, channels=1).png)
    assert np.array_equal(grey[1], out[1, :, 0])


def test_grey_with_alpha_is_composited_over_black() -> None:
    la = Image.fromarray(np.dstack([np.full((4, 4), 240, np.uint8),
                                    np.full((4, 4), 0, np.uint8)]), "LA")
    out = _pixels(image_input(_encode(la), field="init_image", size=4, channels=1).png)
    assert int(out.max()) == 0


def test_training_drops_alpha_instead() -> None:
    """training/data.py fits with alpha="drop": what its data sets have always had."""
    with Image.open(io.BytesIO(_palette_with_transparency())) as im:
        out = np.asarray(fit_image(im, size=4, channels=3, alpha="drop"))
    assert out[0, 0].tolist() == [255, 0, 0]


def _oriented_jpeg(orientation: int) -> bytes:
    """16 wide × 8 high as stored: left half white, right half black."""
    stored = np.zeros((8, 16), np.uint8)
    stored[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied() -> None:
    """Orientation 6: display rotated 90° clockwise, so the stored left half (white) is the
    top half, and the image is 8 wide × 16 high."""
    fitted = image_input(_oriented_jpeg(6), field="init_image", size=16, channels=1)
    assert fitted.source_size == (8, 16)
    out = _pixels(fitted.png).astype(int)
    assert out.shape == (16, 16)
    assert (out[:6, 5:11] > 230).all() and (out[10:, 5:11] < 25).all(), out
    assert (out[:, :4] == 0).all() and (out[:, 12:] == 0).all()  # padded left and right
    turned = _pixels(image_input(_oriented_jpeg(8), field="init_image", size=16,
                                 channels=1).png).astype(int)
    assert (turned[10:, 5:11] > 230).all()  # 8: counter-clockwise, white at the bottom


def test_non_square_larger_image_is_resized_and_centre_cropped() -> None:
    """A 32×16 horizontal ramp, shrunk by 2 to 16×8, keeps its middle 8 columns."""
    ramp = np.tile((np.arange(32) * 8).astype(np.uint8), (16, 1))
    fitted = image_input(_encode(ramp), field="init_image", size=8, channels=1)
    assert fitted.source_size == (32, 16)
    out = _pixels(fitted.png).astype(int)
    want = np.tile([16 * j + 68 for j in range(8)], (8, 1))
    assert np.abs(out - want).max() <= 3, out


def test_smaller_image_is_padded_in_the_centre() -> None:
    arr = RNG.integers(1, 256, (5, 6, 3), dtype=np.uint8)
    out = _pixels(image_input(_encode(arr), field="init_image", size=8, channels=3).png)
    top, left = 1, 1
    assert np.array_equal(out[top:top + 5, left:left + 6], arr)
    out[top:top + 5, left:left + 6] = 0
    assert int(out.sum()) == 0


def test_long_thin_image_is_fitted_without_a_huge_intermediate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1×3000 strip scaled up to 64 wide would be 64×192000 before the crop: only the
    kept square is resampled, with the same result."""
    strip = _rand(3000, 1)
    scale = 64 / 1
    nh = round(3000 * scale)
    top = (nh - 64) // 2
    want = np.asarray(Image.fromarray(strip).resize((64, nh), Image.Resampling.BICUBIC)
                      .crop((0, top, 64, top + 64))).astype(int)
    sizes: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def recorded(self: Image.Image, size: tuple[int, int], *args: object,
                 **kwargs: object) -> Image.Image:
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    out = _pixels(image_input(_encode(strip), field="init_image", size=64, channels=1).png)
    assert sizes == [(64, 64)]
    assert np.abs(out.astype(int) - want).max() <= 1


def test_grey_to_rgb_and_rgb_to_grey() -> None:
    grey = _rand(8, 8)
    rgb = _pixels(image_input(_encode(grey), field="init_image", size=8, channels=3).png)
    assert all(np.array_equal(rgb[..., c], grey) for c in range(3))
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    out = _pixels(image_input(_encode(colours), field="init_image", size=4, channels=1).png)
    assert out[1].tolist() == [76, 150, 29, 255]  # ITU-R 601 luma, as training uses


def test_canonical_png_is_bare_and_deterministic() -> None:
    """Equal pixels → equal bytes and digest: no ICC profile, text or EXIF carried over."""
    arr = _rand(8, 8, 3)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "from a phone")
    plain = image_input(_encode(arr), field="init_image", size=8, channels=3)
    tagged = image_input(_encode(arr, pnginfo=info, icc_profile=b"\0" * 128, dpi=(300, 300)),
                         field="init_image", size=8, channels=3)
    assert plain == tagged
    assert plain.digest == input_digest(plain.png) == tagged.digest
    with Image.open(io.BytesIO(plain.png)) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (8, 8)
        assert not set(im.info) & {"icc_profile", "Comment", "exif", "dpi"}
    assert np.array_equal(_pixels(plain.png), arr)


def test_input_digest() -> None:
    assert input_digest(b"") == \
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_accepted_format(fmt: str) -> None:
    fitted = image_input(_encode(_rand(12, 10, 3), fmt), field="init_image", size=8, channels=3)
    assert fitted.source_size == (10, 12)
    assert decode_canonical(fitted.png, size=8, channels=3).shape == (8, 8, 3)


# -- masks ----------------------------------------------------------------------------------


def _mask(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "L"
        return np.array(im)


def test_mask_alpha_zero_marks_the_region_to_generate() -> None:
    rgba = np.full((4, 4, 4), 255, np.uint8)  # opaque white: "keep" (alpha rules)
    rgba[:2, :, 3] = 0                        # transparent top half: generate
    rgba[2, 0, 3] = 128                       # half transparent: keep
    out = _mask(mask_input(_encode(rgba), like=(4, 4), size=4))
    assert out[:2].tolist() == [[255] * 4] * 2
    assert int(out[2:].max()) == 0


ALPHAS = [0, 1, 64, 127, 128, 254, 255]    # a row each: anti-aliased edges and the ends


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_mask_only_alpha_zero_generates_at_anti_aliased_edges(mode: str) -> None:
    """Only alpha exactly 0 means "generate"; every other alpha (1 and 254 included) keeps.
    Colours are chosen against the alpha: transparent pixels black, the others white, so a
    mask read by threshold or by luminance instead would mark other pixels."""
    n = len(ALPHAS)
    rgba = np.zeros((n, n, 4), np.uint8)
    for row, a in enumerate(ALPHAS):
        rgba[row, :, :3] = 0 if a == 0 else 255
        rgba[row, :, 3] = a
    im = Image.fromarray(rgba, "RGBA").convert(mode)
    out = _mask(mask_input(_encode(im), like=(n, n), size=n))
    generated = sorted({a for row, a in enumerate(ALPHAS) if out[row].min() == 255})
    kept = sorted({a for row, a in enumerate(ALPHAS) if out[row].max() == 0})
    assert generated == [0] and kept == ALPHAS[1:]


@pytest.mark.parametrize("alphas", [(254, 255), (1, 255), (64,)], ids=str)
def test_mask_with_transparency_but_no_alpha_zero_generates_nothing(
        alphas: tuple[int, ...]) -> None:
    """A partly transparent mask without an alpha-0 pixel marks nothing, even if it is white
    (it is read by alpha, not by luminance, as soon as any alpha is below 255)."""
    rgba = np.full((4, 4, 4), 255, np.uint8)
    for i, a in enumerate(alphas):
        rgba[i::len(alphas), :, 3] = a
    out = _mask(mask_input(_encode(rgba), like=(4, 4), size=4))
    assert int(out.max()) == 0


def test_mask_of_palette_with_transparency_uses_alpha() -> None:
    out = _mask(mask_input(_palette_with_transparency(), like=(4, 4), size=4))
    assert out[:, :2].tolist() == [[255, 255]] * 4 and int(out[:, 2:].max()) == 0


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_mask_white_marks_the_region_to_generate(mode: str) -> None:
    """Without transparency (an opaque RGBA too) luminance >= 128 means generate."""
    grey = np.array([[0, 127, 128, 255]] * 4, np.uint8)
    im = Image.fromarray(grey).convert(mode)
    out = _mask(mask_input(_encode(im), like=(4, 4), size=4))
    assert out.tolist() == [[0, 0, 255, 255]] * 4


def test_mask_of_another_size_is_refused() -> None:
    with pytest.raises(SpecError) as err:
        mask_input(_encode(_rand(4, 6)), like=(4, 4), size=4)
    assert err.value.field == "mask"
    assert err.value.message == "is 6×4 but init_image is 4×4; the mask must have the same size"


def test_mask_size_is_compared_after_exif_orientation() -> None:
    fitted = image_input(_oriented_jpeg(6), field="init_image", size=16, channels=1)
    out = _mask(mask_input(_oriented_jpeg(6), like=fitted.source_size, size=16))
    assert out[:6, 5:11].min() == 255 and out[10:].max() == 0


def test_mask_is_fitted_with_the_images_geometry_and_stays_binary() -> None:
    """A 40×20 mask marking columns 15..24, shrunk to 16×8 and cropped to columns 4..11:
    the band lands where the image's middle lands, with no grey edge."""
    marks = np.zeros((20, 40), np.uint8)
    marks[:, 15:25] = 255
    image = image_input(_encode(marks), field="init_image", size=8, channels=1)
    out = _mask(mask_input(_encode(marks), like=image.source_size, size=8))
    assert set(np.unique(out).tolist()) <= {0, 255}
    assert out.tolist() == [[0, 0, 255, 255, 255, 255, 0, 0]] * 8
    assert np.array_equal(out == 255, _pixels(image.png) >= 128)


def test_small_mask_is_padded_with_keep() -> None:
    out = _mask(mask_input(_encode(np.full((4, 4), 255, np.uint8)), like=(4, 4), size=8))
    assert int(out[2:6, 2:6].min()) == 255 and int(out.sum()) == 255 * 16


def test_mask_that_marks_nothing_is_allowed() -> None:
    out = _mask(mask_input(_encode(np.zeros((4, 4), np.uint8)), like=(4, 4), size=4))
    assert int(out.max()) == 0


def test_hostile_mask_names_its_field() -> None:
    with pytest.raises(SpecError) as err:
        mask_input(_animated("GIF"), like=(8, 8), size=8)
    assert err.value.field == "mask"


# -- the worker's decode ---------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_canonical_round_trip(channels: int) -> None:
    arr = _rand(8, 8, 3) if channels == 3 else _rand(8, 8)
    fitted = image_input(_encode(arr), field="init_image", size=8, channels=channels)
    out = decode_canonical(fitted.png, size=8, channels=channels)
    assert out.dtype == np.uint8 and out.shape == (8, 8, channels) and out.flags.writeable
    assert np.array_equal(out.reshape(arr.shape), arr)


@pytest.mark.parametrize(("png", "match"), [
    (_encode(np.zeros((8, 8), np.uint8)), "stored input is L 8×8, expected RGB 8×8"),
    (_encode(np.zeros((4, 4, 3), np.uint8)), "expected RGB 8×8"),
    (_encode(np.zeros((8, 8, 4), np.uint8)), "RGBA"),
    (_encode(np.zeros((8, 8, 3), np.uint8), "JPEG"), "not a readable PNG"),
    (b"not a png", "not a readable PNG"),
])
def test_decode_canonical_refuses_anything_else(png: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_canonical(png, size=8, channels=3)


# -- base64 transport -----------------------------------------------------------------------


def test_base64_plain_and_data_url() -> None:
    data = _encode(_rand(4, 4, 3))
    text = base64.b64encode(data).decode()
    assert decode_base64(text, "init_image") == data
    assert decode_base64(f"data:image/png;base64,{text}", "init_image") == data
    assert decode_base64(f"DATA:image/jpeg;name=x.jpg;base64,{text}\n", "mask") == data


def test_base64_as_common_encoders_write_it() -> None:
    """MIME line breaks (`base64` CLI), URL-safe alphabet, padding left off."""
    data = bytes(range(256)) * 3 + b"\xfb\xff"
    wrapped = base64.encodebytes(data).decode()
    assert "\n" in wrapped
    assert decode_base64(wrapped, "init_image") == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode().rstrip("="), "x") == data


@pytest.mark.parametrize(("text", "message"), [
    ("not base64!", "is not valid base64"),
    ("QUJD=QUJD", "is not valid base64"),
    ("QUJDR", "is not valid base64"),
    ("QUJDRA\u00e9=", "is not valid base64"),
    ("", "is empty"),
    ("data:image/png;base64,", "is empty"),
    ("data:image/png,iVBORw0KGgo=", "a data URL must be base64-encoded"),
    ("data:image/png;base64", "is not a valid data URL"),
])
def test_bad_base64_is_refused(text: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        decode_base64(text, "interpolate_to")
    assert err.value.field == "interpolate_to"
    assert err.value.message.startswith(message)


def test_base64_text_over_the_limit_is_refused_before_decoding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded")

    text = "A" * (MAX_BASE64_CHARS + 1)
    monkeypatch.setattr(inputs.binascii, "a2b_base64", never)
    with pytest.raises(SpecError, match="larger than the 4 MiB limit"):
        decode_base64(text, "init_image")


def test_base64_limit_admits_the_largest_image_even_line_wrapped() -> None:
    data = b"\0" * MAX_INPUT_BYTES
    assert decode_base64("data:image/png;base64," + base64.encodebytes(data).decode()
                         .replace("\n", "\r\n"), "init_image") == data
