"""The canary: personal and account data never leave the database through the workers'
output.

Transfers whose account ids, reference and requester carry a unique marker (a random string)
run on real worker processes (`saga worker ...`, started as `saga dev` and the chaos harness
start them, each with its output in a file), with metrics exported to that output
(`OTEL_METRICS_EXPORTER=console`), through every path that writes something about a saga:

- the happy path (COMPLETED);
- compensations: a credit refused by a closed destination, a screen that hits the deny list;
- retries: a screening provider that fails every attempt (then the saga compensates);
- dead letters: a conflicting duplicate, a request with one account on both sides, and a step
  command the database refuses (a poison record, set aside with the error as its reason);
- recovery: a notification worker that is down when its command goes out, so the recovery
  worker re-sends it after its deadline.

Then every line every worker wrote (logs and exported metrics), every dead-letter reason in the
database and every `dlq-reason` header on the dead-letter topic is searched for the marker: it
must be found 0 times. Our own SQL then shows the database still holds the real values.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.dev.processes import WorkerProcesses
from orchestrator.settings import Settings
from schemas import TOPIC_TRANSFER_COMMANDS, step_topic
from steps.ledger import open_account
from tests.integration.conftest import DeadLetterTap, Isolated

pytestmark = pytest.mark.integration

TERMINAL = ("COMPLETED", "COMPENSATED", "REJECTED", "FAILED")
# What the processes export to their output: metrics now (tracing, when it reads its own
# variable, too).
TELEMETRY_ENV = {"OTEL_METRICS_EXPORTER": "console", "OTEL_TRACES_EXPORTER": "console",
                 "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
RISK = "participant:risk"
NOTIFY = "participant:notify"


@dataclass
class Canary:
    settings: Settings
    engine: AsyncEngine
    workers: WorkerProcesses
    producer: Producer
    marker: str

    def account(self, role: str) -> str:
        # Valid for `AccountId`; the marker is never in the last four characters, which are
        # all a masked id shows.
        return f"cnry-{self.marker}-{role}"

    async def open(self, role: str, balance: str = "0", closed: bool = False) -> str:
        account_id = self.account(role)
        async with self.engine.begin() as conn:
            await open_account(conn, account_id, "EUR", Decimal(balance), None, closed)
        return account_id

    def request(self, source: str, destination: str, amount: str = "10.00",
                transfer_id: str | None = None) -> dict[str, Any]:
        return {"transfer_id": transfer_id or str(uuid.uuid4()), "source_account": source,
                "destination_account": destination, "amount": amount, "currency": "EUR",
                "reference": f"invoice {self.marker} for Jane Example",
                "requested_by": f"clerk-{self.marker}"}

    def publish(self, topic: str, body: dict[str, Any], key: str) -> None:
        self.producer.produce(self.settings.topic(topic), value=json.dumps(body).encode(),
                              key=key.encode())
        assert self.producer.flush(10) == 0

    def transfer(self, body: dict[str, Any]) -> str:
        self.publish(TOPIC_TRANSFER_COMMANDS, body, body["transfer_id"])
        return str(body["transfer_id"])

    async def status(self, transfer_id: str) -> str | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(text(
                "SELECT status FROM sagas WHERE saga_type = 'transfer' AND business_key = :k"),
                {"k": transfer_id})).scalar_one_or_none()

    async def wait_terminal(self, transfer_id: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while (status := await self.status(transfer_id)) not in TERMINAL:
            assert time.monotonic() < deadline, (
                f"transfer {transfer_id} is {status} after {timeout_s}s; logs in "
                f"{self.workers.log_dir}")
            await asyncio.sleep(0.1)
        assert status is not None
        return status

    async def event_count(self, transfer_id: str, event_type: str, step: str) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(text(
                "SELECT count(*) FROM saga_events e JOIN sagas s USING (saga_id)"
                " WHERE s.business_key = :k AND e.type = :t AND e.step = :s"),
                {"k": transfer_id, "t": event_type, "s": step})).scalar_one())

    async def wait_event(self, transfer_id: str, event_type: str, step: str,
                         timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while await self.event_count(transfer_id, event_type, step) == 0:
            assert time.monotonic() < deadline, (
                f"no {event_type} of {step} for {transfer_id} after {timeout_s}s; logs in "
                f"{self.workers.log_dir}")
            await asyncio.sleep(0.1)

    async def restart(self, label: str, env: dict[str, str] | None = None) -> None:
        self.workers.terminate(label)
        self.workers.start(label, env={**TELEMETRY_ENV, **(env or {})})
        await self.workers.wait_ready(self.engine, timeout_s=90, labels=[label])


@pytest.fixture
async def canary(isolated: Isolated, tmp_path: Path) -> AsyncIterator[Canary]:
    marker = "mk" + uuid.uuid4().hex[:10]
    settings = isolated.harness.settings.model_copy(update={
        # Topics of its own: no other worker of the session reads them.
        "topic_prefix": f"canary-{uuid.uuid4().hex[:8]}.",
        "risk_denied_accounts": [f"cnry-{marker}-denied"],
        "metrics_sample_s": 1.0,
    })
    workers = WorkerProcesses(settings, tmp_path / "logs")
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0,
                         "enable.idempotence": True})
    try:
        # The screening provider fails every call at first: the retry scenario runs first.
        for kind in workers.kinds:
            workers.start(kind, env={**TELEMETRY_ENV, **(
                {"SAGA_RISK_FAILURE_RATE": "1.0"} if kind == RISK else {})})
        await workers.wait_ready(isolated.engine, timeout_s=120)
        yield Canary(settings, isolated.engine, workers, producer, marker)
    finally:
        workers.stop()
        producer.flush(5)


@pytest.mark.timeout(420)
async def test_no_marker_leaves_the_database_through_logs_metrics_or_dead_letter_reasons(
        canary: Canary) -> None:
    c = canary
    tap = DeadLetterTap(c.settings)
    try:
        await run_every_path(c)
    finally:
        c.workers.stop()  # SIGTERM: each worker exports what its meters hold before it exits
        await asyncio.sleep(1.0)
        tap.close()

    output = {path.name: path.read_text(errors="replace")
              for path in sorted(c.workers.log_dir.glob("*.log"))}
    assert len(output) == len(c.workers.kinds), sorted(output)
    async with c.engine.connect() as conn:
        reasons = list((await conn.execute(text(
            "SELECT reason_code, reason FROM dead_letters"))).all())
    dlq_reasons = [record["headers"].get("dlq-reason", "") for record in tap.records]

    # The search is only worth something if the output holds what it should: structured log
    # lines naming sagas, and every kind of metric exported.
    lines = [json.loads(line) for text_ in output.values() for line in text_.splitlines()
             if line.startswith("{")]
    logs = [line for line in lines if "level" in line and "message" in line]
    exported = {metric["name"] for line in lines for resource in line.get("resource_metrics", ())
                for scope in resource["scope_metrics"] for metric in scope["metrics"]}
    assert any(line.get("saga_id") and "CONFLICTING_DUPLICATE" in line["message"]
               for line in logs), "no JSON log line about the conflicting duplicate"
    assert {line.get("worker", "").split("#")[0] for line in logs} >= {"orchestrator"}
    assert {"saga.duration", "saga.step.latency", "saga.dead_letters", "saga.recovery.actions",
            "saga.outbox.backlog", "saga.outbox.oldest_age", "saga.dead_letters.pending",
            "saga.consumer.lag"} <= exported, sorted(exported)
    outcomes = {point["attributes"]["outcome"] for line in lines
                for resource in line.get("resource_metrics", ())
                for scope in resource["scope_metrics"] for metric in scope["metrics"]
                if metric["name"] == "saga.duration"
                for point in metric["data"]["data_points"]}
    assert outcomes == {"completed", "compensated", "rejected"}, outcomes
    # The gauges tell the truth: at the end (every saga ended, every record handled) the last
    # values exported say so.
    pending = last_points(output["recovery.log"], "saga.dead_letters.pending")
    assert pending == {(("reason", "CONFLICTING_DUPLICATE"),): 1, (("reason", "SAME_ACCOUNT"),): 1,
                       (("reason", "PROCESSING_FAILED"),): 1}, pending
    in_flight = last_points(output["recovery.log"], "saga.in_flight")
    assert in_flight and set(in_flight.values()) == {0}, in_flight
    lags = {key: value for text_ in output.values()
            for key, value in last_points(text_, "saga.consumer.lag").items()}
    assert {dict(key)["group"] for key in lags} == {
        "saga-orchestrator", "saga-participant-risk", "saga-participant-ledger",
        "saga-participant-notify"}, lags
    assert set(lags.values()) == {0}, lags
    assert {code for code, _ in reasons} >= {"CONFLICTING_DUPLICATE", "SAME_ACCOUNT",
                                             "PROCESSING_FAILED"}, reasons
    assert len(dlq_reasons) >= 3, "the dead letters never reached the dead-letter topic"

    found = {name: text_.count(c.marker) for name, text_ in output.items()}
    found["dead_letters.reason"] = sum(reason.count(c.marker) for _, reason in reasons)
    found["dlq-reason headers"] = sum(reason.count(c.marker) for reason in dlq_reasons)
    leaks = {where: count for where, count in found.items() if count}
    assert not leaks, (f"the marker {c.marker} left the database: {leaks}; see "
                       f"{c.workers.log_dir}\n" + "\n".join(
                           line for text_ in output.values() for line in text_.splitlines()
                           if c.marker in line)[:4000])

    # The database itself still holds the real values (our own SQL, not the project's).
    async with c.engine.connect() as conn:
        accounts = (await conn.execute(text(
            "SELECT count(*) FROM accounts WHERE account_id LIKE :m"),
            {"m": f"%{c.marker}%"})).scalar_one()
        entries = (await conn.execute(text(
            "SELECT count(*) FROM ledger_entries WHERE credit_account LIKE :m"
            " OR debit_account LIKE :m OR hold_account LIKE :m"),
            {"m": f"%{c.marker}%"})).scalar_one()
        references = (await conn.execute(text(
            "SELECT count(*) FROM saga_events WHERE type = 'SagaStarted'"
            " AND payload -> 'input' ->> 'reference' = :r"),
            {"r": f"invoice {c.marker} for Jane Example"})).scalar_one()
        payloads = (await conn.execute(text(
            "SELECT count(*) FROM dead_letters WHERE position(CAST(:m AS bytea) IN payload) > 0"),
            {"m": c.marker.encode()})).scalar_one()
    assert accounts == 7
    assert entries >= 4  # the happy transfer's hold, credit and settle, the other holds
    assert references == 5  # every saga that started
    assert payloads == 3  # each dead letter keeps its original bytes


def last_points(output: str, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    """The last exported value of each series of the metric `name` in one worker's output."""
    points: dict[tuple[tuple[str, Any], ...], Any] = {}
    for line in output.splitlines():
        if not line.startswith('{"resource_metrics"'):
            continue
        for resource in json.loads(line)["resource_metrics"]:
            for scope in resource["scope_metrics"]:
                for metric in scope["metrics"]:
                    if metric["name"] == name:
                        for point in metric["data"]["data_points"]:
                            key = tuple(sorted(point["attributes"].items()))
                            points[key] = point["value"]
    return points


async def run_every_path(c: Canary) -> None:
    source = await c.open("source", "1000.00")
    destination = await c.open("destination")
    closed = await c.open("closed-dest", closed=True)
    denied = await c.open("denied")
    retried_source = await c.open("retry-source", "100.00")
    late_source = await c.open("late-source", "100.00")
    poisoned = await c.open("poison-dest")

    # Retries: the provider fails every attempt, so the screen is retried until its attempts
    # run out, and the saga gives its hold back.
    retried = c.transfer(c.request(retried_source, destination))
    assert await c.wait_terminal(retried) == "COMPENSATED"
    assert await c.event_count(retried, "StepRetryScheduled", "screen") >= 1
    await c.restart(RISK, {"SAGA_RISK_FAILURE_RATE": "0"})

    # The happy path, and two compensations.
    happy_request = c.request(source, destination)
    happy = c.transfer(happy_request)
    refused_credit = c.transfer(c.request(source, closed))
    sanctioned = c.transfer(c.request(source, denied))
    assert await c.wait_terminal(happy) == "COMPLETED"
    assert await c.wait_terminal(refused_credit) == "COMPENSATED"
    assert await c.wait_terminal(sanctioned) == "COMPENSATED"

    # Dead letters: the same transfer id with another amount; one account on both sides; and a
    # step command the database refuses (a negative amount breaks a CHECK constraint, and the
    # error's DETAIL quotes the row).
    c.transfer({**happy_request, "amount": "11.00"})
    same = c.transfer(c.request(source, source))
    assert await c.wait_terminal(same) == "REJECTED"
    saga_id = uuid.uuid4()
    c.publish(step_topic("ledger"), {
        "command_id": str(uuid.uuid4()), "saga_id": str(saga_id), "saga_type": "transfer",
        "step": "credit", "action": "credit", "direction": "forward", "attempt": 1,
        "deadline_at": (datetime.now(UTC) + timedelta(seconds=30)).isoformat(),
        "payload": {**c.request(source, poisoned, amount="-5.00"), "amount": "-5.00"},
    }, str(saga_id))
    deadline = time.monotonic() + 60
    while True:
        async with c.engine.connect() as conn:
            codes = set((await conn.execute(text(
                "SELECT reason_code FROM dead_letters"))).scalars())
        if {"CONFLICTING_DUPLICATE", "PROCESSING_FAILED"} <= codes:
            break
        assert time.monotonic() < deadline, f"dead letters so far: {codes}"
        await asyncio.sleep(0.2)

    # Recovery: the notification is sent while its worker is down; after the step's deadline
    # the recovery worker re-sends it, and the worker, back, answers.
    c.workers.terminate(NOTIFY)
    late = c.transfer(c.request(late_source, destination))
    await c.wait_event(late, "StepStarted", "notify", timeout_s=60)
    await c.wait_event(late, "StepTimedOut", "notify", timeout_s=60)
    c.workers.start(NOTIFY, env=TELEMETRY_ENV)
    assert await c.wait_terminal(late, timeout_s=90) == "COMPLETED"
    # Long enough for a gauge sample and an export after the last saga ended.
    await asyncio.sleep(2.5)
