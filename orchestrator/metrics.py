"""OpenTelemetry instruments, and the exporter a worker process sends them to.

Counters of rare events (failures, dead letters, recovery actions, set-aside rows, rewinds);
histograms of saga duration and step round trips, recorded per saga and per reply only while
`RECORDING`; gauges served from samples taken elsewhere (the recovery worker samples the
database, each consumer hands in librdkafka's statistics), never computed in an export. What
each one answers: docs/operations/runbook.md#7-metrics; ADR 0016.

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

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

# Histograms: recorded only while `RECORDING` is true (see `configure_metrics`), because they
# are recorded per saga and per reply, on the hot path; a worker without metrics pays one
# boolean test for each.
SAGA_DURATION = _meter.create_histogram(
    "saga.duration", unit="s",
    description="From a saga's start message (its Kafka timestamp) to its terminal event, by "
                "saga_type and outcome (completed, compensated, rejected, failed)",
    explicit_bucket_boundaries_advisory=[
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])
STEP_LATENCY = _meter.create_histogram(
    "saga.step.latency", unit="s",
    description="From the orchestrator's decision to send a step command to its decision on "
                "the reply (outbox, broker, participant and back), by saga_type, step, "
                "direction (forward, compensate) and outcome (succeeded, failed)",
    explicit_bucket_boundaries_advisory=[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])

# Whether the histograms above are recorded: set by `configure_metrics` when it installs an
# exporting provider, or by `record_histograms` for an application that installed its own.
RECORDING = False


def record_histograms(enabled: bool = True) -> None:
    """Record (or stop recording) the per-saga and per-reply histograms; for a process that
    installed its own MeterProvider instead of calling `configure_metrics`."""
    global RECORDING
    RECORDING = enabled


# Gauges: served from the last sample of what they observe, never computed in the callback
# (an export must not wait for a database). The recovery worker samples the database on a timer
# (`store_gauges`), each consumer hands in librdkafka's statistics (`consumer_lag`).

@dataclass
class _Samples:
    # {(saga_type, status): count} of the sagas in flight.
    in_flight: dict[tuple[str, str], int] = field(default_factory=dict)
    # Outbox rows neither published nor set aside, and the age of the oldest, in seconds.
    outbox_backlog: int | None = None
    outbox_oldest_age_s: float | None = None
    # {reason code: count} of the dead letters not redriven yet.
    dead_letters_pending: dict[str, int] = field(default_factory=dict)
    # {(group, topic): records} behind the logs' ends, per consumer of this process.
    consumer_lag: dict[tuple[str, str], int] = field(default_factory=dict)


SAMPLES = _Samples()


def store_gauges(in_flight: dict[tuple[str, str], int], outbox_backlog: int,
                 outbox_oldest_age_s: float, dead_letters_pending: dict[str, int]) -> None:
    """The latest sample of the database's gauges (taken by the recovery worker). A series
    that was reported before and is absent now reports 0: the last saga of a status ended,
    the last dead letter of a reason was redriven (a series that stops is read as its last
    value)."""
    SAMPLES.in_flight = {**dict.fromkeys(SAMPLES.in_flight, 0), **in_flight}
    SAMPLES.outbox_backlog = outbox_backlog
    SAMPLES.outbox_oldest_age_s = outbox_oldest_age_s
    SAMPLES.dead_letters_pending = {**dict.fromkeys(SAMPLES.dead_letters_pending, 0),
                                    **dead_letters_pending}


def consumer_lag(group: str, stats_json: str) -> None:
    """librdkafka's statistics callback (`statistics.interval.ms`): keep the group's lag per
    topic, the sum over the partitions this consumer is assigned of the records between its
    committed offset and the log's end (librdkafka's `consumer_lag`; -1, unknown, is left
    out)."""
    stats = json.loads(stats_json)
    lags: dict[tuple[str, str], int] = {}
    for topic, data in (stats.get("topics") or {}).items():
        total, known = 0, False
        for partition, numbers in (data.get("partitions") or {}).items():
            lag = numbers.get("consumer_lag", -1)
            if partition == "-1" or not numbers.get("desired") or lag < 0:
                continue
            total += lag
            known = True
        if known:
            lags[(group, topic)] = total
    # Replaced whole per group: a partition handed to another worker stops counting here.
    SAMPLES.consumer_lag = {**{key: value for key, value in SAMPLES.consumer_lag.items()
                               if key[0] != group}, **lags}


def _observe_in_flight(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(count, {"saga_type": saga_type, "status": status})
            for (saga_type, status), count in SAMPLES.in_flight.items()]


def _observe_outbox_backlog(_options: CallbackOptions) -> Iterable[Observation]:
    return [] if SAMPLES.outbox_backlog is None else [Observation(SAMPLES.outbox_backlog)]


def _observe_outbox_age(_options: CallbackOptions) -> Iterable[Observation]:
    age = SAMPLES.outbox_oldest_age_s
    return [] if age is None else [Observation(age)]


def _observe_dead_letters(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(count, {"reason": reason})
            for reason, count in SAMPLES.dead_letters_pending.items()]


def _observe_consumer_lag(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(lag, {"group": group, "topic": topic})
            for (group, topic), lag in SAMPLES.consumer_lag.items()]


SAGAS_IN_FLIGHT = _meter.create_observable_gauge(
    "saga.in_flight", [_observe_in_flight], unit="{saga}",
    description="Sagas RUNNING or COMPENSATING, by saga_type and status (sampled by the "
                "recovery worker every SAGA_METRICS_SAMPLE_S)")
OUTBOX_BACKLOG = _meter.create_observable_gauge(
    "saga.outbox.backlog", [_observe_outbox_backlog], unit="{row}",
    description="Outbox rows not published yet and not set aside (sampled by the recovery "
                "worker)")
OUTBOX_OLDEST_AGE = _meter.create_observable_gauge(
    "saga.outbox.oldest_age", [_observe_outbox_age], unit="s",
    description="Age of the oldest outbox row not published yet and not set aside; 0 when "
                "there is none (sampled by the recovery worker)")
DEAD_LETTERS_PENDING = _meter.create_observable_gauge(
    "saga.dead_letters.pending", [_observe_dead_letters], unit="{message}",
    description="Dead letters not redriven yet, by reason (sampled by the recovery worker)")
CONSUMER_LAG = _meter.create_observable_gauge(
    "saga.consumer.lag", [_observe_consumer_lag], unit="{message}",
    description="Records between a consumer group's committed offsets and the ends of the "
                "logs, over the partitions this worker owns, by group and topic (librdkafka's "
                "statistics)")


EXPORTERS = ("none", "console", "otlp")


def exporter_from_environment(variable: str) -> str:
    """The exporter an `OTEL_*_EXPORTER` variable names (`none` when unset), or a clear
    ConfigurationError for one this package does not support. Shared by metrics and traces."""
    exporter_name = os.environ.get(variable, "none").strip().lower() or "none"
    if exporter_name not in EXPORTERS:
        raise ConfigurationError(f"{variable}={exporter_name!r} is not supported: "
                                 f"use one of {', '.join(EXPORTERS)}")
    return exporter_name


def require_otlp_over_http(signal: str) -> None:
    """A clear ConfigurationError unless the OTLP protocol the `OTEL_*` variables name for
    `signal` (`metrics`, `traces`) is http/protobuf, the only one this package exports with."""
    protocol = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol != "http/protobuf":
        raise ConfigurationError(f"OTLP protocol {protocol!r} is not supported for {signal}: "
                                 "use http/protobuf (port 4318 on a collector)")


def configure_metrics(worker_name: str) -> MeterProvider | None:
    """Install the process's MeterProvider as the `OTEL_*` variables say; None when metrics
    are off. Call `shutdown()` on the result at exit: it exports what is left."""
    exporter_name = exporter_from_environment("OTEL_METRICS_EXPORTER")
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
        require_otlp_over_http("metrics")
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter()
    provider = MeterProvider(
        resource=Resource.create({"service.instance.id": worker_name}),
        metric_readers=[PeriodicExportingMetricReader(exporter)])
    metrics.set_meter_provider(provider)
    record_histograms()
    return provider
