# /// script
# requires-python = ">=3.11"
# dependencies = ["locust==2.47.0"]
# ///
"""Locust load test for math-service: POST / {"a": 10, "b": 5} and check the answer.

`uv run locustfile.py` runs locust (the version above) with this file and locust's own options:
Web UI:   uv run locustfile.py -H http://ELB_HOSTNAME        (then open http://localhost:8089)
Headless: uv run locustfile.py --headless -u 100 -r 10 -t 2m -H http://ELB_HOSTNAME
Local:    uv run locustfile.py                              (the default host, http://localhost:8000)
"""

import sys

from locust import HttpUser, between, task
from locust.clients import ResponseContextManager

PAYLOAD = {"a": 10, "b": 5}
EXPECTED = {"result": 15.0}


class MathServiceUser(HttpUser):
    """One user: add two numbers, wait 1-2 s, repeat; now and then check liveness."""

    # `uv run service.py`'s address, so a local swarm needs no -H (the web UI shows it too).
    host = "http://localhost:8000"
    # Think time after each response, as in the original locustfile.
    wait_time = between(1, 2)

    def on_start(self) -> None:
        # Paths start with "/": `-H http://host/` would otherwise send every request to "//".
        self.client.base_url = self.client.base_url.rstrip("/")

    @task(10)
    def add_numbers(self) -> None:
        # catch_response: a 200 with the wrong sum must count as a failure, not a success.
        with self.client.post("/", json=PAYLOAD, name="POST /", catch_response=True) as response:
            if not answered_200(response):
                return
            try:
                body = response.json()
            except ValueError:
                response.failure(f"body is not JSON: {response.text[:200]}")
                return
            if body != EXPECTED:
                response.failure(f"wrong answer: expected {EXPECTED}, got {body}")
            else:
                response.success()

    @task(1)
    def health(self) -> None:
        # Never delayed: a slow /healthz under load means the event loop is starved.
        with self.client.get("/healthz", name="GET /healthz", catch_response=True) as response:
            if answered_200(response):
                response.success()


def answered_200(response: ResponseContextManager) -> bool:
    """True for a 200; anything else is marked failed, with the reason locust will show."""
    if response.status_code == 0:  # no HTTP answer at all: refused, reset, timed out
        response.failure(f"no response: {response.error!r}")
    elif response.status_code != 200:
        response.failure(f"status {response.status_code}: {response.text[:200]}")
    return response.status_code == 200


if __name__ == "__main__":
    from locust.main import main

    # locust imports this file again as its locustfile (unless -f names another).
    sys.argv[1:1] = [] if "-f" in sys.argv else ["-f", __file__]
    sys.exit(main())
