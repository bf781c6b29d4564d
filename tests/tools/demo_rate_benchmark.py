"""CPU per request as the HPA reads it: the real image under the project's locust swarm.

Run from the repository root (Linux; docker or podman, or the engine CONTAINER_ENGINE names):

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \
        python tests/tools/demo_rate_benchmark.py [--users 60,150,...] [--window 30] [--no-write]

tests/tools/benchmark.py measures CPU per request at saturation (DELAY_SECONDS=0, wrk, thousands of
requests per pass of the event loop). The HPA never sees that regime: in the README's demo each
pod gets a few dozen requests per second, each sleeping 5 s, so almost every request wakes the
loop on its own and costs several times more. This benchmark measures that regime the way the
kubelet does: it builds `Dockerfile`, starts one container with deployment.yaml's limits and env
(DELAY_SECONDS at its default), and for each swarm size runs `locustfile.py` headless and reads the container's cumulative CPU from its cgroup
(`cpuacct.usage` on cgroup v1, `cpu.stat` usage_usec on v2: what cAdvisor reports and
metrics-server turns into the pod's CPU) over a window once the swarm is steady, and the requests
answered in that window from the service's own `http_requests_total`. Idle CPU is read the same
way before the first swarm. The container runs on core 0 and locust on core 1, as in the other
benchmarks. The points go to tests/tools/measured.json ("demo_rate"), which the model
(cluster_model.py) uses as the pod's CPU against its request rate.
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

import figures
import swarm
from benchmark import CLIENT_CPU, free_port, machine
from overload_benchmark import engine, pod_spec, run, start_pod

ROOT = Path(__file__).resolve().parents[2]
MEASURED = Path(__file__).resolve().parent / "measured.json"
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
    """The service's own count of answered requests, from its metrics port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    total = sum(int(float(line.rsplit(" ", 1)[1])) for line in conn.getresponse().read().decode().splitlines()
                if line.startswith("http_requests_total{"))
    conn.close()
    return total


def window(cgroup: CpuCgroup, port: int, seconds: float) -> tuple[float, float]:
    """(millicores, requests/s) over `seconds`."""
    cpu0, n0, t0 = cgroup.seconds(), requests_answered(port), time.monotonic()
    time.sleep(seconds)
    cpu1, n1, t1 = cgroup.seconds(), requests_answered(port), time.monotonic()
    # The second /metrics request is in n1 only if it ended before the count: it never is.
    return (cpu1 - cpu0) / (t1 - t0) * 1000, (n1 - n0) / (t1 - t0)


def point(users: int, cgroup: CpuCgroup, port: int, metrics_port: int, seconds: float, workdir: Path) -> dict:
    """One swarm size: ramp, settle one full request cycle, then the measured window."""
    settle = users / SPAWN_RATE + 8
    stats = workdir / f"locust-{users}"
    locust = subprocess.Popen(
        ["taskset", "-c", CLIENT_CPU, *swarm.command(f"http://127.0.0.1:{port}", users, SPAWN_RATE, stats,
                                                     int(settle + seconds + 5))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    # uv may take a few seconds to start locust: the ramp begins with its first request.
    before, deadline = requests_answered(metrics_port), time.monotonic() + 60
    while requests_answered(metrics_port) == before:
        if locust.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"locust sent nothing:\n{locust.communicate()[1][-3000:]}")
        time.sleep(0.2)
    time.sleep(settle)
    millicores, rate = window(cgroup, metrics_port, seconds)
    _, err = locust.communicate(timeout=120)
    if locust.returncode not in (0, 1):
        sys.exit(f"locust failed ({locust.returncode}):\n{err[-3000:]}")
    results = swarm.results(stats)
    return {
        "users": users,
        "requests_per_s": round(rate, 1),
        "cpu_millicores": round(millicores, 1),
        "cpu_ms_per_request": round(millicores / rate, 3),
        "locust_requests": results.requests,
        "locust_failures": results.failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", default=",".join(map(str, USERS)))
    parser.add_argument("--window", type=float, default=30, help="seconds measured per swarm size")
    parser.add_argument("--idle", type=float, default=20, help="seconds of idle CPU measured first")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    os.sched_setaffinity(0, {int(CLIENT_CPU)})  # this script and locust; the container on SERVER_CPU
    spec, port, metrics_port = pod_spec(), free_port(), free_port()
    print(f"== {engine()} build -> {TAG}", file=sys.stderr)
    run("build", "--network", "host", "-t", TAG, str(ROOT))
    name = f"math-service-demo-rate-{os.getpid()}"
    env = {**spec["env"], "PORT": str(port), "METRICS_PORT": str(metrics_port)}  # DELAY_SECONDS: the image's default
    points = []
    try:
        cgroup = CpuCgroup(start_pod(name, spec, env, TAG))
        time.sleep(5)
        idle_m, _ = window(cgroup, metrics_port, args.idle)
        print(f"   idle: {idle_m:.2f} millicores", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="demo-rate-") as tmp:
            for users in (int(u) for u in args.users.split(",") if u):
                points.append(point(users, cgroup, port, metrics_port, args.window, Path(tmp)))
                print(f"   {json.dumps(points[-1])}", file=sys.stderr)
                time.sleep(8)  # the last answers of this swarm, outside the next window
    finally:
        run("rm", "-f", name, check=False)

    demo_rate = {"idle_cpu_millicores": round(idle_m, 2), "points": points}
    print(json.dumps(demo_rate, indent=1))
    failed = any(p["locust_failures"] for p in points)
    if not failed and not args.no_write:
        measured = json.loads(MEASURED.read_text())
        measured["demo_rate"] = {
            "what": "the container's CPU (cgroup, as the kubelet reports it) against requests/s "
            "from the project's locustfile at DELAY_SECONDS' default: what the HPA reads",
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "command": "uv run --with-requirements service.py --with-requirements "
            "tests/requirements.txt python tests/tools/demo_rate_benchmark.py",
            "engine": engine(),
            "cpus": spec["cpus"],
            "window_s": args.window,
            **demo_rate,
        }
        MEASURED.write_text(json.dumps(measured, indent=2) + "\n")
        figures.stale(write=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
