"""Two behaviours of the OpenAI-compatible Images API that only a fuzzer or lucky counts
held (issue 31, items 8 and 11), driven by the real `openai` SDK against the same live stack
as tests/app/test_openai_images.py (`ddpm worker` serving the shipped `mnist`, `ddpm api`):

- a stream's `partial_images` is a bound: never more previews per image than asked, also
  when the step count does not divide evenly (and exactly as many when the run is long
  enough to have them before its last step);
- an edit's RePaint resampling (`jump_length`, `jump_n_sample` in `extra_body`) reaches the
  job (its native view, the steps counted), and out-of-range values are a 400 naming them.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from app.openai.models import MAX_PARTIAL_IMAGES
from contract.limits import MAX_JUMP_LENGTH, MAX_JUMP_N_SAMPLE
from tests.app import test_openai_images as shared
from tests.app.test_openai_images import Stack, _png, auth, created, pixels

# The same module-scoped fixtures (a worker serving `mnist` and a keyed API), started once
# for this module.
stack, client = shared.stack, shared.client

# (steps, partial_images): no step count is a multiple of partial_images + 1 (the spacing is
# every ⌊steps / (partial_images + 1)⌋ steps); (6, 3) is one of partial_images, which a
# spacing of ⌊steps / partial_images⌋ gets wrong (2 previews). The last two have fewer steps
# than previews asked: one preview per step before the last.
UNEVEN = [(7, 3), (6, 3), (5, 2), (10, 3), (11, 2), (3, 1), (3, 3), (2, 3)]


@pytest.mark.parametrize(("steps", "partial"), UNEVEN, ids=lambda v: str(v))
def test_partial_images_never_exceed_the_count_asked(client: openai.OpenAI, steps: int,
                                                     partial: int) -> None:
    assert partial <= MAX_PARTIAL_IMAGES
    events = list(client.images.generate(prompt="3", n=2, stream=True, partial_images=partial,
                                         extra_body={"steps": steps, "seed": 5}))
    want = partial if steps > partial else steps - 1
    for index in (0, 1):
        evs: list[Any] = [ev for ev in events if ev.image_index == index]  # type: ignore[union-attr]
        kinds = [ev.type for ev in evs]
        assert kinds == ["image_generation.partial_image"] * want + \
            ["image_generation.completed"], (steps, partial, kinds)
        assert [ev.partial_image_index for ev in evs[:-1]] == list(range(want))
        assert evs[-1].usage.output_tokens == steps
    assert len(events) == 2 * (want + 1)


# -- edits with RePaint resampling ------------------------------------------------------


def _inputs() -> tuple[bytes, bytes, np.ndarray]:
    """A 28×28 grey image (a bright square), and an RGBA mask whose lower half is
    transparent (generate); the kept rows' pixels, as the fitted input has them."""
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 6:22] = 230
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[:14, :, 3] = 255
    return _png(Image.fromarray(image, "L")), _png(Image.fromarray(rgba, "RGBA")), image[:14]


# 12 steps, jumps of 3 starting every 3 steps below the top: at steps 0, 3 and 6 (diffusers'
# range(0, 12 − 3, 3)); jump_n_sample 2 passes over each once more, 3 steps up and 3 down:
# 12 + 3 · 2·3 = 30 network steps per image. Swapped (jump_length 2, jump_n_sample 3): jumps
# at 0, 2, 4, 6, 8, each passed twice more: 12 + 5 · 2 · 2·2 = 52.
STEPS, JUMP_LENGTH, JUMP_N_SAMPLE, RESAMPLED_STEPS = 12, 3, 2, 30


def test_edit_resampling_reaches_the_job_and_its_steps_count_the_jumps(
        client: openai.OpenAI, stack: Stack) -> None:
    image, mask, kept = _inputs()
    files = {"image": ("in.png", image, "image/png"), "mask": ("mask.png", mask, "image/png")}
    extra = {"steps": STEPS, "seed": 4, "jump_length": JUMP_LENGTH,
             "jump_n_sample": JUMP_N_SAMPLE}
    r = client.images.edit(**files, prompt="1", n=2, response_format="url",  # type: ignore[arg-type]
                           extra_body=extra)
    assert r.usage is not None and r.usage.output_tokens == 2 * RESAMPLED_STEPS
    urls = [d.url for d in r.data or []]
    assert len(urls) == 2 and all(u for u in urls)
    job_id = str(urls[0]).rsplit("/images/", 1)[0].rsplit("/", 1)[1]
    doc = httpx.get(f"{stack.url}/v1/generations/{job_id}", headers=auth(), timeout=10).json()
    assert doc["status"] == "succeeded"
    assert (doc["request"]["jump_length"], doc["request"]["jump_n_sample"]) == \
        (JUMP_LENGTH, JUMP_N_SAMPLE)
    assert doc["request"]["steps"] == STEPS
    for url in urls:
        png = httpx.get(str(url), headers=auth(), timeout=10)
        assert png.status_code == 200
        assert np.array_equal(pixels(png.content)[:14], kept)     # RePaint's kept region

    # Streamed: every completed image counts the jumps; the previews stay within the ask.
    events: list[Any] = list(client.images.edit(**files, prompt="1", stream=True,  # type: ignore[arg-type]
                                                partial_images=3, extra_body=extra))
    assert [ev.type for ev in events] == ["image_edit.partial_image"] * 3 + \
        ["image_edit.completed"]
    assert events[-1].usage.output_tokens == RESAMPLED_STEPS
    assert np.array_equal(pixels(base64.b64decode(events[-1].b64_json))[:14], kept)

    # Without resampling the same edit takes its plain steps: the count above is the jumps'.
    plain = client.images.edit(**files, prompt="1", extra_body={"steps": STEPS, "seed": 4,  # type: ignore[arg-type]
                                                               "jump_length": JUMP_LENGTH})
    assert plain.usage is not None and plain.usage.output_tokens == STEPS


@pytest.mark.parametrize(("extra", "param", "masked"), [
    ({"jump_length": 0}, "jump_length", True),
    ({"jump_length": MAX_JUMP_LENGTH + 1}, "jump_length", True),
    ({"jump_n_sample": 0}, "jump_n_sample", True),
    ({"jump_n_sample": MAX_JUMP_N_SAMPLE + 1}, "jump_n_sample", True),
    ({"jump_n_sample": "x"}, "jump_n_sample", True),
    ({"jump_n_sample": JUMP_N_SAMPLE}, "jump_n_sample", False),     # resampling needs a mask
], ids=lambda v: str(v))
def test_edit_resampling_out_of_range_is_a_400_naming_it(
        client: openai.OpenAI, stack: Stack, extra: dict[str, Any], param: str,
        masked: bool) -> None:
    image, mask, _ = _inputs()
    files: dict[str, Any] = {"image": ("in.png", image, "image/png")}
    if masked:
        files["mask"] = ("mask.png", mask, "image/png")
    before = created(stack.url)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(**files, prompt="1", extra_body={"steps": STEPS, "seed": 4, **extra})
    assert e.value.body["param"] == param, e.value.body  # type: ignore[index]
    assert created(stack.url) == before                 # refused before a job was queued


def test_the_edit_form_documents_the_resampling_bounds(stack: Stack) -> None:
    """The OpenAPI form tells clients (and the fuzzer) the same bounds the route enforces."""
    doc = httpx.get(f"{stack.url}/openapi.json", timeout=10).json()
    content = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    props = content["multipart/form-data"]["schema"]["properties"]
    assert (props["jump_length"]["minimum"], props["jump_length"]["maximum"]) == \
        (1, MAX_JUMP_LENGTH)
    assert (props["jump_n_sample"]["minimum"], props["jump_n_sample"]["maximum"]) == \
        (1, MAX_JUMP_N_SAMPLE)


def test_edit_resampling_at_its_limits_is_accepted(client: openai.OpenAI) -> None:
    """The bounds themselves are admitted (jumps longer than the run make no jumps)."""
    image, mask, _ = _inputs()
    r = client.images.edit(image=("in.png", image, "image/png"), prompt="1",
                           mask=("mask.png", mask, "image/png"),
                           extra_body={"steps": STEPS, "seed": 4, "jump_length": MAX_JUMP_LENGTH,
                                       "jump_n_sample": MAX_JUMP_N_SAMPLE})
    assert r.usage is not None and r.usage.output_tokens == STEPS
