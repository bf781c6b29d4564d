"""The kit on a real Kubernetes cluster: the README's deploy, the contract through the Service,
rolling restarts under a swarm, the demo swarm out and back on each autoscaler (hpa.yaml on
CPU, keda-scaledobject.yaml on requests in flight), recorded and judged against the model, and
nodes leaving under a swarm: a node group upgrade, a scale-in, a node lost.

Runs against the cluster `KUBECONFIG` names (kind, minikube, EKS, ...) with `kubectl` on PATH, in
a fresh namespace that Pod Security admission holds to `restricted`, deleted at the end. Settings:
  E2E_IMAGE                the image to deploy, already where the cluster finds it (required)
  E2E_DEMO_USERS           the demo swarm's users (default: the README's, 1,000)
  E2E_DEMO_SPAWN_RATE      users started per second (default: the README's, 10)
  E2E_DEMO_SECONDS         a fixed swarm length; by default the swarm runs until the replica count
                           has held 90 s (at most 8 minutes), so that any machine shows the spread
  E2E_DEMO_OUT             where to keep the CPU demo's timeline (.json, its chart beside it as
                           .svg; the in-flight demo's as NAME-keda.json)
  E2E_PROMETHEUS           Prometheus for KEDA's trigger (default: the cluster's prometheus or
                           prometheus-server Service, at its cluster IP)
  E2E_LB_WAIT_SECONDS      how long to wait for a load-balancer address before using a node
                           port (default: 20)
  E2E_NAMESPACE_PREFIX     the namespace's prefix (default: math-service-e2e)
  E2E_DIAGNOSTICS          a file for the HPA, pods, events and logs, written before the
                           namespace goes (CI shows it when a test failed)
  E2E_NODE_STOP, E2E_NODE_START, E2E_NODE_GROUP, E2E_SPARE_NODES, E2E_LB_BACKENDS
                           how to terminate and boot the cluster's nodes, and see its load balancer
                           (tests/tools/node_scenarios.py)
Without a cluster that answers, or without E2E_IMAGE, the module skips with one line; without
KEDA and Prometheus in the cluster, the in-flight demo does; without E2E_NODE_STOP and
E2E_NODE_START, or with fewer than two nodes in the node group, the node scenarios do. How docs/'s recorded demos were made:
tests/tools/README.md.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

import cluster_model as cm
import demo_recorder as rec
import node_scenarios as nodes
import swarm
from helpers import ROOT, healthy, note_source, wait_for

DEPLOYMENT = "deployment/math-service-deployment"
SERVICE = "math-service-service"
ROLLOUTS = 3
ROLLOUT_USERS = 300
HOLD_S, LONGEST_S = 90, 480


def deploy_block() -> str:
    """The README's bash block after its `<!-- deploy-block ... -->` marker: the operator's deploy, run as written."""
    section = re.search(r"^<!-- deploy-block\b.*?-->\n```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert section, "README has no bash block after a <!-- deploy-block --> marker"
    return section.group(1)


def kubectl(*args: str, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout, check=check, **kwargs)


@dataclass
class Cluster:
    namespace: str
    image: str
    url: str  # the Service as a client outside the cluster reaches it


@pytest.fixture(scope="module")
def cluster(pytestconfig: pytest.Config, tmp_path_factory) -> Iterator[Cluster]:
    if not shutil.which("kubectl"):
        pytest.skip("no cluster: kubectl is not on PATH")
    try:
        answer = kubectl("version", "-o", "json", "--request-timeout=10s", timeout=20, check=False)
    except subprocess.TimeoutExpired:
        answer = None
    if not answer or answer.returncode or "serverVersion" not in answer.stdout:
        pytest.skip("no cluster answers (KUBECONFIG names none, or it is down)")
    image = os.environ.get("E2E_IMAGE")
    if not image:
        pytest.skip("a cluster answers, but E2E_IMAGE names no image to deploy")

    namespace = f"{os.environ.get('E2E_NAMESPACE_PREFIX', 'math-service-e2e')}-{uuid.uuid4().hex[:6]}"
    # A copy of the kubeconfig whose current context is the new namespace: the README's block
    # names none, and nor does anything here.
    config = tmp_path_factory.mktemp("kube") / "config"
    config.write_text(kubectl("config", "view", "--raw").stdout)
    os.environ["KUBECONFIG"], saved = str(config), os.environ.get("KUBECONFIG")
    try:
        kubectl("config", "set-context", "--current", f"--namespace={namespace}")
        kubectl("create", "namespace", namespace)
        # The API server's Pod Security admission judges every pod of the Deployment.
        kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
        where = rec.where()
        note_source(pytestconfig, "e2e cluster", f"Kubernetes {where['kubernetes']}, "
                    f"{where['nodes']} node(s), {where['cores']:g} cores; namespace {namespace}")
        deploy = subprocess.run(["bash", "-euo", "pipefail", "-c", deploy_block()], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "IMAGE": image})
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr + describe()
        kubectl("rollout", "status", DEPLOYMENT, "--timeout=120s", timeout=130)
        yield Cluster(namespace, image, service_url())
    finally:
        if diagnostics := os.environ.get("E2E_DIAGNOSTICS"):
            Path(diagnostics).write_text(describe(limit=None) + kubectl(
                "logs", "-l", "app=math-service", "--all-containers", "--prefix", "--tail=200", check=False).stdout)
        kubectl("delete", "namespace", namespace, "--timeout=180s", timeout=200, check=False)
        if saved is None:
            del os.environ["KUBECONFIG"]
        else:
            os.environ["KUBECONFIG"] = saved


def describe(limit: int | None = 6000) -> str:
    """What to look at when something fails: the HPA, the ScaledObject, pods, events."""
    out = "\n".join(kubectl(*args, check=False).stdout for args in (
        ("describe", "hpa"), ("describe", "scaledobject"), ("get", "pods", "-o", "wide"),
        ("get", "events", "--sort-by=.lastTimestamp")))
    return "\n" + (out[-limit:] if limit else out)


def service_url(wait_s: float = float(os.environ.get("E2E_LB_WAIT_SECONDS", "20"))) -> str:
    """The load balancer's address once it has one; else a node's InternalIP and the node port
    (no cloud load balancer, as on a bare or single-node cluster)."""
    deadline = time.monotonic() + wait_s
    while True:
        svc = json.loads(kubectl("get", "service", SERVICE, "-o", "json").stdout)
        if ingress := svc["status"].get("loadBalancer", {}).get("ingress"):
            return f"http://{ingress[0].get('ip') or ingress[0]['hostname']}:{svc['spec']['ports'][0]['port']}"
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    node = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"][0]
    ip = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
    return f"http://{ip}:{svc['spec']['ports'][0]['nodePort']}"


# --- The contract, through the Service --------------------------------------------------------


def test_restricted_namespace_admits_the_pods_and_rejects_a_privileged_one(cluster: Cluster) -> None:
    ready = kubectl("get", "pods", "-l", "app=math-service", "-o",
                    "jsonpath={.items[*].status.containerStatuses[*].ready}").stdout.split()
    assert ready and set(ready) == {"true"}
    # The same admission refuses a pod that does not lock itself down: the label is enforced.
    probe = kubectl("run", "privileged-probe", f"--image={cluster.image}", "--dry-run=server",
                    "--overrides", '{"spec":{"containers":[{"name":"p","image":"%s",'
                    '"securityContext":{"privileged":true}}]}}' % cluster.image, check=False)
    assert probe.returncode != 0 and "PodSecurity" in probe.stderr, probe.stdout + probe.stderr


def test_readme_curl_and_the_probes_through_the_service(cluster: Cluster) -> None:
    # kube-proxy (or the load balancer) may take a moment to send traffic.
    wait_for(lambda: healthy(cluster.url), f"something answers at {cluster.url}", 60)
    answer = httpx.post(cluster.url + "/", json={"a": 10, "b": 5}, timeout=15)
    assert (answer.status_code, answer.json()) == (200, {"result": 15.0})
    assert answer.elapsed.total_seconds() >= 4.9  # DELAY_SECONDS, 5 s as deployed
    for path, body in (("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"})):
        got = httpx.get(cluster.url + path, timeout=10)
        assert (got.status_code, got.json()) == (200, body)
    # The metrics are not on the public port; Prometheus finds them on the pod's own.
    assert httpx.get(cluster.url + "/metrics", timeout=10).status_code == 404
    counted = [(rec.pod_counters(cluster.namespace, pod) or (0, 0))[0] for pod in pods_now().values()]
    assert sum(counted) >= 3, counted  # the POST and two GETs, at least


@pytest.mark.parametrize("body", [b'{"a": "10", "b": 5}', b'{"a": 10}', b"not json"])
def test_bad_input_gets_a_json_4xx_through_the_service(cluster: Cluster, body: bytes) -> None:
    answer = httpx.post(cluster.url + "/", content=body, timeout=10, headers={"Content-Type": "application/json"})
    assert 400 <= answer.status_code < 500
    assert answer.headers["content-type"].startswith("application/json") and answer.json()["detail"]


# --- Rolling restarts under a swarm -----------------------------------------------------------


class PodWatch:
    """Every state the pods go through, from a watch: a replaced container's exit code is in its
    pod's last status before the pod object goes, so a watch sees it where a poll may not."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["kubectl", "get", "pods", "-l", "app=math-service", "--watch", "-o", "json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.exits: dict[str, list[int]] = {}  # pod -> exit codes of its terminated containers
        self.deleting: set[str] = set()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        decoder, buffer = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            buffer += line
            try:
                pod, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                continue
            buffer = buffer.lstrip()[end:]
            name = pod["metadata"]["name"]
            if pod["metadata"].get("deletionTimestamp"):
                self.deleting.add(name)
            codes = [c["state"]["terminated"]["exitCode"]
                     for c in pod["status"].get("containerStatuses") or [] if "terminated" in c["state"]]
            if codes:
                self.exits[name] = codes

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.thread.join(10)


def pods_now() -> dict[str, dict]:
    pods = json.loads(kubectl("get", "pods", "-l", "app=math-service", "-o", "json").stdout)["items"]
    return {p["metadata"]["name"]: p for p in pods}


def test_rolling_restarts_under_a_swarm_lose_nothing_and_exit_0(cluster: Cluster, tmp_path: Path) -> None:
    watch = PodWatch()
    swarm.install()
    locust = subprocess.Popen(swarm.command(cluster.url, ROLLOUT_USERS, 100, tmp_path / "locust"), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "locust.log").open("w"))
    try:
        # Every user's connection is open once most of them have a request in flight.
        wait_for(lambda: sum((rec.pod_counters(cluster.namespace, p) or (0, 0))[1] for p in pods_now().values())
                 >= ROLLOUT_USERS / 2, "the swarm going", 30)
        before = set(pods_now())
        for _ in range(ROLLOUTS):
            kubectl("rollout", "restart", DEPLOYMENT)
            kubectl("rollout", "status", DEPLOYMENT, "--timeout=180s", timeout=190)
        replaced = before | watch.deleting
        # The last old pods finish their preStop and drain; then every user has been answered
        # once more, by the new pods: a request that failed on the way would be counted by now.
        wait_for(lambda: not set(pods_now()) & watch.deleting, "the old pods gone", 60)
        answered = lambda: sum((rec.pod_counters(cluster.namespace, p) or (0, 0))[0] for p in pods_now().values())  # noqa: E731
        after = answered()
        wait_for(lambda: answered() >= after + ROLLOUT_USERS, "every user answered by the new pods", 60)
    finally:
        locust.send_signal(signal.SIGTERM)
        locust.wait(60)
        watch.stop()
    results = swarm.results(tmp_path / "locust")
    print(f"\n{ROLLOUTS} rollouts under {ROLLOUT_USERS} users: {results.requests} requests, {results.failures} "
          f"failures; {len(watch.deleting)} pods replaced, exit codes {watch.exits}")

    assert (results.failures, results.messages) == (0, [])
    assert results.requests > 0
    assert len(watch.deleting) >= ROLLOUTS and before <= watch.deleting
    # Every replaced pod's container ended on its own after SIGTERM: 0, not 137 (SIGKILL).
    assert {name: watch.exits.get(name) for name in replaced} == {name: [0] for name in replaced}


# --- The demo swarm, on each autoscaler -------------------------------------------------------


def demo(cluster: Cluster, tmp_path: Path, config: pytest.Config, suffix: str = "") -> dict:
    """The demo swarm recorded: by default until the replica count has held HOLD_S, so that the
    spread after the last scale-out is seen whatever the machine's speed."""
    fixed = os.environ.get("E2E_DEMO_SECONDS")
    scenario = rec.Scenario(
        users=int(os.environ.get("E2E_DEMO_USERS", cm.DEMO_USERS)),
        spawn_rate=float(os.environ.get("E2E_DEMO_SPAWN_RATE", cm.SPAWN_RATE)),
        run_s=int(fixed or LONGEST_S), hold_s=None if fixed else HOLD_S,
    )
    timeline = rec.record(cluster.url, scenario, cluster.namespace, log=lambda _: None)
    out = Path(os.environ.get("E2E_DEMO_OUT") or tmp_path / "demo.json")
    rec.save(timeline, out.with_name(out.stem + suffix + out.suffix))
    note_source(config, f"demo on {timeline['autoscaler']['kind']}", "\n" + rec.summary(timeline))
    return timeline


def judge(timeline: dict, measured: cm.Measured | None = None) -> None:
    """Against the model fed with `measured` (by default tests/tools/measured.json's CPU): 0
    failures, a scale-out to the model's peak +-1, the count the model holds at the stop +-1,
    back to the minimum within the model's return plus one HPA sync, and the load spread."""
    ticks = rec.model_ticks(timeline, measured)
    run_s = timeline["scenario"]["run_s"]
    found, model = rec.steps(timeline), rec.model_steps(ticks, run_s)
    edges = [f"{k.t} s ({a.replicas} -> {k.replicas} pods at {k.utilization})" for a, k in zip(ticks, ticks[1:])
             if k.near_edge]
    context = (f"\nmeasured: {rec.describe(found)}\nmodel:    {rec.describe(model)}\n"
               f"the model's decisions a 3 % change of the metric would flip: {', '.join(edges) or 'none'}" + describe())
    lc = timeline["locust"]
    assert (lc["failures"], lc["requests"] > 0) == (0, True), lc["messages"]
    assert found.peak >= 2, "the swarm never scaled out" + context
    assert abs(found.peak - model.peak) <= 1, context
    held = next(s["desired"] for s in reversed(timeline["samples"]) if s["t"] <= run_s)
    assert abs(held - next(k.replicas for k in reversed(ticks) if k.t <= run_s)) <= 1, context
    assert found.back_s is not None and model.back_s is not None, context
    assert found.back_s <= model.back_s + cm.SYNC_PERIOD_S + rec.SAMPLE_S, context
    # Load follows the pods the HPA adds (MAX_CONNECTION_AGE_SECONDS): from 60 s after the last
    # scale-out until the swarm stops, the busiest pod reads at most 1.5x the least busy one.
    last_out, spread = rec.pod_spread(timeline)
    assert spread, f"no reading with every pod from 60 s after the last scale-out ({last_out} s)" + context
    assert max(spread) <= 1.5, f"busiest/least busy pod from {last_out + 60} s: {spread}" + context


def test_demo_swarm_on_cpu_scales_out_and_back_with_no_failure(cluster: Cluster, tmp_path: Path, pytestconfig) -> None:
    """hpa.yaml, judged against the model with this run's own CPU per request: the HPA acts on
    CPU, which differs from machine to machine."""
    timeline = demo(cluster, tmp_path, pytestconfig)
    judge(timeline, rec.calibrated(timeline))


def prometheus_url() -> str | None:
    if url := os.environ.get("E2E_PROMETHEUS"):
        return url
    services = json.loads(kubectl("get", "services", "--all-namespaces", "-o", "json").stdout)["items"]
    return next((f"http://{s['spec']['clusterIP']}:{s['spec']['ports'][0]['port']}" for s in services
                 if s["metadata"]["name"] in ("prometheus", "prometheus-server")), None)


def test_demo_swarm_on_requests_in_flight_scales_out_and_back_with_no_failure(cluster: Cluster, tmp_path: Path,
                                                                            pytestconfig) -> None:
    """keda-scaledobject.yaml in place of hpa.yaml (never both), judged against the model as it
    is: requests in flight do not depend on the machine."""
    server = prometheus_url()
    if kubectl("get", "crd", "scaledobjects.keda.sh", check=False).returncode or not server:
        pytest.skip("no KEDA (scaledobjects.keda.sh) or no Prometheus in the cluster")
    scaled = yaml.safe_load((ROOT / "keda-scaledobject.yaml").read_text())
    scaled["spec"]["triggers"][0]["metadata"]["serverAddress"] = server  # a cluster IP: DNS or none
    kubectl("delete", "-f", str(ROOT / "hpa.yaml"))
    try:
        kubectl("apply", "-f", "-", input=yaml.safe_dump(scaled))
        kubectl("wait", "scaledobject/math-service", "--for=condition=Ready", "--timeout=120s", timeout=130)
        judge(demo(cluster, tmp_path, pytestconfig, "-keda"))
    finally:
        kubectl("delete", "scaledobject", "math-service", "--ignore-not-found", check=False)
        kubectl("apply", "-f", str(ROOT / "hpa.yaml"), check=False)


# --- Nodes leaving, behind the load balancer ----------------------------------------------------


@pytest.fixture(scope="module")
def machines(cluster: Cluster) -> nodes.Machines:
    m = nodes.Machines.from_env()
    if m is None:
        pytest.skip("no way to terminate and boot nodes: set E2E_NODE_STOP and E2E_NODE_START")
    if len(m.group) < 2:
        pytest.skip(f"the node group has {len(m.group)} node(s): the scenarios need two")
    return m


def leave(name: str, cluster: Cluster, machines: nodes.Machines, config: pytest.Config) -> dict:
    # A drain takes the pods' grace period here: 2 minutes, not EKS's 15, so a drain that a
    # PodDisruptionBudget blocks fails the test soon.
    r = nodes.run(name, cluster.url, machines, cluster.namespace, drain_s=120, log=lambda _: None)
    note_source(config, f"nodes, {name}", "\n" + nodes.summary(r))
    assert r["requests"] > 0
    return r


def test_node_group_upgrade_under_the_swarm_loses_nothing(cluster: Cluster, machines: nodes.Machines,
                                                         pytestconfig) -> None:
    """EKS's managed node update, every old node in turn, at 1 replica: the only pod moves, past
    the PodDisruptionBudget, and no request fails."""
    r = leave("upgrade", cluster, machines, pytestconfig)
    assert (r["failed"], r["reasons"]) == (0, {}), nodes.summary(r)


@pytest.mark.parametrize("name", ["scale-in", "lost"])
def test_a_node_gone_under_the_swarm_costs_only_what_it_carried(name: str, cluster: Cluster,
                                                               machines: nodes.Machines, pytestconfig) -> None:
    """A node terminated while in the load balancer (a scale-in drains it first; a lost one takes
    a pod with it): requests fail only until the load balancer has dropped it (within
    DROPPED_WITHIN_S, and no other node with it) and, for a lost pod, until its node is NotReady
    and the pod leaves the endpoints; the swarm then runs on with no failure."""
    r = leave(name, cluster, machines, pytestconfig)
    ((node, gone),) = nodes.terminated_at(r).items()
    over = gone + nodes.DROPPED_WITHIN_S  # when the cluster cannot show its load balancer
    if machines.backends:
        over = nodes.lb_dropped(r).get(node, math.inf)
        assert over - gone <= nodes.DROPPED_WITHIN_S, nodes.summary(r)
        assert nodes.wrongly_dropped(r) == [], nodes.summary(r)
    if name == "lost":
        over = max(over, nodes.not_ready_at(r)[node])
    # The samples are 2 s apart, and the load balancer's controller acts as often.
    late = [t for t in r["failed_started"] if t > over + 5]
    assert late == [], nodes.summary(r)
