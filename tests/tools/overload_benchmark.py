"""Overload benchmark: the real image, run with deployment.yaml's limits, under bursts of requests.

Run from the repository root (Linux; docker, or podman with CONTAINER_ENGINE=podman):

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \
        python tests/tools/overload_benchmark.py [--ladder 1000,5000,...] [--no-write]

It builds `Dockerfile` once, then for every step of the ladder starts a fresh container with
`--memory`/`--cpus` from deployment.yaml's limits, its env (MAX_IN_FLIGHT), DELAY_SECONDS=5,
the open-file limits containerd gives a pod on an EKS AL2023 node, and host networking, and
opens that many requests at once, one connection each, from 127.0.0.2-9 (one source address
runs out of ephemeral ports near 28k). A step passes with the container alive and not
OOM-killed, 0 socket errors, every answer a 200 with the right sum or a JSON 503 with
Retry-After, peak working set (cgroup usage - inactive_file, as the kubelet counts it) at most
85 % of the limit, and exit 0 after SIGTERM. Bytes per request in flight come from the slope of
peak working set against peak in flight over the steps below the cap. Every step up to the first
burst larger than the memory limit holds (idle + slope) must pass; larger ones are reported as
they are (one core and the kernel's listen queue, not memory, bound them). The figures go to
tests/tools/measured.json ("overload"), which tests/test_cluster.py checks deployment.yaml against.
`--app floor` runs tests/tools/floor_app.py in the same image instead (no cap: keep to 10,000), for the
bare-ASGI floor's bytes per request; `--context DIR` builds another tree (e.g. an older service.py).
"""

import argparse
import datetime
import functools
import http.client
import json
import os
import resource
import selectors
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import cluster_model as cm
import figures
from benchmark import (
    BODY, CLIENT_CPU, SERVER_CPU, Request, drive, free_port, machine, raise_fd_limit, status_line,
)

ROOT = Path(__file__).resolve().parents[2]
MEASURED = Path(__file__).resolve().parent / "measured.json"
TAG = "localhost/math-service-overload:latest"
LADDER = (1_000, 5_000, 10_000, 15_000, 20_000, 30_000)
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
PER_CLIENT = 8_000  # connections per client process, below its open-file limit
DELAY_SECONDS = 5
MAX_SHARE = 0.85  # of the memory limit, at the peak of any step
# containerd's base runtime spec on EKS AL2023 nodes (awslabs/amazon-eks-ami,
# nodeadm/internal/containerd/base-runtime-spec.json): RLIMIT_NOFILE soft 65536, hard 1048576.
NOFILE = (65536, 1048576)
# The image runs service.py; the floor is mounted into it and run with the same Python and uvicorn.
COMMAND = {"service": [], "floor": ["python", "floor_app.py"]}
FLOOR_MOUNT = {"service": [], "floor": ["-v", f"{Path(__file__).parent / 'floor_app.py'}:/app/floor_app.py:ro"]}


# --- Container engine ---------------------------------------------------------------------------


@functools.cache
def engine() -> str:
    """CONTAINER_ENGINE, else the first of docker and podman that answers `info`."""
    if name := os.environ.get("CONTAINER_ENGINE"):
        return name
    for name in ("docker", "podman"):
        if shutil.which(name) and subprocess.run([name, "info"], capture_output=True).returncode == 0:
            return name
    sys.exit("no container engine: neither `docker info` nor `podman info` works")


def run(*args: str, check: bool = True) -> str:
    proc = subprocess.run([engine(), *args], capture_output=True, text=True)
    if check and proc.returncode:
        sys.exit(f"{engine()} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip()


def inspect(name: str, field: str) -> str:
    return run("inspect", "--format", "{{" + field + "}}", name)


# --- The pod's limits, from deployment.yaml -------------------------------------------------------


def ulimit() -> list[str]:
    """EKS's open-file limits, where this machine allows them; else the engine's default (the
    service logs the limit it got, and the report shows it)."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < NOFILE[1]:
        return []
    return ["--ulimit", "nofile={}:{}".format(*NOFILE)]


def pod_spec() -> dict:
    container = cm.app_container(cm.manifest("deployment.yaml"))
    limits = container["resources"]["limits"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    return {
        "memory_bytes": int(cm.memory_mib(limits["memory"]) * 2**20),
        "cpus": cm.cpu_millicores(limits["cpu"]) / 1000,
        "env": env,
        "max_in_flight": int(env["MAX_IN_FLIGHT"]),
    }


# --- Memory and in-flight sampling ----------------------------------------------------------------


class Cgroup:
    """The container's memory cgroup (v1 or v2): the working set as the kubelet computes it."""

    def __init__(self, pid: int) -> None:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        v1 = [line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"]
        if v1:
            self.dir = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/")
            self.usage, self.inactive = "memory.usage_in_bytes", "total_inactive_file"
        else:
            self.dir = Path("/sys/fs/cgroup") / lines[0].split(":", 2)[2].lstrip("/")
            self.usage, self.inactive = "memory.current", "inactive_file"

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer ended in this cgroup (v1: memory.oom_control)."""
        name = "memory.oom_control" if self.usage == "memory.usage_in_bytes" else "memory.events"
        for line in (self.dir / name).read_text().splitlines():
            key, value = line.split()
            if key == "oom_kill":
                return int(value)
        return 0

    def working_set(self) -> int:
        usage = int((self.dir / self.usage).read_text())
        for line in (self.dir / "memory.stat").read_text().splitlines():
            key, value = line.split()
            if key == self.inactive:
                return usage - int(value)
        return usage


class Sampler(threading.Thread):
    """Working set every 20 ms; in-flight gauge and open fds every 250 ms (a keep-alive
    connection opened before the burst, to the metrics port, which the cap never sees)."""

    def __init__(self, cgroup: Cgroup, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.cgroup, self.pid = cgroup, pid
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.connect()
        self.stop = threading.Event()
        self.peak_ws = self.peak_in_flight = self.peak_fds = self.oom_kills = 0

    def in_flight(self) -> int:
        self.conn.request("GET", "/metrics")
        for line in self.conn.getresponse().read().decode().splitlines():
            if line.startswith("http_requests_in_flight "):
                return int(float(line.split()[1]))
        return 0

    def run(self) -> None:
        next_gauge = 0.0
        while not self.stop.is_set():
            try:
                self.peak_ws = max(self.peak_ws, self.cgroup.working_set())
                self.oom_kills = self.cgroup.oom_kills()
            except OSError:
                return  # the container is gone, and its cgroup with it
            if time.monotonic() >= next_gauge:
                next_gauge = time.monotonic() + 0.25
                try:
                    self.peak_fds = max(self.peak_fds, len(os.listdir(f"/proc/{self.pid}/fd")))
                except OSError:
                    return
                try:
                    self.peak_in_flight = max(self.peak_in_flight, self.in_flight())
                except (OSError, http.client.HTTPException):
                    self.conn.close()  # reconnects on the next request
            time.sleep(0.02)


# --- Client (runs as its own processes: one process's open-file limit is not enough) -------------


class Answer(Request):
    """benchmark.py's request, where a JSON 503 with Retry-After is an answer too."""

    def verdict(self, head: bytes, body: bytes, elapsed: float) -> tuple[str, float] | str:
        status = head[9:12].decode(errors="replace")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if status == "200" and answer == {"result": 15.0}:
            return ("200", elapsed)
        if status == "503" and b"\r\nretry-after: " in head.lower() and "detail" in (answer or {}):
            return ("503", elapsed)
        return status_line(head)


def client(port: int, count: int, first_source: int, timeout: float = 180) -> dict:
    """Wait for "go" on stdin, open every connection in one tight loop, then epoll."""
    raise_fd_limit()
    payload = (
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
    ).encode() + BODY
    print("ready", flush=True)
    sys.stdin.readline()
    selector = selectors.DefaultSelector()
    requests = []
    for i in range(count):
        request = Answer(port, payload, SOURCES[(first_source + i) % len(SOURCES)])
        requests.append(request)
        events = selectors.EVENT_READ if request.try_send() else selectors.EVENT_WRITE
        selector.register(request.sock, events, request)
    drive(selector, requests, timeout)
    results = [r.result for r in requests]
    latencies = {s: [r[1] for r in results if isinstance(r, tuple) and r[0] == s] for s in ("200", "503")}
    errors = [r for r in results if isinstance(r, str)]
    return {
        "latencies": latencies,
        "error_kinds": {kind: errors.count(kind) for kind in set(errors)},
    }


def burst(port: int, n: int) -> dict:
    """n requests at once, split over client processes; counts and latencies."""
    shares = [PER_CLIENT] * (n // PER_CLIENT) + ([n % PER_CLIENT] if n % PER_CLIENT else [])
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "_client", str(port), str(share), str(i)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for i, share in enumerate(shares)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [json.loads(proc.communicate()[0]) for proc in procs]
    latencies = {s: sorted(t for r in results for t in r["latencies"][s]) for s in ("200", "503")}
    errors: dict[str, int] = {}
    for r in results:
        for kind, count in r["error_kinds"].items():
            errors[kind] = errors.get(kind, 0) + count

    def pct(values: list[float], p: float) -> float | None:
        return round(values[min(len(values) - 1, int(p * len(values)))], 3) if values else None

    return {
        "ok_200": len(latencies["200"]),
        "json_503": len(latencies["503"]),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "p50_s_200": pct(latencies["200"], 0.5),
        "p99_s_200": pct(latencies["200"], 0.99),
        "p50_s_503": pct(latencies["503"], 0.5),
        "p99_s_503": pct(latencies["503"], 0.99),
    }


# --- One step -------------------------------------------------------------------------------------


def tcp_counters() -> dict[str, int]:
    """Kernel counters (host network): connections dropped while the accept queue was full, and
    resets for handshakes that completed after the kernel had dropped them (SyncookiesFailed)."""
    names, values = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()[:2]]
    counters = dict(zip(names, values))
    return {key: int(counters[key]) for key in ("ListenOverflows", "SyncookiesFailed")}


def healthz(port: int, timeout: float = 2) -> int:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except OSError:
        return 0


def start_pod(name: str, spec: dict, env: dict[str, str], image: str,
              command: Sequence[str] = (), mounts: Sequence[str] = ()) -> int:
    """Run the image as deployment.yaml runs it (its memory and CPU limits, EKS's open-file limits,
    env with PORT) on the host network; its PID, once /healthz answers. The caller removes it."""
    run(
        "run", "-d", "--name", name, "--network", "host",
        "--memory", str(spec["memory_bytes"]), "--memory-swap", str(spec["memory_bytes"]),
        # As benchmark.py: the server on its own core, so the clients do not take its CPU.
        "--cpus", f"{spec['cpus']:g}", "--cpuset-cpus", SERVER_CPU, *ulimit(),
        *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], *mounts, image, *command,
    )
    deadline = time.monotonic() + 30
    while healthz(int(env["PORT"])) != 200:
        if time.monotonic() > deadline:
            sys.exit(f"{name} not ready in 30 s:\n{run('logs', name, check=False)}")
        time.sleep(0.1)
    return int(inspect(name, ".State.Pid"))


def step(n: int, spec: dict, image: str, app: str = "service") -> dict:
    port, metrics_port = free_port(), free_port()
    name = f"math-service-overload-{os.getpid()}-{n}"
    env = {**spec["env"], "PORT": str(port), "METRICS_PORT": str(metrics_port), "DELAY_SECONDS": str(DELAY_SECONDS)}
    try:
        pid = start_pod(name, spec, env, image, COMMAND[app], FLOOR_MOUNT[app])
        cgroup = Cgroup(pid)
        time.sleep(2)
        idle = cgroup.working_set()
        sampler = Sampler(cgroup, pid, metrics_port)
        sampler.start()
        before = tcp_counters()
        result = burst(port, n)
        kernel = {k: v - before[k] for k, v in tcp_counters().items()}
        time.sleep(1)
        sampler.stop.set()
        sampler.join()
        # podman 4.3 on cgroup v1 does not always set OOMKilled: the cgroup's counter is sure.
        oom_killed = inspect(name, ".State.OOMKilled") == "true" or sampler.oom_kills > 0
        alive = inspect(name, ".State.Running") == "true" and healthz(port, timeout=10) == 200
        lines = run("logs", name, check=False).splitlines()
        logs = [json.loads(line) for line in lines if line.startswith("{")]
        start_line = next((e for e in logs if e["event"] == "admission cap"), {})
        # How long the service itself took over each 503 (the rest is the kernel's accept queue).
        server_503 = sorted(e["duration_ms"] for e in logs if e.get("status") == 503)
        run("stop", "-t", "30", name, check=False)
        exit_code = int(inspect(name, ".State.ExitCode"))
    finally:
        run("rm", "-f", name, check=False)
    limit = spec["memory_bytes"]
    result |= {
        "requests": n,
        "idle_ws_mib": round(idle / 2**20, 1),
        "peak_ws_mib": round(sampler.peak_ws / 2**20, 1),
        "peak_ws_share": round(sampler.peak_ws / limit, 3),
        "peak_in_flight": sampler.peak_in_flight,
        "peak_open_fds": sampler.peak_fds,
        "listen_overflows": kernel["ListenOverflows"],
        "syncookies_failed": kernel["SyncookiesFailed"],
        "oom_killed": oom_killed,
        "alive_after": alive,
        "exit_code": exit_code,
        "server_ms_503_max": server_503[-1] if server_503 else None,
        "open_files": start_line.get("open_files"),
        "cap_binding": start_line.get("binding"),
    }
    result["passed"] = (
        not oom_killed and alive and exit_code == 0 and result["errors"] == 0
        and result["ok_200"] + result["json_503"] == n and result["peak_ws_share"] <= MAX_SHARE
    )
    return result


def slope(steps: list[dict], cap: int) -> dict:
    """Least squares of peak working set on peak in flight, over the steps below the cap."""
    points = [(0, s["idle_ws_mib"]) for s in steps] + [  # the floor has no in-flight gauge
        (s["peak_in_flight"] or s["requests"], s["peak_ws_mib"]) for s in steps if s["requests"] <= cap
    ]
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if not sxx:
        return {"bytes_per_in_flight": None, "intercept_mib": None}
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return {"bytes_per_in_flight": round(b * 2**20), "intercept_mib": round(my - b * mx, 1)}


def required(steps: list[dict], holds: float | None) -> list[dict]:
    """The steps that must lose nothing: up to the first burst larger than the memory limit holds
    (the cap's job). Larger ones show what one core and the kernel's listen queue do with it."""
    beyond = [i for i, s in enumerate(steps) if holds is not None and s["requests"] > holds]
    return steps[: beyond[0] + 1] if beyond else steps


def table(steps: list[dict], limit_mib: float) -> str:
    lines = [
        f"| at once | 200 | JSON 503 | socket errors | peak in flight | peak working set (MiB) "
        f"| of {limit_mib:g} MiB | peak fds | 503 p99 (s) | 200 p99 (s) | OOM | exit | |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s['requests']:,} | {s['ok_200']:,} | {s['json_503']:,} | {s['errors']} "
            f"| {s['peak_in_flight']:,} | {s['peak_ws_mib']:g} | {s['peak_ws_share']:.0%} "
            f"| {s['peak_open_fds']:,} | {s['p99_s_503']} | {s['p99_s_200']} "
            f"| {'yes' if s['oom_killed'] else 'no'} | {s['exit_code']} "
            f"| {'ok' if s['passed'] else 'FAILED'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ladder", default=",".join(map(str, LADDER)))
    parser.add_argument("--context", default=str(ROOT), help="build context holding the Dockerfile")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--app", choices=COMMAND, default="service",
        help="floor: tests/tools/floor_app.py (bare ASGI, no cap) in the same image, for its bytes per request",
    )
    args = parser.parse_args()
    ladder = [int(n) for n in args.ladder.split(",") if n]

    raise_fd_limit()
    os.sched_setaffinity(0, {int(CLIENT_CPU)})  # inherited by the client processes
    spec = pod_spec()
    print(f"== {engine()} build {args.context} -> {TAG}", file=sys.stderr)
    run("build", "--network", "host", "-t", TAG, args.context)
    steps = []
    for n in ladder:
        steps.append(step(n, spec, TAG, args.app))
        print(f"   {n:,} at once: {json.dumps(steps[-1])}", file=sys.stderr)
    limit_mib = spec["memory_bytes"] / 2**20
    print(table(steps, limit_mib))
    fit = slope(steps, spec["max_in_flight"])
    print(f"slope: {fit['bytes_per_in_flight']} bytes per request in flight, "
          f"intercept {fit['intercept_mib']} MiB (MAX_IN_FLIGHT={spec['max_in_flight']})")
    idle_mib = max(s["idle_ws_mib"] for s in steps)
    holds = None  # requests in flight at which idle + the slope reach the memory limit
    if fit["bytes_per_in_flight"]:
        holds = (limit_mib - max(idle_mib, fit["intercept_mib"])) * 2**20 / fit["bytes_per_in_flight"]
    must = required(steps, holds)
    passed = all(s["passed"] for s in must) and must[-1]["requests"] > (holds or 0)
    print(f"the memory limit holds about {holds or 0:,.0f} in flight; every step up to "
          f"{must[-1]['requests']:,} at once {'passed' if passed else 'must pass, and did not'}")
    if passed and not args.no_write and args.context == str(ROOT) and args.app == "service":
        measured = json.loads(MEASURED.read_text())
        measured["overload"] = {
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "command": "uv run --with-requirements service.py --with-requirements "
            "tests/requirements.txt python tests/tools/overload_benchmark.py",
            "engine": engine(),
            "memory_limit_mib": limit_mib,
            "cpus": spec["cpus"],
            "max_in_flight": spec["max_in_flight"],
            "open_files": steps[0]["open_files"],
            "delay_seconds": DELAY_SECONDS,
            "idle_ws_mib": idle_mib,
            **fit,
            "holds_in_flight": round(holds),
            "steps": steps,
        }
        MEASURED.write_text(json.dumps(measured, indent=2) + "\n")
        figures.stale(write=True)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_client"]:
        print(json.dumps(client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
    else:
        main()
