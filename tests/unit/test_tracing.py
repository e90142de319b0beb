"""Trace context in Kafka headers, the derived ids of a saga's trace, and how a worker takes its
TracerProvider (none set, one from the OTEL_* variables, or the embedding application's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime

import pytest

from orchestrator import tracing
from orchestrator.kafka.consumer import decode_headers
from orchestrator.settings import Settings
from orchestrator.tracing import (
    TraceContext,
    from_headers,
    intake_span_id,
    parse_traceparent,
    saga_context,
    saga_span_id,
    saga_trace_id,
    stored_context,
)
from orchestrator.workers.saga_worker import command_row, traced_command_rows
from schemas import Direction, StepCommand
from steps.saga import TRANSFER

UPSTREAM = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_traceparent_header_is_read_with_its_tracestate() -> None:
    headers = [("message-id", b"m-1"), ("traceparent", UPSTREAM.encode()),
               ("tracestate", b"vendor=abc,other=1")]

    context = from_headers(headers)

    assert context == TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01",
                                   "vendor=abc,other=1")
    assert context.sampled
    # Written back exactly as read: the same header names and values.
    assert context.headers() == (("traceparent", UPSTREAM.encode()),
                                 ("tracestate", b"vendor=abc,other=1"))


def test_a_record_without_trace_context_has_none() -> None:
    assert from_headers([("message-id", b"m-1")]) is None
    assert from_headers([]) is None
    assert from_headers([("tracestate", b"vendor=abc")]) is None


@pytest.mark.parametrize("value", [
    "", "garbage", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # trace id too short
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",  # not hex
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # the forbidden version
    UPSTREAM + "-extra",  # version 00 has exactly four fields
])
def test_a_malformed_traceparent_is_ignored(value: str) -> None:
    """As the W3C recommendation says: the saga then starts a trace of its own."""
    assert parse_traceparent(value) is None


def test_a_later_version_is_read_by_its_first_four_fields() -> None:
    context = parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more")

    assert context is not None
    assert (context.trace_id, context.span_id, context.flags) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "00")
    assert not context.sampled


def test_a_saga_without_upstream_context_gets_a_trace_derived_from_its_id() -> None:
    saga_id = uuid.uuid4()

    context = saga_context(saga_id, None)

    # The same on every redelivery and in every process, and distinct per saga.
    assert context == saga_context(saga_id, None)
    assert context.trace_id == saga_trace_id(saga_id) != saga_trace_id(uuid.uuid4())
    assert len(context.trace_id) == 32 and len(context.span_id) == 16
    assert context.span_id == saga_span_id(saga_id) != intake_span_id(saga_id)
    assert parse_traceparent(context.traceparent) == context


def test_a_saga_with_upstream_context_joins_the_upstream_trace() -> None:
    saga_id = uuid.uuid4()
    upstream = parse_traceparent(UPSTREAM, "vendor=abc")
    assert upstream is not None

    context = saga_context(saga_id, upstream)

    assert context == TraceContext(upstream.trace_id, saga_span_id(saga_id), "01", "vendor=abc")


def test_a_saga_stored_before_migration_0010_gets_the_trace_of_a_request_without_one() -> None:
    saga_id = uuid.uuid4()
    stored = saga_context(saga_id, parse_traceparent(UPSTREAM))

    assert stored_context(saga_id, stored.traceparent, None) == stored
    assert stored_context(saga_id, None, None) == saga_context(saga_id, None)


def _command(saga_id: uuid.UUID) -> StepCommand:
    return StepCommand(command_id=uuid.uuid4(), saga_id=saga_id, saga_type="transfer",
                       step="reserve", action="reserve", direction=Direction.FORWARD, attempt=1,
                       deadline_at=datetime.now(UTC), payload={})


def test_a_step_command_row_carries_the_trace_context_for_the_relay() -> None:
    """The outbox row keeps the headers, so the relay, publishing it later in another process,
    sends the command in the saga's trace."""
    saga_id = uuid.uuid4()
    context = saga_context(saga_id, parse_traceparent(UPSTREAM, "vendor=abc"))

    row = command_row(Settings(), TRANSFER, _command(saga_id), context)

    headers = decode_headers(row.headers)
    assert from_headers(headers) == context
    assert dict(headers)["type"] == b"StepCommand"
    assert from_headers(decode_headers(command_row(Settings(), TRANSFER,
                                                   _command(saga_id)).headers)) is None


def test_with_tracing_off_commands_are_sent_under_the_saga_span_and_no_span_is_made() -> None:
    assert not tracing.ENABLED
    saga_id = uuid.uuid4()
    context = saga_context(saga_id, None)
    spans: list[object] = []

    rows = traced_command_rows(Settings(), TRANSFER, [_command(saga_id), _command(saga_id)],
                               context, spans)  # type: ignore[arg-type]

    assert [from_headers(decode_headers(row.headers)) for row in rows] == [context, context]
    assert spans == []


def _run(*parts: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the script made of `parts` (each dedented) in a fresh interpreter."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    script = "".join(textwrap.dedent(part) for part in parts)
    return subprocess.run([sys.executable, "-c", script], env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=False)


# Each case runs in a process of its own: a process's global TracerProvider can be set once.
_EMIT = """
    import uuid
    from datetime import UTC, datetime, timedelta
    from orchestrator import tracing
    saga_id = uuid.UUID("6f1c3a52-8d0e-4f7b-9a51-2c0d9e7b4a10")
    context = tracing.saga_context(saga_id, None)
    now = datetime.now(UTC)
    tracing.emit_saga_span(saga_id, "transfer", "key-1", "COMPLETED", context,
                           now - timedelta(seconds=2), now)
"""


def test_no_exporter_configured_leaves_tracing_off() -> None:
    result = _run("""
        from opentelemetry import trace
        from orchestrator import tracing
        assert tracing.configure_tracing("w-1") is None
        assert tracing.ENABLED is False
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        print("off")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "off"


def test_an_unknown_exporter_is_a_configuration_error() -> None:
    result = _run("""
        from orchestrator import tracing
        from orchestrator.errors import ConfigurationError
        try:
            tracing.configure_tracing("w-1")
        except ConfigurationError as error:
            print(error)
    """, OTEL_TRACES_EXPORTER="zipkin")
    assert result.returncode == 0, result.stderr
    assert "OTEL_TRACES_EXPORTER='zipkin' is not supported" in result.stdout


def test_the_console_exporter_writes_the_saga_span_with_its_derived_ids() -> None:
    saga_id = uuid.UUID("6f1c3a52-8d0e-4f7b-9a51-2c0d9e7b4a10")
    result = _run("""
        from opentelemetry import trace
        from orchestrator import tracing
        provider = tracing.configure_tracing("w-1")
        assert provider is not None and trace.get_tracer_provider() is provider
        assert tracing.ENABLED
    """, _EMIT, """
        provider.shutdown()
    """, OTEL_TRACES_EXPORTER="console")

    assert result.returncode == 0, result.stderr
    spans = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert len(spans) == 1
    span = spans[0]
    assert span["name"] == "saga transfer"
    assert span["context"]["trace_id"] == "0x" + saga_trace_id(saga_id)
    assert span["context"]["span_id"] == "0x" + saga_span_id(saga_id)
    assert span["parent_id"] == "0x" + intake_span_id(saga_id)
    assert span["attributes"]["saga.id"] == str(saga_id)
    assert span["attributes"]["saga.status"] == "COMPLETED"
    assert span["resource"]["attributes"]["service.instance.id"] == "w-1"


def test_an_application_provider_already_set_is_used_instead_of_a_new_one() -> None:
    """Embedded in an application that set its TracerProvider, the worker installs none of its
    own (whatever OTEL_TRACES_EXPORTER says) and its spans go to the application's exporter."""
    saga_id = uuid.UUID("6f1c3a52-8d0e-4f7b-9a51-2c0d9e7b4a10")
    result = _run("""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter)
        exporter = InMemorySpanExporter()
        application = TracerProvider()
        application.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(application)
        from orchestrator import tracing
        assert tracing.configure_tracing("w-1") is None  # not ours to shut down
        assert trace.get_tracer_provider() is application
        assert tracing.ENABLED
    """, _EMIT, """
        [span] = exporter.get_finished_spans()
        print(format(span.context.span_id, "016x"), format(span.parent.span_id, "016x"),
              format(span.context.trace_id, "032x"))
        # The application's own spans keep random ids.
        with application.get_tracer("app").start_as_current_span("app") as own:
            assert format(own.get_span_context().span_id, "016x") != tracing.saga_span_id(
                saga_id)
    """, OTEL_TRACES_EXPORTER="console")

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [saga_span_id(saga_id), intake_span_id(saga_id),
                                     saga_trace_id(saga_id)]
    assert result.stderr.strip() == ""  # nothing went to a console exporter of ours


def test_a_no_op_provider_set_by_the_application_keeps_tracing_off() -> None:
    result = _run("""
        from opentelemetry import trace
        trace.set_tracer_provider(trace.NoOpTracerProvider())
        from orchestrator import tracing
        assert tracing.adopt_global_provider() is False
        assert tracing.ENABLED is False
        print("off")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "off"
