"""The README's commands, executed in README order, in bash (`-euo pipefail`) and pasted into zsh
as macOS ships it, against stubs on PATH (aws, eksctl, docker, kubectl, curl, helm, uv, git, brew;
sleep fails, as Ctrl+C ends a refresh loop) that record their arguments and answer as the real
tools do. Nothing leaves this machine. check_path and each test say what they show.
"""

import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

import cluster_model as cm
from helpers import ROOT, need, uvx
from test_e2e import deploy_block

README = (ROOT / "README.md").read_text()
DEFAULT_REGION = "eu-west-2"
ACCOUNT = "4321" * 3  # what the stub's `aws sts get-caller-identity` answers
PROFILE = "demo-operator"  # the first shell's AWS_PROFILE: every later shell must use it too
ELB = "a0123456789abcdef0123456789abcde-1234567890.{region}.elb.amazonaws.com"
# The manifests the deploy applies: every one at the root but the cluster's and KEDA's alternative.
KIT = sorted({p.name for p in ROOT.glob("*.yaml")} - {"cluster-config.yaml", "keda-scaledobject.yaml"})
FILES = ("cluster-config.yaml", *KIT, "keda-scaledobject.yaml", "locustfile.py")
KEDA_HPA = "keda-hpa-" + yaml.safe_load((ROOT / "keda-scaledobject.yaml").read_text())["metadata"]["name"]


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of a page, indented ones too."""
    blocks, fence, body = [], None, []
    for line in text.splitlines():
        if fence is None:
            if opening := re.match(r"( *)```(\w*)\s*$", line):
                fence, lang, body = opening.group(1), opening.group(2), []
        elif line == f"{fence}```":
            if lang == "bash":
                blocks.append(textwrap.dedent("\n".join(body)) + "\n")
            fence = None
        else:
            body.append(line)
    return blocks


def aws_path() -> list[str]:
    """The AWS demo's blocks, steps 1 to the teardown, in README order."""
    return bash_blocks(README.split("\n## AWS demo\n", 1)[1].split("\n## ", 1)[0])


STUB_HEAD = """#!/usr/bin/env bash
# Stub {name}: logs its arguments, answers like the real tool.
set -euo pipefail
state={state}
call=$(printf '%q ' {name} "$@"); echo "$call" >> "$state/calls"; n=$(wc -l < "$state/calls")
echo "${{AWS_PROFILE:-none}}" >> "$state/profiles"
region() {{ sed -n 's/^  region: //p' "$state/cluster.yaml"; }}
stdin() {{ input=$(cat); [ -n "$input" ] || echo "$call" >> "$state/empty-input"; printf '%s\\n' "$input"; }}
"""

STUBS = {
    "aws": """
case "$*" in
  "sts get-caller-identity --query Account --output text") echo {account} ;;
  "sts get-caller-identity"*) echo '{{"Account": "{account}", "Arn": "arn:aws:iam::{account}:user/operator"}}' ;;
  "service-quotas get-service-quota"*) echo 32.0 ;;
  "ecr describe-repositories"*)
    [ -e "$state/repository" ] || {{ echo "An error occurred (RepositoryNotFoundException)" >&2; exit 254; }} ;;
  "ecr create-repository"*) touch "$state/repository"; echo '{{"repository": {{"repositoryName": "my-math-service"}}}}' ;;
  "ecr get-login-password"*) echo stub-token ;;
  "ecr describe-images"*) tag=$(printf '%s\\n' "$@" | sed -n 's/^imageTag=//p')
    [ -n "$tag" ] && grep -qs ":$tag\\$" "$state/pushed" || {{ echo "An error occurred (ImageNotFoundException)" >&2; exit 254; }} ;;
  "eks describe-cluster-versions"*) printf '|  1.36 |  STANDARD_SUPPORT |  2027-08-02 |\\n' ;;
  "elb describe-load-balancers"*) echo a0123456789abcdef0123456789abcde ;;
  *) echo '{{}}' ;;
esac
""",
    "eksctl": """
case "$*" in
  version) echo 0.230.0 ;;
  "create cluster -f -") stdin > "$state/cluster.yaml"; mkdir -p "$HOME/.kube"
    echo "current-context: math-service-cluster.$(region)" > "$HOME/.kube/config"
    echo "EKS cluster \\"math-service-cluster\\" in \\"$(region)\\" region is ready" ;;
  "delete cluster"*) echo "all cluster resources were deleted" ;;
esac
""",
    "docker": """
case "$*" in
  login*) stdin > /dev/null; echo "Login Succeeded" ;;
  "buildx build"*)
    args=("$@"); for i in "${{!args[@]}}"; do [ "${{args[$i]}}" = -t ] && tag=${{args[$((i + 1))]}}; done
    ! grep -qsxF "$tag" "$state/pushed" || {{ echo "ERROR: tag invalid: $tag already exists and cannot be overwritten" >&2; exit 1; }}
    [[ " $* " == *" --push "* ]] && echo "$tag" >> "$state/pushed" ;;
  "buildx imagetools inspect"*)
    grep -qxF "$4" "$state/pushed" || {{ echo "ERROR: $4: not found" >&2; exit 1; }}
    printf 'Name: %s\\nManifests:\\n  Platform: linux/amd64\\n  Platform: linux/arm64\\n' "$4" ;;
esac
""",
    # apply and delete keep their files, numbered by call, so that the cluster's objects can be replayed.
    "kubectl": """
[ -e "$HOME/.kube/config" ] || {{ echo "error: no configuration has been provided" >&2; exit 1; }}
case "$*" in
  apply*|delete*)
    args=("$@"); for i in "${{!args[@]}}"; do
      if [ "${{args[$i]}}" = -f ]; then
        f=${{args[$((i + 1))]}}; {{ echo ---; if [ "$f" = - ]; then stdin; else cat "$f"; fi; }} >> "$state/$1-$n.yaml"
      fi
    done ;;
  *jsonpath=*hostname*) echo "{elb}" | sed "s/{{region}}/$(region)/" ;;
  *" -w"*) echo "NAME  READY  STATUS"; echo "math-service  1/1  Running" ;;
  "rollout status"*) echo 'deployment "math-service-deployment" successfully rolled out' ;;
  *) echo ok ;;
esac
""",
    "curl": """case "$*" in *install.sh*) echo 'echo installed uv' ;; *) echo '{{"result":15.0}}' ;; esac\n""",
    "helm": """echo "STATUS: deployed"\n""", "uv": """echo "Aggregated  0 failures"\n""", "brew": """echo "==> $*"\n""",
    # A clone is this directory again; the commit is fixed, so the build step sees the same tag twice.
    "git": """case "$1" in clone) ln -s "$PWD" "$3" ;; rev-parse) echo 0a1b2c3 ;; esac\n""", "sleep": "exit 1\n",
}


def install_stubs(bin_dir: Path, state: Path) -> None:
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(STUB_HEAD.format(name=name, state=shlex.quote(str(state))) + body.format(account=ACCOUNT, elb=ELB))
        (bin_dir / name).chmod(0o755)


# bash as a script; zsh (as on macOS) and bash as a paste into a terminal: interactive, no startup files, lines on stdin.
SHELLS = {"bash": ["bash", "-euo", "pipefail", "-c"], "zsh": ["zsh", "-f", "-i"], "bash-paste": ["bash", "--norc", "--noprofile", "-i"]}


def run(shell: str, script: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    args = [need(SHELLS[shell][0]), *SHELLS[shell][1:]]  # without zsh (most Linux), a skip naming it
    args, stdin = ([*args, script], None) if shell == "bash" else (args, script)
    return subprocess.run(args, input=stdin, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def run_path(blocks: list[str], region: str, new_shell: bool, tmp: Path, shell: str = "bash") -> dict:
    """Run the blocks; with new_shell, the cluster's creation and each block that restores `.demo.env`
    start a fresh shell (only PATH and HOME, as a new terminal), which the blocks after them share."""
    blocks = [b.replace(f"AWS_REGION={DEFAULT_REGION}", f"AWS_REGION={region}") for b in blocks]  # where the README sets it
    work, state, home = tmp / "repo", tmp / "state", tmp / "home"
    [d.mkdir(parents=True, exist_ok=True) for d in (work, state, home)]
    [(work / name).write_text((ROOT / name).read_text()) for name in FILES]
    install_stubs(tmp / "bin", state)
    env = {"PATH": f"{tmp / 'bin'}:/usr/bin:/bin", "HOME": str(home)}
    parts = [""]
    for block in blocks:
        if new_shell and (block.startswith(". ./.demo.env\n") or "eksctl create cluster" in block):
            parts.append("")
        parts[-1] += block
    results = []
    for part in parts:
        first = {"AWS_PROFILE": PROFILE, "REPO_URL": "https://git.example/math-service.git"}
        results.append(run(shell, part + "\n", work, env if results else {**env, **first}))
        if results[-1].returncode and shell == "bash":
            break
    read = {name: (state / name).read_text() if (state / name).exists() else "" for name in ("calls", "pushed", "cluster.yaml", "empty-input")}
    return {"results": results, "state": state, "calls": [shlex.split(line) for line in read["calls"].splitlines()],
            "pushed": read["pushed"].split(), "cluster": yaml.safe_load(read["cluster.yaml"]), "empty input": read["empty-input"]}


def objects_over_time(run: dict) -> tuple[list[set[tuple[str, str]]], list[dict]]:
    """After each call, the objects in the cluster (kind, name); and every document applied."""
    present, history, applied = set(), [], []
    for n, call in enumerate(run["calls"], 1):
        history.append(set(present))
        if call[:1] != ["kubectl"] or call[1] not in ("apply", "delete"):
            continue
        path = run["state"] / f"{call[1]}-{n}.yaml"
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d] if path.exists() else []
        named = {(d["kind"], d["metadata"]["name"]) for d in docs}
        if call[1] == "apply":
            present |= named
            applied += docs
        else:
            present -= named | ({("HorizontalPodAutoscaler", call[3])} if call[2] == "hpa" else set())
        history[-1] = set(present)
    return history, applied


def check_path(run: dict, region: str, shell: str) -> None:
    """The AWS demo as run: the cluster created and deleted in the chosen region; exactly the
    pushed image deployed; hpa.yaml and the ScaledObject never together, each HPA watched existing
    then; every command in this region and profile; no piped tool reading nothing."""
    log = "\n".join(f"--- exit {r.returncode}\n{r.stderr[-2000:]}" for r in run["results"])
    # The cluster is created, in the chosen region, from cluster-config.yaml otherwise unchanged.
    assert run["cluster"] is not None, f"eksctl created no cluster\n{log}"
    assert run["cluster"]["metadata"]["region"] == region, f"cluster created in {run['cluster']['metadata']['region']}"
    original = yaml.safe_load((ROOT / "cluster-config.yaml").read_text())
    assert run["cluster"] | {"metadata": original["metadata"]} == original
    # One image pushed, to this account's registry in this region; exactly it is deployed.
    assert len(set(run["pushed"])) == 1, f"pushed {run['pushed']}\n{log}"
    pushed = run["pushed"][0]
    assert pushed.startswith(f"{ACCOUNT}.dkr.ecr.{region}.amazonaws.com/my-math-service:")
    history, applied = objects_over_time(run)
    deployments = [d for d in applied if d["kind"] == "Deployment"]
    assert deployments, f"kubectl received no Deployment\n{log}"
    expected = yaml.safe_load((ROOT / "deployment.yaml").read_text())
    expected["spec"]["template"]["spec"]["containers"][0]["image"] = pushed
    assert all(d == expected for d in deployments), "the Deployment applied is not deployment.yaml with the pushed image"
    for name in set(KIT) - {"deployment.yaml"}:
        assert yaml.safe_load((ROOT / name).read_text()) in applied, f"{name} was not applied"
    # hpa.yaml and KEDA's ScaledObject (which makes an HPA of its own) are never in the cluster together.
    both = {("HorizontalPodAutoscaler", "math-service-hpa"), ("ScaledObject", "math-service")}
    assert not [objects for objects in history if both <= objects], history
    # Each HPA watched exists then: hpa.yaml's, or the one KEDA makes for the ScaledObject.
    watched = [(c[3], objects) for c, objects in zip(run["calls"], history) if c[:3] == ["kubectl", "get", "hpa"] and "-w" in c]
    hpas = [{n for k, n in objects if k == "HorizontalPodAutoscaler"} | {f"keda-hpa-{n}" for k, n in objects if k == "ScaledObject"}
            for _, objects in watched]
    assert all(name in names for (name, _), names in zip(watched, hpas)) and KEDA_HPA in [n for n, _ in watched], watched
    # Every call that names a region names this one; the load balancer reaches curl and locust.
    assert [c for c in run["calls"] if any(a == "--region" and c[i + 1] != region for i, a in enumerate(c[:-1]))] == []
    elb = ELB.format(region=region)
    assert any(c[0] == "curl" and f"http://{elb}/" in c for c in run["calls"]), f"curl never called the ELB\n{log}"
    assert any(c[:3] == ["uv", "run", "locustfile.py"] and f"http://{elb}" in c for c in run["calls"]), "no swarm"
    deleted = [c for c in run["calls"] if c[:3] == ["eksctl", "delete", "cluster"]]
    assert deleted and all(c[c.index("--region") + 1] == region for c in deleted), deleted
    assert set((run["state"] / "profiles").read_text().split()) == {PROFILE}, "a command ran without AWS_PROFILE"
    assert run["empty input"] == "", "a piped tool read nothing: " + run["empty input"]
    # Last, the run as a whole: no unset variable, no failing command (bash), no word zsh misread.
    if shell == "bash":
        assert all(r.returncode == 0 for r in run["results"]), log
    else:
        assert_pasted_cleanly(run)


def assert_pasted_cleanly(run: dict) -> None:
    """No stub got a `#` word (zsh passes a pasted comment on as arguments) and zsh found every
    command and every word it was given."""
    hashes = [shlex.join(c) for c in run["calls"] if any(arg.startswith("#") for arg in c)]
    assert hashes == [], hashes
    errors = [line for r in run["results"] for line in r.stderr.splitlines() if "zsh: " in line]
    assert errors == [], errors


CASES = {"same-shell": (DEFAULT_REGION, False), "us-east-1": ("us-east-1", False),
         "new-shell": (DEFAULT_REGION, True), "us-east-1-new-shell": ("us-east-1", True)}


@pytest.mark.parametrize("shell", ["bash", "zsh"])
@pytest.mark.parametrize("case", CASES)
def test_readme_aws_path_deploys_the_pushed_image(case: str, shell: str, tmp_path: Path) -> None:
    region, new_shell = CASES[case]
    check_path(run_path(aws_path(), region, new_shell, tmp_path, shell), region, shell)


def test_the_build_step_again_on_the_same_commit_keeps_the_pushed_image(tmp_path: Path) -> None:
    """ECR refuses to push a tag again (the stub docker too): a second run on the same commit
    builds nothing, and saves the image it finds."""
    first, build = [b for b in aws_path() if "export AWS_REGION=" in b or "docker buildx build" in b]
    ran = run_path([first, build, build], DEFAULT_REGION, False, tmp_path)
    assert [r.returncode for r in ran["results"]] == [0] and len(ran["pushed"]) == 1, ran["results"][0].stderr
    assert f"IMAGE={ran['pushed'][0]}" in (tmp_path / "repo/.demo.env").read_text()


def test_every_bash_block_pastes_into_zsh(tmp_path: Path) -> None:
    """Every block of README.md and docs/, the local ones too, as pasted into zsh one after the other."""
    pages = [README, *(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "original.md")]
    assert_pasted_cleanly(run_path([b for page in pages for b in bash_blocks(page)], DEFAULT_REGION, False, tmp_path, "zsh"))


@pytest.mark.parametrize("shell", ["bash-paste", "zsh"])
def test_a_block_pasted_alone_into_a_new_terminal_hands_no_tool_an_empty_value(shell: str, tmp_path: Path) -> None:
    """Each block on its own, pasted with nothing set and no .demo.env (a cluster in
    ~/.kube/config): its guards stop every command that would get an empty region, registry, image
    or host, as an argument or through a pipe, and the first one to stop names the step to run."""
    for i, block in enumerate(bash_blocks(README)):
        for path, text in (("home/.kube/config", "current-context: x\n"), ("state/cluster.yaml", "  region: x\n")):
            (tmp_path / str(i) / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / str(i) / path).write_text(text)
        ran = run_path([block], DEFAULT_REGION, False, tmp_path / str(i), shell)
        assert [c for c in ran["calls"] if "" in c or any(re.fullmatch(r"https?://(/.*)?", a) for a in c)] == [], block
        assert ran["empty input"] == "", f"a piped tool read nothing: {ran['empty input']}{block}"
        guards = re.findall(r"(?:zsh|bash): [A-Z_]+: (.+)", "".join(r.stderr for r in ran["results"]))
        assert guards[:1] != ["parameter not set"], f"the first guard names no step to run:\n{block}"


def test_deploy_block_is_the_interface_the_e2e_suite_runs() -> None:
    """The block tests/test_e2e.py runs, and the operator's step: every manifest but the
    ScaledObject, the image only from $IMAGE (guarded), no file sourced, no namespace."""
    block = deploy_block()
    assert block in aws_path()
    assert all(name in block for name in KIT)
    assert "${IMAGE:?" in block and not re.search(r"^\s*(\.|source)\s", block, re.M)
    assert "--namespace" not in block and " -n " not in block


def test_demo_swarm_is_the_models_scenario() -> None:
    """Every locust swarm of the demo size runs the model's spawn rate and duration."""
    swarms = re.findall(r"locustfile\.py --headless -u (\d+) -r (\d+) -t (\d+)m", README)
    assert {(r, t) for u, r, t in swarms if int(u) == cm.DEMO_USERS} == {(str(cm.SPAWN_RATE), str(cm.DEMO_RUN_S // 60))}, swarms


def test_readme_aws_path_passes_shellcheck(tmp_path: Path) -> None:
    script = tmp_path / "path.sh"
    script.write_text("\n".join(aws_path()))
    # SC1091: .demo.env exists only once step 2 has run.
    result = uvx("shellcheck", "--shell=bash", "--exclude=SC1091", str(script), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
