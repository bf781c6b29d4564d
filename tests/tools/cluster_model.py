# /// script
# requires-python = ">=3.11"
# dependencies = ["pyyaml==6.0.4", "matplotlib==3.11.2"]
# ///
"""The cluster kit as a model: where the scheduler can put the pods, and what the HPA does.

    uv run tests/tools/cluster_model.py    # prints README.md's capacity table

No cluster is reachable from here, so the claims the README makes about EKS are computed: EKS's
node-allocatable formula and the system pods' requests for the scheduler, the HPA controller's
algorithm (kubernetes/kubernetes pkg/controller/podautoscaler) for the autoscaler, on CPU
(hpa.yaml) or on requests in flight (keda-scaledobject.yaml). Its inputs are the manifests in the
repository, service.py's DELAY_SECONDS default, and what the running service was measured to cost
(tests/tools/measured.json), so the numbers follow when any of them changes. tests/tools/figures.py
writes its figures and charts into the docs.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[2]
MEASURED = Path(__file__).resolve().parent / "measured.json"

# The swarm the README's demo uses: it must visibly scale out, and come back to 1 pod after.
DEMO_USERS = 1_000
TABLE_USERS = (50, 100, 500, 1_000, 5_000)


# --- Inputs -----------------------------------------------------------------------------------


def manifest(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def app_container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def cpu_millicores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) if text.endswith("m") else float(text) * 1000


def memory_mib(quantity: str | int) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    text = str(quantity)
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text) / 2**20  # plain bytes


def service_default(name: str) -> float:
    """A Settings default from service.py, read without importing it (no FastAPI needed here)."""
    tree = ast.parse((ROOT / "service.py").read_text())
    settings = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    for node in settings.body:
        if isinstance(node, ast.AnnAssign) and node.target.id == name:
            value = node.value
            if isinstance(value, ast.Call):  # Field(5.0, ...)
                value = value.args[0]
            return float(ast.literal_eval(value))
    raise KeyError(name)


@dataclass(frozen=True)
class Measured:
    """What one pod costs, from tests/tools/measured.json.

    CPU is the container's, as the kubelet counts it and the HPA reads it, under the project's
    locustfile at a pod's share of a demo swarm ("demo_rate", tests/tools/demo_rate_benchmark.py): a
    request there wakes the event loop almost on its own, and costs several times what it does
    at saturation ("service"'s cpu_us_per_request, tests/tools/benchmark.py's comparison against the
    floor, which the model does not use). Memory is the service process's ("service").
    """

    idle_cpu_m: float  # millicores with no traffic at all
    # (requests/s, millicores above idle) measured points, ascending; linear between them and
    # beyond the last along the last segment.
    cpu_curve: tuple[tuple[float, float], ...]
    idle_rss_mib: float
    rss_mib_per_in_flight: float  # grows with requests in flight; CPython keeps it afterwards

    @classmethod
    def load(cls, path: Path = MEASURED) -> Measured:
        measured = json.loads(path.read_text())
        s, d = measured["service"], measured["demo_rate"]
        idle = d["idle_cpu_millicores"]
        points = sorted((p["requests_per_s"], p["cpu_millicores"] - idle) for p in d["points"])
        return cls(
            idle_cpu_m=idle,
            cpu_curve=((0.0, 0.0), *points),
            idle_rss_mib=s["idle_rss_mib"],
            rss_mib_per_in_flight=(s["peak_rss_mib_10000"] - s["idle_rss_mib"]) / 10_000,
        )

    def load_cpu_m(self, requests_per_s: float) -> float:
        """Millicores above idle at this request rate (piecewise linear through the points)."""
        (r0, c0), (r1, c1) = self.cpu_curve[-2:]
        for lo, hi in itertools.pairwise(self.cpu_curve):
            if requests_per_s <= hi[0]:
                (r0, c0), (r1, c1) = lo, hi
                break
        return c0 + (requests_per_s - r0) * (c1 - c0) / (r1 - r0)

    def scaled(self, factor: float) -> Measured:
        """The same service with every request costing `factor` times as much CPU."""
        return replace(self, cpu_curve=tuple((r, c * factor) for r, c in self.cpu_curve))


# --- The locust swarm -------------------------------------------------------------------------

# locustfile.py: each user runs one task, then waits between(1, 2) s; POST / has weight 10 and
# GET /healthz (answered at once) weight 1. test_cluster.py checks these against the locustfile.
THINK_S = 1.5
TASK_WEIGHTS = {"POST /": 10, "GET /healthz": 1}
# Client -> ELB -> pod and back, on top of DELAY_SECONDS. A longer trip lowers the rate.
ROUND_TRIP_S = 0.1


def _post_share() -> float:
    return TASK_WEIGHTS["POST /"] / sum(TASK_WEIGHTS.values())


def request_rate(users: float, delay_s: float) -> float:
    """Requests per second, POST / and GET /healthz: each user loops one task (a POST waits
    delay + round trip for its answer, a GET the round trip), then think time."""
    post = _post_share()
    cycle_s = post * (delay_s + ROUND_TRIP_S) + (1 - post) * ROUND_TRIP_S + THINK_S
    return users / cycle_s


def in_flight(users: float, delay_s: float) -> float:
    """Requests waiting in the service at any moment (Little's law; the GETs take no time)."""
    return request_rate(users, delay_s) * _post_share() * (delay_s + ROUND_TRIP_S)


# --- Scheduling: where pods fit ---------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    name: str
    cpu_m: float
    memory_mib: float = 0.0


@dataclass(frozen=True)
class NodeType:
    name: str
    vcpus: int
    # What the kubelet reports as capacity is the kernel's MemTotal, below EC2's nominal 8 GiB;
    # 7.5 GiB is a conservative stand-in (`kubectl describe node` shows the real figure).
    memory_mib: float
    max_pods: int  # VPC CNI: ENIs x (IPs per ENI - 1) + 2

    @property
    def allocatable_cpu_m(self) -> float:
        # EKS AMI kube-reserved CPU: 6 % of the first core, 1 % of the second, 0.5 % of the next
        # two, 0.25 % of the rest (awslabs/amazon-eks-ami nodeadm kubelet config).
        shares = [0.06, 0.01, 0.005, 0.005] + [0.0025] * max(0, self.vcpus - 4)
        return self.vcpus * 1000 - sum(1000 * s for s in shares[: self.vcpus])

    @property
    def allocatable_memory_mib(self) -> float:
        kube_reserved = 11 * self.max_pods + 255
        eviction_hard = 100
        return self.memory_mib - kube_reserved - eviction_hard


T3_LARGE = NodeType("t3.large", vcpus=2, memory_mib=7680, max_pods=35)

# On every node (DaemonSets), and the pods the scheduler may put on any node.
DAEMONSETS = (Pod("aws-node", 25 + 25), Pod("kube-proxy", 100))
SYSTEM_DEPLOYMENTS = (
    Pod("coredns", 100, 70),
    Pod("coredns", 100, 70),
    Pod("metrics-server", 100, 200),
)


def app_pods_that_fit(app: Pod, nodes: int, node: NodeType = T3_LARGE) -> int:
    """How many app pods fit in the worst placement of the movable system pods.

    Every placement of coredns and metrics-server over the nodes is tried; app pods are all
    alike, so for a given placement each node takes as many as its leftover room allows.
    """
    worst = math.inf
    for placement in itertools.product(range(nodes), repeat=len(SYSTEM_DEPLOYMENTS)):
        total = 0
        for n in range(nodes):
            system = [*DAEMONSETS, *(p for p, at in zip(SYSTEM_DEPLOYMENTS, placement) if at == n)]
            cpu = node.allocatable_cpu_m - sum(p.cpu_m for p in system)
            mem = node.allocatable_memory_mib - sum(p.memory_mib for p in system)
            slots = node.max_pods - len(system)
            by_cpu = cpu // app.cpu_m if app.cpu_m else math.inf
            by_mem = mem // app.memory_mib if app.memory_mib else math.inf
            total += max(0, int(min(by_cpu, by_mem, slots)))
        worst = min(worst, total)
    return int(worst)


# --- The HPA ----------------------------------------------------------------------------------

SYNC_PERIOD_S = 15  # kube-controller-manager --horizontal-pod-autoscaler-sync-period
TOLERANCE = 0.1
SCRAPE_PERIOD_S = 15  # metrics-server --metric-resolution on EKS
SCRAPE_PHASE_S = 5  # scrapes and HPA syncs are not aligned
POD_READY_S = 20  # created -> Ready: schedule, pull on a fresh node, start, startup probe
AZS = 3  # a Classic ELB health-checks every node from each of its zones


@dataclass(frozen=True)
class Rules:
    """One direction of `behavior` (scaleUp or scaleDown)."""

    window_s: int
    policies: tuple[tuple[str, int, int], ...]  # (type, value, periodSeconds)
    select: str = "Max"


DEFAULT_UP = Rules(0, (("Percent", 100, 15), ("Pods", 4, 15)))
DEFAULT_DOWN = Rules(300, (("Percent", 100, 15),))


def _rules(spec: dict | None, default: Rules) -> Rules:
    spec = spec or {}
    policies = tuple((p["type"], p["value"], p["periodSeconds"]) for p in spec.get("policies") or ())
    return Rules(
        window_s=spec.get("stabilizationWindowSeconds", default.window_s),
        policies=policies or default.policies,
        select=spec.get("selectPolicy", default.select),
    )


# Prometheus's scrape interval for the in-flight metric: README.md installs the chart with 15 s
# (its default is 1 minute).
PROMETHEUS_SCRAPE_S = 15


@dataclass(frozen=True)
class HPA:
    min_replicas: int
    max_replicas: int
    # "cpu"/"memory": averageUtilization, % of the request; "in_flight": requests in flight per
    # pod (KEDA's Prometheus trigger on sum(http_requests_in_flight), an AverageValue target).
    targets: dict[str, float]
    up: Rules = DEFAULT_UP
    down: Rules = DEFAULT_DOWN
    scrape_s: int = PROMETHEUS_SCRAPE_S  # how old the in-flight sum the HPA reads may be

    @classmethod
    def from_manifest(cls, doc: dict, scrape_s: int = PROMETHEUS_SCRAPE_S) -> HPA:
        """hpa.yaml, or keda-scaledobject.yaml (KEDA makes an HPA of it)."""
        spec = doc["spec"]
        if doc["kind"] == "ScaledObject":
            (trigger,) = spec["triggers"]
            if trigger["type"] != "prometheus" or "http_requests_in_flight" not in trigger["metadata"]["query"]:
                raise ValueError(f"the model covers a Prometheus trigger on requests in flight only: {trigger}")
            hpa = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
            spec = {"minReplicas": spec.get("minReplicaCount", 0), "maxReplicas": spec.get("maxReplicaCount", 100),
                    "behavior": hpa.get("behavior")}
            targets = {"in_flight": float(trigger["metadata"]["threshold"])}
        else:
            targets = {}
            for metric in spec["metrics"]:
                if metric["type"] != "Resource" or metric["resource"]["target"]["type"] != "Utilization":
                    raise ValueError(f"the model covers Resource Utilization metrics only: {metric}")
                targets[metric["resource"]["name"]] = metric["resource"]["target"]["averageUtilization"]
        behavior = spec.get("behavior") or {}
        return cls(
            min_replicas=spec.get("minReplicas", 1),
            max_replicas=spec["maxReplicas"],
            targets=targets,
            up=_rules(behavior.get("scaleUp"), DEFAULT_UP),
            down=_rules(behavior.get("scaleDown"), DEFAULT_DOWN),
            scrape_s=scrape_s,
        )


@dataclass(frozen=True)
class Workload:
    """What one pod of the Deployment costs, and what it asked the scheduler for."""

    measured: Measured
    delay_s: float
    requests: Pod
    probes_per_s: float  # kubelet liveness + readiness per pod
    capacity: int  # pods that fit on the node group's minimum nodes (the rest stay Pending)
    nodes: int

    @classmethod
    def from_manifests(cls, deployment: dict, measured: Measured, nodes: int) -> Workload:
        c = app_container(deployment)
        req = c["resources"]["requests"]
        requests = Pod("app", cpu_millicores(req["cpu"]), memory_mib(req["memory"]))
        probes = sum(
            1 / c[p].get("periodSeconds", 10)
            for p in ("livenessProbe", "readinessProbe")
            if "httpGet" in c.get(p, {})
        )
        capacity = app_pods_that_fit(requests, nodes)
        return cls(measured, service_default("delay_seconds"), requests, probes, capacity, nodes)

    def elb_checks_per_s(self, interval_s: float = 10) -> float:
        return AZS * self.nodes / interval_s

    def pod_cpu_m(self, requests_per_s: float) -> float:
        """The container's CPU (what cAdvisor and metrics-server report) at this request rate,
        probes included: measured the same way, from the container's cgroup."""
        return self.measured.idle_cpu_m + self.measured.load_cpu_m(requests_per_s + self.probes_per_s)

    def pod_rss_mib(self, requests_in_flight: float) -> float:
        return self.measured.idle_rss_mib + requests_in_flight * self.measured.rss_mib_per_in_flight


@dataclass
class _Pod:
    created: float
    ready_at: float | None  # None: Pending, it does not fit
    cpu_m_s: float = 0.0  # cumulative CPU, millicore-seconds
    rss_mib: float = 0.0  # high-water mark: CPython does not hand freed memory back
    scrapes: list[tuple[float, float, float]] = field(default_factory=list)  # (t, cpu_m_s, rss)

    def ready(self, t: float) -> bool:
        return self.ready_at is not None and t >= self.ready_at


@dataclass(frozen=True)
class Tick:
    t: int
    users: float
    replicas: int  # the Deployment's spec.replicas after this sync
    ready: int
    utilization: dict[str, float | None]  # what `kubectl get hpa` shows, per metric
    # This sync's recommendation would differ had the metric read 3 % lower or higher: a
    # decision on a knife edge, which a slightly faster or slower machine takes the other way.
    near_edge: bool = False


def _pod_value(pod: _Pod, resource: str) -> float | None:
    """The metric the HPA gets for a pod, or None when it sets the pod aside."""
    if resource == "cpu":
        # A CPU sample counts only if its whole window lies after the pod became ready (pods
        # are scraped only once ready here, so that takes two scrapes).
        if len(pod.scrapes) < 2:
            return None
        (t0, c0, _), (t1, c1, _) = pod.scrapes[-2:]
        return math.ceil((c1 - c0) / (t1 - t0))  # the usage's MilliValue() rounds up
    return pod.scrapes[-1][2] if pod.scrapes else None


def _utilization(values: dict[int, float], request: float) -> int:
    """Whole percent of the summed requests, as GetResourceUtilizationRatio computes it."""
    return math.floor(100 * sum(values.values()) / (request * len(values)))


def desired_for_in_flight(in_flight_sum: float, target: float, current: int) -> tuple[int, float]:
    """GetExternalPerPodMetricReplicas: (desired replicas, the average `kubectl get hpa` shows)."""
    if abs(1.0 - in_flight_sum / (target * current)) <= TOLERANCE:
        return current, math.ceil(in_flight_sum / current)
    return math.ceil(in_flight_sum / target), math.ceil(in_flight_sum / current)


def desired_for_metric(
    pods: list[_Pod], t: float, resource: str, target: float, request: float, current: int,
    scale: float = 1.0,
) -> tuple[int, int] | None:
    """GetResourceReplicas: (desired replicas, utilization %), or None without any metric.
    `scale` multiplies every reading (a what-if)."""
    metrics, ignored, missing = {}, set(), set()
    for i, pod in enumerate(pods):
        if not pod.ready(t):
            ignored.add(i)  # Pending or not yet ready
        elif (value := _pod_value(pod, resource)) is None:
            (ignored if resource == "cpu" else missing).add(i)
        else:
            metrics[i] = math.ceil(value * scale) if scale != 1.0 else value
    if not metrics:
        return None
    utilization = _utilization(metrics, request)
    ratio = utilization / target
    rebalance_ignored = bool(ignored) and ratio > 1.0
    if not rebalance_ignored and not missing:
        if abs(1.0 - ratio) <= TOLERANCE:
            return current, utilization
        return math.ceil(ratio * len(metrics)), utilization
    if missing:  # scale-down: assume they use their whole request; scale-up: nothing
        metrics.update({i: request if ratio < 1.0 else 0.0 for i in missing})
    if rebalance_ignored:
        metrics.update({i: 0.0 for i in ignored})
    new_ratio = _utilization(metrics, request) / target
    if abs(1.0 - new_ratio) <= TOLERANCE or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
        return current, utilization
    replicas = math.ceil(new_ratio * len(metrics))
    if (new_ratio < 1.0 and replicas > current) or (new_ratio > 1.0 and replicas < current):
        return current, utilization
    return replicas, utilization


def _changed_within(events: list[tuple[float, int]], t: float, period: int) -> int:
    return sum(n for at, n in events if at > t - period)


def _limit(rules: Rules, current: int, t: float, ups: list, downs: list, up: bool) -> int:
    if rules.select == "Disabled":
        return current
    proposals = []
    for kind, value, period in rules.policies:
        start = current - _changed_within(ups, t, period) + _changed_within(downs, t, period)
        if kind == "Pods":
            proposals.append(start + value if up else start - value)
        elif up:
            proposals.append(math.ceil(start * (1 + value / 100)))
        else:
            proposals.append(int(start * (1 - value / 100)))
    most_change = max if up else min
    least_change = min if up else max
    return (least_change if rules.select == "Min" else most_change)(proposals)


def simulate(
    hpa: HPA,
    work: Workload,
    users: Callable[[float], float],
    seconds: int,
    start_replicas: int = 1,
) -> list[Tick]:
    """Run the swarm `users(t)` against the Deployment for `seconds`, one HPA sync per 15 s."""
    pods = [_Pod(-60, -60 if i < work.capacity else None) for i in range(start_replicas)]
    recommendations: list[tuple[float, int]] = []
    ups: list[tuple[float, int]] = []
    downs: list[tuple[float, int]] = []
    ticks = []
    # Requests in flight are the POSTs sent in the last DELAY_SECONDS (and round trip): they rise
    # that much behind the swarm, and end that much after it.
    holding = work.delay_s + ROUND_TRIP_S
    sent: list[float] = []  # POSTs sent in each second so far
    scraped_in_flight = 0.0  # the sum Prometheus holds: its last scrape of the pods' gauges
    for t in range(seconds + 1):
        u = users(t)
        sent.append(request_rate(u, work.delay_s) * _post_share())
        if t % hpa.scrape_s == SCRAPE_PHASE_S % hpa.scrape_s:
            whole = int(holding)
            scraped_in_flight = sum(sent[-whole:]) + (holding - whole) * (sent[-whole - 1] if len(sent) > whole else 0)
        ready = [p for p in pods if p.ready(t)]
        if ready:
            # Spread evenly: kube-proxy and the ELB balance connections, and the service ends each
            # keep-alive connection after MAX_CONNECTION_AGE_SECONDS, so clients reconnect and the
            # pods the HPA adds get their share within one sync period.
            share = (request_rate(u, work.delay_s) + work.elb_checks_per_s()) / len(ready)
            flight = in_flight(u, work.delay_s) / len(ready)
            for p in ready:
                p.cpu_m_s += work.pod_cpu_m(share)
                p.rss_mib = max(p.rss_mib, work.pod_rss_mib(flight))
        if t % SCRAPE_PERIOD_S == SCRAPE_PHASE_S:
            for p in ready:
                p.scrapes = [*p.scrapes[-1:], (t, p.cpu_m_s, p.rss_mib)]
        if t == 0 or t % SYNC_PERIOD_S:
            continue

        current = len(pods)
        proposals, shown, edge = [], {}, False
        for resource, target in hpa.targets.items():
            if resource == "in_flight":
                def decide(scale: float) -> tuple[int, float]:
                    return desired_for_in_flight(scraped_in_flight * scale, target, current)
            else:
                request = work.requests.cpu_m if resource == "cpu" else work.requests.memory_mib

                def decide(scale: float) -> tuple[int, int] | None:
                    return desired_for_metric(pods, t, resource, target, request, current, scale)
            result = decide(1.0)
            shown[resource] = result[1] if result else None
            if result:
                proposals.append(result[0])
                bounded = {min(max(r[0], hpa.min_replicas), hpa.max_replicas) for r in (decide(0.97), result, decide(1.03)) if r}
                edge |= len(bounded) > 1
        if proposals:
            desired = max(proposals)
            # Stabilisation: the lowest recommendation of the scale-up window, the highest of
            # the scale-down window (including this one) bound the change.
            if not recommendations:
                recommendations.append((t, current))
            up_rec = min([desired, *(r for at, r in recommendations if at > t - hpa.up.window_s)])
            down_rec = max([desired, *(r for at, r in recommendations if at > t - hpa.down.window_s)])
            recommendations.append((t, desired))
            stabilized = min(max(current, up_rec), down_rec)
            new = stabilized
            if stabilized > current:
                limit = max(current, _limit(hpa.up, current, t, ups, downs, up=True))
                new = min(stabilized, hpa.max_replicas, limit)
            elif stabilized < current:
                limit = min(current, _limit(hpa.down, current, t, ups, downs, up=False))
                new = max(stabilized, hpa.min_replicas, limit)
            if new > current:
                for _ in range(new - current):
                    fits = sum(p.ready_at is not None for p in pods) < work.capacity
                    pods.append(_Pod(t, t + POD_READY_S if fits else None))
                ups.append((t, new - current))
            elif new < current:
                # The ReplicaSet removes unscheduled pods first, then not-ready, then the newest.
                pods.sort(key=lambda p: (p.ready_at is None, not p.ready(t), p.created), reverse=True)
                del pods[: current - new]
                pods.sort(key=lambda p: p.created)
                downs.append((t, current - new))
        ticks.append(Tick(t, u, len(pods), sum(p.ready(t) for p in pods), shown, edge))
    return ticks


# --- Figures the README and hpa.yaml quote ---------------------------------------------------


def idle_reading_tolerated_m(hpa: HPA, work: Workload) -> int:
    """The highest per-pod CPU reading, in the whole millicores the HPA rounds each container
    up to, at which the HPA still steps from maxReplicas all the way down to minReplicas."""

    def back_to_min(reading: int) -> bool:
        n = hpa.max_replicas
        while n > hpa.min_replicas:
            pods = [_Pod(0, 0, scrapes=[(0, 0, 0), (15, reading * 15, 0)]) for _ in range(n)]
            desired, _ = desired_for_metric(pods, 30, "cpu", hpa.targets["cpu"], work.requests.cpu_m, n)
            if desired >= n:
                return False
            n = desired
        return True

    return max(itertools.takewhile(back_to_min, itertools.count())) if back_to_min(0) else -1


def idle_cpu_tolerated_m(hpa: HPA, work: Workload) -> float:
    """The service's own idle CPU that still lets the HPA return to minReplicas: the tolerated
    reading less what probes and ELB health checks add to each pod on the way down."""
    checks = work.pod_cpu_m(work.elb_checks_per_s() / (hpa.min_replicas + 1)) - work.measured.idle_cpu_m
    return idle_reading_tolerated_m(hpa, work) - checks


def back_to_min_range_s(hpa: HPA, work: Workload, users: tuple[int, ...] = TABLE_USERS) -> tuple[int, int]:
    """Fastest and slowest return to minReplicas after the swarm stops, over the swarms of the
    capacity table that scaled out at all."""
    backs = [row.back_to_min_s for row in (capacity_row(hpa, work, u) for u in users) if row.back_to_min_s]
    return min(backs), max(backs)


# --- Scenarios --------------------------------------------------------------------------------

SPAWN_RATE = 10  # users per second, as the README suggests in locust's start form


def swarm(users: int, stop_at: float = math.inf, spawn_rate: float = SPAWN_RATE) -> Callable[[float], float]:
    """Locust ramping up at spawn_rate users a second, then all users stopped at `stop_at`."""
    return lambda t: 0 if t >= stop_at else min(users, spawn_rate * t)


# The two autoscalers of the kit: hpa.yaml on CPU, or keda-scaledobject.yaml on requests in flight.
AUTOSCALERS = {"cpu": "hpa.yaml", "in_flight": "keda-scaledobject.yaml"}


def repo_kit(measured: Measured | None = None, autoscaler: str = "cpu",
             scrape_s: int = PROMETHEUS_SCRAPE_S) -> tuple[HPA, Workload]:
    """The HPA and Workload the manifests in this repository describe."""
    nodes = manifest("cluster-config.yaml")["managedNodeGroups"][0]["minSize"]
    return HPA.from_manifest(manifest(AUTOSCALERS[autoscaler]), scrape_s), Workload.from_manifests(
        manifest("deployment.yaml"), measured or Measured.load(), nodes
    )


@dataclass(frozen=True)
class Row:
    users: int
    rate: float
    in_flight: float
    replicas: int
    cpu_per_pod_m: float
    utilization: int | None
    back_to_min_s: int | None


def capacity_row(hpa: HPA, work: Workload, users: int, run_s: int = 900, idle_s: int = 900) -> Row:
    ticks = simulate(hpa, work, swarm(users, stop_at=run_s), run_s + idle_s)
    during = [k for k in ticks if k.t <= run_s]
    settled = during[-1]
    after = [k for k in ticks if k.t > run_s]
    scaled = max(k.replicas for k in during) > hpa.min_replicas
    back = next((k.t - run_s for k in after if k.replicas == hpa.min_replicas), None) if scaled else 0
    rate = request_rate(users, work.delay_s)
    return Row(
        users=users,
        rate=rate,
        in_flight=in_flight(users, work.delay_s),
        replicas=settled.replicas,
        cpu_per_pod_m=work.pod_cpu_m((rate + work.elb_checks_per_s()) / settled.ready),
        utilization=settled.utilization.get("cpu"),
        back_to_min_s=back,
    )


def capacity_table(users: tuple[int, ...] = TABLE_USERS) -> str:
    """README.md's table: what each swarm size does to the pods, on either autoscaler."""
    hpa, work = repo_kit()
    keda = repo_kit(autoscaler="in_flight")[0]
    target = hpa.targets["cpu"]
    lines = [
        "| Locust users | Requests/s | In flight | CPU per pod | `kubectl get hpa` TARGETS | Replicas on CPU "
        "| Replicas on in flight | Back to 1 pod after the stop |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, other in ((capacity_row(hpa, work, u), capacity_row(keda, work, u)) for u in users):
        back = {None: "never", 0: "(never left 1)"}.get(row.back_to_min_s, f"{row.back_to_min_s} s")
        lines.append(
            f"| {row.users:,} | {row.rate:.0f} | {row.in_flight:.0f} | {row.cpu_per_pod_m:.1f}m "
            f"| cpu: {row.utilization}%/{target}% | {row.replicas} | {other.replicas} | {back} |"  # as the API server prints it
        )
    return "\n".join(lines)


# --- Charts -----------------------------------------------------------------------------------
# The demo swarm over time and the capacity table as pictures, for the README (docs/*.svg).
# matplotlib is imported only here: the model itself does not need it.

DOCS = ROOT / "docs"
DEMO_RUN_S = 300  # the demo swarm runs five minutes, then every user stops
DEMO_AFTER_S = 240  # and the chart follows the HPA four minutes more
CAPACITY_USERS = range(50, 5_001, 50)

# The same bytes from every run with the pinned matplotlib: its defaults whatever the local
# matplotlibrc says, text as text (not outlines of whichever fonts are installed), element ids
# from a fixed salt, a fixed size, and no date in the metadata (draw_svg).
CHART_STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "math-service",
    "figure.dpi": 100,
    "font.size": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.framealpha": 0.9,
}
# Fixed margins (fractions of the figure), not constrained layout: its solver's last bits vary
# with PYTHONHASHSEED, and so would the clip-path ids derived from them.
DEMO_MARGINS = {"left": 0.08, "right": 0.92, "top": 0.94, "bottom": 0.07, "hspace": 0.08}
CAPACITY_MARGINS = {"left": 0.08, "right": 0.97, "top": 0.91, "bottom": 0.13}


def draw_svg(path: Path, draw: Callable[..., Figure], *args) -> Path:
    """Draw a chart in CHART_STYLE and write it to `path` as SVG."""
    import matplotlib.style

    with matplotlib.style.context(["default", CHART_STYLE]):
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(*args).savefig(path, format="svg", metadata={"Date": None})
    return path


def demo_ticks(hpa: HPA, work: Workload, users: int = DEMO_USERS, run_s: int = DEMO_RUN_S,
               end: int = DEMO_RUN_S + DEMO_AFTER_S) -> list[Tick]:
    """The model's run of a swarm that stops at run_s, from t = 0."""
    swarm_users = swarm(users, stop_at=run_s)
    return [Tick(0, 0, hpa.min_replicas, hpa.min_replicas, {}),
            *simulate(hpa, work, swarm_users, end, hpa.min_replicas)]


def demo_chart(work: Workload) -> Figure:
    """The demo swarm against both autoscalers: users, replicas, and the metric each acts on."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    kits = {kind: repo_kit(work.measured, kind)[0] for kind in AUTOSCALERS}
    ticks = {kind: demo_ticks(hpa, work) for kind, hpa in kits.items()}
    users = swarm(DEMO_USERS, stop_at=DEMO_RUN_S)
    seconds = range(DEMO_RUN_S + DEMO_AFTER_S + 1)

    fig = Figure(figsize=(10, 11))
    top, pods, cpu, flight = fig.subplots(4, 1, sharex=True, height_ratios=(2, 3, 3, 3), gridspec_kw=DEMO_MARGINS)
    fig.suptitle(f"The demo swarm, modelled: {DEMO_USERS:,} locust users spawned at {SPAWN_RATE}/s, "
                 f"stopped after {DEMO_RUN_S // 60} minutes", fontsize=13)
    top.plot(seconds, [users(t) for t in seconds], lw=2, label="locust users")
    top.annotate(f"{DEMO_USERS:,} users ≈ {request_rate(DEMO_USERS, work.delay_s):.0f} requests/s",
                 (DEMO_USERS / SPAWN_RATE, DEMO_USERS), xytext=(8, -16), textcoords="offset points")
    top.set_ylabel("users")
    top.set_ylim(0, DEMO_USERS * 1.25)
    top.legend(loc="center right")

    names = {"cpu": "on CPU (hpa.yaml)", "in_flight": "on requests in flight (keda-scaledobject.yaml)"}
    marks = [(DEMO_RUN_S, "0.2", f"swarm stops: {DEMO_RUN_S} s ", "right")]
    for (kind, run), style in zip(ticks.items(), ("-", "--")):
        syncs = [k.t for k in run]
        pods.step(syncs, [k.replicas for k in run], where="post", lw=2.5, ls=style, label=f"desired, {names[kind]}")
        for before, k in itertools.pairwise(run):
            if k.replicas > before.replicas:
                pods.annotate(f"{k.replicas} at {k.t} s", (k.t, k.replicas), xytext=(-4, 6) if kind == "cpu" else (4, -14),
                              textcoords="offset points", ha="right" if kind == "cpu" else "left", fontsize=9)
        if back := next((k.t for k in run if k.t > DEMO_RUN_S and k.replicas == 1), None):
            marks.append((back, "C2" if kind == "cpu" else "C1", f" {kind.replace('_', ' ')}: back to 1 at {back} s", "left"))
    hpa = kits["cpu"]
    pods.axhline(hpa.max_replicas, color="0.4", lw=1)
    pods.text(seconds[-1], hpa.max_replicas, f"maxReplicas {hpa.max_replicas} ", ha="right", va="bottom")
    pods.set_ylabel("replicas")
    pods.set_ylim(0, hpa.max_replicas + 1)
    pods.yaxis.set_major_locator(MaxNLocator(integer=True))
    pods.legend(loc="center right")

    for axes, kind, unit in ((cpu, "cpu", " %"), (flight, "in_flight", " per pod")):
        run, target = ticks[kind], kits[kind].targets[kind]
        shown = [math.nan if k.utilization.get(kind) is None else k.utilization[kind] for k in run]
        axes.step([k.t for k in run], shown, where="post", lw=2.5, label="pods' average, as the HPA reads it")
        axes.axhline(target, color="C3", lw=1.5, label=f"target {target:g}{unit} ({AUTOSCALERS[kind]})")
        axes.axhspan(target * (1 - TOLERANCE), target * (1 + TOLERANCE), color="C3", alpha=0.15,
                     label=f"within {TOLERANCE:.0%} of the target: no change")
        axes.set_ylim(0, max(filter(math.isfinite, shown), default=target) * 1.3)
    cpu.set_ylabel("CPU, % of the pod's request")
    cpu.secondary_yaxis("right", functions=(lambda p: p * work.requests.cpu_m / 100,
                                            lambda m: m * 100 / work.requests.cpu_m)).set_ylabel("millicores per pod")
    cpu.legend(loc="upper right")
    flight.set_ylabel("requests in flight per pod")
    finish_time_axis(flight, seconds[-1])
    draw_marks(marks, top, pods, cpu, flight)
    return fig


def finish_cpu_axis(cpu, request_m: float, end: float) -> None:
    """Millicores beside the percentages, the legend, and minutes along the time axis."""
    cpu.secondary_yaxis(
        "right", functions=(lambda p: p * request_m / 100, lambda m: m * 100 / request_m)
    ).set_ylabel("millicores per pod")
    finish_time_axis(cpu, end)


def finish_time_axis(axes, end: float) -> None:
    """The legend, and minutes along the time axis."""
    from matplotlib.ticker import MultipleLocator

    axes.legend(loc="upper right")
    axes.set_xlabel("time since the swarm started (s)")
    axes.xaxis.set_major_locator(MultipleLocator(60))
    axes.set_xlim(0, end)


def draw_marks(marks: list[tuple[float, str, str, str]], top, *others) -> None:
    """Each (time, color, label, side) as a dotted line across every axis, labelled on the top
    one, each label a little lower than the one before."""
    for i, (at, color, label, side) in enumerate(marks):
        for ax in (top, *others):
            ax.axvline(at, color=color, ls=":", lw=1.5)
        top.text(at, 0.97 - 0.13 * i, label, transform=top.get_xaxis_transform(), ha=side, va="top", color=color)


def capacity_chart(work: Workload) -> Figure:
    """Swarm size -> replicas once the swarm has run 15 minutes, for each autoscaler: the
    capacity table's curves."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4))
    ax = fig.subplots(gridspec_kw=CAPACITY_MARGINS)
    ax.set_title("Swarm size → replicas, modelled")
    for (kind, name), style in zip(AUTOSCALERS.items(), ("-", "--")):
        hpa = repo_kit(work.measured, kind)[0]
        curve = [capacity_row(hpa, work, u) for u in CAPACITY_USERS]
        on = f"on CPU, {hpa.targets['cpu']:g} %" if kind == "cpu" else f"on requests in flight, {hpa.targets[kind]:g} per pod"
        ax.step([r.users for r in curve], [r.replicas for r in curve], where="mid", lw=2, ls=style,
                label=f"{on} ({name})")
    ax.axvline(DEMO_USERS, color="0.4", ls=":", lw=1.5)
    ax.text(DEMO_USERS, 0.3, f" the demo: {DEMO_USERS:,} users", color="0.3")
    ax.axhline(hpa.max_replicas, color="0.4", lw=1)
    ax.text(0, hpa.max_replicas, f" maxReplicas {hpa.max_replicas}", va="bottom")
    ax.set_xlabel(f"locust users (spawned at {SPAWN_RATE}/s, after 15 minutes; one point every {CAPACITY_USERS.step})")
    ax.set_ylabel("replicas")
    ax.set_xlim(0, CAPACITY_USERS.stop * 1.04)
    ax.set_ylim(0, hpa.max_replicas + 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="center right")
    return fig


if __name__ == "__main__":
    print(capacity_table())
