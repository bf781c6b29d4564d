"""The cluster model's own algorithm (tests/tools/cluster_model.py), apart from the kit it computes:
the HPA controller's rules, and the swarm it replays."""

import ast
from dataclasses import replace

import pytest

import cluster_model as cm
import demo_recorder


def _pods(*cpu_m: float, ready_at: float = 0) -> list[cm._Pod]:
    return [cm._Pod(0, ready_at, scrapes=[(0, 0, 0), (15, c * 15, 0)]) for c in cpu_m]


def test_model_swarm_is_the_locustfiles():
    """The model's users loop the locustfile's tasks with its weights and think time."""
    tree = ast.parse((cm.ROOT / "locustfile.py").read_text())
    user = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MathServiceUser")
    wait = next(n.value for n in user.body if isinstance(n, ast.Assign) and n.targets[0].id == "wait_time")
    assert sum(ast.literal_eval(a) for a in wait.args) / 2 == cm.THINK_S  # between(1, 2)
    weights = {}
    for task in (n for n in user.body if isinstance(n, ast.FunctionDef) and n.decorator_list):
        (weight,) = task.decorator_list[0].args
        call = next(n for n in ast.walk(task) if isinstance(n, ast.Call) and
                    any(k.arg == "name" for k in n.keywords))
        name = next(k.value.value for k in call.keywords if k.arg == "name")
        weights[name] = weight.value
    assert weights == cm.TASK_WEIGHTS


def test_model_follows_the_documented_algorithm():
    # 200m used of a 100m target doubles; 50m halves; within 0.1 of the target, nothing.
    assert cm.desired_for_metric(_pods(200, 200), 30, "cpu", 100, 100, 2)[0] == 4
    assert cm.desired_for_metric(_pods(50, 50, 50, 50), 30, "cpu", 100, 100, 4)[0] == 2
    assert cm.desired_for_metric(_pods(105, 105), 30, "cpu", 100, 100, 2)[0] == 2
    # A starting pod is set aside, not taken for idle: no scale-down while it starts.
    assert cm.desired_for_metric(_pods(100) + _pods(0, ready_at=100), 30, "cpu", 100, 100, 2)[0] == 2
    # Utilisation is whole percent of the summed requests; usage is rounded up to 1m.
    assert cm.desired_for_metric(_pods(1.2), 30, "cpu", 20, 100, 1) == (1, 2)


def test_model_stabilises_scale_down():
    hpa, work = cm.repo_kit()
    idle = cm.simulate(hpa, work, lambda t: 0, 300, start_replicas=3)
    first_down = next(k.t for k in idle if k.replicas < 3)
    # The first sync records the current count; lower ones wait out the window.
    assert first_down >= hpa.down.window_s
    no_window_hpa = replace(hpa, down=replace(hpa.down, window_s=0))
    no_window = cm.simulate(no_window_hpa, work, lambda t: 0, 300, start_replicas=3)
    assert next(k.t for k in no_window if k.replicas < 3) < first_down


def test_recorder_reads_quantities_and_steps_as_the_api_writes_them() -> None:
    read = [demo_recorder.quantity(q) for q in ("2500000n", "2500u", "3m", "1", "377")]
    assert read == pytest.approx([0.0025, 0.0025, 0.003, 1.0, 377.0])
    samples = [{"t": t, "desired": d} for t, d in ((0, None), (5, 1), (35, 3), (50, 5), (310, 5), (400, 1))]
    found = demo_recorder.steps({"samples": samples, "scenario": {"run_s": 300}, "autoscaler": {"min": 1}})
    assert (found.reached, found.peak, found.back_s) == ([(35, 3), (50, 5)], 5, 100)
