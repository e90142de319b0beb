"""OpenTelemetry instruments, and the exporter a worker process sends them to.

The instruments are created against the API's global provider. Until a worker calls
`configure_metrics` they cost nothing (the API's no-op). `configure_metrics` reads the SDK's
standard variables:

- `OTEL_METRICS_EXPORTER`: `none` (the default), `console` (one JSON document per export, on
  stderr, so in the worker's log) or `otlp` (OTLP over HTTP/protobuf, to
  `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`);
- `OTEL_METRIC_EXPORT_INTERVAL`: milliseconds between exports (the SDK's default, 60000);
- `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`: the resource. The worker's name is added as
  `service.instance.id`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

from opentelemetry import metrics

from orchestrator.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

_meter = metrics.get_meter("saga-orchestrator")

SAGAS_FAILED = _meter.create_counter(
    "saga.failed", unit="{saga}",
    description="Sagas that became FAILED and went to the dead-letter topic for an operator")
RECOVERY_ACTIONS = _meter.create_counter(
    "saga.recovery.actions", unit="{action}",
    description="What the recovery worker did to due sagas, by action "
                "(retry, resend, gave_up)")
DEAD_LETTERS = _meter.create_counter(
    "saga.dead_letters", unit="{message}",
    description="Messages set aside on the dead-letter topic, by stage and reason")
OUTBOX_SET_ASIDE = _meter.create_counter(
    "saga.outbox.set_aside", unit="{row}",
    description="Outbox rows the broker refused for good, set aside unpublished for an "
                "operator, by librdkafka error code (MSG_SIZE_TOO_LARGE, UNKNOWN_TOPIC_OR_PART...)")

CONSUMER_REWINDS = _meter.create_counter(
    "saga.consumer.rewinds", unit="{partition}",
    description="Partitions a consumer read again from their committed offset or their start, "
                "because the broker was lost or a log became shorter than its position, by group")

EXPORTERS = ("none", "console", "otlp")


def configure_metrics(worker_name: str) -> MeterProvider | None:
    """Install the process's MeterProvider as the `OTEL_*` variables say; None when metrics
    are off. Call `shutdown()` on the result at exit: it exports what is left."""
    exporter_name = os.environ.get("OTEL_METRICS_EXPORTER", "none").strip().lower() or "none"
    if exporter_name not in EXPORTERS:
        raise ConfigurationError(f"OTEL_METRICS_EXPORTER={exporter_name!r} is not supported: "
                                 f"use one of {', '.join(EXPORTERS)}")
    if exporter_name == "none":
        return None
    # Imported here: a worker without metrics does not pay for the SDK at start.
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource

    exporter: MetricExporter
    if exporter_name == "console":
        exporter = ConsoleMetricExporter(
            out=sys.stderr,
            formatter=lambda data: json.dumps(json.loads(data.to_json()),
                                              separators=(",", ":")) + "\n")
    else:
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
        if protocol != "http/protobuf":
            raise ConfigurationError(f"OTLP protocol {protocol!r} is not supported for metrics: "
                                     "use http/protobuf (port 4318 on a collector)")
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter()
    provider = MeterProvider(
        resource=Resource.create({"service.instance.id": worker_name}),
        metric_readers=[PeriodicExportingMetricReader(exporter)])
    metrics.set_meter_provider(provider)
    return provider
