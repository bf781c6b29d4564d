"""CPU per request as the HPA reads it: the real image under the project's locust swarm.

Run from the repository root (Linux; docker or podman, or the engine CONTAINER_ENGINE names):

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \
        python tests/demo_rate_benchmark.py [--users 60,150,...] [--window 30] [--no-write]

tests/benchmark.py measures CPU per request at saturation (DELAY_SECONDS=0, wrk, thousands of
requests per pass of the event loop). The HPA never sees that regime: in the README's demo each
pod gets a few dozen requests per second, each sleeping 5 s, so almost every request wakes the
loop on its own and costs several times more. This benchmark measures that regime the way the
kubelet does: it builds `Dockerfile`, starts one container with deployment.yaml's limits and env
(DELAY_SECONDS at its default), and for each swarm size runs `locustfile.py` headless (locust as
tests/conftest.py pins it) and reads the container's cumulative CPU from its cgroup
(`cpuacct.usage` on cgroup v1, `cpu.stat` usage_usec on v2: what cAdvisor reports and
metrics-server turns into the pod's CPU) over a window once the swarm is steady, and the requests
answered in that window from the service's own `http_requests_total`. Idle CPU is read the same
way before the first swarm. The container runs on core 0 and locust on core 1, as in the other
benchmarks. The points go to tests/measured.json ("demo_rate"), which tests/cluster_model.py
uses as the pod's CPU against its request rate.
"""

import argparse
import datetime
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark import CLIENT_CPU, free_port, machine
from conftest import TOOLS
from overload_benchmark import engine, pod_spec, run, start_pod

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "tests" / "measured.json"
TAG = "localhost/math-service-demo-rate:latest"
# About 10, 25, 50, 100, 200 and 300 requests/s with the locustfile's 1-2 s think time and 5 s
# answers: a pod's share of the demo swarm on 1 to 15 pods, and the whole swarm on one.
USERS = (60, 150, 300, 600, 1_200, 1_800)
SPAWN_RATE = 100  # users per second: only the steady state after it is measured


class CpuCgroup:
    """The container's cumulative CPU, in seconds, from the cgroup cAdvisor reads."""

    def __init__(self, pid: int) -> None:
        lines = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
        v1 = [path for _, controllers, path in lines if "cpuacct" in controllers.split(",")]
        if v1:
            base = next(p for p in ("/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/cpu,cpuacct") if Path(p).exists())
            self.file, self.v2 = Path(base) / v1[0].lstrip("/") / "cpuacct.usage", False
        else:
            self.file, self.v2 = Path("/sys/fs/cgroup") / lines[0][2].lstrip("/") / "cpu.stat", True

    def seconds(self) -> float:
        text = self.file.read_text()
        if not self.v2:
            return int(text) / 1e9  # nanoseconds
        usec = next(line.split()[1] for line in text.splitlines() if line.startswith("usage_usec"))
        return int(usec) / 1e6


def requests_answered(port: int) -> int:
    """The service's own count of answered requests (every route but /metrics)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    total = 0
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith("http_requests_total{") and 'route="/metrics"' not in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    conn.close()
    return total


def window(cgroup: CpuCgroup, port: int, seconds: float) -> tuple[float, float]:
    """(millicores, requests/s) over `seconds`."""
    cpu0, n0, t0 = cgroup.seconds(), requests_answered(port), time.monotonic()
    time.sleep(seconds)
    cpu1, n1, t1 = cgroup.seconds(), requests_answered(port), time.monotonic()
    # The second /metrics request is in n1 only if it ended before the count: it never is.
    return (cpu1 - cpu0) / (t1 - t0) * 1000, (n1 - n0) / (t1 - t0)


def point(users: int, cgroup: CpuCgroup, port: int, seconds: float, workdir: Path) -> dict:
    """One swarm size: ramp, settle one full request cycle, then the measured window."""
    settle = users / SPAWN_RATE + 8
    stats = workdir / f"locust-{users}"
    locust = subprocess.Popen(
        ["taskset", "-c", CLIENT_CPU, "uvx", "--quiet", "--from", TOOLS["locust"], "locust",
         "-f", str(ROOT / "locustfile.py"), "--headless", "-u", str(users), "-r", str(SPAWN_RATE),
         "-t", f"{int(settle + seconds + 5)}s", "-H", f"http://127.0.0.1:{port}",
         "--json-file", str(stats), "--only-summary", "--loglevel", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    # uvx may take a few seconds to start locust: the ramp begins with its first request.
    before, deadline = requests_answered(port), time.monotonic() + 60
    while requests_answered(port) == before:
        if locust.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"locust sent nothing:\n{locust.communicate()[1][-3000:]}")
        time.sleep(0.2)
    time.sleep(settle)
    millicores, rate = window(cgroup, port, seconds)
    _, err = locust.communicate(timeout=120)
    entries = json.loads(stats.with_suffix(".json").read_text())
    failures = sum(e["num_failures"] for e in entries)
    if locust.returncode not in (0, 1) or not entries:
        sys.exit(f"locust failed ({locust.returncode}):\n{err[-3000:]}")
    return {
        "users": users,
        "requests_per_s": round(rate, 1),
        "cpu_millicores": round(millicores, 1),
        "cpu_ms_per_request": round(millicores / rate, 3),
        "locust_requests": sum(e["num_requests"] for e in entries),
        "locust_failures": failures,
    }


def table(demo_rate: dict) -> str:
    lines = [
        "| locust users | requests/s | container CPU | CPU per request | locust failures |",
        "|---:|---:|---:|---:|---:|",
        f"| idle | 0 | {demo_rate['idle_cpu_millicores']:.1f}m | | |",
    ]
    for p in demo_rate["points"]:
        lines.append(f"| {p['users']:,} | {p['requests_per_s']:g} | {p['cpu_millicores']:g}m "
                     f"| {p['cpu_ms_per_request']:.2f} ms | {p['locust_failures']} |")
    return "\n".join(lines)


def section(measured: dict) -> str:
    """docs/performance.md's demo-rate section: this benchmark's last run, and the metrics API's
    per-pod readings from a real cluster next to it when measured.json has them."""
    d = measured["demo_rate"]
    text = [f"Measured {d['date']} on {d['machine']}, {d['engine']}, `--cpus {d['cpus']:g}`:", "", table(d)]
    if cluster := measured.get("demo_rate_metrics_api"):
        text += [
            "",
            f"The metrics API on a {cluster['cluster']} ({cluster['date']}; {cluster['run']}), each "
            "pod at its own request rate:",
            "",
            "| requests/s | CPU (metrics API) | CPU per request |",
            "|---:|---:|---:|",
            *(f"| {p['requests_per_s']:g} | {p['cpu_millicores']:g}m "
              f"| {p['cpu_millicores'] / p['requests_per_s']:.2f} ms |" for p in cluster["pods"]),
        ]
    return "\n".join(text)


def write_section(measured: dict) -> None:
    from benchmark import replace_marked

    page = ROOT / "docs" / "performance.md"
    page.write_text(replace_marked(page.read_text(), "demo-rate", section(measured)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", default=",".join(map(str, USERS)))
    parser.add_argument("--window", type=float, default=30, help="seconds measured per swarm size")
    parser.add_argument("--idle", type=float, default=20, help="seconds of idle CPU measured first")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    os.sched_setaffinity(0, {int(CLIENT_CPU)})  # this script and locust; the container on SERVER_CPU
    spec, port = pod_spec(), free_port()
    print(f"== {engine()} build -> {TAG}", file=sys.stderr)
    run("build", "--network", "host", "-t", TAG, str(ROOT))
    name = f"math-service-demo-rate-{os.getpid()}"
    env = {**spec["env"], "PORT": str(port)}  # DELAY_SECONDS: the image's default, as in the pod
    points = []
    try:
        cgroup = CpuCgroup(start_pod(name, spec, env, TAG))
        time.sleep(5)
        idle_m, _ = window(cgroup, port, args.idle)
        print(f"   idle: {idle_m:.2f} millicores", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="demo-rate-") as tmp:
            for users in (int(u) for u in args.users.split(",") if u):
                points.append(point(users, cgroup, port, args.window, Path(tmp)))
                print(f"   {json.dumps(points[-1])}", file=sys.stderr)
                time.sleep(8)  # the last answers of this swarm, outside the next window
    finally:
        run("rm", "-f", name, check=False)

    demo_rate = {"idle_cpu_millicores": round(idle_m, 2), "points": points}
    print(table(demo_rate))
    failed = any(p["locust_failures"] for p in points)
    if not failed and not args.no_write:
        measured = json.loads(MEASURED.read_text())
        measured["demo_rate"] = {
            "what": "the container's CPU (cgroup, as the kubelet reports it) against requests/s "
            "from the project's locustfile at DELAY_SECONDS' default: what the HPA reads",
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "command": "uv run --with-requirements service.py --with-requirements "
            "tests/requirements.txt python tests/demo_rate_benchmark.py",
            "engine": engine(),
            "cpus": spec["cpus"],
            "window_s": args.window,
            **demo_rate,
        }
        MEASURED.write_text(json.dumps(measured, indent=2) + "\n")
        write_section(measured)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
