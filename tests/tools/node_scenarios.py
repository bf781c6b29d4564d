"""Nodes leaving the cluster under a swarm, reached through the Service's load balancer: a managed
node group upgrade as EKS documents it, a scale-in, and a node lost without warning.

Each run is recorded three ways: every request with the locustfile's own verdict (request_log.py);
every 2 s, the nodes and the pods on each; and, where the cluster can show it, which nodes the load
balancer sends new connections to. tests/test_e2e.py runs each scenario on the kit as shipped. Run
alone, with the manifests applied in kubectl's current namespace, it runs them for each health check
in CHOICES and keeps the comparison in tests/tools/measured.json ("nodes"), for docs/operations.md:

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \\
        python tests/tools/node_scenarios.py --host http://LB_ADDRESS

It acts on the cluster's machines through shell commands in the environment, each given the node's
name as $1 (the lab's are in .ci/run):
  E2E_NODE_STOP     terminates the node's instance, as EC2 does
  E2E_NODE_START    boots it again (or a new one by that name), able to run the app's image
  E2E_NODE_GROUP    the managed node group's nodes, space-separated (default: every node without
                    a control-plane role); the others are kept out of the way while a scenario runs
  E2E_SPARE_NODES   nodes E2E_NODE_START can boot as the upgrade's new ones (default: none)
  E2E_LB_BACKENDS   prints the load balancer's backends of NAMESPACE/SERVICE, one line per node:
                    NAME ADDRESS registered|deregistered(...) HEALTH ... (optional)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import cluster_model as cm
import swarm

DEPLOYMENT, SERVICE, SELECTOR = "math-service-deployment", "math-service-service", "app=math-service"
ELB = "service.beta.kubernetes.io/aws-load-balancer-"
EXCLUDE = "node.kubernetes.io/exclude-from-external-load-balancers"
REQUEST_LOG = Path(__file__).with_name("request_log.py")
SAMPLE_S = 2
# EKS's upgrade phase "cordons the node after every Pod is evicted and waits for 60 seconds", and
# fails a drain that takes 15 minutes (EKS user guide, managed-node-update-behavior).
EKS_WAIT_S, EKS_DRAIN_S = 60, 15 * 60
# Two shared cores carry three nodes, the swarm and locust: the rolling-restart test's swarm.
USERS, SPAWN_RATE = 300, 100
# Each scenario at the replica count where it shows most: the upgrade at 1, where the only pod has
# to move and a PodDisruptionBudget could hold it; the others at 2, where one pod survives.
REPLICAS = {"upgrade": 1, "scale-in": 2, "lost": 2}
# The kit's promise: a node that is gone takes no new connection from the load balancer after this.
DROPPED_WITHIN_S = 30


def kubectl(*args: str, timeout: float = 60, check: bool = True) -> str:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout, check=check).stdout


def kubectl_json(*args: str) -> dict:
    return json.loads(kubectl(*args, "-o", "json"))


def wait(check: Callable[[], object], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g} s: {what}")
        time.sleep(1)


def nodes_now() -> dict[str, dict]:
    return {n["metadata"]["name"]: {
        "ready": any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", [])),
        "cordoned": bool(n["spec"].get("unschedulable")), "excluded": EXCLUDE in n["metadata"].get("labels", {}),
    } for n in kubectl_json("get", "nodes")["items"]}


def pods_now() -> dict[str, dict]:
    return {p["metadata"]["name"]: {
        "node": p["spec"].get("nodeName"), "deleting": "deletionTimestamp" in p["metadata"],
        "ready": any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])),
    } for p in kubectl_json("get", "pods", "-l", SELECTOR)["items"]}


# --- The cluster's machines -------------------------------------------------------------------


@dataclass
class Machines:
    """What the cloud does to nodes: terminate and boot instances, and delete the Node of a
    terminated one once it is not Ready (the cloud node lifecycle controller)."""

    stop: str
    start: str
    group: list[str]
    spares: list[str]
    backends: list[str] | None = None
    terminated: set[str] = field(default_factory=set)

    @classmethod
    def from_env(cls) -> Machines | None:
        stop, start = os.environ.get("E2E_NODE_STOP"), os.environ.get("E2E_NODE_START")
        if not stop or not start:
            return None
        group = os.environ.get("E2E_NODE_GROUP", "").split() or [
            n["metadata"]["name"] for n in kubectl_json("get", "nodes")["items"]
            if not any(k.startswith("node-role.kubernetes.io/control-plane") for k in n["metadata"]["labels"])]
        backends = shlex.split(os.environ.get("E2E_LB_BACKENDS", "")) or None
        return cls(stop, start, group, os.environ.get("E2E_SPARE_NODES", "").split(), backends)

    def terminate(self, node: str) -> None:
        subprocess.run(["sh", "-c", self.stop, "sh", node], check=True, capture_output=True, timeout=120)
        self.terminated.add(node)

    def boot(self, node: str) -> None:
        subprocess.run(["sh", "-c", self.start, "sh", node], check=True, capture_output=True, timeout=300)
        self.terminated.discard(node)
        wait(lambda: nodes_now().get(node, {}).get("ready"), f"{node} Ready", 300)

    def reap(self, nodes: dict[str, dict]) -> list[str]:
        """Delete each terminated instance's Node once it is not Ready; the ones deleted now."""
        gone = [name for name in self.terminated & nodes.keys() if not nodes[name]["ready"]]
        for name in gone:
            kubectl("delete", "node", name, "--wait=false", check=False)
        return gone

    def lb(self, namespace: str) -> dict[str, bool] | None:
        """Each node, in service behind the load balancer or not (registered and healthy)."""
        if not self.backends:
            return None
        out = subprocess.run([*self.backends, f"{namespace}/{SERVICE}"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
        return {name: registered == "registered" and health.startswith("UP")
                for name, _, registered, health, *_ in (f"{line} - - - -".split() for line in out.splitlines())}


# --- Recording --------------------------------------------------------------------------------


class Recorder:
    """Every SAMPLE_S, the nodes, the pods and the load balancer's backends; and the steps taken."""

    def __init__(self, machines: Machines, namespace: str) -> None:
        self.machines, self.namespace, self.t0 = machines, namespace, time.time()
        self.samples: list[dict] = []
        self.steps: list[tuple[float, str]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        return round(time.time() - self.t0, 1)

    def step(self, text: str) -> None:
        self.steps.append((self.now(), text))

    def _run(self) -> None:
        while not self.stopping.wait(SAMPLE_S):
            try:
                nodes = nodes_now()
                for gone in self.machines.reap(nodes):
                    self.step(f"the cloud deletes Node {gone} (terminated, not Ready)")
                self.samples.append({"t": self.now(), "nodes": nodes, "pods": pods_now(),
                                     "lb": self.machines.lb(self.namespace)})
            except (subprocess.SubprocessError, json.JSONDecodeError, KeyError):
                continue  # the API server answers again at the next sample

    @contextmanager
    def running(self) -> Iterator[Recorder]:
        self.thread.start()
        try:
            yield self
        finally:
            self.stopping.set()
            self.thread.join(30)


# --- The scenarios ----------------------------------------------------------------------------


def drain(node: str, timeout_s: float) -> None:
    """`kubectl drain`: the Eviction API, so PodDisruptionBudgets hold, as when EKS drains."""
    done = subprocess.run(["kubectl", "drain", node, "--ignore-daemonsets", "--delete-emptydir-data",
                           f"--timeout={int(timeout_s)}s"], capture_output=True, text=True, timeout=timeout_s + 30)
    if done.returncode:
        raise RuntimeError(f"drain {node} failed:\n{done.stderr[-2000:]}")


def busiest(group: list[str]) -> str:
    """The node of the group with the most of the app's pods (the first, on a tie)."""
    on = Counter(p["node"] for p in pods_now().values() if not p["deleting"])
    return max(group, key=lambda n: (on[n], -group.index(n)))


def upgrade(m: Machines, rec: Recorder, drain_s: float = EKS_DRAIN_S) -> None:
    """EKS's default update strategy (user guide, "Understand each phase of node updates"): new
    nodes first; every old node cordoned and labelled exclude-from-external-load-balancers; then
    each old node in turn drained, waited on, and its instance terminated."""
    old = [n for n in m.group if nodes_now().get(n, {}).get("ready")]
    for spare in m.spares:
        rec.step(f"boot new node {spare}")
        m.boot(spare)
    for node in old:
        kubectl("cordon", node)
        kubectl("label", "node", node, f"{EXCLUDE}=true", "--overwrite")
    rec.step(f"cordon and label {', '.join(old)} {EXCLUDE}")
    for node in old:
        rec.step(f"drain {node}")
        drain(node, drain_s)
        rec.step(f"{node} drained; wait {EKS_WAIT_S} s")
        time.sleep(EKS_WAIT_S)  # EKS's own fixed wait: part of what is modelled
        rec.step(f"terminate {node}")
        m.terminate(node)


def scale_in(m: Machines, rec: Recorder, drain_s: float = EKS_DRAIN_S) -> None:
    """A smaller desired count: EKS evicts the pods of the instance the Auto Scaling group picked,
    then the instance is terminated (user guide, "Managed node groups"). Nothing takes it out of
    the load balancer first."""
    node = busiest(m.group)
    rec.step(f"drain {node}")
    drain(node, drain_s)
    rec.step(f"terminate {node}")
    m.terminate(node)


def lose(m: Machines, rec: Recorder, drain_s: float = EKS_DRAIN_S) -> None:
    """An instance dies: no drain, no warning."""
    node = busiest(m.group)
    rec.step(f"terminate {node} without warning")
    m.terminate(node)


SCENARIOS: dict[str, Callable[[Machines, Recorder, float], None]] = {"upgrade": upgrade, "scale-in": scale_in, "lost": lose}


def set_state(node: str, cordoned: bool, excluded: bool) -> None:
    kubectl("cordon" if cordoned else "uncordon", node, check=False)
    kubectl("label", "node", node, f"{EXCLUDE}=true" if excluded else f"{EXCLUDE}-", "--overwrite", check=False)


@contextmanager
def isolated(m: Machines) -> Iterator[None]:
    """Only the node group serves: nodes outside it (the lab's control-plane node) are cordoned
    and labelled out of the load balancer, as an EKS control plane runs no pods and takes no
    traffic; the app's pods there move by a rolling restart, which loses nothing."""
    others = {n: state for n, state in nodes_now().items() if n not in m.group + m.spares}
    for node in others:
        set_state(node, True, True)
    try:
        if any(p["node"] in others for p in pods_now().values()):
            kubectl("rollout", "restart", f"deployment/{DEPLOYMENT}")
            kubectl("rollout", "status", f"deployment/{DEPLOYMENT}", "--timeout=180s", timeout=190)
        yield
    finally:
        for node, state in others.items():
            set_state(node, state["cordoned"], state["excluded"])


@contextmanager
def pinned(replicas: int) -> Iterator[None]:
    """The HPA held at `replicas` pods, every one of them Ready, on as many nodes."""
    hpa = next(h for h in kubectl_json("get", "hpa")["items"] if h["spec"]["scaleTargetRef"]["name"] == DEPLOYMENT)
    name, spec = hpa["metadata"]["name"], hpa["spec"]

    def bounds(low: int, high: int) -> None:
        kubectl("patch", "hpa", name, "--type=merge", "-p", json.dumps({"spec": {"minReplicas": low, "maxReplicas": high}}))

    def spread() -> bool:
        up = [p["node"] for p in pods_now().values() if p["ready"] and not p["deleting"]]
        return len(up) == len(set(up)) == replicas

    bounds(replicas, replicas)
    try:
        wait(lambda: sum(p["ready"] and not p["deleting"] for p in pods_now().values()) == replicas,
             f"{replicas} pods Ready", 180)
        if not spread():  # pods stay where they run: a rolling restart places them anew, losing nothing
            kubectl("rollout", "restart", f"deployment/{DEPLOYMENT}")
            kubectl("rollout", "status", f"deployment/{DEPLOYMENT}", "--timeout=180s", timeout=190)
        wait(spread, f"{replicas} pods Ready on {replicas} nodes", 180)
        yield
    finally:
        bounds(spec.get("minReplicas", 1), spec["maxReplicas"])


def restore(m: Machines, found: dict[str, dict]) -> None:
    """Back to the nodes there were, as they were: boot what was terminated, take out what was added."""
    for node in sorted(m.terminated & found.keys()):
        m.boot(node)
    for node in sorted(nodes_now().keys() - found.keys()):
        drain(node, 300)
        m.terminate(node)
        kubectl("delete", "node", node)
        m.terminated.discard(node)
    for node, state in found.items():
        set_state(node, state["cordoned"], state["excluded"])


def idle_timeout_s() -> float:
    """How long the load balancer keeps a connection with nothing on it: a request lost on a
    dead node's connection fails only then (ELB default 60 s)."""
    return float(service_settings().get("connection-idle-timeout", 60))


def run(name: str, host: str, m: Machines, namespace: str, users: int = USERS, drain_s: float = EKS_DRAIN_S,
        log=print) -> dict:
    """The swarm through `host`, the scenario once it runs at full size, then until every
    terminated node is deleted and any request lost with it has timed out; the nodes put back."""
    found, settle_s = nodes_now(), idle_timeout_s() + 5
    swarm.install()
    with tempfile.TemporaryDirectory(prefix="nodes-") as tmp, isolated(m), pinned(REPLICAS[name]):
        requests, stats = Path(tmp) / "requests.jsonl", Path(tmp) / "locust"
        rec = Recorder(m, namespace)
        locust = subprocess.Popen(
            [*swarm.command(host, users, SPAWN_RATE, stats), "-f", f"{swarm.LOCUSTFILE},{REQUEST_LOG}"],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=(Path(tmp) / "locust.log").open("w"),
            env={**os.environ, "REQUEST_LOG": str(requests)})
        try:
            with rec.running():
                wait(lambda: requests.exists() and len(requests.read_text().splitlines()) >= users, "the swarm", 120)
                rec.step("swarm at full size")
                log(f"{name}: swarm at full size")
                SCENARIOS[name](m, rec, drain_s)
                last = time.monotonic()
                wait(lambda: not (m.terminated & set(nodes_now())), "terminated nodes deleted", 300)
                rec.step("every terminated node deleted")
                time.sleep(max(10.0, last + settle_s - time.monotonic()))
                rec.step("swarm stops")
        finally:
            locust.send_signal(signal.SIGTERM)
            locust.wait(60)
            log(f"{name}: restoring the nodes")
            restore(m, found)
        results = swarm.results(stats)
        lines = [json.loads(line) for line in requests.read_text().splitlines()]
    return report(name, rec, lines, results)


# --- What the run says ------------------------------------------------------------------------


def service_settings() -> dict[str, str]:
    """The Service's load-balancer annotations, as the cluster holds them."""
    annotations = kubectl_json("get", "service", SERVICE)["metadata"].get("annotations", {})
    return {k.removeprefix(ELB): v for k, v in annotations.items() if k.startswith(ELB)}


def report(name: str, rec: Recorder, lines: list[dict], results: swarm.Results) -> dict:
    for line in lines:
        line["start"] = round(line["end"] - line["ms"] / 1000 - rec.t0, 2)
    failed = sorted((line for line in lines if line["error"]), key=lambda line: line["start"])
    full, stop = (next(t for t, text in rec.steps if text == what) for what in ("swarm at full size", "swarm stops"))
    answered = sorted(line["end"] - rec.t0 for line in lines if not line["error"])
    edges = [full, *(t for t in answered if full < t < stop), stop]
    return {
        "scenario": name, "date": datetime.date.today().isoformat(), "health_check": service_settings(),
        "steps": rec.steps, "requests": len(lines), "failed": len(failed),
        "no_response": sum(line["error"].startswith("no response") for line in failed),
        "reasons": dict(Counter(line["error"].split(":")[0] for line in failed)),
        "failed_started": [line["start"] for line in failed],
        "longest_gap_s": round(max(b - a for a, b in zip(edges, edges[1:])), 2),
        "locust": {"requests": results.requests, "failures": results.failures},
        "samples": rec.samples,
    }


def terminated_at(r: dict) -> dict[str, float]:
    """When each node's instance was terminated."""
    return {text.split()[1]: t for t, text in r["steps"] if text.startswith("terminate ")}


def lb_dropped(r: dict) -> dict[str, float]:
    """When the load balancer first stopped sending new connections to each node it had in service."""
    dropped: dict[str, float] = {}
    for a, b in zip(r["samples"], r["samples"][1:]):
        for node, on in (b["lb"] or {}).items():
            if (a["lb"] or {}).get(node) and not on:
                dropped.setdefault(node, b["t"])
    return dropped


def wrongly_dropped(r: dict) -> list[str]:
    """Nodes the load balancer took out of service that nothing had taken away: not terminated,
    not labelled out of load balancers. A health check that fails healthy nodes."""
    gone = terminated_at(r)
    return sorted(node for node, t in lb_dropped(r).items() if node not in gone and not next(
        s for s in r["samples"] if s["t"] == t)["nodes"].get(node, {}).get("excluded"))


def not_ready_at(r: dict) -> dict[str, float]:
    """When each terminated node stopped being Ready (and its pods left the Service's endpoints)."""
    found = {}
    for node in terminated_at(r):
        found[node] = next((s["t"] for s in r["samples"] if not s["nodes"].get(node, {"ready": False})["ready"]),
                           r["samples"][-1]["t"])
    return found


def pods_per_node(r: dict) -> list[tuple[float, dict[str, int]]]:
    """The app's Ready pods on each node, at each change."""
    changes, last = [], None
    for s in r["samples"]:
        now = dict(sorted(Counter(p["node"] for p in s["pods"].values() if p["ready"]).items()))
        if now != last:
            changes.append((s["t"], now))
        last = now
    return changes


def summary(r: dict) -> str:
    steps = "; ".join(f"{t:g} s {text}" for t, text in r["steps"])
    pods = "; ".join(f"{t:g} s {on}" for t, on in pods_per_node(r))
    return (f"{r['scenario']}: {r['requests']} requests, {r['failed']} failed ({r['no_response']} with no response); "
            f"longest gap {r['longest_gap_s']} s; load balancer dropped {lb_dropped(r)}\n"
            f"  steps: {steps}\n  pods per node: {pods}")


# --- The health checks compared ---------------------------------------------------------------

HC = {k: f"healthcheck-{k}" for k in ("protocol", "port", "path", "interval", "timeout", "unhealthy-threshold",
                                       "healthy-threshold")}
# Each choice's health-check annotations (the rest of service.yaml as it is). The AWS cloud provider
# reads them in ensureLoadBalancerHealthCheck (cloud-provider-aws pkg/providers/v1/aws_loadbalancer.go).
CHOICES = {
    "original design: HTTP, traffic port, /healthz, 10 s x 5": {
        "protocol": "HTTP", "path": "/healthz", "interval": "10", "timeout": "6", "unhealthy-threshold": "5",
        "healthy-threshold": "3"},
    "provider default: TCP, traffic port, 10 s x 6": {"protocol": "TCP"},
    "provider default, Shared mode: kube-proxy, 10 s x 6": {},
    "HTTP, traffic port, /healthz, 5 s x 2": {
        "protocol": "HTTP", "path": "/healthz", "interval": "5", "timeout": "2", "unhealthy-threshold": "2",
        "healthy-threshold": "2"},
    "this kit: kube-proxy, 5 s x 2": None,  # service.yaml as shipped
}


def apply_choice(checks: dict[str, str] | None) -> None:
    """service.yaml with its health-check annotations replaced; wait until every node serves."""
    doc = cm.manifest("service.yaml")
    if checks is not None:
        kept = {k: v for k, v in doc["metadata"]["annotations"].items() if not k.startswith(ELB + "healthcheck-")}
        doc["metadata"]["annotations"] = kept | {ELB + HC[k]: v for k, v in checks.items()}
    subprocess.run(["kubectl", "apply", "-f", "-"], input=yaml.safe_dump(doc), text=True, check=True,
                   capture_output=True)
    time.sleep(2 * SAMPLE_S)  # the load balancer's controller sees the change


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", required=True, help="the Service's load-balancer address, e.g. http://$ELB")
    parser.add_argument("--only", nargs="*", default=list(CHOICES), help="the choices to run (CHOICES' names)")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), help="the scenarios to run")
    parser.add_argument("--print-only", action="store_true", help="do not write measured.json")
    args = parser.parse_args()
    m = Machines.from_env()
    if m is None:
        parser.error("set E2E_NODE_STOP and E2E_NODE_START (see the module's docstring)")
    namespace = kubectl("config", "view", "--minify", "-o", "jsonpath={..namespace}").strip() or "default"
    for choice in args.only:
        apply_choice(CHOICES[choice])
        for scenario in args.scenarios:
            r = run(scenario, args.host, m, namespace)
            print(summary(r), flush=True)
            first = min(terminated_at(r).values())
            row = {"choice": choice, **{k: v for k, v in r.items() if k not in ("samples", "failed_started")},
                   "failures_from_s": [round(t - first, 1) for t in r["failed_started"][:1] + r["failed_started"][-1:]],
                   "pods_per_node": pods_per_node(r),
                   "lb_dropped_after_s": {n: round(t - terminated_at(r)[n], 1) for n, t in lb_dropped(r).items()
                                          if n in terminated_at(r)},
                   "wrongly_dropped": wrongly_dropped(r)}
            if not args.print_only:  # one row per choice and scenario, kept as each run ends
                measured = json.loads(cm.MEASURED.read_text())
                rows = [x for x in measured.get("nodes", []) if (x["choice"], x["scenario"]) != (choice, scenario)]
                measured["nodes"] = [*rows, row]
                cm.MEASURED.write_text(json.dumps(measured, indent=2) + "\n")
    apply_choice(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
