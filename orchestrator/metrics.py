"""OpenTelemetry instruments. Without a configured MeterProvider they cost nothing (the API's
no-op); a deployment that sets one (OTLP exporter, see compose/) gets them by these names."""

from __future__ import annotations

from opentelemetry import metrics

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
