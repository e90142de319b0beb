"""One saga is one trace, across the real worker processes.

Every worker runs as its own process (`saga worker ...`, as deployed) and exports its spans
over OTLP/HTTP to a receiver inside this test, which decodes the protobuf requests the way a
collector does. A transfer published without trace context must give one trace whose spans
form one tree (one root: the intake that started the saga; every other span's parent
exported too); one published with an upstream's `traceparent` must join the upstream's trace
under the upstream's span. The events in the database carry the same trace id, and the
timeline shows it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.dev.processes import WorkerProcesses
from orchestrator.ops.queries import timeline
from orchestrator.settings import Settings
from orchestrator.tracing import intake_span_id, saga_span_id
from orchestrator.workers.runner import prepare
from schemas import TOPIC_TRANSFER_COMMANDS
from steps import APPLICATION
from tests.integration.conftest import database_of_its_own

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    service_instance: str


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on loopback: what a collector's `otlp` receiver is to the
    workers' exporters."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                        span.name, span.kind,
                        {a.key: _value(a.value) for a in span.attributes},
                        str(resource.get("service.instance.id", ""))))
        with self.lock:
            self.spans.extend(received)

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def of_saga(self, saga_id: uuid.UUID) -> list[ReceivedSpan]:
        with self.lock:
            return [span for span in self.spans if span.attributes.get("saga.id") == str(saga_id)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Traced:
    settings: Settings
    engine: AsyncEngine
    receiver: OtlpReceiver
    producer: Producer
    run_id: str
    workers: WorkerProcesses

    async def open(self, name: str, balance: str, closed: bool = False) -> str:
        from steps.ledger import open_account

        account_id = f"tr-{self.run_id}-{name}"
        async with self.engine.begin() as conn:
            await open_account(conn, account_id, "EUR", Decimal(balance), None, closed)
        return account_id

    def publish(self, source: str, destination: str, amount: str,
                headers: list[tuple[str, bytes]] | None = None) -> str:
        transfer_id = str(uuid.uuid4())
        body = {"transfer_id": transfer_id, "source_account": source,
                "destination_account": destination, "amount": amount, "currency": "EUR",
                "reference": "tracing test", "requested_by": "pytest"}
        self.producer.produce(self.settings.topic(TOPIC_TRANSFER_COMMANDS),
                              value=json.dumps(body).encode(), key=transfer_id.encode(),
                              headers=headers or [])
        assert self.producer.flush(10) == 0
        return transfer_id

    async def ended(self, transfer_id: str, timeout_s: float = 60) -> tuple[uuid.UUID, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            async with self.engine.connect() as conn:
                row = (await conn.execute(text(
                    "SELECT saga_id, status FROM sagas WHERE saga_type = 'transfer'"
                    " AND business_key = :k"), {"k": transfer_id})).one_or_none()
            if row is not None and row.status in ("COMPLETED", "COMPENSATED", "FAILED"):
                return row.saga_id, row.status
            await asyncio.sleep(0.1)
        raise AssertionError(f"transfer {transfer_id} did not end in {timeout_s} s")

    async def trace_ids_of_events(self, saga_id: uuid.UUID) -> list[str | None]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(text(
                "SELECT trace_id FROM saga_events WHERE saga_id = :s ORDER BY seq"),
                {"s": saga_id})).scalars())

    async def settled_trace(self, trace_id: str, saga_id: uuid.UUID,
                            timeout_s: float = 30) -> list[ReceivedSpan]:
        """The trace's spans once the saga span is in and nothing new came for a second (the
        workers export every 100 ms)."""
        deadline = time.monotonic() + timeout_s
        count, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            spans = self.receiver.of_trace(trace_id)
            if len(spans) != count:
                count, stable_since = len(spans), time.monotonic()
            elif (time.monotonic() - stable_since > 1.0
                  and any(s.span_id == saga_span_id(saga_id) for s in spans)):
                return spans
            await asyncio.sleep(0.1)
        raise AssertionError(f"the trace {trace_id} did not settle: {self.receiver.spans}")


@pytest.fixture(scope="module")
async def traced(stack_settings: Settings, engine: AsyncEngine,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Traced]:
    """Every worker of the transfer application as a process, on a database and topics of
    their own, exporting spans to the receiver."""
    run_id = uuid.uuid4().hex[:8]
    async with database_of_its_own(engine, stack_settings, "tracing") as url:
        settings = stack_settings.model_copy(update={"database_url": url,
                                                     "topic_prefix": f"tracing-{run_id}."})
        receiver = OtlpReceiver()
        own = await prepare(settings, APPLICATION)
        log_dir: Path = tmp_path_factory.mktemp("tracing-logs")
        workers = WorkerProcesses(settings, log_dir)
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0,
                             "enable.idempotence": True})
        try:
            workers.start(env={"OTEL_TRACES_EXPORTER": "otlp",
                               "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                               "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRICS_EXPORTER": "none"})
            await workers.wait_ready(own, timeout_s=120)
            yield Traced(settings, own, receiver, producer, run_id, workers)
        finally:
            producer.flush(5)
            await asyncio.to_thread(workers.stop)
            receiver.close()
            await own.dispose()


def assert_one_tree(spans: list[ReceivedSpan], root_parent: str = "") -> ReceivedSpan:
    """Every span's parent is another span of the list, but for one: the root, whose parent
    is `root_parent` (empty: none). Returns the root."""
    ids = [span.span_id for span in spans]
    assert len(ids) == len(set(ids)), "a span id appears twice"
    roots = [span for span in spans if span.parent_id not in ids]
    assert len(roots) == 1, [(r.name, r.parent_id) for r in roots]
    assert roots[0].parent_id == root_parent
    return roots[0]


@pytest.mark.timeout(300)
async def test_a_saga_is_one_trace_across_every_worker_process(traced: Traced) -> None:
    source, destination = await traced.open("a", "100.00"), await traced.open("b", "0.00")

    transfer_id = traced.publish(source, destination, "12.34")
    saga_id, status = await traced.ended(transfer_id)

    assert status == "COMPLETED"
    event_traces = await traced.trace_ids_of_events(saga_id)
    assert len(event_traces) >= 8 and len(set(event_traces)) == 1 and event_traces[0]
    trace_id = event_traces[0]
    assert (await timeline(traced.engine, str(saga_id)))["trace_id"] == trace_id
    spans = await traced.settled_trace(trace_id, saga_id)
    # Every span that names this saga is in its trace.
    assert {s.trace_id for s in traced.receiver.of_saga(saga_id)} == {trace_id}
    root = assert_one_tree(spans)
    # The root is the intake that started the saga; the saga's span is its child.
    assert root.span_id == intake_span_id(saga_id)
    assert root.name == f"process {traced.settings.topic(TOPIC_TRANSFER_COMMANDS)}"
    assert root.attributes["saga.business_key"] == transfer_id
    [saga] = [s for s in spans if s.span_id == saga_span_id(saga_id)]
    assert (saga.name, saga.parent_id) == ("saga transfer", root.span_id)
    assert saga.attributes["saga.status"] == "COMPLETED"
    # Each step was sent from a span of the orchestrator's under the saga span, and applied
    # under it by its participant, in a process of its own.
    sends = {s.attributes["saga.step"]: s for s in spans if s.name.startswith("send ")}
    assert set(sends) == {"screen", "reserve", "credit", "settle", "notify"}
    assert all(s.parent_id == saga.span_id and s.attributes["saga.direction"] == "forward"
               and s.attributes["saga.attempt"] == 1 and s.kind == 4 for s in sends.values())
    # A command delivered twice (the relay may publish a row the fast path published too) is
    # answered twice, the second time with the stored reply: several spans per step are fine.
    applied = [s for s in spans if s.attributes.get("saga.participant")]
    assert {s.attributes["saga.step"] for s in applied} == set(sends)
    for span in applied:
        assert span.parent_id == sends[span.attributes["saga.step"]].span_id
        assert span.attributes["messaging.system"] == "kafka"
        assert span.attributes["saga.outcome"] == "succeeded"
    assert {s.service_instance.split("#")[0] for s in applied} == {
        "participant:risk", "participant:ledger", "participant:notify"}
    # The orchestrator folded each reply under the participant span that sent it: every step's
    # reply.
    replies = [s for s in spans if s.name.endswith("saga.replies.v1")]
    by_id = {s.span_id: s for s in applied}
    assert all(s.parent_id in by_id for s in replies)
    assert {by_id[s.parent_id].attributes["saga.step"] for s in replies} == set(sends)
    # The database writes are child spans, with the database conventions.
    writes = [s for s in spans if s.attributes.get("db.system.name") == "postgresql"]
    assert {s.parent_id for s in writes} >= {root.span_id}
    assert any(s.parent_id in by_id for s in writes)
    assert all(s.kind == 3 and s.attributes["db.operation.name"] == "INSERT" for s in writes)


@pytest.mark.timeout(300)
async def test_a_request_with_trace_context_joins_the_upstream_trace(traced: Traced) -> None:
    source = await traced.open("c", "100.00")
    destination = await traced.open("closed", "0.00", closed=True)
    upstream_trace, upstream_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]

    transfer_id = traced.publish(source, destination, "5.00", headers=[
        ("traceparent", f"00-{upstream_trace}-{upstream_span}-01".encode()),
        ("tracestate", b"upstream=1")])
    saga_id, status = await traced.ended(transfer_id)

    assert status == "COMPENSATED"  # the credit is refused: the hold is released
    assert set(await traced.trace_ids_of_events(saga_id)) == {upstream_trace}
    spans = await traced.settled_trace(upstream_trace, saga_id)
    root = assert_one_tree(spans, root_parent=upstream_span)
    assert root.span_id == intake_span_id(saga_id)
    [saga] = [s for s in spans if s.span_id == saga_span_id(saga_id)]
    assert saga.attributes["saga.status"] == "COMPENSATED"
    compensations = [s for s in spans if s.name.startswith("send ")
                     and s.attributes["saga.direction"] == "compensate"]
    assert compensations and all(s.parent_id == saga.span_id for s in compensations)
    async with traced.engine.connect() as conn:
        stored = (await conn.execute(text(
            "SELECT traceparent, tracestate FROM sagas WHERE saga_id = :s"),
            {"s": saga_id})).one()
    assert stored.traceparent == f"00-{upstream_trace}-{saga_span_id(saga_id)}-01"
    assert stored.tracestate == "upstream=1"


@pytest.mark.timeout(300)
async def test_a_command_the_recovery_worker_resends_stays_in_the_saga_trace(
        traced: Traced) -> None:
    """The recovery worker has no message to take the context from: it sends in the one stored
    with the saga. The screening participant is frozen, so the screen's deadline (10 s) passes
    and recovery re-sends the command; thawed, the participant answers both copies."""
    source, destination = await traced.open("d", "100.00"), await traced.open("e", "0.00")
    traced.workers.signal("participant:risk", signal.SIGSTOP)
    try:
        transfer_id = traced.publish(source, destination, "1.00")
        async with traced.engine.connect() as conn:
            deadline = time.monotonic() + 40
            while not (await conn.execute(text(
                    "SELECT 1 FROM saga_events e JOIN sagas s USING (saga_id)"
                    " WHERE s.business_key = :k AND e.type = 'StepTimedOut'"),
                    {"k": transfer_id})).first():
                assert time.monotonic() < deadline, "recovery did not re-send the screen"
                await asyncio.sleep(0.2)
                await conn.rollback()
    finally:
        traced.workers.signal("participant:risk", signal.SIGCONT)
    saga_id, status = await traced.ended(transfer_id)

    assert status == "COMPLETED"
    [trace_id] = set(await traced.trace_ids_of_events(saga_id))
    spans = await traced.settled_trace(trace_id, saga_id)
    root = assert_one_tree(spans)
    assert root.span_id == intake_span_id(saga_id)
    screens = [s for s in spans if s.name.startswith("send ")
               and s.attributes["saga.step"] == "screen"]
    by_worker = {s.service_instance.split("#")[0] for s in screens}
    assert by_worker == {"orchestrator", "recovery"}, screens
    assert all(s.parent_id == saga_span_id(saga_id) and s.attributes["saga.attempt"] == 1
               for s in screens)
    recovery = [s for s in spans if s.name == "saga recovery"]
    assert recovery and all(s.parent_id == saga_span_id(saga_id) for s in recovery)
    assert any("StepTimedOut" in s.attributes["saga.recovery.events"] for s in recovery)
    # Thawed, the participant applied the screen once and answered each copy in its trace.
    applied = [s for s in spans if s.attributes.get("saga.participant") == "risk"]
    assert {s.parent_id for s in applied} <= {s.span_id for s in screens}
    assert len(applied) >= 1
