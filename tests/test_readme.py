"""The README is followed command by command: what it names must exist and match."""

import re
import subprocess
import sys

import pytest
from cluster_model import manifest
from conftest import ROOT, project_files

README = (ROOT / "README.md").read_text()
TEST_COMMAND = (
    "uv run --with-requirements service.py --with-requirements tests/requirements.txt pytest tests"
)


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def test_every_file_in_the_project_structure_exists() -> None:
    tree = re.search(r"### 1\. Project Structure.*?```\n(.*?)```", README, flags=re.S).group(1)
    names = re.findall(r"[├└]── ([\w./-]+)", tree)
    assert {"service.py", "Dockerfile", "deployment.yaml", "locustfile.py"} <= set(names)
    for name in names:
        assert (ROOT / name).exists(), f"README lists {name}, which is not in the repository"
    top_level = {path.parts[0] for path in project_files()}
    assert top_level <= {n.rstrip("/") for n in names}, "a file is missing from the README's tree"


def test_local_commands_are_the_ones_the_repository_uses() -> None:
    assert "uv run service.py" in README
    ci = (ROOT / ".ci/run").read_text()
    assert TEST_COMMAND in ci and TEST_COMMAND in README
    swarm = re.search(r"locust -f locustfile\.py --headless [^\n]*-H http://localhost:8000", README)
    assert swarm, "README shows no local headless swarm"
    bench = re.search(r"uv run [^\n]*python (tests/[\w.]+\.py)", README)
    assert bench and (ROOT / bench.group(1)).exists()


@pytest.mark.parametrize("name", ["cluster-config.yaml", "deployment.yaml", "service.yaml", "hpa.yaml"])
def test_manifests_shown_in_the_readme_are_the_files(name: str) -> None:
    shown = [b for b in code_blocks("yaml") if b.startswith(f"# {name}")]
    assert shown, f"README does not show {name}"
    assert shown[0] == (ROOT / name).read_text()


def test_names_ports_and_region_in_commands_match_the_manifests() -> None:
    cluster, deployment = manifest("cluster-config.yaml"), manifest("deployment.yaml")
    service, hpa = manifest("service.yaml"), manifest("hpa.yaml")
    commands = "\n".join(code_blocks("bash"))

    region, cluster_name = cluster["metadata"]["region"], cluster["metadata"]["name"]
    nodegroup = cluster["managedNodeGroups"][0]["name"]
    assert f"--cluster {cluster_name}" in commands and f"--name {nodegroup}" in commands
    assert f"--region {region}" in commands or f"AWS_REGION={region}" in commands

    for ref in re.findall(r"deployment/([\w-]+)", commands):
        assert ref == deployment["metadata"]["name"]
    for ref in re.findall(r"kubectl (?:get|describe) (?:service|svc) ([\w-]+)", commands):
        assert ref == service["metadata"]["name"]
    for ref in re.findall(r"kubectl (?:get|describe) hpa ([\w-]+)", commands):
        assert ref == hpa["metadata"]["name"]
    for label in re.findall(r"-l (app=[\w-]+)", commands):
        key, value = label.split("=")
        assert deployment["spec"]["template"]["metadata"]["labels"][key] == value

    # The curl goes to the ELB's port 80, which must reach the container's port.
    port = service["spec"]["ports"][0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert '"http://$ELB/"' in commands and port["port"] == 80
    assert port["targetPort"] == container["ports"][0]["containerPort"]
    for name in ("service.yaml", "hpa.yaml"):
        assert f"kubectl apply -f {name}" in commands
    # deployment.yaml is applied with its placeholder image replaced by $IMAGE.
    placeholder = container["image"]
    assert f's|{placeholder}|$IMAGE|" deployment.yaml' in commands
    assert re.search(r"export IMAGE=\$REGISTRY/my-math-service:\$TAG", commands)


def marked(name: str) -> str:
    return re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", README, re.S).group(1)


def test_capacity_table_is_the_models_current_output() -> None:
    model = subprocess.run([sys.executable, "tests/cluster_model.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True, timeout=120)
    assert marked("capacity") == model.stdout.strip()


def test_performance_table_is_the_last_benchmark_run() -> None:
    # benchmark.py writes measured.json, performance.md and this section from one run.
    assert marked("benchmark") == (ROOT / "tests/performance.md").read_text().strip()


def test_every_test_the_readme_cites_exists() -> None:
    cited = set(re.findall(r"\b(test_\w+)(?!\.py)\b", README))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    assert cited and cited <= defined, sorted(cited - defined)


def test_no_real_account_id_anywhere() -> None:
    for path in project_files():
        text = (ROOT / path).read_text(errors="ignore")
        # An AWS account id is 12 digits; in an ECR host or an ARN it sits before ".dkr.ecr."
        # or after the region.
        assert not re.search(r"\b\d{12}\.dkr\.ecr\.|:[a-z]{2}-[a-z]+-\d:\d{12}:", text), path
