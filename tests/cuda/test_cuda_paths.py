"""The worker's CUDA-only paths on a real GPU: bf16 autocast and channels-last give the
fp32 images within a stated tolerance (imagediff.py), a real CUDA out-of-memory error makes
the engine halve its forward chunk and keep the images (and raises at one row), the worker
counts it, its GPU-memory gauge reports the device's memory, and snapshot previews
downscaled on the GPU match the CPU's.

All of these skip without CUDA (conftest.py); `make gpu-check` runs them. Only public API:
`worker.engine` (Engine, Forward, LoadedModel), `models.sample`, `worker.main.build_worker`
and the worker's metrics registry.
"""

from __future__ import annotations

import copy
import itertools
import math
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import torch
from imagediff import (
    BF16,
    FP32,
    assert_within,
    final_images,
    mnist_model,
    random_model,
    stacked,
)

from contract.limits import MAX_IMAGES
from contract.queueing import enqueue, fetch_job
from contract.spec import GenerationSpec
from models import SlotSpec, UNet, preset, sample, sampler_kind, save_checkpoint, to_uint8
from worker.engine import Engine, Forward, LoadedModel, frame_pixels

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


def engine(model: LoadedModel, max_batch: int, *, bf16: bool, channels_last: bool,
           on_oom: Callable[[str, int], None] | None = None) -> Engine:
    return Engine({model.name: model}, device=CUDA, max_batch=max_batch, bf16=bf16,
                  channels_last=channels_last, on_oom=on_oom)


def jobs(model: str, images: int, steps: int, seed: int = 1, **kw: object
         ) -> list[tuple[str, GenerationSpec]]:
    """`images` images as jobs of at most MAX_IMAGES each."""
    out = []
    for k in range(math.ceil(images / MAX_IMAGES)):
        n = min(MAX_IMAGES, images - k * MAX_IMAGES)
        out.append((f"j{k}", GenerationSpec(model=model, num_images=n, steps=steps,
                                            seed=seed + k, **kw)))  # type: ignore[arg-type]
    return out


def channels_last_weights(net: torch.nn.Module) -> bool:
    return all(p.is_contiguous(memory_format=torch.channels_last)
               for p in net.parameters() if p.dim() == 4)


# -- bf16 autocast and channels-last against fp32 ------------------------------------------


def _models() -> list[tuple[str, Callable[[], LoadedModel]]]:
    return [("mnist-trained", lambda: mnist_model(CUDA)),
            ("cifar10-random", lambda: random_model("c10", "cifar10", CUDA))]


@pytest.mark.parametrize(("label", "make"), _models(), ids=[m[0] for m in _models()])
def test_engine_bf16_channels_last_matches_fp32(label: str, make: Callable[[], LoadedModel],
                                                exact_fp32: None) -> None:
    """The worker's default CUDA path against plain fp32, same jobs (guided ones on the
    conditional model). Fails if autocast reaches the sampler's state or the schedule,
    if the layout scrambles pixels, or if bf16 silently never engages."""
    model = make()
    kw = {"class_label": 7, "guidance_scale": 3.0} if model.info.num_classes else {}
    specs = [*jobs(model.name, 48, 20, sampler="dpm++2m"),
             ("g", GenerationSpec(model=model.name, num_images=16, steps=20, seed=9, **kw))]
    ref = stacked(final_images(engine(model, 64, bf16=False, channels_last=False), specs))
    assert not channels_last_weights(model.checkpoint.net)
    got = stacked(final_images(engine(model, 64, bf16=True, channels_last=True), specs))
    assert channels_last_weights(model.checkpoint.net), "channels-last never reached the net"
    d = assert_within(got, ref, BF16, f"{label}: bf16 + channels-last vs fp32")
    assert d.mean > 0, f"{label}: bit-identical to fp32: bf16 autocast did not engage"


def test_engine_channels_last_alone_matches_contiguous(exact_fp32: None) -> None:
    """Layout only, in fp32: the same images up to kernel rounding (FP32)."""
    model = random_model("c10", "cifar10", CUDA)
    specs = jobs("c10", 32, 10, sampler="ddim")
    ref = stacked(final_images(engine(model, 32, bf16=False, channels_last=False), specs))
    got = stacked(final_images(engine(model, 32, bf16=False, channels_last=True), specs))
    assert channels_last_weights(model.checkpoint.net)
    assert_within(got, ref, FP32, "channels-last fp32 vs contiguous fp32")


def test_models_sample_bf16_channels_last_matches_fp32(exact_fp32: None) -> None:
    """`models.sample` (the offline path) with the worker's `Forward` as the network."""
    ck = mnist_model(CUDA).checkpoint
    u = ck.config.unet
    kind = sampler_kind("ddim", ck.config.diffusion.variance_type)
    specs = [SlotSpec(seed=5, index=i, steps=20, kind=kind) for i in range(64)]
    kw = {"shape": (u.in_channels, u.image_size, u.image_size), "device": CUDA,
          "num_classes": u.num_classes, "clip_denoised": ck.config.diffusion.clip_denoised}
    ref = to_uint8(sample(ck.net, ck.schedule, specs, **kw))
    net = copy.deepcopy(ck.net)
    got = to_uint8(sample(Forward(net, CUDA, bf16=True, channels_last=True), ck.schedule,
                          specs, **kw))
    assert channels_last_weights(net)
    d = assert_within(got.cpu(), ref.cpu(), BF16, "models.sample: bf16 + channels-last vs fp32")
    assert d.mean > 0, "bit-identical to fp32: bf16 autocast did not engage"


def test_cuda_fp32_matches_cpu(exact_fp32: None) -> None:
    """The seeded noise and the math are device-independent: CUDA fp32 ≈ CPU fp32."""
    cpu, gpu = mnist_model("cpu"), mnist_model(CUDA)
    specs = jobs("mnist", 16, 20, sampler="ddpm")      # stochastic: noise every step
    ref = stacked(final_images(Engine({"mnist": cpu}, device="cpu", max_batch=16), specs))
    got = stacked(final_images(engine(gpu, 16, bf16=False, channels_last=False), specs))
    assert_within(got, ref, FP32, "CUDA fp32 vs CPU fp32")


def test_previews_downscaled_on_the_gpu_match_the_cpu() -> None:
    """Snapshot previews are made on the device (area downscale, then uint8 to the host):
    the same pixels, within one 8-bit level, as on the CPU, at every preview size."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 256, 256) * 2 - 1
    sizes = [128, 256, 64, 128, 37, 256]
    cpu = frame_pixels(x, sizes)
    gpu = frame_pixels(x.to(CUDA), sizes)
    for a, b, side in zip(cpu, gpu, sizes, strict=True):
        assert b.device.type == "cpu" and tuple(b.shape) == (side, side, 3)
        assert int((a.int() - b.int()).abs().max()) <= 1


# -- a real CUDA out-of-memory error ---------------------------------------------------------


def step_reserved(model: LoadedModel, rows: int, *, bf16: bool, channels_last: bool) -> int:
    """Bytes the caching allocator reserves beyond what it held before, at the peak of a
    first engine step over `rows` images (what a memory cap must leave room for)."""
    warm = engine(model, 2, bf16=bf16, channels_last=channels_last)   # cuBLAS/cuDNN handles
    final_images(warm, jobs(model.name, 2, 1))
    del warm
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    eng = engine(model, rows, bf16=bf16, channels_last=channels_last)
    for job_id, spec in jobs(model.name, rows, 2):
        eng.admit(job_id, spec)
    eng.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_reserved()
    del eng
    torch.cuda.empty_cache()
    return peak - before


def cap_between(model: LoadedModel, rows: int, *, bf16: bool, channels_last: bool) -> int:
    """Extra bytes that a step of rows/2 images fits in and a step of `rows` does not."""
    full = step_reserved(model, rows, bf16=bf16, channels_last=channels_last)
    half = step_reserved(model, rows // 2, bf16=bf16, channels_last=channels_last)
    assert full - half >= 32 * 2**20, f"steps of {rows} and {rows // 2} rows need " \
        f"{full / 2**20:.0f} and {half / 2**20:.0f} MiB: too close to put a cap between"
    return (full + half) // 2


@contextmanager
def reserved_cap(extra: int) -> Iterator[None]:
    """Let this process reserve only `extra` bytes more than now: past that, allocations
    fail with the allocator's real CUDA out-of-memory error."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + extra) / total)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def fill_gpu() -> list[torch.Tensor]:
    """Take every byte the cap leaves, the free holes of reserved segments too, so that the
    next allocation of any size fails."""
    hold = []
    for size in (64 << 20, 2 << 20, (1 << 20) + 512, 256 << 10, 16 << 10, 512):
        while True:
            try:
                hold.append(torch.empty(size, dtype=torch.uint8, device=CUDA))
            except torch.OutOfMemoryError:
                break
    return hold


def test_real_oom_halves_the_chunk_and_keeps_the_images(exact_fp32: None,
                                                         gpu_memory: None) -> None:
    """256 rows do not fit, 128 do: the step that hits the error is retried in chunks and
    every image comes out as without the cap (fp32, so FP32 applies)."""
    model = random_model("c10", "cifar10", CUDA)
    specs = jobs("c10", 256, 4, sampler="dpm++2m")
    ref = stacked(final_images(engine(model, 256, bf16=False, channels_last=False), specs))
    extra = cap_between(model, 256, bf16=False, channels_last=False)
    chunks: list[int] = []
    eng = engine(model, 256, bf16=False, channels_last=False,
                 on_oom=lambda name, chunk: chunks.append(chunk))
    with reserved_cap(extra):
        got = stacked(final_images(eng, specs))
    assert chunks, "the capped step never ran out of memory"
    assert chunks[0] == 128, chunks
    assert all(b == a // 2 for a, b in itertools.pairwise(chunks)), chunks
    assert_within(got, ref, FP32, "after out-of-memory chunking vs unchunked")


def test_real_oom_at_one_row_is_raised(gpu_memory: None) -> None:
    """With no memory left at all, the engine halves down to one row, then gives up with the
    CUDA error (the worker then fails the jobs; that part is the loop's)."""
    model = random_model("c10", "cifar10", CUDA)
    chunks: list[int] = []
    eng = engine(model, 8, bf16=True, channels_last=True,
                 on_oom=lambda name, chunk: chunks.append(chunk))
    eng.admit("j", GenerationSpec(model="c10", num_images=8, steps=5, seed=1))
    eng.step()                                   # slots and their state are on the GPU now
    with reserved_cap(64 << 20):
        hold = fill_gpu()
        with pytest.raises(torch.OutOfMemoryError):
            eng.step()
        del hold
    assert chunks == [4, 2, 1]


# -- the worker: its OOM counter and its GPU-memory gauge -------------------------------------


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    torch.manual_seed(0)
    cfg = preset("cifar10")
    save_checkpoint(root / "c10", UNet(cfg.unet).eval(), cfg)
    return root


@pytest.fixture
def keep_signals() -> Iterator[None]:
    """RQ's work() installs its own SIGINT/SIGTERM handlers; pytest gets its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def run_worker(redis_url: str, models_dir: Path, specs: list[GenerationSpec],
               **settings: object):  # type: ignore[no-untyped-def]
    """Enqueue, run a burst worker in this process until the queue is empty; the worker."""
    from worker.main import build_worker
    from worker.settings import WorkerSettings

    r = redis.Redis.from_url(redis_url)
    w = build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir, device="cuda",
                                    log_level="WARNING", **settings))  # type: ignore[arg-type]
    queued = [enqueue(r, s) for s in specs]
    w.work(burst=True, logging_level="WARNING")
    status = {j.id: fetch_job(r, j.id).get_status() for j in queued}
    assert set(status.values()) == {"finished"}, status
    return w


def test_worker_counts_a_real_oom_and_finishes_the_jobs(
        redis_url: str, models_dir: Path, keep_signals: None, gpu_memory: None) -> None:
    """Two 64-image jobs under a cap that 64 rows fit in and 128 do not: both finish, and
    `ddpm_worker_oom_total` counts the error (the worker's on_oom → metrics wiring)."""
    from models import load_checkpoint
    probe = LoadedModel.from_checkpoint("c10", load_checkpoint(models_dir / "c10", CUDA), 0.0)
    extra = cap_between(probe, 128, bf16=True, channels_last=True)
    del probe
    specs = [GenerationSpec(model="c10", num_images=64, steps=3, seed=s) for s in (1, 2)]
    from worker.main import build_worker
    from worker.settings import WorkerSettings
    r = redis.Redis.from_url(redis_url)
    w = build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir, device="cuda",
                                    max_batch=128, log_level="WARNING"))
    queued = [enqueue(r, s) for s in specs]
    with reserved_cap(extra):
        w.work(burst=True, logging_level="WARNING")
    status = {j.id: fetch_job(r, j.id).get_status() for j in queued}
    assert set(status.values()) == {"finished"}, status
    ooms = w.metrics.registry.get_sample_value("ddpm_worker_oom_total", {"model": "c10"})
    assert ooms and ooms >= 1, "the worker did not count the out-of-memory error"


def test_worker_reports_gpu_memory(redis_url: str, models_dir: Path,
                                   keep_signals: None) -> None:
    """`ddpm_worker_gpu_memory_bytes{kind}` holds the device's allocated and reserved bytes:
    at least the weights (35.7M fp32 parameters), reserved ≥ allocated. The heartbeat sets
    it, so jobs run until one heartbeat has fallen inside a run (a few at most)."""
    weights = 4 * sum(p.numel() for p in UNet(preset("cifar10").unet).parameters())
    spec = GenerationSpec(model="c10", num_images=64, steps=50, seed=1)
    value: dict[str, float | None] = {}
    for _ in range(10):
        w = run_worker(redis_url, models_dir, [spec], heartbeat_interval=0.05, max_batch=64)
        value = {k: w.metrics.registry.get_sample_value("ddpm_worker_gpu_memory_bytes",
                                                        {"kind": k})
                 for k in ("allocated", "reserved")}
        if value["allocated"]:
            break
    allocated, reserved = value["allocated"], value["reserved"]
    assert allocated, "no heartbeat set the GPU-memory gauge in 10 runs"
    assert reserved is not None
    assert allocated >= weights, f"allocated {allocated:.0f} B < the weights' {weights} B"
    assert reserved >= allocated
