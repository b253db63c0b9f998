"""Draw docs/conditioned.png, the README's picture of image-conditioned generation, with
the project's own sampler, the shipped MNIST model and real MNIST test digits.

    python docs/make_conditioned.py --data ../shared/data/mnist --out docs/conditioned.png

Three rows, each: the input(s), then x̂0 at a few steps of the run, then the result.
- inpainting: a digit, its lower half masked, repainted as the class it is;
- img2img: a digit at strength 0.9 with another class label;
- interpolation: two digits and the frames between them at strength 0.5.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from models import SlotSpec, load_checkpoint, sample_progressive, sampler_kind, to_uint8
from training.data import load_images

SCALE = 3           # pixels per MNIST pixel in the picture
PAD = 4


def _run(ck, specs: list[SlotSpec], show: list[int]) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """x̂0 of every slot after each step in `show` (1-based), then the final images."""
    shots = []
    for k, out in enumerate(sample_progressive(ck.net, ck.schedule, specs,
                                               **ck.batch_options), 1):
        if k in show:
            shots.append(to_uint8(out.x0))
        final = out.x_t
    return [*shots, to_uint8(final)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/mnist"))
    p.add_argument("--data", type=Path, required=True, help="the MNIST folder (IDX files)")
    p.add_argument("--out", type=Path, default=Path("docs/conditioned.png"))
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()

    torch.set_grad_enabled(False)
    ck = load_checkpoint(args.checkpoint)
    data = load_images(args.data, size=28, channels=1, split="test")
    digits = data.images.float() / 127.5 - 1.0
    labels = data.labels
    kind = sampler_kind("dpm++2m")
    show = [args.steps // 4, args.steps // 2, 3 * args.steps // 4]

    a, b = digits[0], digits[1]                       # a 7 and a 2 in MNIST's test set
    mask = torch.zeros(1, 28, 28)
    mask[:, 14:] = 1                                  # generate the lower half
    rows = []
    inpaint = _run(ck, [SlotSpec(seed=1, steps=args.steps, kind=kind, label=int(labels[0]),
                                 guidance=2.0, init=a, mask=mask)], show)
    masked = to_uint8((a * (1 - mask) - mask)[None])
    rows.append([to_uint8(a[None]), to_uint8((mask * 2 - 1)[None]), masked,
                 *[r[:1] for r in inpaint]])
    other = (int(labels[0]) + 1) % 10
    img2img = _run(ck, [SlotSpec(seed=2, steps=args.steps, kind=kind, label=other,
                                 guidance=2.0, init=a, strength=0.9)], show)
    rows.append([to_uint8(a[None]), *[r[:1] for r in img2img]])
    frames = 6
    interp = _run(ck, [SlotSpec(seed=3, index=0, steps=args.steps // 2, kind=kind, init=a,
                                init_b=b, mix=k / (frames - 1), strength=0.5)
                       for k in range(frames)], [])
    rows.append([to_uint8(a[None]), *[interp[-1][k:k + 1] for k in range(frames)],
                 to_uint8(b[None])])

    cell = 28 * SCALE + PAD
    width = max(len(r) for r in rows) * cell + PAD
    sheet = Image.new("L", (width, len(rows) * cell + PAD), 128)
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            tile = Image.fromarray(img[0, :, :, 0].numpy()).resize((28 * SCALE,) * 2,
                                                                  Image.Resampling.NEAREST)
            sheet.paste(tile, (PAD + x * cell, PAD + y * cell))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.size[0]}×{sheet.size[1]})")


if __name__ == "__main__":
    main()
