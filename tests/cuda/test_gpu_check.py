"""`make gpu-check`'s machinery, tested here on the CPU so that the one run on a lent GPU is
not the first: the dry run (`--device cpu`, tiny sizes) goes through every step end to end
and writes one JSON with every section; asked for CUDA on a machine without it, the
script says so and runs nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["tests", "sampler_fp32", "sampler_bf16", "flops_bf16", "service_cifar10",
         "service_null", "worker_cifar10", "worker_null"]


def gpu_check(out: Path, *args: str, timeout: float = 600) -> tuple[int, dict]:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_DEVICE")}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert (out / "gpu-check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "gpu-check.txt").is_file() and (out / "gpu-check-logs.tar.gz").is_file()
    return proc.returncode, json.loads((out / "gpu-check.json").read_text())


@pytest.mark.slow   # about 80 s on 2 cores: every benchmark starts its own processes
def test_dry_run_runs_every_step_and_writes_every_section(tmp_path: Path) -> None:
    code, doc = gpu_check(tmp_path, "--device", "cpu")
    by = {s["name"]: s for s in doc["steps"]}
    assert list(by) == STEPS
    assert doc["mode"] == "quick" and doc["environment"]["redis_server"]
    assert not doc["environment"]["requirement_problems"]
    bad = {n: s.get("reason") or s.get("output_tail", "")[-500:] for n, s in by.items()
           if s["status"] != "ok"}
    assert not bad and code == 0 and doc["ok"], bad
    assert by["tests"]["counts"]["skipped"] >= 1 and by["tests"]["counts"]["failed"] == 0
    assert {r["batch"] for r in by["sampler_fp32"]["rows"]} == {1, 2}
    assert by["flops_bf16"]["rows"] and by["flops_bf16"]["benchmark"]["dtype"] == "bf16"
    for name in ("service_cifar10", "service_null"):
        assert {r["max_batch"] for r in by[name]["rows"]} == {1, 2}, name
        assert all(r["stack_over_raw"] > 0 for r in by[name]["rows"]), name
    for name in ("worker_cifar10", "worker_null"):
        scenarios = {r["scenario"] for r in by[name]["rows"]}
        assert {"many 1-image jobs", "one big job"} <= scenarios, name
        assert "continuous batching" in by[name]["headline"], name


def test_asked_for_cuda_without_it_runs_nothing_and_says_why(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, doc = gpu_check(tmp_path, "--device", "cuda", "--only", "tests,flops_bf16",
                          timeout=180)
    assert code == 1 and not doc["ok"]
    assert doc["environment"]["cuda_available"] is False
    assert [s["name"] for s in doc["steps"]] == ["tests", "flops_bf16"]
    for s in doc["steps"]:
        assert s["status"] == "skipped" and "cuda" in s["reason"].lower(), s
    summary = (tmp_path / "gpu-check.txt").read_text()
    assert "not ok: tests, flops_bf16" in summary
