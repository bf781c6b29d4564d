"""pytest's hooks and fixtures. What the tests share otherwise is in helpers.py."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ROOT, SOURCES, Service, run_service

# `import service`, and the model and the recorder the tests check (tests/tools/).
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "tools")]


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    for what, source in config.stash.get(SOURCES, {}).items():
        terminalreporter.write_line(f"{what}: {source}")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with run_service(tmp_path) as svc:
        yield svc
