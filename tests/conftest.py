"""pytest's hooks and fixtures. What the tests share otherwise is in helpers.py."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `import service`, and the model, the recorder and the tools the tests use (tests/tools/).
sys.path[:0] = [str(Path(__file__).parent.parent), str(Path(__file__).parent / "tools")]

from helpers import SOURCES, Service, run_service  # noqa: E402


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    for what, source in config.stash.get(SOURCES, {}).items():
        terminalreporter.write_line(f"{what}: {source}")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with run_service(tmp_path) as svc:
        yield svc
