"""`ddpm eval`: FID against a reference set, and a classifier score where one fits.

FID uses an InceptionV3 TorchScript feature network given by path (2048-d pool features,
input `[N x 3 x 299 x 299]` in [-1, 1]); nothing is downloaded. The classifier score uses a
`ddpm train-classifier` network: the share of samples classified as the class they were
generated for, and an Inception-Score-style exp(E KL(p(y|x) ‖ p(y))) (up to K classes).
Real held-out images scored the same way give the ceiling to read the figures against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models import (
    SlotSpec,
    check_steps,
    from_uint8,
    load_checkpoint,
    read_config,
    resolve_device,
    sample,
    sampler_kind,
    to_uint8,
)

from .classifier import load_classifier, predict
from .data import load_images


@dataclass(frozen=True)
class EvalOptions:
    checkpoint: Path | None               # None: score only the real images of `real`
    reference: Path
    num_samples: int = 2000
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    fid_network: Path | None = None
    classifier: Path | None = None
    real: Path | None = None              # also score N real images of this data (the ceiling)
    reference_split: str = "train"
    real_split: str = "test"
    batch_size: int = 250
    seed: int = 0
    device: str = "auto"


def load_feature_network(file: Path, device: torch.device) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(file), map_location=device).eval()
    except (RuntimeError, OSError, ValueError) as e:
        raise ValueError(f"{file}: not a TorchScript feature network ({e})") from None


@torch.inference_mode()
def features(net: torch.jit.ScriptModule, images: Tensor, device: torch.device,
             batch_size: int = 50) -> np.ndarray:
    """Pool features `[N x D]` (float64) of uint8 images `[N x C x H x W]`, any size."""
    out = []
    for i in range(0, len(images), batch_size):
        x = from_uint8(images[i:i + batch_size].to(device))
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(net(x).double().cpu())
    return torch.cat(out).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½) between two feature sets `[N x D]`.

    Tr((Σa Σb)^½) is the sum of the square roots of the eigenvalues of Σa Σb, which are
    real and non-negative for covariance matrices (up to rounding, clamped at 0).
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(cov_a @ cov_b)
    tr_sqrt = float(np.sqrt(np.clip(eig.real, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def classifier_scores(probs: Tensor, labels: Tensor | None) -> dict[str, float]:
    """Accuracy against the requested labels (if any), mean confidence, and the IS-style
    class score (K when every image is confidently one class and classes are balanced)."""
    p = probs.double().clamp_min(1e-12)
    marginal = p.mean(0, keepdim=True)
    kl = (p * (p.log() - marginal.log())).sum(1).mean()
    scores = {"confidence": float(p.max(1).values.mean()), "class_score": float(kl.exp())}
    if labels is not None:
        scores["accuracy"] = float((p.argmax(1) == labels).double().mean())
    return scores


def generate(opts: EvalOptions, device: torch.device) -> tuple[Tensor, Tensor | None, float]:
    """`num_samples` uint8 images (balanced over classes if conditional), labels, seconds."""
    assert opts.checkpoint is not None
    ck = load_checkpoint(opts.checkpoint, device=device,
                         for_inference=True)
    u = ck.config.unet
    T = ck.config.diffusion.num_timesteps
    check_steps(opts.steps, T, "--steps")
    if opts.guidance_scale != 1.0 and not ck.conditional:
        raise ValueError("--guidance-scale needs a class-conditional model")
    kind = sampler_kind(opts.sampler, ck.config.diffusion.variance_type)
    labels = torch.arange(opts.num_samples) % u.num_classes if ck.conditional else None
    start = time.perf_counter()
    out = []
    for first in range(0, opts.num_samples, opts.batch_size):
        specs = [SlotSpec(seed=opts.seed, index=i, steps=opts.steps, kind=kind, eta=opts.eta,
                          label=None if labels is None else int(labels[i]),
                          guidance=opts.guidance_scale)
                 for i in range(first, min(first + opts.batch_size, opts.num_samples))]
        with torch.inference_mode():
            x = sample(ck.net, ck.schedule, specs, device=device, **ck.batch_options)
        out.append(to_uint8(x).permute(0, 3, 1, 2))
    return torch.cat(out), labels, time.perf_counter() - start


def _subset(images: Tensor, labels: Tensor | None, n: int, seed: int) -> tuple[Tensor,
                                                                             Tensor | None]:
    """A fixed random `n` of a data set (all of it when smaller)."""
    if n >= len(images):
        return images, labels
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], None if labels is None else labels[idx]


def evaluate(opts: EvalOptions) -> list[dict[str, Any]]:
    """One row of figures for the model's samples, and one for real images if asked."""
    if opts.checkpoint is None and opts.real is None:
        raise ValueError("give a checkpoint to evaluate, or --real DATA to score real images")
    if opts.fid_network is None and opts.classifier is None:
        raise ValueError("nothing to compute: give --fid-network FILE and/or --classifier FILE")
    if opts.num_samples < 2:
        raise ValueError("--num-samples must be >= 2")
    device = resolve_device(opts.device)
    classifier = load_classifier(opts.classifier) if opts.classifier else None
    if (classifier is not None and opts.checkpoint is not None
            and read_config(opts.checkpoint).unet.in_channels != classifier.channels):
        raise ValueError(f"{opts.classifier}: a {classifier.channels}-channel classifier "
                         "does not fit this model's images")
    fid_net = load_feature_network(opts.fid_network, device) if opts.fid_network else None

    size, channels = _geometry(opts, classifier)
    ref = load_images(opts.reference, size=size, channels=channels, split=opts.reference_split)
    ref_images, _ = _subset(ref.images, ref.labels, opts.num_samples, opts.seed + 1)
    ref_feats = features(fid_net, ref_images, device) if fid_net is not None else None

    candidates: list[tuple[str, Tensor, Tensor | None, dict[str, Any]]] = []
    if opts.checkpoint is not None:
        images, labels, seconds = generate(opts, device)
        candidates.append((str(opts.checkpoint), images, labels, {
            "sampler": opts.sampler, "steps": opts.steps, "guidance_scale": opts.guidance_scale,
            "eta": opts.eta, "sampling_seconds": round(seconds, 1)}))
    if opts.real is not None:
        real = load_images(opts.real, size=size, channels=channels, split=opts.real_split)
        images, labels = _subset(real.images, real.labels, opts.num_samples, opts.seed + 2)
        candidates.append((f"real images: {real.source}", images, labels, {}))

    rows = []
    for name, images, labels, extra in candidates:
        row: dict[str, Any] = {"source": name, "num_samples": len(images), **extra}
        if fid_net is not None and ref_feats is not None:
            row["fid"] = round(frechet_distance(features(fid_net, images, device), ref_feats), 3)
            row["fid_reference"] = f"{ref.source}, {len(ref_images)} images"
        if classifier is not None:
            scores = classifier_scores(predict(classifier, _fit(images, classifier.size)),
                                       labels)
            row.update({f"classifier_{k}": round(v, 4) for k, v in scores.items()})
        rows.append(row)
    return rows


def _geometry(opts: EvalOptions, classifier: Any) -> tuple[int, int]:
    """Image size and channels to read the reference at: the model's, else the classifier's."""
    if opts.checkpoint is not None:
        u = read_config(opts.checkpoint).unet
        return u.image_size, u.in_channels
    if classifier is not None:
        return classifier.size, classifier.channels
    return 32, 3


def _fit(images: Tensor, size: int) -> Tensor:
    """Resize uint8 images for the classifier when the model's size differs from its own."""
    if images.shape[-1] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        lines.append(row["source"])
        for k, v in row.items():
            if k != "source":
                lines.append(f"  {k:<22} {v}")
    return "\n".join(lines)

