"""One definition for each list the project spells: where a second copy cannot import the
first (the torch-free contract cannot import models), a test ties them here.

- sampler names: models.SAMPLER_NAMES (the math's) = contract.Sampler (the API's);
  the CLI's choices come from the contract;
- preset names: `ddpm train --help` lists models.PRESETS (the parser imports no torch);
- the range of a step count: models.check_steps; the contract's check agrees with it;
- PNG encoding: models.png_bytes (the worker's frames, `ddpm sample`, training grids);
- what a model fixes about sampling it: models.batch_options / Checkpoint.slot_batch;
- a job's event stream length: contract.STREAM_MAXLEN, through both settings, and
  its snapshot byte budget: STREAM_MAX_BYTES;
- the rules between a request's fields: contract.rules.RULES, which the spec's validators,
  the OpenAPI `allOf` and `ddpm sample` (through the spec) read; that all of them enforce
  each rule alike: tests/test_request_rules.py.
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from contract.events import Event, EventType
from contract.keys import events_key
from contract.limits import STREAM_MAX_BYTES, STREAM_MAXLEN, Sampler
from contract.spec import GenerationSpec, ModelInfo, SpecError
from models import (
    PRESETS,
    SAMPLER_NAMES,
    UNet,
    batch_options,
    check_steps,
    png_bytes,
    preset,
    save_png,
)
from models.checkpoint import Checkpoint
from models.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "worker", "models", "training", "ddpm", "bench")


def _subparser(name: str) -> argparse.ArgumentParser:
    from ddpm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def _sources() -> dict[str, str]:
    return {str(f.relative_to(ROOT)): f.read_text()
            for p in PACKAGES for f in sorted((ROOT / p).rglob("*.py"))}


# -- sampler names -------------------------------------------------------------------------


def test_sampler_names_are_the_same_everywhere() -> None:
    from bench.sampler_vs_diffusers import SAMPLERS

    assert get_args(Sampler) == SAMPLER_NAMES
    for command in ("sample", "eval"):
        assert tuple(_option(_subparser(command), "--sampler").choices) == SAMPLER_NAMES
    assert SAMPLERS == SAMPLER_NAMES


# -- preset names --------------------------------------------------------------------------


def test_train_help_lists_every_preset_and_the_parser_imports_no_torch() -> None:
    help_text = " ".join(_subparser("train").format_help().split())
    listed = re.search(r"model preset: ([a-z0-9_, ]+)", help_text)
    assert listed is not None, help_text
    assert [p.strip() for p in listed.group(1).split(",")] == list(PRESETS)
    code = ("import sys; from ddpm.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'building the parser imported torch'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# -- the range of a step count -------------------------------------------------------------


@pytest.mark.parametrize("num_timesteps", [1, 10, 999])
def test_the_contract_accepts_exactly_the_step_counts_models_accept(num_timesteps: int) -> None:
    info = ModelInfo(name="m", image_size=8, in_channels=1,
                              num_timesteps=num_timesteps)
    for steps in (1, 2, num_timesteps - 1, num_timesteps, num_timesteps + 1):
        if steps < 1:
            continue
        try:
            check_steps(steps, num_timesteps)
            models_ok = True
        except ValueError:
            models_ok = False
        try:
            GenerationSpec(model="m", steps=steps).check_model(info)
            contract_ok = True
        except SpecError as e:
            assert e.field == "steps"
            contract_ok = False
        assert contract_ok == models_ok, (steps, num_timesteps)


# Still spelling the range out (being edited by others when this test was written: the
# slot's own window, `check_steps(steps, t0 + 1)`); the set may only shrink.
PENDING_STEPS: set[str] = set()


def test_no_other_step_range_check_is_spelled_out() -> None:
    """`1 <= steps <= T` lives in models.check_steps; the others call it."""
    pattern = re.compile(r"1 <= \S*steps\S* <= ")
    found = {f for f, text in _sources().items() if pattern.search(text)}
    assert "models/schedule.py" in found
    assert found - {"models/schedule.py"} <= PENDING_STEPS, found


# -- PNG -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_every_png_writer_is_the_one_encoder(tmp_path: Path, channels: int, mode: str) -> None:
    from contract.preview import Preview
    from ddpm import sample
    from worker.frames import encode_frame

    pixels = torch.randint(0, 256, (5, 7, channels), dtype=torch.uint8)
    sample.save_png(pixels, tmp_path / "cli.png")
    save_png(pixels, tmp_path / "models.png")
    written = {"worker": encode_frame(pixels.numpy(), Preview(7, "png")),
               "models": png_bytes(pixels),
               "cli": (tmp_path / "cli.png").read_bytes(),
               "file": (tmp_path / "models.png").read_bytes()}
    for name, png in written.items():
        im = Image.open(io.BytesIO(png))
        assert im.mode == mode and im.size == (7, 5), name
        got = np.asarray(im)
        assert np.array_equal(got.reshape(5, 7, channels), pixels.numpy()), name
    assert written["cli"] == written["models"] == written["file"]


# -- what a model fixes about sampling it --------------------------------------------------

# Call sites the lead switches to Checkpoint.slot_batch / batch_options (files being edited
# by others when this test was written); the set may only shrink.
PENDING: set[str] = set()


def test_batch_options_come_from_the_model_config() -> None:
    cfg = preset("mnist")
    assert batch_options(cfg) == {"shape": (1, 28, 28), "num_classes": 10,
                                  "clip_denoised": True}
    torch.manual_seed(0)
    tiny = preset("tiny")
    ck = Checkpoint(net=UNet(tiny.unet).eval(), config=tiny,
                    schedule=Schedule.from_config(tiny.diffusion), path=ROOT)
    batch = ck.slot_batch("cpu")
    assert (batch.shape, batch.num_classes, batch.clip_denoised) == ((3, 16, 16), 0, True)
    assert batch.net is ck.net
    wrapped = ck.slot_batch("cpu", net=len)
    assert wrapped.net is len


def test_no_call_site_spells_out_the_batch_options() -> None:
    spelled = {f for f, text in _sources().items()
               if not f.startswith("models/") and "clip_denoised=" in text}
    assert spelled <= PENDING, f"use Checkpoint.slot_batch or batch_options: {spelled - PENDING}"


# -- the rules between a request's fields ---------------------------------------------------


def test_no_rule_between_fields_is_spelled_out_again() -> None:
    """Each rule's refusal is worded in contract/rules.py only; a second copy (the API's
    hand-written JSON Schema, `ddpm sample`'s own checks, as before) would say it again."""
    from app.schemas import CROSS_FIELD_RULES
    from contract.rules import RULES, rules_schema

    assert rules_schema(GenerationSpec) == CROSS_FIELD_RULES
    sources = _sources()
    for rule in RULES:
        words = rule.message.split("{")[0].strip()
        spelled = {f for f, text in sources.items() if words in text}
        assert not spelled, f"{rule.message!r} is spelled out in {spelled}"


# -- the event stream's length -------------------------------------------------------------


def test_api_and_workers_keep_streams_equally_long(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import ApiSettings
    from worker.settings import WorkerSettings

    assert ApiSettings().stream_maxlen == WorkerSettings().stream_maxlen == \
        STREAM_MAXLEN
    monkeypatch.setenv("DDPM_STREAM_MAXLEN", "321")
    assert ApiSettings().stream_maxlen == WorkerSettings().stream_maxlen == 321


def test_api_and_workers_share_the_stream_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the API refuses up front (422) is what the workers trim to."""
    from app.settings import ApiSettings
    from worker.settings import WorkerSettings

    assert ApiSettings().stream_max_bytes == WorkerSettings().stream_max_bytes == \
        STREAM_MAX_BYTES
    monkeypatch.setenv("DDPM_STREAM_MAX_BYTES", "123456")
    assert ApiSettings().stream_max_bytes == WorkerSettings().stream_max_bytes == 123456


def test_the_api_trims_a_stream_to_the_shared_length(r: redis.Redis, redis_url: str) -> None:
    """Canceling a queued job appends to its stream (a re-queued job's has a history):
    with the shared length, nothing a worker kept is trimmed away."""
    from app.jobs import JobStore
    from app.settings import ApiSettings
    from contract.queueing import enqueue, fetch_job

    job = enqueue(r, GenerationSpec(model="tiny", steps=2), meta={"owner": "-"})
    key = events_key(job.id)
    history = STREAM_MAXLEN + 1000
    with r.pipeline(transaction=False) as p:
        for _ in range(history):
            p.xadd(key, Event(EventType.PROGRESS).to_fields())
        p.execute()
    JobStore(r, ApiSettings(redis_url=redis_url)).cancel(fetch_job(r, job.id))
    # XADD MAXLEN ~ trims whole stream nodes (100 entries each by default).
    assert STREAM_MAXLEN <= r.xlen(key) <= STREAM_MAXLEN + 100
