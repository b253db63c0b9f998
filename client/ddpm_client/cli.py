"""`ddpm-client generate`: generate on a running server from the shell where only this
package (and httpx) is installed — a laptop without torch. It is the one implementation of
the command: the server's `ddpm generate` adds these flags to its parser and calls
`run_generate`, so the two cannot drift apart."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .errors import ClientError, WaitTimeout
from .sync import Client
from .types import EventType

# File extensions of the snapshot frame formats (`--stream`); the keys are the formats
# `--snapshot-format` offers.
FRAME_EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}

DESCRIPTION = ("Submits to the server's native API, shows the progress from its events and "
               "downloads the images into --out as 0000.png, 0001.png…, with generation.json. "
               "Values are checked by the server, so a bad one is its 422 in one line and the "
               "limits are its own.")


def frame_extension(fmt: str) -> str:
    """A frame file's extension; a format this command does not know is its own (or `bin`
    when it is not a plain word: it becomes part of a file name)."""
    return FRAME_EXTENSIONS.get(fmt, fmt if fmt.isascii() and fmt.isalnum() else "bin")


def add_generate_arguments(g: argparse.ArgumentParser, samplers: Sequence[str] = ()) -> None:
    """The flags of `generate`, for this package's parser and for `ddpm generate`'s.
    `samplers` only fills the help (the server's CLI knows the names; this package does
    not, and a wrong name's 422 lists them)."""
    g.add_argument("--server", required=True, help="the API's base URL, e.g. "
                   "http://127.0.0.1:8000")
    g.add_argument("--api-key", default=None,
                   help="the server's API key (default: $DDPM_API_KEY, if set)")
    g.add_argument("--model", help="served model (default: the only one served)")
    g.add_argument("--num-images", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--sampler", help=f"{', '.join(samplers) or 'the sampler'} "
                   "(default dpm++2m)")
    g.add_argument("--seed", type=int, help="default: random, written to generation.json")
    g.add_argument("--class-label", type=int, help="class of conditional models")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance (needs a "
                   "class label)")
    g.add_argument("--init-image", type=Path, help="input image (img2img; inpainting with "
                   "--mask; interpolation with --interpolate-to)")
    g.add_argument("--mask", type=Path, help="white (>= 128) or transparent: the region to "
                   "generate")
    g.add_argument("--interpolate-to", type=Path, help="second image of an interpolation "
                   "(--num-images frames)")
    g.add_argument("--strength", type=float, help="(0, 1]: how far into the noise the input "
                   "image goes")
    g.add_argument("--out", type=Path, default=Path("out"), help="output directory (out)")
    g.add_argument("--stream", action="store_true", help="also write the denoising frames "
                   "as they arrive, into OUT/frames/ (IMAGE-STEP.png, .webp or .jpg: as "
                   "the server encodes them)")
    g.add_argument("--snapshot-every", type=int, default=5,
                   help="with --stream: a frame every N steps (5)")
    g.add_argument("--snapshot-size", type=int, help="with --stream: frames this many pixels "
                   "a side (default: the image size up to 64, else 128)")
    g.add_argument("--snapshot-format", choices=tuple(FRAME_EXTENSIONS),
                   help="with --stream: the frames' format (default: png up to 64 pixels, "
                   "else jpeg)")
    g.add_argument("--snapshot-quality", type=int, help="with --stream: quality 1-100 of "
                   "webp and jpeg frames (75)")
    g.add_argument("--timeout", type=float, help="give up waiting after this many seconds")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm-client", description="ddpm-serve from the shell, "
                                "with the ddpm-client package alone (no torch).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_arguments(sub.add_parser(
        "generate", help="generate on a running server (ddpm serve / ddpm api) into PNG files",
        description=DESCRIPTION))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The `ddpm-client` console script. Every failure is one line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return run_generate(args)
    except ValueError as e:
        print(f"ddpm-client {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


class _Progress:
    """`running: 12/12 steps` on one line of `file`, rewritten in place as the events come
    (no tqdm: this package needs httpx alone)."""

    def __init__(self, total: int | None, desc: str, file: TextIO) -> None:
        self.total, self.desc, self.file, self.n = total, desc, file, 0
        self._shown = ""
        self.show()

    def show(self) -> None:
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        line = f"{self.desc}: {count} steps"
        if line != self._shown:
            self.file.write(f"\r{line}")
            self.file.flush()
            self._shown = line

    def update(self, *, n: int | None = None, desc: str | None = None) -> None:
        self.n = self.n if n is None else n
        self.desc = self.desc if desc is None else desc
        self.show()

    def close(self) -> None:
        self.file.write("\n")
        self.file.flush()


def run_generate(args: argparse.Namespace) -> int:
    """Submit, follow the events (progress on stderr, frames with --stream), download.
    A failure raises ValueError with one line to print (the caller adds its name); Ctrl-C
    or --timeout cancels the job, since nobody will take its images."""
    fields = {k: getattr(args, k) for k in (
        "model", "num_images", "steps", "sampler", "seed", "class_label", "guidance_scale",
        "init_image", "mask", "interpolate_to", "strength")}
    if args.stream:
        fields["snapshot_every"] = args.snapshot_every
        for k in ("snapshot_size", "snapshot_format", "snapshot_quality"):
            if getattr(args, k) is not None:
                fields[k] = getattr(args, k)
    key = args.api_key or os.environ.get("DDPM_API_KEY") or None
    job = None
    try:
        with Client(args.server, api_key=key) as client:
            try:
                job = client.submit(**fields)
                print(f"{job.id}: {job.model}, {job.num_images} image(s), seed {job.seed}",
                      file=sys.stderr)
                frames = args.out / "frames"
                bar = _Progress(job.progress.total_steps or None, job.status, sys.stderr)
                try:
                    for ev in client.events(job.id, timeout=args.timeout):
                        if ev.type == EventType.PROGRESS:
                            bar.update(n=int(ev.data.get("steps_done", 0)), desc="running")
                        elif ev.type == EventType.SNAPSHOT and ev.image is not None:
                            frames.mkdir(parents=True, exist_ok=True)
                            ext = frame_extension(ev.format or "png")
                            (frames / f"{ev.index or 0:04d}-{ev.step or 0:04d}.{ext}"
                             ).write_bytes(ev.image)
                        elif ev.terminal:
                            bar.update(desc=str(ev.type))
                finally:
                    bar.close()
                done = client.wait(job.id)
                result = client.result(done.id)
            except (KeyboardInterrupt, WaitTimeout):   # nobody will take the images
                if job is not None:
                    with contextlib.suppress(ClientError):
                        client.cancel(job.id)
                raise
    except (ClientError, OSError) as e:       # WaitTimeout is a TimeoutError, an OSError
        raise ValueError(" ".join(str(e).split())) from None    # one line
    paths = result.save(args.out)
    (args.out / "generation.json").write_text(json.dumps(done.raw, indent=2) + "\n")
    print(f"wrote {len(paths)} images to {args.out}")
    return 0
