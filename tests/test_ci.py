"""The GitHub Actions workflow: valid, pinned, and running the README's test command."""

import re
from pathlib import Path

import yaml
from conftest import ROOT, uvx
from test_readme import TEST_COMMAND

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
    # PyYAML reads the key `on` as True (YAML 1.1).
    assert set(workflow[True]) == {"push", "pull_request"}
    assert set(workflow["jobs"]) == {"test", "e2e"}
    job = workflow["jobs"]["test"]
    assert job["runs-on"] == "ubuntu-latest"  # Docker is installed and running there
    assert job["steps"][-1]["run"] == TEST_COMMAND
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]


def test_e2e_job_runs_the_suite_on_kind_with_a_load_balancer_and_metrics() -> None:
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["e2e"]
    steps = {step.get("uses", "").split("@")[0] or step["name"]: step for step in job["steps"]}
    kind = steps["helm/kind-action"]
    assert kind["with"] == {"version": "v0.32.0", "cloud_provider": True}
    metrics = steps["Install metrics-server"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", metrics["env"]["METRICS_SERVER_VERSION"])  # pinned
    assert "--kubelet-insecure-tls" in metrics["run"] and "kubectl wait" in metrics["run"]
    assert "kind load docker-image" in steps["Build the image and load it into kind"]["run"]
    assert "tests/test_e2e.py" in steps["End-to-end tests"]["run"]
    assert steps["On failure, what the cluster saw"]["if"] == "failure()"
