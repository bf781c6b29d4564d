"""Benchmark: service.py against FastAPI alone and a bare-ASGI floor, same uvicorn, same run.

Run from the repository root (Linux; needs `wrk` and `taskset`):

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \
        python tests/tools/benchmark.py [--quick] [--apps service,fastapi,floor,path/to/other.py]

For each app it measures
  1. start-to-ready (Popen to the first 200 on /healthz), idle RSS and idle CPU;
  2. CPU per request and throughput at DELAY_SECONDS=0: the server pinned to core 0, wrk
     (1 thread, 50 connections, keep-alive) pinned to core 1;
  3. C = 1,000, 5,000 and 10,000 requests opened at once at DELAY_SECONDS=5, from an epoll client
     pinned to core 1: p50/p99 latency (connect to last byte), errors, peak RSS (VmHWM);
  4. memory per request in flight: the slope of peak RSS from 1,000 to 5,000 at once.
It writes tests/tools/measured.json and has tests/tools/figures.py rewrite the docs from it (the
table in docs/performance.md, docs/latency.svg, and the model's figures, which read the idle
memory). An app given as a path (another version of service.py, say) is measured beside the
others and only printed. The script installs nothing: without wrk it says how to install it.
"""

import argparse
import errno
import datetime
import http.client
import json
import os
import platform
import re
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(__file__).resolve().parent
APPS = {
    "service": ROOT / "service.py",
    "fastapi": TOOLS / "fastapi_floor_app.py",
    "floor": TOOLS / "floor_app.py",
}
SERVER_CPU, CLIENT_CPU = "0", "1"
TICK = os.sysconf("SC_CLK_TCK")
BODY = b'{"a": 10, "b": 5}'

# --- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_mib(pid: int, key: str) -> float:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} CPUs, {model}, Linux {platform.release()}"


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- Server -----------------------------------------------------------------------------------


class Server:
    """One app as its own Python process, pinned to SERVER_CPU, logs to a file."""

    def __init__(self, name: str, delay: float, workdir: Path) -> None:
        self.port = free_port()
        self.log = (workdir / f"{Path(name).stem}-{delay}-{self.port}.log").open("w")
        env = {**os.environ, "PORT": str(self.port), "METRICS_PORT": str(free_port()), "DELAY_SECONDS": str(delay)}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, sys.executable, str(APPS.get(name) or Path(name).resolve())],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=raise_fd_limit,
        )
        self.ready_s = self._wait_ready()

    def _wait_ready(self) -> float:
        deadline = self.started + 60
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"server exited {self.proc.returncode}: see {self.log.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.01)
        sys.exit(f"server not ready in 60 s: see {self.log.name}")

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the server: same pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_answer(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/", BODY, {"Content-Type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    if response.status != 200 or body != {"result": 15.0}:
        sys.exit(f"wrong answer from port {port}: {response.status} {body}")


# --- Measurements -----------------------------------------------------------------------------


def idle(server: Server, settle: float, window: float) -> dict:
    time.sleep(settle)
    before = cpu_seconds(server.pid)
    time.sleep(window)
    used = cpu_seconds(server.pid) - before
    return {
        "idle_cpu_millicores": round(used / window * 1000, 2),
        "idle_rss_mib": round(status_mib(server.pid, "VmRSS"), 1),
    }


def throughput(server: Server, seconds: int, workdir: Path) -> dict:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{BODY.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    url = f"http://127.0.0.1:{server.port}/"
    cmd = ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", "-c50", "-s", str(script), url]
    subprocess.run([*cmd, "-d3s"], check=True, capture_output=True)  # warm-up
    before = cpu_seconds(server.pid)
    out = subprocess.run([*cmd, f"-d{seconds}s"], check=True, capture_output=True, text=True).stdout
    used = cpu_seconds(server.pid) - before
    requests, elapsed, unit = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out).groups()
    elapsed_s = float(elapsed) / (1000 if unit == "ms" else 1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad or errors:
        sys.exit(f"wrk saw errors:\n{out}")
    return {
        "cpu_us_per_request": round(used / int(requests) * 1e6, 1),
        "rps": round(int(requests) / elapsed_s, 1),
        "server_cpu_share": round(used / elapsed_s, 3),
    }


def hold(server: Server, concurrency: int) -> dict:
    before = cpu_seconds(server.pid)
    out = subprocess.run(
        ["taskset", "-c", CLIENT_CPU, sys.executable, __file__, "_client",
         str(server.port), str(concurrency)],
        capture_output=True, text=True, preexec_fn=raise_fd_limit,
    )
    if out.returncode:
        sys.exit(f"client failed:\n{out.stderr}")
    result = json.loads(out.stdout)
    c = concurrency
    return {
        f"p50_s_{c}": result["p50_s"],
        f"latency_quantiles_s_{c}": result["quantiles_s"],
        f"p99_s_{c}": result["p99_s"],
        f"max_s_{c}": result["max_s"],
        f"errors_{c}": result["errors"],
        f"error_kinds_{c}": result["error_kinds"],
        f"client_burst_s_{c}": result["burst_s"],
        f"peak_rss_mib_{c}": round(status_mib(server.pid, "VmHWM"), 1),
        f"hold_cpu_s_{c}": round(cpu_seconds(server.pid) - before, 2),
    }


# --- Concurrency client (runs as its own process, pinned to CLIENT_CPU) --------------------------


def status_line(head: bytes) -> str:
    return head.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without a response"


class Request:
    """One connection carrying one POST; its latency runs from connect() to the last byte."""

    def __init__(self, port: int, payload: bytes, source: str = "") -> None:
        self.sock = socket.socket()
        self.sock.setblocking(False)
        if source:  # another loopback address: each has its own ~28k ephemeral ports
            self.sock.bind((source, 0))
        self.start = time.perf_counter()
        self.sock.connect_ex(("127.0.0.1", port))  # EINPROGRESS; loopback usually connects at once
        self.payload = payload
        self.sent = False
        self.chunks: list[bytes] = []
        self.result: float | str | tuple[str, float] | None = None

    def try_send(self) -> bool:
        try:
            self.sock.send(self.payload)
        except OSError as exc:
            # Not connected yet (full accept queue: the SYN is retried); wait for writability.
            if exc.errno in (errno.ENOTCONN, errno.EAGAIN):
                return False
            self.finish(type(exc).__name__)
            return True
        self.sent = time.perf_counter()
        return True

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError as exc:
            return self.finish(type(exc).__name__)
        if data:
            return self.chunks.append(data)
        head, _, body = b"".join(self.chunks).partition(b"\r\n\r\n")  # Connection: close
        self.finish(self.verdict(head, body, time.perf_counter() - self.start))

    def verdict(self, head: bytes, body: bytes, elapsed: float) -> float | str:
        """The latency of a right answer; otherwise what was wrong."""
        if not head.startswith(b"HTTP/1.1 200"):
            return status_line(head)
        if body.replace(b" ", b"") != b'{"result":15.0}':
            return "wrong body"
        return elapsed

    def finish(self, result: float | str | tuple[str, float]) -> None:
        self.result = result


def drive(selector: selectors.BaseSelector, requests: list[Request], timeout: float) -> None:
    """Finish sending and read every answer on the registered sockets; what has no answer by the
    deadline is a "timeout"."""
    deadline = time.perf_counter() + timeout
    while selector.get_map() and time.perf_counter() < deadline:
        for key, events in selector.select(timeout=1):
            request = key.data
            if not request.sent and request.result is None:
                if request.try_send() and request.result is None:
                    selector.modify(request.sock, selectors.EVENT_READ, request)
            elif events & selectors.EVENT_READ:
                request.on_readable()
            if request.result is not None:
                selector.unregister(request.sock)
                request.sock.close()
    for request in requests:
        if request.result is None:
            request.finish("timeout")
            request.sock.close()


def client(port: int, concurrency: int, timeout: float = 120) -> dict:
    """All requests in one tight loop, then epoll until every response is in: a Python asyncio
    client spends ~200 µs per connection and would itself spread the burst over a second."""
    payload = (
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
    ).encode() + BODY
    selector = selectors.DefaultSelector()
    requests: list[Request] = []
    for _ in range(concurrency):
        request = Request(port, payload)
        requests.append(request)
        events = selectors.EVENT_READ if request.try_send() else selectors.EVENT_WRITE
        selector.register(request.sock, events, request)
    burst = time.perf_counter() - requests[0].start
    drive(selector, requests, timeout)
    latencies = sorted(r.result for r in requests if isinstance(r.result, float))
    errors = [r.result for r in requests if isinstance(r.result, str)]

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3) if latencies else None

    return {
        "p50_s": pct(0.50), "p99_s": pct(0.99), "max_s": pct(1.0),
        "quantiles_s": [pct(q / 100) for q in range(101)],  # 0 % to 100 %: the chart's CDF
        "errors": len(errors), "error_kinds": {kind: errors.count(kind) for kind in set(errors)},
        "burst_s": round(burst, 3),
    }


def run_client(port: int, concurrency: int) -> None:
    raise_fd_limit()
    print(json.dumps(client(port, concurrency)))


def write_outputs(measured: dict) -> None:
    """measured.json keeps what the other tools wrote there; figures.py rewrites the docs from it."""
    import figures

    path = TOOLS / "measured.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | measured, indent=2) + "\n")
    for name in figures.stale(write=True):
        print(f"rewrote {name}", file=sys.stderr)
    print(figures.benchmark(json.loads(path.read_text())))


# --- Main -------------------------------------------------------------------------------------


def measure(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    print(f"== {name}", file=sys.stderr)
    server = Server(name, 0, workdir)
    try:
        check_answer(server.port)
        result = {"start_to_ready_s": round(server.ready_s, 3)}
        result |= idle(server, settle=args.settle, window=args.idle)
        print(f"   idle {result}", file=sys.stderr)
        result |= throughput(server, args.wrk, workdir)
        print(f"   wrk {result}", file=sys.stderr)
    finally:
        server.stop()
    for concurrency in args.concurrency:
        server = Server(name, 5, workdir)  # a fresh process: peak RSS is this wave's alone
        try:
            result |= hold(server, concurrency)
            print(f"   {concurrency} at once: {result}", file=sys.stderr)
        finally:
            server.stop()
    if {1000, 5000} <= set(args.concurrency):
        result["kb_per_in_flight"] = per_in_flight(result)
    return result


def per_in_flight(result: dict, low: int = 1_000, high: int = 5_000) -> float:
    """kB (1,000 bytes) of RSS per request in flight: the slope between two bursts, so what every
    process holds anyway (interpreter, imports, buffers) cancels out."""
    grown = result[f"peak_rss_mib_{high}"] - result[f"peak_rss_mib_{low}"]
    return round(grown * 2**20 / (high - low) / 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter idle and wrk windows")
    parser.add_argument("--apps", default="service,fastapi,floor", help="comma-separated: " + ",".join(APPS))
    parser.add_argument("--concurrency", default="1000,5000,10000")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    args.settle, args.idle, args.wrk = (2, 10, 5) if args.quick else (5, 20, 10)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]

    if sys.platform != "linux" or not shutil.which("taskset"):
        sys.exit("needs Linux with taskset (util-linux)")
    if not shutil.which("wrk"):
        sys.exit("wrk not found: install it with `apt-get install -y wrk` (Debian/Ubuntu)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 CPUs: one for the server, one for the load generator")

    raise_fd_limit()
    measured = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_average_before": round(os.getloadavg()[0], 2),
        "command": "uv run --with-requirements service.py --with-requirements tests/requirements.txt "
        "python tests/tools/benchmark.py" + (" --quick" if args.quick else ""),
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name in args.apps.split(","):
            measured[name] = measure(name, args, Path(tmp))
    measured["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps({k: v for k, v in measured.items() if k not in APPS}, indent=1))
    others = [name for name in measured if name not in APPS and isinstance(measured[name], dict)]
    for name in others:  # apps given as paths: beside the service, in this run
        print(name, {k: v for k, v in measured.pop(name).items() if "quantiles" not in k})
    if set(APPS) <= measured.keys() and not args.no_write:
        write_outputs(measured)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_client"]:
        run_client(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
