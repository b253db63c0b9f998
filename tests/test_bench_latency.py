"""bench.latency end to end at a tiny size (null model, a handful of requests): the whole
machinery (`ddpm serve` per policy with its setting, capacity and unloaded runs, Poisson
arrivals, the client, the summary, JSON and SVG) runs, and every request completes. Two
policies, not three, to keep it to a few seconds per server; the figures are not checked
(a shared CI machine), only their shape and the bookkeeping that ties them together."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.latency import arrivals

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["step", "request"]
LOADS = [0.3, 0.6]
REQUESTS = 5


def test_the_latency_benchmark_runs_every_policy_and_completes_every_request(
        tmp_path: Path) -> None:
    out, svg = tmp_path / "latency.json", tmp_path / "latency.svg"
    env = {k: v for k, v in os.environ.items() if k != "DDPM_REDIS_URL"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.latency", "--preset", "null", "--max-batch", "4",
         "--policies", ",".join(POLICIES), "--loads", ",".join(map(str, LOADS)),
         "--requests", str(REQUESTS), "--capacity-requests", "4", "--unloaded-requests", "2",
         "--steps", "2,6", "--max-images", "2", "--snapshot-share", "0.5",
         "--conditioned", "0.5", "--objective-s", "60", "--per-step-objective-s", "60",
         "--json", str(out), "--svg", str(svg)],
        cwd=ROOT, env={**env, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["capacity_rps"] > 0 and doc["objective_p99_s"] == 60
    # Every policy at every load (a 60 s objective is never broken here, so no sweep stops).
    assert [(r["policy"], r["load"]) for r in doc["rows"]] == \
        [(p, load) for p in POLICIES for load in LOADS]
    for row in doc["rows"]:
        assert row["completed"] == row["requests"] == REQUESTS, row
        assert not row["errors"], row
        assert row["e2e_p50_s"] <= row["e2e_p90_s"] <= row["e2e_p99_s"], row
        assert math.isclose(row["offered_rps"], row["load"] * doc["capacity_rps"])
        assert row["worker_steps"] > 0 and 0 < row["occupancy"] <= 1, row
    assert doc["objective_per_step_p99_s"] > 0
    for policy in POLICIES:
        for kind in ("e2e_p99", "per_step_p99"):
            assert doc["sustained"][kind][policy]["load"] == max(LOADS)
        # The same requests at the same (scaled) arrival times under every policy.
        for point in doc["requests"][policy]:
            got = [o["arrival"] for o in point["outcomes"]]
            rate = point["load"] * doc["capacity_rps"]
            want = [t / rate for t in arrivals(REQUESTS, 0)]
            assert all(math.isclose(a, b) for a, b in zip(got, want, strict=True))
            assert all(o["done"] is not None and o["done"] > 0 for o in point["outcomes"])
            mix = [(o["steps"], o["images"], o["snapshots"], o["conditioned"])
                   for o in point["outcomes"]]
            assert mix == [(o["steps"], o["images"], o["snapshots"], o["conditioned"])
                           for o in doc["requests"][POLICIES[0]][0]["outcomes"]]
    assert "sustained load" in proc.stdout and "step-level / request-level" in proc.stdout
    root = ET.fromstring(svg.read_text())       # three panels, a line per policy in each
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 3 * len(POLICIES)
