"""Our offline sampler vs diffusers' scheduler loops, on identical weights and step counts.

One network is built once and converted both ways: a randomly initialised diffusers
`UNet2DModel` with a preset's architecture, imported into our `UNet` by the same code as
`ddpm convert` (`--checkpoint`: a trained native checkpoint, exported to diffusers' names).
Before any timing the script prints how far apart the two ε are on the same x and t (and
the final DDIM samples from the same x_T), so a speed-up cannot come from computing
something else. Then, per sampler and batch size, it times

- ours: `sample_progressive` as `ddpm sample` calls it, under `torch.inference_mode()`, on
  the checkpoint loaded in the device's inference layout (`--layout`);
- diffusers: the loop a diffusers user writes (DDPMPipeline's, without the PIL step),
  `for t in scheduler.timesteps: eps = unet(x, t).sample; x = scheduler.step(eps, t, x)`,
  under `torch.no_grad()`, with DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler
  set up to compute what ours computes (trailing spacing, same clipping and variance; two
  differences are left, of no cost: respaced DDPM with σ² = β, the cifar10 preset's, adds
  noise on its last step in diffusers and not in ours, and diffusers' DPM-Solver++ does
  not clip x̂0, where ours clips it as the checkpoint says);

alternating the two within each repeat, and prints images/s and ours/diffusers (from the
best run of each, and from the medians). Not a test: nothing here asserts a speed.

    python -m bench.sampler_vs_diffusers --preset tiny                  # seconds, a smoke run
    python -m bench.sampler_vs_diffusers                                # cifar10, CPU, 1,16,64
    python -m bench.sampler_vs_diffusers --batch 1,16,64,256 --steps 20 --repeats 5 --json r.json
    python -m bench.sampler_vs_diffusers --layout contiguous            # ours before channels-last
    python -m bench.sampler_vs_diffusers --diffusers-channels-last      # the peer in it too
    python -m bench.sampler_vs_diffusers --device cuda --batch 1,16,64,256 --steps 50
    python -m bench.sampler_vs_diffusers --device cuda --bf16 --layout channels-last --compile
    python -m bench.sampler_vs_diffusers --checkpoint checkpoints/cifar10   # trained weights

On a shared machine, `--threads 1` and more `--repeats` make the ratios steadier.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models import (
    SAMPLER_NAMES,
    Checkpoint,
    DiffusionConfig,
    ModelConfig,
    Schedule,
    SlotSpec,
    UNet,
    UNetConfig,
    batch_options,
    count_parameters,
    counter_normal,
    image_seed,
    inference_memory_format,
    load_checkpoint,
    preset,
    read_config,
    sample_progressive,
    sampler_kind,
)
from models.diffusers_import import convert_diffusers, diffusers_key

SAMPLERS = SAMPLER_NAMES


# The same network, both ways ---------------------------------------------------------------


def diffusers_unet_config(u: UNetConfig) -> dict[str, Any]:
    """The UNet2DModel config of our architecture `u` (the google/ddpm-* layout)."""
    if u.num_classes:
        raise SystemExit("class-conditional models have no UNet2DModel equivalent here")
    levels = len(u.ch_mult)
    attn = [(u.image_size >> i) in u.attn_resolutions for i in range(levels)]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    return {
        "sample_size": u.image_size, "in_channels": u.in_channels, "out_channels": u.in_channels,
        "block_out_channels": [u.ch * m for m in u.ch_mult], "down_block_types": down,
        "up_block_types": [d.replace("Down", "Up") for d in reversed(down)],
        "layers_per_block": u.num_res_blocks, "attention_head_dim": None,
        "norm_num_groups": u.norm_groups, "norm_eps": u.norm_eps,
        "downsample_padding": u.downsample_padding, "flip_sin_to_cos": False, "freq_shift": 1,
        "dropout": u.dropout,
    }


def scheduler_config(d: DiffusionConfig) -> dict[str, Any]:
    """The DDPMScheduler config of our diffusion settings `d`."""
    return {"num_train_timesteps": d.num_timesteps, "beta_start": d.beta_start,
            "beta_end": d.beta_end,
            "beta_schedule": "linear" if d.beta_schedule == "linear" else "squaredcos_cap_v2",
            "variance_type": d.variance_type, "clip_sample": d.clip_denoised}


def build_pair(preset_name: str, checkpoint: Path | None, seed: int, device: torch.device,
               memory_format: torch.memory_format, tmp: Path) -> tuple[Checkpoint, Any]:
    """(our checkpoint, loaded as `ddpm sample` loads it; diffusers' UNet2DModel), holding
    the same weights, in eval mode on `device`.

    Random weights are diffusers' own initialisation, saved in the google/ddpm-* layout and
    imported with `convert_diffusers` (what `ddpm convert` runs); a trained native
    checkpoint goes the other way, through the importer's name map.
    """
    import diffusers

    if checkpoint is not None:
        ck = load_checkpoint(checkpoint, device=device, memory_format=memory_format)
        theirs = diffusers.UNet2DModel(**diffusers_unet_config(ck.config.unet))
        levels = len(ck.config.unet.ch_mult)
        theirs.load_state_dict({diffusers_key(k, levels): v.contiguous()
                                for k, v in ck.net.state_dict().items()})
        return ck, theirs.to(device).eval()
    config = preset(preset_name)
    torch.manual_seed(seed)
    theirs = diffusers.UNet2DModel(**diffusers_unet_config(config.unet))
    theirs.save_pretrained(tmp / "diffusers")
    diffusers.DDPMScheduler(**scheduler_config(config.diffusion)).save_pretrained(
        tmp / "diffusers")
    convert_diffusers(tmp / "diffusers", tmp / "native")
    ck = load_checkpoint(tmp / "native", device=device, memory_format=memory_format)
    assert (ck.config.unet, ck.config.diffusion) == (config.unet, config.diffusion)
    return ck, theirs.to(device).eval()


def diffusers_scheduler(name: str, config: ModelConfig) -> Any:
    """The diffusers scheduler that computes what our sampler `name` computes for `config`
    (the settings of tests/models/test_samplers_vs_diffusers.py)."""
    import diffusers

    sched = scheduler_config(config.diffusion)
    variance, clip = sched.pop("variance_type"), sched.pop("clip_sample")
    common = {**sched, "timestep_spacing": "trailing"}
    if name == "ddpm":
        return diffusers.DDPMScheduler(**common, variance_type=variance, clip_sample=clip)
    if name == "ddim":
        return diffusers.DDIMScheduler(**common, clip_sample=clip, set_alpha_to_one=True)
    if name == "dpm++2m":
        # diffusers clips x̂0 only with `thresholding`; ours clips as configured (one clamp).
        return diffusers.DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
            lower_order_final=True, thresholding=False)
    raise SystemExit(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


# The two loops ----------------------------------------------------------------------------


def our_sampler(net: Callable[..., Tensor], config: ModelConfig, name: str, steps: int,
                batch: int, device: torch.device) -> Callable[[], Tensor]:
    """Our offline sampler as `ddpm sample` runs it (one batch of `batch` images)."""
    schedule = Schedule.from_config(config.diffusion)
    kind = sampler_kind(name, config.diffusion.variance_type)
    specs = [SlotSpec(seed=0, index=i, steps=steps, kind=kind) for i in range(batch)]

    def run() -> Tensor:
        final = None
        with torch.inference_mode():
            for progress in sample_progressive(net, schedule, specs, device=device,
                                               **batch_options(config)):
                final = progress.x_t
        assert final is not None
        return final

    return run


def diffusers_sampler(unet: Any, config: ModelConfig, name: str, steps: int, batch: int,
                      device: torch.device, bf16: bool,
                      x_T: Tensor | None = None) -> Callable[[], Tensor]:
    """diffusers' canonical loop from x_T (fresh noise, as DDPMPipeline draws it, if None)."""
    scheduler = diffusers_scheduler(name, config)
    u = config.unet
    shape = (batch, u.in_channels, u.image_size, u.image_size)
    # Ours re-derives ε from the clipped x̂0 (as GLIDE and DDIMPipeline's option do).
    kwargs = {"use_clipped_model_output": True} if name == "ddim" else {}

    def run() -> Tensor:
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(shape, generator=g, device=device) if x_T is None else x_T.clone()
        scheduler.set_timesteps(steps, device=device)
        with torch.no_grad(), autocast(device, bf16):
            for t in scheduler.timesteps:
                eps = unet(x, t).sample
                x = scheduler.step(eps.float(), t, x, generator=g, **kwargs).prev_sample
        return x

    return run


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def our_forward(net: UNet, device: torch.device, *, bf16: bool,
                compile_: bool) -> Callable[..., Tensor]:
    """The network as our sampler calls it: the module itself, or (CUDA options) the
    worker's `Forward` wrapper with bf16 autocast, optionally around `torch.compile`."""
    if not (bf16 or compile_):
        return net
    from worker.engine import Forward

    fwd = Forward(net, device, bf16=bf16, channels_last=False)   # the layout is --layout's
    if compile_:
        fwd.net = torch.compile(net)   # type: ignore[assignment]
    return fwd


# Equivalence --------------------------------------------------------------------------------


def eps_difference(net: Callable[..., Tensor], unet: Any, config: ModelConfig, batch: int,
                   device: torch.device, bf16: bool) -> tuple[float, float]:
    """(max |ε_ours − ε_diffusers|, max |ε|) on one random x and random per-row t."""
    u = config.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, u.in_channels, u.image_size, u.image_size, generator=g).to(device)
    t = torch.randint(0, config.diffusion.num_timesteps, (batch,), generator=g).to(device)
    with torch.inference_mode(), autocast(device, bf16):
        ours = net(x, t).float()
        theirs = unet(x, t).sample.float()
    return float((ours - theirs).abs().max()), float(theirs.abs().max())


def ddim_difference(net: Callable[..., Tensor], unet: Any, config: ModelConfig, steps: int,
                    batch: int, device: torch.device, bf16: bool) -> float:
    """max |x0_ours − x0_diffusers| of DDIM (deterministic) from our x_T.

    Larger than the ε difference: x̂0 = (x_t − √(1−ᾱ) ε)/√ᾱ multiplies ε's rounding by
    1/√ᾱ_999 ≈ 160 on the first step, and diffusers keeps ᾱ in float32 where ours takes the
    step's coefficients in float64; fewer steps mean larger jumps, so a larger figure."""
    u = config.unet
    shape = (u.in_channels, u.image_size, u.image_size)
    keys = torch.tensor([image_seed(0, i) for i in range(batch)], device=device)
    x_T = counter_normal(keys, torch.zeros_like(keys), shape)        # what our sampler draws
    ours = our_sampler(net, config, "ddim", steps, batch, device)()
    theirs = diffusers_sampler(unet, config, "ddim", steps, batch, device, bf16, x_T=x_T)()
    return float((ours - theirs).abs().max())


# Timing ---------------------------------------------------------------------------------------


@dataclass
class Result:
    sampler: str
    batch: int
    steps: int
    ours_s: list[float]          # seconds per run, each repeat
    diffusers_s: list[float]

    @property
    def ours_ips(self) -> float:
        return self.batch / min(self.ours_s)

    @property
    def diffusers_ips(self) -> float:
        return self.batch / min(self.diffusers_s)

    @property
    def ratio(self) -> float:
        return self.ours_ips / self.diffusers_ips

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.diffusers_s) / statistics.median(self.ours_s)


def timed(run: Callable[[], Tensor], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(pair: Callable[[int], tuple[Callable[[], Tensor], Callable[[], Tensor]]],
            steps: int, device: torch.device, repeats: int) -> Iterator[tuple[float, float]]:
    """Seconds of (ours, diffusers) at `steps`, timed alternately `repeats` times, after a
    2-step warm-up of each (kernel selection, allocator, diffusers' first-call set-up)."""
    for run in pair(min(2, steps)):
        run()
    ours, theirs = pair(steps)
    for _ in range(repeats):
        yield timed(ours, device), timed(theirs, device)


LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", default="cifar10", help="architecture (random weights)")
    p.add_argument("--checkpoint", type=Path, help="a trained native checkpoint instead")
    p.add_argument("--batch", default=None, help="batch sizes (default: cpu 1,16,64; "
                   "cuda 1,16,64,256)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (cpu 10, cuda 50)")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (best and median)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--check-batch", type=int, default=4, help="batch of the equivalence check")
    p.add_argument("--layout", choices=["auto", *LAYOUTS], default="auto",
                   help="ours: weight layout (auto: inference_memory_format, channels-last "
                   "on CPU from 32 channels)")
    p.add_argument("--diffusers-channels-last", action="store_true",
                   help="diffusers: weights channels-last too")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, both sides (CUDA)")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile the UNet")
    p.add_argument("--seed", type=int, default=0, help="weights of the random model")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    import diffusers

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in (args.batch or ("1,16,64,256" if cuda else "1,16,64")).split(",")]
    steps = args.steps or (50 if cuda else 10)
    samplers = [s.strip() for s in args.samplers.split(",")]
    for name in samplers:
        diffusers_scheduler(name, preset("tiny"))    # refuse an unknown name before the work
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32 on both sides
        torch.backends.cudnn.allow_tf32 = False
    unet = (read_config(args.checkpoint) if args.checkpoint else preset(args.preset)).unet
    layout = (inference_memory_format(device, unet) if args.layout == "auto"
              else LAYOUTS[args.layout])

    with tempfile.TemporaryDirectory() as tmp:
        ck, unet = build_pair(args.preset, args.checkpoint, args.seed, device, layout, Path(tmp))
    if args.diffusers_channels_last:
        unet.to(memory_format=torch.channels_last)
    config = ck.config
    fwd = our_forward(ck.net, device, bf16=args.bf16, compile_=args.compile)
    model = str(args.checkpoint) if args.checkpoint else f"{args.preset} (random weights)"
    layout_name = next(k for k, v in LAYOUTS.items() if v == layout)
    print(f"device {device}{' ' + torch.cuda.get_device_name(device) if cuda else ''}, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"threads {torch.get_num_threads()}, model {model}, "
          f"{count_parameters(ck.net) / 1e6:.2f}M parameters, {steps} steps, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, ours {layout_name}"
          f"{' compiled' if args.compile else ''}, diffusers "
          f"{'channels-last' if args.diffusers_channels_last else 'as built'}, "
          f"best of {args.repeats}")

    diff, scale = eps_difference(fwd, unet, config, args.check_batch, device, args.bf16)
    print(f"equivalence: max |eps_ours - eps_diffusers| = {diff:.2e} "
          f"({diff / scale:.1e} of max |eps| {scale:.2f}), batch {args.check_batch}, random t")
    ddim = ddim_difference(fwd, unet, config, steps, args.check_batch, device, args.bf16)
    print(f"equivalence: DDIM {steps} steps from the same x_T, max |x0_ours - x0_diffusers| "
          f"= {ddim:.2e} ({ddim * 127.5:.2f} of an 8-bit level)")

    results: list[Result] = []
    print(f"{'sampler':8} {'batch':>5} {'ours img/s':>11} {'diffusers img/s':>16} "
          f"{'ours/diffusers':>15} {'(medians)':>10}")
    for name in samplers:
        for b in batches:
            def pair(n: int, name: str = name, b: int = b) -> tuple[Callable[[], Tensor],
                                                                      Callable[[], Tensor]]:
                return (our_sampler(fwd, config, name, n, b, device),
                        diffusers_sampler(unet, config, name, n, b, device, args.bf16))

            times = list(compare(pair, steps, device, args.repeats))
            r = Result(name, b, steps, [o for o, _ in times], [d for _, d in times])
            results.append(r)
            print(f"{name:8} {b:5d} {r.ours_ips:11.2f} {r.diffusers_ips:16.2f} "
                  f"{r.ratio:14.3f}x {r.median_ratio:9.3f}x", flush=True)

    if args.json:
        doc = {"device": str(device), "torch": torch.__version__,
               "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
               "model": model, "parameters": count_parameters(ck.net), "steps": steps,
               "bf16": args.bf16, "layout": layout_name, "compile": args.compile,
               "diffusers_channels_last": args.diffusers_channels_last,
               "eps_max_abs_diff": diff, "eps_max_abs": scale, "ddim_max_abs_diff": ddim,
               "results": [{**asdict(r), "ours_images_per_s": r.ours_ips,
                            "diffusers_images_per_s": r.diffusers_ips, "ratio": r.ratio,
                            "median_ratio": r.median_ratio} for r in results]}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
