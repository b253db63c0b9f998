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


def _range(field: str, end: str = "") -> str:
    """A request field's bounds as `GenerationSpec` declares them ("1..1000", "(0, 1]"), or
    one end of them ("le"): the help states them, the spec checks them."""
    from contract.rules import bounds
    from contract.spec import GenerationSpec

    b = bounds(GenerationSpec, field)
    if end:
        return f"{b[end]}"
    lo, hi = b.get("ge", b.get("gt")), b.get("le", b.get("lt"))
    if "gt" in b or "lt" in b:
        return f"{'(' if 'gt' in b else '['}{lo}, {hi}{')' if 'lt' in b else ']'}"
    return f"{lo}..{hi}"


def _samplers() -> tuple[str, ...]:
    """The sampler names a request may give: contract's (torch-free, so building
    the parser imports no torch; a test ties them to models.SAMPLER_NAMES)."""
    from typing import get_args

    from contract.limits import Sampler

    return get_args(Sampler)


class _PresetHelp(str):
    """`--preset`'s help, filled with models.PRESETS only when help is printed (argparse
    formats every help with `%`): models imports torch, which `ddpm api` must never load."""

    __slots__ = ()

    def __mod__(self, params: object) -> str:
        from models import PRESETS

        return f"model preset: {', '.join(PRESETS)}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm", description="Train, convert, sample and serve DDPMs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("sample", help="generate images offline into PNG files")
    s.add_argument("checkpoint", type=Path, help="checkpoint directory")
    s.add_argument("--sampler", choices=_samplers(), default="ddim")
    s.add_argument("--steps", type=int, default=50,
                   help=f"denoising steps ({_range('steps')}; at most the model's T)")
    s.add_argument("--num-images", type=int, default=16, help=(
        f"images to write; past {_range('num_images', 'le')} (one request's) they run as "
        "more requests' images"))
    s.add_argument("--seed", type=int, default=0, help=_range("seed"))
    s.add_argument("--batch-size", type=_bounded_int(1, 4096), default=64)
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--eta", type=float, default=0.0,
                   help=f"DDIM η ({_range('eta')}; 0 = deterministic; ddim only)")
    s.add_argument("--class-label", type=int, default=None,
                   help=f"class of conditional models ({_range('class_label')}; below the "
                        "model's number of classes)")
    s.add_argument("--guidance-scale", type=float, default=1.0,
                   help=f"classifier-free guidance scale ({_range('guidance_scale')}; 1 = "
                        "none; needs --class-label)")
    s.add_argument("--out", type=Path, required=True, help="output directory")
    s.add_argument("--grid", action="store_true", help="also write grid.png")
    c = s.add_argument_group(
        "image-conditioned", "start from an image (img2img), repaint a region of it "
        "(inpainting) or interpolate between two images; images are fitted to the model")
    c.add_argument("--init-image", type=Path, help="input image (img2img; inpainting with "
                   "--mask)")
    c.add_argument("--mask", type=Path, help="white (>= 128) marks the region to generate; "
                   "with an alpha channel, alpha 0 marks it")
    c.add_argument("--interpolate", type=Path, nargs=2, metavar=("A", "B"),
                   help="interpolate from image A to image B (--frames images)")
    c.add_argument("--frames", type=int, default=8, help=(
        f"interpolation frames (with --interpolate; 2..{_range('num_images', 'le')})"))
    c.add_argument("--strength", type=float, help=f"{_range('strength')}: how far into the "
                   "noise the input goes; default: img2img 0.75, interpolation 0.5, "
                   "inpainting 1")
    c.add_argument("--jump-length", type=int, default=10, help=(
        f"RePaint resampling: timesteps per jump back ({_range('jump_length')}; with --mask)"))
    c.add_argument("--jump-n-sample", type=int, default=1, help=(
        f"RePaint resampling: passes over each jump ({_range('jump_n_sample')}; 1 = none; "
        "with --mask)"))

    t = sub.add_parser(
        "train", help="train a DDPM; the output folder is a servable checkpoint",
        description="Defaults come from the preset (the paper's for cifar10). Multi-GPU: "
                    "torchrun --nproc-per-node N -m ddpm train ... (the same flags).")
    t.add_argument("--data", type=Path,
                   help="image folder or .tar(.gz), .npz/.npy, CIFAR-10 batches, MNIST IDX")
    t.add_argument("--preset", help=_PresetHelp("model preset: %(presets)s"))
    t.add_argument("--out", type=Path, required=True, help="run / checkpoint directory")
    t.add_argument("--steps", type=_bounded_int(1), help="total optimizer steps")
    t.add_argument("--batch-size", type=_bounded_int(1, 65536), help="global batch size")
    t.add_argument("--lr", type=float, help="Adam learning rate")
    t.add_argument("--warmup", type=_bounded_int(0), help="linear warm-up steps")
    t.add_argument("--grad-clip", type=float, help="max gradient norm (0 = off)")
    t.add_argument("--ema-decay", type=float, help="EMA decay of the served weights")
    t.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips")
    t.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=None,
                   help="class-conditional on the data's labels (default: if the preset is)")
    t.add_argument("--label-dropout", type=float,
                   help="share of labels dropped for classifier-free guidance (default 0.1)")
    t.add_argument("--image-size", type=_bounded_int(4, 4096), help="override the preset's")
    t.add_argument("--dropout", type=float, help="override the preset's dropout")
    t.add_argument("--max-images", type=_bounded_int(1), help="use the first N images only")
    t.add_argument("--seed", type=_bounded_int(0, 2**62))
    t.add_argument("--save-every", type=_bounded_int(1), help="checkpoint interval in steps")
    t.add_argument("--sample-every", type=_bounded_int(1), help="sample-grid interval")
    t.add_argument("--sample-steps", type=_bounded_int(1, 1000), default=50,
                   help="DDIM steps of the sample grids")
    t.add_argument("--log-every", type=_bounded_int(1), default=10)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda")
    t.add_argument("--no-bf16", dest="bf16", action="store_false", help="CUDA: train in fp32")
    t.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    t.add_argument("--no-progress", dest="progress", action="store_false")

    e = sub.add_parser("eval", help="FID and classifier score of a checkpoint's samples",
                       description="Scores N samples against a reference data set; --real "
                                   "scores real held-out images the same way (the ceiling).")
    e.add_argument("checkpoint", type=Path, nargs="?", help="checkpoint directory")
    e.add_argument("--reference", type=Path, required=True, help="reference data set")
    e.add_argument("--reference-split", default="train", choices=["train", "test"])
    e.add_argument("--real", type=Path, help="also score real images of this data set")
    e.add_argument("--real-split", default="test", choices=["train", "test"])
    e.add_argument("--num-samples", type=_bounded_int(2, 100_000), default=2000)
    e.add_argument("--sampler", choices=_samplers(), default="ddim")
    e.add_argument("--steps", type=_bounded_int(1), default=50)
    e.add_argument("--eta", type=float, default=0.0)
    e.add_argument("--guidance-scale", type=float, default=1.0)
    e.add_argument("--fid-network", type=Path, help="InceptionV3 TorchScript file (FID)")
    e.add_argument("--classifier", type=Path, help="ddpm train-classifier file (digit score)")
    e.add_argument("--batch-size", type=_bounded_int(1, 4096), default=250)
    e.add_argument("--seed", type=_bounded_int(0, 2**63 - 1), default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", type=Path, help="also write the figures to this JSON file")

    k = sub.add_parser("train-classifier", help="train the small CNN that ddpm eval scores with")
    k.add_argument("--data", type=Path, required=True, help="labelled data set")
    k.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    k.add_argument("--image-size", type=_bounded_int(8, 256), default=28)
    k.add_argument("--channels", type=int, choices=[1, 3], default=1)
    k.add_argument("--epochs", type=_bounded_int(1, 100), default=2)
    k.add_argument("--seed", type=_bounded_int(0, 2**62), default=0)

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
    a.add_argument("--workers", type=_bounded_int(1, 64), default=1,
                   help="API processes sharing the port (default 1); /metrics sums them")

    v = sub.add_parser("serve", help="all-in-one: embedded Redis, one worker and the API",
                       description="Uses DDPM_REDIS_URL's Redis if set, else starts one.")
    _listen_flags(v)
    v.add_argument("--models-dir", type=Path, default=Path("checkpoints"),
                   help="checkpoint directory or directory of them (default: checkpoints)")
    v.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
    v.add_argument("--metrics-port", type=_bounded_int(0, 65535),
                   help="the worker's Prometheus port (DDPM_METRICS_PORT; default 9100 if "
                        "free; 0 = off); the API's metrics are at /metrics")
    d = v.add_mutually_exclusive_group()
    d.add_argument("--data-dir", type=Path,
                   help="where the embedded Redis keeps its append-only file, so a restart "
                        "keeps every job (DDPM_SERVE_DATA_DIR; default "
                        "$XDG_STATE_HOME/ddpm-serve/redis; `make run`: .state/redis)")
    d.add_argument("--ephemeral", action="store_true", default=None,
                   help="a throwaway embedded Redis: nothing kept (DDPM_SERVE_EPHEMERAL)")

    sub.add_parser("api-key", help="make an API key and the digest to put in DDPM_API_KEYS")
    _generate_parser(sub)
    return p


def _generate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ddpm generate`: a running server does the work. The command is the ddpm-client
    package's (`ddpm-client generate`, its one implementation): its flags, then its
    `run_generate`. Without that package (the API image) the parser still builds, and the
    command says what to install."""
    help_ = "generate on a running server (ddpm serve / ddpm api) into PNG files"
    try:
        from ddpm_client.cli import DESCRIPTION, add_generate_arguments
    except ImportError:
        # '+' prefixes: every argument, flags included, is taken and left unread.
        g = sub.add_parser("generate", help=help_, prefix_chars="+", add_help=False)
        g.add_argument("args", nargs=argparse.REMAINDER)
        return
    add_generate_arguments(sub.add_parser("generate", help=help_, description=DESCRIPTION),
                           samplers=_samplers())


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
    from .sample import run_sample, sample_options

    files = run_sample(sample_options(args))
    print(f"wrote {len(files)} files to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import logging

    from training.trainer import TrainOptions, train

    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fields = ("data", "out", "preset", "steps", "batch_size", "lr", "warmup", "grad_clip",
              "ema_decay", "hflip", "conditional", "label_dropout", "image_size", "dropout",
              "max_images", "seed", "save_every", "sample_every", "sample_steps", "log_every",
              "device", "bf16", "compile", "resume", "progress")
    out = train(TrainOptions(**{k: getattr(args, k) for k in fields}))
    print(f"checkpoint: {out}  (serve it: ddpm serve --models-dir {out})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from training.evaluate import EvalOptions, evaluate, format_rows

    if not 0.0 <= args.eta <= 1.0:
        raise ValueError("--eta must be in [0, 1]")
    fields = ("checkpoint", "reference", "reference_split", "real", "real_split", "num_samples",
              "sampler", "steps", "eta", "guidance_scale", "fid_network", "classifier",
              "batch_size", "seed", "device")
    rows = evaluate(EvalOptions(**{k: getattr(args, k) for k in fields}))
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from training.classifier import predict, save_classifier, train_classifier
    from training.data import load_images

    data = load_images(args.data, size=args.image_size, channels=args.channels)
    net = train_classifier(data, epochs=args.epochs, seed=args.seed)
    save_classifier(net, args.out)
    try:
        test = load_images(args.data, size=args.image_size, channels=args.channels,
                           split="test")
    except ValueError:
        test = None
    if test is not None and test.labels is not None and test.source != data.source:
        acc = (predict(net, test.images).argmax(1) == test.labels).float().mean()
        print(f"held-out accuracy: {float(acc):.4f} on {len(test)} images ({test.source})")
    print(f"wrote {args.out}")
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

    settings = _api_settings(args)
    if args.workers > 1:
        return _api_processes(args, settings)
    from app.main import create_app

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Open event streams would hold a graceful shutdown forever: give them a few seconds.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=5,
                **settings.proxy_options())
    return 0


def _api_processes(args: argparse.Namespace, settings) -> int:  # type: ignore[no-untyped-def]
    """`--workers N`: uvicorn's supervisor and N processes on one port, each building its
    own app and settings from the environment (the flags are put there first). Their
    metrics go to a fresh directory for this run (PROMETHEUS_MULTIPROC_DIR), which each
    process's /metrics sums; it is removed at exit."""
    import os
    import tempfile

    import uvicorn

    for name in ("host", "port", "redis_url"):
        if getattr(args, name, None) is not None:
            os.environ[f"DDPM_{name.upper()}"] = str(getattr(args, name))
    with tempfile.TemporaryDirectory(prefix="ddpm-api-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        uvicorn.run("app.main:app_from_env", factory=True, workers=args.workers,
                    host=settings.host, port=settings.port,
                    log_level=settings.log_level.lower(), timeout_graceful_shutdown=5,
                    **settings.proxy_options())
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging
    import os

    from .serve import ServeOptions, ServeSettings, data_dir_of, run_serve

    settings = _api_settings(args)
    if "DDPM_REDIS_URL" in os.environ and (args.data_dir or args.ephemeral):
        raise ValueError("--data-dir and --ephemeral are the embedded Redis's; with "
                         "DDPM_REDIS_URL set, serve starts none")
    data_dir = data_dir_of(args.data_dir, bool(args.ephemeral), ServeSettings())
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    metrics_port = args.metrics_port
    if metrics_port is None and os.environ.get("DDPM_METRICS_PORT"):   # the worker's setting
        try:
            metrics_port = _bounded_int(0, 65535)(os.environ["DDPM_METRICS_PORT"])
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"bad DDPM_METRICS_PORT: {e}") from None
    return run_serve(ServeOptions(host=settings.host, port=settings.port,
                                  models_dir=args.models_dir, device=args.device,
                                  metrics_port=metrics_port, data_dir=data_dir), settings)


def _api_key(_: argparse.Namespace) -> int:
    from app.auth import new_key

    key, digest = new_key()
    print(f"key:    {key}\ndigest: {digest}\n\nGive the key to its user; configure the digest:"
          f"\n  DDPM_API_KEYS={digest}   (comma-separate several)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    """ddpm-client's `generate` (failures are its one-line ValueErrors, printed by main)."""
    try:
        from ddpm_client.cli import run_generate
    except ImportError:
        raise ValueError("needs the ddpm-client package: pip install ./client") from None
    return run_generate(args)


_COMMANDS = {"train": _train, "eval": _eval, "train-classifier": _train_classifier,
             "sample": _sample, "convert": _convert, "info": _info, "worker": _worker,
             "api": _api, "serve": _serve, "api-key": _api_key, "generate": _generate}
