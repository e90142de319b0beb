"""W3C trace context on every hop of a saga, and the spans workers export (ADR 0015).

Two halves, deliberately apart:

- **Propagation, always on.** A saga's trace context (`TraceContext`) is read from the
  `traceparent`/`tracestate` headers of the message that started it (a new trace when it has
  none: its id derived from the saga id, so a redelivered request gets the same one), stored with
  the saga (`sagas.traceparent`, `saga_events.trace_id`) and written into the headers of every
  step command, reply and dead letter. It is plain string work, a few microseconds per message,
  and it needs no OpenTelemetry SDK: a timeline links to its trace even when no worker exports
  spans.
- **Spans, only when enabled.** `configure_tracing` installs a TracerProvider from the standard
  `OTEL_*` variables, or adopts the one an embedding application already set. Until then
  `ENABLED` is False and the workers create no span, no attribute dict, no context object: the
  hot path checks one module-level flag.

A saga's own span ("saga <type>") and the span of the intake that started it have ids derived
from the saga id (`saga_span_id`, `intake_span_id`). Any process can therefore name them as a
parent, and the process that records the saga's end emits the saga span then, with the saga's
start as its start time: no single process sees a saga's whole life. Spans with chosen ids are
made through an id generator this module wraps around the tracer's own (`_ChosenIds`).

Read by the workers, the participant runtime and the Kafka adapter; never by the pure core.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from orchestrator.metrics import exporter_from_environment, require_otlp_over_http

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
INSTRUMENTATION_NAME = "saga-orchestrator"

# Whether spans are made at all. Read on the hot path instead of asking the API for a
# (non-recording) span: set only by `configure_tracing` / `adopt_global_provider`.
ENABLED = False
_tracer: trace.Tracer = trace.NoOpTracer()

# version-trace-parent-flags; a later version may append fields (read by its first four).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One W3C trace context: the trace, the span a message was sent from, its flags and the
    vendors' `tracestate` (passed on untouched)."""

    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16 lowercase hex digits
    flags: str = "01"  # sampled
    state: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def headers(self) -> tuple[tuple[str, bytes], ...]:
        """As Kafka headers."""
        if self.state:
            return ((TRACEPARENT, self.traceparent.encode()),
                    (TRACESTATE, self.state.encode()))
        return ((TRACEPARENT, self.traceparent.encode()),)

    def with_span(self, span_id: str) -> TraceContext:
        return TraceContext(self.trace_id, span_id, self.flags, self.state)

    @property
    def sampled(self) -> bool:
        return int(self.flags, 16) & 1 == 1


def parse_traceparent(value: str | None, state: str | None = None) -> TraceContext | None:
    """A `traceparent` header's context, or None when it is absent or malformed (a malformed
    one is ignored, as the W3C recommendation says: the saga starts a trace of its own).
    Versions above 00 are read by their first four fields, as the recommendation asks."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if (version == "ff" or (version == "00" and rest)
            or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN):
        return None
    return TraceContext(trace_id, span_id, flags, state or None)


def from_headers(headers: Sequence[tuple[str, bytes]]) -> TraceContext | None:
    """The trace context a Kafka record carries, or None."""
    parent: bytes | None = None
    state: bytes | None = None
    for name, value in headers:
        if name == TRACEPARENT:
            parent = value
        elif name == TRACESTATE:
            state = value
    if parent is None:
        return None
    return parse_traceparent(parent.decode(errors="replace"),
                             state.decode(errors="replace") if state else None)


def without_trace_headers(headers: Sequence[tuple[str, bytes]]
                          ) -> tuple[tuple[str, bytes], ...]:
    return tuple((n, v) for n, v in headers if n not in (TRACEPARENT, TRACESTATE))


def _derived(saga_id: UUID, purpose: bytes, size: int) -> str:
    # A hash, not the saga id's own bits: a uuid5 has fixed version and variant bits, and a
    # ratio sampler reads the trace id's low bits, so they must be uniform.
    return hashlib.sha256(saga_id.bytes + purpose).hexdigest()[:size * 2]


@functools.lru_cache(maxsize=4096)
def saga_trace_id(saga_id: UUID) -> str:
    """The trace id of a saga whose request carried no trace context."""
    return _derived(saga_id, b"trace", 16)


# Cached: asked on every hop of a saga (a saga in flight is asked again within seconds).
@functools.lru_cache(maxsize=65536)
def saga_span_id(saga_id: UUID) -> str:
    """The id of the saga's own span, emitted when the saga ends."""
    return _derived(saga_id, b"saga", 8)


def intake_span_id(saga_id: UUID) -> str:
    """The id of the span of the intake that started the saga: the saga span's parent."""
    return _derived(saga_id, b"intake", 8)


def saga_context(saga_id: UUID, upstream: TraceContext | None) -> TraceContext:
    """The context every message of the saga is sent under when no span of its own wraps it:
    the upstream's trace (or a trace of the saga's own), pointing at the saga span."""
    if upstream is None:
        return TraceContext(saga_trace_id(saga_id), saga_span_id(saga_id))
    return TraceContext(upstream.trace_id, saga_span_id(saga_id), upstream.flags, upstream.state)


def stored_context(saga_id: UUID, traceparent: str | None, tracestate: str | None
                   ) -> TraceContext:
    """A saga's context as `sagas.traceparent` keeps it; a saga written before migration 0010
    has none and gets the trace a request without context would have had."""
    stored = parse_traceparent(traceparent, tracestate)
    return stored if stored is not None else saga_context(saga_id, None)


# ---------------------------------------------------------------- configuration


def configure_tracing(worker_name: str) -> TracerProvider | None:
    """Make spans for this process: with the TracerProvider an embedding application already
    set (returns None: it is the application's to shut down), else with one installed as the
    `OTEL_*` variables say (returns it: call `shutdown()` at exit, it exports what is left).
    None, and tracing stays off, when `OTEL_TRACES_EXPORTER` is `none` (the default).

    - `OTEL_TRACES_EXPORTER`: `none`, `console` (one JSON line per span on stderr) or `otlp`
      (OTLP over HTTP/protobuf to `OTEL_EXPORTER_OTLP_ENDPOINT` or
      `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`);
    - `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`: the resource, with the worker's name as
      `service.instance.id`; `OTEL_TRACES_SAMPLER` and the batch processor's `OTEL_BSP_*` as
      the SDK reads them."""
    if adopt_global_provider():
        return None
    exporter_name = exporter_from_environment("OTEL_TRACES_EXPORTER")
    if exporter_name == "none":
        return None
    # Imported here: a worker without tracing does not pay for the SDK at start.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
    else:
        require_otlp_over_http("traces")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.instance.id": worker_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _use(provider)
    return provider


def adopt_global_provider() -> bool:
    """Use the TracerProvider an embedding application set, if any (and no no-op one); returns
    whether tracing is on. Called by `configure_tracing` and by `run_worker`, so a worker run
    inside an application's process traces with the application's provider."""
    if ENABLED:
        return True
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return False
    _use(provider)
    return True


def _use(provider: trace.TracerProvider) -> None:
    global ENABLED, _tracer
    tracer = provider.get_tracer(INSTRUMENTATION_NAME)
    # The SDK's tracer draws ids from its `id_generator`: wrapped so that the saga and intake
    # spans get their derived ids. A provider of another make keeps its own ids; the saga span
    # then does not join its children (ADR 0015).
    generator = getattr(tracer, "id_generator", None)
    if generator is not None and not isinstance(generator, _ChosenIds):
        tracer.id_generator = _ChosenIds(generator)  # type: ignore[attr-defined]
    _tracer = tracer
    ENABLED = True


def reset_for_tests() -> None:
    """Tracing off again (unit tests install and remove providers)."""
    global ENABLED, _tracer
    ENABLED = False
    _tracer = trace.NoOpTracer()


# ---------------------------------------------------------------- spans (only when ENABLED)

# The (trace id, span id) the next span must have, set around one `start_span` call.
_CHOSEN: ContextVar[tuple[int | None, int | None]] = ContextVar("saga_chosen_ids",
                                                                 default=(None, None))


class _ChosenIds:
    """An id generator that hands out the ids `_CHOSEN` names, else asks the one it wraps."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def generate_span_id(self) -> int:
        chosen = _CHOSEN.get()[1]
        return chosen if chosen is not None else int(self.inner.generate_span_id())

    def generate_trace_id(self) -> int:
        chosen = _CHOSEN.get()[0]
        return chosen if chosen is not None else int(self.inner.generate_trace_id())

    def is_trace_id_random(self) -> bool:
        return _CHOSEN.get()[0] is None and bool(
            getattr(self.inner, "is_trace_id_random", lambda: True)())


def _parent(context: TraceContext | None) -> Any:
    if context is None:
        return None
    span_context = SpanContext(
        int(context.trace_id, 16), int(context.span_id, 16), is_remote=True,
        trace_flags=TraceFlags(int(context.flags, 16)),
        trace_state=TraceState.from_header([context.state]) if context.state else None)
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def start_span(name: str, parent: TraceContext | None, kind: SpanKind = SpanKind.INTERNAL,
               attributes: Mapping[str, Any] | None = None, span_id: str | None = None,
               trace_id: str | None = None, start: datetime | None = None) -> Span:
    """A span under `parent` (a remote context), with a chosen `span_id` (and `trace_id`, for
    a root) when given. Call only when `ENABLED`."""
    token = None
    if span_id is not None or trace_id is not None:
        token = _CHOSEN.set((int(trace_id, 16) if trace_id else None,
                             int(span_id, 16) if span_id else None))
    try:
        return _tracer.start_span(
            name, context=_parent(parent), kind=kind, attributes=attributes,
            start_time=int(start.timestamp() * 1e9) if start is not None else None)
    finally:
        if token is not None:
            _CHOSEN.reset(token)


def context_of(span: Span, fallback: TraceContext) -> TraceContext:
    """The context to send a message under from inside `span` (the fallback when the span is
    not recorded: a sampler dropped it, so its children must point at what was)."""
    span_context = span.get_span_context()
    if not span.is_recording() or not span_context.is_valid:
        return fallback
    return TraceContext(fallback.trace_id, format(span_context.span_id, "016x"),
                        format(int(span_context.trace_flags), "02x"), fallback.state)


def saga_attributes(saga_type: str | None, saga_id: UUID | None, business_key: str | None,
                    step: str | None = None, attempt: int | None = None,
                    direction: str | None = None) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for name, value in (("saga.type", saga_type), ("saga.id", saga_id and str(saga_id)),
                        ("saga.business_key", business_key), ("saga.step", step),
                        ("saga.attempt", attempt), ("saga.direction", direction)):
        if value is not None:
            attributes[name] = value
    return attributes


def messaging_attributes(operation: str, topic: str, partition: int | None = None,
                         offset: int | None = None, key: bytes | None = None,
                         message_id: str | None = None, batch_size: int | None = None
                         ) -> dict[str, Any]:
    """OpenTelemetry's messaging conventions for Kafka."""
    attributes: dict[str, Any] = {
        "messaging.system": "kafka", "messaging.operation.type": operation,
        "messaging.operation.name": operation, "messaging.destination.name": topic}
    if partition is not None:
        attributes["messaging.destination.partition.id"] = str(partition)
    if offset is not None:
        attributes["messaging.kafka.offset"] = offset
    if key is not None:
        attributes["messaging.kafka.message.key"] = key.decode(errors="replace")
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    if batch_size is not None and batch_size > 1:
        attributes["messaging.batch.message_count"] = batch_size
    return attributes


_NOTHING = contextlib.nullcontext()  # reusable: the hot path allocates nothing when off


def database_span(parent: Span | None, operation: str,
                  summary: str) -> contextlib.AbstractContextManager[None]:
    """A client span around one database round trip, under `parent` (OpenTelemetry's database
    conventions; the statement's text is summarised, never its parameters), ended when the
    block ends. Nothing when tracing is off or there is no parent. For a parent that is only
    ended once its batch committed, use `deferred_database_span`."""
    if not ENABLED or parent is None:
        return _NOTHING
    return _database_span(parent, operation, summary)


@contextlib.contextmanager
def _database_span(parent: Span, operation: str, summary: str) -> Iterator[None]:
    span = _tracer.start_span(
        f"{operation} {summary}", context=trace.set_span_in_context(parent),
        kind=SpanKind.CLIENT, attributes=_database_attributes(operation, summary))
    try:
        yield
    except BaseException as error:
        # The error's class only: a driver's message may quote a row (account ids, amounts).
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        raise
    finally:
        span.end()


def _database_attributes(operation: str, summary: str) -> dict[str, Any]:
    return {"db.system.name": "postgresql", "db.system": "postgresql",
            "db.operation.name": operation, "db.query.summary": f"{operation} {summary}",
            "db.collection.name": summary}


class DeferredDatabaseSpan:
    """A database round trip timed now and exported by `emit`, once the batch it wrote is
    committed and its parent is exported with it: a write that is undone (a lost race decided
    again, a failed commit) leaves no span whose parent never comes."""

    __slots__ = ("_ended_ns", "_ok", "_operation", "_parent", "_started_ns", "_summary")

    def __init__(self, parent: Span, operation: str, summary: str) -> None:
        self._parent, self._operation, self._summary = parent, operation, summary
        self._started_ns = self._ended_ns = 0
        self._ok = False

    def __enter__(self) -> None:
        self._started_ns = time.time_ns()

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        self._ended_ns = time.time_ns()
        self._ok = kind is None

    def emit(self) -> None:
        if not self._ok:
            return
        span = _tracer.start_span(
            f"{self._operation} {self._summary}",
            context=trace.set_span_in_context(self._parent), kind=SpanKind.CLIENT,
            attributes=_database_attributes(self._operation, self._summary),
            start_time=self._started_ns)
        span.end(end_time=self._ended_ns)


def deferred_database_span(parent: Span | None, operation: str, summary: str
                           ) -> DeferredDatabaseSpan | contextlib.nullcontext[None]:
    """`DeferredDatabaseSpan` when tracing is on and there is a parent, else a shared no-op
    (pass it to `emit`, which ignores it)."""
    if not ENABLED or parent is None:
        return _NOTHING
    return DeferredDatabaseSpan(parent, operation, summary)


def emit(write: DeferredDatabaseSpan | contextlib.nullcontext[None]) -> None:
    if isinstance(write, DeferredDatabaseSpan):
        write.emit()


def end_all(spans: Sequence[Span]) -> None:
    for span in spans:
        span.end()


def emit_saga_span(saga_id: UUID, saga_type: str, business_key: str, status: str,
                   context: TraceContext, started: datetime | None, ended: datetime,
                   failure: str | None = None) -> None:
    """The span of a saga's whole life, emitted by the process that recorded its end: its id
    and parent (the intake's span) are derived from the saga id, its start is the saga's
    start. Call only when `ENABLED`."""
    span = start_span(f"saga {saga_type}", context.with_span(intake_span_id(saga_id)),
                      SpanKind.INTERNAL,
                      {**saga_attributes(saga_type, saga_id, business_key),
                       "saga.status": status},
                      span_id=saga_span_id(saga_id), start=started or ended)
    if status == "FAILED":
        # The reason's code only (its text may name accounts): the timeline has the rest.
        span.set_status(Status(StatusCode.ERROR, (failure or status).split(":", 1)[0]))
    span.end(end_time=int(ended.timestamp() * 1e9))
