"""The Grafana dashboard (compose/grafana/dashboards/) asks only for metrics the workers export,
under the names Prometheus stores them by, and shows every one of them.

What the workers export is derived from the instruments `orchestrator.metrics` defines, run for
real: a child process installs an SDK MeterProvider with an in-memory reader, records once on
every instrument (and gives every gauge a sample), and reports what the SDK collected: each
metric's name, unit and data type (a histogram, a monotonic sum, a gauge). A child process,
because a process accepts a global MeterProvider once and the integration tests set theirs.

Names are then translated as the OTLP-to-Prometheus translation does (Prometheus's OTLP
receiver, which the collector pushes to; the collector's own Prometheus exporters translate
the same way): characters other than letters, digits, `_` and `:` become `_`; the unit, if it
is not a `{annotation}`, is appended in Prometheus's words (`s` -> `seconds`) unless the name
already ends with it; a monotonic sum ends in `_total`; a histogram is stored as `_bucket`,
`_sum` and `_count` series.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "saga-orchestrator.json"

_COLLECT = r"""
import json
from opentelemetry import metrics as api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge, Histogram, InMemoryMetricReader, Sum)

reader = InMemoryMetricReader()
api.set_meter_provider(MeterProvider(metric_readers=[reader]))
from orchestrator import metrics

for value in vars(metrics).values():
    if isinstance(value, (api.Counter, api.UpDownCounter)):
        value.add(1)
    elif isinstance(value, api.Histogram):
        value.record(1)
# Every gauge's callback has something to report.
metrics.store_gauges({("transfer", "RUNNING"): 1}, 1, 1.0, {"SAME_ACCOUNT": 1})
metrics.consumer_lag("g", json.dumps({"topics": {"t": {"partitions": {
    "0": {"desired": True, "consumer_lag": 1}}}}}))
found = []
for resource in reader.get_metrics_data().resource_metrics:
    for scope in resource.scope_metrics:
        for metric in scope.metrics:
            data = metric.data
            kind = ("histogram" if isinstance(data, Histogram)
                    else "counter" if isinstance(data, Sum) and data.is_monotonic
                    else "gauge" if isinstance(data, (Gauge, Sum))
                    else type(data).__name__)
            found.append({"name": metric.name, "unit": metric.unit, "kind": kind})
print(json.dumps(found))
"""

# UCUM units as Prometheus spells them (the ones the workers use; an unknown one fails the test,
# so a new unit is translated on purpose, not by accident).
_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}
# PromQL words that are not metric names.
_PROMQL = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "le", "topk", "bottomk", "clamp_min", "clamp_max", "abs", "delta", "deriv",
    "max_over_time", "min_over_time", "avg_over_time", "time", "vector", "scalar", "bool",
}


def exported_instruments() -> list[dict[str, str]]:
    result = subprocess.run([sys.executable, "-c", _COLLECT], capture_output=True, text=True,
                            timeout=60, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    found: list[dict[str, str]] = json.loads(result.stdout)
    return found


def prometheus_series(name: str, unit: str, kind: str) -> set[str]:
    base = re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9_:]", "_", name)).strip("_")
    if unit and not (unit.startswith("{") and unit.endswith("}")):
        if unit == "1":
            suffix = "ratio" if kind == "gauge" else ""
        else:
            assert unit in _UNITS, f"{name}: add the Prometheus spelling of unit {unit!r}"
            suffix = _UNITS[unit]
        if suffix and not base.endswith(f"_{suffix}"):
            base += f"_{suffix}"
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    if kind == "counter":
        return {f"{base}_total"}
    assert kind == "gauge", f"{name}: a {kind} is not translated here"
    return {base}


def test_the_translation_matches_the_documented_examples() -> None:
    assert prometheus_series("http.server.request.duration", "s", "histogram") == {
        "http_server_request_duration_seconds_bucket", "http_server_request_duration_seconds_sum",
        "http_server_request_duration_seconds_count"}
    assert prometheus_series("system.network.dropped", "{packets}", "counter") == {
        "system_network_dropped_total"}
    assert prometheus_series("system.memory.utilization", "1", "gauge") == {
        "system_memory_utilization_ratio"}
    assert prometheus_series("queue.age_seconds", "s", "gauge") == {"queue_age_seconds"}


def expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in expressions(value)]
    if isinstance(node, list):
        return [e for value in node for e in expressions(value)]
    return []


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once label lists
    (`by (...)`, `without (...)`, `{...}`), ranges, strings, numbers and Grafana's `$__...`
    variables are taken out, less PromQL's own words."""
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = re.sub(r'"[^"]*"', " ", stripped)
    stripped = re.sub(r"\$\w+", " ", stripped)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped))
    return words - _PROMQL


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document = json.loads(DASHBOARD.read_text())
    assert isinstance(document, dict)
    return document


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le, saga_type) '
                        '(rate(saga_duration_seconds_bucket{outcome="failed"}[$__rate_interval])))'
                        ) == {"saga_duration_seconds_bucket"}
    assert metric_names("max by (reason) (saga_dead_letters_pending)") == {
        "saga_dead_letters_pending"}


def test_every_metric_the_dashboard_uses_is_exported_by_the_workers(
        dashboard: dict[str, Any]) -> None:
    instruments = exported_instruments()
    exported = {series for i in instruments
                for series in prometheus_series(i["name"], i["unit"], i["kind"])}
    used: dict[str, set[str]] = {}
    for expr in expressions(dashboard["panels"]):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(expr)
    assert used, "the dashboard queries nothing"
    unknown = {name: sorted(exprs) for name, exprs in used.items() if name not in exported}
    assert not unknown, f"the dashboard asks for series no worker exports: {unknown}"
    # And the other way: every instrument is on the dashboard (an on-call question it answers).
    shown = {i["name"] for i in instruments
             if prometheus_series(i["name"], i["unit"], i["kind"]) & used.keys()}
    assert shown == {i["name"] for i in instruments}, (
        f"not on the dashboard: {sorted({i['name'] for i in instruments} - shown)}")


def test_the_expected_instruments_are_exported() -> None:
    kinds = {i["name"]: (i["kind"], i["unit"]) for i in exported_instruments()}
    assert kinds["saga.duration"] == ("histogram", "s")
    assert kinds["saga.step.latency"] == ("histogram", "s")
    for gauge in ("saga.in_flight", "saga.outbox.backlog", "saga.outbox.oldest_age",
                  "saga.dead_letters.pending", "saga.consumer.lag"):
        assert kinds[gauge][0] == "gauge", gauge
    assert kinds["saga.dead_letters"][0] == "counter"


def test_grafana_is_provisioned_with_the_dashboard_and_prometheus() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    services = compose["services"]
    grafana = services["grafana"]
    mounts = {(COMPOSE / source).resolve(): target
              for source, target, *_ in (str(v).split(":") for v in grafana["volumes"])}
    dashboards = (COMPOSE / "grafana" / "dashboards").resolve()
    provisioning = (COMPOSE / "grafana" / "provisioning").resolve()
    assert mounts[provisioning] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "saga.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts[dashboards]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    datasource = source["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    uids = {target["datasource"]["uid"] for panel in json.loads(DASHBOARD.read_text())["panels"]
            for target in panel.get("targets", ())}
    assert uids == {datasource["uid"]}
    assert "--web.enable-otlp-receiver" in services["prometheus"]["command"]


def test_the_collector_forwards_metrics_to_prometheus() -> None:
    config = yaml.safe_load((COMPOSE / "otel-collector.yaml").read_text())
    metrics = config["service"]["pipelines"]["metrics"]
    assert set(metrics["receivers"]) <= set(config["receivers"])
    exporters = [config["exporters"][name] for name in metrics["exporters"]]
    assert any(e.get("endpoint") == "http://prometheus:9090/api/v1/otlp" for e in exporters)
