"""A small CNN classifier: the cheap "are these the digits we asked for?" score of `ddpm eval`.

It is trained once on the real labelled data (`ddpm train-classifier`) and stored as
safetensors with its input size in the metadata, so loading never unpickles.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models import atomic_write, from_uint8

from .data import ImageData

FORMAT = "ddpm-serve-classifier/1"


class Classifier(nn.Module):
    """Two conv blocks and a linear head: ~99% on MNIST after two epochs on a CPU."""

    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        self.channels, self.size, self.num_classes = channels, size, num_classes
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3),
                                  nn.Linear(64 * (size // 4) ** 2, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Logits for images in model space ([-1, 1])."""
        return self.head(self.features(x))


def train_classifier(data: ImageData, *, epochs: int = 2, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0) -> Classifier:
    """Adam with a cosine decay and small random shifts, on all of `data`."""
    if data.labels is None or data.num_classes < 2:
        raise ValueError("the classifier needs labelled data with at least two classes")
    torch.manual_seed(seed)
    _, c, h, _ = data.images.shape
    net = Classifier(c, h, data.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(len(data) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data))
        for i in range(0, len(data), batch_size):
            idx = perm[i:i + batch_size]
            x = from_uint8(data.images[idx])
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(x), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.inference_mode()
def predict(net: Classifier, images: Tensor, batch_size: int = 500) -> Tensor:
    """Class probabilities `[N x K]` for uint8 images `[N x C x H x W]`."""
    out = [F.softmax(net(from_uint8(images[i:i + batch_size])), dim=1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def save_classifier(net: Classifier, file: Path) -> None:
    meta = {"format": FORMAT, "config": json.dumps(
        {"channels": net.channels, "size": net.size, "num_classes": net.num_classes})}
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(Path(file), lambda f: save_file(tensors, f, metadata=meta))


def load_classifier(file: Path) -> Classifier:
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        net = Classifier(**json.loads(meta["config"]))
        net.load_state_dict(load_file(str(file)))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"{file}: not a classifier written by ddpm train-classifier ({e})") \
            from None
    return net.eval()
