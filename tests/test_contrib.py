"""contrib/: the Prometheus alert rules and the Grafana dashboard.

promtool (Debian's `prometheus` package, installed by the README's test command) checks the
rules and runs their unit tests; every PromQL expression of the dashboard is checked by
promtool too, and every metric the rules and the dashboard name is one the daemon serves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from whatsappd.config import build_config
from whatsappd.daemon import Daemon

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "contrib" / "prometheus" / "whatsappd-alerts.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "whatsappd-alerts.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "whatsappd.json"
#: Series Prometheus itself adds to every target.
PROMETHEUS_OWN = {"up"}
#: PromQL words that look like metric names in an expression but are not.
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "time", "predict_linear", "and", "unless", "on",
                "le", "or", "without", "max", "min", "avg", "count", "label_values"}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, ("promtool is missing: install Debian's `prometheus` package (the README's test command does: "
                  "apt-get install -y ... prometheus)")
    return path


def run_promtool(*args: str, cwd: Path) -> str:
    result = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def served_metric_names(tmp_path: Path) -> set[str]:
    """Every series name the daemon's registry serves (histograms with their suffixes)."""
    (tmp_path / "state").mkdir()
    config = build_config({"daemon": {"state_dir": str(tmp_path / "state")},
                           "companies": [{"id": "acme", "engine": "simulator"}]}, "test")
    text = generate_latest(Daemon(config, None).metrics.registry).decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def dashboard_exprs() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs and all(panel.get("targets") for panel in dashboard["panels"] if panel["type"] != "row")
    return exprs


def names_in(expr: str) -> set[str]:
    """The metric names an expression reads (label names, strings and durations left out)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values, e.g. "$job"
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges
    expr = re.sub(r"\b(by|on|without)\s*\([^)]*\)", "", expr)  # grouping label lists
    return {word for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if word not in PROMQL_WORDS}


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    """`promtool check rules` accepts contrib's alert rules and `promtool test rules` passes their
    unit tests (each alert fires when it should and stays quiet when it should)."""
    assert "SUCCESS" in run_promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert "SUCCESS" in run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's query, with Grafana's variables filled in, parses as PromQL (promtool checks
    them as recording rules)."""
    rules = []
    for n, expr in enumerate(dashboard_exprs()):
        concrete = expr.replace("$__rate_interval", "5m").replace("$job", "whatsappd").replace("$instance", ".*")
        rules.append({"record": f"whatsappd:dashboard_query_{n}", "expr": concrete.replace("$company", ".*")})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool("check", "rules", path.name, cwd=tmp_path)


def test_rules_and_dashboard_name_only_metrics_the_daemon_serves(tmp_path: Path) -> None:
    """No alert, rule test or dashboard panel reads a metric the daemon does not serve (a renamed
    or misspelt series would silently never alert)."""
    served = served_metric_names(tmp_path) | PROMETHEUS_OWN
    rules_text = RULES.read_text()
    rule_exprs = re.findall(r"expr: \|\n((?:\s{10}.*\n)+)|expr: (.*)", rules_text)
    used = {name for block, line in rule_exprs for name in names_in(block or line)}
    used |= {name for expr in dashboard_exprs() for name in names_in(expr)}
    used |= set(re.findall(r"series: '([a-z_:]+)\{", RULE_TESTS.read_text()))
    assert {"whatsappd_connected", "whatsappd_worker_restarts_total", "whatsappd_message_send_latency_seconds_bucket",
            "whatsappd_outbox_oldest_pending_timestamp_seconds", "whatsappd_state_filesystem_avail_bytes"} <= used
    assert used - served == set()


@pytest.mark.parametrize("variable", ["job", "instance", "company", "DS_PROMETHEUS"])
def test_the_dashboard_is_importable_with_its_variables(variable: str) -> None:
    """The dashboard JSON has a stable uid, asks for its Prometheus data source on import, and
    defines each variable its queries use."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "whatsappd" and dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert variable in {v["name"] for v in dashboard["templating"]["list"]}
    assert any(f"${variable}" in json.dumps(panel) or f"${{{variable}}}" in json.dumps(panel) for panel in dashboard["panels"])
