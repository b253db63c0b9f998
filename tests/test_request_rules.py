"""One set of request rules: `ddpm sample` refuses exactly what the API refuses.

A table of requests, each run two ways: as `POST /v1/generations` to a real API (real
Redis, a worker's advertisement of the test checkpoints, no worker: an accepted job just
waits), and as `ddpm sample`'s flags through its own parser and `check_request` /
`fit_request` (in-process, against the same checkpoints; nothing is sampled). Both must
give the table's verdict: accept, or refuse naming the same field. The table covers every
rule of contract/rules.py (a test fails when a rule has no case that breaks it), both
ends of every bounded field of `GenerationSpec` (at the bound and past it: generated from
the fields' own bounds, so a new bounded field is covered), the model's checks
(`check_model`) and the input images' fitting. The live OpenAPI schema of the request
(its `allOf`, generated from the same rules) agrees with the API on each body, except for
what a schema cannot state (the model's limits, an image's content).

Fields `ddpm sample` has no flag for (the snapshot ones, priority) are checked on the API
and the schema only, and the test checks that the flag is indeed missing; so is
`interpolate_to` without an `init_image`, which `--interpolate A B` cannot say.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
import redis
import torch
from PIL import Image

from contract.limits import INPUT_FIELDS
from contract.rules import RULES, bounds, field_defaults, rules_schema
from contract.spec import GenerationSpec, ModelInfo
from contract.workers import advertise_worker
from ddpm.cli import build_parser
from ddpm.redis_server import RedisServer
from ddpm.sample import UsageError, fit_request, model_info, sample_options
from models import UNet, load_checkpoint, preset, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# What every request states, so that neither side's defaults decide (`ddpm sample`'s differ:
# ddim, 50 steps, 16 images, seed 0): ddim (so that eta may be set), 2 steps, 2 images.
BASE = {"sampler": "ddim", "steps": 2, "num_images": 2, "seed": 0}
REF = "sha256:" + "0" * 64

# Test images are named in the table's requests (IMG, IMG2, MASK, BIGMASK, GARBAGE): sent
# as base64 to the API, as files to the CLI.


@dataclass(frozen=True)
class Case:
    """A request (over BASE) to `model`, and the field both sides must name (None: both
    accept). `beyond_schema`: a refusal the JSON Schema cannot state (the model's limits,
    an image's content), so the schema accepts the body."""

    id: str
    body: dict[str, Any]
    refuses: str | None
    model: str = "tiny"
    beyond_schema: bool = False
    cli_accepts: bool = False    # a deliberate difference: the API refuses, `ddpm sample` not

    @property
    def cli_verdict(self) -> str | None:
        return None if self.cli_accepts else self.refuses


INIT = {"init_image": "IMG"}
INPAINT = {"init_image": "IMG", "mask": "MASK"}
INTERP = {"init_image": "IMG", "interpolate_to": "IMG2"}

# -- each rule: broken, and kept --------------------------------------------------------------

RULE_CASES = [
    Case("eta-with-ddpm", {"sampler": "ddpm", "eta": 0.5}, "eta"),
    Case("eta-with-dpm++2m", {"sampler": "dpm++2m", "eta": 1.0}, "eta"),
    Case("eta-0-with-ddpm", {"sampler": "ddpm", "eta": 0.0}, None),
    Case("guidance-without-label", {"guidance_scale": 2.0}, "guidance_scale"),
    Case("guidance-without-label-cond", {"guidance_scale": 2.0}, "guidance_scale",
         model="tinycond"),
    Case("guidance-with-label", {"guidance_scale": 2.0, "class_label": 1}, None,
         model="tinycond"),
    Case("quality-with-png", {"snapshot_format": "png", "snapshot_quality": 50},
         "snapshot_quality"),
    Case("quality-with-jpeg", {"snapshot_format": "jpeg", "snapshot_quality": 50}, None),
    Case("mask-without-init", {"mask": "MASK"}, "mask"),
    Case("interpolate-without-init", {"interpolate_to": "IMG2"}, "interpolate_to"),
    Case("strength-without-init", {"strength": 0.5}, "strength"),
    Case("interpolate-with-mask", {**INTERP, "mask": "MASK", "num_images": 3},
         "interpolate_to"),
    Case("interpolate-one-frame", {**INTERP, "num_images": 1}, "interpolate_to"),
    Case("interpolate-two-frames", {**INTERP, "num_images": 2}, None),
    Case("jump-length-without-mask", {**INIT, "jump_length": 3}, "jump_length"),
    Case("jump-n-sample-without-mask", {**INIT, "jump_n_sample": 2}, "jump_n_sample"),
    Case("jump-n-sample-without-init", {"jump_n_sample": 2}, "jump_n_sample"),
    Case("resampling-with-mask", {**INPAINT, "jump_length": 3, "jump_n_sample": 2}, None),
    Case("img2img", {**INIT, "strength": 0.5}, None),
]

# -- what depends on the model, and on the images' content -------------------------------------

MODEL_CASES = [
    Case("steps-at-T", {"steps": 50}, None, model="short"),
    Case("steps-past-T", {"steps": 51}, "steps", model="short", beyond_schema=True),
    Case("label-on-unconditional", {"class_label": 0}, "class_label", beyond_schema=True),
    Case("label-past-classes", {"class_label": 3}, "class_label", model="tinycond",
         beyond_schema=True),
    Case("label-last-class", {"class_label": 2}, None, model="tinycond"),
    Case("snapshot-size-past-image", {"snapshot_size": 32}, "snapshot_size",
         beyond_schema=True),
    Case("snapshot-size-at-image", {"snapshot_size": 16}, None),
    # strength 0.01 of T = 1000 leaves ceil(10) = 10 timesteps.
    Case("steps-at-strength", {**INIT, "strength": 0.01, "steps": 10}, None),
    Case("steps-past-strength", {**INIT, "strength": 0.01, "steps": 11}, "steps",
         beyond_schema=True),
    Case("inpainting-default-strength-all-steps", {**INPAINT, "steps": 1000}, None),
    Case("init-not-an-image", {"init_image": "GARBAGE"}, "init_image", beyond_schema=True),
    Case("mask-of-another-size", {"init_image": "IMG", "mask": "BIGMASK"}, "mask",
         beyond_schema=True),
]

# -- both ends of every bounded field -----------------------------------------------------------

# What a value of the field needs around it to be judged on its bound alone.
BOUND_CONTEXT: dict[str, tuple[dict[str, Any], str]] = {
    "guidance_scale": ({"class_label": 0}, "tinycond"),
    "class_label": ({}, "tinycond"),
    "strength": (INIT, "tiny"),
    "jump_length": (INPAINT, "tiny"),
    "jump_n_sample": (INPAINT, "tiny"),
}
# Values at a bound that the model refuses (check_model: 3 classes, 16-pixel images); the
# field is still the one named.
MODEL_BOUND = {("class_label", 9999), ("snapshot_size", 1024)}
# The one deliberate difference: an offline run may write more images than a request holds
# (they run as several requests' images; ddpm/sample.py); an interpolation's frames may not.
CLI_ACCEPTS = {"num_images-past-65"}


def _bound_cases() -> list[Case]:
    """Each bounded field at each of its bounds (accepted; refused by the model where
    MODEL_BOUND says) and one step past it (refused), from the field's own bounds."""
    cases = []
    for name, info in GenerationSpec.model_fields.items():
        b = bounds(GenerationSpec, name)
        context, model = BOUND_CONTEXT.get(name, ({}, "tiny"))
        step = 1 if "int" in str(info.annotation) else 0.01
        ends: list[tuple[Any, bool]] = []
        if "ge" in b:
            ends += [(b["ge"], True), (b["ge"] - step, False)]
        if "gt" in b:
            ends += [(round(b["gt"] + step, 2), True), (b["gt"], False)]
        if "le" in b:
            ends += [(b["le"], True), (round(b["le"] + step, 2), False)]
        for value, inside in ends:
            cid = f"{name}-{'at' if inside else 'past'}-{value}"
            by_model = (name, value) in MODEL_BOUND
            refused = name if not inside or by_model else None
            cases.append(Case(cid, {**context, name: value}, refused, model=model,
                              beyond_schema=by_model,
                              cli_accepts=cid in CLI_ACCEPTS))
    return cases


BOUND_CASES = _bound_cases()
CASES = RULE_CASES + MODEL_CASES + BOUND_CASES


# -- the two sides ------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """The API's URL and request schema; the checkpoints, what a worker would advertise of
    each (ModelInfo), and the test images."""

    url: str
    checkpoints: dict[str, Path]
    infos: dict[str, ModelInfo]
    images: dict[str, Path]
    schema: jsonschema.Draft202012Validator
    out: Path


def _picture(path: Path, seed: int, size: int = 16, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _checkpoints(root: Path) -> dict[str, Path]:
    tiny = preset("tiny")
    configs = {
        "tiny": tiny,                                                   # 16 px, T = 1000
        "tinycond": tiny.replace(num_classes=3, in_channels=1),
        "short": dataclasses.replace(tiny, diffusion=dataclasses.replace(
            tiny.diffusion, num_timesteps=50)),
    }
    paths = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        paths[name] = root / name
        save_checkpoint(paths[name], UNet(cfg.unet).eval(), cfg)
    return paths


@pytest.fixture(scope="module")
def world(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
          api_process: Any) -> Iterator[World]:
    """The test checkpoints, advertised as a worker serving them would; an API on them."""
    root = tmp_path_factory.mktemp("rules")
    checkpoints = _checkpoints(root / "models")
    infos = {n: model_info(load_checkpoint(p), p) for n, p in checkpoints.items()}
    images = {"IMG": _picture(root / "img.png", 1), "IMG2": _picture(root / "img2.png", 2),
              "MASK": _picture(root / "mask.png", 3, mode="L"),
              "BIGMASK": _picture(root / "bigmask.png", 4, size=32, mode="L"),
              "GARBAGE": root / "garbage.png"}
    images["GARBAGE"].write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    doc = {"name": "rules", "draining": False,
           "models": [dataclasses.asdict(i) for i in infos.values()]}
    advertise_worker(r, "rules", json.dumps(doc), 600, time.time())
    api = api_process(redis_server.url, root / "api.log", env={"DDPM_RATE_LIMIT": "0"})
    try:
        schema = httpx.get(f"{api.url}/openapi.json", timeout=10).json()[
            "components"]["schemas"]["GenerationRequest"]
        yield World(api.url, checkpoints, infos, images,
                    jsonschema.Draft202012Validator(schema), root / "out")
    finally:
        api.stop()
        r.flushall()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def api_body(world: World, case: Case) -> dict[str, Any]:
    body = {"model": case.model, **BASE, **case.body}
    return {k: _b64(world.images[v]) if k in INPUT_FIELDS else v for k, v in body.items()}


def api_verdict(world: World, case: Case) -> tuple[str | None, dict[str, Any]]:
    """(the field the API's 422 names, or None for a 202; the response body)."""
    resp = httpx.post(f"{world.url}/v1/generations", json=api_body(world, case), timeout=30)
    assert resp.status_code in (202, 422), (case.id, resp.status_code, resp.text)
    if resp.status_code == 202:
        return None, resp.json()
    return resp.json()["error"]["field"], resp.json()


def _sample_dests() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest for a in sub.choices["sample"]._actions}


def cli_argv(case: Case, world: World) -> list[str] | None:
    """`ddpm sample`'s flags for the request, or None where it has no way to say it."""
    body = {**BASE, **case.body}
    if "interpolate_to" in body and "init_image" not in body:
        return None                  # --interpolate A B always gives an init_image
    argv = ["sample", str(world.checkpoints[case.model]), "--out", str(world.out)]
    dests = _sample_dests()
    for name, value in body.items():
        if name == "interpolate_to":
            continue
        if name == "init_image" and "interpolate_to" in body:
            argv += ["--interpolate", str(world.images[value]),
                     str(world.images[body["interpolate_to"]])]
            continue
        if name == "num_images" and "interpolate_to" in body:
            argv += ["--frames", str(value)]
            continue
        if name not in dests:
            return None
        argv += ["--" + name.replace("_", "-"),
                 str(world.images[value]) if name in INPUT_FIELDS else str(value)]
    return argv


def cli_verdict(world: World, argv: list[str]) -> tuple[str | None, GenerationSpec | None]:
    """(the field `ddpm sample` refuses, or None; the spec it would run)."""
    args = build_parser().parse_args(argv)
    try:
        opts = sample_options(args)
        spec, _ = fit_request(opts, world.infos[args.checkpoint.name])
    except UsageError as e:
        assert e.field is not None, str(e)
        assert str(e).startswith("--"), f"the refusal names no flag: {e}"
        return e.field, None
    return None, spec


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ddpm_sample_refuses_what_the_api_refuses(world: World, case: Case) -> None:
    api_field, body = api_verdict(world, case)
    assert api_field == case.refuses, (case.id, "API", body)
    argv = cli_argv(case, world)
    if argv is None:                 # the CLI cannot be asked this: it has no such flag
        missing = {*case.body} - _sample_dests() - {"interpolate_to"}
        assert missing or "init_image" not in case.body, case.id
        return
    cli_field, spec = cli_verdict(world, argv)
    assert cli_field == case.cli_verdict, (case.id, "ddpm sample", argv)
    if api_field is None and cli_field is None:     # the same spec, to the input digests
        assert spec is not None
        assert spec.model_dump(mode="json") == body["request"], case.id


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_schema_refuses_what_the_api_refuses(world: World, case: Case) -> None:
    """The `allOf` generated from the rules, with the fields' bounds, accepts a body
    exactly when the API does, but for what a schema cannot state."""
    valid = world.schema.is_valid(api_body(world, case))
    assert valid == (case.refuses is None or case.beyond_schema), (
        case.id, [e.message for e in world.schema.iter_errors(api_body(world, case))])


def _values(case: Case) -> dict[str, Any]:
    defaults = field_defaults(GenerationSpec)
    body = {**BASE, **case.body}
    return {**defaults, **{k: REF if k in INPUT_FIELDS else v for k, v in body.items()}}


def test_every_rule_has_a_case_that_breaks_it_and_one_that_keeps_it() -> None:
    """A rule added to contract/rules.py fails here until the table shows both sides
    enforce it."""
    defaults = field_defaults(GenerationSpec)
    for rule in RULES:
        broken = [c.id for c in CASES if c.refuses == rule.field
                  and rule.broken(_values(c), defaults)]
        kept = [c.id for c in CASES if c.refuses is None
                and rule.when.holds(_values(c)[rule.field], defaults[rule.field])]
        assert broken, f"no case breaks the rule {rule.message!r}"
        assert kept, f"no accepted case meets the condition of {rule.message!r}"


def test_every_bounded_field_is_tried_at_and_past_each_bound() -> None:
    bounded = {n for n in GenerationSpec.model_fields if bounds(GenerationSpec, n)}
    assert bounded >= {"num_images", "steps", "eta", "seed", "guidance_scale", "strength",
                       "jump_length", "jump_n_sample", "class_label", "snapshot_every",
                       "snapshot_size", "snapshot_quality"}
    for name in bounded:
        ids = {c.id for c in BOUND_CASES if c.id.startswith(f"{name}-")}
        assert len(ids) == 2 * len(bounds(GenerationSpec, name)), (name, ids)


def test_the_one_deliberate_difference_is_the_offline_image_count() -> None:
    differ = {c.id: (c.refuses, c.cli_verdict) for c in CASES if c.cli_verdict != c.refuses}
    assert differ == {"num_images-past-65": ("num_images", None)}


def test_fields_the_cli_lacks_are_the_snapshot_ones_and_priority() -> None:
    """What `ddpm sample` cannot be asked (the table checks those fields on the API only):
    frames it does not write, a queue it does not have. (The model is the checkpoint;
    `interpolate_to` is `--interpolate`'s second image.)"""
    lacking = set(GenerationSpec.model_fields) - _sample_dests() - {"model", "interpolate_to"}
    assert lacking == {"snapshot_every", "snapshot_kind", "snapshot_size", "snapshot_format",
                       "snapshot_quality", "priority"}


def test_the_served_all_of_is_generated_from_the_rules(world: World) -> None:
    """The request schema's `allOf` is `rules_schema` of the rules, none written by hand
    (that it agrees with the validators: tests/contract/test_rules.py)."""
    schema = world.schema.schema
    assert schema["allOf"] == rules_schema(GenerationSpec)
    assert len(schema["allOf"]) == len(RULES)


def test_rule_messages_are_the_422s(world: World) -> None:
    """The refusal of a broken rule says the rule's message (formatted with the values)."""
    case = next(c for c in RULE_CASES if c.id == "eta-with-ddpm")
    _, body = api_verdict(world, case)
    assert "eta applies to the ddim sampler only, not 'ddpm'" in body["error"]["message"]
    with pytest.raises(UsageError, match="--eta: eta applies to the ddim sampler only"):
        sample_options_and_check(world, case)


def sample_options_and_check(world: World, case: Case) -> None:
    argv = cli_argv(case, world)
    assert argv is not None
    args = build_parser().parse_args(argv)
    fit_request(sample_options(args), world.infos[case.model])


def test_the_models_are_what_the_table_assumes(world: World) -> None:
    """steps at its bound (1000) is the tiny model's T; 3 classes; 16-pixel images."""
    tiny, cond = world.infos["tiny"], world.infos["tinycond"]
    assert tiny.num_timesteps == bounds(GenerationSpec, "steps")["le"] == 1000
    assert (cond.num_classes, tiny.num_classes, tiny.image_size) == (3, 0, 16)
    assert world.infos["short"].num_timesteps == 50
