"""The service's contract, checked against the real process over a real socket."""

import asyncio
import json
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from helpers import (
    GET_READYZ, POST_ADD, ROOT, RUNNERS, Service, connect, exchange, metric, run_service, uvx, wait_for,
)

DELAY = 2.0  # long enough that "answered before the delay" is unmistakable
README_CURL = {"a": 10, "b": 5}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with run_service(tmp_path_factory.mktemp("svc"), DELAY_SECONDS=str(DELAY)) as s:
        yield s


def post(url: str, **kwargs) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = httpx.post(url + "/", timeout=30, **kwargs)
    return response, time.perf_counter() - start


async def in_flight(s: Service, n: int) -> None:
    """Wait until `n` requests are inside their delay, as the service counts them."""
    await asyncio.to_thread(wait_for, lambda: s.metric("http_requests_in_flight") >= n, f"{n} in flight")


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
        assert s.metric("http_requests_total", method="POST", route="/", status="200") == 2
        assert httpx.get(s.url + "/metrics").status_code == 404  # metrics only on their own port
        s.terminate()
    assert (third.status_code, third.json()["detail"]) == (503, "Busy: 2 requests in flight (MAX_IN_FLIGHT); retry later")
    assert (status, json.loads(body)) == (413, {"detail": "Request body is larger than MAX_BODY_BYTES (1000 bytes)"})

    lines = s.log_lines()
    banner = next(i for i, line in enumerate(lines) if line.startswith("{"))  # `fastapi run` prints its own first
    assert banner == 0 or (runner.startswith("fastapi") and "FastAPI" in "".join(lines[:banner])), lines[:banner]
    logs = [json.loads(line) for line in lines[banner:]]
    assert all({"timestamp", "level", "event"} <= e.keys() for e in logs), logs
    events = [e["event"] for e in logs]
    assert "admission cap" in events  # the lifespan's start-up tuning ran, whichever runner started it
    assert any(e.startswith("Started server process") for e in events)  # uvicorn's own lines too
    posts = [e["status"] for e in logs if e["event"] == "request" and e["path"] == "/"]
    assert sorted(posts) == [200, 200, 413, 503]  # one access line each, uvicorn's own is off


# --- POST / -----------------------------------------------------------------------------------


def test_readme_curl_answers_after_the_delay(svc: Service) -> None:
    response, elapsed = post(svc.url, json=README_CURL)
    assert response.status_code == 200
    assert response.text == '{"result":15.0}'  # byte for byte what the README shows
    assert DELAY <= elapsed < DELAY + 1


def test_default_delay_is_five_seconds(tmp_path) -> None:
    with run_service(tmp_path, DELAY_SECONDS=None) as s:
        response, elapsed = post(s.url, json=README_CURL)
    assert response.json() == {"result": 15.0}
    assert 5 <= elapsed < 6


def test_floats_and_negatives_add(svc: Service) -> None:
    response, _ = post(svc.url, json={"a": -1.5, "b": 0.25})
    assert response.json() == {"result": -1.25}


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


@pytest.mark.parametrize("raw, field, words", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_input_is_a_4xx_naming_the_problem_before_the_delay(svc: Service, raw: str, field: str, words: str) -> None:
    response, elapsed = post(svc.url, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    errors = response.json()["detail"]  # a JSON body, NaN or not in the input
    assert any(field in map(str, e["loc"]) and words.lower() in e["msg"].lower() for e in errors), errors
    assert elapsed < DELAY / 2


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser recurses
    b'{"a": ' + b"9" * 5000 + b', "b": 1}',  # more digits than Python parses into an int
    b'{"a": "\xff", "b": 1}',  # not UTF-8
], ids=["deeply nested", "5000 digits", "invalid UTF-8"])
def test_unparseable_body_is_a_json_400(svc: Service, raw: bytes) -> None:
    response, elapsed = post(svc.url, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"detail": "There was an error parsing the body"}
    assert elapsed < DELAY / 2


def test_body_without_json_content_type_is_a_4xx(svc: Service) -> None:
    response, elapsed = post(svc.url, content=json.dumps(README_CURL), headers={"Content-Type": "text/plain"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]
    assert elapsed < DELAY / 2


def test_wrong_method_and_path_are_json_4xx(svc: Service) -> None:
    assert httpx.get(svc.url + "/").status_code == 405
    missing = httpx.post(svc.url + "/add", json=README_CURL)
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Not Found"}


def test_oversized_body_is_413_json_without_reading_it(tmp_path) -> None:
    async def declared(s: Service) -> tuple[int, bytes, float]:
        # Declares 10 GiB and sends 2 KiB: the answer cannot have waited for the body.
        head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10737418240\r\n\r\n")
        start = time.perf_counter()
        status, _, body = await asyncio.wait_for(exchange(await connect(s.url), head + b" " * 2048), 10)
        return status, body, time.perf_counter() - start

    with run_service(tmp_path, MAX_BODY_BYTES="1000") as s:
        status, body, elapsed = asyncio.run(declared(s))
        assert (status, json.loads(body)) == (413, {"detail": "Request body is larger than MAX_BODY_BYTES (1000 bytes)"})
        assert elapsed < 2
        # Chunked, so no length is declared: the limit counts the bytes as they arrive.
        chunked = httpx.post(s.url + "/", content=iter([b" " * 600] * 5),
                             headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413 and "MAX_BODY_BYTES" in chunked.json()["detail"]
        assert httpx.post(s.url + "/", json=README_CURL).status_code == 200


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


# --- Health, readiness, metrics, docs ---------------------------------------------------------


def test_healthz_is_never_delayed(svc: Service) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:
            slow = asyncio.create_task(client.post("/", json=README_CURL))
            await in_flight(svc, 1)
            start = time.perf_counter()
            health = await client.get("/healthz")
            assert time.perf_counter() - start < 0.5
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            assert (await slow).status_code == 200

    asyncio.run(main())


def test_metrics_count_requests_by_route_and_status(tmp_path) -> None:
    with run_service(tmp_path, DELAY_SECONDS="0") as s:
        for _ in range(3):
            httpx.post(s.url + "/", json=README_CURL)
        httpx.post(s.url + "/", json={"a": "x", "b": 1})
        httpx.get(s.url + "/no/such/path/1")
        httpx.get(s.url + "/no/such/path/2")
        response = httpx.get(s.metrics_url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    assert metric(text, "http_requests_total", method="POST", route="/", status="200") == 3
    assert metric(text, "http_requests_total", method="POST", route="/", status="422") == 1
    # Unknown paths share one label, so a scanner cannot blow up the series count.
    assert metric(text, "http_requests_total", method="GET", route="unmatched", status="404") == 2
    assert "/no/such/path" not in text
    assert metric(text, "http_request_duration_seconds_count", method="POST", route="/") == 4
    assert metric(text, "http_request_duration_seconds_bucket", method="POST", route="/", le="+Inf") == 4


def test_openapi_describes_the_body_and_errors(svc: Service) -> None:
    spec = httpx.get(svc.url + "/openapi.json").json()
    post_op = spec["paths"]["/"]["post"]
    ref = post_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body["required"] == ["a", "b"]
    assert body["properties"]["a"]["type"] == "number"
    assert {"200", "413", "422", "503"} <= post_op["responses"].keys()
    assert set(spec["paths"]) == {"/", "/healthz", "/readyz"}
    docs = httpx.get(svc.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_past_max_in_flight_a_request_gets_an_immediate_json_503(tmp_path) -> None:
    """Overload: 80 requests at once against MAX_IN_FLIGHT=50, each on its own connection."""
    cap, n, delay = 50, 80, 2.0

    async def post_timed(client: httpx.AsyncClient, a: int) -> tuple[httpx.Response, float, int]:
        start = time.perf_counter()
        response = await client.post("/", json={"a": a, "b": 0.5})
        return response, time.perf_counter() - start, a

    async def main(s: Service) -> tuple[list, list[float], list[int], list[int]]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=s.url, timeout=30, limits=limits) as client, \
                httpx.AsyncClient(base_url=s.url, timeout=5) as probe:
            posts = [asyncio.create_task(post_timed(client, a)) for a in range(n)]
            gauges, health, public_metrics = [], [], []
            held_until = time.monotonic() + delay * 0.75
            while time.monotonic() < held_until:  # while the admitted ones are held
                gauges.append(metric((await probe.get(s.metrics_url)).text, "http_requests_in_flight"))
                health.append((await probe.get("/healthz")).status_code)
                public_metrics.append((await probe.get("/metrics")).status_code)
                await asyncio.sleep(0.05)
            return await asyncio.gather(*posts), gauges, health, public_metrics

    with run_service(tmp_path, MAX_IN_FLIGHT=str(cap), DELAY_SECONDS=str(delay)) as s:
        results, gauges, health, public_metrics = asyncio.run(main(s))
        rejected_total = s.metric("http_requests_rejected_total")
        logs = s.logs()

    admitted = [(r, t, a) for r, t, a in results if r.status_code == 200]
    rejected = [(r, t) for r, t, _ in results if r.status_code != 200]
    assert len(admitted) == cap
    assert all(r.json() == {"result": a + 0.5} and t >= delay for r, t, a in admitted)
    assert len(rejected) == n - cap
    for response, elapsed in rejected:
        assert response.status_code == 503
        assert elapsed < delay / 4  # at once, not after the delay
        assert "MAX_IN_FLIGHT" in response.json()["detail"]
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["connection"] == "close"
    # The gauge reached the cap and never went past it; the pod stayed alive for the kubelet;
    # a flood of any other path, /metrics on the public port too, is refused like the rest.
    assert max(gauges) == cap
    assert set(health) == {200}
    assert public_metrics[-1] == 503
    assert rejected_total == n - cap + public_metrics.count(503)
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


def test_every_log_line_is_one_json_object(tmp_path) -> None:
    with run_service(tmp_path, DELAY_SECONDS="0") as s:
        httpx.post(s.url + "/", json=README_CURL)
        httpx.post(s.url + "/", content=b"{", headers={"Content-Type": "application/json"})
        httpx.get(s.url + "/healthz")
        assert s.terminate() == 0
        lines = s.log_lines()
    logs = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    assert all(isinstance(entry, dict) for entry in logs)
    assert all({"timestamp", "level", "event"} <= entry.keys() for entry in logs), logs
    events = [entry["event"] for entry in logs]
    assert any(e.startswith("Uvicorn running on") for e in events)
    assert "Shutting down" in events and any(e.startswith("Finished server process") for e in events)

    access = [entry for entry in logs if entry["event"] == "request"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("GET", "/healthz", 200),  # run_service waiting for the start
        ("POST", "/", 200), ("POST", "/", 422), ("GET", "/healthz", 200)
    ]
    assert all(a["duration_ms"] >= 0 and a["level"] == "info" for a in access)
    assert len(lines) == len(set(lines)), "a line was logged twice"


def test_loglevel_filters_lines(tmp_path) -> None:
    with run_service(tmp_path, DELAY_SECONDS="0", LOGLEVEL="warning") as s:
        httpx.post(s.url + "/", json=README_CURL)
        s.terminate()
        assert s.logs() == []  # info lines (start-up, access) are filtered out


def test_errors_are_logged_as_one_json_line_with_the_traceback() -> None:
    code = (
        "import logging, service\n"
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


# --- Shutdown ---------------------------------------------------------------------------------


def test_sigterm_completes_every_in_flight_request(tmp_path) -> None:
    """As the kubelet stops a pod: 100+ requests inside their delay, then SIGTERM."""
    n = 120

    async def main(s: Service) -> tuple[list[httpx.Response], int, bool]:
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(base_url=s.url, timeout=60, limits=limits) as client:
            posts = [asyncio.create_task(client.post("/", json=README_CURL)) for _ in range(n)]
            await in_flight(s, n)
            s.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for, lambda: s.logged("closing keep-alive connections"), "SIGTERM handled")
            try:  # the listening socket is closed: new connections are refused
                await httpx.AsyncClient().get(s.url + "/healthz", timeout=2)
                refused = False
            except httpx.ConnectError:
                refused = True
            responses = await asyncio.gather(*posts)
            return responses, await asyncio.to_thread(s.proc.wait, 30), refused

    with run_service(tmp_path, DELAY_SECONDS="3") as s:
        responses, code, refused = asyncio.run(main(s))
        logs = s.logs()
    assert [r.status_code for r in responses] == [200] * n
    assert all(r.json() == {"result": 15.0} for r in responses)
    assert code == 0
    assert refused
    events = [e["event"] for e in logs]
    assert events.index("Shutting down") < events.index("Application shutdown complete.")
    assert sum(1 for e in logs if e["event"] == "request" and e["path"] == "/") == n


def test_idle_keep_alive_connection_is_answered_after_sigterm(tmp_path) -> None:
    """A client behind a load balancer keeps its connection through the pod's preStop and
    sends its next request just after SIGTERM: it gets its answer, marked `Connection: close`."""

    async def main(s: Service) -> None:
        add, ready = await connect(s.url), await connect(s.url)
        assert (await exchange(add, POST_ADD))[0] == 200
        assert (await exchange(ready, GET_READYZ))[0] == 200
        s.proc.send_signal(signal.SIGTERM)
        # Both connections are idle keep-alives when the shutdown begins.
        await asyncio.to_thread(wait_for, lambda: s.logged("closing keep-alive connections"), "SIGTERM handled")

        status, headers, body = await exchange(add, POST_ADD)
        assert (status, body) == (200, b'{"result":15.0}')
        assert headers["connection"] == "close"
        assert await add[0].read() == b""  # and then the server ends the connection

        status, headers, body = await exchange(ready, GET_READYZ)
        assert (status, json.loads(body)) == (503, {"status": "shutting down"})
        assert headers["connection"] == "close"

    with run_service(tmp_path, DELAY_SECONDS="0.2") as s:
        asyncio.run(asyncio.wait_for(main(s), 10))
        assert s.proc.wait(10) == 0


def test_keep_alive_clients_through_sigterm_are_all_answered_then_told_to_close(tmp_path) -> None:
    """Dozens of keep-alive clients with short think times, so some are idle at SIGTERM: every
    request sent on an open connection is answered in full, and every client hears
    `Connection: close` before its connection ends."""
    n = 40

    async def main(s: Service) -> list[list[tuple[bool, int, bytes, str | None]] | BaseException]:
        sigterm = asyncio.Event()
        answered = asyncio.Semaphore(0)

        async def client(seed: int) -> list[tuple[bool, int, bytes, str | None]]:
            think = random.Random(seed)
            conn = await connect(s.url)
            answers = []  # (sent after SIGTERM, status, body, Connection header)
            while True:
                after = sigterm.is_set()
                status, headers, body = await exchange(conn, POST_ADD)
                answers.append((after, status, body, headers.get("connection")))
                answered.release()
                if headers.get("connection") == "close":
                    assert await conn[0].read() == b"", "data after a Connection: close answer"
                    return answers
                await asyncio.sleep(think.uniform(0, 0.3))

        clients = asyncio.gather(*(client(i) for i in range(n)), return_exceptions=True)
        for _ in range(2 * n):  # every client is past its first answer, on average
            await asyncio.wait_for(answered.acquire(), 10)
        s.proc.send_signal(signal.SIGTERM)
        sigterm.set()
        return await asyncio.wait_for(clients, 10)

    with run_service(tmp_path, DELAY_SECONDS="0.3") as s:
        results = asyncio.run(main(s))
        code = s.proc.wait(10)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of {n} clients lost their connection: {errors[:3]!r}"
    answers = [a for r in results for a in r]
    assert {(status, body) for _, status, body, _ in answers} == {(200, b'{"result":15.0}')}
    assert all(r[-1][3] == "close" for r in results)  # each one's last answer said so
    # Not vacuous: some clients were idle at SIGTERM and sent a request on their open connection.
    assert sum(1 for r in results if r[-1][0]) >= 5
    assert code == 0


def test_runs_on_uvloop_and_httptools(service: Service) -> None:
    maps = open(f"/proc/{service.proc.pid}/maps").read()
    assert "uvloop/loop." in maps and "httptools/parser/parser." in maps
