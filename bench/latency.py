"""Latency under load (issue 29): open-loop Poisson arrivals of a mixed workload at a sweep
of offered loads, through the whole stack, under each of the worker's admission policies.

Every other benchmark here is closed-loop and reports throughput. A service is judged by
the latency its users see at a given offered load, requests arriving on their own schedule,
and by the highest load it sustains before its p99 breaks an objective. This measures that
for the three admission policies of `DDPM_ADMISSION` (worker.settings.ADMISSIONS):

    step     continuous step-level batching (the default): a request joins the running
             batch at the next step, and leaves it at its own last step
    request  request-level batching (Triton, Ray Serve, BentoML): a batch is formed only
             when the engine is empty, and runs until its longest member is done
    none     no batching (max batch 1)

In one run: for each policy, `ddpm serve` (its embedded Redis, one worker, the API) is
started with that setting, warmed up, and sent the same requests at the same arrival times
(an aiohttp client in this process: POST, follow the event stream to `done`, download the
PNG or the grid). First, under the first policy (`step` by default), the run measures the
mix's capacity (closed loop, 2 x max-batch clients, so that the batch stays full while some
of them download and resubmit: requests/s) and its unloaded latency (one client); the loads
are fractions of that capacity, the objective a multiple of the unloaded p99 (the largest
requests of the mix alone: an objective below it cannot be met at any load).

The mix is seeded: request i has the same steps (`--steps`, e.g. 10/50/200), images (1 to
`--max-images`), seed, class, snapshots (`--snapshot-share` of the requests, a frame every
tenth of their steps) and input image (`--conditioned`: img2img and inpainting, alternately,
bench.service.Conditioned) at every load and under every policy; the arrival times are one
seeded sequence of unit-rate exponential gaps, scaled by each load. Latencies count from
the scheduled arrival (a late client counts against the server, not in its favour), so an
overloaded server's queue shows. A request not done `--drain-s` after the last arrival is
canceled and counts as unfinished (an infinite latency); a policy whose p99 passes
`--stop-x` × the objective, or leaves requests unfinished, is not driven at higher loads.

Per policy and load: achieved throughput (requests done / first arrival to last
completion), p50/p90/p99 end-to-end latency, time to first
frame (requests with snapshots: the first `snapshot` event), queue wait (the `started`
event's, measured by the worker), the batch occupancy (worker metrics), and the p50/p99 of
each step count; then, per policy, the highest load whose p99 is within the objective (a
load passes if it and every lower one do; `interpolated`: linearly between the last load
that passes and the first that fails). The same for the p99 of the latency per step (end to
end / steps: vLLM's "normalized latency", per step instead of per token), whose objective
is the same multiple of its unloaded p99: on a mix of 10- and 200-step requests the
end-to-end p99 is the 200-step requests' alone, the per-step p99 is every request's.

    python -m bench.latency --preset null --requests 80 --json null.json --svg null.svg
    python -m bench.latency --steps 2,10,40 --loads 0.5,1,1.5,2,3 \\
        --json mnist.json --svg mnist.svg       # the shipped MNIST model: ~8 min on 2 cores
    python -m bench.latency --device cuda --preset cifar10 --max-batch 128 --requests 400

Output: a table per policy, the sustained loads, `--json` (everything, including every
request's figures) and `--svg` (p50 and p99, and the p99 per step, against the offered
load, one line per policy, the objectives dashed). With few requests per load, p99 is
close to the slowest request.

Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import aiohttp

from bench.api_overhead import percentile, run_async, stop_on_sigterm, versions
from bench.service import (
    CLIENT_KEEPALIVE_S,
    BenchError,
    Conditioned,
    fetch_result,
    job_events,
    request_body,
    scrape,
    stack_load,
)
from bench.stream_memory import Serve
from contract.spec import GenerationSpec
from ddpm.redis_server import free_port
from models import PRESETS, init_checkpoint, preset
from worker.settings import ADMISSIONS, Admission

DEFAULT_MODELS = Path("checkpoints")
SERVE_START_TIMEOUT = 300.0
# The API's back-pressure (rate limit, queue depth, streams per caller) is lifted: every
# request is one caller, and what is measured is the worker's scheduling, not its limits.
SERVE_ENV = {"DDPM_RATE_LIMIT": "0", "DDPM_MAX_QUEUE_DEPTH": str(10**9),
             "DDPM_MAX_STREAMS_PER_CALLER": "100000", "DDPM_MAX_STREAMS": "100000",
             "DDPM_LOG_LEVEL": "WARNING", "DDPM_GRACE_PERIOD": "1"}
QUANTILES = (50, 90, 99)


# -- the workload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    """The seeded request mix: every request's body, the same at every load and policy."""

    model: str
    steps: tuple[int, ...]
    max_images: int
    snapshot_share: float
    sampler: str
    num_classes: int
    conditioned: Conditioned | None

    def specs(self, n: int, seed: int) -> list[GenerationSpec]:
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            steps = rng.choice(self.steps)
            snapshots = rng.random() < self.snapshot_share
            out.append(GenerationSpec(
                model=self.model, steps=steps, num_images=rng.randint(1, self.max_images),
                sampler=self.sampler, seed=rng.randrange(2**31),
                snapshot_every=max(1, steps // 10) if snapshots else 0,
                class_label=rng.randrange(self.num_classes) if self.num_classes else None))
        return out

    def bodies(self, specs: list[GenerationSpec]) -> list[dict[str, Any]]:
        """The JSON bodies, with a class label and (a share of them) an input image."""
        out = self.conditioned.bodies(specs) if self.conditioned else \
            [request_body(s) for s in specs]
        for body, spec in zip(out, specs, strict=True):
            if spec.class_label is not None:
                body["class_label"] = spec.class_label
        return out


def arrivals(n: int, seed: int) -> list[float]:
    """Arrival times of a unit-rate Poisson process (divide by the rate for seconds)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(1.0)
        out.append(t)
    return out


# -- the client ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request of a load point: seconds from its scheduled arrival (None: never)."""

    arrival: float
    steps: int
    images: int
    snapshots: bool
    conditioned: bool
    done: float | None = None
    first_frame: float | None = None
    queue_wait: float | None = None       # the worker's: enqueued → started
    lag: float = 0.0                      # the client's POST after the scheduled arrival
    error: str = ""


async def follow(client: aiohttp.ClientSession, body: dict[str, Any], out: Outcome,
                 t_arrival: float, ids: dict[int, str], key: int) -> None:
    """Submit at the arrival, follow the events to `done`, download the image(s)."""
    out.lag = time.perf_counter() - t_arrival
    async with client.post("/v1/generations", json=body) as r:
        if r.status != 202:
            raise BenchError(f"POST /v1/generations: {r.status} {(await r.text())[:300]}")
        job_id = (await r.json())["id"]
    ids[key] = job_id
    done = False
    async for event, data in job_events(client, job_id):
        if event == "started":
            out.queue_wait = float(json.loads(data).get("queue_wait_s", 0.0))
        elif event == "snapshot" and out.first_frame is None:
            out.first_frame = time.perf_counter() - t_arrival
        elif event == "done":
            done = True
    if not done:
        raise BenchError(f"job {job_id}: the event stream ended without `done`")
    await fetch_result(client, job_id, body["num_images"])
    out.done = time.perf_counter() - t_arrival


async def open_loop(url: str, bodies: list[dict[str, Any]], times: list[float],
                    outcomes: list[Outcome], drain_s: float) -> float:
    """Each request POSTed at its time whatever the others do; those not done `drain_s`
    after the last arrival are canceled. Returns the seconds from the first arrival to the
    last completion."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=CLIENT_KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=None, connect=30.0)
    ids: dict[int, str] = {}
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout,
                                     read_bufsize=2**20) as client:
        t0 = time.perf_counter() + 0.05

        async def one(k: int) -> None:
            at = t0 + times[k]
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            await follow(client, bodies[k], outcomes[k], at, ids, k)

        tasks = [asyncio.create_task(one(k)) for k in range(len(bodies))]
        deadline = t0 + times[-1] + drain_s
        left = max(0.0, deadline - time.perf_counter())
        _, pending = await asyncio.wait(tasks, timeout=left)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for k, task in enumerate(tasks):
            if task in pending:
                outcomes[k].error = "unfinished"
            elif task.exception() is not None:
                outcomes[k].error = repr(task.exception())[:300]
        for k in sorted(ids):                  # free the worker of what is left
            if outcomes[k].done is None:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with client.delete(f"/v1/generations/{ids[k]}"):
                        pass
        ends = [o.arrival + o.done for o in outcomes if o.done is not None]
        return (max(ends) - times[0]) if ends else float("nan")


# -- a load point --------------------------------------------------------------------------


@dataclass
class Point:
    """One policy at one offered load."""

    policy: str
    load: float                            # fraction of the measured capacity
    rate: float                            # offered requests/s
    seconds: float                         # first arrival → last completion
    outcomes: list[Outcome] = field(repr=False)
    occupancy: float = float("nan")        # mean active slots / max batch per step
    steps_run: int = 0                     # the worker's steps during the point

    @property
    def completed(self) -> int:
        return sum(o.done is not None for o in self.outcomes)

    def latencies(self, what: str, only: list[Outcome] | None = None) -> list[float]:
        """`what` of each request, an unfinished one counting as infinitely late."""
        return [getattr(o, what) if o.done is not None else math.inf
                for o in (self.outcomes if only is None else only)]

    def per_step(self) -> list[float]:
        """End-to-end latency / steps of each request (vLLM's normalized latency, per step
        instead of per token): comparable across the mix's step counts."""
        return [o.done / o.steps if o.done is not None else math.inf for o in self.outcomes]

    def summary(self) -> dict[str, Any]:
        done = self.latencies("done")
        snaps = [o for o in self.outcomes if o.snapshots and o.done is not None]
        waits = [o.queue_wait for o in self.outcomes if o.queue_wait is not None]
        out: dict[str, Any] = {
            "policy": self.policy, "load": self.load, "offered_rps": self.rate,
            "requests": len(self.outcomes), "completed": self.completed,
            "achieved_rps": self.completed / self.seconds if self.seconds > 0 else 0.0,
            "achieved_images_per_s": sum(o.images for o in self.outcomes if o.done is not None)
            / self.seconds if self.seconds > 0 else 0.0,
            "occupancy": self.occupancy, "worker_steps": self.steps_run,
            "client_lag_max_s": max(o.lag for o in self.outcomes),
            "errors": sorted({o.error for o in self.outcomes if o.error}),
        }
        for q in QUANTILES:
            out[f"e2e_p{q}_s"] = percentile(done, q)
        for q in (50, 99):
            out[f"per_step_p{q}_s"] = percentile(self.per_step(), q)
        for q in (50, 99):
            out[f"first_frame_p{q}_s"] = percentile([o.first_frame for o in snaps
                                               if o.first_frame is not None], q)
            out[f"queue_wait_p{q}_s"] = percentile(waits, q)
        out["by_steps"] = {
            str(s): {f"p{q}_s": percentile(self.latencies("done", [o for o in self.outcomes
                                                             if o.steps == s]), q)
                     for q in (50, 99)}
            for s in sorted({o.steps for o in self.outcomes})}
        return out


def run_point(url: str, metrics_url: str, policy: str, load: float, capacity: float,
              bodies: list[dict[str, Any]], specs: list[GenerationSpec], unit: list[float],
              drain_s: float) -> Point:
    rate = load * capacity
    times = [u / rate for u in unit]
    outcomes = [Outcome(arrival=t, steps=s.steps, images=s.num_images,
                        snapshots=bool(s.snapshot_every), conditioned="init_image" in b)
                for t, s, b in zip(times, specs, bodies, strict=True)]
    m0 = scrape(metrics_url)
    seconds = run_async(open_loop(url, bodies, times, outcomes, drain_s))
    m1 = scrape(metrics_url)
    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
    steps = int(d.get("ddpm_worker_batch_occupancy_count", 0))
    occ = d.get("ddpm_worker_batch_occupancy_sum", 0.0) / steps if steps else float("nan")
    return Point(policy, load, rate, seconds, outcomes, occ, steps)


def sustained(points: list[Point], objective: float, per_step: bool = False) -> dict[str, Any]:
    """The highest load (ascending sweep) up to which every p99 (of the end-to-end latency,
    or of the latency per step) is within `objective`, and that load interpolated linearly
    in p99 towards the first load that fails."""
    def p99_of(p: Point) -> float:
        return percentile(p.per_step() if per_step else p.latencies("done"), 99)

    best: Point | None = None
    for p in points:
        p99 = p99_of(p)
        if p99 > objective:
            interp = 0.0                    # below the sweep: nothing to interpolate from
            if best is not None:
                lo, lo_p99 = best.load, p99_of(best)
                interp = lo
                if math.isfinite(p99) and p99 > lo_p99:
                    interp = lo + (p.load - lo) * (objective - lo_p99) / (p99 - lo_p99)
            return {"load": best.load if best else 0.0,
                    "rps": best.rate if best else 0.0, "interpolated_load": interp,
                    "first_failing_load": p.load, "within_sweep": True}
        best = p
    return {"load": best.load if best else 0.0, "rps": best.rate if best else 0.0,
            "interpolated_load": best.load if best else 0.0, "first_failing_load": None,
            "within_sweep": False}


# -- the picture ---------------------------------------------------------------------------

COLORS = {"step": "#1f77b4", "request": "#d62728", "none": "#7f7f7f"}


def svg_chart(rows: list[dict[str, Any]], objectives: dict[str, float], title: str) -> str:
    """p50 and p99 end-to-end latency and p99 latency per step against the offered load, one
    line per policy (log latency axes; an unfinished point drawn on the top edge), each
    objective dashed."""
    panels = [("e2e_p50_s", "p50 end-to-end latency (s, log)"),
              ("e2e_p99_s", "p99 end-to-end latency (s, log)"),
              ("per_step_p99_s", "p99 latency per step (s, log)")]
    w, h, pad_l, pad_r, pad_t, pad_b, gap = 1260, 380, 64, 20, 56, 52, 64
    pw = (w - pad_l - pad_r - gap * (len(panels) - 1)) / len(panels)
    ph = h - pad_t - pad_b
    loads = [r["load"] for r in rows]
    x_max = max(loads) * 1.05
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w - pad_r}" y="20" text-anchor="end" font-size="14">{title}</text>']
    for panel, (key, label) in enumerate(panels):
        x0 = pad_l + panel * (pw + gap)
        objective = objectives.get(key)
        finite = [r[key] for r in rows if r[key] is not None and math.isfinite(r[key])
                  and r[key] > 0] + ([objective] if objective else [])
        lo = 10 ** math.floor(math.log10(min(finite)))
        hi = 10 ** math.ceil(math.log10(max(finite) * 1.05))

        def sy(y: float | None, lo: float = lo, hi: float = hi) -> float:
            if y is None or not math.isfinite(y):
                return pad_t
            return pad_t + ph * (1 - math.log10(y / lo) / math.log10(hi / lo))

        def sx(x: float, x0: float = x0) -> float:
            return x0 + pw * x / x_max

        out.append(f'<rect x="{x0}" y="{pad_t}" width="{pw}" height="{ph}" fill="none" '
                   f'stroke="#333"/>')
        out.append(f'<text x="{x0 + pw / 2}" y="{pad_t - 8}" text-anchor="middle">{label}'
                   '</text>')
        decade = lo
        while decade <= hi * 1.0001:
            for m in (1, 2, 5):
                y = decade * m
                if lo <= y <= hi * 1.0001:
                    yy = sy(y)
                    out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                               f'stroke="#ddd"/>')
                    out.append(f'<text x="{x0 - 4}" y="{yy + 4:.1f}" text-anchor="end">'
                               f'{y:g}</text>')
            decade *= 10
        for load in sorted(set(loads)):
            out.append(f'<text x="{sx(load):.1f}" y="{pad_t + ph + 16}" '
                       f'text-anchor="middle">{load:g}</text>')
        out.append(f'<text x="{x0 + pw / 2}" y="{h - 14}" text-anchor="middle">offered load '
                   f'(fraction of the measured capacity)</text>')
        if objective:
            yy = sy(objective)
            out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                       f'stroke="#000" stroke-dasharray="6,4"/>')
            out.append(f'<text x="{x0 + pw - 4}" y="{yy - 4:.1f}" text-anchor="end">'
                       f'objective {objective:.3g} s</text>')
        for policy in policies:
            pts = [(sx(r["load"]), sy(r[key])) for r in rows if r["policy"] == policy]
            color = COLORS.get(policy, "#000")
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>'
                    for x, y in pts]
    for k, policy in enumerate(policies):
        x = pad_l + 10 + k * 110
        out.append(f'<line x1="{x}" x2="{x + 24}" y1="16" y2="16" stroke='
                   f'"{COLORS.get(policy, "#000")}" stroke-width="3"/>')
        out.append(f'<text x="{x + 30}" y="20">{policy}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# -- output --------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "unfin." if math.isinf(x) else f"{x * 1e3:.0f}"


def print_table(rows: list[dict[str, Any]], sustain: dict[str, dict[str, dict[str, Any]]],
                objectives: dict[str, float]) -> None:
    print(f"\n{'policy':8} {'load':>5} {'offer':>6} {'achvd':>6} {'done':>7} "
          f"{'e2e ms':>23} {'first frame':>13} {'queue wait':>13} {'ms/step':>13} "
          f"{'occup.':>6}")
    print(f"{'':8} {'':5} {'req/s':>6} {'req/s':>6} {'':7} {'p50':>7} {'p90':>7} {'p99':>7} "
          + f"{'p50':>6} {'p99':>6} " * 3)
    for r in rows:
        print(f"{r['policy']:8} {r['load']:5.2f} {r['offered_rps']:6.2f} "
              f"{r['achieved_rps']:6.2f} {r['completed']:3d}/{r['requests']:<3d} "
              + " ".join(f"{_ms(r[f'e2e_p{q}_s']):>7}" for q in QUANTILES) + " "
              + " ".join(f"{_ms(r[f'{w}_p{q}_s']):>6}"
                         for w in ("first_frame", "queue_wait", "per_step") for q in (50, 99))
              + f" {r['occupancy']:6.2f}")
    steps = sorted({int(k) for r in rows for k in r["by_steps"]})
    print("\ne2e ms by step count, p50/p99:")
    print(f"{'policy':8} {'load':>5} " + " ".join(f"{f'{s} steps':>15}" for s in steps))
    for r in rows:
        by = r["by_steps"]
        print(f"{r['policy']:8} {r['load']:5.2f} " + " ".join(
            f"{_ms(by[str(s)]['p50_s']):>7}/{_ms(by[str(s)]['p99_s']):<7}" if str(s) in by
            else f"{'-':>15}" for s in steps))
    for kind, what in (("e2e_p99", "end-to-end p99"), ("per_step_p99", "p99 per step")):
        print(f"\nsustained load at {what} <= {objectives[kind] * 1e3:.0f} ms (fraction of "
              "capacity; interpolated in brackets):")
        for policy, s in sustain[kind].items():
            more = "" if s["within_sweep"] else " (every load of the sweep passed)"
            print(f"  {policy:8} {s['load']:.2f} = {s['rps']:.2f} req/s "
                  f"[{s['interpolated_load']:.2f}]{more}")
        if "step" in sustain[kind] and "request" in sustain[kind]:
            a = sustain[kind]["step"]["interpolated_load"]
            b = sustain[kind]["request"]["interpolated_load"]
            ratio = f"{a / b:.2f}x" if b > 0 else \
                "n/a (request-level met no load of the sweep)"
            print(f"  step-level / request-level (interpolated): {ratio}")


# -- main ----------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path,
                   help="a checkpoint directory (default: checkpoints/mnist unless --preset)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a random-weight model of this preset instead (null: a forward of "
                        "~zero cost, so the serving stack's own costs)")
    p.add_argument("--device", default="cpu", help="ddpm serve --device")
    p.add_argument("--max-batch", type=int, default=8, help="DDPM_MAX_BATCH (not for none)")
    p.add_argument("--policies", default=",".join(ADMISSIONS),
                   help="admission policies, comma-separated (the first one measures the "
                        "capacity and unloaded latency; default: all, step first)")
    p.add_argument("--loads", default="0.25,0.5,1,1.5,2,3",
                   help="offered loads as fractions of the measured capacity")
    p.add_argument("--requests", type=int, default=40, help="requests per load point")
    p.add_argument("--steps", default="10,50,200", help="the mix's step counts")
    p.add_argument("--max-images", type=int, default=4, help="images per request: 1 to this")
    p.add_argument("--snapshot-share", type=float, default=0.25,
                   help="share of requests with snapshots (a frame every tenth of the steps)")
    p.add_argument("--conditioned", type=float, default=0.25,
                   help="share of requests with an input image (img2img 0.8 / inpainting)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--seed", type=int, default=0, help="of the mix and the arrivals")
    p.add_argument("--capacity-requests", type=int, default=0,
                   help="requests of the closed-loop capacity run (0: 8 x max batch)")
    p.add_argument("--capacity-rps", type=float,
                   help="take this capacity (requests/s) instead of measuring it: the same "
                        "absolute loads as an earlier run, for a before/after")
    p.add_argument("--unloaded-requests", type=int, default=12,
                   help="requests sent one at a time for the unloaded latency")
    p.add_argument("--objective-x", type=float, default=2.0,
                   help="p99 objective = this x the unloaded p99 of the mix")
    p.add_argument("--objective-s", type=float, help="p99 objective in seconds (overrides)")
    p.add_argument("--per-step-objective-s", type=float,
                   help="objective of the p99 latency per step, seconds (default: "
                        "--objective-x x the unloaded p99 per step)")
    p.add_argument("--drain-s", type=float, default=0.0,
                   help="seconds after the last arrival before the rest is canceled "
                        "(0: 3 x the objective)")
    p.add_argument("--stop-x", type=float, default=3.0,
                   help="stop a policy's sweep once its p99 passes this x the objective")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--svg", type=Path, help="draw the curves here")
    args = p.parse_args(argv)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    bad = [x for x in policies if x not in get_args(Admission)]
    loads = sorted(_floats(args.loads))
    steps = tuple(int(x) for x in _floats(args.steps))
    if bad or not policies or not loads or min(loads) <= 0 or args.requests < 2 or not steps:
        p.error(f"--policies from {ADMISSIONS}, positive --loads, --requests >= 2, --steps")
    stop_on_sigterm()
    t_start = time.monotonic()

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-latency-")))
        if args.preset:
            models_dir, model = tmp / "models", args.preset
            init_checkpoint(models_dir / model, preset(args.preset))
            label = f"preset {args.preset}, random weights"
        else:
            ckpt = args.checkpoint or DEFAULT_MODELS / "mnist"
            models_dir, model, label = ckpt, ckpt.resolve().name, f"checkpoint {ckpt}"
        cfg = json.loads((models_dir / model / "config.json").read_text()
                         if (models_dir / model / "config.json").is_file()
                         else (models_dir / "config.json").read_text())
        unet = cfg["unet"]
        cond = Conditioned.make(args.conditioned, unet["image_size"], unet["in_channels"]) \
            if args.conditioned else None
        mix = Mix(model, steps, args.max_images, args.snapshot_share, args.sampler,
                  int(unet.get("num_classes", 0)), cond)
        specs = mix.specs(args.requests, args.seed)
        bodies = mix.bodies(specs)
        unit = arrivals(args.requests, args.seed)
        capacity = unloaded_p50 = unloaded_p99 = objective = step_objective = float("nan")
        points: dict[str, list[Point]] = {}
        os.environ.pop("DDPM_REDIS_URL", None)     # ddpm serve embeds its own Redis

        for policy in policies:
            os.environ.update({**SERVE_ENV, "DDPM_ADMISSION": policy,
                               "DDPM_MAX_BATCH": str(args.max_batch)})
            metrics_port = free_port()
            serve = Serve(models_dir, free_port(), metrics_port, args.device,
                          tmp / f"serve-{policy}.log")
            try:
                serve.wait_ready(SERVE_START_TIMEOUT)
            except BenchError:
                serve.stop()
                raise
            stack.callback(serve.stop)
            url, metrics_url = serve.base, f"http://127.0.0.1:{metrics_port}/metrics"
            # Warm-up: the batch shapes (CPU kernels, CUDA caches), connections, caches.
            warm = mix.specs(max(args.max_batch, 4), args.seed + 10**6)
            run_async(stack_load(url, args.max_batch, warm, "snapshot", cond))
            if math.isnan(capacity) and args.capacity_rps:
                capacity = args.capacity_rps
            if math.isnan(objective):
                n = args.capacity_requests or 8 * args.max_batch
                if math.isnan(capacity):
                    seconds, _ = run_async(stack_load(url, 2 * args.max_batch,
                                                      mix.specs(n, args.seed + 1), "snapshot",
                                                      cond))
                    capacity = n / seconds
                _, alone = run_async(stack_load(url, 1, mix.specs(args.unloaded_requests,
                                                                  args.seed + 2), "snapshot",
                                                cond))
                unloaded_p50 = percentile([s.done for s in alone], 50)
                unloaded_p99 = percentile([s.done for s in alone], 99)
                objective = args.objective_s or args.objective_x * unloaded_p99
                alone_specs = mix.specs(args.unloaded_requests, args.seed + 2)
                step_objective = args.per_step_objective_s or args.objective_x * percentile(
                    [a.done / sp.steps for a, sp in zip(alone, alone_specs, strict=True)], 99)
                how = "given" if args.capacity_rps else \
                    f"closed loop, {2 * args.max_batch} clients, {n} requests"
                print(f"{policy}: capacity {capacity:.3f} req/s ({how}); unloaded p50 "
                      f"{unloaded_p50:.2f} s, p99 {unloaded_p99:.2f} s; p99 objectives "
                      f"{objective:.2f} s, {step_objective * 1e3:.1f} ms per step",
                      file=sys.stderr, flush=True)
            drain = args.drain_s or 3 * objective
            points[policy] = []
            for load in loads:
                pt = run_point(url, metrics_url, policy, load, capacity, bodies, specs, unit,
                               drain)
                points[policy].append(pt)
                s = pt.summary()
                print(f"  {policy} load {load:.2f}: {pt.completed}/{args.requests} done, p99 "
                      f"{_ms(s['e2e_p99_s'])} ms, {time.monotonic() - t_start:.0f} s so far",
                      file=sys.stderr, flush=True)
                p99 = s["e2e_p99_s"]
                if pt.completed < len(pt.outcomes) or p99 > args.stop_x * objective:
                    break                  # overloaded: higher loads would only be worse
            serve.stop()

    rows = [pt.summary() for pts in points.values() for pt in pts]
    objectives = {"e2e_p99": objective, "per_step_p99": step_objective}
    sustain = {kind: {policy: sustained(pts, objectives[kind], kind == "per_step_p99")
                      for policy, pts in points.items()} for kind in objectives}
    v = versions()
    print(f"\nLatency under load: {', '.join(f'{k} {x}' for k, x in v.items())}")
    print(f"model {model} ({label}) on {args.device}, max batch {args.max_batch}; mix: steps "
          f"{'/'.join(map(str, steps))}, 1-{args.max_images} images, {args.snapshot_share:.0%} "
          f"with snapshots, {args.conditioned:.0%} image-conditioned, {args.sampler}; "
          f"{args.requests} requests per load, Poisson arrivals (seed {args.seed})")
    print(f"capacity {capacity:.3f} req/s ({policies[0]}, closed loop); unloaded p50 "
          f"{unloaded_p50:.2f} s, p99 {unloaded_p99:.2f} s")
    print_table(rows, sustain, objectives)
    print(f"\n({time.monotonic() - t_start:.0f} s in all)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable({
            "benchmark": "latency", "versions": v, "model": model, "label": label,
            "settings": {k: (str(x) if isinstance(x, Path) else x) for k, x in vars(args).items()},
            "capacity_rps": capacity, "unloaded_p50_s": unloaded_p50,
            "unloaded_p99_s": unloaded_p99, "objective_p99_s": objective,
            "objective_per_step_p99_s": step_objective,
            "rows": rows, "sustained": sustain,
            "requests": {policy: [{"load": pt.load, "outcomes": [asdict(o) for o in pt.outcomes]}
                                  for pt in pts] for policy, pts in points.items()},
        }), indent=1) + "\n")
    if args.svg:
        args.svg.parent.mkdir(parents=True, exist_ok=True)
        args.svg.write_text(svg_chart(rows, {"e2e_p99_s": objective,
                                             "per_step_p99_s": step_objective},
                                      f"{model} ({args.device}): latency "
                                      f"under Poisson load, max batch {args.max_batch}"))


def _jsonable(x: Any) -> Any:
    """NaN and infinity (no value, unfinished) as null: JSON has neither."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
