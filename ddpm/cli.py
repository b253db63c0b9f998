"""`ddpm` — one command with subcommands; each imports its package only when run."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _bounded_int(lo: int, hi: int | None = None):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        v = int(text)
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"must be >= {lo}" if hi is None else f"must be in {lo}..{hi}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm", description="Train, convert, sample and serve DDPMs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("sample", help="generate images offline into PNG files")
    s.add_argument("checkpoint", type=Path, help="checkpoint directory")
    s.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m"], default="ddim")
    s.add_argument("--steps", type=_bounded_int(1), default=50, help="denoising steps (1..T)")
    s.add_argument("--num-images", type=_bounded_int(1, 100_000), default=16)
    s.add_argument("--seed", type=_bounded_int(0, 2**63 - 1), default=0)
    s.add_argument("--batch-size", type=_bounded_int(1, 4096), default=64)
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 = deterministic)")
    s.add_argument("--class-label", type=int, default=None, help="class of conditional models")
    s.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (1 = none)")
    s.add_argument("--out", type=Path, required=True, help="output directory")
    s.add_argument("--grid", action="store_true", help="also write grid.png")

    c = sub.add_parser("convert", help="convert a diffusers DDPM checkpoint to the native format")
    c.add_argument("src", type=Path, help="diffusers UNet2DModel folder or pipeline root")
    c.add_argument("dst", type=Path, help="native checkpoint directory to write")

    i = sub.add_parser("info", help="print a checkpoint's configuration and size")
    i.add_argument("checkpoint", type=Path)

    w = sub.add_parser("worker", help="run a GPU/CPU worker: batched diffusion jobs from Redis",
                       description="Flags override DDPM_* environment variables.")
    w.add_argument("--redis-url", help="e.g. redis://host:6379/0 (DDPM_REDIS_URL)")
    w.add_argument("--models-dir", type=Path, help="checkpoint directory or directory of them")
    w.add_argument("--model", dest="models", action="append",
                   help="serve only this model (repeatable)")
    w.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    w.add_argument("--max-batch", type=_bounded_int(1, 4096), help="slots (images) per step")
    w.add_argument("--name", help="RQ worker name")
    w.add_argument("--metrics-port", type=_bounded_int(0, 65535),
                   help="Prometheus port (0 = off)")
    w.add_argument("--no-bf16", dest="autocast_bf16", action="store_false", default=None,
                   help="CUDA: run the UNet in float32")
    w.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   default=None)
    w.add_argument("--burst", action="store_true", help="exit when the queues are empty")

    a = sub.add_parser("api", help="run the HTTP API (workers run separately)",
                       description="Flags override DDPM_* environment variables.")
    _listen_flags(a)
    a.add_argument("--redis-url", help="e.g. redis://host:6379/0 (DDPM_REDIS_URL)")

    v = sub.add_parser("serve", help="all-in-one: embedded Redis, one worker and the API",
                       description="Uses DDPM_REDIS_URL's Redis if set, else starts one.")
    _listen_flags(v)
    v.add_argument("--models-dir", type=Path, default=Path("checkpoints"),
                   help="checkpoint directory or directory of them (default: checkpoints)")
    v.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")

    sub.add_parser("api-key", help="make an API key and the digest to put in DDPM_API_KEYS")
    return p


def _listen_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_bounded_int(1, 65535), help="port (default 8000)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ValueError as e:  # CheckpointError, UsageError, bad option values
        print(f"ddpm {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _sample(args: argparse.Namespace) -> int:
    from .sample import SampleOptions, run_sample

    if not 0.0 <= args.eta <= 1.0:
        raise ValueError("--eta must be in [0, 1]")
    files = run_sample(SampleOptions(
        checkpoint=args.checkpoint, out=args.out, sampler=args.sampler, steps=args.steps,
        num_images=args.num_images, seed=args.seed, batch_size=args.batch_size,
        device=args.device, eta=args.eta, class_label=args.class_label,
        guidance_scale=args.guidance_scale, grid=args.grid,
    ))
    print(f"wrote {len(files)} files to {args.out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from models.diffusers_import import convert_diffusers

    cfg = convert_diffusers(args.src, args.dst)
    print(f"wrote {args.dst} ({cfg.unet.image_size}px, {len(cfg.unet.ch_mult)} levels, "
          f"{cfg.diffusion.num_timesteps} steps, {cfg.diffusion.variance_type})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from models import count_parameters, load_checkpoint

    ck = load_checkpoint(args.checkpoint)
    doc = {"path": str(ck.path), "parameters": count_parameters(ck.net), **ck.config.to_dict()}
    print(json.dumps(doc, indent=2))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker
    from worker.settings import WorkerSettings

    flags = ("redis_url", "models_dir", "models", "device", "max_batch", "name", "metrics_port",
             "autocast_bf16", "channels_last")
    overrides = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    try:
        settings = WorkerSettings(**overrides)
    except Exception as e:  # pydantic ValidationError: bad DDPM_* values
        raise ValueError(f"bad settings: {e}") from None
    try:
        return run_worker(settings, burst=args.burst)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def _api_settings(args: argparse.Namespace, **extra: object):  # type: ignore[no-untyped-def]
    from app.settings import ApiSettings

    overrides = {k: getattr(args, k, None) for k in ("host", "port", "redis_url")}
    try:
        return ApiSettings(**{k: v for k, v in overrides.items() if v is not None}, **extra)
    except Exception as e:  # pydantic ValidationError: bad DDPM_* values
        raise ValueError(f"bad settings: {e}") from None


def _api(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from app.main import create_app

    settings = _api_settings(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Open event streams would hold a graceful shutdown forever: give them a few seconds.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=5)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from .serve import ServeOptions, run_serve

    settings = _api_settings(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_serve(ServeOptions(host=settings.host, port=settings.port,
                                  models_dir=args.models_dir, device=args.device), settings)


def _api_key(_: argparse.Namespace) -> int:
    from app.auth import new_key

    key, digest = new_key()
    print(f"key:    {key}\ndigest: {digest}\n\nGive the key to its user; configure the digest:"
          f"\n  DDPM_API_KEYS={digest}   (comma-separate several)")
    return 0


_COMMANDS = {"sample": _sample, "convert": _convert, "info": _info, "worker": _worker,
             "api": _api, "serve": _serve, "api-key": _api_key}
