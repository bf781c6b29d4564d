"""The kit on a real Kubernetes cluster: the README's deploy, the contract through the Service,
the demo swarm out and back (recorded and drawn next to the model), rolling restarts under load.

Runs against the cluster `KUBECONFIG` names (kind, minikube, EKS, ...) with `kubectl` on PATH, in
a fresh namespace that Pod Security admission holds to `restricted`, deleted at the end. Settings:
  E2E_IMAGE                the image to deploy, already where the cluster finds it (required)
  E2E_DEMO_USERS           the demo swarm's users    (default: tests/cluster_model.py's, 1,000)
  E2E_DEMO_SECONDS         how long it runs          (default: the model's, 300)
  E2E_DEMO_AFTER_SECONDS   how long it is followed after it stops (default: the model's, 240)
  E2E_DEMO_OUT             where to keep the timeline JSON (its chart beside it as .svg)
  E2E_LB_WAIT_SECONDS      how long to wait for a load-balancer address before using a node
                           port (default: 20)
  E2E_NAMESPACE_PREFIX     the namespace's prefix (default: math-service-e2e)
  E2E_DIAGNOSTICS          a file for the HPA, pods, events and logs, written before the
                           namespace goes (CI shows it when a test failed)
Without a cluster that answers, or without E2E_IMAGE, the module skips with one line.

The full demo, as docs/demo-measured.{json,svg} were recorded (about 12 minutes):
    E2E_IMAGE=... E2E_DEMO_OUT=docs/demo-measured.json uv run --with-requirements service.py \
        --with-requirements tests/requirements.txt pytest tests/test_e2e.py
"""

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import cluster_model as cm
import demo_recorder as rec
from conftest import ROOT, note_source
from rollout_benchmark import locust_results

README = (ROOT / "README.md").read_text()
DEPLOYMENT = "deployment/math-service-deployment"
SERVICE = "math-service-service"
ROLLOUTS = 3
ROLLOUT_USERS = 300
MEASURED = ROOT / "docs/demo-measured.json"


def deploy_block() -> str:
    """The first bash block under README step 8: the operator's deploy, run as written."""
    section = re.search(r"^### 8\. Deploy.*?^```bash\n(.*?)^```", README, re.S | re.M)
    assert section, "README has no bash block under '### 8. Deploy'"
    return section.group(1)


def kubectl(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout, check=check)


@dataclass
class Cluster:
    namespace: str
    image: str
    url: str  # the Service as a client outside the cluster reaches it
    where: dict = field(default_factory=dict)


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
        deploy = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", deploy_block()], cwd=ROOT, capture_output=True,
            text=True, timeout=300, env={**os.environ, "IMAGE": image},
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr + describe()
        kubectl("rollout", "status", DEPLOYMENT, "--timeout=120s", timeout=130)
        yield Cluster(namespace, image, service_url(), where)
    finally:
        if diagnostics := os.environ.get("E2E_DIAGNOSTICS"):
            Path(diagnostics).write_text(describe(limit=None) + kubectl(
                "logs", "-l", "app=math-service", "--all-containers", "--prefix", "--tail=200",
                check=False).stdout)
        kubectl("delete", "namespace", namespace, "--timeout=180s", timeout=200, check=False)
        if saved is None:
            del os.environ["KUBECONFIG"]
        else:
            os.environ["KUBECONFIG"] = saved


def describe(limit: int | None = 6000) -> str:
    """What to look at when something fails: the HPA, pods, events."""
    out = "\n".join(kubectl(*args, check=False).stdout for args in (
        ("describe", "hpa"), ("get", "pods", "-o", "wide"),
        ("get", "events", "--sort-by=.lastTimestamp")))
    return "\n" + (out[-limit:] if limit else out)


def service_url(wait_s: float = float(os.environ.get("E2E_LB_WAIT_SECONDS", "20"))) -> str:
    """The load balancer's address once it has one; else a node's InternalIP and the node port
    (no cloud load balancer, as on a bare or single-node cluster)."""
    deadline = time.monotonic() + wait_s
    while True:
        svc = json.loads(kubectl("get", "service", SERVICE, "-o", "json").stdout)
        ingress = svc["status"].get("loadBalancer", {}).get("ingress") or []
        if ingress:
            address = ingress[0].get("ip") or ingress[0]["hostname"]
            return f"http://{address}:{svc['spec']['ports'][0]['port']}"
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    node = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"][0]
    ip = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
    return f"http://{ip}:{svc['spec']['ports'][0]['nodePort']}"


# --- The contract, through the Service --------------------------------------------------------


def test_restricted_namespace_admits_the_pods_and_rejects_a_privileged_one(cluster: Cluster) -> None:
    labels = json.loads(kubectl("get", "namespace", cluster.namespace, "-o", "json").stdout)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    ready = kubectl("get", "pods", "-l", "app=math-service", "-o",
                    "jsonpath={.items[*].status.containerStatuses[*].ready}").stdout.split()
    assert ready and set(ready) == {"true"}
    # The same admission refuses a pod that does not lock itself down: the label is enforced.
    probe = kubectl("run", "privileged-probe", f"--image={cluster.image}", "--dry-run=server",
                    "--overrides", '{"spec":{"containers":[{"name":"p","image":"%s",'
                    '"securityContext":{"privileged":true}}]}}' % cluster.image, check=False)
    assert probe.returncode != 0 and "PodSecurity" in probe.stderr, probe.stdout + probe.stderr


def test_readme_curl_and_the_probes_through_the_service(cluster: Cluster) -> None:
    deadline = time.monotonic() + 60
    while True:  # kube-proxy (or the load balancer) may take a moment to send traffic
        try:
            answer = httpx.post(cluster.url + "/", json={"a": 10, "b": 5}, timeout=15)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"nothing answers at {cluster.url}"
            time.sleep(1)
    assert (answer.status_code, answer.json()) == (200, {"result": 15.0})
    assert answer.elapsed.total_seconds() >= 4.9  # DELAY_SECONDS, 5 s as deployed
    for path, body in (("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"})):
        got = httpx.get(cluster.url + path, timeout=10)
        assert (got.status_code, got.json()) == (200, body)
    metrics = httpx.get(cluster.url + "/metrics", timeout=10)
    assert metrics.status_code == 200 and 'http_requests_total{method="POST",route="/",status="200"}' in metrics.text


@pytest.mark.parametrize("body", [b'{"a": "10", "b": 5}', b'{"a": 10}', b"not json"])
def test_bad_input_gets_a_json_4xx_through_the_service(cluster: Cluster, body: bytes) -> None:
    answer = httpx.post(cluster.url + "/", content=body, timeout=10,
                        headers={"Content-Type": "application/json"})
    assert 400 <= answer.status_code < 500
    assert answer.headers["content-type"].startswith("application/json") and answer.json()["detail"]


# --- The demo swarm ---------------------------------------------------------------------------


def demo_scenario() -> rec.Scenario:
    """The model's demo, unless the E2E_DEMO_* settings shorten it (the model then predicts the
    shortened swarm: the chart and the bounds below use the same Scenario)."""
    d = rec.Scenario()
    return rec.Scenario(
        users=int(os.environ.get("E2E_DEMO_USERS", d.users)),
        run_s=int(os.environ.get("E2E_DEMO_SECONDS", d.run_s)),
        after_s=int(os.environ.get("E2E_DEMO_AFTER_SECONDS", d.after_s)),
    )


def test_demo_swarm_scales_out_and_back_with_no_failure(cluster: Cluster, tmp_path: Path) -> None:
    scenario = demo_scenario()
    hpa, work = cm.repo_kit()
    # The slowest return to minReplicas the model gives for any swarm (two scale-down windows,
    # from maxReplicas: README "What to expect"), plus one HPA sync period: the cluster may scale
    # out further than the model, and metrics and syncs are not aligned with the swarm's end.
    backs = [b for u in cm.TABLE_USERS if (b := cm.capacity_row(hpa, work, u).back_to_min_s)]
    bound = max(backs, default=hpa.down.window_s) + cm.SYNC_PERIOD_S
    assert scenario.after_s >= bound + rec.SAMPLE_S, "E2E_DEMO_AFTER_SECONDS is too short to see it"
    timeline = rec.record(cluster.url, scenario, cluster.namespace, log=lambda _: None)
    out = Path(os.environ.get("E2E_DEMO_OUT") or tmp_path / "demo-measured.json")
    rec.save(timeline, out)
    found = rec.steps(timeline)
    print(f"\n{rec.summary(timeline)}\ntimeline: {out}")

    assert timeline["locust"]["failures"] == 0, timeline["locust"]["messages"]
    assert timeline["locust"]["requests"] > 0
    assert found.peak >= 2, "the swarm never scaled out" + describe()
    assert found.back_s is not None and found.back_s <= bound, (
        f"not back to {hpa.min_replicas} within {bound} s of the swarm stopping: {found}" + describe())
    # The replicas the model predicts for this swarm, within one, and not pinned at the ceiling.
    predicted = max(k.replicas for k in rec.model_ticks(scenario))
    assert abs(found.peak - predicted) <= 1, f"peak {found.peak}, the model's {predicted}: {found}"
    assert found.peak < hpa.max_replicas or predicted == hpa.max_replicas, found
    # Load follows the pods the HPA adds (MAX_CONNECTION_AGE_SECONDS): from 60 s after the last
    # scale-out until the swarm stops, the busiest pod reads at most 1.5x the least busy one.
    # A swarm long enough for that by the model's timing must show it (CI's shortened demo is);
    # a shorter one (E2E_DEMO_SECONDS) has nothing to compare.
    model_last_out = max((t for t, _ in rec.model_steps(scenario) if t < scenario.run_s), default=0)
    last_out, spread = pod_spread(timeline)
    if model_last_out + 60 + rec.SAMPLE_S <= scenario.run_s:
        assert last_out + 60 + rec.SAMPLE_S <= scenario.run_s, (
            f"the last scale-out, at {last_out} s (the model's: {model_last_out} s), left no time "
            f"to see the load spread before the swarm stopped at {scenario.run_s} s: {found}")
    if last_out + 60 + rec.SAMPLE_S <= scenario.run_s:
        assert spread, f"no reading with every pod 60 s after the last scale-out at {last_out} s"
        assert all(r <= 1.5 for r in spread), f"busiest/least busy pod from {last_out + 60} s: {spread}"


def pod_spread(timeline: dict) -> tuple[float, list[float]]:
    """The last scale-out during the swarm, and the busiest pod's CPU over the least busy one's
    at each reading from 60 s after it until the swarm stops (all pods reporting)."""
    run_s = timeline["scenario"]["run_s"]
    last_out = max((t for t, _ in rec.steps(timeline).reached if t < run_s), default=0.0)
    settled = [s["pods_cpu_m"] for s in timeline["samples"]
               if last_out + 60 <= s["t"] <= run_s and len(s["pods_cpu_m"]) == s["desired"] > 1]
    return last_out, [round(max(p.values()) / max(min(p.values()), 1), 2) for p in settled]


# --- Rolling restarts under a swarm -----------------------------------------------------------


class PodWatch:
    """Every state the pods go through, from a watch: a replaced container's exit code is in its
    pod's last status before the pod object goes, so a watch sees it where a poll may not."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["kubectl", "get", "pods", "-l", "app=math-service", "--watch", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
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


def pods_now() -> set[str]:
    return set(kubectl("get", "pods", "-l", "app=math-service", "-o",
                       "jsonpath={.items[*].metadata.name}").stdout.split())


def test_rolling_restarts_under_a_swarm_lose_nothing_and_exit_0(cluster: Cluster, tmp_path: Path) -> None:
    watch = PodWatch()
    scenario = rec.Scenario(users=ROLLOUT_USERS, spawn_rate=100)
    csv = tmp_path / "locust"
    swarm = subprocess.Popen(rec.locust_command(cluster.url, scenario, csv, run_for=False), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "locust.log").open("w"))
    try:
        time.sleep(10)  # spawned (3 s), and every user's connection is open
        before = pods_now()
        for _ in range(ROLLOUTS):
            kubectl("rollout", "restart", DEPLOYMENT)
            kubectl("rollout", "status", DEPLOYMENT, "--timeout=180s", timeout=190)
        replaced = before | watch.deleting
        deadline = time.monotonic() + 60  # the last old pods finish their preStop and drain
        while (pods_now() & watch.deleting) and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(3)  # users last pinned to an old pod make their next request elsewhere
    finally:
        swarm.send_signal(signal.SIGTERM)
        swarm.wait(60)
        watch.stop()
    requests, failures, messages = locust_results(csv)
    print(f"\n{ROLLOUTS} rollouts under {ROLLOUT_USERS} users: {requests} requests, {failures} failures; "
          f"{len(watch.deleting)} pods replaced, exit codes {watch.exits}")

    assert (failures, messages) == (0, [])
    assert requests > 0
    assert len(watch.deleting) >= ROLLOUTS and before <= watch.deleting
    # Every replaced pod's container ended on its own after SIGTERM: 0, not 137 (SIGKILL).
    assert {name: watch.exits.get(name) for name in replaced} == {name: [0] for name in replaced}


# --- The committed measurement ----------------------------------------------------------------


def test_committed_measured_chart_is_what_the_recorder_draws_from_its_json(tmp_path: Path) -> None:
    timeline = json.loads(MEASURED.read_text())
    drawn = cm.draw_svg(tmp_path / "demo-measured.svg", rec.measured_chart, timeline)
    same = drawn.read_bytes() == MEASURED.with_suffix(".svg").read_bytes()
    assert same, "docs/demo-measured.svg is not drawn from docs/demo-measured.json: redraw it " \
                 "(python tests/demo_recorder.py --draw docs/demo-measured.json)"
    # A real run of the full demo: the model's scenario, scaled out, back, no failure.
    assert timeline["scenario"] == vars(rec.Scenario())
    assert timeline["locust"]["failures"] == 0 and rec.steps(timeline).peak >= 2
    assert "docs/demo-measured.svg" in README


def test_recorder_reads_quantities_and_steps_as_the_api_writes_them() -> None:
    assert [rec.cpu_m(q) for q in ("2500000n", "2500u", "3m", "1")] == [2.5, 2.5, 3.0, 1000.0]
    samples = [{"t": t, "desired": d} for t, d in ((0, None), (5, 1), (35, 3), (50, 5), (310, 5), (400, 1))]
    found = rec.steps({"samples": samples, "scenario": {"run_s": 300}, "hpa": {"min": 1}})
    assert (found.reached, found.peak, found.back_s) == ([(35, 3), (50, 5)], 5, 100)


def test_readme_quotes_the_committed_measurement() -> None:
    timeline = json.loads(MEASURED.read_text())
    found = rec.steps(timeline)
    caption = re.search(r"^!\[[^\]]+\]\(docs/demo-measured\.svg\)\n\n(\*.+\*)$", README, re.M).group(1)
    measured = ", ".join(f"{n} at {t:.0f} s" for t, n in found.reached)
    assert f"{measured.replace(' at', ' pods at', 1)}, back to 1 pod {found.back_s:.0f} s after the swarm stops" in caption
    assert f"{timeline['locust']['requests']:,} requests and 0 failures" in caption
    assert timeline["where"]["kubernetes"] in caption and "tests/demo_recorder.py" in caption
    model = ", ".join(f"{n} at {t} s" for t, n in rec.model_steps(rec.Scenario(**timeline["scenario"])))
    assert f"the model (dashed) says {model}." in caption


def test_readme_says_what_the_measured_plateau_read() -> None:
    """The plateau: every user spawned, then one HPA sync and one sample, until the swarm stops."""
    timeline = json.loads(MEASURED.read_text())
    scenario = rec.Scenario(**timeline["scenario"])
    start = scenario.users / scenario.spawn_rate + cm.SYNC_PERIOD_S + rec.SAMPLE_S
    plateau = [s for s in timeline["samples"] if start <= s["t"] <= scenario.run_s]
    average = [s["cpu_percent"] for s in plateau]
    busiest = [max(s["pods_cpu_m"].values()) for s in plateau]
    others = [v for s in plateau for v in sorted(s["pods_cpu_m"].values())[:-1]]
    assert f"the pods read {min(average)} to {max(average)} % of their request during the plateau" in README
    assert (f"the busiest pod read {min(busiest):.0f} to {max(busiest):.0f}m and the others "
            f"{min(others):.0f} to {max(others):.0f}m") in README
    _, spread = pod_spread(timeline)
    assert f"at most {max(spread):.2f} times the least busy one" in README
