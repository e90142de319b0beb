"""`configure_metrics`: the `OTEL_*` variables it accepts and the ones it refuses clearly.
(Exporting for real is tested on a worker process: tests/integration/test_recovery.py.)"""

from __future__ import annotations

import pytest

from orchestrator.errors import ConfigurationError
from orchestrator.metrics import configure_metrics


def test_metrics_are_off_unless_an_exporter_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    assert configure_metrics("w") is None
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    assert configure_metrics("w") is None


def test_an_unknown_exporter_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    with pytest.raises(ConfigurationError, match="none, console, otlp"):
        configure_metrics("w")


def test_otlp_over_grpc_is_refused_with_the_protocol_to_use(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigurationError, match="http/protobuf"):
        configure_metrics("w")
