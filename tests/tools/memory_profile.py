"""Where a request in flight's memory goes: tracemalloc in the server, 1,000 then 5,000 in flight.

Run from the repository root (Linux):

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \
        python tests/tools/memory_profile.py [APP] [--steps 1000,5000] [--write]

APP is service.py (the default), tests/tools/floor_app.py, or any other version of service.py.
`--write` profiles service.py, FastAPI alone and the floor, and keeps the result in
tests/tools/measured.json ("memory_profile"), from which figures.py writes docs/performance.md.

The app runs as its own process with tracemalloc on (25 frames); SIGUSR1 makes it dump a
snapshot. The script holds 1,000 requests in their sleep, snapshots, adds 4,000 more, snapshots
again, and prints the difference per request, by the line that allocated it (a coroutine's frame
counts at the line that called it) and by package.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmark import BODY, free_port, raise_fd_limit

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(__file__).resolve().parent

# Run inside the server: trace, dump a snapshot on SIGUSR1, then run the app as `python app.py`.
SERVER = """
import os, runpy, signal, sys, tracemalloc
tracemalloc.start(25)
app, path = sys.argv[1:3]
def tasks(*_):  # every request in flight is one task: the divisor, counted, not assumed
    open(path + ".tasks.tmp", "w").write(str(len(__import__("asyncio").all_tasks())))
    os.rename(path + ".tasks.tmp", path + ".tasks")
def dump(*_):
    tracemalloc.take_snapshot().dump(path + ".tmp")
    os.rename(path + ".tmp", path)
signal.signal(signal.SIGUSR1, dump)
signal.signal(signal.SIGUSR2, tasks)
sys.argv = [app]
sys.path.insert(0, os.path.dirname(app))  # as `python app.py` has it
runpy.run_path(app, run_name="__main__")
"""

PACKAGES = ("service.py", "floor_app.py", "fastapi", "starlette", "uvicorn", "pydantic", "structlog",
            "prometheus_client", "contextlib", "asyncio", "email", "json")


def package(frame: tracemalloc.Frame) -> str:
    if "body_limit" in frame.filename:  # FastAPI's max_body_size: its own line in the breakdown
        return "fastapi+starlette body limit"
    return next((p for p in PACKAGES if f"/{p}" in frame.filename), Path(frame.filename).name)


def hold(port: int, n: int, sockets: list[socket.socket]) -> None:
    payload = (f"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(payload)
        sockets.append(s)


def ask(proc: subprocess.Popen, sig: int, path: Path) -> Path:
    path.unlink(missing_ok=True)
    proc.send_signal(sig)
    while not path.exists():
        time.sleep(0.1)
    return path


def snapshot(proc: subprocess.Popen, path: Path, n: int) -> tuple[tracemalloc.Snapshot, int]:
    """Once every request is in its sleep (the task count stops growing), a snapshot of the
    server's heap and that task count."""
    counts = [0]
    while counts[-1] < n or counts[-1] != counts[-5]:
        time.sleep(1)
        counts.append(int(ask(proc, signal.SIGUSR2, Path(f"{path}.tasks")).read_text()))
        counts = counts[-5:] if len(counts) >= 5 else [0] * (5 - len(counts)) + counts
    return tracemalloc.Snapshot.load(str(ask(proc, signal.SIGUSR1, path))), counts[-1]


def profile(app: Path, steps: tuple[int, int]) -> dict[str, int]:
    """Bytes per request in flight, by package, as the console report prints them."""
    raise_fd_limit()
    port = free_port()
    env = {**os.environ, "PORT": str(port), "METRICS_PORT": str(free_port()), "DELAY_SECONDS": "600",
           "LOGLEVEL": "WARNING"}
    with tempfile.TemporaryDirectory() as tmp:
        snap = Path(tmp) / "snapshot"
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(app), str(snap)], env=env,
                                preexec_fn=raise_fd_limit)
        sockets: list[socket.socket] = []
        try:
            for _ in range(600):  # tracing slows start-up several times over
                if proc.poll() is not None:
                    sys.exit(f"{app} exited {proc.returncode}")
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except OSError:
                    time.sleep(0.2)
            snaps = []
            for n in steps:
                hold(port, n - len(sockets), sockets)
                snaps.append(snapshot(proc, snap, n))
        finally:
            proc.kill()
            for s in sockets:
                s.close()
    (low, low_tasks), (high, high_tasks) = snaps
    per = high_tasks - low_tasks
    diff = high.compare_to(low, "traceback")
    by_line: dict[str, int] = {}
    by_package: dict[str, int] = {}
    for stat in diff:
        frame = stat.traceback[-1]  # innermost (most recent): the line that allocated
        where = f"{package(frame)}:{Path(frame.filename).name}:{frame.lineno}"
        by_line[where] = by_line.get(where, 0) + stat.size_diff
        by_package[package(frame)] = by_package.get(package(frame), 0) + stat.size_diff
    total = sum(by_package.values())
    print(f"{app.name}: {total / per:,.0f} B per request in flight (Python heap, {low_tasks:,} -> {high_tasks:,} tasks)")
    for name, size in sorted(by_package.items(), key=lambda kv: -kv[1]):
        if size / per >= 50:
            print(f"  {size / per:7,.0f}  {name}")
    lines = sorted(by_line.items(), key=lambda kv: -kv[1])
    print("  by line:")
    for where, size in lines[:25]:
        print(f"  {size / per:7,.0f}  {where}")
    print(f"  {app.name}'s own lines:")
    for where, size in lines:
        if where.startswith(app.name) and size / per >= 8:
            print(f"  {size / per:7,.0f}  {where}")
    named = {"service.py": "the app file's own lines", "floor_app.py": "the app file's own lines",
             "fastapi_floor_app.py": "the app file's own lines"}
    return {named.get(name, name): round(size / per) for name, size in by_package.items() if size / per >= 50}


APPS = {"service": ROOT / "service.py", "fastapi": TOOLS / "fastapi_floor_app.py", "floor": TOOLS / "floor_app.py"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("app", nargs="?", default=str(ROOT / "service.py"))
    parser.add_argument("--steps", default="1000,5000", help="requests in flight at the two snapshots")
    parser.add_argument("--write", action="store_true",
                        help="profile service.py, FastAPI alone and the floor, into measured.json and the docs")
    args = parser.parse_args()
    steps = tuple(int(n) for n in args.steps.split(","))
    if not args.write:
        profile(Path(args.app).resolve(), steps)
        sys.exit()
    import datetime
    import json

    import figures
    from benchmark import machine

    measured = json.loads((TOOLS / "measured.json").read_text())
    measured["memory_profile"] = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "steps": list(steps),
        "apps": {name: profile(app, steps) for name, app in APPS.items()},
    }
    (TOOLS / "measured.json").write_text(json.dumps(measured, indent=2) + "\n")
    figures.stale(write=True)
