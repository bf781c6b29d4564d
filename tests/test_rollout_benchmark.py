"""tests/rollout_benchmark.py replays the pod termination deployment.yaml gives, and says when
it cannot run. (The benchmark itself takes minutes; it is run by hand, see README "Shutdown".)"""

import copy
import subprocess
import sys

from cluster_model import app_container, manifest
from conftest import ROOT
from rollout_benchmark import termination_sequence


def test_termination_sequence_follows_the_manifest() -> None:
    changed = copy.deepcopy(manifest("deployment.yaml"))
    changed["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 45
    app_container(changed)["lifecycle"]["preStop"]["sleep"]["seconds"] = 7
    assert termination_sequence(changed) == (7, 45)


def test_prestop_defaults_to_the_manifest() -> None:
    out = subprocess.run([sys.executable, "tests/rollout_benchmark.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert "default: deployment.yaml's, 10)" in " ".join(out.stdout.split())


def test_without_haproxy_it_says_so_and_stops() -> None:
    out = subprocess.run([sys.executable, "tests/rollout_benchmark.py"], cwd=ROOT,
                         env={"PATH": "/nonexistent"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "haproxy is not installed" in out.stdout and "nothing was run" in out.stdout
