"""The shipped default model: it loads, says how it was made, and draws the digit asked for."""

from __future__ import annotations

from pathlib import Path

import torch

from models import SamplerKind, SlotSpec, count_parameters, load_checkpoint, sample, to_uint8
from training.classifier import load_classifier, predict

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "checkpoints" / "mnist"
CLASSIFIER = MODEL / "digit-classifier.safetensors"


def test_the_default_model_is_small_and_documents_its_training() -> None:
    size = sum(f.stat().st_size for f in MODEL.iterdir() if f.is_file())
    assert size < 20 * 2**20
    ck = load_checkpoint(MODEL)
    assert ck.conditional and ck.config.class_names == tuple(str(i) for i in range(10))
    assert count_parameters(ck.net) < 3_000_000
    prov = ck.config.provenance
    for key in ("data", "steps", "batch_size", "wall_seconds", "hardware", "torch", "date"):
        assert prov.get(key), key
    assert "MNIST" in prov["data"] and prov["weights"] == "EMA"
    assert (MODEL / "grid.png").is_file() and (MODEL / "loss.png").is_file()


def test_its_digits_are_the_requested_class() -> None:
    """Two images per class with 20 DDIM steps and guidance 3, checked by the digit
    classifier shipped beside the model (99.3% on the MNIST test set)."""
    ck = load_checkpoint(MODEL)
    u = ck.config.unet
    labels = [c for c in range(10) for _ in range(2)]
    specs = [SlotSpec(seed=1234, index=i, steps=20, kind=SamplerKind.DDIM, label=c,
                      guidance=3.0) for i, c in enumerate(labels)]
    with torch.inference_mode():
        x = sample(ck.net, ck.schedule, specs, shape=(1, u.image_size, u.image_size),
                   num_classes=10)
    images = to_uint8(x).permute(0, 3, 1, 2)
    got = predict(load_classifier(CLASSIFIER), images).argmax(1)
    accuracy = (got == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.9, list(zip(labels, got.tolist(), strict=True))
    # Not blank or noise: digits are mostly background with a bright stroke.
    ink = (images > 128).float().mean().item()
    assert 0.05 < ink < 0.4, ink
