"""The project's locustfile, headless, as every tool runs it (`uv run locustfile.py`: locust at the
version the locustfile pins), and what locust recorded."""

import csv
import subprocess
from dataclasses import dataclass
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parents[2] / "locustfile.py"


def command(host: str, users: int, spawn_rate: float, stats: Path, run_s: float | None = None) -> list[str]:
    """Without `run_s` the swarm runs until it is sent SIGTERM."""
    return [
        "uv", "run", "--quiet", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", f"{spawn_rate:g}",
        "-H", host, *(["-t", f"{run_s:g}s"] if run_s else []), "--csv", str(stats), "--only-summary",
        # When the time is up, every user finishes the request it is in (5 s at most).
        "--loglevel", "WARNING", "--stop-timeout", "10",
    ]


def install() -> None:
    """Have locust installed before a clock starts."""
    subprocess.run(["uv", "run", "--quiet", str(LOCUSTFILE), "--version"], check=True,
                   capture_output=True, timeout=600)


@dataclass(frozen=True)
class Results:
    requests: int
    failures: int
    messages: list[str]  # each failure and locustfile exception, with its count
    p99_s: float
    status_503: int
    summary: dict[str, str]  # the Aggregated row as locust's summary prints it


# The Aggregated row's columns in locust's summary, from its CSV's.
SUMMARY = {"# reqs": "Request Count", "# fails": "Failure Count", "Avg": "Average Response Time",
           "Min": "Min Response Time", "Max": "Max Response Time", "Med": "Median Response Time",
           "req/s": "Requests/s", "failures/s": "Failures/s"}


def results(stats: Path) -> Results:
    """What locust wrote with `--csv stats`."""
    with open(f"{stats}_stats.csv") as f:
        total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    with open(f"{stats}_failures.csv") as f:
        failures = list(csv.DictReader(f))
    with open(f"{stats}_exceptions.csv") as f:
        exceptions = list(csv.DictReader(f))
    messages = [f"{row['Occurrences']} x {row['Method']} {row['Name']}: {row['Error']}" for row in failures]
    messages += [f"{row['Count']} x exception in the locustfile: {row['Message']}" for row in exceptions]
    busy = sum(int(row["Occurrences"]) for row in failures if row["Error"].startswith("status 503"))
    return Results(int(total["Request Count"]), int(total["Failure Count"]), messages,
                   float(total["99%"] if total["99%"] != "N/A" else "nan") / 1000, busy,
                   {column: total[field] for column, field in SUMMARY.items()})
