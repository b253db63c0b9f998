"""Draw docs/autoscale.svg, the README's picture of autoscaling on the work signal, from the
JSON the slow simulation writes (tests/reliability/test_autoscale.py):

    DDPM_AUTOSCALE_JSON=autoscale.json python -m pytest -q -s -m slow \\
        tests/reliability/test_autoscale.py -k slow
    python docs/make_autoscale.py autoscale.json --out docs/autoscale.svg

Three panels over the same time axis, the bursts marked: the pods (replicas the rule set,
pods still draining, workers the signal counts ready, and the count the triggers asked for
before the HPA's stabilization window); the signal's seconds of work (worker-seconds) with
the per-worker target; remaining image-steps and the jobs waiting. Hand-written SVG in the
style of bench/latency.py's charts (no plotting dependency).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

W, PAD_L, PAD_R, PAD_T, PANEL_H, GAP, PAD_B = 1000, 70, 70, 44, 170, 46, 64
COLORS = {"replicas": "#1f77b4", "asked": "#7f7f7f", "ready": "#2ca02c",
          "draining": "#d62728", "seconds": "#9467bd", "steps": "#ff7f0e", "queued": "#17becf"}


def nice_top(v: float) -> float:
    """The smallest 1, 2 or 5 × 10^k at or above `v` (an axis top)."""
    if v <= 0:
        return 1.0
    k = 10 ** math.floor(math.log10(v))
    return next(m * k for m in (1, 2, 5, 10) if m * k >= v)


def divisions(top: float) -> int:
    """Grid lines for an axis from 0 to a `nice_top` value: round steps (5 × 1, 4 × 5…)."""
    lead = round(top / 10 ** math.floor(math.log10(top)))
    return {1: 5, 2: 4, 5: 5}.get(lead, 4)


def series(data: dict[str, Any]) -> dict[str, list[float]]:
    """Per sample: the pool's counts and the signal summed over the models it serves."""
    params, samples = data["params"], data["samples"]
    out: dict[str, list[float]] = {k: [] for k in (
        "t", "replicas", "draining", "ready", "asked", "seconds", "steps", "queued")}
    for s in samples:
        models = s["models"].values()
        asked = [math.ceil(v / t["target"]) for t, v in zip(params["triggers"], s["values"],
                                                              strict=True) if v is not None]
        out["t"].append(s["t"])
        out["replicas"].append(s["replicas"])
        out["draining"].append(s["terminating"])
        out["ready"].append(max((m.get("workers_ready") or 0 for m in models), default=0))
        out["asked"].append(min(max(asked, default=0), params["max_replicas"]))
        out["seconds"].append(sum(m.get("seconds_of_work") or 0 for m in models))
        out["steps"].append(sum(m.get("remaining_image_steps") or 0 for m in models))
        out["queued"].append(sum(m.get("queued_jobs") or 0 for m in models))
    return out


def svg(data: dict[str, Any], title: str) -> str:
    s = series(data)
    t_max = max(s["t"]) or 1.0
    pw = W - PAD_L - PAD_R
    h = PAD_T + 3 * PANEL_H + 2 * GAP + PAD_B
    seconds_target = next((t["target"] for t in data["params"]["triggers"]
                           if t["value_location"].endswith("seconds_of_work")), None)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{h}" fill="white"/>',
           f'<text x="{W - PAD_R}" y="20" text-anchor="end" font-size="14">{title}</text>']

    def sx(t: float) -> float:
        return PAD_L + pw * t / t_max

    def panel(k: int, label: str, lines: list[tuple[str, str, bool]], top: float,
              right: tuple[str, list[tuple[str, str]], float] | None = None,
              grid: int = 0) -> None:
        """Panel `k`: `lines` (series key, legend, stepped) on the left axis; `right`: a
        second axis (label, its lines, its top); `grid` lines (0: from the left top)."""
        grid = grid or divisions(top)
        y0 = PAD_T + k * (PANEL_H + GAP)
        out.append(f'<rect x="{PAD_L}" y="{y0}" width="{pw}" height="{PANEL_H}" fill="none" '
                   'stroke="#333"/>')
        out.append(f'<text x="{PAD_L}" y="{y0 - 8}">{label}</text>')
        for j in range(grid + 1):
            v = top * j / grid
            yy = y0 + PANEL_H * (1 - j / grid)
            out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                       'stroke="#ddd"/>')
            out.append(f'<text x="{PAD_L - 4}" y="{yy + 4:.1f}" text-anchor="end">{v:g}</text>')
            if right:
                rv = right[2] * j / grid
                out.append(f'<text x="{PAD_L + pw + 4}" y="{yy + 4:.1f}">{rv:g}</text>')
        for m in data["marks"]:
            if m["what"].startswith("burst") and "done" not in m["what"]:
                x = sx(m["t"])
                out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + PANEL_H}" '
                           'stroke="#000" stroke-dasharray="2,3"/>')
                if k == 0:
                    out.append(f'<text x="{x + 3:.1f}" y="{y0 + 12}">{m["what"]}</text>')

        def draw(key: str, axis_top: float, stepped: bool, dash: str = "") -> None:
            pts: list[tuple[float, float]] = []
            for t, v in zip(s["t"], s[key], strict=True):
                y = y0 + PANEL_H * (1 - min(v, axis_top) / axis_top)
                if stepped and pts:
                    pts.append((sx(t), pts[-1][1]))
                pts.append((sx(t), y))
            out.append(f'<polyline fill="none" stroke="{COLORS[key]}" stroke-width="2" '
                       f'{dash}points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')

        legend = [(key, name) for key, name, _ in lines] + (right[1] if right else [])
        for key, _, stepped in lines:
            draw(key, top, stepped, 'stroke-dasharray="5,3" ' if key == "asked" else "")
        if right:
            out.append(f'<text x="{PAD_L + pw}" y="{y0 - 8}" text-anchor="end">{right[0]}'
                       '</text>')
            for key, _ in right[1]:
                draw(key, right[2], key == "queued")
        for j, (key, name) in enumerate(legend):
            x = PAD_L + 10 + j * 190
            yl = y0 + PANEL_H + (34 if k == 2 else 16)
            out.append(f'<line x1="{x}" x2="{x + 22}" y1="{yl - 4}" y2="{yl - 4}" '
                       f'stroke="{COLORS[key]}" stroke-width="3"/>')
            out.append(f'<text x="{x + 28}" y="{yl}">{name}</text>')

    params = data["params"]
    panel(0, f"pods (min {params['min_replicas']}, max {params['max_replicas']})",
          [("replicas", "replicas set", True), ("asked", "asked by the triggers", True),
           ("ready", "workers ready (signal)", True), ("draining", "pods draining", True)],
          params["max_replicas"] + 1, grid=params["max_replicas"] + 1)
    sec_top = nice_top(max(s["seconds"] + [seconds_target or 0]))
    panel(1, "seconds of work (worker-seconds, all models)"
          + (f"; target {seconds_target:g} s per worker" if seconds_target else ""),
          [("seconds", "seconds_of_work", False)], sec_top)
    if seconds_target:
        y0 = PAD_T + PANEL_H + GAP
        yy = y0 + PANEL_H * (1 - seconds_target / sec_top)
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                   'stroke="#000" stroke-dasharray="6,4"/>')
    steps_top = nice_top(max(s["steps"]))
    grid = divisions(steps_top)                     # one grid for both axes
    queued_top = grid * nice_top(max(s["queued"]) / grid)
    panel(2, "remaining image-steps (left)", [("steps", "remaining_image_steps", False)],
          steps_top, ("jobs waiting (right)", [("queued", "queued_jobs")], queued_top))
    y_axis = PAD_T + 3 * PANEL_H + 2 * GAP
    step = nice_top(t_max / 10)
    for j in range(int(t_max // step) + 1):
        out.append(f'<text x="{sx(j * step):.1f}" y="{y_axis + 14}" text-anchor="middle">'
                   f'{j * step:g}</text>')
    out.append(f'<text x="{PAD_L + pw / 2}" y="{h - 4}" text-anchor="middle">seconds since '
               'the autoscaler started (times scaled by '
               f'{data["figures"]["variant"]["factor"]:.3g})</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="the file DDPM_AUTOSCALE_JSON named")
    p.add_argument("--out", type=Path, default=Path("docs/autoscale.svg"))
    args = p.parse_args()
    data = json.loads(args.json.read_text())
    f = data["figures"]
    title = (f"KEDA's rule on the work signal: {f['jobs']} jobs, {f['lost']} lost, "
             f"{f['duplicated']} duplicated, work redone {f['work_redone']:.3f}")
    args.out.write_text(svg(data, title))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
