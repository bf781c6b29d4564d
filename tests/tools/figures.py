"""Every figure README.md and docs/ quote, written from the data that holds it.

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \
        python tests/tools/figures.py [--check]

rewrites each marked block (`<!-- name:start -->` ... `<!-- name:end -->`) and redraws each chart
from tests/tools/measured.json (the benchmarks' results), the demos recorded in docs/ and the
model (tests/tools/cluster_model.py, which reads the manifests). The benchmarks call it when they
have written measured.json. `--check` changes nothing and lists what is not current.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import cluster_model as cm
import demo_recorder as rec
import node_scenarios as ns

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROOT, DOCS = cm.ROOT, cm.DOCS
# The recorded demos: the README's swarm and a sudden one, on each autoscaler (tests/test_e2e.py
# records them with E2E_DEMO_OUT; docs/performance.md says how).
DEMOS = {
    ("demo", "cpu"): DOCS / "demo-measured.json",
    ("demo", "in_flight"): DOCS / "demo-measured-keda.json",
    ("sudden", "cpu"): DOCS / "sudden-measured.json",
    ("sudden", "in_flight"): DOCS / "sudden-measured-keda.json",
}


def measured() -> dict:
    return json.loads(cm.MEASURED.read_text())


def timeline(swarm: str, kind: str) -> dict | None:
    path = DEMOS[swarm, kind]
    return json.loads(path.read_text()) if path.exists() else None


# --- The benchmark: service.py, FastAPI alone and the floor ------------------------------------

# The performance targets for service.py (docs/performance.md): (limit, relative to the floor?)
TARGETS = {
    "cpu_us_per_request": (3.5, True),
    "kb_per_in_flight": (16.0, False),
    "p99_s_5000": (5.8, False),
    "errors_5000": (0, False),
    "errors_10000": (0, False),
    "peak_rss_mib_10000": (160.0, False),
    "idle_rss_mib": (60.0, False),
    "idle_cpu_millicores": (3.0, False),
}
ROWS = [
    ("CPU per request at DELAY_SECONDS=0 (µs)", "cpu_us_per_request"),
    ("Throughput on one core (req/s)", "rps"),
    ("Memory per request in flight, 1,000 to 5,000 at once (kB)", "kb_per_in_flight"),
    ("1,000 at once x 5 s: peak RSS (MiB)", "peak_rss_mib_1000"),
    ("5,000 at once x 5 s: p50 (s)", "p50_s_5000"),
    ("5,000 at once x 5 s: p99 (s)", "p99_s_5000"),
    ("5,000 at once x 5 s: errors", "errors_5000"),
    ("5,000 at once x 5 s: peak RSS (MiB)", "peak_rss_mib_5000"),
    ("10,000 at once x 5 s: p50 (s)", "p50_s_10000"),
    ("10,000 at once x 5 s: p99 (s)", "p99_s_10000"),
    ("10,000 at once x 5 s: errors", "errors_10000"),
    ("10,000 at once x 5 s: peak RSS (MiB)", "peak_rss_mib_10000"),
    ("Idle RSS (MiB)", "idle_rss_mib"),
    ("Idle CPU (millicores)", "idle_cpu_millicores"),
    ("Start to ready (s)", "start_to_ready_s"),
]


def benchmark(m: dict) -> str:
    service, fastapi, floor = (m.get(app, {}) for app in ("service", "fastapi", "floor"))

    def ratio(value: float | None, base: float) -> str:
        return f"{value / base:.2f}x" if isinstance(value, (int, float)) and base else ""

    def verdict(key: str) -> tuple[str, str]:
        if key not in TARGETS:
            return "", ""
        limit, relative = TARGETS[key]
        bound = limit * floor[key] if relative else limit
        return (f"<= {limit:g}x floor" if relative else f"<= {limit:g}"), "met" if service[key] <= bound else "not met"

    lines = [
        f"Measured {m['date']} on {m['machine']} (load average {m['load_average_before']} before the run; "
        "compare the columns, which come from the same run).",
        "",
        "| Measure | service.py | FastAPI alone | bare-ASGI floor | service / floor | FastAPI alone / floor "
        "| service / FastAPI alone | target (service.py) | |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for label, key in ROWS:
        s, a, f = service[key], fastapi.get(key), floor[key]
        target, met = verdict(key)
        lines.append(f"| {label} | {s:g} | {'' if a is None else f'{a:g}'} | {f:g} | {ratio(s, f)} "
                     f"| {ratio(a, f)} | {ratio(s, a)} | {target} | {met} |")
    return "\n".join(lines)


LATENCY_MARGINS = {"left": 0.06, "right": 0.98, "top": 0.86, "bottom": 0.12, "wspace": 0.35}


def latency_chart(m: dict, concurrency: int = 5_000) -> Figure:
    """The burst's latency distribution, service against FastAPI alone and the floor; CPU and
    memory per request as bars."""
    from matplotlib.figure import Figure

    apps = {"service": ("service.py", "C0", "-"), "fastapi": ("FastAPI alone", "C2", "-."),
            "floor": ("bare-ASGI floor", "C1", "--")}
    fig = Figure(figsize=(12, 4.8))
    cdf, bars, memory = fig.subplots(1, 3, width_ratios=(3, 1, 1), gridspec_kw=LATENCY_MARGINS)
    fig.suptitle(f"{concurrency:,} requests at once: service.py, FastAPI alone and the bare-ASGI floor, "
                 f"same run ({m['date']})", fontsize=13)
    for key, (label, color, style) in apps.items():
        quantiles = m[key][f"latency_quantiles_s_{concurrency}"]
        cdf.plot(quantiles, range(101), color=color, ls=style, lw=2,
                 label=f"{label}: p50 {quantiles[50]:.2f} s, p99 {quantiles[99]:.2f} s")
        cdf.plot([quantiles[50], quantiles[99]], [50, 99], "o", color=color)
    cdf.axvline(5, color="0.4", ls=":", lw=1.5, label="the 5 s sleep")
    cdf.axvline(TARGETS[f"p99_s_{concurrency}"][0], color="C3", ls=":", lw=1.5, label="p99 target")
    cdf.set_title("latency at DELAY_SECONDS=5 (epoll client)", fontsize=11)
    cdf.set_xlabel("latency, connect() to last byte (s)")
    cdf.set_ylabel("requests answered within (%)")
    cdf.set_ylim(0, 105)
    cdf.legend(loc="lower right")
    for axes, key, unit, title in (
        (bars, "cpu_us_per_request", "CPU per request (µs)", "CPU at DELAY_SECONDS=0"),
        (memory, "kb_per_in_flight", "memory per request in flight (kB)", "RSS, 1,000 to 5,000 at once"),
    ):
        values = [m[app][key] for app in apps]
        axes.bar([app if app != "fastapi" else "FastAPI" for app in apps], values,
                 color=[color for _, color, _ in apps.values()])
        for i, value in enumerate(values):
            axes.annotate(f"{value:g}", (i, value), xytext=(0, 3), textcoords="offset points", ha="center")
        limit, relative = TARGETS[key]
        target = limit * m["floor"][key] if relative else limit
        axes.axhline(target, color="C3", ls=":", lw=1.5, label=f"target {limit:g}x floor" if relative else f"target {limit:g}")
        axes.set_ylabel(unit)
        axes.set_title(title, fontsize=11)
        axes.set_ylim(0, max(values + [target]) * 1.2)
        axes.legend(loc="upper right")
    return fig


def memory_profile(m: dict) -> str:
    """tests/tools/memory_profile.py: bytes per request in flight, by the package that allocated."""
    profile = m["memory_profile"]
    apps = [app for app in ("service", "fastapi", "floor") if app in profile["apps"]]
    names = {"service": "service.py", "fastapi": "FastAPI alone", "floor": "bare-ASGI floor"}
    packages = sorted({p for app in apps for p in profile["apps"][app]},
                      key=lambda p: -max(profile["apps"][app].get(p, 0) for app in apps))
    lines = [
        f"Measured {profile['date']} on {profile['machine']}: Python heap per request asleep in its delay, "
        f"{profile['steps'][0]:,} then {profile['steps'][1]:,} in flight, by the package of the line that allocated it.",
        "",
        "| allocated in | " + " | ".join(names[a] for a in apps) + " |",
        "|---|" + "---:|" * len(apps),
    ]
    for package in packages:
        cells = [profile["apps"][a].get(package) for a in apps]
        lines.append(f"| {package} | " + " | ".join("" if c is None else f"{c:,}" for c in cells) + " |")
    totals = [sum(profile["apps"][a].values()) for a in apps]
    return "\n".join([*lines, "| **total** | " + " | ".join(f"**{t:,}**" for t in totals) + " |"])


# --- CPU as the HPA reads it ---------------------------------------------------------------------


def demo_rate(m: dict) -> str:
    d = m["demo_rate"]
    lines = [
        f"Measured {d['date']} on {d['machine']}, {d['engine']}, `--cpus {d['cpus']:g}`:",
        "",
        "| locust users | requests/s | container CPU | CPU per request | locust failures |",
        "|---:|---:|---:|---:|---:|",
        f"| idle | 0 | {d['idle_cpu_millicores']:.1f}m | | |",
    ]
    lines += [f"| {p['users']:,} | {p['requests_per_s']:g} | {p['cpu_millicores']:g}m "
              f"| {p['cpu_ms_per_request']:.2f} ms | {p['locust_failures']} |" for p in d["points"]]
    return "\n".join(lines)


# --- Overload, sizing and rollouts -------------------------------------------------------------


def overload(m: dict) -> str:
    o = m["overload"]
    lines = [
        f"Measured {o['date']} on {o['machine']}, {o['engine']}: the real image at {o['memory_limit_mib']:g} MiB "
        f"and {o['cpus']:g} CPU, `MAX_IN_FLIGHT={o['max_in_flight']}`, `DELAY_SECONDS={o['delay_seconds']}`, "
        "a fresh container per step, every request on its own connection.",
        "",
        "| At once | 200 (right sum) | JSON 503 | Socket errors | Peak in flight | Peak working set "
        f"| of the {o['memory_limit_mib']:g} MiB limit | OOM kill | Exit after SIGTERM |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in o["steps"]:
        lines.append(f"| {s['requests']:,} | {s['ok_200']:,} | {s['json_503']:,} | {s['errors']:,} "
                     f"| {s['peak_in_flight']:,} | {s['peak_ws_mib']:.0f} MiB | {s['peak_ws_share']:.0%} "
                     f"| {'yes' if s['oom_killed'] else 'no'} | {s['exit_code']} |")
    capped = [s for s in o["steps"] if s["json_503"]]
    if capped:
        lines += ["", "The cap answered " + "; ".join(
            f"{s['json_503']:,} JSON 503s at {s['requests']:,} at once, each in at most "
            f"{s['server_ms_503_max']:.1f} ms of the service's time after about {s['p99_s_503']:.0f} s in the "
            "kernel's queue" for s in capped) + "."]
    return "\n".join(lines)


def sizing(m: dict) -> str:
    """MAX_IN_FLIGHT against deployment.yaml's memory limit, from the overload benchmark."""
    o = m["overload"]
    env = {e["name"]: e["value"] for e in cm.app_container(cm.manifest("deployment.yaml"))["env"]}
    cap, idle, per = int(env["MAX_IN_FLIGHT"]), max(o["idle_ws_mib"], o["intercept_mib"]), o["bytes_per_in_flight"]
    limit = o["memory_limit_mib"]
    total = idle + cap * per / 2**20
    top = max(o["steps"], key=lambda s: s["peak_ws_mib"])
    return (f"Idle working set {idle:g} MiB (at most) + {cap:,} × {per:,} B per request in flight = {total:.0f} MiB, within "
            f"80 % of the {limit:g} MiB limit ({0.8 * limit:.0f} MiB allows {(0.8 * limit - idle) * 2**20 / per:,.0f}); "
            f"the limit itself holds about {o['holds_in_flight']:,}. The highest working set measured was "
            f"{top['peak_ws_mib']:.0f} MiB ({top['peak_ws_share']:.0%}), at {top['requests']:,} at once "
            f"(`tests/tools/overload_benchmark.py`, {o['date']}).")


def rollout(m: dict) -> str:
    lines = ["| Shutdown | Termination | Replacements | Requests | Failed | Date |", "|---|---|---:|---:|---:|---|"]
    for r in m["rollout"]:
        prestop = f"preStop {r['prestop_s']:g} s, as `deployment.yaml`" if r["prestop_s"] else "no preStop (`docker stop`)"
        lines.append(f"| {r['shutdown']} | {prestop} | {r['replacements']} | {r['requests']:,} "
                     f"| {r['failures']:,} | {r['date']} |")
    return "\n".join(lines)


def nodes(m: dict) -> str:
    """tests/tools/node_scenarios.py's runs: each health check against each way a node leaves."""
    runs = {(r["choice"], r["scenario"]): r for r in m["nodes"]}
    lines = ["| Health check | Upgrade, 1 pod | Scale-in, 2 pods | Lost node, 2 pods | Lost node out of the load balancer "
             "| Healthy nodes taken out | Date |", "|---|---:|---:|---:|---:|---|---|"]
    for choice in ns.CHOICES:
        done = {scenario: runs[choice, scenario] for scenario in ns.SCENARIOS if (choice, scenario) in runs}
        if not done:
            continue
        cells = [f"{r['failed']:,} of {r['requests']:,} failed" if (r := done.get(s)) else "not run" for s in ns.SCENARIOS]
        lost = done.get("lost", {})
        out = "; ".join(f"{after:g} s" for after in lost.get("lb_dropped_after_s", {}).values()) or "never"
        wrong = sorted({n for r in done.values() for n in r["wrongly_dropped"]})
        lines.append(f"| {choice} | {' | '.join(cells)} | {out if lost else 'not run'} | {', '.join(wrong) or 'none'} "
                     f"| {max(r['date'] for r in done.values())} |")
    return "\n".join(lines)


def node_costs(m: dict) -> str:
    """The kit's row of the comparison, for the README: what each way a node leaves cost."""
    kit = {r["scenario"]: r for r in m["nodes"] if r["choice"] == next(c for c, v in ns.CHOICES.items() if v is None)}
    up, scale, lost = kit["upgrade"], kit["scale-in"], kit["lost"]
    took = max(t for t, text in up["steps"] if text.startswith("terminate ")) - next(
        t for t, text in up["steps"] if text == "swarm at full size")
    return (f"Measured on the lab ({up['date']}; three nodes of a real Kubernetes behind a stand-in for the Classic ELB, "
            f"never on EKS), under {ns.USERS} users: the upgrade of its {len(ns.terminated_at(up))} old nodes took {took / 60:.1f} minutes from the new "
            f"node's start to the last termination, and {up['failed']:,} of {up['requests']:,} requests failed. For "
            f"comparison, a scale-in cost {scale['failed']:,} of {scale['requests']:,} (what was in flight through the "
            f"node when it went) and a node lost without warning {lost['failed']:,} of {lost['requests']:,}.")


# --- The model and the recorded demos ----------------------------------------------------------


def scale_down(m: dict) -> str:
    hpa, work = cm.repo_kit()
    low, high = cm.back_to_min_range_s(hpa, work)
    reading, idle = cm.idle_reading_tolerated_m(hpa, work), cm.idle_cpu_tolerated_m(hpa, work)
    back = f"{low} s" if low == high else f"{low} to {high} s"
    return (f"The model: back to {hpa.min_replicas} pod {back} after a swarm stops, and an idle pod may read up to "
            f"{reading}m as the HPA reads it ({math.floor(idle * 10) / 10:g}m of the service's own idle CPU, "
            f"{math.floor(idle / work.measured.idle_cpu_m * 10) / 10:g} times the {work.measured.idle_cpu_m:g}m "
            f"measured) before the HPA could no longer come back to {hpa.min_replicas}. {work.capacity} app pods "
            f"fit on {work.nodes} {cm.T3_LARGE.name} nodes in the worst placement of the system pods.")


def demo_caption(t: dict, name: str) -> str:
    """A recorded demo's chart and what it shows, against the model's prediction."""
    a, w, run_s = t["autoscaler"], t["where"], t["scenario"]["run_s"]
    found = rec.steps(t)
    model = rec.model_steps(rec.model_ticks(t), run_s)
    on = "CPU (`hpa.yaml`)" if a["kind"] == "cpu" else "requests in flight (`keda-scaledobject.yaml`)"
    text = (f"*The demo swarm scaled on {on}, measured {t['date']} on a single-node Kubernetes {w['kubernetes']} "
            f"lab with {w['cores']:g} cores: {rec.describe(found)}; {t['locust']['requests']:,} "
            f"requests, {t['locust']['failures']} failures. Dashed, the model")
    text += (f" with `tests/tools/measured.json`'s CPU per request, the README's prediction: {rec.describe(model)}."
             if a["kind"] == "cpu" else f": {rec.describe(model)}.")
    if a["kind"] == "cpu":
        own = rec.calibrated(t)
        factor = own.cpu_curve[-1][1] / cm.Measured.load().cpu_curve[-1][1]
        text += (f" Dotted, the model with this run's own CPU per request ({factor:.2f} times the benchmark's, "
                 f"idle {own.idle_cpu_m:.1f}m): {rec.describe(rec.model_steps(rec.model_ticks(t, own), run_s))}.")
    return f"![{on.split(' (')[0]}: the demo swarm measured, the model dashed](docs/{name})\n\n{text}*"


def measured_demos(m: dict) -> str:
    shown = [(t, path.with_suffix(".svg").name) for (swarm, kind), path in DEMOS.items()
             if swarm == "demo" and (t := timeline(swarm, kind))]
    return "\n\n".join(demo_caption(t, name) for t, name in shown)


def autoscalers(m: dict) -> str:
    """The two autoscalers side by side, on the same lab and the same swarms."""
    lines = ["| Swarm | Autoscaler | First scale-out | Peak | Back to 1 after the stop | Pod-minutes "
             "| Requests | p99 | 503s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (swarm, kind) in DEMOS:
        if not (t := timeline(swarm, kind)):
            continue
        found, s = rec.steps(t), t["scenario"]
        pod_s = sum((b["t"] - a["t"]) * (a["current"] or 0) for a, b in itertools.pairwise(t["samples"]))
        first = f"{found.reached[0][0]:.0f} s" if found.reached else "never"
        back = "n/a" if found.back_s is None else f"{found.back_s:.0f} s"
        lines.append(f"| {s['users']:,} users at {s['spawn_rate']:g}/s for {s['run_s']:g} s | "
                     f"{'CPU' if kind == 'cpu' else 'in flight (KEDA)'} | {first} | {found.peak} | {back} "
                     f"| {pod_s / 60:.1f} | {t['locust']['requests']:,} | {t['locust']['p99_s']:g} s "
                     f"| {t['locust']['status_503']} |")
    return "\n".join(lines)


def age(seconds: int) -> str:
    """As kubectl prints an AGE (HumanDuration): seconds up to 2 minutes, then minutes and seconds."""
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" + (f"{seconds % 60}s" if seconds % 60 else "")


def hpa_watch(m: dict) -> str:
    """`kubectl get hpa -w` through the model's demo: at the start, each scale-out, the plateau,
    the way back."""
    hpa, work = cm.repo_kit()
    ticks = [k for k in cm.demo_ticks(hpa, work) if k.utilization.get("cpu") is not None]
    shown = [k for before, k in zip([None, *ticks], ticks) if before is None or k.replicas != before.replicas
             or k.t == cm.DEMO_RUN_S]
    rows = [("NAME", "REFERENCE", "TARGETS", "MINPODS", "MAXPODS", "REPLICAS", "AGE")]
    rows += [("math-service-hpa", "Deployment/math-service-deployment", f"cpu: {k.utilization['cpu']}%/{hpa.targets['cpu']:g}%",
              str(hpa.min_replicas), str(hpa.max_replicas), str(k.replicas), age(k.t)) for k in shown]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "```text\n" + "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n```"


def locust_summary(m: dict) -> str:
    """The last lines of locust's summary in the recorded demo."""
    row = timeline("demo", "cpu")["locust"]["summary"]
    failed = int(row["# fails"])
    share = f"{failed}({100 * failed / max(int(row['# reqs']), 1):.2f}%)"
    return ("```text\n"
            f"Type     Name           # reqs      # fails |    Avg     Min     Max    Med |   req/s  failures/s\n"
            f"--------|-------------|-------|-------------|-------|-------|-------|-------|--------|-----------\n"
            f"         Aggregated  {int(row['# reqs']):8d} {share:>12} | {float(row['Avg']):6.0f} {float(row['Min']):7.0f} "
            f"{float(row['Max']):7.0f} {float(row['Med']):6.0f} | {float(row['req/s']):7.2f} {float(row['failures/s']):11.2f}\n```")


BLOCKS: dict[tuple[str, str], Callable[[dict], str]] = {
    ("README.md", "hpa-watch"): hpa_watch,
    ("README.md", "locust-summary"): locust_summary,
    ("README.md", "capacity"): lambda m: cm.capacity_table(),
    ("README.md", "measured-demos"): measured_demos,
    ("README.md", "node-costs"): node_costs,
    ("docs/configuration.md", "scale-down"): scale_down,
    ("docs/performance.md", "benchmark"): benchmark,
    ("docs/performance.md", "memory-profile"): memory_profile,
    ("docs/performance.md", "demo-rate"): demo_rate,
    ("docs/performance.md", "autoscalers"): autoscalers,
    ("docs/api.md", "overload"): overload,
    ("docs/operations.md", "max-in-flight"): sizing,
    ("docs/operations.md", "rollout"): rollout,
    ("docs/operations.md", "nodes"): nodes,
}


def charts(m: dict) -> dict[str, tuple[Callable[..., Figure], tuple]]:
    work = cm.repo_kit()[1]
    drawn = {"demo-timeline.svg": (cm.demo_chart, (work,)), "capacity.svg": (cm.capacity_chart, (work,)),
             "latency.svg": (latency_chart, (m,))}
    for (swarm, kind), path in DEMOS.items():
        if t := timeline(swarm, kind):
            drawn[path.with_suffix(".svg").name] = (rec.measured_chart, (t,))
    return drawn


def render(block: Callable[[dict], str], m: dict) -> str:
    """A block, or what to run where its data is missing."""
    try:
        return block(m).strip()
    except (KeyError, TypeError) as missing:
        return f"*Not measured yet ({missing}): see tests/tools/README.md.*"


def replace_marked(content: str, name: str, text: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    head, rest = content.split(start, 1)
    return f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}"


def stale(write: bool = False) -> list[str]:
    """What is not what the data says now: each block and chart by name. With `write`, rewrite them."""
    m, found, pages = measured(), [], {}
    for (page, name), block in BLOCKS.items():
        text = pages.setdefault(page, (ROOT / page).read_text())
        pages[page] = replace_marked(text, name, render(block, m))
        if pages[page] != text:
            found.append(f"{page}#{name}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (draw, args) in charts(m).items():
            drawn = cm.draw_svg(Path(tmp) / name, draw, *args).read_bytes()
            target = DOCS / name
            if not target.exists() or target.read_bytes() != drawn:
                found.append(f"docs/{name}")
                if write:
                    target.write_bytes(drawn)
    if write:
        for page, text in pages.items():
            (ROOT / page).write_text(text)
    return found


def marked_names(text: str) -> list[str]:
    return re.findall(r"<!-- ([\w-]+):start -->", text)


if __name__ == "__main__":
    check = sys.argv[1:] == ["--check"]
    changed = stale(write=not check)
    print("\n".join(f"{'stale' if check else 'rewrote'}: {name}" for name in changed) or "all current")
    sys.exit(1 if check and changed else 0)
