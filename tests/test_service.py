"""The service's contract: what needs no socket against the app in-process, as FastAPI's own
tests do; the rest against the real process over a real socket, started each way a user may."""

import asyncio
import json
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import prometheus_client
import pytest
from fastapi import FastAPI

import service
from helpers import (
    GET_READYZ, POST_ADD, ROOT, RUNNERS, Service, connect, exchange, healthy, metric, run_service, uvx, wait_for,
)

DELAY = 2.0  # long enough that "answered before the delay" is unmistakable
README_CURL = {"a": 10, "b": 5}


def in_process(app: FastAPI) -> httpx.AsyncClient:
    """The app in-process, as FastAPI's docs test it: nothing started (no lifespan, no port)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # what uvicorn runs the app on


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with in_process(service.create_app(service.Settings(delay_seconds=DELAY))) as client:
        yield client


async def in_flight(s: Service, n: int) -> None:
    """Wait until `n` requests are inside their delay, as the service counts them."""
    await asyncio.to_thread(wait_for, lambda: s.metric("http_requests_in_flight") >= n, f"{n} in flight")


# --- Importing and building it -------------------------------------------------------------------


def test_importing_the_service_starts_nothing_until_a_runner_asks_for_the_app() -> None:
    code = """import copy, logging, prometheus_client, uvicorn.config
def state(): return copy.deepcopy(uvicorn.config.LOGGING_CONFIG), {m.name for m in prometheus_client.REGISTRY.collect()}
before = state()
import service
assert state() == before and logging.getLogger().handlers == []
print("imported", flush=True)
service.app"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "DELAY_SECONDS": "-1"})
    imported, error = out.stdout.splitlines()  # the invalid setting, once the app is built
    assert (imported, out.stderr, out.returncode) == ("imported", "", 2)
    assert json.loads(error)["variables"] == ["DELAY_SECONDS"]


# --- One service, whichever way it starts ------------------------------------------------------


@pytest.mark.parametrize("runner", RUNNERS)
def test_every_way_of_starting_it_serves_the_same_service(tmp_path, runner: str) -> None:
    """The image's `python service.py`, uvicorn's CLI and FastAPI's: the admission cap, the body
    limit, the request metrics and the JSON log belong to `service:app` itself."""

    async def main(s: Service) -> tuple[httpx.Response, int, bytes]:
        head = (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10737418240\r\n\r\n")
        status, _, body = await asyncio.wait_for(exchange(await connect(s.url), head), 10)  # 10 GiB declared, none sent
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
            held = [asyncio.create_task(client.post("/", json=README_CURL)) for _ in range(2)]
            await in_flight(s, 2)
            third = await client.post("/", json=README_CURL)
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            return third, status, body

    with run_service(tmp_path, runner=runner, MAX_IN_FLIGHT="2", MAX_BODY_BYTES="1000", DELAY_SECONDS="1") as s:
        third, status, body = asyncio.run(main(s))
        # Chunked, so no length is declared: the limit counts the bytes as they arrive.
        chunked = httpx.post(s.url, content=iter([b" " * 600] * 5), headers={"Content-Type": "application/json"})
        assert s.metric("http_requests_total", method="POST", route="/", status="200") == 2
        assert httpx.get(s.url + "/metrics").status_code == 404  # metrics only on their own port
        s.terminate()
    assert (third.status_code, third.json()["detail"]) == (503, "Busy: 2 requests in flight (MAX_IN_FLIGHT); retry later")
    too_large = {"detail": "Request body is larger than MAX_BODY_BYTES (1000 bytes)"}
    assert (status, json.loads(body)) == (chunked.status_code, chunked.json()) == (413, too_large)

    logs = s.logs()
    assert all({"timestamp", "level", "event"} <= e.keys() for e in logs), logs
    events = [e["event"] for e in logs]
    assert "admission cap" in events  # the lifespan's start-up tuning ran, whichever runner started it
    # uvicorn's own lines too, from start to finish, each once.
    for first_words in ("Started server process", "Uvicorn running on", "Shutting down", "Finished server process"):
        assert len([e for e in events if e.startswith(first_words)]) == 1, (first_words, events)
    posts = [e["status"] for e in logs if e["event"] == "request" and e["path"] == "/"]
    assert sorted(posts) == [200, 200, 413, 413, 503]  # one access line each, uvicorn's own is off


@pytest.mark.parametrize("runner", RUNNERS)
def test_sigterm_under_every_runner_fails_readiness_answers_every_client_and_exits_0(tmp_path, runner: str) -> None:
    """As the kubelet stops a pod: requests in flight, and keep-alive connections idle at SIGTERM
    (a load balancer's, through the preStop) whose clients send their next request after it. Each
    is answered, marked `Connection: close`, and then the connection ends."""
    n, idle_n = 100, 10

    async def main(s: Service) -> tuple[list[httpx.Response], list, tuple, list[bytes]]:
        idle, ready = [await connect(s.url) for _ in range(idle_n)], await connect(s.url)
        first = await asyncio.gather(*(exchange(conn, POST_ADD) for conn in idle), exchange(ready, GET_READYZ))
        assert {status for status, _, _ in first} == {200}
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=s.url, timeout=30, limits=limits) as client:
            posts = [asyncio.create_task(client.post("/", json=README_CURL)) for _ in range(n)]
            await in_flight(s, n)
            s.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for, lambda: not healthy(s.url), "new connections refused")
            after = await asyncio.gather(*(exchange(conn, POST_ADD) for conn in idle))
            readiness = await exchange(ready, GET_READYZ)
            ends = await asyncio.gather(*(conn[0].read() for conn in [*idle, ready]))
            return await asyncio.gather(*posts), after, readiness, ends

    with run_service(tmp_path, runner=runner, DELAY_SECONDS="1") as s:
        responses, after, (status, headers, body), ends = asyncio.run(asyncio.wait_for(main(s), 30))
        code = s.proc.wait(10)
    assert {(r.status_code, r.text, r.headers.get("connection")) for r in responses} == {(200, '{"result":15.0}', "close")}
    assert {(status, h.get("connection"), body) for status, h, body in after} == {(200, "close", b'{"result":15.0}')}
    assert (status, headers.get("connection"), json.loads(body)) == (503, "close", {"status": "shutting down"})
    assert set(ends) == {b""}  # every connection ended by the server after its last answer
    assert code == 0
    events = [e["event"] for e in s.logs()]
    assert events.index("closing keep-alive connections") < events.index("Shutting down")
    assert events.index("Shutting down") < events.index("Application shutdown complete.")
    assert events.count("request") >= n + idle_n + 2


# --- POST / -----------------------------------------------------------------------------------


def test_readme_curl_answers_after_the_default_delay(tmp_path) -> None:
    with run_service(tmp_path, DELAY_SECONDS=None) as s:
        response = httpx.post(s.url, json=README_CURL, timeout=30)
    assert response.status_code == 200
    assert response.text == '{"result":15.0}'  # byte for byte what the README shows
    assert 5 <= response.elapsed.total_seconds() < 6


@pytest.mark.anyio
async def test_floats_and_negatives_add(client: httpx.AsyncClient) -> None:
    assert (await client.post("/", json={"a": -1.5, "b": 0.25})).json() == {"result": -1.25}


BAD_BODIES = {
    # name: (raw body, field the error must name, words the message must contain)
    "NaN": ('{"a": NaN, "b": 5}', "a", "finite number"),
    "Infinity": ('{"a": 1, "b": Infinity}', "b", "finite number"),
    "-Infinity": ('{"a": -Infinity, "b": 1}', "a", "finite number"),
    "1e999": ('{"a": 1e999, "b": 5}', "a", "finite number"),
    "string": ('{"a": "10", "b": 5}', "a", "valid number"),
    "boolean": ('{"a": 10, "b": true}', "b", "valid number"),
    "null": ('{"a": null, "b": 5}', "a", "valid number"),
    "object": ('{"a": {"x": 1}, "b": 5}', "a", "valid number"),
    "list value": ('{"a": [1], "b": 5}', "a", "valid number"),
    "missing b": ('{"a": 10}', "b", "required"),
    "missing both": ("{}", "a", "required"),
    "extra field": ('{"a": 1, "b": 2, "c": 3}', "c", "not permitted"),
    "not JSON": ("a=10&b=5", "body", "JSON"),
    "truncated JSON": ('{"a": 10, "b":', "body", "JSON"),
    "array": ("[10, 5]", "body", "dictionary"),
    "scalar": ("15", "body", "dictionary"),
    "empty body": ("", "body", "required"),
    "sum overflows": ('{"a": 1.7e308, "b": 1.7e308}', "body", "too large"),
    # Errors echo the input back, and JSON has no NaN: these once answered 500.
    "NaN with b missing": ('{"a": NaN}', "b", "required"),
    "NaN in an array body": ("[NaN]", "body", "dictionary"),
    "NaN nested in a": ('{"a": {"x": NaN}, "b": 1}', "a", "valid number"),
    "Infinity in an extra field": ('{"a": 1, "b": 2, "c": [Infinity]}', "c", "not permitted"),
    "integer too large for a float": ('{"a": 1' + "0" * 400 + ', "b": 1}', "a", "valid number"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("raw, field, words", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_bad_input_is_a_4xx_naming_the_problem_before_the_delay(client: httpx.AsyncClient, raw: str, field: str,
                                                                      words: str) -> None:
    response = await client.post("/", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    errors = response.json()["detail"]  # a JSON body, NaN or not in the input
    assert any(field in map(str, e["loc"]) and words.lower() in e["msg"].lower() for e in errors), errors
    assert response.elapsed.total_seconds() < DELAY / 2


@pytest.mark.anyio
@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser recurses
    b'{"a": ' + b"9" * 5000 + b', "b": 1}',  # more digits than Python parses into an int
    b'{"a": "\xff", "b": 1}',  # not UTF-8
], ids=["deeply nested", "5000 digits", "invalid UTF-8"])
async def test_unparseable_body_is_a_json_400(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post("/", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"detail": "There was an error parsing the body"}
    assert response.elapsed.total_seconds() < DELAY / 2


@pytest.mark.anyio
async def test_body_without_json_content_type_is_a_4xx(client: httpx.AsyncClient) -> None:
    response = await client.post("/", content=json.dumps(README_CURL), headers={"Content-Type": "text/plain"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]
    assert response.elapsed.total_seconds() < DELAY / 2


@pytest.mark.anyio
async def test_wrong_method_and_path_are_json_4xx(client: httpx.AsyncClient) -> None:
    assert (await client.get("/")).status_code == 405
    missing = await client.post("/add", json=README_CURL)
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Not Found"}


def test_no_input_produces_a_5xx(tmp_path) -> None:
    """Property-based: schemathesis throws generated bodies of every shape at the API."""
    with run_service(tmp_path, DELAY_SECONDS="0") as s:
        result = uvx(
            "schemathesis", "run", f"{s.url}/openapi.json", "--checks", "not_a_server_error",
            "--max-examples", "150", "--phases", "examples,coverage,fuzzing", "--seed", "1",
            timeout=300, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert not [line for line in s.logs() if line.get("status", 0) >= 500]


# --- Readiness, metrics, docs ------------------------------------------------------------------


@pytest.mark.anyio
async def test_metrics_count_requests_by_route_and_status() -> None:
    app = service.create_app(service.Settings(delay_seconds=0.2))
    async with in_process(app) as client:
        for _ in range(3):
            await client.post("/", json=README_CURL)
        await client.post("/", json={"a": "x", "b": 1})
        await client.get("/no/such/path/1")
        await client.get("/no/such/path/2")
    text = prometheus_client.generate_latest(app.state.metrics.registry).decode()
    assert metric(text, "http_requests_total", method="POST", route="/", status="200") == 3
    assert metric(text, "http_requests_total", method="POST", route="/", status="422") == 1
    # Unknown paths share one label, so a scanner cannot blow up the series count.
    assert metric(text, "http_requests_total", method="GET", route="unmatched", status="404") == 2
    assert "/no/such/path" not in text
    assert metric(text, "http_request_duration_seconds_count", method="POST", route="/") == 4
    # The 422 was answered at once; the three sums took their DELAY_SECONDS, at most twice that.
    assert metric(text, "http_request_duration_seconds_bucket", method="POST", route="/", le="0.05") == 1
    assert metric(text, "http_request_duration_seconds_bucket", method="POST", route="/", le="0.2") == 1
    assert metric(text, "http_request_duration_seconds_bucket", method="POST", route="/", le="0.4") == 4


@pytest.mark.anyio
async def test_openapi_describes_the_body_and_errors(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    post_op = spec["paths"]["/"]["post"]
    ref = post_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body["required"] == ["a", "b"]
    assert body["properties"]["a"]["type"] == "number"
    assert {"200", "413", "422", "503"} <= post_op["responses"].keys()
    assert set(spec["paths"]) == {"/", "/healthz", "/readyz"}
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_past_max_in_flight_a_request_gets_an_immediate_json_503(tmp_path) -> None:
    """Overload: 80 requests at once against MAX_IN_FLIGHT=50, each on its own connection."""
    cap, n, delay = 50, 80, 2.0

    async def main(s: Service) -> tuple[list[httpx.Response], float, httpx.Response, int]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=s.url, timeout=30, limits=limits) as client, \
                httpx.AsyncClient(base_url=s.url, timeout=5) as probe:
            posts = [asyncio.create_task(client.post("/", json={"a": a, "b": 0.5})) for a in range(n)]
            # The first answers are the rejected ones; the admitted ones are still held.
            for _, first in zip(range(n - cap), asyncio.as_completed(posts)):
                await first
            gauge, health = s.metric("http_requests_in_flight"), await probe.get("/healthz")
            public_metrics = (await probe.get("/metrics")).status_code
            return await asyncio.gather(*posts), gauge, health, public_metrics

    with run_service(tmp_path, MAX_IN_FLIGHT=str(cap), DELAY_SECONDS=str(delay)) as s:
        responses, gauge, health, public_metrics = asyncio.run(main(s))
        rejected_total = s.metric("http_requests_rejected_total")
        logs = s.logs()

    admitted = [r for r in responses if r.status_code == 200]
    assert len(admitted) == cap
    assert all(r.json()["result"] == json.loads(r.request.content)["a"] + 0.5 for r in admitted)
    assert all(r.elapsed.total_seconds() >= delay for r in admitted)
    rejected = [r for r in responses if r.status_code != 200]
    assert len(rejected) == n - cap
    for response in rejected:
        assert response.status_code == 503
        assert response.elapsed.total_seconds() < delay / 4  # at once, not after the delay
        assert "MAX_IN_FLIGHT" in response.json()["detail"]
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["connection"] == "close"
    # While full: the gauge at the cap; the kubelet's probe answered at once; any other path,
    # /metrics on the public port too, refused like the rest.
    assert gauge == cap
    assert health.json() == {"status": "ok"} and health.elapsed.total_seconds() < 0.5
    assert public_metrics == 503
    assert rejected_total == n - cap + 1
    logged = [e["status"] for e in logs if e["event"] == "request" and e["path"] == "/"]
    assert sorted(logged) == [200] * cap + [503] * (n - cap)
    (start,) = [e for e in logs if e["event"] == "admission cap"]
    assert (start["binding"], start["max_in_flight"]) == ("MAX_IN_FLIGHT", cap)


def test_a_low_open_file_limit_is_raised_and_lowers_the_cap(tmp_path) -> None:
    """Each request in flight holds a socket: the cap must fit the open-file limit, and say so."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 3000))

    with run_service(tmp_path, preexec_fn=low_limit, MAX_IN_FLIGHT="5000") as s:
        (start,) = [e for e in s.logs() if e["event"] == "admission cap"]
    assert (start["open_files_was"], start["open_files"]) == (256, 3000)  # soft raised to hard
    assert (start["binding"], start["level"]) == ("RLIMIT_NOFILE", "warning")
    assert start["max_in_flight"] + start["fd_reserve"] == 3000
    assert 0 < start["max_in_flight"] < 5000


# --- Logs -------------------------------------------------------------------------------------


def test_loglevel_filters_lines(tmp_path) -> None:
    with run_service(tmp_path, DELAY_SECONDS="0", LOGLEVEL="warning") as s:
        httpx.post(s.url + "/", json=README_CURL)
        s.terminate()
        assert s.logs() == []  # info lines (start-up, access) are filtered out


def test_errors_are_logged_as_one_json_line_with_the_traceback() -> None:
    code = (
        "import logging, service\n"
        "service.configure_logging('INFO')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n"
        "    logging.getLogger('uvicorn.error').exception('Exception in ASGI application')\n"
        "    service.logger.exception('app failure')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    lines = out.stdout.splitlines()
    assert out.stderr == "" and len(lines) == 2, out
    for line in lines:
        entry = json.loads(line)
        assert entry["level"] == "error"
        frames = entry["exception"][0]
        assert frames["exc_type"] == "ZeroDivisionError" and frames["frames"]


@pytest.mark.parametrize(
    "variable, value",
    [("PORT", "abc"), ("PORT", "70000"), ("DELAY_SECONDS", "-1"), ("DELAY_SECONDS", "nan"),
     ("LOGLEVEL", "LOUD"), ("MAX_BODY_BYTES", "0"), ("METRICS_PORT", "0")],
)
def test_invalid_setting_exits_with_one_clear_line(tmp_path, variable: str, value: str) -> None:
    with run_service(tmp_path, wait=False, **{variable: value}) as s:
        assert s.proc.wait(30) != 0
        logs = s.logs()
    assert len(logs) == 1, logs
    assert logs[0]["level"] == "error" and logs[0]["event"] == "invalid setting"
    assert logs[0]["variables"] == [variable]
    assert value in logs[0]["errors"][0]


def test_runs_on_uvloop_and_httptools(service: Service) -> None:
    maps = open(f"/proc/{service.proc.pid}/maps").read()
    assert "uvloop/loop." in maps and "httptools/parser/parser." in maps
