"""256x256 models with snapshots every step, through real processes: the worker's memory
stays bounded when frames come faster than they can be encoded, and a job's Redis bytes
stay within its stream budget while the client still sees frames of every image and the
final images are the lossless PNGs of a run without snapshots."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
import torch
from PIL import Image
from test_writer_bounds import entries

from contract.events import EventType
from contract.keys import events_key, frames_key, image_key
from contract.limits import STREAM_MAX_BYTES
from contract.queueing import enqueue
from contract.spec import GenerationSpec
from models import UNet, build_network, preset, save_checkpoint
from models.config import UNetConfig
from tests.app.test_api import ready, sse

MiB = 2**20


def rss(pid: int) -> int:
    """Resident bytes of process `pid` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def big_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`null256`: a zero-cost network at 256x256 RGB (steps faster than encoding); `w256`:
    a real UNet of tiny width, ch 8 and six levels without attention (46k parameters)."""
    root = tmp_path_factory.mktemp("models256")
    cfg = preset("null").replace(image_size=256, in_channels=3)
    save_checkpoint(root / "null256", build_network(cfg.unet).eval(), cfg)
    torch.manual_seed(0)
    unet = UNetConfig(image_size=256, in_channels=3, ch=8, ch_mult=(1, 1, 1, 1, 1, 1),
                      num_res_blocks=1, attn_resolutions=(), dropout=0.0, norm_groups=8)
    cfg = preset("tiny").replace(**{f: getattr(unet, f) for f in (
        "image_size", "in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
        "norm_groups")})
    save_checkpoint(root / "w256", UNet(cfg.unet).eval(), cfg)
    return root


PENDING = 16 * MiB            # the writer's bound in this test (DDPM_WRITER_MAX_PENDING_BYTES)
# What the worker may grow by past its first steps: the bound, a step's frames (16 x 196
# KB), the writer's encoded copy and Redis command of one write, and the allocator's slack
# (glibc arenas of the encoder threads: the RSS swings by ~120 MiB at a steady state).
# Without a bound every step's pixels pile up: +1.3 GB in 200 steps, measured.
RSS_BOUND = 256 * MiB


@pytest.mark.parametrize("steps", [
    200, pytest.param(1000, marks=pytest.mark.slow)])
def test_worker_memory_stays_bounded_when_frames_outrun_the_encoder(
        steps: int, r: redis.Redis, big_models: Path,
        spawn_worker: Callable[..., object], wait_for: Callable[..., object]) -> None:
    """16 images at 256x256, a full-size PNG snapshot every step (~9 ms each to encode, one
    encoder thread) from a network that costs nothing: the writer cannot keep up, so
    snapshots coalesce and the worker's RSS stays within RSS_BOUND; every image still has
    its frames and its final image, and the stream its byte budget."""
    w = spawn_worker("--model", "null256", "--max-batch", "16", models=big_models, env={
        "DDPM_WRITER_MAX_PENDING_BYTES": str(PENDING), "DDPM_ENCODE_THREADS": "1",
        "DDPM_LOG_LEVEL": "WARNING"})
    spec = GenerationSpec(model="null256", num_images=16, steps=steps, sampler="ddim",
                          seed=3, snapshot_every=1, snapshot_kind="xt", snapshot_format="png",
                          snapshot_size=256)
    job = enqueue(r, spec)
    pid = w.proc.pid                                    # type: ignore[attr-defined]
    # The baseline: after a few steps, with the sampler's working set allocated.
    wait_for(lambda: (job.get_meta(refresh=True).get("steps_done") or 0) >= 16 * 5, 120,
             "the job's first steps", w)
    base = peak = rss(pid)
    deadline = time.monotonic() + 600
    while job.get_status(refresh=True) not in ("finished", "failed"):
        peak = max(peak, rss(pid))
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.05)
    assert job.get_status() == "finished", w.log()[-3000:]  # type: ignore[attr-defined]
    grew = peak - base
    print(f"\nworker RSS {base / MiB:.0f} MiB after 5 steps, peak {peak / MiB:.0f} MiB "
          f"(+{grew / MiB:.0f} MiB; bound {RSS_BOUND / MiB:.0f} MiB) over {steps} steps")
    assert grew <= RSS_BOUND
    evs = [e for _, e in entries(r, job.id)]
    snaps = [e for e in evs if e.type == EventType.SNAPSHOT]
    assert sum(e.data.get("dropped", 0) for e in snaps) > 0, "the writer was outrun"
    assert {e.data["index"] for e in snaps} == set(range(16))
    assert all(r.get(image_key(job.id, i)) is not None for i in range(16))
    assert int(r.get(frames_key(job.id) + ":bytes") or 0) <= STREAM_MAX_BYTES


def job_bytes(r: redis.Redis, job_id: str) -> int:
    """Redis memory of everything the job wrote (MEMORY USAGE, samples 0: exact)."""
    keys = [events_key(job_id), frames_key(job_id), frames_key(job_id) + ":bytes",
            f"rq:job:{job_id}", *(k.decode() for k in r.scan_iter(image_key(job_id, 0)[:-1]
                                                                  + "*"))]
    return sum(r.memory_usage(k, samples=0) or 0 for k in keys)


def test_256px_job_stays_within_its_budget_and_finals_match_a_run_without_snapshots(
        r: redis.Redis, big_models: Path, spawn_worker: Callable[..., object],
        start_api: Callable[..., object]) -> None:
    """Through the API with default settings: lossy 128-pixel previews of every image reach
    the SSE client, the job's Redis bytes stay within the stream budget plus its final
    images, and those are lossless PNGs identical to a run without snapshots."""
    spawn_worker("--model", "w256", models=big_models)
    api = start_api()
    with httpx.Client(base_url=api.url, timeout=60) as client:  # type: ignore[attr-defined]
        ready(client)
        body = {"model": "w256", "num_images": 2, "steps": 6, "sampler": "ddim", "seed": 7}
        first = client.post("/v1/generations", json={
            **body, "snapshot_every": 1, "snapshot_kind": "xt"})
        assert first.status_code == 202, first.text
        job = first.json()["id"]
        events = sse(client, job, timeout=300)
        assert events[-1]["event"] == "done", events[-1]
        snaps = [e["data"] for e in events if e["event"] == "snapshot"]
        assert {(d["index"], d["format"], d["size"]) for d in snaps} == \
            {(i, "jpeg", 128) for i in range(2)}

        assert all(Image.open(io.BytesIO(base64.b64decode(d["image"]))).size == (128, 128)
                   for d in snaps)
        used = job_bytes(r, job)
        finals = [client.get(f"/v1/generations/{job}/images/{i}").content for i in range(2)]
        print(f"\njob's Redis bytes {used / MiB:.2f} MiB for {len(snaps)} frames")
        assert used <= STREAM_MAX_BYTES + sum(len(f) for f in finals) + 64 * 1024
        again = client.post("/v1/generations", json=body)
        assert again.status_code == 202
        done = sse(client, again.json()["id"], timeout=300)
        assert done[-1]["event"] == "done"
        plain = [client.get(f"/v1/generations/{again.json()['id']}/images/{i}").content
                 for i in range(2)]
        assert finals == plain
        assert all(Image.open(io.BytesIO(f)).format == "PNG" for f in finals)
