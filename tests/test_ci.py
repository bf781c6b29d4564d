"""How the suite runs: on a machine without the optional tools, and in the GitHub Actions
workflow (valid, pinned, running the README's test command)."""

import os
import re
import subprocess
import sys
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
    # The node scenarios can terminate and boot the kind nodes.
    assert {"E2E_NODE_STOP", "E2E_NODE_START"} <= steps["End-to-end tests"]["env"].keys()
    metrics = steps["Install metrics-server"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", metrics["env"]["METRICS_SERVER_VERSION"])  # pinned
    assert "--kubelet-insecure-tls" in metrics["run"] and "kubectl wait" in metrics["run"]
    assert "kind load docker-image" in steps["Build the image and load it into kind"]["run"]
    assert steps["On failure, what the cluster saw"]["if"] == "failure()"



# What a fresh Linux machine (python:3.11-slim, a stock Debian or Ubuntu) lacks, and the tests that use it.
OPTIONAL = ("zsh", "kubectl", "docker", "podman", "eksctl", "haproxy", "wrk")
USING_THEM = ["-k", "zsh or pasted_alone or not test_readme_path", "tests/test_readme_path.py", "tests/test_image.py",
              "tests/test_e2e.py", "tests/test_cluster.py::test_cluster_config_valid_for_eksctl"]


def test_a_machine_without_the_optional_tools_skips_their_tests_saying_which_is_missing(tmp_path: Path) -> None:
    """The README's promise for a machine with nothing but uv: the tests that need zsh, a container
    engine, eksctl or a cluster skip, each naming what is missing, and none fails."""
    for program in (p for d in os.environ["PATH"].split(os.pathsep) if Path(d).is_dir() for p in Path(d).iterdir()):
        if program.name not in OPTIONAL and os.access(program, os.X_OK) and not (tmp_path / program.name).exists():
            (tmp_path / program.name).symlink_to(program)  # this PATH, less the optional programs
    unset = ("CONTAINER_ENGINE", "KUBECONFIG", "E2E_IMAGE", "EKSCTL_SCHEMA", "PYTEST_ADDOPTS")
    run = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", *USING_THEM], cwd=ROOT, timeout=900,
                         env={k: v for k, v in os.environ.items() if k not in unset} | {"PATH": str(tmp_path)}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    reasons = re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", run.stdout, re.M)
    assert all(any(tool in reason for tool in OPTIONAL) for reason in reasons), reasons
    assert {"zsh", "kubectl", "docker", "eksctl"} <= {tool for r in reasons for tool in OPTIONAL if tool in r}, run.stdout[-3000:]
