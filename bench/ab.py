"""Two revisions through `bench.service`, run after run in turn, and their medians.

On a shared or virtual machine the same commit can measure ±10 % apart minutes later, so
a before/after made of two back-to-back runs says little. This runs `bench/service.py` with
the same arguments alternately in a worktree of `--base` (made here, removed after) and in
this checkout, `--runs` times each, and prints, per row of the service table (stack rows by
clients, and the K-image row), the median and every run of what the issue-25 figures read:
images/s, occupancy, the worker's, API's and Redis's CPU ms per image, Redis round trips and
commands per image, and the worker CPU ratio of K-image to 1-image rows. Both trees run with
this checkout's Python environment. Not a test: nothing here asserts a speed.

    python -m bench.ab --base eb3c8ba --runs 5 -- --preset micro --max-batch 64 --steps 20 \\
        --sampler ddim --snapshot-every 0 --images 1024 --clients 64 --big 64 \\
        --big-clients 2 --skip-batch1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
FIELDS = ("images_per_s", "occupancy", "worker", "api", "redis", "redis_round_trips",
          "redis_commands")


def rows(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A `bench.service --json` document's stack rows: label → the fields above."""
    out = {}
    for r in doc["runs"]:
        if r["side"] != "stack":
            continue
        label = f"{r['request_images']}-image, {r['clients']} clients"
        out[label] = {"images_per_s": r["images_per_s"],
                      "occupancy": (r.get("engine") or {}).get("occupancy", 0.0),
                      "redis_round_trips": r["redis_round_trips"],
                      "redis_commands": r["redis_commands"],
                      **{k: r["cpu_ms"].get(k, 0.0) for k in ("worker", "api", "redis")}}
    big = [v for k, v in out.items() if not k.startswith("1-image")]
    for k, v in out.items():
        if k.startswith("1-image") and big and v["worker"]:
            v["ratio"] = big[0]["worker"] / v["worker"]
    return out


def run(tree: Path, args: list[str], out: Path) -> dict[str, dict[str, float]]:
    cmd = [sys.executable, "-m", "bench.service", *args, "--repeats", "1", "--json", str(out)]
    subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return rows(json.loads(out.read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="the revision to compare this checkout with")
    p.add_argument("--runs", type=int, default=5, help="runs of each side, interleaved")
    p.add_argument("service_args", nargs=argparse.REMAINDER,
                   help="after --: bench.service's arguments (not --repeats or --json)")
    args = p.parse_args()
    extra = [a for a in args.service_args if a != "--"]
    if args.runs < 1 or {"--repeats", "--json"} & set(extra):
        p.error("--runs must be positive; --repeats and --json are this tool's")
    found: dict[str, list[dict[str, dict[str, float]]]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base],
                       cwd=HERE, check=True, capture_output=True)
        try:
            for i in range(args.runs):
                for side, tree in (("base", base), ("this", HERE)):
                    found[side].append(run(tree, extra, Path(tmp) / f"{side}{i}.json"))
                    print(f"run {i + 1}/{args.runs}: {side} done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=HERE,
                           check=False, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, check=True,
                          capture_output=True, text=True).stdout.strip()
    print(f"bench.service {' '.join(extra)}\n{args.runs} runs each, interleaved: base "
          f"{args.base}, this checkout {head}; median [each run]")
    for label in found["this"][0]:
        print(f"\n{label}")
        for field in (*FIELDS, "ratio"):
            cells = []
            for side in ("base", "this"):
                vals = [r[label][field] for r in found[side] if field in r.get(label, {})]
                each = " ".join(f"{v:.3g}" for v in vals)
                cells.append(f"{statistics.median(vals):9.3f} [{each}]" if vals else "-")
            if cells != ["-", "-"]:
                print(f"  {field:18s} base {cells[0]:40s} this {cells[1]}")


if __name__ == "__main__":
    main()
