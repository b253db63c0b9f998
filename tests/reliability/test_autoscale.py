"""Autoscaling proven by simulation (issue 27): KEDA's documented rule (keda_sim.py) reads
the live work signal (`GET /v1/work` on a real `ddpm api`) and starts and SIGTERMs real
`ddpm worker` processes, under a bursty load of mixed jobs posted to the API (every
sampler, DDIM with η, guidance; a burst, a pause, another burst, then idle).

What must hold: every job finished exactly once with the pixels of an uninterrupted run
(test_resume_chaos.check_all), work redone ≤ 1.02 (image-steps computed by all workers, from
each one's "worker stopped after N image-steps", / image-steps the jobs needed: a pod
stopped mid-job drains it in one step and another resumes it), the pool scaled above its
minimum during each burst, and back to the minimum after the load. No clock assertions:
times only bound the waits.

The scaling parameters are the rendered ScaledObject's (`kubectl kustomize
deploy/overlays/cpu`) when deploy/ renders, else the signal's documented defaults; every
time (and the seconds-of-work target) is scaled by one factor. Replicas over time and the
signal are recorded (`record`, DDPM_RELIABILITY_LOG) and written as JSON when
DDPM_AUTOSCALE_JSON names a file (docs/make_autoscale.py draws docs/autoscale.svg from it):

    DDPM_AUTOSCALE_JSON=autoscale.json python -m pytest -q -s -m slow \\
        tests/reliability/test_autoscale.py -k slow
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from keda_sim import (
    DOWN_DEFAULT,
    UP_DEFAULT,
    Autoscaler,
    Policy,
    Pool,
    Rule,
    ScalingParams,
    Trigger,
    render_scaled_objects,
)
from test_resume_chaos import STOPPED, check_all, mixed_specs
from test_worker_chaos import events

from contract.events import EventType
from contract.spec import GenerationSpec

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "overlays" / "cpu"
MODELS = ("tiny", "tinycond")
# The signal's documented triggers (README, "Deployment"): 30 worker-seconds of
# work per worker, and one worker whenever any work exists.
DOCUMENTED = ScalingParams(
    triggers=(Trigger("models.tiny.seconds_of_work", 30.0),
              Trigger("models.tiny.remaining_image_steps", 1e9, activation=0.0)),
    min_replicas=1, max_replicas=4, polling_interval=15.0, cooldown_period=300.0,
    scale_down_window=300.0)
# Pods: one torch thread each (up to four share the box's cores), progress every 0.2 s.
POD_ENV = {"OMP_NUM_THREADS": "1", "DDPM_PROGRESS_INTERVAL": "0.2", "DDPM_GRACE_PERIOD": "60"}


def deployed_params() -> tuple[ScalingParams, str]:
    """The worker ScaledObject's parameters and where they came from."""
    if not OVERLAY.is_dir():
        return DOCUMENTED, "documented defaults (no deploy/overlays/cpu)"
    try:
        objects = render_scaled_objects(OVERLAY)
    except (OSError, subprocess.SubprocessError) as e:
        return DOCUMENTED, f"documented defaults ({OVERLAY} does not render: {e})"
    if not objects:
        return DOCUMENTED, "documented defaults (no ScaledObject rendered)"
    return ScalingParams.from_scaled_object(objects[0]), \
        f"{objects[0]['metadata']['name']} in kubectl kustomize deploy/overlays/cpu"


# -- the rule, without processes ----------------------------------------------------------

TWO = ScalingParams(triggers=(Trigger("m.seconds_of_work", 10.0),
                              Trigger("m.remaining_image_steps", 1e9)),
                    min_replicas=1, max_replicas=4, polling_interval=1.0,
                    cooldown_period=5.0, scale_down_window=3.0)


def test_the_rule_scales_up_at_once_and_down_only_after_the_window() -> None:
    rule = Rule(TWO)
    assert rule.decide(0.0, [None, None], 0) == 1, "minReplicaCount ≥ 1: one pod at once"
    assert rule.decide(1.0, [35.0, 3500.0], 1) == 4, "ceil(35/10), at once"
    assert rule.decide(2.0, [99.0, 9900.0], 4) == 4, "clamped to maxReplicaCount"
    # The work falls: the highest recommendation of the last 3 s holds the count.
    assert rule.decide(3.0, [12.0, 1200.0], 4) == 4
    assert rule.decide(4.0, [12.0, 1200.0], 4) == 4
    assert rule.decide(5.0, [0.0, 0.0], 4) == 2, "the 99 left the window: ceil(12/10)"
    assert rule.decide(6.0, [0.0, 0.0], 2) == 2
    assert rule.decide(7.0, [0.0, 0.0], 2) == 1, "back to the minimum, never below"
    assert rule.decide(30.0, [0.0, 0.0], 1) == 1, "minReplicaCount 1: no scale to zero"


def test_the_rule_keeps_the_count_within_the_tolerance_and_takes_the_largest_trigger() -> None:
    rule = Rule(TWO)
    assert rule.decide(0.0, [21.0, 10.0], 2) == 2, "21/(10×2) is within 0.1 of 1"
    assert rule.decide(1.0, [23.0, 10.0], 2) == 3
    assert rule.decide(2.0, [0.0, 1.0], 3) == 3, "activation trigger: 1 pod, window holds"
    # The seconds trigger unreadable (no rate yet): the other still counts.
    assert Rule(TWO).decide(0.0, [None, 5.0], 2) == 1
    assert Rule(TWO).decide(0.0, [None, None], 2) == 2, "no metric: the HPA holds"


def test_the_behaviour_policies_limit_the_rate_of_change_per_period() -> None:
    """scaleDown 1 pod per 60 s (the window 0); the default scale-up: +100 % or +4 pods per
    15 s, whichever allows more (selectPolicy Max)."""
    p = replace(TWO, max_replicas=10, scale_down_window=0.0,
                down_policies=(Policy("Pods", 1, 60.0),))
    rule = Rule(p)
    assert rule.decide(0.0, [100.0, 1.0], 1) == 5, "1 + max(100 %, 4 pods)"
    assert rule.decide(5.0, [100.0, 1.0], 5) == 5, "this period's 4 pods are spent"
    assert rule.decide(15.0, [100.0, 1.0], 5) == 10
    assert rule.decide(16.0, [0.0, 1.0], 10) == 9, "one pod down"
    assert rule.decide(40.0, [0.0, 1.0], 9) == 9, "no second pod within 60 s"
    assert rule.decide(76.0, [0.0, 1.0], 9) == 8
    percent = Rule(replace(p, down_policies=(Policy("Percent", 50, 60.0),)))
    assert percent.decide(0.0, [0.0, 1.0], 9) == 4, "int(9 × 0.5)"
    assert percent.decide(1.0, [0.0, 1.0], 4) == 4, "counted from the period's 9"
    disabled = Rule(replace(p, down_select="Disabled"))
    assert disabled.decide(0.0, [0.0, 1.0], 6) == 6


def test_scale_to_zero_waits_for_the_cooldown_and_activation_wakes_it() -> None:
    zero = ScalingParams(triggers=TWO.triggers, min_replicas=0, max_replicas=3,
                         polling_interval=1.0, cooldown_period=5.0, scale_down_window=2.0)
    rule = Rule(zero)
    assert rule.decide(0.0, [0.0, 0.0], 0) == 0, "nothing active: stays at zero"
    assert rule.decide(1.0, [0.0, 1.0], 0) == 1, "activation (1 > 0): 0 → 1"
    assert rule.decide(2.0, [25.0, 500.0], 1) == 3
    assert rule.decide(3.0, [0.0, 0.0], 3) == 3
    assert rule.decide(5.0, [0.0, 0.0], 3) == 1, "the HPA's floor is 1"
    assert rule.decide(6.9, [0.0, 0.0], 1) == 1, "within the cooldown of the last activity"
    assert rule.decide(7.0, [0.0, 0.0], 1) == 0, "5 s without activity: 1 → 0"


class _Proc:
    """What the pool uses of a worker process (tests/conftest.py WorkerProcess)."""

    def __init__(self) -> None:
        self.proc = self
        self.signals: list[int] = []

    def signal(self, sig: int) -> None:
        self.signals.append(sig)

    def poll(self) -> int | None:
        return 0 if self.signals else None


def test_the_pool_stops_the_newest_pods_first_with_sigterm() -> None:
    pool = Pool(lambda name: _Proc())
    pool.scale_to(3)
    pool.scale_to(1)
    assert [p.name for p in pool.pods] == ["pod-0"]
    assert [p.name for p in pool.terminating] == ["pod-2", "pod-1"]
    assert all(p.proc.signals == [signal.SIGTERM] for p in pool.terminating)
    assert pool.pods[0].proc.signals == []
    pool.scale_to(2)
    assert [p.name for p in pool.pods] == ["pod-0", "pod-3"], "a new pod, a new name"
    pool.reap()
    assert [p.exit_code for p in pool.ended] == [0, 0] and not pool.terminating


def test_a_scaled_object_document_becomes_the_parameters_with_keda_defaults() -> None:
    """KEDA's ScaledObject fields as its spec names them; left-out ones take its defaults
    (min 0, polling 30 s, cooldown 300 s, the HPA's 300 s scale-down window)."""
    url = "http://ddpm-api:8000/v1/work"
    doc = {"kind": "ScaledObject", "metadata": {"name": "w"}, "spec": {
        "maxReplicaCount": 6,
        "triggers": [
            {"type": "metrics-api", "metadata": {
                "url": url, "valueLocation": "models.mnist.seconds_of_work",
                "targetValue": "30"}},
            {"type": "metrics-api", "metadata": {
                "url": url, "valueLocation": "models.mnist.remaining_image_steps",
                "targetValue": "1000000000", "activationTargetValue": "0"}}]}}
    p = ScalingParams.from_scaled_object(doc)
    assert (p.min_replicas, p.max_replicas, p.polling_interval, p.cooldown_period,
            p.scale_down_window, p.scale_up_window) == (0, 6, 30.0, 300.0, 300.0, 0.0)
    assert (p.up_policies, p.down_policies) == (UP_DEFAULT, DOWN_DEFAULT)
    doc["spec"] |= {"minReplicaCount": 1, "pollingInterval": 15, "cooldownPeriod": 600,
                    "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                        "scaleDown": {"stabilizationWindowSeconds": 120, "policies": [
                            {"type": "Pods", "value": 1, "periodSeconds": 60}]}}}}}
    p = ScalingParams.from_scaled_object(doc).scaled(0.5)
    assert (p.min_replicas, p.polling_interval, p.cooldown_period, p.scale_down_window) == \
        (1, 7.5, 300.0, 60.0)
    assert p.down_policies == (Policy("Pods", 1, 30.0),)
    assert p.up_policies == tuple(replace(q, period=7.5) for q in UP_DEFAULT)
    assert p.triggers == (Trigger("models.mnist.seconds_of_work", 15.0),
                          Trigger("models.mnist.remaining_image_steps", 1e9, 0.0))
    both = p.for_models(("a", "b"))
    assert [t.value_location for t in both.triggers] == [
        "models.a.seconds_of_work", "models.b.seconds_of_work",
        "models.a.remaining_image_steps", "models.b.remaining_image_steps"]
    doc["spec"]["triggers"][0]["type"] = "redis"
    with pytest.raises(AssertionError, match="metrics-api only"):
        ScalingParams.from_scaled_object(doc)


def test_the_harness_reads_the_rendered_scaled_object() -> None:
    """Triggers, targets, activation, min, max, polling, cooldown and the scale-down window
    come from `kubectl kustomize deploy/overlays/cpu`, times scaled by one factor."""
    if not OVERLAY.is_dir():
        pytest.skip("deploy/overlays/cpu does not exist yet (issue 27's manifests)")
    objects = render_scaled_objects(OVERLAY)
    assert objects, "the cpu overlay renders no ScaledObject"
    doc = objects[0]
    spec = doc["spec"]
    params = ScalingParams.from_scaled_object(doc)
    factor = 0.1
    scaled = params.scaled(factor)
    assert (params.min_replicas, params.max_replicas) == \
        (spec.get("minReplicaCount", 0), spec["maxReplicaCount"])
    assert scaled.polling_interval == pytest.approx(spec.get("pollingInterval", 30) * factor)
    assert scaled.cooldown_period == pytest.approx(spec.get("cooldownPeriod", 300) * factor)
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}) \
        .get("behavior", {})
    window = behavior.get("scaleDown", {}).get("stabilizationWindowSeconds", 300)
    assert scaled.scale_down_window == pytest.approx(window * factor)
    for direction, got in (("scaleDown", scaled.down_policies), ("scaleUp", scaled.up_policies)):
        given = behavior.get(direction, {}).get("policies")
        if given:
            assert [(q.kind, q.value, q.period) for q in got] == \
                [(g["type"], g["value"], pytest.approx(g["periodSeconds"] * factor))
                 for g in given]
    assert len(params.triggers) == len(spec["triggers"]) >= 2
    by_field = {t.value_location.rsplit(".", 1)[-1]: t for t in scaled.triggers}
    for raw in spec["triggers"]:
        meta = raw["metadata"]
        assert meta["url"].endswith("/v1/work"), meta
        got = by_field[meta["valueLocation"].rsplit(".", 1)[-1]]
        target = float(meta["targetValue"])
        assert got.target == pytest.approx(target * factor if got.in_seconds else target)
        assert got.activation == float(meta.get("activationTargetValue", 0))
    assert set(by_field) == {"seconds_of_work", "remaining_image_steps"}, by_field
    assert by_field["remaining_image_steps"].activation == 0


# -- the simulation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    factor: float                   # every time of the ScaledObject × this
    min_replicas: int
    max_replicas: int
    batch: int                      # each pod's --max-batch
    bursts: tuple[int, ...]         # jobs per burst (1-2 images, mixed)
    steps: tuple[int, int]          # their step range
    long: int                       # and this many 1-image jobs of `long_steps` each
    long_steps: tuple[int, int]
    pauses: tuple[float, ...]       # s from a burst's last job done to the next burst
    window: float | None            # s: the scale-down window instead of the deployed one
    timeout: float                  # bound of each wait


VARIANTS = [
    # CI: the harshest scale-down (window 0: every drop of the signal stops pods at once) and
    # 4-slot pods, so that the long jobs, posted last, mostly run on the newer pods and are
    # still running when those are stopped; two scale-ups.
    pytest.param(Variant(1 / 30, 1, 3, 4, (10, 10), (30, 80), 2, (350, 450), (2.0,), 0.0,
                         120.0), id="ci"),
    # The deployed parameters as they are (times / 10), up to 4 pods; three bursts, the
    # second within the scale-down window of the first, the third after the pool is back
    # at its minimum.
    pytest.param(Variant(1 / 10, 1, 4, 8, (24, 12, 30), (50, 300), 3, (900, 1000),
                         (15.0, 75.0), None, 600.0), id="slow", marks=pytest.mark.slow),
]


def post(client: httpx.Client, spec: GenerationSpec) -> str:
    resp = client.post("/v1/generations", json=spec.model_dump(mode="json", exclude_unset=True))
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def worker_steps(pod: Any, started_by: set[str]) -> int:
    """Image-steps a stopped pod computed: its own log line; a pod stopped while it loaded
    its models (before its loop) computed none, ran no job and was ended by the SIGTERM."""
    found = STOPPED.findall(pod.proc.log())
    if found:
        assert pod.exit_code == 0, (pod.name, pod.exit_code, pod.proc.log()[-2000:])
        return int(found[-1])
    assert pod.exit_code == -signal.SIGTERM and pod.name not in started_by, \
        (pod.name, pod.exit_code, pod.proc.log()[-2000:])
    return 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_autoscaling_on_the_work_signal_loses_nothing_and_returns_to_the_minimum(
        variant: Variant, r: Any, start_api: Callable[..., Any],
        spawn_worker: Callable[..., Any], wait_for: Callable[..., Any], models_dir: Path,
        record: Callable[..., None]) -> None:
    base, source = deployed_params()
    params = replace(base.for_models(MODELS).scaled(variant.factor),
                     min_replicas=variant.min_replicas, max_replicas=variant.max_replicas)
    if variant.window is not None:
        params = replace(params, scale_down_window=variant.window)
    api = start_api(env={"DDPM_RATE_LIMIT": "0"})
    pool = Pool(lambda name: spawn_worker("--max-batch", str(variant.batch), "--name", name,
                                          env=POD_ENV))
    sim = Autoscaler(params, f"{api.url}/v1/work", pool).start()
    marks: list[dict[str, Any]] = []
    jobs: dict[str, GenerationSpec] = {}

    def mark(what: str) -> float:
        t = round(pool.clock() - sim.t0, 3)
        marks.append({"t": t, "what": what})
        return t

    def finished(ids: list[str]) -> bool:
        return all(r.hget(f"rq:job:{j}", "status") == b"finished" for j in ids)

    try:
        with httpx.Client(base_url=api.url, timeout=30) as client:
            # The API takes jobs for models a live worker serves: wait for the first pod.
            wait_for(lambda: {m["name"] for m in client.get("/v1/models").json()["models"]}
                     >= set(MODELS), variant.timeout, "the first pod's models served")
            # A warm-up job: the fleet has measured its rate before the first burst.
            warm = post(client, GenerationSpec(model="tiny", steps=10, seed=1))
            jobs[warm] = GenerationSpec(model="tiny", steps=10, seed=1)
            wait_for(lambda: finished([warm]), variant.timeout, "the warm-up job")
            windows = []
            for k, n in enumerate(variant.bursts):
                if k:
                    time.sleep(variant.pauses[k - 1])
                specs = mixed_specs(n, variant.steps, seed=100 + k) + [
                    s.model_copy(update={"num_images": 1})
                    for s in mixed_specs(variant.long, variant.long_steps, seed=200 + k)]
                t_burst = mark(f"burst {k + 1}: {len(specs)} jobs")
                ids = [post(client, s) for s in specs]
                jobs |= dict(zip(ids, specs, strict=True))
                wait_for(lambda ids=ids: finished(ids), variant.timeout,
                         f"burst {k + 1} finished")
                windows.append((t_burst, mark(f"burst {k + 1} done")))
        wait_for(lambda: sim.replicas() == params.min_replicas and not pool.terminating,
                 variant.timeout, "the pool back at its minimum")
        t_min = mark("back at the minimum")
    finally:
        sim.stop()
    pool.stop_all(120)

    started_by = {e.data.get("worker") for j in jobs for e in events(r, j)
                  if e.type == EventType.STARTED}
    computed = sum(worker_steps(p, started_by) for p in pool.all_pods())
    needed = sum(s.total_steps for s in jobs.values())
    drained = sum(e.type == EventType.REQUEUED for j in jobs for e in events(r, j))
    verdict = check_all(r, models_dir, jobs)
    peaks = [max(s.replicas for s in sim.samples if a <= s.t <= b) for a, b in windows]
    figures = {
        "variant": asdict(variant), "params_source": source, "jobs": len(jobs),
        "succeeded": verdict.succeeded, "lost": len(jobs) - verdict.succeeded,
        "duplicated": verdict.duplicated, "work_redone": round(computed / needed, 4),
        "image_steps_needed": needed, "image_steps_computed": computed,
        "pods_started": len(pool.all_pods()), "jobs_drained": drained,
        "max_replicas": max(s.replicas for s in sim.samples), "burst_peaks": peaks,
        "back_to_min_s": round(t_min - windows[-1][1], 1), "ticks": len(sim.samples)}
    record(**figures)
    path = os.environ.get("DDPM_AUTOSCALE_JSON")
    if path:
        Path(path).write_text(json.dumps({
            "params": asdict(params), "figures": figures, "marks": marks,
            "samples": [asdict(s) for s in sim.samples]}, indent=1))
    assert not sim.errors, sim.errors[:10]
    assert computed / needed <= 1.02, (computed, needed)
    assert all(p > params.min_replicas for p in peaks), f"no scale-up in a burst: {peaks}"
