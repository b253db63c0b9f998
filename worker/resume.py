"""A job's resume state in the engine (`JobResume`), and its bytes (contract/resume.py).

`Engine.export(job)` gives a `JobResume` between two steps; `Engine.admit(..., resume=)`
continues from one: done images are not redone, running ones go on from their exact slot
state (`models.resume.SlotState`), the rest start fresh. `encode`/`decode` are the codec
between it and the value stored under `keys.resume_key(job)`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from contract.resume import ResumeRecord, ResumeStateError, RunningImage
from contract.resume import decode as decode_record
from contract.resume import encode as encode_record
from contract.spec import GenerationSpec, ModelInfo
from models.resume import SlotState

__all__ = ["JobResume", "ResumeStateError", "decode", "encode"]


@dataclass(frozen=True, eq=False)
class JobResume:
    """A job between two engine steps: each image done (its final image was emitted),
    running (its slot's exact state), or not started (neither)."""

    done: frozenset[int] = frozenset()
    running: Mapping[int, SlotState] = field(default_factory=dict)

    def steps_done(self, steps_per_image: int) -> int:
        """Network steps behind the job, summed over its images."""
        return len(self.done) * steps_per_image + sum(s.pos for s in self.running.values())

    def check(self, num_images: int) -> None:
        """ValueError unless done and running are distinct images of the job's
        `num_images`, with at least one image left to compute."""
        indices = [*self.done, *self.running]
        if len(set(indices)) != len(indices) or not all(0 <= i < num_images for i in indices):
            raise ValueError(f"resume: images {sorted(indices)} are not distinct images of "
                             f"{num_images}")
        if len(self.done) == num_images:
            raise ValueError("resume: every image is done; nothing is left to run")


def encode(state: JobResume, spec: GenerationSpec, info: ModelInfo) -> bytes:
    """The stored value of `state` for `spec` on the model `info`."""
    running = tuple(RunningImage(i, s.pos, _raw(s.x),
                                 None if s.x0_prev is None else _raw(s.x0_prev))
                    for i, s in sorted(state.running.items()))
    return encode_record(ResumeRecord(done=tuple(sorted(state.done)), running=running),
                         spec, info)


def decode(data: bytes, spec: GenerationSpec, info: ModelInfo) -> JobResume:
    """The state stored in `data`, host tensors; ResumeStateError (a ValueError) if it
    is not a state of this job on this model: the job then restarts from step 0."""
    record = decode_record(data, spec, info)
    shape = (info.in_channels, info.image_size, info.image_size)
    running = {r.index: SlotState(pos=r.pos, x=_tensor(r.x, shape),
                                  x0_prev=None if r.x0_prev is None
                                  else _tensor(r.x0_prev, shape))
               for r in record.running}
    state = JobResume(done=frozenset(record.done), running=running)
    try:
        state.check(spec.num_images)
    except ValueError as e:
        raise ResumeStateError(str(e)) from None
    return state


def _raw(t: Tensor) -> bytes:
    """Little-endian float32 bytes of `t` (exact: the batch keeps float32)."""
    if t.dtype != torch.float32:
        raise ValueError(f"resume state arrays are float32, got {t.dtype}")
    a = t.detach().to("cpu").contiguous().numpy()
    return (a if sys.byteorder == "little" else a.astype("<f4")).tobytes()


def _tensor(raw: bytes, shape: tuple[int, int, int]) -> Tensor:
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32)
                            .reshape(shape))
