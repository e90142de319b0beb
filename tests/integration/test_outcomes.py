"""Outcome events on the real broker and PostgreSQL: each kind on the saga type's events topic,
keyed by its business key, exactly once per saga; written in the transaction of the saga's end;
and the client that publishes a request and awaits its outcome.

Two setups: the session's workers (what an upstream service sees: requests in, outcomes out),
and the recovery tests' rig (a database and topic prefix of its own, batches handed to the
orchestrator by the test), where a test decides every reply and can break the database under a
batch."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.client import SagaClient
from orchestrator.core.saga import SagaStatus, outcome_event_id, saga_id_for
from orchestrator.errors import OperatorActionRefused, OutcomeTimeout, StoreError
from orchestrator.kafka.threads import kafka_thread_ids
from orchestrator.ops.resolve import resolve_saga
from orchestrator.settings import Settings
from schemas import (
    SAGA_OUTCOME_ADAPTER,
    TOPIC_TRANSFER_EVENTS,
    Outcome,
    RejectionCode,
    SagaOutcome,
    TransferRequested,
)
from steps import APPLICATION
from steps.saga import TRANSFER_TYPE
from tests.cli_process import run_saga
from tests.integration.conftest import Harness
from tests.integration.test_recovery import Rig, rig, template_db  # noqa: F401 (fixtures)
from tests.threads import lowered_since, scheduling, unchanged

pytestmark = pytest.mark.integration
CLIENT_PAGE = Path(__file__).resolve().parents[2] / "docs" / "client.md"


class OutcomeTap:
    """Every outcome record on an events topic from its beginning, read in the background with
    a plain consumer, as an upstream service would."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.records: list[tuple[bytes, SagaOutcome, dict[str, bytes]]] = []
        self._stop = threading.Event()
        self._consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap, "group.id": f"it-out-{uuid.uuid4()}",
            "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.05)
            if message is None or message.error():
                continue
            self.records.append((message.key(),
                                 SAGA_OUTCOME_ADAPTER.validate_json(message.value()),
                                 dict(message.headers() or [])))
        self._consumer.close()

    async def of(self, business_key: str, at_least: int = 1, timeout_s: float = 20
                 ) -> list[tuple[bytes, SagaOutcome, dict[str, bytes]]]:
        deadline = time.monotonic() + timeout_s
        while True:
            mine = [r for r in self.records if r[1].business_key == business_key]
            if len(mine) >= at_least or time.monotonic() > deadline:
                return mine
            await asyncio.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def distinct(records: list[tuple[bytes, SagaOutcome, dict[str, bytes]]]
             ) -> list[tuple[bytes, SagaOutcome, dict[str, bytes]]]:
    """One record per event id; copies of an event must be equal."""
    by_id: dict[uuid.UUID, tuple[bytes, SagaOutcome, dict[str, bytes]]] = {}
    for record in records:
        first = by_id.setdefault(record[1].event_id, record)
        assert first[:2] == record[:2], (first, record)
    return list(by_id.values())


@pytest.fixture(scope="module")
def tap(stack_settings: Settings) -> Iterator[OutcomeTap]:
    made = OutcomeTap(stack_settings, stack_settings.topic(TOPIC_TRANSFER_EVENTS))
    yield made
    made.close()


@pytest.fixture
async def client(stack_settings: Settings, workers: None) -> AsyncIterator[SagaClient]:
    async with SagaClient(stack_settings, [TRANSFER_TYPE], client_id="it-client") as made:
        yield made


# ---------------------------------------------------------------- each kind, on the topic


async def test_each_ending_publishes_one_outcome_keyed_by_its_business_key(
        harness: Harness, tap: OutcomeTap) -> None:
    source = await harness.open("src", "100.00")
    destination = await harness.open("dst", "0.00")
    completed = harness.request(source, destination, "30.00")
    compensated = harness.request(source, destination, "500.00")  # more than there is
    rejected = harness.request(source, destination, "1.00", currency="XYZ")
    for request in (completed, compensated, rejected):
        harness.publish(request)
    for request in (completed, compensated, rejected):
        await harness.wait_terminal(request["transfer_id"])
    conflicting = dict(completed, amount="31.00")
    harness.publish(conflicting)

    seen = {}
    for request, count in ((completed, 2), (compensated, 1), (rejected, 1)):
        await tap.of(request["transfer_id"], count)
    await asyncio.sleep(0.5)  # anything published twice would be there by now
    for request in (completed, compensated, rejected):
        # A row may be published twice (the relay sweeping one the fast path was still
        # sending): copies of one event, which readers deduplicate by its id.
        seen[request["transfer_id"]] = distinct(await tap.of(request["transfer_id"]))

    [(key, done, headers)] = [r for r in seen[completed["transfer_id"]]
                              if r[1].outcome == "completed"]
    saga_id = saga_id_for("transfer", completed["transfer_id"])
    assert key == completed["transfer_id"].encode()
    assert (done.saga_id, done.event_id, done.saga_type) == (
        saga_id, outcome_event_id(saga_id), "transfer")
    assert headers["message-id"] == str(done.event_id).encode()
    assert headers["type"] == b"SagaOutcome"

    [(_, back, _)] = seen[compensated["transfer_id"]]
    assert back.outcome == "compensated"
    assert back.failed_step == "reserve" and "INSUFFICIENT_FUNDS" in back.reason

    [(_, refused, _)] = seen[rejected["transfer_id"]]
    assert refused.outcome == "rejected" and refused.reason_code is RejectionCode.UNKNOWN_CURRENCY

    # The conflicting request gets its own answer; the saga keeps its one outcome.
    [(_, conflict, _)] = [r for r in seen[completed["transfer_id"]]
                          if r[1].outcome == "rejected"]
    assert conflict.reason_code is RejectionCode.CONFLICTING_DUPLICATE
    assert conflict.event_id != done.event_id
    # the saga's outcome and the answer to the conflict: no other event on its key
    assert len(seen[completed["transfer_id"]]) == 2


# ---------------------------------------------------------------- the client


async def test_the_client_gets_the_outcome_and_the_same_one_when_it_asks_again(
        harness: Harness, client: SagaClient, stack_settings: Settings) -> None:
    source = await harness.open("src", "50.00")
    destination = await harness.open("dst", "0.00")
    request = TransferRequested.model_validate(harness.request(source, destination, "12.50"))

    first = await client.submit(TRANSFER_TYPE, request, timeout_s=30)
    # A fresh client that subscribed after the outcome was published still gets it.
    async with SagaClient(stack_settings, [TRANSFER_TYPE], client_id="it-late") as late:
        again = await late.submit(TRANSFER_TYPE, request, timeout_s=30)

    assert first.outcome == "completed"
    assert again == first  # the same event, id and content
    assert await harness.balances(source) == {source: (Decimal("37.50"), Decimal("0"))}
    saga = await harness.saga(str(request.transfer_id))
    assert saga.status == "COMPLETED" and saga.version == 12  # asked twice, ran once


async def test_the_client_tells_its_conflicting_request_from_the_saga_on_its_key(
        harness: Harness, client: SagaClient) -> None:
    source = await harness.open("src", "50.00")
    destination = await harness.open("dst", "0.00")
    original = TransferRequested.model_validate(harness.request(source, destination, "5.00"))
    changed = original.model_copy(update={"amount": Decimal("6.00")})

    first = await client.submit(TRANSFER_TYPE, original)
    conflict = await client.submit(TRANSFER_TYPE, changed)

    assert first.outcome == "completed"
    assert conflict.outcome == "rejected"
    assert conflict.reason_code is RejectionCode.CONFLICTING_DUPLICATE
    assert conflict.event_id != first.event_id


async def test_the_client_says_when_no_outcome_came_in_time(
        rig: Rig) -> None:  # noqa: F811 (the fixture)
    """Nobody consumes the rig's start topic: the request is published, no outcome comes."""
    async with SagaClient(rig.settings, [TRANSFER_TYPE], client_id="it-timeout") as lonely:
        request = TransferRequested.model_validate({
            "transfer_id": str(uuid.uuid4()), "source_account": "a", "destination_account": "b",
            "amount": "1.00", "currency": "EUR", "requested_by": "pytest"})
        started = time.monotonic()
        with pytest.raises(OutcomeTimeout, match="submitting it again is safe") as raised:
            await lonely.submit(TRANSFER_TYPE, request, timeout_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert raised.value.retryable


async def test_the_clients_kafka_threads_yield_and_the_applications_do_not(
        stack_settings: Settings, workers: None) -> None:
    """ADR 0020: the client lowers its reader's librdkafka threads (the one that spins against
    noida), not its producer's (a request goes out at once); the application's own Kafka
    clients in the same process keep their priority."""
    application = Producer({"bootstrap.servers": stack_settings.kafka_bootstrap})
    await asyncio.to_thread(application.list_topics, timeout=10)  # its broker threads are up
    before = scheduling(kafka_thread_ids())
    async with SagaClient(stack_settings, [TRANSFER_TYPE], client_id="it-threads"):
        await lowered_since(before, stack_settings.kafka_thread_priority, all_of_them=False)
        assert unchanged(before)
    application.flush(0)


# ---------------------------------------------------------------- one transaction


async def _outcome_rows(engine: AsyncEngine, settings: Settings, saga_id: uuid.UUID
                        ) -> list[SagaOutcome]:
    async with engine.connect() as conn:
        values = (await conn.execute(text(
            "SELECT value FROM outbox WHERE saga_id = :s AND topic = :t ORDER BY id"),
            {"s": saga_id, "t": settings.topic(TOPIC_TRANSFER_EVENTS)})).scalars().all()
    return [SAGA_OUTCOME_ADAPTER.validate_json(bytes(v)) for v in values]


async def test_the_outcome_row_commits_with_the_terminal_event_or_not_at_all(
        rig: Rig) -> None:  # noqa: F811 (the fixture)
    [saga_id] = await rig.start()
    [screen] = await rig.commands(saga_id, "risk")
    [reserve] = await rig.commands(saga_id, "ledger")
    await rig.orchestrator.handle_batch([rig.reply(reserve, Outcome.FAILED)])
    # Both members of the group refused, nothing applied: this reply ends the saga.
    refusal = rig.reply(screen, Outcome.FAILED)
    # The database refuses the outcome's row: the batch must fail whole.
    async with rig.engine.begin() as conn:
        await conn.execute(text(
            "CREATE FUNCTION it_refuse_outcomes() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'it: no outcome rows'; END $$"))
        await conn.execute(text(
            "CREATE TRIGGER it_refuse_outcomes BEFORE INSERT ON outbox FOR EACH ROW"
            f" WHEN (NEW.topic = '{rig.settings.topic(TOPIC_TRANSFER_EVENTS)}')"
            " EXECUTE FUNCTION it_refuse_outcomes()"))

    with pytest.raises(StoreError):
        await rig.orchestrator.process_batch([refusal])

    state, _ = await rig.saga(saga_id)
    assert state.status is SagaStatus.RUNNING  # no terminal event without its outcome
    assert "SagaCompensated" not in await rig.types(saga_id)
    assert await _outcome_rows(rig.engine, rig.settings, saga_id) == []

    async with rig.engine.begin() as conn:
        await conn.execute(text("DROP TRIGGER it_refuse_outcomes ON outbox"))
    await rig.orchestrator.handle_batch([refusal])  # the same record, delivered again
    await rig.orchestrator.handle_batch([refusal])  # and once more: recorded, ended

    assert (await rig.types(saga_id))[-1] == "SagaCompensated"
    [row] = await _outcome_rows(rig.engine, rig.settings, saga_id)  # redelivered: no second
    assert (row.outcome, row.event_id) == ("compensated", outcome_event_id(saga_id))
    # keyed by the business key (a transfer id, which `on_topic` spells as a UUID)
    records = await rig.on_topic(rig.settings.topic(TOPIC_TRANSFER_EVENTS),
                                 uuid.UUID(row.business_key), 1)
    assert [SAGA_OUTCOME_ADAPTER.validate_json(r.value()) for r in records] == [row]


async def failed_saga(rig: Rig) -> uuid.UUID:  # noqa: F811 (the fixture's class)
    """A saga whose notify step (after the pivot) was refused: FAILED, for an operator."""
    [saga_id] = await rig.start()
    for participant, step in (("risk", "screen"), ("ledger", "reserve"), ("ledger", "credit"),
                              ("ledger", "settle")):
        command = next(c for c in await rig.commands(saga_id, participant) if c.step == step)
        await rig.orchestrator.handle_batch([rig.reply(command)])
    [notify] = await rig.commands(saga_id, "notify")
    await rig.orchestrator.handle_batch([rig.reply(notify, Outcome.FAILED)])
    return saga_id


async def test_a_failed_saga_publishes_failed_then_resolved_once(
        rig: Rig) -> None:  # noqa: F811 (the fixture)
    saga_id = await failed_saga(rig)

    [failed] = await _outcome_rows(rig.engine, rig.settings, saga_id)
    assert failed.outcome == "failed" and failed.step == "notify"
    assert failed.event_id == outcome_event_id(saga_id)

    async with rig.engine.begin() as conn:
        done = await resolve_saga(conn, rig.settings, APPLICATION.saga_types, saga_id,
                                  "it-operator", "INC-1: customer told by phone")
    with pytest.raises(OperatorActionRefused, match="RESOLVED"):
        async with rig.engine.begin() as conn:
            await resolve_saga(conn, rig.settings, APPLICATION.saga_types, saga_id,
                               "it-operator", "twice")

    state = await rig.assert_consistent(saga_id)
    assert state.status is SagaStatus.RESOLVED
    events = await rig.events(saga_id)
    assert (events[-1][0].type, events[-1][1]) == ("SagaResolved", "it-operator")
    rows = await _outcome_rows(rig.engine, rig.settings, saga_id)
    assert [r.outcome for r in rows] == ["failed", "resolved"]
    assert rows[1] == done.outcome
    assert rows[1].resolved_by == "it-operator"  # type: ignore[union-attr]
    assert rows[1].event_id == uuid.uuid5(saga_id, "outcome:resolved")


async def test_the_client_page_example_runs_as_written(harness: Harness) -> None:
    """docs/client.md's example, taken from the page and run against the real stack."""
    example = re.findall(r"```python\n(.*?)```", CLIENT_PAGE.read_text(), re.DOTALL)[0]
    namespace: dict[str, Any] = {}
    exec(compile(example, "docs/client.md", "exec"), namespace)
    source = await harness.open("src", "20.00")
    destination = await harness.open("dst", "0.00")
    fine = TransferRequested.model_validate(harness.request(source, destination, "2.00"))
    too_much = TransferRequested.model_validate(harness.request(source, destination, "99.00"))
    assert harness.settings.kafka_bootstrap

    said = [await namespace["move_money"](harness.settings.kafka_bootstrap,
                                          harness.settings.topic_prefix, request)
            for request in (fine, too_much)]

    assert said[0] == "done"
    assert said[1].startswith("turned back at reserve: INSUFFICIENT_FUNDS")


async def test_saga_resolve_closes_a_failed_saga_once_from_the_command_line(
        rig: Rig) -> None:  # noqa: F811 (the fixture)
    saga_id = await failed_saga(rig)
    state, _ = await rig.saga(saga_id)
    assert rig.settings.database_url and rig.settings.kafka_bootstrap
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")} | {
        "SAGA_DATABASE_URL": rig.settings.database_url,
        "SAGA_KAFKA_BOOTSTRAP": rig.settings.kafka_bootstrap,
        "SAGA_TOPIC_PREFIX": rig.settings.topic_prefix, "USER": "carol"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_saga(args, env, 60)

    first = await asyncio.to_thread(cli, "resolve", state.business_key, "--note",
                                    "INC-9: notified by phone", "--json")
    second = await asyncio.to_thread(cli, "resolve", str(saga_id), "--note", "again")

    assert first.returncode == 0, first.stderr
    said = json.loads(first.stdout)
    assert (said["status"], said["resolved_by"], said["saga_id"]) == (
        "RESOLVED", "carol", str(saga_id))
    assert said["outcome"]["outcome"] == "resolved"
    assert second.returncode == 2 and "only a FAILED saga" in second.stderr
    rows = await _outcome_rows(rig.engine, rig.settings, saga_id)
    assert [r.outcome for r in rows] == ["failed", "resolved"]
    assert (await rig.assert_consistent(saga_id)).status is SagaStatus.RESOLVED
