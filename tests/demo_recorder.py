"""The demo swarm on a real cluster, recorded: what the HPA and the metrics API say every 5 s,
drawn on the same axes as what tests/cluster_model.py predicts for the same swarm.

With the three manifests applied in kubectl's current context (its namespace, e.g. `default`):

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \
        python tests/demo_recorder.py --host "http://$ELB" --out demo-mine.json

runs the demo swarm (the project's locustfile, headless, the model's scenario: 1,000 users at
10/s for 5 minutes) against that address, records until 4 minutes after it stops, and writes
demo-mine.json and demo-mine.svg. It applies, changes and deletes nothing in the cluster; it only
reads (kubectl get). `--draw demo-mine.json` redraws a saved timeline. tests/test_e2e.py runs the
same code against a fresh namespace; docs/demo-measured.{json,svg} come from one of its runs.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cluster_model as cm
from rollout_benchmark import locust_results

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
LOCUST = "locust==2.47.0"  # as tests/conftest.py pins it
HPA_NAME = "math-service-hpa"
SELECTOR = "app=math-service"
SAMPLE_S = 5


@dataclass(frozen=True)
class Scenario:
    """The swarm: the model's demo unless shortened (tests/test_e2e.py's E2E_DEMO_* settings)."""

    users: int = cm.DEMO_USERS
    spawn_rate: float = cm.SPAWN_RATE
    run_s: int = cm.DEMO_RUN_S
    after_s: int = cm.DEMO_AFTER_S


# --- Reading the cluster ----------------------------------------------------------------------


def kubectl(*args: str, timeout: float = 30) -> str:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, check=True,
                          timeout=timeout).stdout


def kubectl_json(*args: str) -> dict:
    return json.loads(kubectl(*args, "-o", "json"))


def current_namespace() -> str:
    return kubectl("config", "view", "--minify", "-o", "jsonpath={..namespace}").strip() or "default"


def cpu_m(quantity: str) -> float:
    """A CPU quantity as the metrics API writes it ("12345678n", "5m", "1") in millicores."""
    units = {"n": 1e-6, "u": 1e-3, "m": 1.0}
    return float(quantity[:-1]) * units[quantity[-1]] if quantity[-1] in units else float(quantity) * 1000


def where() -> dict:
    """The cluster the swarm ran on, as its API server says."""
    version = json.loads(kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"]
    nodes = kubectl_json("get", "nodes")["items"]
    cores = sum(cpu_m(n["status"]["capacity"]["cpu"]) for n in nodes) / 1000
    return {"kubernetes": version, "nodes": len(nodes), "cores": cores}


def sample(namespace: str) -> dict:
    """One reading: the HPA's status, the pods' readiness, and each pod's CPU (metrics API)."""
    status = kubectl_json("get", "hpa", HPA_NAME)["status"]
    cpu = next((m["resource"]["current"] for m in status.get("currentMetrics") or []
                if m.get("type") == "Resource" and m["resource"]["name"] == "cpu"), {})
    pods = kubectl_json("get", "pods", "-l", SELECTOR)["items"]
    ready = sum(
        any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        for p in pods if not p["metadata"].get("deletionTimestamp")
    )
    selector = urllib.parse.quote(SELECTOR)
    usage = json.loads(kubectl(
        "get", "--raw", f"/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods?labelSelector={selector}"
    ))["items"]
    return {
        "desired": status.get("desiredReplicas") or None,  # 0 until the HPA's first sync
        "current": status.get("currentReplicas"),
        "ready": ready,
        "cpu_percent": cpu.get("averageUtilization"),
        "pods_cpu_m": {
            m["metadata"]["name"]: round(sum(cpu_m(c["usage"]["cpu"]) for c in m["containers"]), 1)
            for m in sorted(usage, key=lambda m: m["metadata"]["name"])
        },
    }


# --- Running and recording the swarm ----------------------------------------------------------


def locust_command(host: str, scenario: Scenario, csv: Path, *, run_for: bool = True) -> list[str]:
    return [
        "uvx", "--quiet", "--from", LOCUST, "locust", "-f", str(ROOT / "locustfile.py"), "--headless",
        "-u", str(scenario.users), "-r", f"{scenario.spawn_rate:g}", "-H", host,
        *(["-t", f"{scenario.run_s}s"] if run_for else []),
        "--csv", str(csv), "--only-summary", "--loglevel", "WARNING",
        # When the time is up, every user finishes the request it is in (5 s at most).
        "--stop-timeout", "10",
    ]


def record(host: str, scenario: Scenario, namespace: str | None = None,
           log=print) -> dict:
    """Run the swarm against `host` and sample every SAMPLE_S until `after_s` past its end."""
    namespace = namespace or current_namespace()
    hpa = kubectl_json("get", "hpa", HPA_NAME)["spec"]
    subprocess.run(["uvx", "--quiet", "--from", LOCUST, "locust", "--version"], check=True,
                   capture_output=True, timeout=600)  # installed before the clock starts
    timeline = {
        "where": where(),
        "date": datetime.date.today().isoformat(),
        "scenario": asdict(scenario),
        "hpa": {"min": hpa.get("minReplicas", 1), "max": hpa["maxReplicas"],
                "target_percent": hpa["metrics"][0]["resource"]["target"]["averageUtilization"]},
        "samples": [],
    }
    with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
        csv, stderr = Path(tmp) / "locust", (Path(tmp) / "locust.log").open("w")
        start = time.monotonic()
        swarm = subprocess.Popen(locust_command(host, scenario, csv), cwd=tmp,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            for n in itertools.count():
                t = n * SAMPLE_S
                if t > scenario.run_s + scenario.after_s:
                    break
                time.sleep(max(0.0, start + t - time.monotonic()))
                reading = {"t": round(time.monotonic() - start, 1), **sample(namespace)}
                timeline["samples"].append(reading)
                log(f"{reading['t']:6.1f} s  desired {reading['desired']}  ready {reading['ready']}  "
                    f"cpu {reading['cpu_percent']}%  pods {list(reading['pods_cpu_m'].values())}")
            swarm.wait(60)  # long since done: -t plus the stop timeout
        finally:
            if swarm.poll() is None:
                swarm.send_signal(signal.SIGTERM)
                swarm.wait(30)
        if not Path(f"{csv}_stats.csv").exists():
            raise RuntimeError("locust wrote no stats:\n" + Path(stderr.name).read_text()[-3000:])
        requests, failures, messages = locust_results(csv)
    timeline["locust"] = {"requests": requests, "failures": failures, "messages": messages}
    return timeline


# --- What the timeline says -------------------------------------------------------------------


@dataclass(frozen=True)
class Steps:
    reached: list[tuple[float, int]]  # (t, desired replicas) at each scale-out
    peak: int
    back_s: float | None  # after the swarm stopped, until desired is minReplicas again


def steps(timeline: dict) -> Steps:
    samples = [s for s in timeline["samples"] if s["desired"] is not None]
    run_s, low = timeline["scenario"]["run_s"], timeline["hpa"]["min"]
    reached = [(b["t"], b["desired"]) for a, b in itertools.pairwise(samples) if b["desired"] > a["desired"]]
    back = next((s["t"] - run_s for s in samples if s["t"] >= run_s and s["desired"] == low), None)
    return Steps(reached, max((s["desired"] for s in samples), default=low), back)


def model_ticks(scenario: Scenario) -> list[cm.Tick]:
    """The model's run of the same swarm, from t = 0 (tests/cluster_model.py's demo chart)."""
    hpa, work = cm.repo_kit()
    users = cm.swarm(scenario.users, stop_at=scenario.run_s)
    start = cm.Tick(0, users(0), hpa.min_replicas, hpa.min_replicas, {})
    return [start, *cm.simulate(hpa, work, users, scenario.run_s + scenario.after_s, hpa.min_replicas)]


def model_steps(scenario: Scenario) -> list[tuple[int, int]]:
    """The model's scale-outs for the same swarm: (t, replicas), as steps() gives the measured ones."""
    ticks = model_ticks(scenario)
    return [(k.t, k.replicas) for a, k in itertools.pairwise(ticks) if k.replicas > a.replicas]


def model_back_s(scenario: Scenario) -> int | None:
    hpa, _ = cm.repo_kit()
    ticks = model_ticks(scenario)
    if max(k.replicas for k in ticks) == hpa.min_replicas:
        return None  # never scaled out
    return next((k.t - scenario.run_s for k in ticks if k.t > scenario.run_s and k.replicas == hpa.min_replicas), None)


# --- The chart --------------------------------------------------------------------------------


def measured_chart(timeline: dict) -> Figure:
    """Measured replicas and CPU (solid) over the model's (dashed), in demo-timeline.svg's layout."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    scenario = Scenario(**timeline["scenario"])
    hpa, where_ = timeline["hpa"], timeline["where"]
    work = cm.repo_kit()[1]
    request_m = work.requests.cpu_m
    ticks = model_ticks(scenario)
    samples = timeline["samples"]
    t = [s["t"] for s in samples]
    found = steps(timeline)
    end = scenario.run_s + scenario.after_s
    users = cm.swarm(scenario.users, stop_at=scenario.run_s)

    fig = Figure(figsize=(10, 8.5))
    top, pods, cpu = fig.subplots(3, 1, sharex=True, height_ratios=(2, 3, 3), gridspec_kw=cm.DEMO_MARGINS)
    cores = f"{where_['cores']:g} core" + ("s" if where_["cores"] != 1 else "")
    nodes = f"{where_['nodes']} node" + ("s" if where_["nodes"] != 1 else "")
    fig.suptitle(
        f"The demo swarm, measured on Kubernetes {where_['kubernetes']} ({nodes}, {cores}), "
        f"{timeline['date']}; dashed: the model", fontsize=12,
    )

    seconds = range(end + 1)
    top.plot(seconds, [users(s) for s in seconds], lw=2, label="locust users (as started)")
    lc = timeline["locust"]
    top.text(0.01, 0.9, f"{scenario.users:,} users spawned at {scenario.spawn_rate:g}/s, stopped after "
             f"{scenario.run_s} s\nlocust: {lc['requests']:,} requests, {lc['failures']} failed",
             transform=top.transAxes, va="top")
    top.set_ylabel("users")
    top.set_ylim(0, scenario.users * 1.3)
    top.legend(loc="center right")

    pods.step(t, [s["desired"] for s in samples], where="post", lw=2.5, label="desired, measured")
    pods.step(t, [s["ready"] for s in samples], where="post", lw=1.5, label="ready pods, measured")
    pods.step([k.t for k in ticks], [k.replicas for k in ticks], where="post", lw=2, ls="--",
              color="0.35", label="desired, model")
    for at, n in found.reached:
        pods.annotate(f"{n} at {at:.0f} s", (at, n), xytext=(-4, 6), textcoords="offset points", ha="right")
    pods.axhline(hpa["max"], color="0.4", lw=1)
    pods.text(end, hpa["max"], f"maxReplicas {hpa['max']} ", ha="right", va="bottom")
    pods.set_ylabel("replicas")
    pods.set_ylim(0, hpa["max"] + 1)
    pods.yaxis.set_major_locator(MaxNLocator(integer=True))
    pods.legend(loc="center right")

    def nan(v: float | None) -> float:
        return math.nan if v is None else v

    measured = [nan(s["cpu_percent"]) for s in samples]
    modelled = [nan(k.utilization.get("cpu")) for k in ticks]
    cpu.step(t, measured, where="post", lw=2.5, label="pods' average, as the HPA read it")
    cpu.step([k.t for k in ticks], modelled, where="post", lw=2, ls="--", color="0.35",
             label="pods' average, model")
    names = sorted({name for s in samples for name in s["pods_cpu_m"]})
    for i, name in enumerate(names):
        share = [100 * s["pods_cpu_m"][name] / request_m if name in s["pods_cpu_m"] else math.nan
                 for s in samples]
        cpu.plot(t, share, lw=0.8, color="C4", alpha=0.6,
                 label="each pod (metrics API)" if i == 0 else None)
    target = hpa["target_percent"]
    cpu.axhline(target, color="C3", lw=1.5, label=f"target {target} %")
    cpu.set_ylabel("CPU, % of the pod's request")
    peak = max(filter(math.isfinite, measured + modelled), default=target)
    per_pod = [100 * v / request_m for s in samples for v in s["pods_cpu_m"].values()]
    cpu.set_ylim(0, max(peak, *per_pod, target) * 1.15)
    cm.finish_cpu_axis(cpu, request_m, end)

    marks = [(scenario.run_s, "0.2", f"swarm stops: {scenario.run_s} s ", "right")]
    if found.back_s is not None:
        marks.append((scenario.run_s + found.back_s, "C2",
                      f" back to {hpa['min']} pod: +{found.back_s:.0f} s", "left"))
    cm.draw_marks(marks, top, pods, cpu)
    return fig


def save(timeline: dict, out: Path) -> Path:
    """The timeline as JSON at `out`, and its chart beside it (same name, .svg)."""
    out.write_text(json.dumps(timeline, indent=1) + "\n")
    return cm.draw_svg(out.with_suffix(".svg"), measured_chart, timeline)


def summary(timeline: dict) -> str:
    found, scenario = steps(timeline), Scenario(**timeline["scenario"])
    model = model_steps(scenario)
    lc = timeline["locust"]
    return "\n".join([
        "measured: " + ", ".join(f"{n} at {t:.0f} s" for t, n in found.reached)
        + f"; peak {found.peak}; back to {timeline['hpa']['min']} {found.back_s} s after the stop",
        "model:    " + ", ".join(f"{n} at {t} s" for t, n in model)
        + f"; back {model_back_s(scenario)} s after the stop",
        f"locust:   {lc['requests']} requests, {lc['failures']} failures",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="the Service's address, e.g. http://$ELB (runs the swarm)")
    parser.add_argument("--out", type=Path, default=Path("demo-measured.json"))
    parser.add_argument("--namespace", help="default: kubectl's current context's")
    parser.add_argument("--draw", type=Path, metavar="JSON", help="only redraw a saved timeline")
    args = parser.parse_args()
    if args.draw:
        timeline = json.loads(args.draw.read_text())
        print(f"wrote {save(timeline, args.draw)}")
    elif args.host:
        timeline = record(args.host, Scenario(), args.namespace)
        print(f"wrote {args.out} and {save(timeline, args.out)}")
    else:
        parser.error("give --host (record a swarm) or --draw (redraw a timeline)")
    print(summary(timeline))
    return 1 if timeline["locust"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
