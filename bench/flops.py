"""Model FLOP utilisation of the UNet: achieved TFLOP/s against what the device can do.

FLOPs per forward are counted with `torch.utils.flop_counter` on the meta device (no
compute; SDPA decomposes into its matmuls there, so attention is counted on every device,
which the CPU flash kernel is not), then each batch size's forward is timed on the real
device. The yardstick is measured in the same run, in the same dtype: a large square
matmul (`torch.mm`), and on a CPU also the same GEMM as a 1×1 convolution and a 3×3
convolution of the UNet's own shape (256 channels at 16×16), both run by oneDNN, the
library of the UNet's convolutions. MKL's sgemm can take a narrower vector path than
oneDNN (it does on this project's AMD EPYC: half the rate), and then the UNet outruns the
plain matmul; the fastest of the yardsticks is "best" below. On a GPU the data-sheet peak
is the other yardstick (`--peak-tflops`, or the table below for known GPUs). Not a test:
nothing asserts a speed.

    python -m bench.flops --preset tiny --batch 1,16                     # seconds, a smoke run
    python -m bench.flops                                                # cifar10, CPU, 1,16,64
    python -m bench.flops --threads 1 --gemm 2048                        # one core
    python -m bench.flops --device cuda --dtype bf16 --batch 1,16,64,256,1024
    python -m bench.flops --layout contiguous                            # CPU, before channels-last
    python -m bench.flops --device cuda --dtype bf16 --layout channels-last --compile
    python -m bench.flops --device cuda --dtype fp32 --peak-tflops 67    # any GPU, given its peak
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from models import (
    UNet,
    count_parameters,
    inference_memory_format,
    load_checkpoint,
    preset,
    read_config,
)

# Dense data-sheet peaks in TFLOP/s by dtype, for `torch.cuda.get_device_name()` substrings
# (first match wins). fp32 is the CUDA-core rate (TF32 off); tf32 and bf16 the tensor cores.
KNOWN_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),        # SXM (HBM3)
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0}),
    ("A10G", {"fp32": 31.2, "tf32": 35.0, "bf16": 70.0}),
]
# GFLOP per image of one forward, as ../shared/REFERENCE.md gives them (torch flop_counter).
REFERENCE_GFLOP = {"cifar10": 12.44, "celebahq256": 497.0, "lsun256": 497.0}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}


def count_flops(net: UNet, batch: int) -> int:
    """FLOPs of one forward at `batch`, counted on a meta-device copy of `net`'s architecture."""
    cfg = net.cfg
    with torch.device("meta"):
        meta = UNet(cfg).eval()
        x = torch.empty(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        t = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        meta(x, t)
    return counter.get_total_flops()


def known_peak(device: torch.device, dtype: str) -> float | None:
    """The data-sheet dense peak of this GPU for `dtype` in TFLOP/s, if it is in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in KNOWN_PEAKS:
        if key in name:
            return peaks[dtype]
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int,
                 min_seconds: float) -> tuple[float, float]:
    """(best, median) seconds of `fn` after one warm-up call; at least `repeats` calls and,
    when calls are short, enough of them to fill `min_seconds`."""
    fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def yardstick_tflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int,
                     min_seconds: float) -> dict[str, float]:
    """TFLOP/s of the dense kernels that bound what this device and dtype can do: an
    n×n×n `torch.mm`, and on a CPU the same GEMM as a 1×1 convolution of n channels over n
    pixels (n a multiple of 64) and the UNet's 3×3 convolution at batch 64, both oneDNN."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    seconds = best_seconds(lambda: a @ b, device, repeats, min_seconds)[0]
    out = {f"torch.mm {n}^3": 2 * n**3 / seconds}
    if device.type == "cpu":
        cl = torch.channels_last
        x = a.view(1, n, n // 64, 64).contiguous(memory_format=cl)     # n channels, n pixels
        w = b.view(n, n, 1, 1).contiguous(memory_format=cl)
        seconds = best_seconds(lambda: F.conv2d(x, w), device, repeats, min_seconds)[0]
        out[f"1x1 conv {n}^3"] = 2 * n**3 / seconds
        x = torch.randn(64, 256, 16, 16, generator=g).to(dtype).contiguous(memory_format=cl)
        w = torch.randn(256, 256, 3, 3, generator=g).to(dtype).contiguous(memory_format=cl)
        seconds = best_seconds(lambda: F.conv2d(x, w, padding=1), device, repeats,
                               min_seconds)[0]
        out["3x3 conv 64x256x16x16"] = 2 * 256 * 256 * 9 * 16 * 16 * 64 / seconds
    return {k: v / 1e12 for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", default="cifar10", help="architecture (random weights)")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint's architecture and weights")
    p.add_argument("--batch", default=None, help="batch sizes (default: cpu 1,16,64; "
                   "cuda 1,16,64,256,1024)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="fp32 (TF32 off), tf32, or bf16 (autocast, as the worker runs)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak for --dtype "
                   "(default: the table of known GPUs; none on CPU)")
    p.add_argument("--gemm", type=int, default=4096, help="size of the square GEMM yardstick "
                   "(a multiple of 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per batch (at least)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="and at least this long")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--layout", choices=["auto", *LAYOUTS], default="auto",
                   help="weight layout (auto: inference_memory_format, channels-last on CPU "
                   "from 32 channels)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        tf32 = args.dtype == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    batches = [int(b) for b in (args.batch or ("1,16,64,256,1024" if cuda else "1,16,64"))
               .split(",")]
    dtype = DTYPES[args.dtype]

    unet = (read_config(args.checkpoint) if args.checkpoint else preset(args.preset)).unet
    layout = (inference_memory_format(device, unet) if args.layout == "auto"
              else LAYOUTS[args.layout])
    layout_name = next(k for k, v in LAYOUTS.items() if v == layout)
    if args.checkpoint:
        net = load_checkpoint(args.checkpoint, device=device, memory_format=layout).net
        name = str(args.checkpoint)
    else:
        torch.manual_seed(0)
        net = UNet(preset(args.preset).unet).to(device=device, memory_format=layout).eval()
        name = args.preset
    forward: Callable[..., Tensor] = torch.compile(net) if args.compile else net  # type: ignore[assignment]
    cfg = net.cfg

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    peak = args.peak_tflops or known_peak(device, args.dtype)
    sticks = yardstick_tflops(args.gemm, dtype, device, args.repeats, args.min_seconds)
    best = max(sticks.values())
    per_image = count_flops(net, 1)
    assert count_flops(net, 2) == 2 * per_image, "FLOPs are not linear in the batch"
    ref = REFERENCE_GFLOP.get(name)
    print(f"device {device}{' ' + torch.cuda.get_device_name(device) if cuda else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}"
          f", {layout_name}"
          f"{', compiled' if args.compile else ''}, model {name} "
          f"({count_parameters(net) / 1e6:.2f}M parameters)")
    print(f"UNet forward: {per_image / 1e9:.3f} GFLOP per image (flop_counter)"
          + (f"; REFERENCE.md gives {ref} ({per_image / 1e9 / ref - 1:+.2%})" if ref else ""))
    print(f"yardsticks ({args.dtype}, TFLOP/s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sticks.items()) + "; device peak "
          + (f"{peak:g} (best reaches {best / peak:.1%})" if peak else "unknown"))
    print(f"{'batch':>5} {'ms/forward':>11} {'images/s':>10} {'TFLOP/s':>9} {'of best':>8} "
          f"{'of peak':>8}")

    rows = []
    for b in batches:
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
        x = x.to(device)
        t = torch.randint(0, 1000, (b,), generator=g).to(device)

        def run(x: Tensor = x, t: Tensor = t) -> Tensor:
            with torch.inference_mode(), autocast():
                return forward(x, t)

        seconds, median = best_seconds(run, device, args.repeats, args.min_seconds)
        achieved = per_image * b / seconds / 1e12
        rows.append({"batch": b, "seconds": seconds, "median_seconds": median,
                     "images_per_s": b / seconds, "tflops": achieved,
                     "of_best": achieved / best, "of_peak": achieved / peak if peak else None})
        print(f"{b:5d} {seconds * 1e3:11.2f} {b / seconds:10.1f} {achieved:9.3f} "
              f"{achieved / best:8.1%} "
              + (f"{achieved / peak:8.1%}" if peak else f"{'unknown':>8}"), flush=True)

    if args.json:
        doc = {"device": str(device), "torch": torch.__version__, "dtype": args.dtype,
               "threads": torch.get_num_threads(), "model": name,
               "gflop_per_image": per_image / 1e9, "reference_gflop": ref,
               "gemm_size": args.gemm, "yardstick_tflops": sticks, "peak_tflops": peak,
               "layout": layout_name, "compile": args.compile, "results": rows}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
