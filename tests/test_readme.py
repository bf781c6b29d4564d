"""The README is followed command by command: what it names must exist and match."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import cluster_model as cm
import pytest
from cluster_model import manifest
from conftest import ROOT, project_files

README = (ROOT / "README.md").read_text()
# The reference pages the README links (docs/*.md): its own words, moved out of the way.
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
ALL_TEXT = "\n".join([README, *PAGES.values()])
TEST_COMMAND = (
    "uv run --with-requirements service.py --with-requirements tests/requirements.txt pytest tests"
)


def code_blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_every_file_in_the_project_structure_exists() -> None:
    tree = re.search(r"### 1\. Project Structure.*?```\n(.*?)```", README, flags=re.S).group(1)
    names = re.findall(r"[├└]── ([\w./-]+)", tree)
    assert {"service.py", "Dockerfile", "deployment.yaml", "locustfile.py"} <= set(names)
    for name in names:
        assert (ROOT / name).exists(), f"README lists {name}, which is not in the repository"
    top_level = {path.parts[0] for path in project_files()}
    assert top_level <= {n.rstrip("/") for n in names}, "a file is missing from the README's tree"


def test_local_commands_are_the_ones_the_repository_uses() -> None:
    assert "uv run service.py" in README
    ci = (ROOT / ".ci/run").read_text()
    assert TEST_COMMAND in ci and TEST_COMMAND in README
    swarm = re.search(r"locust -f locustfile\.py --headless [^\n]*-H http://localhost:8000", README)
    assert swarm, "README shows no local headless swarm"
    bench = re.search(r"uv run [^\n]*python (tests/[\w.]+\.py)", ALL_TEXT)
    assert bench and (ROOT / bench.group(1)).exists()


@pytest.mark.parametrize("name", ["cluster-config.yaml", "deployment.yaml", "service.yaml", "hpa.yaml"])
def test_manifests_shown_in_the_readme_are_the_files(name: str) -> None:
    shown = [b for b in code_blocks("yaml", ALL_TEXT) if b.startswith(f"# {name}")]
    assert shown, f"neither README nor docs/ shows {name}"
    assert shown[0] == (ROOT / name).read_text()


def test_names_ports_and_region_in_commands_match_the_manifests() -> None:
    cluster, deployment = manifest("cluster-config.yaml"), manifest("deployment.yaml")
    service, hpa = manifest("service.yaml"), manifest("hpa.yaml")
    commands = "\n".join(code_blocks("bash"))

    region, cluster_name = cluster["metadata"]["region"], cluster["metadata"]["name"]
    nodegroup = cluster["managedNodeGroups"][0]["name"]
    assert f"--cluster {cluster_name}" in commands and f"--name {nodegroup}" in commands
    assert f"--region {region}" in commands or f"AWS_REGION={region}" in commands

    for ref in re.findall(r"deployment/([\w-]+)", commands):
        assert ref == deployment["metadata"]["name"]
    for ref in re.findall(r"kubectl (?:get|describe) (?:service|svc) ([\w-]+)", commands):
        assert ref == service["metadata"]["name"]
    for ref in re.findall(r"kubectl (?:get|describe) hpa ([\w-]+)", commands):
        assert ref == hpa["metadata"]["name"]
    for label in re.findall(r"-l (app=[\w-]+)", commands):
        key, value = label.split("=")
        assert deployment["spec"]["template"]["metadata"]["labels"][key] == value

    # The curl goes to the ELB's port 80, which must reach the container's port.
    port = service["spec"]["ports"][0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert '"http://$ELB/"' in commands and port["port"] == 80
    assert port["targetPort"] == container["ports"][0]["containerPort"]
    assert re.search(r"kubectl apply -f service\.yaml -f hpa\.yaml", commands)
    # deployment.yaml is applied with $IMAGE in place of its placeholder: tests/test_readme_path.py
    # runs those commands and checks the image kubectl receives.
    assert re.search(r"^IMAGE=\$REGISTRY/my-math-service:", commands, re.M)


def marked(name: str) -> str:
    return re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", README, re.S).group(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[str, Path]:
    """tests/cluster_model.py's table, and its charts drawn aside (not over docs/)."""
    charts = tmp_path_factory.mktemp("charts")
    run = subprocess.run([sys.executable, "tests/cluster_model.py", "--charts", str(charts)], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=120)
    return run.stdout.strip(), charts


def test_capacity_table_is_the_models_current_output(model) -> None:
    assert marked("capacity") == model[0]


def chart_caption(name: str) -> str:
    """The README's (or a docs page's) image of docs/<name>, and the caption line under it."""
    shown = re.search(rf"^!\[[^\]]+\]\((?:docs/)?{re.escape(name)}\)\n\n(\*.+\*)$", ALL_TEXT, re.M)
    assert shown, f"README does not show docs/{name} with a caption"
    return shown.group(1)


@pytest.mark.parametrize("name", ["demo-timeline.svg", "capacity.svg"])
def test_charts_are_what_the_model_draws_now(model, name: str) -> None:
    # Byte for byte: the drawing is deterministic (cluster_model.CHART_STYLE).
    same = (model[1] / name).read_bytes() == (ROOT / "docs" / name).read_bytes()
    assert same, f"docs/{name} is not what the model draws now: redraw it with tests/cluster_model.py"
    assert "tests/cluster_model.py" in chart_caption(name)


def test_performance_table_is_the_last_benchmark_run() -> None:
    # benchmark.py writes measured.json, performance.md and this section from one run.
    import benchmark

    run = (ROOT / "tests/performance.md").read_text().partition(benchmark.BREAKDOWN)[0]
    assert marked("benchmark") == run.strip()


def test_demo_rate_section_is_the_last_demo_rate_run() -> None:
    # tests/demo_rate_benchmark.py writes measured.json ("demo_rate") and this section together.
    import demo_rate_benchmark

    section = re.search(r"<!-- demo-rate:start -->\n(.*?)\n<!-- demo-rate:end -->", PAGES["docs/performance.md"], re.S)
    assert section and section.group(1) == demo_rate_benchmark.section(MEASURED)


def test_latency_chart_is_the_last_benchmark_run(tmp_path) -> None:
    # Drawn by benchmark.py from the measured.json of the same run; only the benchmark redraws it.
    import benchmark
    import cluster_model

    measured = json.loads((ROOT / "tests/measured.json").read_text())
    drawn = cluster_model.draw_svg(tmp_path / "latency.svg", benchmark.latency_chart, measured)
    same = drawn.read_bytes() == (ROOT / "docs/latency.svg").read_bytes()
    assert same, "docs/latency.svg is not drawn from tests/measured.json: rerun tests/benchmark.py"
    assert "tests/benchmark.py" in chart_caption("latency.svg")


def test_every_test_the_readme_cites_exists() -> None:
    cited = set(re.findall(r"\b(test_\w+)(?!\.py)\b", ALL_TEXT))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    assert cited and cited <= defined, sorted(cited - defined)


def test_no_real_account_id_anywhere() -> None:
    for path in project_files():
        text = (ROOT / path).read_text(errors="ignore")
        # An AWS account id is 12 digits; in an ECR host or an ARN it sits before ".dkr.ecr."
        # or after the region.
        assert not re.search(r"\b\d{12}\.dkr\.ecr\.|:[a-z]{2}-[a-z]+-\d:\d{12}:", text), path


def prose_values(text: str, patterns: list[str]) -> list[int]:
    return [int(v) for p in patterns for v in re.findall(p, text)]


# How the README names each manifest value in its own words. A pattern that stops matching
# fails the test below (each must find something), so a reworded sentence is noticed.
PROSE = {
    "HPA CPU target %": (
        lambda hpa, dep: hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
        [r"(\d+)\s?%\s+(?:CPU\s+)?target\b", r"\btarget(?:\s+of)?\s+(\d+)\s?%",
         r"(?:\d+%|<unknown>)/(\d+)%", r"\b(\d+)\s?% of the \d+m (?:CPU )?request"],
    ),
    "preStop seconds": (
        lambda hpa, dep: dep["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"],
        [r"preStop(?:\.sleep\.seconds:| sleep)\s*(\d+)", r"\b(\d+)\s?s preStop"],
    ),
    "grace period seconds": (
        lambda hpa, dep: dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        [r"terminationGracePeriodSeconds:\s*(\d+)", r"grace period (?:of )?(\d+)\s?s\b"],
    ),
    "minReplicas": (
        lambda hpa, dep: hpa["spec"]["minReplicas"],
        [r"minReplicas:\s*(\d+)", r"between (\d+) and \d+(?: pods)?\b", r"\breplicas (\d+)\.\.\d+"],
    ),
    "maxReplicas": (
        lambda hpa, dep: hpa["spec"]["maxReplicas"],
        [r"maxReplicas:\s*(\d+)", r"between \d+ and (\d+)(?: pods)?\b", r"\breplicas \d+\.\.(\d+)",
         r"\ball (\d+) replicas the HPA"],
    ),
}


@pytest.mark.parametrize("name", PROSE)
def test_prose_numbers_are_the_manifests(name: str) -> None:
    """The README's own words (the manifests it shows are compared whole elsewhere)."""
    value, patterns = PROSE[name]
    expected = value(manifest("hpa.yaml"), manifest("deployment.yaml"))
    prose = re.sub(r"^```yaml\n.*?^```", "", ALL_TEXT, flags=re.S | re.M)
    for pattern in patterns:
        found = prose_values(prose, [pattern])
        assert found, f"{name}: nothing in the README matches {pattern!r} any more"
        assert set(found) == {expected}, f"{name}: the README says {found}, the manifest {expected}"


def floor1(x: float) -> float:
    return math.floor(x * 10) / 10


def test_scale_down_and_idle_figures_are_the_models() -> None:
    hpa, work = cm.repo_kit()
    back = cm.back_to_min_range_s(hpa, work)
    reading, idle = cm.idle_reading_tolerated_m(hpa, work), cm.idle_cpu_tolerated_m(hpa, work)
    ratio = floor1(idle / work.measured.idle_cpu_m)
    for path, text in {"README.md and docs/*.md": ALL_TEXT, "hpa.yaml": (ROOT / "hpa.yaml").read_text()}.items():
        # One line per sentence: undo the wrapping of YAML comments.
        text = re.sub(r"\s*\n\s*#?\s*", " ", text)
        # The model's figures; the measured demo's caption quotes its own run (tests/test_e2e.py).
        model_text = re.sub(r"\*The same demo measured: .*?\*", "", text)
        timings = re.findall(r"(\d+)(?: to (\d+))? s after the swarm stops", model_text)
        assert timings and {(int(a), int(b or a)) for a, b in timings} == {back}, (path, timings, back)
        assert not re.search(r"(?:minutes|within minutes) (?:after|of) the swarm stop", text), path
        tolerated = re.findall(r"up to (\d+)m as the HPA reads it \(([\d.]+)m of the service's own idle CPU", text)
        assert tolerated and set(tolerated) == {(str(reading), f"{floor1(idle):g}")}, (path, tolerated)
        ratios = re.findall(r"([\d.]+)(?:x| times) the measured", text)
        assert ratios and set(ratios) == {f"{ratio:g}"}, (path, ratios)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_docs_page_is_linked_and_every_local_link_resolves() -> None:
    texts = {"README.md": README, **PAGES}
    for page in PAGES:
        assert f"]({page})" in README, f"README does not link {page}"
    for source, text in texts.items():
        base = (ROOT / source).parent
        for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]*)(?:#([^)\s]+))?\)", text):
            path = (base / target).resolve() if target else ROOT / source
            assert path.exists(), f"{source} links {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
                assert anchor in {slug(h) for h in headings}, f"{source}: no heading #{anchor} in {target or source}"


# --- Figures said in prose, checked against their sources --------------------------------------

MEASURED = json.loads((ROOT / "tests/measured.json").read_text())


def unwrapped(text: str) -> str:
    """One line per sentence: undo the wrapping of prose and of YAML comments."""
    return re.sub(r"\s*\n\s*#?\s*", " ", text)


def figure_texts() -> dict[str, str]:
    return {"README.md and docs/*.md": ALL_TEXT, **{n: (ROOT / n).read_text() for n in ("hpa.yaml", "deployment.yaml")}}


@pytest.fixture(scope="module")
def rows():
    """The model's capacity row for a swarm size, computed once per size."""
    hpa, work = cm.repo_kit()
    cache = {}
    return lambda users: cache.setdefault(users, cm.capacity_row(hpa, work, users))


def users_number(text: str) -> int:
    return int(text.replace(",", ""))


def test_replicas_per_swarm_size_are_the_models(rows) -> None:
    """'500 users reach 2 pods', '1,000 users to 4', ...: the model's settled replicas."""
    said = r"(\d{1,3}(?:,\d{3})*) users(?: \([^)]*\))?(?: add only [^,;.]*? and)? (?:reach|scale to|to) (\d+)\b"
    found = [(path, u, p) for path, text in figure_texts().items() for u, p in re.findall(said, unwrapped(text))]
    assert found, "no sentence names the replicas for a swarm size any more"
    wrong = [(path, u, p, rows(users_number(u)).replicas) for path, u, p in found if int(p) != rows(users_number(u)).replicas]
    assert wrong == [], "(where, users, said, model)"


def test_targets_readings_are_printed_as_kubectl_prints_them(rows) -> None:
    # The API server prints each metric with its name (formatHPAMetrics): "cpu: 5%/12%".
    readings = re.findall(r"(.{0,5})(?<![\w%])(?:\d+%|<unknown>)/\d+%", ALL_TEXT)
    assert readings and all(before.endswith("cpu: ") for before in readings), readings
    # A reading quoted for a swarm size is the model's for that swarm.
    quoted = re.findall(r"`cpu: (\d+)%/\d+%` under a ([\d,]+)-user swarm", ALL_TEXT)
    assert quoted, "no TARGETS reading is quoted for a swarm size any more"
    assert all(int(r) == rows(users_number(u)).utilization for r, u in quoted), quoted
    # The rounding the README explains is the model's: usage rounded up to whole millicores.
    _, work = cm.repo_kit()
    rounding = re.findall(r"a pod using ([\d.]+)m reads as (\d+) %", ALL_TEXT)
    assert rounding and all(
        int(p) == math.floor(100 * math.ceil(float(m)) / work.requests.cpu_m) for m, p in rounding
    ), rounding


def said_as(value: float) -> set[str]:
    return {f"{value:g}", f"{value:.1f}", f"{round(value)}", f"{round(value):,}"}


def overload_step(requests: int) -> dict:
    return next(s for s in MEASURED["overload"]["steps"] if s["requests"] == requests)


MEMORY = {
    # tests/benchmark.py: the service process's peak RSS with 10,000 requests in flight.
    "peak RSS at 10,000 in flight": (
        lambda: MEASURED["service"]["peak_rss_mib_10000"],
        [r"Peak RSS with 10,000 in flight: ([\d.]+) MiB"],
    ),
    # tests/overload_benchmark.py: the real image's peak working set, 10,000 at once.
    "working set at 10,000 at once": (
        lambda: overload_step(10_000)["peak_ws_mib"],
        [r"above the ([\d.]+) MiB working set measured with 10,000"],
    ),
}


@pytest.mark.parametrize("name", MEMORY)
def test_memory_figures_are_the_measured_ones(name: str) -> None:
    value, patterns = MEMORY[name]
    for pattern in patterns:
        found = re.findall(pattern, unwrapped(ALL_TEXT))
        assert found, f"{name}: nothing matches {pattern!r} any more"
        assert set(found) <= said_as(value()), f"{name}: said {found}, measured {value()}"


def test_overload_table_is_the_measured_run() -> None:
    """docs/api.md's table row by row against tests/measured.json ("overload")."""
    row = re.compile(r"^\| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) MiB \| (\d+) % \| (yes|no) \| (\d+) \|$", re.M)
    table = row.findall(PAGES["docs/api.md"])
    assert len(table) == len(MEASURED["overload"]["steps"])
    for requests, ok, busy, errors, ws, share, oom, code in table:
        step = overload_step(users_number(requests))
        assert (users_number(ok), users_number(busy), users_number(errors)) == (step["ok_200"], step["json_503"], step["errors"])
        assert ws in said_as(step["peak_ws_mib"]) and int(share) == round(100 * step["peak_ws_share"])
        assert (oom == "yes") == step["oom_killed"] and int(code) == step["exit_code"]


def test_oom_point_is_the_measured_slopes() -> None:
    """Idle + bytes per request in flight (tests/overload_benchmark.py) reach the memory limit
    near the request count the README names; the slope it quotes is that run's."""
    overload = MEASURED["overload"]
    idle = max(overload["idle_ws_mib"], overload["intercept_mib"])
    at_limit = (overload["memory_limit_mib"] - idle) * 2**20 / overload["bytes_per_in_flight"]
    said = re.findall(r"near ([\d,]+)(?: requests)? at once", unwrapped(ALL_TEXT))
    assert said and {users_number(s) for s in said} == {round(at_limit, -2)}, (said, at_limit)
    slopes = re.findall(r"([\d.]+) MiB(?: idle)? \+ (?:[\d,]+ × )?([\d.]+) KiB", unwrapped(ALL_TEXT))
    assert slopes and set(slopes) == {(f"{idle:g}", f"{overload['bytes_per_in_flight'] / 1024:.1f}")}, slopes


def test_max_in_flight_sums_are_the_measured_ones() -> None:
    """deployment.yaml's comment and the docs add idle + cap x bytes per request in flight: each
    term, the sum, the cap 80 % of the limit allows and the peak quoted are tests/measured.json's."""
    overload = MEASURED["overload"]
    idle = max(overload["idle_ws_mib"], overload["intercept_mib"])
    per = overload["bytes_per_in_flight"]
    env = {e["name"]: e["value"] for e in manifest("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["env"]}
    cap = int(env["MAX_IN_FLIGHT"])
    text = unwrapped(ALL_TEXT + "\n" + (ROOT / "deployment.yaml").read_text())
    sums = re.findall(r"([\d.]+) MiB(?: \(at most\))? \+ ([\d,]+) (?:x|×) ([\d.,]+) (B|KiB) = (\d+) MiB", text)
    assert len(sums) >= 2, sums  # deployment.yaml (and its copy in docs) and docs/operations.md
    for said_idle, said_cap, said_per, unit, total in sums:
        assert (float(said_idle), users_number(said_cap), int(total)) == (idle, cap, round(idle + cap * per / 2**20))
        assert said_per == (f"{per:,}" if unit == "B" else f"{per / 1024:.1f}"), said_per
    allows = re.findall(r"it allows ([\d,]+)", text)
    assert allows and {users_number(a) for a in allows} == {math.floor((0.8 * overload["memory_limit_mib"] - idle) * 2**20 / per)}
    peaks = re.findall(r"Measured peak: (\d+) MiB \((\d+) %\), from ([\d,]+) to ([\d,]+) requests", text)
    steps = overload["steps"]
    top = max(steps, key=lambda s: s["peak_ws_mib"])
    assert peaks and set(peaks) == {(f"{round(top['peak_ws_mib'])}", f"{round(100 * top['peak_ws_share'])}",
                                     f"{steps[0]['requests']:,}", f"{steps[-1]['requests']:,}")}, peaks


def test_overload_prose_is_the_measured_run() -> None:
    """docs/api.md's words under the overload table: the largest burst's losses, the cap's one
    reach, the peaks in flight, against tests/measured.json ("overload")."""
    text = unwrapped(PAGES["docs/api.md"])
    steps = MEASURED["overload"]["steps"]
    largest = steps[-1]
    lost = re.search(r"\*\*([\d,]+) connections \(([\d.]+) %\) were reset by the kernel.*?alive at (\d+) % of its memory", text)
    assert lost, "docs/api.md no longer says what the largest burst lost"
    assert (users_number(lost[1]), float(lost[2]), int(lost[3])) == (
        largest["errors"], round(100 * largest["errors"] / largest["requests"], 1), round(100 * largest["peak_ws_share"]))
    capped = [s for s in steps if s["json_503"]]
    reached = re.search(r"the cap was reached (once|twice|\w+ times) \(([\d,]+): ([\d,]+) JSON 503s, each answered in "
                        r"at most ([\d.]+) ms of the service's time, but after about (\d+) s in the queue\)", text)
    assert reached and reached[1] == "once" and len(capped) == 1, (reached and reached.groups(), capped)
    step = capped[0]
    assert (users_number(reached[2]), users_number(reached[3]), float(reached[4]), int(reached[5])) == (
        step["requests"], step["json_503"], round(step["server_ms_503_max"], 1), round(step["p99_s_503"]))
    peaked = re.search(r"in flight peaked between ([\d,]+) and ([\d,]+)", text)
    beyond = [s["peak_in_flight"] for s in steps if s["requests"] > 10_000]
    assert peaked and (users_number(peaked[1]), users_number(peaked[2])) == (round(min(beyond), -2), round(max(beyond), -2))


def test_what_the_service_adds_to_fastapi_is_the_benchmarks() -> None:
    """docs/performance.md's service-above-FastAPI-alone figures, from the same run's columns."""
    text = unwrapped(PAGES["docs/performance.md"])
    service, fastapi = MEASURED["service"], MEASURED["fastapi"]
    cpu = re.findall(r"\((\d+) % in this run", text)
    assert cpu == [f"{round(100 * (service['cpu_us_per_request'] / fastapi['cpu_us_per_request'] - 1))}"], cpu
    memory = re.findall(r"about (\d+) kB more per request in flight than FastAPI alone", text)
    assert memory == [f"{round(service['kb_per_in_flight'] - fastapi['kb_per_in_flight'])}"], memory


def test_readme_is_short_and_starts_with_its_contents_and_the_dozen_commands() -> None:
    lines = README.splitlines()
    assert len(lines) <= 700, f"README.md has {len(lines)} lines"
    first_screen = "\n".join(lines[:12])
    assert "**Contents:**" in first_screen and "## AWS demo in a dozen commands" in first_screen
    assert "```bash" in first_screen
