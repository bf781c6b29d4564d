"""The README's AWS path, executed: its shell blocks in README order under `bash -euo pipefail`,
against stub aws, eksctl, docker, kubectl, curl, locust and uv on PATH that record their arguments
and answer as the real tools do. Nothing leaves this machine.

What it shows, for the dozen-command block and for the explained steps: no variable is unset;
the cluster is created in the chosen region; the Deployment kubectl receives carries exactly the
image docker pushed; the same in another region (the region changed where the README says to)
and when everything after `eksctl create cluster` runs in a new shell that has only what the
README saved; and no command holds a `<...>` placeholder.
"""

import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, uvx

README = (ROOT / "README.md").read_text()
DEFAULT_REGION = "eu-west-2"
ACCOUNT = "4321" * 3  # what the stub's `aws sts get-caller-identity` answers
FILES = ("cluster-config.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "locustfile.py")

# The explained path: these sections, in README order (step 3 only tries the image locally).
STEP_SECTIONS = (
    "## Prerequisites",
    "### 2. Configure",
    "### 4. ",
    "### 5. ",
    "### 6. ",
    "### 8. Deploy",
    "### 9. ",
    "### 10. ",
    "### 2. Run Locust",
    "### 3. Monitor Scaling",
    "### Option 1",
)
QUICK_SECTIONS = ("## AWS demo in a dozen commands",)


def bash_blocks(readme: str, headings: tuple[str, ...]) -> list[str]:
    """The ```bash blocks (indented ones too) under the headings that start with `headings`."""
    blocks, heading, fence, body = [], "", None, []
    for line in readme.splitlines():
        if fence is None:
            if opening := re.match(r"( *)```(\w*)\s*$", line):
                fence, lang, body = opening.group(1), opening.group(2), []
            elif re.match(r"#{1,4} ", line):
                heading = line
        elif line == f"{fence}```":
            if lang == "bash" and heading.startswith(headings):
                blocks.append(textwrap.dedent("\n".join(body)) + "\n")
            fence = None
        else:
            body.append(line)
    return blocks


def commands(script: str) -> list[str]:
    """Each command line of a script, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line]


# --- Stubs ------------------------------------------------------------------------------------

STUB_HEAD = """#!/usr/bin/env bash
# Stub {name}: logs its arguments, answers like the real tool.
set -euo pipefail
state={state}
call=$(printf '%q ' {name} "$@"); echo "$call" >> "$state/calls"  # one write: pipes run stubs at once
region() {{ sed -n 's/^  region: //p' "$state/cluster.yaml"; }}
"""

STUBS = {
    "aws": """
case "$*" in
  "sts get-caller-identity --query Account --output text") echo {account} ;;
  "sts get-caller-identity"*) echo '{{"UserId": "AIDAEXAMPLE", "Account": "{account}", "Arn": "arn:aws:iam::{account}:user/operator"}}' ;;
  "service-quotas get-service-quota"*) echo 32.0 ;;
  "ecr describe-repositories"*)
    [ -e "$state/repository" ] || {{ echo "An error occurred (RepositoryNotFoundException)" >&2; exit 254; }} ;;
  "ecr create-repository"*) touch "$state/repository"; echo '{{"repository": {{"repositoryName": "my-math-service"}}}}' ;;
  "ecr get-login-password"*) echo stub-token ;;
  "eks describe-cluster-versions"*) printf '|  1.36 |  STANDARD_SUPPORT |  2027-08-02 |\\n' ;;
  "elb describe-load-balancers"*) echo a0123456789abcdef0123456789abcde ;;
  *) echo '{{}}' ;;
esac
""",
    "eksctl": """
case "$*" in
  version) echo 0.230.0 ;;
  "create cluster -f -") cat > "$state/cluster.yaml" ;;
  "create cluster -f "*) cp "$4" "$state/cluster.yaml" ;;
  "delete cluster"*) echo "all cluster resources were deleted" ;;
  *) exit 0 ;;
esac
case "$*" in "create cluster"*)
  mkdir -p "$HOME/.kube"; echo "current-context: math-service-cluster.$(region)" > "$HOME/.kube/config"
  echo "EKS cluster \\"math-service-cluster\\" in \\"$(region)\\" region is ready" ;;
esac
""",
    "docker": """
case "$*" in
  login*) cat > /dev/null; echo "Login Succeeded" ;;
  "buildx build"*)
    args=("$@"); for i in "${{!args[@]}}"; do [ "${{args[$i]}}" = -t ] && tag=${{args[$((i + 1))]}}; done
    [[ " $* " == *" --push "* ]] && echo "$tag" >> "$state/pushed" ;;
  "buildx imagetools inspect"*)
    grep -qxF "$4" "$state/pushed" || {{ echo "ERROR: $4: not found" >&2; exit 1; }}
    printf 'Name: %s\\nManifests:\\n  Platform: linux/amd64\\n  Platform: linux/arm64\\n' "$4" ;;
esac
""",
    "kubectl": """
[ -e "$HOME/.kube/config" ] || {{ echo "error: no configuration has been provided" >&2; exit 1; }}
case "$*" in
  apply*)
    args=("$@"); for i in "${{!args[@]}}"; do
      if [ "${{args[$i]}}" = -f ]; then
        f=${{args[$((i + 1))]}}; {{ echo ---; if [ "$f" = - ]; then cat; else cat "$f"; fi; }} >> "$state/applied.yaml"
      fi
    done ;;
  *jsonpath=*hostname*) echo "a0123456789abcdef0123456789abcde-1234567890.$(region).elb.amazonaws.com" ;;
  *" -w"*) echo "NAME  READY  STATUS"; echo "math-service  1/1  Running" ;;
  "describe nodes"*) printf 'Allocatable:\\n  cpu:  1930m\\n' ;;
  "rollout status"*) echo 'deployment "math-service-deployment" successfully rolled out' ;;
  *) echo ok ;;
esac
""",
    "curl": """echo '{{"result":15.0}}'\n""",
    "locust": """echo "Aggregated  0 failures"\n""",
    # The demo recorder (Monitor Scaling) runs through uv; it writes files, asks nothing.
    "uv": """echo "wrote demo-eks.json and demo-eks.svg"\n""",
}


def install_stubs(bin_dir: Path, state: Path) -> None:
    bin_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        head = STUB_HEAD.format(name=name, state=shlex.quote(str(state)))
        path.write_text(head + body.format(account=ACCOUNT))
        path.chmod(0o755)


# --- Running the path -------------------------------------------------------------------------


def run_path(readme: str, sections: tuple[str, ...], region: str, new_shell: bool, tmp: Path) -> dict:
    """Run the path's blocks; with new_shell, everything after `eksctl create cluster` runs in a
    fresh bash with only PATH and HOME, in the same directory (what a new terminal has)."""
    script = "\n".join(bash_blocks(readme, sections))
    # Another region, as the previous README told operators to do it: replace it everywhere.
    script = script.replace(DEFAULT_REGION, region)
    work, state, home = tmp / "repo", tmp / "state", tmp / "home"
    for d in (work, state, home):
        d.mkdir()
    for name in FILES:
        (work / name).write_text((ROOT / name).read_text())
    install_stubs(tmp / "bin", state)
    env = {"PATH": f"{tmp / 'bin'}:/usr/bin:/bin", "HOME": str(home)}
    lines = script.splitlines()
    create = next((i for i, line in enumerate(lines) if re.match(r"[^#]*eksctl create cluster", line)), len(lines))
    parts = ["\n".join(lines[: create + 1]), "\n".join(lines[create + 1 :])] if new_shell else [script]
    results = []
    for part in parts:
        results.append(subprocess.run(["bash", "-euo", "pipefail", "-c", part], cwd=work, env=env,
                                      capture_output=True, text=True, timeout=60))
        if results[-1].returncode:
            break
    calls = [shlex.split(line) for line in (state / "calls").read_text().splitlines()] if (state / "calls").exists() else []
    applied = [d for d in yaml.safe_load_all((state / "applied.yaml").read_text()) if d] if (state / "applied.yaml").exists() else []
    return {
        "script": script,
        "results": results,
        "calls": calls,
        "pushed": (state / "pushed").read_text().split() if (state / "pushed").exists() else [],
        "cluster": yaml.safe_load((state / "cluster.yaml").read_text()) if (state / "cluster.yaml").exists() else None,
        "applied": applied,
    }


def check_path(run: dict, region: str) -> None:
    log = "\n".join(f"--- exit {r.returncode}\n{r.stderr[-2000:]}" for r in run["results"])
    # The cluster is created, in the chosen region, from cluster-config.yaml otherwise unchanged.
    assert run["cluster"] is not None, f"eksctl created no cluster\n{log}"
    assert run["cluster"]["metadata"]["region"] == region, f"cluster created in {run['cluster']['metadata']['region']}, not {region}"
    original = yaml.safe_load((ROOT / "cluster-config.yaml").read_text())
    assert run["cluster"] | {"metadata": original["metadata"]} == original
    # One image pushed, to this account's registry in this region; exactly it is deployed.
    assert len(set(run["pushed"])) == 1, f"pushed {run['pushed']}\n{log}"
    pushed = run["pushed"][0]
    assert pushed.startswith(f"{ACCOUNT}.dkr.ecr.{region}.amazonaws.com/my-math-service:")
    deployments = [d for d in run["applied"] if d["kind"] == "Deployment"]
    assert deployments, f"kubectl received no Deployment\n{log}"
    images = {c["image"] for d in deployments for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {pushed}, f"kubectl received image {images}, docker pushed {pushed}"
    expected = yaml.safe_load((ROOT / "deployment.yaml").read_text())
    expected["spec"]["template"]["spec"]["containers"][0]["image"] = pushed
    assert deployments[0] == expected, "the Deployment applied differs from deployment.yaml beyond its image"
    for name in ("service.yaml", "hpa.yaml"):
        assert yaml.safe_load((ROOT / name).read_text()) in run["applied"], f"{name} was not applied"
    # Every call that names a region names this one; the ELB's hostname reaches curl and locust.
    for call in run["calls"]:
        for i, arg in enumerate(call[:-1]):
            if arg == "--region":
                assert call[i + 1] == region, f"{shlex.join(call)}: not {region}"
    elb = f"a0123456789abcdef0123456789abcde-1234567890.{region}.elb.amazonaws.com"
    assert any(c[0] == "curl" and f"http://{elb}/" in c for c in run["calls"]), "curl never called the ELB"
    assert any(c[0] == "locust" and f"http://{elb}" in c for c in run["calls"]), "locust never swarmed the ELB"
    # Last, the run as a whole: no unset variable, no failing command.
    assert all(r.returncode == 0 for r in run["results"]), log


CASES = {
    "same-shell": (DEFAULT_REGION, False),
    "us-east-1": ("us-east-1", False),
    "new-shell": (DEFAULT_REGION, True),
    "us-east-1-new-shell": ("us-east-1", True),
}
PATHS = {"dozen-commands": QUICK_SECTIONS, "steps": STEP_SECTIONS}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", PATHS)
def test_readme_aws_path_deploys_the_pushed_image(path: str, case: str, tmp_path: Path) -> None:
    region, new_shell = CASES[case]
    check_path(run_path(README, PATHS[path], region, new_shell, tmp_path), region)


@pytest.mark.parametrize("path", PATHS)
def test_readme_aws_path_names_the_region_once_and_holds_no_placeholder(path: str) -> None:
    lines = commands("\n".join(bash_blocks(README, PATHS[path])))
    assert lines
    assert [line for line in lines if DEFAULT_REGION in line] == [f"export AWS_REGION={DEFAULT_REGION}"]
    placeholders = [line for line in lines if re.search(r"<[A-Za-z_][\w-]*>", line)]
    assert placeholders == [], placeholders


def test_no_bash_block_anywhere_holds_a_placeholder() -> None:
    pages = [README, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    lines = [line for text in pages for line in commands("\n".join(bash_blocks(text, ("#",))))]
    assert [line for line in lines if re.search(r"<[A-Za-z_][\w-]*>", line)] == []


def normalized(script: str) -> set[str]:
    """Command lines with guard messages taken out: `${X:?...}` reads as `$X`."""
    lines = {re.sub(r"\$\{(\w+):\?[^}]*\}", r"$\1", line) for line in commands(script)}
    return {line for line in lines if not re.fullmatch(r': "\$\w+"', line)}


def test_the_dozen_commands_are_the_steps_commands() -> None:
    quick = normalized("\n".join(bash_blocks(README, QUICK_SECTIONS)))
    steps = normalized("\n".join(bash_blocks(README, STEP_SECTIONS)))
    assert quick and quick <= steps, sorted(quick - steps)


def test_deploy_block_is_the_interface_the_e2e_suite_runs() -> None:
    """The first bash block under `### 8. Deploy`: all three manifests, the image only from
    $IMAGE (guarded), no file sourced, no namespace."""
    block = bash_blocks(README, ("### 8. Deploy",))[0]
    for name in ("deployment.yaml", "service.yaml", "hpa.yaml"):
        assert name in block
    assert "${IMAGE:?" in block and not re.search(r"^\s*(\.|source)\s", block, re.M)
    assert "--namespace" not in block and " -n " not in block


def test_demo_swarm_is_the_models_scenario() -> None:
    """Every locust swarm of the demo size runs the model's spawn rate and duration."""
    import cluster_model as cm

    swarms = re.findall(r"locust -f locustfile\.py --headless -u (\d+) -r (\d+) -t (\d+)m", README)
    demo = [(r, t) for u, r, t in swarms if int(u) == cm.DEMO_USERS]
    assert demo and set(demo) == {(str(cm.SPAWN_RATE), str(cm.DEMO_RUN_S // 60))}, swarms


@pytest.mark.parametrize("path", PATHS)
def test_readme_aws_path_passes_shellcheck(path: str, tmp_path: Path) -> None:
    script = tmp_path / "path.sh"
    script.write_text("\n".join(bash_blocks(README, PATHS[path])))
    # SC1091: .demo.env exists only once step 4 has run.
    result = uvx("shellcheck", "--shell=bash", "--exclude=SC1091", str(script), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
