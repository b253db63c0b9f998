"""`ddpm serve` (what `make run` starts) exposes the worker's metrics as well as the API's,
over real HTTP, and says where."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ddpm.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DDPM_REDIS_URL",
                                                             "DDPM_METRICS_PORT")}
    return {**env, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", **extra}


def _serve(models_dir: Path, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "ddpm", "serve", "--models-dir", str(models_dir),
            "--device", "cpu", "--port", str(port), "--ephemeral", *args]


def _families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_exposes_worker_metrics_and_prints_both_urls(models_dir: Path, tmp_path: Path,
                                                           how: str) -> None:
    port, metrics_port = free_port(), free_port()
    args, extra = ((["--metrics-port", str(metrics_port)], {}) if how == "flag"
                   else ([], {"DDPM_METRICS_PORT": str(metrics_port)}))
    out = tmp_path / "serve.out"
    with open(out, "wb") as fo:
        proc = subprocess.Popen(_serve(models_dir, port, *args), cwd=ROOT, env=_env(**extra),
                                stdout=fo, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "metrics:" not in out.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no metrics line from ddpm serve:\n{out.read_text()[-3000:]}")
            time.sleep(0.1)
        line = next(x for x in out.read_text().splitlines() if "metrics:" in x)
        api_url = f"http://127.0.0.1:{port}/metrics"
        worker_url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert api_url in line and worker_url in line, line
        worker = _families(httpx.get(worker_url, timeout=10).text)
        assert {s.labels["model"] for s in worker["ddpm_worker_model_load_seconds"]} == \
            {"tiny", "tinycond"}
        assert "ddpm_worker_jobs" in worker
        api = _families(httpx.get(api_url, timeout=10).text)
        assert api["ddpm_workers_live"][0].value == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    # The worker (its metrics server with it) is gone once serve has exited.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)


def test_serve_refuses_a_taken_metrics_port(models_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        res = subprocess.run(_serve(models_dir, free_port(), "--metrics-port", str(busy)),
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert f"127.0.0.1:{busy}" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "redis at" not in res.stdout, res.stdout      # nothing was started
