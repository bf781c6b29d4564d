"""Rolling replacement under a locust swarm, behind a TCP load balancer: is any request lost?

Run from the repository root (Linux; needs `haproxy`, e.g. `apt-get install haproxy`):

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \
        python tests/tools/rollout_benchmark.py [--replacements 30] [--prestop SECONDS]

What stands in for what, all on 127.0.0.1:
  - the Classic ELB in TCP mode and kube-proxy: HAProxy in `mode tcp`. Taking a pod out of the
    Service's endpoints is `set server be/sN state maint` on HAProxy's runtime API: its open
    connections stay, new ones go to the other instances, as conntrack keeps an established
    flow to a pod after its endpoint is removed;
  - the pods: 3 processes of service.py with DELAY_SECONDS=2;
  - the load: the project's locustfile.py, headless, 300 users;
  - one replacement, as deployment.yaml's RollingUpdate (maxSurge 1, maxUnavailable 0) does it:
    start a new instance; once its /readyz answers 200, put it in rotation; then take the oldest
    instance out of rotation and, at that same moment, start its termination sequence as
    deployment.yaml gives it: the preStop sleep, then SIGTERM, then SIGKILL once
    terminationGracePeriodSeconds have passed since the start (the grace period covers preStop).
    `--prestop 0` is a pod without the hook, or `docker stop`.
The Deployment controller does not count terminating pods against maxSurge (KEP-3973 proposes
to), so it starts the next new pod while the old one is still in its preStop: replacements
overlap here too, one starting every --interval seconds (default 4: a new pod passes its startup
probe, 1 s period, and its first readiness probe within a few seconds), so several old instances
may be draining at once.

It reports replacements, requests and failures (from locust's CSV stats) with every failure
message and how each old instance ended; `--write NAME` keeps the run in measured.json, named for
the shutdown it measured, for docs/operations.md. It exits 1 if any request failed. Without haproxy it says so and stops (exit 2). It installs nothing.
"""

import argparse
import datetime
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

import figures
import swarm
from benchmark import free_port

ROOT = Path(__file__).resolve().parents[2]
MEASURED = Path(__file__).resolve().parent / "measured.json"
INSTANCES = 3
USERS = 300
DELAY_SECONDS = "2"
PROCESSES: list[subprocess.Popen] = []  # everything started, killed at the end if still running


def start(args: list[str], **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(args, **kwargs)
    PROCESSES.append(proc)
    return proc


def termination_sequence(deployment: dict) -> tuple[float, float]:
    """(preStop sleep, termination grace period) in seconds, from a Deployment manifest."""
    pod = deployment["spec"]["template"]["spec"]
    prestop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    return float(prestop), float(pod["terminationGracePeriodSeconds"])


def get_status(port: int, path: str) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None


class Instance:
    """One 'pod': service.py as its own process, in one HAProxy server slot."""

    def __init__(self, service: Path, workdir: Path, slot: int) -> None:
        self.slot, self.port = slot, free_port()
        log = (workdir / f"instance-{slot}.log").open("w")
        env = {**os.environ, "PORT": str(self.port), "METRICS_PORT": str(free_port()), "DELAY_SECONDS": DELAY_SECONDS}
        self.proc = start([sys.executable, str(service)], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
        self.log, self.ended, self.sigterm_at = Path(log.name), "", ""

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while get_status(self.port, "/readyz") != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"instance s{self.slot} never became ready (exit {self.proc.poll()})")
            time.sleep(0.05)

    def terminate(self, prestop: float, grace: float) -> None:
        """What the kubelet does to a pod being deleted: preStop, SIGTERM, SIGKILL at grace."""
        start = time.monotonic()
        time.sleep(prestop)
        self.sigterm_at = datetime.datetime.now(datetime.UTC).isoformat()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(max(0.0, start + grace - time.monotonic()))
            self.ended = f"exit {code}"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.ended = "SIGKILL at the grace period"

    def answered_after_sigterm(self) -> int:
        """Requests this instance answered after its SIGTERM, from its JSON access log."""
        lines = (json.loads(line) for line in self.log.read_text().splitlines())
        return sum(1 for e in lines if e["event"] == "request" and e["timestamp"] > self.sigterm_at)


class HAProxy:
    """HAProxy in TCP mode with one server slot per instance ever started, all in maint at first."""

    def __init__(self, workdir: Path, slots: int) -> None:
        self.port, self.api = free_port(), workdir / "haproxy.sock"
        servers = "\n".join(f"  server s{i} 127.0.0.1:1 disabled" for i in range(slots))
        config = workdir / "haproxy.cfg"
        config.write_text(f"""
global
  maxconn 4096
  stats socket {self.api} mode 600 level admin
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{self.port}
  default_backend be
backend be
  balance roundrobin
{servers}
""")
        self.proc = start(["haproxy", "-db", "-f", str(config)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.api.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"haproxy did not start (exit {self.proc.poll()})")
            time.sleep(0.05)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.api))
            s.sendall(line.encode() + b"\n")
            return s.makefile().read().strip()

    def ready(self, instance: Instance) -> None:
        self.command(f"set server be/s{instance.slot} addr 127.0.0.1 port {instance.port}")
        if answer := self.command(f"set server be/s{instance.slot} state ready"):
            sys.exit(f"haproxy: {answer}")

    def maint(self, instance: Instance) -> None:
        if answer := self.command(f"set server be/s{instance.slot} state maint"):
            sys.exit(f"haproxy: {answer}")



def main() -> int:
    manifest_prestop, grace = termination_sequence(
        yaml.safe_load((ROOT / "deployment.yaml").read_text()))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replacements", type=int, default=30)
    parser.add_argument("--prestop", type=float, default=manifest_prestop,
                        help=f"preStop sleep, s (default: deployment.yaml's, {manifest_prestop:g})")
    parser.add_argument("--interval", type=float, default=4.0,
                        help="seconds from one replacement's start to the next's (default 4)")
    parser.add_argument("--service", type=Path, default=ROOT / "service.py",
                        help="the service.py to run (default: this repository's)")
    parser.add_argument("--write", metavar="SHUTDOWN",
                        help="keep the run in measured.json (and docs/operations.md) as SHUTDOWN's")
    args = parser.parse_args()
    if not shutil.which("haproxy"):
        print("rollout benchmark: haproxy is not installed (Debian/Ubuntu: apt-get install "
              "haproxy); nothing was run.")
        return 2

    print(f"{INSTANCES} instances of {args.service} (DELAY_SECONDS={DELAY_SECONDS}) behind HAProxy "
          f"(mode tcp), {USERS} locust users; {args.replacements} replacements, one every "
          f"{args.interval:g} s; termination: preStop {args.prestop:g} s, SIGTERM, SIGKILL at "
          f"{grace:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="rollout-") as tmp:
        try:
            requests, failures, messages, endings, after = run(args, grace, Path(tmp))
        finally:  # nothing outlives the run, whatever stopped it
            for proc in PROCESSES:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    print(f"replacements: {args.replacements}")
    print(f"requests: {requests}")
    print(f"failures: {failures}")
    for message in messages:
        print(f"  {message}")
    print("old instances: " + ", ".join(f"{count} x {how}" for how, count in endings.items())
          + f"; requests they answered after their SIGTERM: {after}")
    if args.write:
        measured = json.loads(MEASURED.read_text())
        measured.setdefault("rollout", []).append({
            "shutdown": args.write, "prestop_s": args.prestop, "replacements": args.replacements,
            "requests": requests, "failures": failures, "date": datetime.date.today().isoformat()})
        MEASURED.write_text(json.dumps(measured, indent=2) + "\n")
        figures.stale(write=True)
    return 1 if failures or messages else 0


def run(args: argparse.Namespace, grace: float, workdir: Path
        ) -> tuple[int, int, list[str], dict[str, int], int]:
    haproxy = HAProxy(workdir, INSTANCES + args.replacements)
    serving = [Instance(args.service, workdir, slot) for slot in range(INSTANCES)]
    for instance in serving:
        instance.wait_ready()
        haproxy.ready(instance)
    swarm.install()
    locust = start(swarm.command(f"http://127.0.0.1:{haproxy.port}", USERS, 100, workdir / "locust"),
                   cwd=workdir, stdout=subprocess.DEVNULL, stderr=(workdir / "locust.log").open("w"))
    time.sleep(10)  # the swarm spawns (3 s) and every user's connection is open

    old: list[tuple[Instance, threading.Thread]] = []
    start_time = time.monotonic()
    for n in range(args.replacements):
        new = Instance(args.service, workdir, INSTANCES + n)
        new.wait_ready()
        haproxy.ready(new)
        leaving = serving.pop(0)
        haproxy.maint(leaving)  # the endpoint is removed as the termination starts
        ending = threading.Thread(target=leaving.terminate, args=(args.prestop, grace))
        ending.start()
        old.append((leaving, ending))
        serving.append(new)
        time.sleep(max(0.0, start_time + (n + 1) * args.interval - time.monotonic()))
    for _, ending in old:
        ending.join()
    time.sleep(3)  # the users last pinned to an old instance make their next request

    locust.send_signal(signal.SIGTERM)
    try:
        locust.wait(60)
    except subprocess.TimeoutExpired:
        sys.exit("locust did not stop within 60 s of SIGTERM")
    if not (workdir / "locust_stats.csv").exists():
        sys.exit("locust wrote no stats:\n" + (workdir / "locust.log").read_text()[-3000:])
    endings: dict[str, int] = {}
    for instance, _ in old:
        endings[instance.ended] = endings.get(instance.ended, 0) + 1
    after = sum(instance.answered_after_sigterm() for instance, _ in old)
    results = swarm.results(workdir / "locust")
    return results.requests, results.failures, results.messages, endings, after


if __name__ == "__main__":
    sys.exit(main())
