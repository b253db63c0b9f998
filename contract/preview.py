"""How a job's snapshot frames ("previews") are made, and what they cost in bytes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .limits import SnapshotFormat

# Snapshot frames ("previews") cost what they are worth: lossless at the image's own size
# for small images, downscaled lossy frames for large ones (a 256x256 RGB frame is 196 KB of
# pixels, ~175 KB as PNG and ~8 KB as a 128x128 JPEG; BENCHMARKS.md). Final images are
# always lossless PNG.
LOSSLESS_PREVIEW_MAX = 64       # images up to this side get PNG frames at full size
DEFAULT_PREVIEW_SIZE = 128      # larger ones: frames this big, lossy
DEFAULT_PREVIEW_FORMAT: SnapshotFormat = "jpeg"   # 10x faster to encode than WebP, as small
DEFAULT_PREVIEW_QUALITY = 75
# Bytes per pixel of a lossy frame by quality, measured on uniform noise (the costliest
# content: x_t frames are mostly noise) at 64x64, the larger of grey and RGB; interpolated.
# PNG is estimated at its raw pixels plus 4 %.
LOSSY_BYTES_PER_PIXEL: dict[str, tuple[tuple[int, float], ...]] = {
    "jpeg": ((10, 0.27), (25, 0.39), (50, 0.57), (75, 0.75), (90, 1.05), (100, 2.13)),
    "webp": ((10, 0.36), (25, 0.48), (50, 0.60), (75, 0.72), (90, 0.96), (100, 2.67)),
}
FRAME_HEADER_BYTES = 1024       # a frame's container overhead (JPEG tables, PNG chunks)


@dataclass(frozen=True)
class Preview:
    """How a job's snapshot frames are made: side in pixels, format, quality (lossy only)."""

    size: int
    format: SnapshotFormat
    quality: int = 0

    @classmethod
    def default(cls, image_size: int) -> Preview:
        if image_size <= LOSSLESS_PREVIEW_MAX:
            return cls(image_size, "png")
        return cls(min(image_size, DEFAULT_PREVIEW_SIZE), DEFAULT_PREVIEW_FORMAT,
                   DEFAULT_PREVIEW_QUALITY)

    @property
    def media_type(self) -> str:
        return f"image/{self.format}"

    def frame_bytes(self, channels: int) -> int:
        """An upper estimate of one encoded frame's bytes (noise is the worst case)."""
        pixels = self.size * self.size
        if self.format == "png":
            return int(pixels * channels * 1.04) + FRAME_HEADER_BYTES
        points = LOSSY_BYTES_PER_PIXEL[self.format]
        q = min(max(self.quality, points[0][0]), points[-1][0])
        for (q0, b0), (q1, b1) in itertools.pairwise(points):
            if q <= q1:
                return int(pixels * (b0 + (b1 - b0) * (q - q0) / (q1 - q0))) \
                    + FRAME_HEADER_BYTES
        raise AssertionError("unreachable")
