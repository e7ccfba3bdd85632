"""deploy/grafana/crisp-dashboard.json cannot drift from what crisp exports.

Every metric its PromQL names must be a `"crisp_..."` literal in the Rust sources (the
histogram series `_bucket`/`_sum`/`_count` of a histogram), every metric the nodes export
must have a panel, and every label the queries filter, group or print by must exist on
those metrics: checked against a real `crisp up` scraped after some traffic, and in the
defining source file for series that traffic alone does not produce (failures).
"""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from test_openai_sdk import remove_audit_trails

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "crisp-dashboard.json"
CRISP = os.environ.get("CRISP_BIN", str(ROOT / "target" / "debug" / "crisp"))

# Labels Prometheus adds when it scrapes, and the bucket bound of histograms.
SCRAPE_LABELS = {"instance", "job"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def rust_sources():
    return [
        p for p in (ROOT / "crates").rglob("*.rs")
        if "tests" not in p.relative_to(ROOT / "crates").parts and "benches" not in p.parts
    ]


def exported_metrics():
    """name -> (kind, source text of the file that records it)."""
    found = {}
    for path in rust_sources():
        text = path.read_text()
        for m in re.finditer(r'metrics::(counter|gauge|histogram)!\(\s*"(crisp_[a-z0-9_]+)"', text):
            found[m.group(2)] = (m.group(1), text)
    return found


def targets(dashboard):
    def walk(panels):
        for p in panels:
            yield from ((p, t) for t in p.get("targets", []))
            yield from walk(p.get("panels", []))

    return list(walk(dashboard["panels"]))


def metric_names(expr):
    return set(re.findall(r"\b(crisp_[a-z0-9_]+)", expr))


def base_name(series, exported):
    if series in exported:
        return series
    for suffix in HISTOGRAM_SERIES:
        if series.endswith(suffix) and exported.get(series[: -len(suffix)], ("",))[0] == "histogram":
            return series[: -len(suffix)]
    return None


def labels_used(expr):
    """Labels in matchers, by/without clauses; and those grouped by (what a legend may use)."""
    matchers = set()
    for body in re.findall(r"crisp_[a-z0-9_]+\{([^}]*)\}", expr):
        matchers |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    grouped = set()
    for body in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouped |= {label.strip() for label in body.split(",") if label.strip()}
    return matchers, grouped


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported():
    found = exported_metrics()
    assert "crisp_requests_total" in found, "no metrics found in the Rust sources: the scan is broken"
    return found


def test_the_dashboard_is_a_grafana_dashboard(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "source", "observer"} <= names
    boxes = []
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for other_title, o in boxes:
            overlap = (g["x"] < o["x"] + o["w"] and o["x"] < g["x"] + g["w"]
                       and g["y"] < o["y"] + o["h"] and o["y"] < g["y"] + g["h"])
            assert not overlap, f"panels {panel['title']!r} and {other_title!r} overlap"
        boxes.append((panel["title"], g))
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_queried_metric_is_exported_by_crisp(dashboard, exported):
    queried = set()
    for panel, target in targets(dashboard):
        names = metric_names(target["expr"])
        assert names, f"{panel['title']}: a query without a crisp metric"
        for series in names:
            base = base_name(series, exported)
            assert base, (
                f"{panel['title']}: {series} is not exported by crisp (no \"{series}\" "
                f"literal in crates/*/src; histograms are queried through _bucket/_sum/_count)"
            )
            if exported[base][0] == "histogram":
                assert series != base, f"{panel['title']}: query {base}_bucket, not {base}"
            queried.add(base)
    for variable in dashboard["templating"]["list"]:
        for series in metric_names(variable.get("definition", "")):
            assert base_name(series, exported), f"variable {variable['name']}: {series}"


def test_every_exported_metric_has_a_panel(dashboard, exported):
    queried = {base_name(s, exported) for _, t in targets(dashboard) for s in metric_names(t["expr"])}
    missing = sorted(set(exported) - queried)
    assert not missing, f"metrics without a panel in {DASHBOARD.relative_to(ROOT)}: {missing}"


def test_legends_print_only_grouped_labels(dashboard):
    for panel, target in targets(dashboard):
        _, grouped = labels_used(target["expr"])
        for label in re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", target.get("legendFormat", "")):
            assert label in grouped, f"{panel['title']}: legend uses {label}, not grouped by"


def free_base_port(count=11):
    """A base port with `count` free client, peer (+1000) and admin (+2000) ports."""
    for base in range(21080, 40000, 89):
        ports = [base + off + i for off in (0, 1000, 2000) for i in range(count)]
        socks = []
        try:
            for p in ports:
                s = socket.socket()
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def scraped():
    """Label names per metric family from a real `crisp up` after some traffic."""
    base = free_base_port()
    proc = subprocess.Popen([CRISP, "up", "--port", str(base)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    banner = []
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            line = proc.stdout.readline()
            assert line, "crisp up exited"
            banner.append(line)
            if "Ctrl-C stops every node" in line:
                break
        # Served locally, served in another region (an EU profile called in the US), and
        # refused (a bare model ID this region does not run).
        for port, model in ((base + 3, "amazon.nova-lite-v1:0"), (base, "eu.amazon.nova-lite-v1:0"),
                            (base + 7, "anthropic.claude-sonnet-4-5-20250929-v1:0")):
            body = json.dumps({"model": model, "max_tokens": 4,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"content-type": "application/json",
                                                  "authorization": "Bearer crisp-demo-key-loopback-only"})
            try:
                urllib.request.urlopen(req, timeout=30).read()
            except urllib.error.HTTPError as e:
                assert e.code == 400
        time.sleep(0.5)  # a telemetry round, so every node's view is filled
        text = urllib.request.urlopen(f"http://127.0.0.1:{base + 2000}/metrics", timeout=10).read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        remove_audit_trails("".join(banner))
    families = {}
    for line in text.splitlines():
        m = re.match(r"(crisp_[a-z0-9_]+)\{([^}]*)\}", line)
        if m:
            families.setdefault(m.group(1), set()).update(re.findall(r'([a-zA-Z_]\w*)="', m.group(2)))
    return families


def test_every_queried_label_exists_on_its_metrics(dashboard, exported, scraped):
    for expected in ("crisp_requests_total", "crisp_cross_region_requests_total",
                     "crisp_request_duration_seconds_bucket", "crisp_time_to_first_token_seconds_bucket",
                     "crisp_tokens_total", "crisp_cost_usd_micros_total", "crisp_region_reachable",
                     "crisp_region_free_slots", "crisp_region_queue_free",
                     "crisp_region_view_age_seconds", "crisp_region_cooldown_seconds"):
        assert expected in scraped, f"{expected} missing after traffic: {sorted(scraped)}"

    def labels_of(series):
        if series in scraped:
            return scraped[series]
        base = base_name(series, exported)
        # Not produced by this traffic (failure counters): the label must be named in the
        # file that records the metric.
        text = exported[base][1]
        return {label for label in re.findall(r'"([a-z_]+)"\s*(?:=>|,)', text)} | (
            {"le"} if series.endswith("_bucket") else set()
        )

    for panel, target in targets(dashboard):
        matchers, grouped = labels_used(target["expr"])
        available = set(SCRAPE_LABELS)
        for series in metric_names(target["expr"]):
            available |= labels_of(series)
        unknown = (matchers | grouped) - available
        assert not unknown, f"{panel['title']}: labels {sorted(unknown)} are not on {sorted(metric_names(target['expr']))}"
    for variable in dashboard["templating"]["list"]:
        m = re.match(r"label_values\((crisp_[a-z0-9_]+),\s*(\w+)\)", variable.get("definition", ""))
        if m:
            assert m.group(2) in labels_of(m.group(1)), variable["name"]
