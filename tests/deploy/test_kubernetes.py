"""The Kubernetes manifests under deploy/, checked offline: every overlay (and the
components on top) renders with `kubectl kustomize`; every core resource validates strictly
against the Kubernetes schema (kubernetes-validate, a pinned version) and each ScaledObject
against KEDA's own CRD schema (vendored, deploy/schemas/keda/); a planted bad field fails
both. Then the manifests are held to the code and to live processes: every ConfigMap key is
a real setting; every probe answers on a `ddpm api` and a `ddpm worker` started with the
ConfigMap's environment; the ScaledObject's URL and value locations resolve in the live
GET /v1/work; securityContext and resources on every container; the grace period covers the
drain; the startup probe and KEDA's cooldown cover the measured model load."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.settings import ApiSettings
from ddpm.redis_server import free_port
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
COMPONENTS = sorted(p.name for p in (DEPLOY / "components").iterdir() if p.is_dir())
KEDA_CRD = DEPLOY / "schemas" / "keda" / "keda.sh_scaledobjects.yaml"
KUBERNETES_VERSION = "1.32.0"       # the oldest release still supported upstream
GRACE_MARGIN = 10                   # seconds past DDPM_GRACE_PERIOD: the step in flight, writes
OUR_UID = 10001                     # the ddpm user of docker/api.Dockerfile, worker.Dockerfile
STANDARD_VARIABLES: set[str] = set()    # ConfigMap keys that are no DDPM_* setting
SETTINGS = {*ApiSettings.model_fields, *WorkerSettings.model_fields}


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: the manifests cannot be rendered (it is on every "
                    "machine image, CI's too; install it: https://kubernetes.io/docs/tasks/tools/)")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(DEPLOY / "overlays" / overlay))


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return rendered(request.param)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def config(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    (cm,) = of_kind(docs, "ConfigMap")
    return dict(cm["data"])


def pod_templates(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def workload(docs: tuple[dict[str, Any], ...], component: str) -> list[dict[str, Any]]:
    return [d for d in of_kind(docs, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]


# -- rendering and schemas ----------------------------------------------------------------


def test_there_are_cpu_and_gpu_overlays_and_the_components() -> None:
    assert {"cpu", "gpu"} <= set(OVERLAYS)
    assert {"scale-to-zero", "external-redis"} <= set(COMPONENTS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_core_resource_validates_strictly(overlay: str) -> None:
    kinds = set()
    for d in rendered(overlay):
        kinds.add(d["kind"])
        if d["apiVersion"].startswith("keda.sh/"):
            continue
        kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
    assert {"ConfigMap", "Service", "Deployment", "StatefulSet", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ScaledObject"} <= kinds
    assert "Secret" not in kinds, "no secret is committed: README says how to create it"


@cache
def keda_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema, strict as the API server's field validation: an object
    with declared properties takes no other (CRDs would prune them silently)."""
    crd = yaml.safe_load(KEDA_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)

    strict(schema)
    return schema


def validate_scaled_object(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.validate(doc, keda_schema())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_objects_validate_against_kedas_crd(overlay: str) -> None:
    scaled = of_kind(rendered(overlay), "ScaledObject")
    assert scaled
    for so in scaled:
        validate_scaled_object(so)


def test_each_worker_deployment_scales_on_its_models_work(docs) -> None:
    """As the signal's contract says: desired = ceil(seconds_of_work / 30) (worker-seconds
    of work per worker), and at least one worker whenever any image-step remains."""
    targets = [so["spec"]["scaleTargetRef"]["name"] for so in of_kind(docs, "ScaledObject")]
    workers = workload(docs, "worker")
    assert sorted(targets) == sorted(d["metadata"]["name"] for d in workers)
    for so in of_kind(docs, "ScaledObject"):
        (d,) = [d for d in workers if d["metadata"]["name"] == so["spec"]["scaleTargetRef"][
            "name"]]
        env = {e["name"]: e.get("value") for e in
               d["spec"]["template"]["spec"]["containers"][0]["env"]}
        (model,) = yaml.safe_load(env["DDPM_MODELS"])
        assert so["spec"]["minReplicaCount"] >= 1, "scale to zero is the component's"
        seconds, anything = so["spec"]["triggers"]
        for t in (seconds, anything):
            assert (t["type"], t["metricType"]) == ("metrics-api", "AverageValue")
        assert seconds["metadata"]["valueLocation"] == f"models.{model}.seconds_of_work"
        assert math.isfinite(float(seconds["metadata"]["targetValue"]))
        assert anything["metadata"]["valueLocation"] == f"models.{model}.remaining_image_steps"
        assert (anything["metadata"]["targetValue"],
                anything["metadata"]["activationTargetValue"]) == ("1000000000", "0")


def test_a_planted_bad_field_fails_both_validators() -> None:
    docs = rendered("gpu")
    deployment = copy.deepcopy(workload(docs, "worker")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "runAsNonroot"] = True                                  # the field is runAsNonRoot
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    so = copy.deepcopy(of_kind(docs, "ScaledObject")[0])
    so["spec"]["minReplicas"] = 0                               # KEDA's is minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        validate_scaled_object(so)
    so = copy.deepcopy(of_kind(docs, "ScaledObject")[0])
    so["spec"]["pollingInterval"] = "10"                        # an integer
    with pytest.raises(jsonschema.ValidationError):
        validate_scaled_object(so)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_components_render_on_every_overlay(overlay: str, tmp_path: Path) -> None:
    """kustomize takes no absolute paths: the test's kustomization names them relatively."""
    rel = Path(os.path.relpath(DEPLOY, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel / "overlays" / overlay)],
        "components": [str(rel / "components" / c) for c in COMPONENTS]}))
    docs = kustomize(tmp_path)
    for d in docs:
        if d["apiVersion"].startswith("keda.sh/"):
            validate_scaled_object(d)
            assert d["spec"]["minReplicaCount"] == 0, "scale-to-zero"
        else:
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
    assert not of_kind(tuple(docs), "StatefulSet"), "external-redis: no in-cluster Redis"
    # scale-to-zero: the API takes the job that wakes a worker, and stays ready at 0 workers
    (cm,) = of_kind(tuple(docs), "ConfigMap")
    assert cm["data"]["DDPM_SERVE_IDLE_MODELS"] == "true", "scale-to-zero: idle models"
    for d in of_kind(tuple(docs), "Deployment"):
        env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        ref = env["DDPM_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "ddpm-secrets", "key": "DDPM_REDIS_URL"}


# -- the manifests against the code -------------------------------------------------------


def test_every_config_key_is_a_setting_and_its_value_is_accepted(docs, monkeypatch) -> None:
    data = config(docs)
    for key in data:
        assert key in STANDARD_VARIABLES or (
            key.startswith("DDPM_") and key.removeprefix("DDPM_").lower() in SETTINGS), \
            f"{key} is no field of ApiSettings or WorkerSettings"
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    ApiSettings()
    WorkerSettings()
    for _, spec in pod_templates(docs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                name = e["name"]
                assert name.removeprefix("DDPM_").lower() in SETTINGS, name
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "ddpm-secrets" and ref["key"] == name


def test_every_container_is_locked_down_with_resources(docs) -> None:
    for name, spec in pod_templates(docs):
        pod = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = {**pod, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, name
            assert sc.get("runAsUser", 0) > 0, name
            if c["image"].startswith("ddpm-serve-"):
                assert sc["runAsUser"] == OUR_UID and sc["runAsGroup"] == OUR_UID, name
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp is an emptyDir"
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), name
            assert "memory" in res["limits"], name


def test_the_worker_runs_on_the_overlays_device() -> None:
    for overlay, device in (("cpu", "cpu"), ("gpu", "cuda")):
        docs = rendered(overlay)
        assert config(docs)["DDPM_DEVICE"] == device
        for d in workload(docs, "worker"):
            spec = d["spec"]["template"]["spec"]
            limits = spec["containers"][0]["resources"]["limits"]
            if device == "cuda":
                assert limits["nvidia.com/gpu"] == 1
                assert spec["nodeSelector"] and spec["tolerations"]
            else:
                assert "nvidia.com/gpu" not in limits and "nodeSelector" not in spec


def test_the_grace_period_covers_the_drain(docs) -> None:
    grace = float(config(docs).get("DDPM_GRACE_PERIOD", WorkerSettings().grace_period))
    for d in workload(docs, "worker"):
        period = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert period >= grace + GRACE_MARGIN, d["metadata"]["name"]


def test_redis_keeps_its_append_only_file_on_a_volume(docs) -> None:
    (sts,) = of_kind(docs, "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    data_dir = args[args.index("--dir") + 1]
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}[data_dir] in claims
    (svc,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"]
              == sts["spec"]["serviceName"]]
    assert svc["spec"]["clusterIP"] == "None"
    url = urlsplit(config(docs)["DDPM_REDIS_URL"])
    assert (url.hostname, url.port) == (svc["metadata"]["name"], svc["spec"]["ports"][0]["port"])


# -- the manifests against live processes ---------------------------------------------------

SECRETS = {"DDPM_API_KEYS": ""}     # the Secret a test deployment would hold: an open API
LOAD_FACTOR = 10    # GPU projection: CUDA's context and a bigger model over the CPU's figure


def container_env(docs: tuple[dict[str, Any], ...], c: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes gives container `c`: its ConfigMap, then its own env."""
    (cm,) = of_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        assert src["configMapRef"]["name"] == cm["metadata"]["name"]
        env.update(cm["data"])
    for e in c.get("env", []):
        source = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in source:
            env[e["name"]] = f"pod-{os.getpid()}"
        elif source["secretKeyRef"]["key"] in SECRETS:
            env[e["name"]] = SECRETS[source["secretKeyRef"]["key"]]
        else:
            assert source["secretKeyRef"].get("optional"), e
    return env


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


class Process:
    """A container's command as a local process (`ddpm ...` through this interpreter)."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        assert command[0] == "ddpm"
        self.log_path = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ddpm", *command[1:]],
                                         cwd=ROOT, env={**os.environ, **env}, stdout=out,
                                         stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_ok(url: str, wait_for: Callable[..., object], what: str) -> httpx.Response:
    def ok() -> httpx.Response | None:
        try:
            r = httpx.get(url, timeout=5)
        except httpx.HTTPError:
            return None
        return r if r.status_code == 200 else None
    return wait_for(ok, 90, what)     # type: ignore[return-value]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_the_work_signal_answer_on_live_processes(
        overlay: str, redis_url: str, tmp_path: Path, wait_for: Callable[..., object]) -> None:
    docs = rendered(overlay)
    (api_c,) = workload(docs, "api")[0]["spec"]["template"]["spec"]["containers"]
    worker_d = workload(docs, "worker")[0]
    (worker_c,) = worker_d["spec"]["template"]["spec"]["containers"]
    here = {"DDPM_REDIS_URL": redis_url, "DDPM_MODELS_DIR": str(ROOT / "checkpoints"),
            "DDPM_DEVICE": "cpu", "DDPM_LOG_LEVEL": "INFO"}
    # The port each process listens on, as the manifests configure it, and the test's.
    worker_env = container_env(docs, worker_c)
    api_port, metrics_port = free_port(), free_port()
    ports = {int(flag(api_c["command"], "--port")): api_port,
             int(worker_env["DDPM_METRICS_PORT"]): metrics_port}
    api_cmd = list(api_c["command"])
    api_cmd[api_cmd.index("--port") + 1] = str(api_port)
    api_cmd[api_cmd.index("--host") + 1] = "127.0.0.1"
    started = []
    try:
        t0 = time.monotonic()
        worker = Process(worker_c["command"], {**worker_env, **here,
                                               "DDPM_METRICS_PORT": str(metrics_port)},
                         tmp_path / "worker.log")
        started.append(worker)
        api = Process(api_cmd, {**container_env(docs, api_c), **here}, tmp_path / "api.log")
        started.append(api)
        wait_ok(f"http://127.0.0.1:{metrics_port}/readyz", wait_for, "the worker ready")
        start_to_ready = time.monotonic() - t0
        for c in (api_c, worker_c):
            named = {p["name"]: p["containerPort"] for p in c["ports"]}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = c[kind]["httpGet"]
                port = named.get(get["port"], get["port"])
                assert port in ports, f"{c['name']} {kind}: port {port} is not its server's"
                wait_ok(f"http://127.0.0.1:{ports[port]}{get['path']}", wait_for,
                        f"{c['name']} {kind} {get['path']}")
        model = yaml.safe_load(container_env(docs, worker_c)["DDPM_MODELS"])[0]
        services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
        for so in of_kind(docs, "ScaledObject"):
            assert so["spec"]["scaleTargetRef"]["name"] == worker_d["metadata"]["name"]
            for trigger in so["spec"]["triggers"]:
                assert trigger["type"] == "metrics-api"
                url = urlsplit(trigger["metadata"]["url"])
                svc = services[url.hostname]
                assert url.port == svc["spec"]["ports"][0]["port"]
                assert svc["spec"]["selector"] == workload(docs, "api")[0]["spec"][
                    "selector"]["matchLabels"]
                location = trigger["metadata"]["valueLocation"]
                assert location.split(".")[:2] == ["models", model]

                def resolved(path: str = url.path, location: str = location) -> Any:
                    value: Any = httpx.get(f"http://127.0.0.1:{api_port}{path}").json()
                    for part in location.split("."):
                        if not isinstance(value, dict) or part not in value:
                            return None
                        value = value[part]
                    return value if isinstance(value, int | float) else None
                wait_for(lambda f=resolved: f() is not None, 30, f"{location} in /v1/work")
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    except BaseException:
        for p in started:
            print(f"--- {p.log_path.name} ---\n{p.log_path.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        for p in started:
            p.stop()
    load = max(s.value for f in text_string_to_metric_families(metrics)
               if f.name == "ddpm_worker_model_load_seconds" for s in f.samples)
    check_covers_model_load(docs, max(load, start_to_ready))


def check_covers_model_load(docs: tuple[dict[str, Any], ...], measured: float) -> None:
    """The startup probe's window, KEDA's cooldown and the HPA's scale-down window all
    exceed what was measured here (the worker's ddpm_worker_model_load_seconds, and the
    process's start to its first /readyz 200, imports included), projected to a GPU by
    LOAD_FACTOR."""
    need = LOAD_FACTOR * measured
    for d in workload(docs, "worker"):
        probe = d["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        window = probe.get("initialDelaySeconds", 0) + \
            probe["periodSeconds"] * probe["failureThreshold"]
        assert window >= need, f"startup window {window}s < {need:.1f}s"
    for so in of_kind(docs, "ScaledObject"):
        assert so["spec"]["cooldownPeriod"] >= need
        behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= need
