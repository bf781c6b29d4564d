"""The container image: lint-clean, small, non-root, and serving with no network and a read-only
root filesystem.

The lint tests need only uvx. The image tests build `Dockerfile` for real and run it with the
container engine at hand: Docker or Podman (CONTAINER_ENGINE names one); they skip when there is
neither. Every check works on both: what differs between them is handled in `Engine`.
"""

import datetime
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import httpx
import pytest

import cluster_model as cm
from helpers import ROOT, healthy, note_source, uvx, wait_for

DOCKERFILE = ROOT / "Dockerfile"
BASE = "docker.io/library/python:3.11-slim"
TAG = "localhost/math-service-test:latest"

MAX_ABOVE_BASE = 50_000_000  # bytes the image may add to python:3.11-slim
MAX_IDLE_MEMORY = 60 * 2**20  # the idle target, 60 MiB of the process's own memory (docs/performance.md)
# deployment.yaml's resources.requests.memory, in bytes.
MEMORY_REQUEST = cm.memory_mib(
    cm.manifest("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"]
) * 2**20
# From the container's start to the service's "Uvicorn running" line. The target is 1.5 s; CI
# shares 2 cores with other jobs, so allow twice that before failing.
MAX_READY_S = 3.0
GRACE_S = 10  # `stop`'s SIGTERM-to-SIGKILL grace period, like a pod's

# The design's original Dockerfile: what the linters must still catch.
ORIGINAL_DOCKERFILE = """\
FROM python:3.11-slim
RUN apt-get update && apt-get install -y \\
    curl ca-certificates gcc python3-venv pipx \\
 && rm -rf /var/lib/apt/lists/*
ENV PATH="/root/.local/bin:$PATH"
RUN pipx install uv && which uv && uv --version
WORKDIR /app
COPY service.py .
CMD ["uv", "run", "service.py"]
"""


# --- Lint ---------------------------------------------------------------------------------------


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return uvx("hadolint", "--no-color", str(dockerfile))


def checkov(dockerfile: Path) -> dict:
    proc = uvx("checkov", "--skip-download", "--framework", "dockerfile", "-f", str(dockerfile), "--output", "json", "--quiet")
    assert proc.stdout.strip(), proc.stderr
    report = json.loads(proc.stdout)
    # One file gives one report; a file with no failed check and --quiet may give just a summary.
    return report[0] if isinstance(report, list) else report


def test_hadolint_reports_nothing() -> None:
    proc = hadolint(DOCKERFILE)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_checkov_has_no_failed_dockerfile_check() -> None:
    report = checkov(DOCKERFILE)
    failed = [c["check_id"] for c in report.get("results", {}).get("failed_checks", [])]
    assert failed == []
    assert report["summary"]["failed"] == 0
    assert report["summary"]["passed"] > 0  # it really read the Dockerfile
    # Every skip is deliberate and carries its reason inline.
    for check in report.get("results", {}).get("skipped_checks", []):
        assert check["check_result"].get("suppress_comment"), check["check_id"]


def test_linters_catch_the_original_dockerfile(tmp_path: Path) -> None:
    original = tmp_path / "Dockerfile"
    original.write_text(ORIGINAL_DOCKERFILE)
    assert "DL3008" in hadolint(original).stdout  # unpinned apt packages
    failed = {c["check_id"] for c in checkov(original)["results"]["failed_checks"]}
    assert "CKV_DOCKER_3" in failed  # runs as root


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_lock_has_a_wheel_of_every_package_for_both_platforms(arch: str) -> None:
    """The image installs with --no-build, so a buildx build for linux/amd64 and linux/arm64
    needs a CPython 3.11 manylinux (or pure-Python) wheel of every locked package for both CPUs."""
    lock = tomllib.loads((ROOT / "service.py.lock").read_text())
    def fits(wheel: str) -> bool:
        return wheel.endswith("-none-any.whl") or bool(re.search(r"-(cp311-cp311|cp3\d+-abi3)-", wheel)
                                                       and "manylinux" in wheel and wheel.endswith(f"_{arch}.whl"))

    missing = [p["name"] for p in lock["package"] if not any(fits(w["url"].rsplit("/", 1)[1]) for w in p.get("wheels", []))]
    assert missing == []


# --- Image --------------------------------------------------------------------------------------


@dataclass
class Engine:
    """A Docker or Podman command line; `engine("ps")` runs `docker ps` or `podman ps`."""

    command: str

    def __call__(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([self.command, *args], capture_output=True, text=True, timeout=timeout, check=check)

    @cached_property
    def version(self) -> str:
        return self("--version").stdout.strip()  # "Docker version 28..." or "podman version 4..."

    @property
    def read_only(self) -> tuple[str, ...]:
        """A read-only root with no tmpfs on /tmp, /var/tmp or /run either: what Kubernetes'
        readOnlyRootFilesystem gives. Podman mounts those three unless told not to; Docker
        mounts none (and knows no such option)."""
        if "podman" in self.version.lower():  # also Podman behind a `docker` name (podman-docker)
            return ("--read-only", "--read-only-tmpfs=false")
        return ("--read-only",)

    def inspect(self, *args: str) -> dict:
        return json.loads(self("inspect", *args).stdout)[0]

    def image_bytes(self, image: str) -> int:
        if self("image", "inspect", image, check=False).returncode != 0:
            # BuildKit keeps the base images it pulled for a build out of Docker's image list.
            self("pull", image, timeout=600)
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout)


def find_engine() -> str | None:
    """CONTAINER_ENGINE if set, else the first of docker and podman whose engine answers.
    Being on PATH is not enough: a docker CLI with no daemon behind it fails every command (this
    project's CI machine has one)."""
    if chosen := os.environ.get("CONTAINER_ENGINE"):
        return chosen
    return next((command for command in ("docker", "podman") if shutil.which(command)
                 and subprocess.run([command, "info"], capture_output=True, timeout=60).returncode == 0), None)


@pytest.fixture(scope="module")
def engine(pytestconfig: pytest.Config) -> Engine:
    command = find_engine()
    if command is None:
        pytest.skip("no docker or podman engine answers `info` (CONTAINER_ENGINE names one)")
    engine = Engine(command)
    note_source(pytestconfig, "container engine", engine.version)
    return engine


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    """The project's Dockerfile built by the engine, once for the module; its tag."""
    # No pull option: both engines' default fetches a base image only when it is not local.
    build = engine("build", "-t", TAG, str(ROOT), check=False, timeout=900)
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    return TAG


def request_inside(engine: Engine, container: str, path: str, body: bytes = b"", port: int = 8000) -> tuple[int, str]:
    """An HTTP request sent from inside the container: with no network, only its lo answers."""
    script = """import sys, urllib.request as u, urllib.error as e
r = u.Request(f"http://127.0.0.1:{sys.argv[3]}" + sys.argv[1], sys.argv[2].encode() or None,
              {"Content-Type": "application/json"})
try:
    with u.urlopen(r, timeout=10) as a: print(a.status, a.read().decode())
except e.HTTPError as x: print(x.code, x.read().decode())
except OSError: print(0)"""
    proc = engine("exec", container, "python", "-c", script, path, body.decode(), str(port), check=False)
    code, _, text = proc.stdout.strip().partition(" ")
    return int(code or 0), text


def instant(text: str) -> datetime.datetime:
    """A timestamp as the engine or the service writes it (RFC 3339, to the nanosecond)."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    return datetime.datetime.fromisoformat(re.sub(r" [A-Z]+$", "", text))


@pytest.fixture(scope="module")
def locked_down(engine: Engine, image: str) -> Iterator[str]:
    """A running container of the image with no network and a read-only root; its name."""
    name = f"math-service-test-{os.getpid()}"
    engine("run", "-d", "--name", name, "--network", "none", *engine.read_only, "-e", "DELAY_SECONDS=0.2", image)
    try:
        wait_for(lambda: request_inside(engine, name, "/healthz")[0] == 200,
                 f"/healthz answers: {engine('logs', name, check=False).stdout}")
        yield name
    finally:
        engine("rm", "-f", name, check=False)


def test_starts_and_serves_with_no_network_and_a_read_only_root(engine: Engine, locked_down: str) -> None:
    started = instant(engine.inspect(locked_down)["State"]["StartedAt"])
    logs = [json.loads(line) for line in engine("logs", locked_down).stdout.splitlines()]
    running = next(e for e in logs if e["event"].startswith("Uvicorn running on"))
    assert (instant(running["timestamp"]) - started).total_seconds() <= MAX_READY_S
    host_config = engine.inspect(locked_down)["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["NetworkMode"] == "none"
    # Nowhere to write, not even a tmpfs (/dev/shm aside, which a pod has too).
    writable = engine(
        "exec", locked_down, "sh", "-c",
        "for d in / /app /tmp /var/tmp /run /opt/venv; do touch $d/.w 2>/dev/null && echo $d; done;"
        " true",
    ).stdout
    assert writable == ""
    # The README's request.
    code, body = request_inside(engine, locked_down, "/", b'{"a": 10, "b": 5}')
    assert (code, json.loads(body)) == (200, {"result": 15.0})


def test_runs_as_a_fixed_non_root_uid_with_python_as_pid_1(engine: Engine, locked_down: str) -> None:
    status = engine("exec", locked_down, "cat", "/proc/1/status").stdout
    ids = dict(line.split(":", 1) for line in status.splitlines() if line[:3] in ("Uid", "Gid"))
    assert ids["Uid"].split() == ids["Gid"].split() == ["10001"] * 4  # real, effective, saved, fs
    cmdline = engine("exec", locked_down, "cat", "/proc/1/cmdline").stdout
    assert cmdline.split("\0")[:2] == ["python", "service.py"]  # exec form: no shell, no uv


def test_image_is_small_and_holds_no_build_tools(engine: Engine, image: str) -> None:
    assert engine.image_bytes(image) - engine.image_bytes(BASE) <= MAX_ABOVE_BASE
    # Nothing of the build stage: no uv, compilers, pipx or curl, no apt lists or uv cache.
    found = engine(
        "run", "--rm", "--network", "none", image, "sh", "-c",
        "for t in uv uvx pipx gcc cc curl; do command -v $t; done;"
        " find /var/lib/apt/lists /root/.cache -type f 2>/dev/null; true",
    ).stdout
    assert found == ""


# The container's memory cgroup as the container itself sees it, cgroup v2 or v1.
MEMORY_FILES = """\
if [ -f /sys/fs/cgroup/memory.current ]; then
  cat /sys/fs/cgroup/memory.current; grep -E '^(inactive_file|anon) ' /sys/fs/cgroup/memory.stat
else
  cat /sys/fs/cgroup/memory/memory.usage_in_bytes
  grep -E '^total_(inactive_file|rss) ' /sys/fs/cgroup/memory/memory.stat
fi"""


def memory_bytes(engine: Engine, container: str) -> tuple[int, int]:
    """The container's (working set, anonymous memory), read inside it from its cgroup, v2 or v1.
    The working set is what the kubelet counts: usage less the page cache it can drop at once,
    which still holds the image's files this container read first. The anonymous memory is the
    process's own, without the files it maps: what the idle target is about."""
    lines = engine("exec", container, "sh", "-c", MEMORY_FILES).stdout.splitlines()
    stat = dict(line.split() for line in lines[1:])
    usage, inactive = int(lines[0]), int(stat.get("inactive_file", stat.get("total_inactive_file")))
    return usage - inactive, int(stat.get("anon", stat.get("total_rss")))


def test_idle_memory_is_small(engine: Engine, locked_down: str) -> None:
    # Idle: the fixture's requests answered, nothing in flight as the service counts it.
    wait_for(lambda: "http_requests_in_flight 0.0" in request_inside(engine, locked_down, "/metrics", port=9000)[1],
             "nothing in flight")
    working_set, anonymous = memory_bytes(engine, locked_down)
    assert anonymous <= MAX_IDLE_MEMORY
    # Even with the image's files cached, an idle pod stays well inside its memory request.
    assert working_set <= MEMORY_REQUEST


def test_build_context_holds_only_what_the_image_needs(engine: Engine, tmp_path: Path) -> None:
    probe = tmp_path / "Dockerfile"
    probe.write_text(f"FROM {BASE}\nCOPY . /context\n")
    iid = tmp_path / "iid"
    engine("build", "--iidfile", str(iid), "-f", str(probe), str(ROOT), timeout=300)
    try:
        files = engine("run", "--rm", "--network", "none", iid.read_text(), "find", "/context", "-type", "f").stdout.split()
    finally:
        engine("rmi", "-f", iid.read_text(), check=False)
    assert sorted(files) == ["/context/service.py", "/context/service.py.lock"]


def test_sigterm_drains_the_request_in_flight_and_exits_0(engine: Engine, image: str) -> None:
    # A port published on loopback, so the client sits outside the container and outlives it.
    name = engine(
        "run", "-d", "--network", "bridge", "-p", "127.0.0.1::8000", "-p", "127.0.0.1::9000", *engine.read_only,
        "-e", "DELAY_SECONDS=2", image,
    ).stdout.strip()
    try:
        url, metrics = ("http://" + engine("port", name, f"{port}/tcp").stdout.split()[0] for port in (8000, 9000))
        wait_for(lambda: healthy(url), f"/healthz answers: {engine('logs', name, check=False).stdout}")
        with ThreadPoolExecutor() as client:
            answer = client.submit(httpx.post, url, json={"a": 10, "b": 5}, timeout=15)
            wait_for(lambda: "http_requests_in_flight 1.0" in httpx.get(metrics + "/metrics").text, "the POST in flight")
            start = time.monotonic()
            engine("stop", "-t", str(GRACE_S), name, timeout=GRACE_S + 30)
            stopped_after = time.monotonic() - start

        assert answer.result().status_code == 200 and answer.result().json() == {"result": 15.0}
        # 137 would mean SIGKILL at the end of the grace period.
        assert engine.inspect(name)["State"]["ExitCode"] == 0
        assert stopped_after < GRACE_S
    finally:
        engine("rm", "-f", name, check=False)
