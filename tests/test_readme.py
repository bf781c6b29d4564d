"""README.md and docs/ name only what exists, and every figure in them is what its source says now."""

import re

import pathspec

import cluster_model as cm
import figures
from helpers import ROOT, TEST_COMMAND, project_files

README = (ROOT / "README.md").read_text()
# docs/original.md is the original design as it was given: quoted, so neither checked nor current.
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text()
         for path in sorted((ROOT / "docs").glob("*.md")) if path.name != "original.md"}
TEXTS = {"README.md": README, **PAGES}
# What the docs may name in backticks without the project naming it: other projects' names.
FOREIGN = {
    "RemoteDisconnected", "SyncookiesFailed", "Always", "ToBeDeletedByClusterAutoscaler", "MilliValue", "AsyncExitStack",
    "ensureLoadBalancerHealthCheck", "GetResourceUtilizationRatio", "INTERACTIVE_COMMENTS", "useCachedMetrics",
    "stableNodeSetPredicates", "limit_concurrency", "kubernetes-pods", "DELETE_FAILED", "EXTERNAL-IP", "ErrImagePull",
    "ImagePullBackOff", "InvalidImageName", "FailedGetResourceMetric", "Unauthorized", "io.containerd.snapshotter.v1", "t4g",
    "SchedulingDisabled", "PodEvictionFailure", "KEP-3836"}


def code_blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_every_file_in_the_project_structure_exists() -> None:
    tree = re.search(r"^## Files\n.*?```\n(.*?)```", README, flags=re.S | re.M).group(1)
    names = re.findall(r"[├└]── ([\w./-]+)", tree)
    assert {"service.py", "Dockerfile", "deployment.yaml", "locustfile.py"} <= set(names)
    for name in names:
        assert (ROOT / name).exists(), f"README lists {name}, which is not in the repository"
    top_level = {path.parts[0] for path in project_files()}
    assert top_level <= {n.rstrip("/") for n in names}, "a file is missing from the README's tree"


def test_local_commands_are_the_ones_the_repository_uses() -> None:
    commands = "\n".join(code_blocks("bash"))
    assert "uv run service.py" in commands
    assert TEST_COMMAND in commands and TEST_COMMAND in (ROOT / ".ci/run").read_text()
    assert re.search(r"^uv run locustfile\.py --headless [^\n]*-H http://localhost:8000$", commands, re.M)


def test_names_ports_and_region_in_commands_match_the_manifests() -> None:
    cluster, deployment = cm.manifest("cluster-config.yaml"), cm.manifest("deployment.yaml")
    service, hpa = cm.manifest("service.yaml"), cm.manifest("hpa.yaml")
    commands = "\n".join(code_blocks("bash"))
    assert f"--cluster {cluster['metadata']['name']}" in commands
    assert f"--name {cluster['managedNodeGroups'][0]['name']}" in commands
    assert f"AWS_REGION={cluster['metadata']['region']}" in commands
    for ref in re.findall(r"deployment/([\w-]+)", commands):
        assert ref == deployment["metadata"]["name"]
    for ref in re.findall(r"kubectl (?:get|describe) (?:service|svc) ([\w-]+)", commands):
        assert ref == service["metadata"]["name"]
    for ref in re.findall(r"kubectl (?:get|describe) hpa ([\w-]+)", commands):  # hpa.yaml's, or KEDA's
        assert ref in (hpa["metadata"]["name"], f"keda-hpa-{cm.manifest('keda-scaledobject.yaml')['metadata']['name']}")
    for label in re.findall(r"-l (app=[\w-]+)", commands):
        key, value = label.split("=")
        assert deployment["spec"]["template"]["metadata"]["labels"][key] == value
    # The curl goes to the load balancer's port 80, which must reach the container's port.
    port = service["spec"]["ports"][0]
    assert '"http://${ELB:?' in commands and port["port"] == 80
    assert port["targetPort"] == cm.app_container(deployment)["ports"][0]["containerPort"]


def test_every_figure_is_what_its_source_says_now() -> None:
    """Each marked block and chart in README.md and docs/ against what tests/tools/figures.py
    writes from measured.json, the recorded demos and the model."""
    stale = figures.stale()
    assert stale == [], f"{stale}: rewrite them with `python tests/tools/figures.py`"
    marked = {(page, name) for page, text in TEXTS.items() for name in figures.marked_names(text)}
    assert marked == set(figures.BLOCKS), "a marked block that nothing writes, or one the docs lost"


def outside_code(text: str) -> str:
    return re.sub(r"^( *)```.*?^\1```", "", text, flags=re.S | re.M)


def test_prose_repeats_no_figure_of_a_block() -> None:
    """The words around a block leave its figures to it: a figure written twice goes stale once."""
    measured, found = figures.measured(), []
    settings = ["deployment.yaml", *cm.AUTOSCALERS.values()]  # the manifests' and the service's own numbers
    allowed = set(re.findall(r"\b\d+\b", "".join((ROOT / n).read_text() for n in settings)))
    allowed.add(f"{cm.service_default('delay_seconds'):g}")
    for (page, name), block in figures.BLOCKS.items():
        rendered = figures.render(block, measured)
        figures_of_block = set(re.findall(r"\b\d[\d,]*(?:\.\d+)?(?:m|%| ?MiB| ?kB| ms| s| pods)\b", rendered))
        prose = re.sub(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", "", outside_code(TEXTS[page]), flags=re.S)
        found += [(page, f) for f in figures_of_block if re.split(r"\D", f)[0] not in allowed and
                  re.search(rf"(?<![\d.,]){re.escape(f)}(?![\d])", prose)]
    assert found == []


def test_docs_name_only_what_exists() -> None:
    """A file, class, function, setting or tool named in backticks is one the project has: its
    files hold it (the docs aside), or it is another project's and FOREIGN says so."""
    code = "\n".join([*((ROOT / p).read_text(errors="ignore") for p in project_files()  # and the docs' commands
                         if p.parts[0] != "docs" and p.suffix not in {".md", ".json", ".svg", ".lock"}),
                       *(b for text in TEXTS.values() for b in code_blocks("bash", text))])
    tops = {p.parts[0] for p in project_files()}
    generated = pathspec.GitIgnoreSpec.from_lines((ROOT / ".gitignore").read_text().splitlines())  # as .demo.env
    missing = set()
    for page, text in TEXTS.items():
        for name in set(re.findall(r"`([^`\n]+)`", outside_code(text))):
            if re.fullmatch(r"\.?[\w./-]+\.(py|ya?ml|md|json|svg|txt|lock)|(tests|docs|\.ci|\.github)/[\w./-]+", name):
                if (name.split("/")[0] in tops or "/" not in name) and not any(
                        (ROOT / d / name).exists() for d in ("", "docs", "tests", "tests/tools")) and not generated.match_file(name):
                    missing.add((page, name))
            elif re.fullmatch(r"[A-Za-z_][\w.-]*(\(\))?", name) and name not in FOREIGN:
                words = name.removesuffix("()").split(".")
                if not all(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", code) for w in words if w):
                    missing.add((page, name))
    assert sorted(missing) == [], sorted(missing)


def test_no_real_account_id_anywhere() -> None:
    for path in project_files():
        text = (ROOT / path).read_text(errors="ignore")
        # An AWS account id is 12 digits: before ".dkr.ecr." in an ECR host, after the region in an ARN.
        assert not re.search(r"\b\d{12}\.dkr\.ecr\.|:[a-z]{2}-[a-z]+-\d:\d{12}:", text), path


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_docs_page_is_linked_and_every_local_link_resolves() -> None:
    for page in PAGES:
        assert f"]({page})" in README, f"README does not link {page}"
    for source, text in TEXTS.items():
        base = (ROOT / source).parent
        for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]*)(?:#([^)\s]+))?\)", text):
            path = (base / target).resolve() if target else ROOT / source
            assert path.exists(), f"{source} links {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", outside_code(path.read_text()), flags=re.M)
                assert anchor in {slug(h) for h in headings}, f"{source}: no heading #{anchor} in {target or source}"

