"""`ddpm serve` keeps its state: its embedded Redis writes an append-only file in a data
directory, so Ctrl-C and starting again answers every job as before — finished ones with
their images, events and place in the listing; the running one (re-queued by the worker at
Ctrl-C) and the queued ones run to the end afterwards; a second Ctrl-C hurries the worker
but still stops Redis last. One serve per data directory; the directory is the flag's, else
DDPM_SERVE_DATA_DIR's, else the XDG state directory."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from ddpm.redis_server import APPENDFSYNC, LOCK_NAME, RedisServer, free_port
from ddpm.serve import ServeSettings, data_dir_of, default_data_dir

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# One image at a time, and a job running at Ctrl-C is re-queued at once (no grace).
ENV = {"DDPM_MAX_BATCH": "1", "DDPM_GRACE_PERIOD": "0", "OMP_WAIT_POLICY": "PASSIVE",
       "PYTHONUNBUFFERED": "1", "DDPM_LOG_LEVEL": "WARNING"}
LONG = {"model": "tiny", "sampler": "ddpm", "steps": 300}      # ~3 s each on 2 CPU cores


def _env(**extra: str) -> dict[str, str]:
    """Without DDPM_REDIS_URL (serve embeds its own Redis) nor serve's own settings."""
    env = {k: v for k, v in os.environ.items()
           if k != "DDPM_REDIS_URL" and not k.startswith("DDPM_SERVE_")}
    return {**env, **ENV, **extra}


def _command(models_dir: Path, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "ddpm", "serve", "--models-dir", str(models_dir),
            "--device", "cpu", "--port", str(port), "--metrics-port", "0", *args]


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    log: Path
    url: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_for(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := cond()):
            if self.proc.poll() is not None:
                pytest.fail(f"ddpm serve exited ({self.proc.returncode}) while waiting for "
                            f"{what}\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{self.output()}")
            time.sleep(0.05)
        return value

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=10)

    def status(self, job: str) -> str:
        r = self.get(f"/v1/generations/{job}")
        assert r.status_code == 200, f"{job}: {r.status_code} {r.text}\n{self.output()}"
        return str(r.json()["status"])

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; its exit code."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ddpm serve still running 60 s after SIGINT\n{self.output()}")


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """`start_serve(models_dir, *flags)`, ready (a worker advertises, /readyz is 200).
    Afterwards any still running is killed; its children follow it (they get SIGTERM when
    their parent dies: ddpm/processes.py)."""
    started: list[Serve] = []

    def start(models_dir: Path, *args: str) -> Serve:
        port = free_port()
        log = tmp_path / f"serve{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(_command(models_dir, port, *args), cwd=ROOT, env=_env(),
                                    stdout=out, stderr=subprocess.STDOUT)
        serve = Serve(proc, log, f"http://127.0.0.1:{port}")
        started.append(serve)

        def ready() -> bool:
            try:
                return serve.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        serve.wait_for(ready, 180, "/readyz to answer 200")
        return serve

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(timeout=10)


def _submit(serve: Serve, **body: Any) -> str:
    r = httpx.post(f"{serve.url}/v1/generations", json=body, timeout=10)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _events(serve: Serve, job: str) -> list[tuple[str, str]]:
    """(id, event) of the job's whole SSE stream, which the server closes after `done`."""
    out, cur = [], {}
    with httpx.stream("GET", f"{serve.url}/v1/generations/{job}/events", timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line:
                if cur:
                    out.append((cur.get("id", ""), cur.get("event", "")))
                    cur = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(":")
                cur[key] = value.removeprefix(" ")
    return out


def _listed(serve: Serve) -> set[str]:
    r = serve.get("/v1/generations?limit=100")
    assert r.status_code == 200, r.text
    return {g["id"] for g in r.json()["generations"]}


def _png(serve: Serve, job: str) -> bytes:
    r = serve.get(f"/v1/generations/{job}/images/0")
    assert r.status_code == 200, f"{job}: {r.status_code} {r.text}"
    assert r.content.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (16, 16)
    return r.content


def test_ctrl_c_and_start_again_keeps_every_job(start_serve: Callable[..., Serve],
                                                models_dir: Path, tmp_path: Path) -> None:
    """The issue's done-when: SIGINT while a job runs and two wait; serve again on the same
    data directory: every id answers (no 404), the finished job with the same image bytes,
    events and listing; the running and the queued ones run to `succeeded` with images."""
    data = tmp_path / "state" / "redis"          # made by serve
    first = start_serve(models_dir, "--data-dir", str(data))
    assert f"its data in {data}" in first.output(), first.output()

    done = _submit(first, model="tiny", steps=4, seed=1)
    first.wait_for(lambda: first.status(done) == "succeeded", 60, f"{done} to succeed")
    image, events, doc = _png(first, done), _events(first, done), first.get(
        f"/v1/generations/{done}").json()
    assert events[-1][1] == "done", events

    waiting = [_submit(first, **LONG, seed=s) for s in (2, 3, 4)]
    first.wait_for(lambda: first.status(waiting[0]) == "running", 60,
                   f"{waiting[0]} to run")
    before = {job: first.status(job) for job in waiting}
    listed = _listed(first)
    code = first.stop()
    # What Ctrl-C interrupted: one job running (max batch 1), the others still queued.
    assert sorted(before.values()) == ["queued", "queued", "running"], before
    assert code in (0, 130), f"exit code {code}\n{first.output()}"
    assert {done, *waiting} <= listed, listed

    second = start_serve(models_dir, "--data-dir", str(data))
    # At once, before any of them could have run to its end: every id is known, none lost
    # nor ended (the running one was put back in the queue at Ctrl-C, DDPM_GRACE_PERIOD=0).
    after = {job: second.status(job) for job in waiting}
    assert set(after.values()) <= {"queued", "running"}, after
    again = second.get(f"/v1/generations/{done}").json()
    assert again["status"] == "succeeded" and again["id"] == doc["id"] == done, again
    assert _png(second, done) == image
    assert _events(second, done) == events
    assert _listed(second) >= listed

    for job in waiting:
        second.wait_for(lambda job=job: second.status(job) == "succeeded", 120,
                        f"{job} to succeed after the restart")
        _png(second, job)
        assert _events(second, job)[-1][1] == "done"
    assert second.stop() in (0, 130), second.output()
    assert "Traceback" not in first.output() + second.output()


def _children(pid: int) -> dict[int, str]:
    """Live child processes of `pid`: pid → start time (a reused pid is another process)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            raw = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split() if raw else []
        if fields and fields[0] not in "ZX" and int(fields[1]) == pid:
            found[int(entry.name)] = fields[19]
    return found


def _alive(pid: int, start: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in "ZX" and fields[19] == start


def test_a_second_ctrl_c_hurries_the_worker_and_still_stops_in_order(
        start_serve: Callable[..., Serve], models_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the worker drains a running job (a long grace period), then Ctrl-C
    again: serve tells the worker to re-queue now and still waits for it before stopping
    Redis, so no child outlives serve (killed, serve's children would get their
    parent-death SIGTERM together, Redis gone before the worker's last writes); started
    again, the job is there and runs to the end."""
    monkeypatch.setitem(ENV, "DDPM_GRACE_PERIOD", "60")
    data = tmp_path / "redis"
    first = start_serve(models_dir, "--data-dir", str(data))
    job = _submit(first, **{**LONG, "steps": 1000}, seed=5)
    first.wait_for(lambda: first.status(job) == "running", 60, f"{job} to run")
    children = _children(first.proc.pid)
    assert len(children) == 2, children            # the worker and redis-server
    first.proc.send_signal(signal.SIGINT)
    first.wait_for(lambda: "stopping the worker" in first.output(), 30,
                   "serve to stop its worker at the first Ctrl-C")
    code = first.stop()
    left = [pid for pid, start in children.items() if _alive(pid, start)]
    assert not left, f"children alive after serve exited: {left}\n{first.output()}"
    assert code in (0, 130), f"exit code {code}\n{first.output()}"

    second = start_serve(models_dir, "--data-dir", str(data))
    assert second.status(job) in ("queued", "running")
    second.wait_for(lambda: second.status(job) == "succeeded", 120, f"{job} to succeed")
    _png(second, job)


def test_the_embedded_redis_logs_every_write(tmp_path: Path) -> None:
    """What serve's Redis is given: an append-only file in the data directory, fsynced
    each second, as compose's (tests/deploy checks compose against the same constant)."""
    from ddpm.serve import _embedded_redis

    data = tmp_path / "redis"
    srv = _embedded_redis(data)
    with srv, redis.Redis.from_url(srv.url) as client:
        config = client.config_get("*")
        client.set("kept", "1")
        # The redis-server holds the directory's lock too: were serve killed, no second
        # one could start on the directory until this Redis is gone.
        assert srv.proc is not None
        fds = Path(f"/proc/{srv.proc.pid}/fd")
        assert str(data.resolve() / LOCK_NAME) in {os.readlink(fd) for fd in fds.iterdir()}
    assert (config["appendonly"], config["appendfsync"]) == ("yes", APPENDFSYNC)
    assert Path(config["dir"]) == data.resolve()
    assert (data / "appendonly.aof").stat().st_size > 0


def test_a_second_serve_on_the_same_data_dir_is_refused(models_dir: Path,
                                                        tmp_path: Path) -> None:
    """Two redis-servers appending to one AOF would corrupt it (Redis takes no lock): the
    second serve exits 2 naming the directory, before starting a worker."""
    data = tmp_path / "redis"
    with RedisServer(appendonly=True, data_dir=data):
        res = subprocess.run(_command(models_dir, free_port(), "--data-dir", str(data)),
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
        with RedisServer(data_dir=tmp_path / "other"):   # another directory is free
            pass
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert f"{data.resolve()} is in use" in res.stderr, res.stderr
    assert "--data-dir" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "starting a worker" not in res.stdout, res.stdout
    with RedisServer(appendonly=True, data_dir=data):     # free again once it stopped
        pass


def test_data_dir_with_an_external_redis_is_a_usage_error(models_dir: Path) -> None:
    res = subprocess.run(_command(models_dir, free_port(), "--ephemeral"), cwd=ROOT,
                         env={**_env(), "DDPM_REDIS_URL": "redis://127.0.0.1:1/0"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "DDPM_REDIS_URL" in res.stderr, res.stderr


def test_where_the_data_lives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The flag, else DDPM_SERVE_DATA_DIR, else $XDG_STATE_HOME/ddpm-serve/redis (else
    ~/.local/state/...); ephemeral (flag or setting) is none, the flag's dir beats the
    setting's ephemeral."""
    for k in ("DDPM_SERVE_DATA_DIR", "DDPM_SERVE_EPHEMERAL", "XDG_STATE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".local" / "state" / "ddpm-serve" / "redis"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert data_dir_of(None, False, ServeSettings()) == tmp_path / "xdg" / "ddpm-serve" / "redis"
    monkeypatch.setenv("DDPM_SERVE_DATA_DIR", str(tmp_path / "env"))
    assert data_dir_of(None, False, ServeSettings()) == tmp_path / "env"
    assert data_dir_of(tmp_path / "flag", False, ServeSettings()) == tmp_path / "flag"
    assert data_dir_of(None, True, ServeSettings()) is None
    monkeypatch.setenv("DDPM_SERVE_EPHEMERAL", "1")
    assert data_dir_of(None, False, ServeSettings()) is None
    assert data_dir_of(tmp_path / "flag", False, ServeSettings()) == tmp_path / "flag"
    assert data_dir_of(Path("~/x"), False, ServeSettings()) == tmp_path / "home" / "x"


def test_make_run_keeps_its_state_in_the_checkout() -> None:
    """`make run`'s data directory is the checkout's .state/redis, git-ignored."""
    res = subprocess.run(["make", "-n", "-o", "install", "run"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f'DDPM_SERVE_DATA_DIR="{ROOT}/.state/redis"' in res.stdout, res.stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", ".state/redis/appendonly.aof"],
                             cwd=ROOT)
    assert ignored.returncode == 0, ".state/ must be git-ignored"
