"""Where a request in flight's memory goes: tracemalloc in the server, 1,000 then 5,000 in flight.

Run from the repository root (Linux):

    uv run --with-requirements service.py --with-requirements tests/requirements.txt \
        python tests/memory_profile.py [service.py | tests/floor_app.py | any older service.py]

The app runs as its own process with tracemalloc on (25 frames); SIGUSR1 makes it dump a
snapshot. The script holds 1,000 requests in their sleep, snapshots, adds 4,000 more, snapshots
again, and prints the difference per request, by the line that allocated it (a coroutine's frame
counts at the line that called it) and by package.
"""

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

ROOT = Path(__file__).resolve().parent.parent
STEPS = (1_000, 5_000)

# Run inside the server: trace, dump a snapshot on SIGUSR1, then run the app as `python app.py`.
SERVER = """
import runpy, signal, sys, tracemalloc
tracemalloc.start(25)
def dump(*_):
    tracemalloc.take_snapshot().dump(sys.argv[2] + ".tmp")
    __import__("os").rename(sys.argv[2] + ".tmp", sys.argv[2])
signal.signal(signal.SIGUSR1, dump)
sys.argv = sys.argv[1:2]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

PACKAGES = ("service.py", "floor_app.py", "fastapi", "starlette", "uvicorn", "pydantic", "structlog",
            "prometheus_client", "contextlib", "asyncio", "email", "json")


def package(frame: tracemalloc.Frame) -> str:
    return next((p for p in PACKAGES if f"/{p}" in frame.filename), Path(frame.filename).name)


def hold(port: int, n: int, sockets: list[socket.socket]) -> None:
    payload = (f"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(payload)
        sockets.append(s)


def snapshot(proc: subprocess.Popen, path: Path) -> tracemalloc.Snapshot:
    path.unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR1)
    while not path.exists():
        time.sleep(0.2)
    return tracemalloc.Snapshot.load(str(path))


def main(app: Path) -> None:
    raise_fd_limit()
    port = free_port()
    env = {**os.environ, "PORT": str(port), "DELAY_SECONDS": "600", "LOGLEVEL": "WARNING"}
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
            for n in STEPS:
                hold(port, n - len(sockets), sockets)
                time.sleep(5 + n / 500)  # every request read, validated and asleep
                snaps.append(snapshot(proc, snap))
        finally:
            proc.kill()
            for s in sockets:
                s.close()
    per = STEPS[1] - STEPS[0]
    diff = snaps[1].compare_to(snaps[0], "traceback")
    by_line: dict[str, int] = {}
    by_package: dict[str, int] = {}
    for stat in diff:
        frame = stat.traceback[0]  # innermost: the line that allocated
        where = f"{package(frame)}:{Path(frame.filename).name}:{frame.lineno}"
        by_line[where] = by_line.get(where, 0) + stat.size_diff
        by_package[package(frame)] = by_package.get(package(frame), 0) + stat.size_diff
    total = sum(by_package.values())
    print(f"{app.name}: {total / per:,.0f} B per request in flight (Python heap, {STEPS[0]:,} -> {STEPS[1]:,})")
    for name, size in sorted(by_package.items(), key=lambda kv: -kv[1]):
        if size / per >= 50:
            print(f"  {size / per:7,.0f}  {name}")
    print("  by line:")
    for where, size in sorted(by_line.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {size / per:7,.0f}  {where}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "service.py").resolve())
