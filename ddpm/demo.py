"""What `make run` does until the HTTP service exists: sample each shipped checkpoint
offline, or say how to get one. (`ddpm serve` replaces this when the API lands.)"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import main as ddpm

HELP = """\
ddpm-serve: the HTTP service (`ddpm serve`) is not built yet; offline sampling works now.

  Convert a published diffusers DDPM checkpoint (a local folder, e.g. a download of
  google/ddpm-cifar10-32):
      .venv/bin/ddpm convert PATH/TO/ddpm-cifar10-32 checkpoints/cifar10
  Sample it to PNG files:
      .venv/bin/ddpm sample checkpoints/cifar10 --sampler dpm++2m --steps 20 \\
          --num-images 16 --seed 0 --out samples/cifar10 --grid
  Describe a checkpoint:
      .venv/bin/ddpm info checkpoints/cifar10

Checkpoints placed in {root}/ are sampled by `make run`.
"""


def run(root: Path = Path("checkpoints")) -> int:
    found = sorted(p.parent for p in root.glob("*/config.json"))
    if not found:
        print(HELP.format(root=root))
        return 0
    for ck in found:
        out = Path("samples") / ck.name
        print(f"sampling {ck} → {out}/")
        code = ddpm(["sample", str(ck), "--sampler", "dpm++2m", "--steps", "20",
                     "--num-images", "16", "--out", str(out), "--grid"])
        if code:
            return code
    print(HELP.format(root=root).split("\n\n", 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(run())
