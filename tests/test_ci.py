"""The GitHub Actions workflow: valid, pinned, and running the README's test command."""

import re
from pathlib import Path

import yaml

from helpers import ROOT, TEST_COMMAND, uvx

WORKFLOW = ROOT / ".github/workflows/ci.yml"


def actionlint(workflow: Path):
    # With shellcheck, so that `run:` scripts are checked here as on a runner that has it.
    return uvx("actionlint", "-no-color", str(workflow), helpers=("shellcheck",))


def test_workflow_passes_actionlint() -> None:
    proc = actionlint(WORKFLOW)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "ci.yml"
    broken.write_text(WORKFLOW.read_text().replace("ubuntu-latest", "ubuntu-lastest"))
    assert "[runner-label]" in actionlint(broken).stdout


def test_workflow_runs_the_readme_command_on_every_push_with_pinned_actions() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert set(workflow[True]) == {"push", "pull_request"}  # PyYAML reads the key `on` as True
    test, e2e = workflow["jobs"]["test"], workflow["jobs"]["e2e"]
    assert test["runs-on"] == "ubuntu-latest"  # Docker is installed and running there
    assert test["steps"][-1]["run"] == TEST_COMMAND
    # The e2e file would skip there, unseen: job e2e runs it, on kind.
    assert "--ignore=tests/test_e2e.py" in test["steps"][-1]["env"]["PYTEST_ADDOPTS"]
    assert any("pytest tests/test_e2e.py" in step.get("run", "") for step in e2e["steps"])
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]


def test_e2e_job_installs_the_charts_the_readme_does() -> None:
    helm = re.compile(r"helm install (\w+) ([\w/-]+) --version ([\d.]+)")
    readme = set(helm.findall((ROOT / "README.md").read_text()))
    assert readme and set(helm.findall(WORKFLOW.read_text())) == readme


def test_e2e_job_runs_on_kind_with_a_load_balancer_and_metrics() -> None:
    steps = {step.get("uses", "").split("@")[0] or step["name"]: step
             for step in yaml.safe_load(WORKFLOW.read_text())["jobs"]["e2e"]["steps"]}
    kind = steps["helm/kind-action"]["with"]  # a pinned kind, whose LoadBalancer Services get an address
    assert re.fullmatch(r"v\d+\.\d+\.\d+", kind["version"]) and kind["cloud_provider"] is True
    metrics = steps["Install metrics-server"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", metrics["env"]["METRICS_SERVER_VERSION"])  # pinned
    assert "--kubelet-insecure-tls" in metrics["run"] and "kubectl wait" in metrics["run"]
    assert "kind load docker-image" in steps["Build the image and load it into kind"]["run"]
    assert steps["On failure, what the cluster saw"]["if"] == "failure()"
