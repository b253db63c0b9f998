"""The README's curl sequence works as written against a running stack."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from training.classifier import load_classifier, predict

ROOT = Path(__file__).resolve().parents[2]


def readme_curl_block() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if "POST localhost:8000/v1/generations" in b]
    assert len(found) == 1, "the README should hold one curl sequence"
    return found[0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readme_curl_sequence(tmp_path: Path, start_api: Callable[..., Any],
                              spawn_worker: Callable[..., Any]) -> None:
    spawn_worker(models=ROOT / "checkpoints")   # the shipped default model, as make run

    api = start_api()
    with httpx.Client(base_url=api.url) as c:
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
    script = readme_curl_block().replace("localhost:8000", api.url.removeprefix("http://"))
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"name":"mnist"' in out.stdout
    assert "event: started" in out.stdout and "event: done" in out.stdout
    assert out.stdout.count("event: snapshot") == 4 * 4        # 25 steps, every 5, 4 images
    assert Image.open(tmp_path / "image0.png").format == "PNG"
    # The default model drew the seven the request asked for.
    digit = torch.from_numpy(np.asarray(Image.open(tmp_path / "image0.png")).copy())
    classifier = load_classifier(ROOT / "checkpoints" / "mnist" / "digit-classifier.safetensors")
    assert predict(classifier, digit[None, None]).argmax(1).item() == 7
    assert Image.open(tmp_path / "grid.png").size[0] > 64
    assert Image.open(tmp_path / "denoise.gif").n_frames == 5
