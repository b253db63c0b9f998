"""Input images of image-conditioned generation: decoded safely, fitted to the model.

The API process runs everything here on bytes a client sent, so this module is torch-free
and NumPy-free at import (the API image has neither; only `decode_canonical`, which the
worker calls, imports NumPy). Every way an upload can be hostile — not an image, truncated,
a decompression bomb, animated, too large — ends as a `SpecError` naming the request field,
and no other exception escapes for any byte string.

`fit_image` is the one fitting function: `training/data.py` fits its data sets with it, so
a served model sees its inputs exactly as it saw its training images.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, NamedTuple, cast

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .spec import SpecError

if TYPE_CHECKING:  # the worker's side only: the API image has no NumPy
    import numpy as np

# ---------------------------------------------------------------------------------------
# Limits: one definition for the API and the worker.

MAX_INPUT_BYTES = 4 * 1024 * 1024       # one image, decoded from base64 or a form part
MAX_INPUT_PIXELS = 4096 * 4096          # width × height, read from the header before decoding
# Pillow's format names. MPO (a JPEG with extra pictures: phone photos carry a preview or
# a depth map) is read as the JPEG it starts with.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_OPENED_FORMATS = frozenset((*INPUT_FORMATS, "MPO"))
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"
# Base64 of MAX_INPUT_BYTES, with room for MIME line breaks (76 chars + CRLF) and a data-URL
# prefix: longer text is refused before a byte of it is decoded.
MAX_BASE64_CHARS = (MAX_INPUT_BYTES + 2) // 3 * 4 * 78 // 76 + 256

_WIDE_GREY = frozenset(("I", "I;16", "I;16L", "I;16B", "I;16N", "F"))
_ALPHA_MODES = frozenset(("RGBA", "RGBa", "LA", "PA"))
# Colour modes Pillow converts to L/RGB itself; anything else (LAB, HSV, ...) is refused.
_DIRECT_MODES = frozenset(("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"))
_SUPPORTED_MODES = _WIDE_GREY | _ALPHA_MODES | _DIRECT_MODES
_DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


class FittedInput(NamedTuple):
    """An input fitted to the model, and the size it had (after EXIF orientation).

    `source_size` is what a mask must match (`mask_input(..., like=...)`); `png` is the
    canonical PNG that is stored, served back and digested.
    """

    png: bytes
    source_size: tuple[int, int]

    @property
    def digest(self) -> str:
        return input_digest(self.png)


# ---------------------------------------------------------------------------------------
# Transport: base64 text to bytes.


def decode_base64(text: str, field: str) -> bytes:
    """Plain base64 or a `data:...;base64,` URL → bytes; bounded before decoding.

    Whitespace (MIME line breaks) is ignored, and the URL-safe alphabet and missing `=`
    padding are accepted: what common encoders produce is taken as they produce it.
    """
    if not isinstance(text, str):
        raise SpecError(field, "must be a base64 string")
    if len(text) > MAX_BASE64_CHARS:
        raise SpecError(field, f"is larger than the {_mib(MAX_INPUT_BYTES)} limit for an image")
    body = text.strip()
    url = _DATA_URL.match(body)
    if url is not None:
        if ";base64" not in url.group(2).lower():
            raise SpecError(field, "a data URL must be base64-encoded (data:image/png;base64,...)")
        body = body[url.end():]
    elif body[:5].lower() == "data:":
        raise SpecError(field, "is not a valid data URL (expected data:image/png;base64,...)")
    body = "".join(body.split()).replace("-", "+").replace("_", "/")
    if not body:
        raise SpecError(field, "is empty")
    if len(body) % 4:
        body += "=" * (-len(body) % 4)
    try:  # strict: no padding inside, nothing after it, nothing outside the alphabet
        return binascii.a2b_base64(body.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SpecError(field, "is not valid base64 (send the image file base64-encoded, "
                        "optionally as a data:image/...;base64, URL)") from None


def input_digest(png: bytes) -> str:
    """The stored spec's reference to an input: `sha256:<hex>` of its canonical PNG."""
    return "sha256:" + hashlib.sha256(png).hexdigest()


# ---------------------------------------------------------------------------------------
# Decoding: bytes to one loaded, upright image, or a SpecError.


def open_image(data: bytes, field: str) -> Image.Image:
    """Decode an uploaded image: fully loaded, EXIF orientation applied, single frame.

    The size in the header is checked before any pixel is decoded, so a small file that
    declares a huge image (a decompression bomb) costs nothing.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a server fault, not the input's: never a 422
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process; "
                           "truncated uploads would be accepted")
    if not data:
        raise SpecError(field, "is empty")
    if len(data) > MAX_INPUT_BYTES:
        raise SpecError(field, f"is {len(data)} bytes; the limit is {_mib(MAX_INPUT_BYTES)}")
    try:
        return _open(data, field)
    except SpecError:
        raise
    except Image.DecompressionBombError:
        raise SpecError(field, _too_many_pixels(None)) from None
    except MemoryError:
        raise SpecError(field, "is too large to decode") from None
    except Exception as e:  # the boundary: any decoder failure is the input's
        raise SpecError(field, _decode_failure(e)) from None


def _open(data: bytes, field: str) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow's warnings about damaged files ("Tag data larger than file") are about the
        # client's bytes: nothing for the server's log. Its bomb warning (between its own
        # limit and twice it) is a refusal.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
        except UnidentifiedImageError:
            raise SpecError(field, f"is not a {_FORMAT_NAMES} image") from None
        except Image.DecompressionBombWarning:
            raise SpecError(field, _too_many_pixels(None)) from None
        with im:
            return _checked(im, field)


def _checked(im: Image.Image, field: str) -> Image.Image:
    if im.format not in _OPENED_FORMATS:  # a plugin named by `formats` may adopt others
        raise SpecError(field, f"is a {im.format} image; send {_FORMAT_NAMES}")
    w, h = im.size
    if w <= 0 or h <= 0:
        raise SpecError(field, f"has no pixels ({w}×{h})")
    if w * h > MAX_INPUT_PIXELS:
        raise SpecError(field, _too_many_pixels((w, h)))
    if im.format != "MPO" and getattr(im, "is_animated", False):
        frames = getattr(im, "n_frames", 2)
        raise SpecError(field, f"has {frames} frames (an animated or multi-page "
                        f"{im.format}); send a single still image")
    if im.mode not in _SUPPORTED_MODES:
        raise SpecError(field, f"has colour mode {im.mode}, which is not supported; send "
                        "a greyscale, RGB, RGBA, palette or CMYK image")
    im.load()
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception:  # unreadable EXIF: use the pixels as stored
        upright = im.copy()
    return upright


def _too_many_pixels(size: tuple[int, int] | None) -> str:
    limit = f"the limit is {MAX_INPUT_PIXELS:,} pixels (4096×4096)"
    return f"is {size[0]}×{size[1]} pixels; {limit}" if size else f"has too many pixels; {limit}"


def _decode_failure(e: Exception) -> str:
    text = str(e)
    if "truncated" in text.lower() or isinstance(e, EOFError):
        return "is truncated: the image data ends early (an incomplete file?)"
    detail = text.splitlines()[0][:120] if text else type(e).__name__
    return f"could not be decoded as an image ({detail})"


# ---------------------------------------------------------------------------------------
# Fitting: channels, then size. The one definition, shared with training/data.py.

Alpha = Literal["black", "drop"]


def fit_image(im: Image.Image, *, size: int, channels: int,
              alpha: Alpha = "black") -> Image.Image:
    """`im` as an L (channels=1) or RGB (3) image of size×size, the way training fits data.

    Channels first: 16- and 32-bit grey is scaled to 8 bits (not saturated), every other
    mode converted by Pillow, transparency composited over black (`alpha="drop"`: ignored,
    which is what training has always done). Then size: an image no larger than the model
    is padded in the centre with black; a larger one is resized (bicubic) so its short
    side fits and centre-cropped.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    im = _to_channels(im, channels, alpha)
    return _fit_size(im, size, Image.Resampling.BICUBIC)


def _to_channels(im: Image.Image, channels: int, alpha: Alpha) -> Image.Image:
    target = "L" if channels == 1 else "RGB"
    if im.mode in _WIDE_GREY:
        im = _wide_to_8bit(im)
    elif alpha == "black" and _has_alpha(im):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        if im.mode == target:
            return im
    return im.convert(target)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or (
        "transparency" in im.info and im.mode in ("P", "L", "RGB", "1"))


def _wide_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey → L by its range, rounded (Pillow would clip).

    Integer values that fit in 16 bits (how Pillow holds 16-bit PNG/TIFF/PGM data) are
    read as 16-bit: 65535 → 255. Larger ones as 32-bit: 2**31 - 1 → 255. Floats in
    [0, 1] are scaled by 255; other floats are clipped to 0..255.
    """
    if im.mode == "F":
        lo, hi = cast("tuple[float, float]", im.getextrema())   # one band
        if lo >= 0.0 and hi <= 1.0:
            im = im.point(lambda v: v * 255.0 + 0.5)
        return Image.frombytes("L", im.size, im.convert("L").tobytes())
    wide = im if im.mode == "I" else im.convert("I")
    lo, hi = cast("tuple[int, int]", wide.getextrema())        # one band
    full = 65535 if lo >= 0 and hi <= 65535 else 2**31 - 1
    scaled = wide.point(lambda v: v * (255.0 / full) + 0.5)  # then truncated: rounds >= 0
    return Image.frombytes("L", im.size, scaled.convert("L").tobytes())


def _fit_size(im: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    w, h = im.size
    if w > size or h > size:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        if nw * nh <= 4 * max(w * h, size * size):
            im = im.resize((nw, nh), resample, reducing_gap=2.0)
            return im.crop((left, top, left + size, top + size))
        # A long thin image scaled up: resizing all of it would need nw × nh pixels (a
        # 1×65536 strip at 64: 268M), so resample only the square that is kept.
        box = (left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh)
        return im.resize((size, size), resample, box=box, reducing_gap=2.0)
    if (w, h) != (size, size):
        canvas = Image.new(im.mode, (size, size))
        canvas.paste(im, ((size - w) // 2, (size - h) // 2))
        return canvas
    return im


# ---------------------------------------------------------------------------------------
# The API's entry points: upload bytes → canonical PNG.


def _canonical_png(im: Image.Image) -> bytes:
    """PNG of the pixels alone: no ICC profile, EXIF or text, so equal pixels → equal bytes."""
    bare = Image.frombytes(im.mode, im.size, im.tobytes())
    buf = io.BytesIO()
    bare.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def image_input(data: bytes, *, field: str, size: int, channels: int) -> FittedInput:
    """Upload bytes → the fitted input as canonical PNG (L or RGB, size×size).

    Also returns the image's own size (after EXIF orientation), which its mask must have.
    """
    if channels not in (1, 3) or size < 1:  # the caller's error, not the input's
        raise ValueError(f"size {size}, channels {channels}: expected size >= 1, channels 1 or 3")
    im = open_image(data, field)
    try:
        fitted = fit_image(im, size=size, channels=channels)
        return FittedInput(_canonical_png(fitted), im.size)
    except MemoryError:
        raise SpecError(field, "is too large to convert") from None
    except Exception as e:  # the boundary: nothing but SpecError escapes
        raise SpecError(field, f"could not be converted ({type(e).__name__}: {e})") from None


def mask_input(data: bytes, *, like: tuple[int, int], size: int, field: str = "mask") -> bytes:
    """Upload bytes → the fitted mask: an L PNG of size×size, 255 = generate, 0 = keep.

    An image with transparency (any alpha < 255) marks with alpha 0 the region to
    generate (OpenAI's convention); any other image marks it with luminance >= 128 (white).
    The mask must have the init image's size (`like`, after EXIF orientation); it is fitted
    with the same geometry, sampled NEAREST so it stays binary. Padding is "keep".
    A mask that marks nothing (or everything) is allowed: it is well defined (the init
    image back; plain img2img) and can be what a crop leaves of an edge region.
    """
    im = open_image(data, field)
    if im.size != tuple(like):
        raise SpecError(field, f"is {im.size[0]}×{im.size[1]} but init_image is "
                        f"{like[0]}×{like[1]}; the mask must have the same size")
    try:
        binary = _mask_bits(im)
        fitted = _fit_size(binary, size, Image.Resampling.NEAREST)
        return _canonical_png(fitted)
    except MemoryError:
        raise SpecError(field, "is too large to convert") from None
    except Exception as e:  # the boundary: nothing but SpecError escapes
        raise SpecError(field, f"could not be converted ({type(e).__name__}: {e})") from None


def fit_inputs(images: Mapping[str, bytes], *, size: int, channels: int) -> dict[str, bytes]:
    """A request's input images (field → upload bytes: `init_image`, and `mask` or
    `interpolate_to`) fitted to a model of `size` and `channels`, as PNGs; SpecError naming
    the field at fault. The API and `ddpm sample` both fit through here."""
    out: dict[str, bytes] = {}
    out["init_image"], like = image_input(images["init_image"], field="init_image",
                                          size=size, channels=channels)
    if "mask" in images:
        out["mask"] = mask_input(images["mask"], like=like, size=size)
    if "interpolate_to" in images:
        out["interpolate_to"], _ = image_input(images["interpolate_to"],
                                               field="interpolate_to", size=size,
                                               channels=channels)
    return out


def _mask_bits(im: Image.Image) -> Image.Image:
    """255 where the mask says generate, else 0 (before fitting)."""
    if _has_alpha(im):
        a = im.convert("RGBA").getchannel("A")
        if cast("tuple[int, int]", a.getextrema())[0] < 255:
            return a.point(lambda v: 255 if v == 0 else 0)
    grey = _to_channels(im, 1, "drop")
    return grey.point(lambda v: 255 if v >= 128 else 0)


# ---------------------------------------------------------------------------------------
# The worker's side: the stored canonical PNG back to pixels.


def decode_canonical(png: bytes, *, size: int, channels: int) -> np.ndarray:
    """A stored fitted input → uint8 [size, size, channels]; ValueError unless it is one."""
    import numpy as np

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as im:
            if im.mode != mode or im.size != (size, size):
                raise ValueError(f"stored input is {im.mode} {im.size[0]}×{im.size[1]}, "
                                 f"expected {mode} {size}×{size}")
            im.load()
            arr = np.array(im, dtype=np.uint8)  # a writable copy
    except ValueError:
        raise
    except Exception as e:  # a stored input that is not ours
        raise ValueError(f"stored input is not a readable PNG ({e})") from None
    return arr.reshape(size, size, channels)
