"""Which steps of a job's images make snapshot frames, of what, at what size: the frame
plan, made once per job when a worker admits it (`Engine.admit`).

One rule (`snapshot_steps`) says where the frames fall; the engine emits by it, the writer
labels frames by the plan, and the API's admission counts frames by it
(`GenerationSpec.snapshot_frames`, the stream budget's estimate). Tests tie each of them to
it (tests/contract/test_events.py, tests/worker/test_engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .preview import Preview

if TYPE_CHECKING:
    from .spec import GenerationSpec


def snapshot_steps(steps_per_image: int, every: int) -> range:
    """The steps of an image after which it makes a snapshot frame: every `every`-th step
    (0: none), except its last, which makes the final image instead."""
    return range(every, steps_per_image, every) if every > 0 else range(0)


@dataclass(frozen=True)
class FramePlan:
    """A job's frames: each image's snapshot steps, their kind and preview, its final."""

    steps_per_image: int      # network steps of one image: its final frame's step
    every: int                # a snapshot every this many steps (0: none)
    kind: str                 # x0 (the denoised estimate) or xt (the noisy sample)
    preview: Preview          # the snapshots' size, format and quality

    @classmethod
    def of(cls, spec: GenerationSpec, image_size: int) -> FramePlan:
        """The plan of `spec` on a model of `image_size`-pixel images."""
        return cls(spec.steps_per_image, spec.snapshot_every, spec.snapshot_kind,
                   spec.preview(image_size))

    @property
    def snapshot_steps(self) -> range:
        return snapshot_steps(self.steps_per_image, self.every)

    @property
    def snapshots_per_image(self) -> int:
        return len(self.snapshot_steps)

    def snapshot_at(self, step: int) -> bool:
        """Whether an image makes a snapshot after `step` steps."""
        return step in self.snapshot_steps
