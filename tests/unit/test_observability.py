"""The shipped rules (promtool), the dashboard's shape, the gateway's metric names and the operator's log lines."""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cxygpt_gateway.admission.demand import DemandWindow
from cxygpt_gateway.admission.queue import ModelQueue
from cxygpt_gateway.metrics import GatewayMetrics
from cxygpt_operator import logs as operator_logs
from cxygpt_operator.main import parse_args
from harness import REPO

RULES_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "cxygpt-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (scripts/bootstrap.sh)")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=RULES_DIR, input=stdin, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_checks_and_unit_tests_the_rules():
    check = promtool("check", "rules", "cxygpt-rules.yaml")
    assert check.returncode == 0, check.stdout + check.stderr
    test = promtool("test", "rules", "cxygpt-rules.test.yaml")
    assert test.returncode == 0, test.stdout + test.stderr


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not():
    rules = yaml.safe_load((RULES_DIR / "cxygpt-rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((RULES_DIR / "cxygpt-rules.test.yaml").read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == alerts
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == alerts
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_shape():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "cxygpt-overview" and "id" not in dashboard  # importable anywhere, by the sidecar too
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert [p["title"] for p in panels if p["type"] == "row"] == [
        "Gateway", "Engines (vLLM metrics; cxygpt-sim exports the same)", "Operator"]
    for panel in (p for p in panels if p["type"] != "row"):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for family in ("cxygpt_gateway_", "vllm:", "cxygpt_operator_"):
        assert family in exprs


def _gateway_page() -> str:
    queue = ModelQueue(queue_size=4, max_concurrency=2)
    queue.set_backends(["http://a:8000", "http://b:8000"])
    route = SimpleNamespace(name="qwen3-14b", queue=queue, is_degraded=lambda: False, demand=DemandWindow(10))
    m = GatewayMetrics(lambda: [route], lambda: 2)
    m.requests.labels("qwen3-14b", "200").inc()
    m.rejections.labels("qwen3-14b", "queue_full").inc()
    m.ttft.labels("qwen3-14b").observe(0.2)
    m.latency.labels("qwen3-14b").observe(1.5)
    m.queue_wait.labels("qwen3-14b").observe(0.0)
    m.prompt_tokens.labels("qwen3-14b").inc(10)
    m.completion_tokens.labels("qwen3-14b").inc(5)
    m.upstream_errors.labels("qwen3-14b", "ttft_timeout").inc()
    m.degrade_transitions.labels("qwen3-14b").inc()
    m.ratelimit_storage_errors.inc()
    m.client_disconnects.labels("qwen3-14b").inc()
    m.wakes.labels("qwen3-14b", "woken").inc()
    return generate_latest(m.registry).decode()


def test_gateway_metrics_follow_prometheus_naming():
    page = _gateway_page()
    families = {f.name: f for f in text_string_to_metric_families(page)}
    for name, family in families.items():
        assert name.startswith("cxygpt_gateway_")
        if family.type == "histogram":
            assert name.endswith("_seconds"), name  # base unit in the name
        labels = {k for s in family.samples for k in s.labels}
        # bounded label sets: the configured model, the HTTP status, code-defined reasons; never a key or prompt
        assert labels <= {"model", "code", "reason", "kind", "result", "le"}, (name, labels)
    counters = [s.name for f in families.values() if f.type == "counter" for s in f.samples
                if not s.name.endswith("_created")]
    assert counters and all(s.endswith("_total") for s in counters)
    assert 'cxygpt_gateway_queue_capacity{model="qwen3-14b"} 4.0' in page
    assert 'cxygpt_gateway_concurrency_limit{model="qwen3-14b"} 2.0' in page
    assert 'cxygpt_gateway_backends_routable{model="qwen3-14b"} 2.0' in page
    assert 'cxygpt_gateway_demand{model="qwen3-14b"} 0.0' in page
    assert "cxygpt_gateway_replicas 2.0" in page
    if PROMTOOL:
        check = promtool("check", "metrics", stdin=page)
        assert check.returncode == 0, check.stdout + check.stderr


def _record(msg="applying Deployment chat", level=logging.INFO, **extra) -> logging.LogRecord:
    record = logging.LogRecord("cxygpt.operator", level, __file__, 1, msg, (), None)
    record.__dict__.update(extra)
    return record


def test_operator_json_log_lines():
    fmt = operator_logs.JsonFormatter()
    line = json.loads(fmt.format(_record(fields={"object": "llm/qwen3-14b", "generation": 3})))
    assert line["level"] == "info" and line["logger"] == "cxygpt.operator" and line["msg"] == "applying Deployment chat"
    assert line["object"] == "llm/qwen3-14b" and line["generation"] == 3 and isinstance(line["ts"], float)
    # kopf's per-object records carry k8s_ref
    kopf_line = json.loads(fmt.format(_record("Handler failed", logging.ERROR,
                                              k8s_ref={"name": "chat", "namespace": "default", "kind": "X"})))
    assert kopf_line["object"] == "default/chat" and kopf_line["level"] == "error"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = _record("reconcile crashed", logging.ERROR, exc_info=sys.exc_info())
    assert "ValueError: boom" in json.loads(fmt.format(failed))["exc"]
    text = operator_logs.TextFormatter().format(_record(fields={"object": "llm/qwen3-14b"}))
    assert re.search(r" INFO cxygpt.operator: \[llm/qwen3-14b\] applying Deployment chat$", text)


def test_operator_log_format_flag():
    assert parse_args([]).log_format == "json"
    assert parse_args(["--log-format", "text"]).log_format == "text"
    with pytest.raises(SystemExit):
        parse_args(["--log-format", "xml"])
