"""The training loop: ε-prediction with EMA, warm-up, clipping, bf16, DDP and exact resume.

The output directory is a checkpoint the workers serve as is (`config.json` and the EMA
weights in `model.safetensors`), plus what training itself needs and what a person wants
to look at:

    out/config.json, model.safetensors   the EMA model, rewritten every --save-every steps
    out/training-state.pt                raw weights, EMA, Adam state, step (for --resume)
    out/log.jsonl                        loss, lr, grad norm, images/s every --log-every
    out/loss.png                         the loss curve
    out/samples/step_NNNNNNN.png         a sample grid every --sample-every steps

Exact resume without saving RNG states: every random draw of step k (data order, t, ε,
flips, label dropout, dropout masks) comes from generators seeded by (seed, k), so the
state at a step boundary is only weights, EMA, optimizer and k.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from tqdm import tqdm

from models import (
    ModelConfig,
    SamplerKind,
    Schedule,
    SlotSpec,
    atomic_write,
    batch_options,
    build_network,
    from_uint8,
    make_grid,
    preset,
    sample,
    save_checkpoint,
    save_png,
    to_uint8,
    training_loss,
)

from .data import ImageData, load_images
from .distributed import Dist, setup, teardown
from .plots import loss_curve
from .presets import TRAIN_DEFAULTS

log = logging.getLogger(__name__)

STATE_FILE = "training-state.pt"
LOG_FILE = "log.jsonl"
LOSS_FILE = "loss.png"
SAMPLES_DIR = "samples"
STATE_FORMAT = "ddpm-serve-train/1"


class TrainError(ValueError):
    """Options that cannot start or continue a run; the CLI prints it without a traceback."""


@dataclass(frozen=True)
class TrainOptions:
    """What `ddpm train` was asked; None means the preset's default (or the saved run's)."""

    data: Path | None                    # None on --resume: the run's own data
    out: Path
    preset: str | None = None            # None on --resume: the run's own preset
    steps: int | None = None
    batch_size: int | None = None        # global: split across DDP processes
    lr: float | None = None
    warmup: int | None = None
    grad_clip: float | None = None
    ema_decay: float | None = None
    hflip: bool | None = None
    conditional: bool | None = None      # None: if the preset is conditional and data has labels
    label_dropout: float | None = None   # share of labels replaced by "no class" (for CFG)
    image_size: int | None = None
    dropout: float | None = None
    max_images: int | None = None        # train on the first N images only
    seed: int | None = None
    save_every: int | None = None
    sample_every: int | None = None
    sample_steps: int = 50
    log_every: int = 10
    device: str = "auto"
    bf16: bool = True                    # CUDA only
    compile: bool = False
    resume: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Hyper:
    """The resolved settings that shape a run; saved with it and kept by `--resume`."""

    data: str
    preset: str
    batch_size: int
    lr: float
    warmup: int
    grad_clip: float
    ema_decay: float
    hflip: bool
    conditional: bool | None
    label_dropout: float
    image_size: int
    dropout: float
    max_images: int | None
    seed: int


def _resolve(opts: TrainOptions) -> Hyper:
    if opts.data is None or opts.preset is None:
        raise TrainError("--data and --preset are required (except with --resume)")
    base = preset(opts.preset)
    d = TRAIN_DEFAULTS.get(opts.preset, TRAIN_DEFAULTS["cifar10"])

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return Hyper(
        data=str(Path(opts.data).resolve()), preset=opts.preset,
        batch_size=pick(opts.batch_size, d.batch_size), lr=pick(opts.lr, d.lr),
        warmup=pick(opts.warmup, d.warmup), grad_clip=pick(opts.grad_clip, d.grad_clip),
        ema_decay=pick(opts.ema_decay, d.ema_decay), hflip=pick(opts.hflip, d.hflip),
        conditional=opts.conditional, label_dropout=pick(opts.label_dropout, 0.1),
        image_size=pick(opts.image_size, base.unet.image_size),
        dropout=pick(opts.dropout, base.unet.dropout), max_images=opts.max_images,
        seed=pick(opts.seed, 0),
    )


def _check(h: Hyper, world: int) -> None:
    if h.batch_size < 1 or h.batch_size % world:
        raise TrainError(f"--batch-size {h.batch_size} must be a positive multiple of the "
                         f"{world} processes")
    if not (h.lr > 0 and math.isfinite(h.lr)):
        raise TrainError("--lr must be a positive number")
    if h.warmup < 0 or h.grad_clip < 0:
        raise TrainError("--warmup and --grad-clip must be >= 0")
    if not 0 <= h.ema_decay < 1:
        raise TrainError("--ema-decay must be in [0, 1)")
    if not 0 <= h.label_dropout < 1:
        raise TrainError("--label-dropout must be in [0, 1)")


def _seed(*parts: object) -> int:
    """A 63-bit seed from any tuple: the generators of step k depend only on (seed, k)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DataOrder:
    """Shuffled epochs, reproducible from the seed: the batch of step k needs no state."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_seed(self.seed, "order", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, step: int) -> Tensor:
        out, pos, end = [], step * self.batch, (step + 1) * self.batch
        while pos < end:
            epoch, at = divmod(pos, self.n)
            take = min(end - pos, self.n - at)
            out.append(self._permutation(epoch)[at:at + take])
            pos += take
        return torch.cat(out)


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · net, for every parameter and buffer."""
    e = [p for p in ema.parameters()]
    n = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(e, n, 1.0 - decay)
    for be, bn in zip(ema.buffers(), net.buffers(), strict=True):
        be.copy_(bn)


def ema_decay_at(step: int, decay: float) -> float:
    """The decay after `step` updates, ramped up so early weights do not linger."""
    return min(decay, (1 + step) / (10 + step))


def lr_at(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def _hardware(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return f"{world} × {name}" if world > 1 else name


@contextmanager
def _stop_requests() -> Iterator[list[bool]]:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (a second Ctrl-C
    interrupts at once), so the checkpoint written on the way out is consistent."""
    flag = [False]
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if flag[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag[0] = True

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no signal handling
        pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class Run:
    """One training run: the model, its EMA, the optimizer and the output directory."""

    def __init__(self, opts: TrainOptions, d: Dist) -> None:
        self.opts, self.d = opts, d
        self.out = Path(opts.out)
        saved = self._saved_state()
        self.hyper = Hyper(**saved["hyper"]) if saved else _resolve(opts)
        if saved:
            self._check_resume_options()
        _check(self.hyper, d.world)
        defaults = TRAIN_DEFAULTS.get(self.hyper.preset, TRAIN_DEFAULTS["cifar10"])
        self.steps = opts.steps or (saved["steps"] if saved else defaults.steps)
        self.save_every = opts.save_every or defaults.save_every
        self.sample_every = opts.sample_every or defaults.sample_every

        self.data = self._load_data()
        self.config = self._model_config(self.data)
        self.schedule = Schedule.from_config(self.config.diffusion)
        torch.manual_seed(self.hyper.seed)  # the same initial weights in every process
        self.net = build_network(self.config.unet).to(d.device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.hyper.lr)
        self.step = 0
        self.wall = 0.0
        if saved:
            self.net.load_state_dict(saved["model"])
            self.ema.load_state_dict(saved["ema"])
            self.opt.load_state_dict(saved["optimizer"])
            self.step, self.wall = int(saved["step"]), float(saved["wall_seconds"])
        self.order = DataOrder(len(self.data), self.hyper.batch_size, self.hyper.seed)

    # Setup ------------------------------------------------------------------------------

    def _saved_state(self) -> dict[str, Any]:
        file = self.out / STATE_FILE
        if not self.opts.resume:
            if file.exists():
                raise TrainError(f"{self.out} already holds a training run; pass --resume to "
                                 "continue it, or choose another --out")
            return {}
        if not file.is_file():
            raise TrainError(f"--resume: {file} does not exist")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise TrainError(f"--resume: {file} is not readable ({e})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TrainError(f"--resume: {file} is not a {STATE_FORMAT} training state")
        return state

    def _check_resume_options(self) -> None:
        given = {f.name for f in dataclasses.fields(TrainOptions)
                 if getattr(self.opts, f.name) not in (None, f.default)}
        if "data" not in given:
            self.opts = dataclasses.replace(self.opts, data=Path(self.hyper.data))
        if "preset" not in given:
            self.opts = dataclasses.replace(self.opts, preset=self.hyper.preset)
        asked = _resolve(self.opts)
        for f in dataclasses.fields(Hyper):
            if f.name in given and getattr(asked, f.name) != getattr(self.hyper, f.name):
                raise TrainError(f"--resume keeps the run's {f.name} "
                                 f"({getattr(self.hyper, f.name)!r}); "
                                 f"{getattr(asked, f.name)!r} was given")

    def _load_data(self) -> ImageData:
        base = preset(self.hyper.preset).unet
        data = load_images(self.hyper.data, size=self.hyper.image_size,
                           channels=base.in_channels)
        if self.hyper.max_images:
            data.images = data.images[:self.hyper.max_images]
            if data.labels is not None:
                data.labels = data.labels[:self.hyper.max_images]
        if len(data) < 1:
            raise TrainError(f"{self.hyper.data}: no images")
        return data

    @property
    def conditional(self) -> bool:
        want = self.hyper.conditional
        if want and self.data.labels is None:
            raise TrainError(f"--conditional: {self.hyper.data} has no labels (use class "
                             "sub-folders, a labels array or a labelled format)")
        if want is None:
            want = preset(self.hyper.preset).unet.num_classes > 0 and self.data.labels is not None
        return bool(want) and self.data.num_classes > 1

    def _model_config(self, data: ImageData) -> ModelConfig:
        base = preset(self.hyper.preset)
        cond = self.conditional
        try:
            cfg = base.replace(image_size=self.hyper.image_size, dropout=self.hyper.dropout,
                               num_classes=data.num_classes if cond else 0)
        except ValueError as e:
            raise TrainError(f"--image-size {self.hyper.image_size}: {e}") from None
        return dataclasses.replace(cfg, class_names=data.class_names if cond else ())

    # The loop ---------------------------------------------------------------------------

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """This process's share of the global batch of `step`: x0, t, ε, labels."""
        h, d, u = self.hyper, self.d, self.config.unet
        g = torch.Generator().manual_seed(_seed(h.seed, "batch", step))
        n = h.batch_size
        idx = self.order.indices(step)
        t = torch.randint(0, self.schedule.num_timesteps, (n,), generator=g)
        noise = torch.randn((n, u.in_channels, u.image_size, u.image_size), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        drop = torch.rand(n, generator=g) < h.label_dropout
        local = slice(d.rank * n // d.world, (d.rank + 1) * n // d.world)
        dev = d.device
        x = from_uint8(self.data.images[idx[local]].to(dev))
        if h.hflip:
            x = torch.where(flip[local].to(dev).view(-1, 1, 1, 1), x.flip(3), x)
        y = None
        if u.num_classes:
            assert self.data.labels is not None
            y = torch.where(drop[local], u.num_classes, self.data.labels[idx[local]]).to(dev)
        return x, t[local].to(dev), noise[local].to(dev), y

    def run(self) -> Path:
        d, h = self.d, self.hyper
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._trim_log()
            log.info("training %s on %s (%d images%s) for %d steps on %s", h.preset,
                     self.data.source, len(self.data),
                     f", {self.data.num_classes} classes" if self.config.unet.num_classes else "",
                     self.steps, d.device)
        model: nn.Module = self.net
        if d.world > 1:
            model = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        forward = torch.compile(model) if self.opts.compile else model
        cuda = d.device.type == "cuda"
        self.net.train()

        bar = tqdm(total=self.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (d.main and self.opts.progress), desc="training")
        acc, acc_n = torch.zeros((), device=d.device), 0
        tick = time.perf_counter()
        interval_start = tick
        with _stop_requests() as stop:
            while self.step < self.steps:
                if self._should_stop(stop[0]):
                    break
                x, t, noise, y = self.batch(self.step)
                torch.manual_seed(_seed(h.seed, "dropout", self.step, d.rank))
                lr = lr_at(self.step, h.lr, h.warmup)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and self.opts.bf16):
                    loss = training_loss(forward, self.schedule, x, y=y, t=t, noise=noise)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if h.grad_clip > 0:
                    norm = nn.utils.clip_grad_norm_(self.net.parameters(), h.grad_clip)
                else:
                    norm = torch.zeros(())
                self.opt.step()
                ema_update(self.ema, self.net, ema_decay_at(self.step, h.ema_decay))
                self.step += 1
                acc += loss.detach()
                acc_n += 1
                bar.update(1)

                if self.step % self.opts.log_every == 0 or self.step == self.steps:
                    now = time.perf_counter()
                    self.wall += now - tick
                    tick = now
                    mean = float(acc) / acc_n
                    if not math.isfinite(mean):
                        raise TrainError(f"the loss became {mean} at step {self.step}; lower "
                                         "--lr or raise --warmup")
                    rate = acc_n * h.batch_size / max(now - interval_start, 1e-9)
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                    if d.main:
                        self._log({"step": self.step, "loss": mean, "lr": lr,
                                   "grad_norm": float(norm), "images_per_s": round(rate, 1),
                                   "wall_seconds": round(self.wall, 1)})
                    acc.zero_()
                    acc_n, interval_start = 0, now
                if self.step % self.save_every == 0 and self.step < self.steps:
                    self.save()
                if self.step % self.sample_every == 0 and self.step < self.steps:
                    self.sample_grid()
        bar.close()
        self.wall += time.perf_counter() - tick
        self.save()
        if self.step >= self.steps:
            self.sample_grid()
        if stop[0]:
            raise KeyboardInterrupt
        return self.out

    def _should_stop(self, local: bool) -> bool:
        """Every process must stop at the same step: agree through an all-reduce under DDP."""
        if self.d.world == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.d.device)
        torch_dist.all_reduce(flag)
        return bool(flag.item() > 0)

    # Outputs ----------------------------------------------------------------------------

    def _log(self, entry: dict[str, Any]) -> None:
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _read_log(self) -> list[dict[str, Any]]:
        file = self.out / LOG_FILE
        if not file.is_file():
            return []
        entries = []
        for line in file.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return entries

    def _trim_log(self) -> None:
        """Drop log lines past the resumed step: they belong to work that was not saved."""
        entries = [e for e in self._read_log() if e.get("step", 0) <= self.step]
        atomic_write(self.out / LOG_FILE, lambda f: Path(f).write_text(
            "".join(json.dumps(e) + "\n" for e in entries)))

    def provenance(self) -> dict[str, Any]:
        h = self.hyper
        return {
            "trained_by": "ddpm-serve training (ddpm train)",
            "data": self.data.source, "data_path": h.data, "num_images": len(self.data),
            "preset": h.preset, "steps": self.step, "batch_size": h.batch_size, "lr": h.lr,
            "warmup": h.warmup, "grad_clip": h.grad_clip, "ema_decay": h.ema_decay,
            "hflip": h.hflip, "label_dropout": h.label_dropout if self.config.unet.num_classes
            else None, "seed": h.seed, "weights": "EMA",
            "wall_seconds": round(self.wall, 1),
            "hardware": _hardware(self.d.device, self.d.world),
            "bf16": self.d.device.type == "cuda" and self.opts.bf16,
            "torch": torch.__version__,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def save(self) -> None:
        """The servable EMA checkpoint, then the training state, each written atomically."""
        if not self.d.main:
            return
        config = dataclasses.replace(self.config, provenance=self.provenance())
        save_checkpoint(self.out, self.ema, config)
        state = {
            "format": STATE_FORMAT, "step": self.step, "steps": self.steps,
            "wall_seconds": self.wall, "hyper": dataclasses.asdict(self.hyper),
            "model": self.net.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
        }
        atomic_write(self.out / STATE_FILE, lambda f: torch.save(state, f))
        entries = self._read_log()
        loss_curve([e["step"] for e in entries], [e["loss"] for e in entries],
                   self.out / LOSS_FILE)

    def sample_grid(self) -> Path | None:
        """EMA samples with fixed seeds (so grids compare across steps): a row per class."""
        if not self.d.main:
            return None
        u = self.config.unet
        if u.num_classes:
            rows = min(u.num_classes, 10)
            specs = [SlotSpec(seed=self.hyper.seed, index=i, steps=self.opts.sample_steps,
                              kind=SamplerKind.DDIM, label=i // 8) for i in range(rows * 8)]
        else:
            specs = [SlotSpec(seed=self.hyper.seed, index=i, steps=self.opts.sample_steps,
                              kind=SamplerKind.DDIM) for i in range(64)]
        with torch.inference_mode():
            x = sample(self.ema, self.schedule, specs, device=self.d.device,
                       **batch_options(self.config))
        grid = make_grid(to_uint8(x), ncol=8)
        file = self.out / SAMPLES_DIR / f"step_{self.step:07d}.png"
        file.parent.mkdir(exist_ok=True)
        save_png(grid, file)
        return file


def train(opts: TrainOptions) -> Path:
    """Run (or resume) training as `opts` says; returns the checkpoint directory."""
    d = setup(opts.device)
    try:
        return Run(opts, d).run()
    finally:
        teardown(d)
