"""The demo swarm on a real cluster, recorded: what the autoscaler, the metrics API and each pod's
own counters say every 5 s, drawn on the same axes as what tests/tools/cluster_model.py predicts.

With the manifests applied in kubectl's current context (its namespace, e.g. `default`):

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \
        python tests/tools/demo_recorder.py --host "http://$ELB" --out demo-mine.json

runs the README's demo swarm (1,000 users at 10/s for 5 minutes) against that address, records
until 4 minutes after it stops, and writes demo-mine.json and demo-mine.svg. It only reads from
the cluster: the HPA (hpa.yaml's, or the one KEDA made of keda-scaledobject.yaml), the pods, the
metrics API, and each pod's /metrics through the API server. `--draw demo-mine.json` redraws a
saved timeline. tests/test_e2e.py runs the same code in a fresh namespace.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

import cluster_model as cm
import swarm

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEPLOYMENT = "math-service-deployment"
SELECTOR = "app=math-service"
SAMPLE_S = 5


@dataclass(frozen=True)
class Scenario:
    """The swarm: the README's demo unless changed (tests/test_e2e.py's E2E_DEMO_* settings)."""

    users: int = cm.DEMO_USERS
    spawn_rate: float = cm.SPAWN_RATE
    run_s: int = cm.DEMO_RUN_S  # how long the swarm runs; with hold_s, the longest
    after_s: int = cm.DEMO_AFTER_S  # how long it is followed after it stops; with hold_s, the longest
    # Stop the swarm once the replica count has held this long (after the swarm has spawned and
    # the HPA has seen it), then follow it until it is back to its minimum.
    hold_s: int | None = None

    @property
    def settled_s(self) -> float:
        """From when a held replica count counts: spawned, and two HPA syncs after."""
        return self.users / self.spawn_rate + 2 * cm.SYNC_PERIOD_S


# --- Reading the cluster ----------------------------------------------------------------------


def kubectl(*args: str, timeout: float = 30) -> str:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, check=True,
                          timeout=timeout).stdout


def kubectl_json(*args: str) -> dict:
    return json.loads(kubectl(*args, "-o", "json"))


def current_namespace() -> str:
    return kubectl("config", "view", "--minify", "-o", "jsonpath={..namespace}").strip() or "default"


def quantity(text: str) -> float:
    """A Kubernetes quantity ("12345678n", "5m", "377", "1") as a number (CPU: in cores)."""
    units = {"n": 1e-9, "u": 1e-6, "m": 1e-3}
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def where() -> dict:
    """The cluster the swarm ran on, as its API server says."""
    version = json.loads(kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"]
    nodes = kubectl_json("get", "nodes")["items"]
    return {"kubernetes": version, "nodes": len(nodes),
            "cores": sum(quantity(n["status"]["capacity"]["cpu"]) for n in nodes)}


def autoscaler() -> dict:
    """The HPA that scales the Deployment: hpa.yaml's on CPU, or KEDA's on requests in flight."""
    hpa = next(h for h in kubectl_json("get", "hpa")["items"]
               if h["spec"]["scaleTargetRef"]["name"] == DEPLOYMENT)
    spec, (metric,) = hpa["spec"], hpa["spec"]["metrics"]
    found = {"name": hpa["metadata"]["name"], "min": spec.get("minReplicas", 1), "max": spec["maxReplicas"]}
    if metric["type"] == "Resource":
        return found | {"kind": "cpu", "target": metric["resource"]["target"]["averageUtilization"]}
    so = kubectl_json("get", "scaledobject", hpa["metadata"]["ownerReferences"][0]["name"])
    return found | {"kind": "in_flight", "target": quantity(metric["external"]["target"]["averageValue"]),
                    "scrape_s": scrape_interval(so["spec"]["triggers"][0]["metadata"]["serverAddress"])}


def scrape_interval(server: str) -> int:
    """Prometheus's scrape interval, asked through the API server (its address is the cluster's)."""
    address = urllib.parse.urlsplit(server)
    services = kubectl_json("get", "services", "--all-namespaces")["items"]
    svc = next((s for s in services if address.hostname in (s["spec"].get("clusterIP"),
               f"{s['metadata']['name']}.{s['metadata']['namespace']}.svc.cluster.local")), None)
    if svc is None:
        return cm.PROMETHEUS_SCRAPE_S
    port = address.port or svc["spec"]["ports"][0]["port"]
    path = f"/api/v1/namespaces/{svc['metadata']['namespace']}/services/{svc['metadata']['name']}:{port}/proxy/api/v1/status/config"
    config = yaml.safe_load(json.loads(kubectl("get", "--raw", path))["data"]["yaml"])
    interval = config.get("global", {}).get("scrape_interval", "1m")
    return int(interval[:-1]) * (60 if interval.endswith("m") else 1)


def metrics_port(pod: dict) -> int:
    """The pod's port named `metrics` (which no Service exposes)."""
    return next(p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", []) if p.get("name") == "metrics")


def pod_counters(namespace: str, pod: dict) -> tuple[float, float] | None:
    """A pod's requests answered so far and requests in flight, from its own /metrics, through
    the API server; None from a pod that is starting or going."""
    path = f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}:{metrics_port(pod)}/proxy/metrics"
    try:
        text = kubectl("get", "--raw", path)
    except subprocess.CalledProcessError:
        return None
    values = [line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")]
    answered = sum(float(v) for k, v in values if k.startswith("http_requests_total{"))
    return answered, next(float(v) for k, v in values if k == "http_requests_in_flight")


def sample(namespace: str, hpa_name: str, start_wall: float) -> dict:
    """One reading: the HPA's status, the pods' readiness, each pod's CPU (metrics API, with the
    window it covers) and its own counters."""
    status = kubectl_json("get", "hpa", hpa_name)["status"]
    current = (status.get("currentMetrics") or [{}])[0]
    if "resource" in current:
        metric = current["resource"]["current"].get("averageUtilization")
    else:
        metric = quantity(current["external"]["current"]["averageValue"]) if "external" in current else None
    pods = [p for p in kubectl_json("get", "pods", "-l", SELECTOR)["items"] if not p["metadata"].get("deletionTimestamp")]
    running = {p["metadata"]["name"]: p for p in pods if p["status"].get("phase") == "Running"}
    usage = json.loads(kubectl("get", "--raw", f"/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods?"
                               f"labelSelector={urllib.parse.quote(SELECTOR)}"))["items"]
    with ThreadPoolExecutor(8) as pool:
        counters = dict(zip(running, pool.map(lambda pod: pod_counters(namespace, pod), running.values())))
    readings = {name: {"requests": c[0], "in_flight": c[1]} for name, c in counters.items() if c}
    for m in usage:
        if m["metadata"]["name"] in readings:
            end = datetime.datetime.fromisoformat(m["timestamp"]).timestamp() - start_wall
            readings[m["metadata"]["name"]] |= {
                "cpu_m": round(1000 * sum(quantity(c["usage"]["cpu"]) for c in m["containers"]), 1),
                "cpu_end_s": round(end, 1), "cpu_window_s": round(quantity(m["window"].rstrip("s")), 1)}
    return {
        "desired": status.get("desiredReplicas") or None,  # 0 until the HPA's first sync
        "current": status.get("currentReplicas"),
        "ready": sum(any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
                     for p in pods),
        "metric": metric,  # what `kubectl get hpa` shows: CPU %, or requests in flight per pod
        "pods": dict(sorted(readings.items())),
    }


# --- Running and recording the swarm ----------------------------------------------------------


def held(samples: list[dict], scenario: Scenario) -> bool:
    """The replica count has not changed for hold_s, all of it after the swarm settled."""
    now = samples[-1]["t"]
    since = [s["desired"] for s in samples if s["t"] >= now - scenario.hold_s]
    return now - scenario.hold_s >= scenario.settled_s and len(set(since)) == 1


def record(host: str, scenario: Scenario, namespace: str | None = None, log=print) -> dict:
    """Run the swarm against `host` and sample every SAMPLE_S until it is over (Scenario)."""
    namespace = namespace or current_namespace()
    hpa = autoscaler()
    swarm.install()
    timeline = {"where": where(), "date": datetime.date.today().isoformat(), "scenario": asdict(scenario),
                "autoscaler": hpa, "samples": []}
    samples = timeline["samples"]
    with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
        stats, stderr = Path(tmp) / "locust", (Path(tmp) / "locust.log").open("w")
        start, start_wall = time.monotonic(), time.time()
        locust = subprocess.Popen(swarm.command(host, scenario.users, scenario.spawn_rate, stats,
                                                None if scenario.hold_s else scenario.run_s),
                                  cwd=tmp, stdout=subprocess.DEVNULL, stderr=stderr)
        stopped = None if scenario.hold_s else scenario.run_s
        try:
            for n in itertools.count():
                time.sleep(max(0.0, start + n * SAMPLE_S - time.monotonic()))
                samples.append({"t": round(time.monotonic() - start, 1), **sample(namespace, hpa["name"], start_wall)})
                s = samples[-1]
                log(f"{s['t']:6.1f} s  desired {s['desired']}  ready {s['ready']}  metric {s['metric']}  "
                    f"pods {[p.get('cpu_m') for p in s['pods'].values()]}")
                if stopped is None and (held(samples, scenario) or s["t"] >= scenario.run_s):
                    locust.send_signal(signal.SIGTERM)
                    stopped = s["t"]
                if stopped is not None and (s["t"] >= stopped + scenario.after_s or (
                        scenario.hold_s and [x["desired"] for x in samples[-4:]] == [hpa["min"]] * 4
                        and samples[-4]["t"] > stopped)):
                    break
            locust.wait(60)
        finally:
            if locust.poll() is None:
                locust.send_signal(signal.SIGTERM)
                locust.wait(30)
        if not Path(f"{stats}_stats.csv").exists():
            raise RuntimeError("locust wrote no stats:\n" + Path(stderr.name).read_text()[-3000:])
        results = swarm.results(stats)
    timeline["scenario"]["run_s"] = stopped
    timeline["locust"] = asdict(results)
    return timeline


# --- What the timeline says -------------------------------------------------------------------


@dataclass(frozen=True)
class Steps:
    reached: list[tuple[float, int]]  # (t, desired replicas) at each scale-out
    peak: int
    back_s: float | None  # after the swarm stopped, until desired is minReplicas again


def steps(timeline: dict) -> Steps:
    samples = [s for s in timeline["samples"] if s["desired"] is not None]
    run_s, low = timeline["scenario"]["run_s"], timeline["autoscaler"]["min"]
    reached = [(b["t"], b["desired"]) for a, b in itertools.pairwise(samples) if b["desired"] > a["desired"]]
    back = next((s["t"] - run_s for s in samples if s["t"] >= run_s and s["desired"] == low), None)
    return Steps(reached, max((s["desired"] for s in samples), default=low), back)


def cpu_points(timeline: dict) -> list[tuple[float, float]]:
    """(requests/s, millicores) for every distinct metrics-API reading of a pod, the requests
    counted by the pod itself over the same window."""
    series: dict[str, list[tuple[float, float]]] = {}
    readings: dict[str, set[tuple[float, float, float]]] = {}
    for s in timeline["samples"]:
        for name, pod in s["pods"].items():
            series.setdefault(name, []).append((s["t"], pod["requests"]))
            if "cpu_m" in pod:
                readings.setdefault(name, set()).add((pod["cpu_end_s"], pod["cpu_window_s"], pod["cpu_m"]))

    def counted(points: list[tuple[float, float]], t: float) -> float | None:
        for (t0, r0), (t1, r1) in itertools.pairwise(points):
            if t0 <= t <= t1:
                return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
        return None

    found = []
    for name, reads in readings.items():
        for end, window, cpu in sorted(reads):
            a, b = counted(series[name], end - window), counted(series[name], end)
            if a is not None and b is not None:
                found.append((round((b - a) / window, 2), cpu))
    return found


def calibrated(timeline: dict, measured: cm.Measured | None = None) -> cm.Measured:
    """The model's pod CPU fitted to this run's own readings: the idle pods' median as idle, and
    the measured curve's shape scaled by least squares to the busy pods."""
    measured = measured or cm.Measured.load()
    points = cpu_points(timeline)
    idle = [cpu for rate, cpu in points if rate < 1]
    idle_m = statistics.median(idle) if idle else measured.idle_cpu_m
    busy = [(measured.load_cpu_m(rate), cpu - idle_m) for rate, cpu in points if rate >= 1]
    if not busy:
        return replace(measured, idle_cpu_m=idle_m)
    factor = sum(m * c for m, c in busy) / sum(m * m for m, _ in busy)
    return replace(measured.scaled(factor), idle_cpu_m=idle_m)


def kit(timeline: dict, measured: cm.Measured | None = None) -> tuple[cm.HPA, cm.Workload]:
    """The model of the run's autoscaler, with the given pod CPU (by default measured.json's)."""
    a = timeline["autoscaler"]
    return cm.repo_kit(measured, a["kind"], a.get("scrape_s", cm.PROMETHEUS_SCRAPE_S))


def model_ticks(timeline: dict, measured: cm.Measured | None = None) -> list[cm.Tick]:
    """The model's run of the same swarm, from t = 0."""
    hpa, work = kit(timeline, measured)
    scenario = Scenario(**timeline["scenario"])
    users = cm.swarm(scenario.users, scenario.run_s, scenario.spawn_rate)
    end = max(s["t"] for s in timeline["samples"])
    start = cm.Tick(0, users(0), hpa.min_replicas, hpa.min_replicas, {})
    return [start, *cm.simulate(hpa, work, users, int(end), hpa.min_replicas)]


def model_steps(ticks: list[cm.Tick], run_s: float) -> Steps:
    """The model's scale-outs, peak and return, as steps() gives the measured ones."""
    reached = [(k.t, k.replicas) for a, k in itertools.pairwise(ticks) if k.replicas > a.replicas]
    low, peak = ticks[0].replicas, max(k.replicas for k in ticks)
    back = next((k.t - run_s for k in ticks if k.t > run_s and k.replicas == low), None) if peak > low else None
    return Steps(reached, peak, back)


def pod_spread(timeline: dict) -> tuple[float, list[float]]:
    """The last scale-out during the swarm, and the busiest pod's CPU over the least busy one's
    at each reading from 60 s after it until the swarm stops (every pod reporting)."""
    run_s = timeline["scenario"]["run_s"]
    last_out = max((t for t, _ in steps(timeline).reached if t < run_s), default=0.0)
    spread = []
    for s in timeline["samples"]:
        cpu = [p["cpu_m"] for p in s["pods"].values() if "cpu_m" in p]
        if last_out + 60 <= s["t"] <= run_s and len(cpu) == s["desired"] > 1:
            spread.append(round(max(cpu) / max(min(cpu), 1), 2))
    return last_out, spread


def summary(timeline: dict) -> str:
    found, run_s = steps(timeline), timeline["scenario"]["run_s"]
    lines = [f"measured:   {describe(found)}"]
    models = {"model": None, "calibrated": calibrated(timeline)} if timeline["autoscaler"]["kind"] == "cpu" else {"model": None}
    for label, measured in models.items():
        lines.append(f"{label + ':':11} {describe(model_steps(model_ticks(timeline, measured), run_s))}")
    lc = timeline["locust"]
    return "\n".join([*lines, f"locust:     {lc['requests']} requests, {lc['failures']} failures, p99 {lc['p99_s']} s"])


def describe(found: Steps) -> str:
    return (", ".join(f"{n} at {t:.0f} s" for t, n in found.reached) or "no scale-out") + \
        f"; peak {found.peak}; back {found.back_s if found.back_s is None else round(found.back_s)} s after the stop"


# --- The chart --------------------------------------------------------------------------------


def measured_chart(timeline: dict) -> Figure:
    """Measured replicas and metric (solid) over the model's (dashed; dotted: the model with this
    run's own CPU per request), in demo-timeline.svg's layout."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    scenario, a, w = Scenario(**timeline["scenario"]), timeline["autoscaler"], timeline["where"]
    on_cpu = a["kind"] == "cpu"
    models = {"model (measured.json)" if on_cpu else "model": (model_ticks(timeline), "--")}
    if on_cpu:
        models["model, this run's CPU"] = (model_ticks(timeline, calibrated(timeline)), ":")
    samples = timeline["samples"]
    t = [s["t"] for s in samples]
    found = steps(timeline)
    end = max(t)
    users = cm.swarm(scenario.users, scenario.run_s, scenario.spawn_rate)
    request_m = cm.repo_kit()[1].requests.cpu_m

    fig = Figure(figsize=(10, 8.5))
    top, pods, metric = fig.subplots(3, 1, sharex=True, height_ratios=(2, 3, 3), gridspec_kw=cm.DEMO_MARGINS)
    on = "CPU (hpa.yaml)" if on_cpu else "requests in flight (keda-scaledobject.yaml)"
    fig.suptitle(f"Scaled on {on}, measured: Kubernetes {w['kubernetes']}, {w['nodes']} node{'s' * (w['nodes'] != 1)}, "
                 f"{w['cores']:g} cores, {timeline['date']}", fontsize=12)

    seconds = range(int(end) + 1)
    top.plot(seconds, [users(s) for s in seconds], lw=2, label="locust users (as started)")
    lc = timeline["locust"]
    top.text(0.01, 0.9, f"{scenario.users:,} users spawned at {scenario.spawn_rate:g}/s, stopped after "
             f"{scenario.run_s:g} s\nlocust: {lc['requests']:,} requests, {lc['failures']} failed",
             transform=top.transAxes, va="top")
    top.set_ylabel("users")
    top.set_ylim(0, scenario.users * 1.3)
    top.legend(loc="center right")

    pods.step(t, [s["desired"] for s in samples], where="post", lw=2.5, label="desired, measured")
    pods.step(t, [s["ready"] for s in samples], where="post", lw=1.5, label="ready pods, measured")
    for label, (ticks, style) in models.items():
        pods.step([k.t for k in ticks], [k.replicas for k in ticks], where="post", lw=2, ls=style,
                  color="0.35", label=f"desired, {label}")
    for at, n in found.reached:
        pods.annotate(f"{n} at {at:.0f} s", (at, n), xytext=(-4, 6), textcoords="offset points", ha="right")
    pods.axhline(a["max"], color="0.4", lw=1)
    pods.text(end, a["max"], f"maxReplicas {a['max']} ", ha="right", va="bottom")
    pods.set_ylabel("replicas")
    pods.set_ylim(0, a["max"] + 1)
    pods.yaxis.set_major_locator(MaxNLocator(integer=True))
    pods.legend(loc="center right", fontsize=9)

    def nan(v: float | None) -> float:
        return math.nan if v is None else v

    key = "cpu" if on_cpu else "in_flight"
    shown = [nan(s["metric"]) for s in samples]
    metric.step(t, shown, where="post", lw=2.5, label="pods' average, as the HPA read it")
    for label, (ticks, style) in models.items():
        metric.step([k.t for k in ticks], [nan(k.utilization.get(key)) for k in ticks], where="post", lw=2,
                    ls=style, color="0.35", label=f"pods' average, {label}")
    def pod_value(pod: dict | None) -> float:
        if on_cpu:
            return 100 * pod["cpu_m"] / request_m if pod and "cpu_m" in pod else math.nan
        return pod["in_flight"] if pod else math.nan

    names = sorted({name for s in samples for name in s["pods"]})
    per_pod = [[pod_value(s["pods"].get(name)) for s in samples] for name in names]
    for i, values in enumerate(per_pod):
        metric.plot(t, values, lw=0.8, color="C4", alpha=0.6,
                    label=("each pod (metrics API)" if on_cpu else "each pod (its own gauge)") if i == 0 else None)
    metric.axhline(a["target"], color="C3", lw=1.5, label=f"target {a['target']:g}{' %' if on_cpu else ' per pod'}")
    finite = [v for v in shown + [x for row in per_pod for x in row] if math.isfinite(v)]
    metric.set_ylim(0, max(finite + [a["target"]]) * 1.15)
    if on_cpu:
        metric.set_ylabel("CPU, % of the pod's request")
        cm.finish_cpu_axis(metric, request_m, end)
    else:
        metric.set_ylabel("requests in flight per pod")
        cm.finish_time_axis(metric, end)

    marks = [(scenario.run_s, "0.2", f"swarm stops: {scenario.run_s:g} s ", "right")]
    if found.back_s is not None:
        back = scenario.run_s + found.back_s
        marks.append((back, "C2", f" back to {a['min']} pod: +{found.back_s:.0f} s ", "left" if back < 0.8 * end else "right"))
    cm.draw_marks(marks, top, pods, metric)
    return fig


def save(timeline: dict, out: Path) -> Path:
    """The timeline as JSON at `out`, and its chart beside it (same name, .svg)."""
    out.write_text(json.dumps(timeline, indent=1) + "\n")
    return cm.draw_svg(out.with_suffix(".svg"), measured_chart, timeline)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="the Service's address, e.g. http://$ELB (runs the swarm)")
    parser.add_argument("--out", type=Path, default=Path("demo-measured.json"))
    parser.add_argument("--namespace", help="default: kubectl's current context's")
    parser.add_argument("--users", type=int, default=cm.DEMO_USERS)
    parser.add_argument("--spawn-rate", type=float, default=cm.SPAWN_RATE)
    parser.add_argument("--draw", type=Path, metavar="JSON", help="only redraw a saved timeline")
    args = parser.parse_args()
    if args.draw:
        timeline = json.loads(args.draw.read_text())
        print(f"wrote {save(timeline, args.draw)}")
    elif args.host:
        timeline = record(args.host, Scenario(args.users, args.spawn_rate), args.namespace)
        print(f"wrote {args.out} and {save(timeline, args.out)}")
    else:
        parser.error("give --host (record a swarm) or --draw (redraw a timeline)")
    print(summary(timeline))
    return 1 if timeline["locust"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
