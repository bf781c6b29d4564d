"""locustfile.py swarms headless: clean against the real service, all failures against a wrong sum."""

import csv
import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import ROOT, free_port, locust, run_service


def swarm(url: str, tmp_path: Path) -> tuple[dict[str, dict], list[dict], int]:
    """A short headless run: stats per request name, failure rows, locust's exit code."""
    result = locust("-u", "20", "-r", "20", "-t", "6s", "-H", url, "--json-file", str(tmp_path / "stats"),
                    "--csv", str(tmp_path / "run"), "--only-summary", cwd=tmp_path)
    stats = json.loads((tmp_path / "stats.json").read_text())
    with (tmp_path / "run_failures.csv").open() as f:
        failures = list(csv.DictReader(f))
    by_name = {entry["name"]: entry for entry in stats}
    assert by_name, f"locust recorded nothing:\n{result.stdout}\n{result.stderr}"
    return by_name, failures, result.returncode


def test_swarm_against_the_service_has_no_failures(tmp_path: Path) -> None:
    with run_service(tmp_path, DELAY_SECONDS="0.2") as service:
        stats, failures, code = swarm(service.url, tmp_path)
    post = stats["POST /"]
    assert post["num_requests"] > 20  # 20 users for ~6 s at 1.2-2.2 s a round
    assert all(entry["num_failures"] == 0 for entry in stats.values()), failures
    assert code == 0


class WrongSum(BaseHTTPRequestHandler):
    """Answers every POST with 200 and a sum that is off by one."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer(b'{"result": 16.0}')

    def do_GET(self) -> None:
        self.answer(b'{"status": "ok"}')

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 refuses some of 20 users connecting at once


@pytest.fixture
def wrong_sum_url() -> Iterator[str]:
    server = Server(("127.0.0.1", 0), WrongSum)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_wrong_sum_fails_every_request_with_the_reason(tmp_path: Path, wrong_sum_url: str) -> None:
    stats, failures, code = swarm(wrong_sum_url, tmp_path)
    post = stats["POST /"]
    assert post["num_requests"] > 0
    assert post["num_failures"] == post["num_requests"]
    reasons = [row["Error"] for row in failures if row["Name"] == "POST /"]
    assert reasons and all("16.0" in reason and "15.0" in reason for reason in reasons), reasons
    assert code == 1  # locust exits 1 when any request failed


def test_default_host_is_the_local_service() -> None:
    # What locust does when started without -H: it builds each user with the class's own host.
    # (No swarm here: port 8000 may be anyone's on this machine.)
    code = (
        "from locust.env import Environment; import locustfile; "
        "print(locustfile.MathServiceUser(Environment()).client.base_url)"
    )
    result = subprocess.run(
        ["uv", "run", "--quiet", "--with-requirements", "locustfile.py", "python", "-c", code],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.stdout.strip() == "http://localhost:8000", result.stderr


def test_trailing_slash_in_host_is_ignored(tmp_path: Path) -> None:
    # `-H http://host/` used to send every request to "//", which the service answers with 404.
    with run_service(tmp_path, DELAY_SECONDS="0.2") as service:
        stats, failures, code = swarm(service.url + "/", tmp_path)
    assert stats["POST /"]["num_requests"] > 20
    assert all(entry["num_failures"] == 0 for entry in stats.values()), failures
    assert code == 0


def test_no_response_is_a_failure_with_the_error_on_every_task(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: every connection is refused
    stats, failures, code = swarm(closed, tmp_path)
    assert {"POST /", "GET /healthz"} <= {row["Name"] for row in failures}, failures
    for row in failures:
        assert "no response: ConnectionError(" in row["Error"], row
    assert code == 1
