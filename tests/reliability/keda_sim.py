"""A test fixture, not a product: KEDA's and the HPA's documented scaling rule applied to the
live work signal (`GET /v1/work`), with `ddpm worker` processes as the Deployment's pods.

What it implements, from the documentation (times are scaled down by one factor for a test):

- KEDA's `metrics-api` scaler (keda.sh/docs/2.15/scalers/metrics-api): `valueLocation` is a
  GJSON path into the JSON answer (dotted keys here); `targetValue` is the HPA's target for
  the value; the trigger is active when the value is above `activationTargetValue`
  (default 0). Its metric is an External metric of type AverageValue (the scaler's default
  `metricType`).
- The HPA's algorithm (kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale,
  "Algorithm details"; its replica calculator for External AverageValue metrics): desired =
  ceil(value / targetValue), unless value / (targetValue × current) is within the tolerance
  (0.1) of 1, when the current count stays; with several metrics the largest desired count
  wins; clamped to [max(minReplicaCount, 1), maxReplicaCount] (an HPA never goes to 0).
- The HPA's behaviour ("Stabilization window"; HPAScalingRules): each sync's recommendation
  is kept; a scale-down goes only to the highest recommendation within
  `scaleDown.stabilizationWindowSeconds` (default 300 s), a scale-up to the lowest within
  `scaleUp.stabilizationWindowSeconds` (default 0: at once). Then the rate policies
  (`policies`: Pods or Percent per `periodSeconds`, `selectPolicy` Max by default, i.e. the
  one allowing the larger change): the count moves at most that far from what it was at
  the start of each policy's period (the replica changes of the period are remembered);
  defaults when a direction sets none: up +100 % or +4 pods per 15 s, down −100 % per 15 s.
- KEDA's activation phase (keda.sh/docs/2.15/concepts/scaling-deployments, "Activating and
  Scaling thresholds"; ScaledObject spec `pollingInterval`, `cooldownPeriod`,
  `minReplicaCount`): KEDA alone moves 0 → 1 (when some trigger is active) and 1 → 0 (with
  `minReplicaCount: 0`, once no trigger has been active for `cooldownPeriod`); between 1 and
  N the HPA decides. One tick every `pollingInterval` stands for both KEDA's poll and the
  HPA's sync.
- Pods: the Deployment's replica count is what the rule sets (terminating pods do not
  count); a scale-down stops the newest pod first (a ReplicaSet deletes the youngest of
  equally ready pods) with SIGTERM, which drains it in one step (worker/drain.py).
"""

from __future__ import annotations

import math
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import yaml

# -- the parameters -----------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """One `metrics-api` trigger (metricType AverageValue)."""

    value_location: str             # GJSON path, e.g. models.tiny.seconds_of_work
    target: float                   # targetValue: desired = ceil(value / target)
    activation: float = 0.0         # activationTargetValue: active when value > this

    @property
    def in_seconds(self) -> bool:
        """Whether the value is a time (then a time scale applies to its target too)."""
        return self.value_location.rsplit(".", 1)[-1] == "seconds_of_work"


@dataclass(frozen=True)
class Policy:
    """One HPA scaling policy: at most `value` pods (or percent) per `period` seconds."""

    kind: str                       # "Pods" or "Percent"
    value: int
    period: float


UP_DEFAULT = (Policy("Percent", 100, 15.0), Policy("Pods", 4, 15.0))
DOWN_DEFAULT = (Policy("Percent", 100, 15.0),)


@dataclass(frozen=True)
class ScalingParams:
    """A ScaledObject's scaling fields (its defaults where the object leaves one out)."""

    triggers: tuple[Trigger, ...]
    min_replicas: int = 0               # minReplicaCount (KEDA's default 0)
    max_replicas: int = 100             # maxReplicaCount
    polling_interval: float = 30.0      # pollingInterval, s (also the HPA's sync here)
    cooldown_period: float = 300.0      # cooldownPeriod, s: last active → 0 (min 0 only)
    scale_down_window: float = 300.0    # behavior.scaleDown.stabilizationWindowSeconds
    scale_up_window: float = 0.0        # behavior.scaleUp.stabilizationWindowSeconds
    up_policies: tuple[Policy, ...] = UP_DEFAULT        # behavior.scaleUp.policies
    down_policies: tuple[Policy, ...] = DOWN_DEFAULT    # behavior.scaleDown.policies
    up_select: str = "Max"                              # behavior.scaleUp.selectPolicy
    down_select: str = "Max"                            # behavior.scaleDown.selectPolicy
    tolerance: float = 0.1              # the HPA controller's tolerance

    def scaled(self, factor: float) -> ScalingParams:
        """Every time, and every target that is a time, multiplied by `factor`."""
        triggers = tuple(replace(t, target=t.target * factor) if t.in_seconds else t
                         for t in self.triggers)
        return replace(self, triggers=triggers,
                       polling_interval=self.polling_interval * factor,
                       cooldown_period=self.cooldown_period * factor,
                       scale_down_window=self.scale_down_window * factor,
                       scale_up_window=self.scale_up_window * factor,
                       up_policies=tuple(replace(q, period=q.period * factor)
                                         for q in self.up_policies),
                       down_policies=tuple(replace(q, period=q.period * factor)
                                           for q in self.down_policies))

    def for_models(self, models: Iterable[str]) -> ScalingParams:
        """The triggers of `models.<m>.…` repeated for each of `models` (one pool serving
        them all: the HPA then takes the largest desired count over every model's)."""
        out = []
        for t in self.triggers:
            head, _, rest = t.value_location.partition(".")
            assert head == "models" and "." in rest, t.value_location
            field_name = rest.split(".", 1)[1]
            out += [replace(t, value_location=f"models.{m}.{field_name}") for m in models]
        return replace(self, triggers=tuple(dict.fromkeys(out)))

    @classmethod
    def from_scaled_object(cls, doc: dict[str, Any]) -> ScalingParams:
        """Read a rendered KEDA ScaledObject (its `metrics-api` triggers; others refused)."""
        spec = doc["spec"]
        triggers = []
        for t in spec["triggers"]:
            assert t["type"] == "metrics-api", f"the simulation knows metrics-api only: {t}"
            assert t.get("metricType", "AverageValue") == "AverageValue", t
            meta = t["metadata"]
            assert meta.get("format", "json") == "json", meta
            triggers.append(Trigger(meta["valueLocation"], float(meta["targetValue"]),
                                    float(meta.get("activationTargetValue", 0))))
        behavior = (spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
                    .get("behavior", {}))
        down, up = behavior.get("scaleDown", {}), behavior.get("scaleUp", {})

        def policies(rules: dict[str, Any], default: tuple[Policy, ...]) -> tuple[Policy, ...]:
            given = rules.get("policies")
            if not given:
                return default
            return tuple(Policy(q["type"], int(q["value"]), float(q["periodSeconds"]))
                         for q in given)

        return cls(triggers=tuple(triggers), min_replicas=int(spec.get("minReplicaCount", 0)),
                   max_replicas=int(spec.get("maxReplicaCount", 100)),
                   polling_interval=float(spec.get("pollingInterval", 30)),
                   cooldown_period=float(spec.get("cooldownPeriod", 300)),
                   scale_down_window=float(down.get("stabilizationWindowSeconds", 300)),
                   scale_up_window=float(up.get("stabilizationWindowSeconds", 0)),
                   up_policies=policies(up, UP_DEFAULT),
                   down_policies=policies(down, DOWN_DEFAULT),
                   up_select=up.get("selectPolicy", "Max"),
                   down_select=down.get("selectPolicy", "Max"))


def render_scaled_objects(overlay: Path) -> list[dict[str, Any]]:
    """The ScaledObjects `kubectl kustomize <overlay>` renders (CalledProcessError if it
    does not render, FileNotFoundError without kubectl)."""
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d and d.get("kind") == "ScaledObject"]


def value_at(doc: Any, path: str) -> float | None:
    """The number at a dotted GJSON path (`a.b.0.c`), None where there is none."""
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return float(doc) if isinstance(doc, int | float) and not isinstance(doc, bool) else None


# -- the rule -----------------------------------------------------------------------------


@dataclass
class Rule:
    """KEDA's activation and the HPA's replica count, one decision per tick."""

    params: ScalingParams
    last_active: float | None = None
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    changes: list[tuple[float, int]] = field(default_factory=list)   # (when, +/- pods)

    def active(self, values: list[float | None]) -> bool:
        return any(v is not None and v > t.activation
                   for t, v in zip(self.params.triggers, values, strict=True))

    def desired(self, values: list[float | None], current: int) -> int | None:
        """The HPA's count from the metrics alone (None: no metric could be read)."""
        counts = []
        for t, v in zip(self.params.triggers, values, strict=True):
            if v is None:
                continue
            n = current
            if abs(1.0 - v / (t.target * current)) > self.params.tolerance:
                n = math.ceil(v / t.target)
            counts.append(n)
        return max(counts) if counts else None

    def decide(self, now: float, values: list[float | None], current: int) -> int:
        """The replica count to set, given the trigger values and the current count."""
        p = self.params
        if self.last_active is None:
            self.last_active = now          # a new ScaledObject waits a cooldown first
        if self.active(values):
            self.last_active = now
        if current == 0:                    # KEDA: 0 → 1 on activation, else stay
            if self.active(values) or p.min_replicas > 0:
                return max(p.min_replicas, 1)
            return 0
        if p.min_replicas == 0 and now - self.last_active >= p.cooldown_period:
            self.recommendations.clear()    # KEDA: 1 → 0 after the cooldown
            return 0
        raw = self.desired(values, current)
        if raw is None:                     # metrics unavailable: the HPA holds
            return current
        self.recommendations = [(t, n) for t, n in self.recommendations
                                if now - t < max(p.scale_down_window, p.scale_up_window)]
        up = min([n for t, n in self.recommendations if now - t < p.scale_up_window] + [raw])
        down = max([n for t, n in self.recommendations if now - t < p.scale_down_window]
                   + [raw])
        self.recommendations.append((now, raw))
        n = self.rate_limited(now, min(max(current, up), down), current)
        n = min(max(n, p.min_replicas, 1), p.max_replicas)
        if n != current:
            self.changes.append((now, n - current))
        return n

    def rate_limited(self, now: float, n: int, current: int) -> int:
        """`n` held to the behaviour's policies, each counted from its period's start (the
        HPA's scale-up/down limits: the changes of the period are remembered)."""
        p = self.params
        if n == current:
            return n
        up = n > current
        policies, select = (p.up_policies, p.up_select) if up else \
            (p.down_policies, p.down_select)
        if select == "Disabled":
            return current
        limits = []
        for q in policies:
            moved = sum(d for t, d in self.changes if now - t < q.period and (d > 0) == up)
            start = current - moved             # the count when the period began
            if q.kind == "Pods":
                limits.append(start + q.value if up else start - q.value)
            elif up:
                limits.append(math.ceil(start * (1 + q.value / 100)))
            else:
                limits.append(int(start * (1 - q.value / 100)))
        # Max: the policy allowing the larger change; Min: the smaller.
        if up:
            limit = max(limits) if select == "Max" else min(limits)
            return min(n, max(limit, current))
        limit = min(limits) if select == "Max" else max(limits)
        return max(n, min(limit, current))


# -- the pods -----------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    proc: Any                           # tests/conftest.py WorkerProcess
    started: float
    stopping: float | None = None       # when SIGTERM was sent
    exit_code: int | None = None


@dataclass
class Pool:
    """The worker Deployment: `spawn(name)` starts a pod; scale-down SIGTERMs the newest."""

    spawn: Callable[[str], Any]
    clock: Callable[[], float] = time.monotonic
    pods: list[Pod] = field(default_factory=list)           # counted replicas, oldest first
    terminating: list[Pod] = field(default_factory=list)
    ended: list[Pod] = field(default_factory=list)

    def scale_to(self, n: int) -> None:
        while len(self.pods) < n:
            k = len(self.pods) + len(self.terminating) + len(self.ended)
            name = f"pod-{k}"
            self.pods.append(Pod(name, self.spawn(name), self.clock()))
        while len(self.pods) > n:
            pod = self.pods.pop()
            pod.stopping = self.clock()
            pod.proc.signal(signal.SIGTERM)
            self.terminating.append(pod)

    def reap(self) -> None:
        for pod in list(self.terminating):
            rc = pod.proc.proc.poll()
            if rc is not None:
                pod.exit_code = rc
                self.terminating.remove(pod)
                self.ended.append(pod)

    def stop_all(self, timeout: float) -> None:
        """SIGTERM every pod and wait for all to exit (subprocess.TimeoutExpired if not)."""
        self.scale_to(0)
        for pod in list(self.terminating):
            pod.exit_code = pod.proc.wait(timeout)
        self.reap()

    def all_pods(self) -> list[Pod]:
        return self.pods + self.terminating + self.ended


# -- the loop -----------------------------------------------------------------------------


@dataclass
class Sample:
    t: float                            # seconds since the autoscaler started
    replicas: int                       # the count set this tick
    terminating: int                    # pods draining (not counted)
    values: list[float | None]          # each trigger's value, in params.triggers' order
    models: dict[str, Any]              # the signal's per-model answer


class Autoscaler:
    """Polls `url` every `params.polling_interval` seconds on its own thread, applies the
    rule and scales the pool; `samples` is the record, `errors` what went wrong inside."""

    def __init__(self, params: ScalingParams, url: str, pool: Pool) -> None:
        self.params = params
        self.url = url
        self.pool = pool
        self.rule = Rule(params)
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self.t0 = pool.clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keda-sim", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> Autoscaler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the autoscaler thread did not stop"

    def replicas(self) -> int:
        with self._lock:
            return len(self.pool.pods)

    def tick(self, client: httpx.Client) -> None:
        now = self.pool.clock()
        try:
            doc = client.get(self.url).raise_for_status().json()
        except (httpx.HTTPError, ValueError) as e:
            self.errors.append(f"{now - self.t0:.1f}s: {e!r}")
            doc = {}
        values = [value_at(doc, t.value_location) for t in self.params.triggers]
        with self._lock:
            self.pool.reap()
            n = self.rule.decide(now, values, len(self.pool.pods))
            self.pool.scale_to(n)
            self.samples.append(Sample(round(now - self.t0, 3), n, len(self.pool.terminating),
                                       values, doc.get("models", {})))

    def _run(self) -> None:
        k = 0
        with httpx.Client(timeout=max(1.0, self.params.polling_interval)) as client:
            while not self._stop.is_set():
                try:
                    self.tick(client)
                except Exception as e:      # kept: the test fails on any
                    self.errors.append(f"tick failed: {e!r}")
                k += 1
                self._stop.wait(max(0.0, self.t0 + k * self.params.polling_interval
                                    - self.pool.clock()))
