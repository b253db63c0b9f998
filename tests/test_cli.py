"""The `ddpm` command end to end: real subprocesses, real files."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contract.spec import GenerationSpec
from models import UNet, preset, save_checkpoint

REF = "sha256:" + "0" * 64      # an input image as the spec names it


def ddpm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = preset("tiny")
    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_checkpoint(path, UNet(cfg.unet), cfg)
    return path


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = preset("tiny").replace(num_classes=3, in_channels=1)
    path = tmp_path_factory.mktemp("ck") / "cond"
    save_checkpoint(path, UNet(cfg.unet), cfg)
    return path


def pixels(file: Path) -> np.ndarray:
    return np.asarray(Image.open(file), dtype=np.int16)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_sample_writes_the_promised_pngs(checkpoint: Path, tmp_path: Path, sampler: str) -> None:
    out = tmp_path / "out"
    r = ddpm("sample", str(checkpoint), "--sampler", sampler, "--steps", "4", "--num-images", "3",
             "--seed", "5", "--batch-size", "2", "--device", "cpu", "--out", str(out), "--grid")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["0000.png", "0001.png", "0002.png", "grid.png"]
    img = Image.open(out / "0000.png")
    assert img.size == (16, 16) and img.mode == "RGB"
    assert Image.open(out / "grid.png").size == (2 * 18 + 2, 2 * 18 + 2)
    meta = json.loads((out / "sample.json").read_text())
    assert meta["sampler"] == sampler and meta["steps"] == 4 and meta["num_images"] == 3
    assert "sampling" in r.stderr  # the progress bar


def test_batch_size_does_not_change_the_images(checkpoint: Path, tmp_path: Path) -> None:
    common = ["--sampler", "ddpm", "--steps", "3", "--num-images", "3", "--seed", "7"]
    assert ddpm("sample", str(checkpoint), *common, "--batch-size", "1",
                "--out", str(tmp_path / "a")).returncode == 0
    assert ddpm("sample", str(checkpoint), *common, "--batch-size", "3",
                "--out", str(tmp_path / "b")).returncode == 0
    for name in ("0000.png", "0001.png", "0002.png"):
        diff = np.abs(pixels(tmp_path / "a" / name) - pixels(tmp_path / "b" / name))
        assert diff.max() <= 1
    assert np.abs(pixels(tmp_path / "a" / "0000.png")
                  - pixels(tmp_path / "a" / "0001.png")).max() > 10


def test_an_offline_run_writes_more_images_than_a_request_holds(checkpoint: Path,
                                                               tmp_path: Path) -> None:
    """Past MAX_IMAGES (one request's), the images run at the numbers after them: each
    its own noise, none a copy of an earlier one."""
    from contract.limits import MAX_IMAGES

    n = MAX_IMAGES + 2
    r = ddpm("sample", str(checkpoint), "--sampler", "ddim", "--steps", "1", "--num-images",
             str(n), "--batch-size", "40", "--device", "cpu", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert len(list(tmp_path.glob("*.png"))) == n
    last = pixels(tmp_path / f"{n - 1:04d}.png")
    assert all(np.abs(last - pixels(tmp_path / f"{i:04d}.png")).max() > 10 for i in (0, 1, 2))
    assert f" {n}/{n} " in r.stderr            # 1 step an image


def test_class_label_on_a_conditional_model(conditional_checkpoint: Path, tmp_path: Path) -> None:
    r = ddpm("sample", str(conditional_checkpoint), "--steps", "3", "--num-images", "2",
             "--class-label", "2", "--guidance-scale", "2.5", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "0001.png").mode == "L"


@pytest.mark.parametrize(("args", "message"), [
    (["--class-label", "1"], "--class-label: model 'tiny' is unconditional"),
    (["--steps", "1001"], "--steps: Input should be less than or equal to 1000"),
    (["--guidance-scale", "2"], "--guidance-scale: guidance_scale needs a class_label"),
    (["--eta", "3"], "--eta: Input should be less than or equal to 1"),
    # The API refused this and `ddpm sample` ran it (the rules were re-derived there).
    (["--sampler", "ddpm", "--eta", "0.5"], "--eta: eta applies to the ddim sampler only"),
])
def test_bad_options_give_a_clear_error(checkpoint: Path, tmp_path: Path, args: list[str],
                                        message: str) -> None:
    r = ddpm("sample", str(checkpoint), *args, "--out", str(tmp_path))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def _picture(file: Path, seed: int, size: int = 16) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(file)
    return file


def test_inpainting_and_interpolation_from_the_command_line(checkpoint: Path,
                                                            tmp_path: Path) -> None:
    image = _picture(tmp_path / "in.png", 1)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255                                # generate the right half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = ddpm("sample", str(checkpoint), "--init-image", str(image), "--mask",
             str(tmp_path / "mask.png"), "--steps", "4", "--num-images", "2",
             "--jump-length", "2", "--jump-n-sample", "2", "--out", str(tmp_path / "inp"))
    assert r.returncode == 0, r.stderr
    want = pixels(image)
    for name in ("0000.png", "0001.png"):
        got = pixels(tmp_path / "inp" / name)
        assert np.array_equal(got[:, :8], want[:, :8])          # kept exactly
        assert not np.array_equal(got[:, 8:], want[:, 8:])
    assert json.loads((tmp_path / "inp" / "sample.json").read_text())["strength"] == 1.0
    # Progress counts RePaint's jumps: 4 steps with one jump of 2 back and forth is 8
    # steps an image (GenerationSpec.steps_per_image), 16 for the two, as the API counts.
    total = 2 * GenerationSpec(model="m", steps=4, init_image=REF, mask=REF, jump_length=2,
                               jump_n_sample=2).steps_per_image
    assert total == 16
    assert f" {total}/{total} " in r.stderr, r.stderr

    b = _picture(tmp_path / "b.png", 2)
    r = ddpm("sample", str(checkpoint), "--interpolate", str(image), str(b), "--frames", "3",
             "--steps", "4", "--out", str(tmp_path / "interp"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "interp").glob("*.png")) == [
        "0000.png", "0001.png", "0002.png"]
    r = ddpm("sample", str(checkpoint), "--init-image", str(image), "--strength", "0.5",
             "--steps", "4", "--out", str(tmp_path / "first"))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels(tmp_path / "interp" / "0000.png"),
                          pixels(tmp_path / "first" / "0000.png"))


@pytest.mark.parametrize(("args", "message"), [
    (["--init-image", "{bad}"], "--init-image: "),
    (["--init-image", "{img}", "--mask", "{big}"], "--mask: "),
    (["--init-image", "{img}", "--strength", "0.001", "--steps", "5"], "do not fit"),
    (["--mask", "{img}"], "--mask: mask needs an init_image"),
    (["--init-image", "{nope}"], "cannot read"),
])
def test_bad_images_give_a_clear_error(checkpoint: Path, tmp_path: Path, args: list[str],
                                       message: str) -> None:
    files = {"img": _picture(tmp_path / "img.png", 3), "big": _picture(tmp_path / "big.png",
                                                                        4, 32),
             "bad": tmp_path / "bad.png", "nope": tmp_path / "nope.png"}
    files["bad"].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    r = ddpm("sample", str(checkpoint), *[a.format(**files) for a in args],
             "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    r = ddpm("sample", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and str(tmp_path / "nope") in r.stderr
    assert "Traceback" not in r.stderr


def test_info_prints_the_config(checkpoint: Path) -> None:
    r = ddpm("info", str(checkpoint))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["unet"]["ch"] == 32 and doc["parameters"] < 1_000_000


def test_worker_without_redis_says_so(checkpoint: Path) -> None:
    from ddpm.redis_server import free_port

    r = ddpm("worker", "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
             "--models-dir", str(checkpoint), "--device", "cpu")
    assert r.returncode == 2
    assert "cannot reach Redis" in r.stderr


def test_worker_with_bad_settings_names_them(checkpoint: Path, tmp_path: Path) -> None:
    from ddpm.redis_server import RedisServer

    with RedisServer() as srv:
        missing = ddpm("worker", "--redis-url", srv.url, "--models-dir", str(tmp_path / "none"))
        assert missing.returncode == 2 and "does not exist" in missing.stderr
        empty = ddpm("worker", "--redis-url", srv.url, "--models-dir", str(tmp_path))
        assert empty.returncode == 2 and "no checkpoints" in empty.stderr
        wrong = ddpm("worker", "--redis-url", srv.url, "--models-dir", str(checkpoint),
                     "--model", "nope")
        assert wrong.returncode == 2 and "nope" in wrong.stderr
    bad = ddpm("worker", "--max-batch", "0")
    assert bad.returncode == 2 and "max-batch" in bad.stderr


# -- ddpm generate: the ddpm-client package's command --------------------------------------


def _generate_options(parser: argparse.ArgumentParser) -> dict[str, tuple[object, ...]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.option_strings[-1]: (a.dest, a.type, a.default, a.choices, a.required, a.nargs)
            for a in sub.choices["generate"]._actions if a.option_strings}


def test_ddpm_generate_has_the_client_commands_flags() -> None:
    """One command, two names: `ddpm generate` is `ddpm-client generate` (its flags, their
    types and defaults), so a laptop with the client alone runs what the README shows."""
    from ddpm_client.cli import build_parser as client_parser

    from ddpm.cli import build_parser

    ours, theirs = _generate_options(build_parser()), _generate_options(client_parser())
    assert "--server" in ours and "--stream" in ours
    assert ours == theirs


def test_ddpm_generate_without_the_client_package_says_what_to_install(tmp_path: Path) -> None:
    """The API image has no ddpm-client: every other command's parser still builds, and
    `ddpm generate` says what is missing in one line."""
    code = ("import sys; sys.modules['ddpm_client'] = None; from ddpm.cli import build_parser, "
            "main; assert build_parser().parse_args(['api']).command == 'api'; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "generate", "--server",
                        "http://127.0.0.1:9", "--steps", "3", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "ddpm generate: needs the ddpm-client package: pip install ./client"
    assert not (tmp_path / "o").exists()
