"""Images as a request asked for them: re-encoded to its `output_format` only when they
are in another (Pillow), as OpenAI's JSON answer or as its SSE events."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from contract.spec import ModelInfo

from ..errors import ApiError
from .mapping import model_size
from .models import Common

# What responses and events report for OpenAI's `background` and `quality`: the images
# are opaque, and `quality` does not choose the work (`steps` does).
BACKGROUND = "opaque"
QUALITY = "auto"


def usage(steps: int) -> dict[str, Any]:
    return {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": steps, "total_tokens": steps}


def encode(image: bytes, output_format: str, compression: int | None,
           source_format: str = "png") -> bytes:
    """An image (a stored PNG, or a snapshot frame in `source_format`: png, webp or jpeg)
    in the asked format (Pillow; `compression` is the quality of jpeg and webp). An image
    already in that format is passed on as it is."""
    if output_format == source_format:
        return image
    from PIL import Image

    im = Image.open(io.BytesIO(image))
    im.load()
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    if output_format == "webp" and im.mode == "L":
        im = im.convert("RGB")
    buf = io.BytesIO()
    if output_format == "png":
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG" if output_format == "jpeg" else "WEBP",
                quality=100 if compression is None else compression)
    return buf.getvalue()


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Output:
    """How one request wants its images back."""

    def __init__(self, kind: str, info: ModelInfo, body: Common, base_url: str) -> None:
        self.kind = kind                                   # image_generation / image_edit
        self.size = model_size(info)
        self.response_format = body.response_format or "b64_json"
        self.format: str = getattr(body, "output_format", None) or "png"
        self.compression: int | None = getattr(body, "output_compression", None)
        self.base_url = base_url.rstrip("/")
        if self.response_format == "url" and self.format != "png":
            raise ApiError(400, "invalid_request", "url images are PNG: ask for b64_json "
                           f"to get {self.format}", field="output_format")

    def needs_encoding(self, source_format: str) -> bool:
        """Whether an image in `source_format` must be re-encoded (Pillow's work: not for
        the event loop)."""
        return source_format != self.format

    def b64(self, image: bytes, source_format: str = "png") -> str:
        """`image` in the asked format, as base64: encoded once, re-encoded only when its
        format is another."""
        return base64.b64encode(encode(image, self.format, self.compression,
                                       source_format)).decode()

    def url(self, job_id: str, index: int) -> str:
        return f"{self.base_url}/v1/generations/{job_id}/images/{index}"

    def body(self, job_id: str, pngs: list[bytes], steps: int,
             urls: list[str | None] | None = None) -> dict[str, Any]:
        """The JSON answer; `urls`: presigned URLs of images kept in object storage
        (DDPM_RESULTS_URL), given for `url` answers instead of the API's own."""
        data = ([{"url": (urls[i] if urls and urls[i] else self.url(job_id, i))}
                 for i in range(len(pngs))]
                if self.response_format == "url" else [{"b64_json": self.b64(p)} for p in pngs])
        return {"created": int(time.time()), "data": data, "background": BACKGROUND,
                "output_format": self.format, "size": self.size, "usage": usage(steps)}

    def event(self, kind: str, image: bytes, source_format: str = "png", **extra: Any
              ) -> bytes:
        """An SSE event of `image` (a final PNG, or a snapshot frame in `source_format`) in
        the requested `output_format`; `extra` adds or overrides fields (a partial image's
        `size` is its own: a preview can be smaller than the model's images)."""
        doc = {"type": f"{self.kind}.{kind}", "b64_json": self.b64(image, source_format),
               "background": BACKGROUND, "created_at": int(time.time()),
               "output_format": self.format, "quality": QUALITY, "size": self.size, **extra}
        return sse(doc["type"], doc)
