"""The second saga type, end to end: the card top-up application (docs/examples/card_topup) run
by the engine's own workers (orchestrator, relay, recovery and its two participants) on the real
broker and PostgreSQL, in a database and under a topic prefix of its own.

The test uses only what an upstream team has: it publishes `CardTopUpRequested` records to the
type's start topic with a plain Kafka client (or the engine's `SagaClient`) and checks the
outcome with its own SQL and on the type's events topic.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import card_topup
from card_topup import CARD_TOPUP_TYPE
from card_topup.cards import add_card
from card_topup.messages import START_TOPIC, CardTopUpRequested
from card_topup.wallet import open_wallet
from orchestrator.client import SagaClient
from orchestrator.core import outcome_event_id
from orchestrator.ops.queries import render_timeline, timeline
from orchestrator.postgres.store import create_engine
from orchestrator.settings import Settings
from orchestrator.workers.runner import run_worker
from schemas import SAGA_OUTCOME_ADAPTER
from tests.integration.conftest import database_of_its_own, workers_started
from tests.integration.test_example_participant import wait_until

pytestmark = pytest.mark.integration

APPLICATION = card_topup.APPLICATION


@dataclass
class Running:
    settings: Settings
    engine: AsyncEngine
    producer: Producer
    run_id: str

    async def wallet(self, balance: str) -> str:
        wallet_id = f"w-{self.run_id}-{uuid.uuid4().hex[:6]}"
        async with self.engine.begin() as conn:
            await open_wallet(conn, wallet_id, "EUR", Decimal(balance))
        return wallet_id

    async def card(self, *, blocked: bool = False) -> str:
        card_id = f"c-{self.run_id}-{uuid.uuid4().hex[:6]}"
        async with self.engine.begin() as conn:
            await add_card(conn, card_id, "EUR", blocked=blocked)
        return card_id

    def request(self, topup_id: uuid.UUID, wallet_id: str, card_id: str, amount: str) -> bytes:
        """A start message as an upstream service writes it: JSON, the amount as a string."""
        return (f'{{"topup_id": "{topup_id}", "wallet_id": "{wallet_id}", "card_id": "{card_id}",'
                f' "amount": "{amount}", "currency": "EUR", "requested_by": "e2e"}}').encode()

    def publish(self, value: bytes, key: str) -> None:
        self.producer.produce(self.settings.topic(START_TOPIC), value=value, key=key.encode())
        assert self.producer.flush(10) == 0

    async def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        async with self.engine.connect() as conn:
            return [tuple(row) for row in (await conn.execute(text(sql), params)).all()]

    async def saga(self, topup_id: uuid.UUID) -> tuple[Any, ...] | None:
        found = await self.rows(
            "SELECT status, definition_version FROM sagas"
            " WHERE saga_type = 'card_topup' AND business_key = :key", key=str(topup_id))
        return found[0] if found else None

    async def ended(self, topup_id: uuid.UUID) -> str | None:
        saga = await self.saga(topup_id)
        return saga[0] if saga and saga[0] in ("COMPLETED", "COMPENSATED", "REJECTED",
                                               "FAILED") else None

    async def wallet_totals(self, wallet_id: str) -> tuple[Decimal, Decimal]:
        [(balance, held)] = await self.rows(
            "SELECT w.opening_balance + COALESCE(sum(m.balance_delta), 0),"
            " COALESCE(sum(m.hold_delta), 0) FROM topup_wallets w"
            " LEFT JOIN topup_wallet_movements m USING (wallet_id)"
            " WHERE w.wallet_id = :w GROUP BY w.wallet_id", w=wallet_id)
        return balance, held

    async def dead_letter_codes(self, topup_id: uuid.UUID) -> list[str]:
        return [row[0] for row in await self.rows(
            "SELECT reason_code FROM dead_letters WHERE saga_type = 'card_topup'"
            " AND business_key = :key ORDER BY last_failed_at", key=str(topup_id))]


@pytest.fixture(scope="module")
async def running(stack_settings: Settings, engine: AsyncEngine) -> AsyncIterator[Running]:
    run_id = uuid.uuid4().hex[:8]
    async with database_of_its_own(engine, stack_settings, "topup_e2e") as url:
        settings = stack_settings.model_copy(update={
            "database_url": url, "topic_prefix": f"topup-e2e-{run_id}.",
            "application": "card_topup:APPLICATION"})
        kinds = APPLICATION.worker_kinds
        stop = asyncio.Event()
        # The application is named by the settings, as a deployment names it.
        tasks = [asyncio.create_task(run_worker(
            kind, settings.model_copy(update={"worker_name": f"e2e-{kind}"}), stop), name=kind)
            for kind in kinds]
        own = create_engine(url, pool_size=2)
        try:
            await workers_started(own, tasks, {f"e2e-{kind}" for kind in kinds})
            producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0,
                                 "enable.idempotence": True})
            yield Running(settings, own, producer, run_id)
            producer.flush(5)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            await own.dispose()


async def test_a_top_up_completes_and_moves_the_money_once(running: Running) -> None:
    wallet_id, card_id = await running.wallet("100.00"), await running.card()
    topup_id = uuid.uuid4()
    request = running.request(topup_id, wallet_id, card_id, "30.00")

    running.publish(request, str(topup_id))
    running.publish(request, str(topup_id))  # an upstream retry: the same request again

    assert await wait_until(lambda: running.ended(topup_id), "the top-up ended") == "COMPLETED"
    assert await running.saga(topup_id) == ("COMPLETED", 1)
    assert await running.wallet_totals(wallet_id) == (Decimal("70.00"), 0)
    loads = await running.rows("SELECT amount FROM topup_card_loads WHERE card_id = :c",
                               c=card_id)
    assert loads == [(Decimal("30.00"),)]  # one load, for the one saga both copies map to
    assert await running.rows(
        "SELECT count(*) FROM sagas WHERE business_key = :key", key=str(topup_id)) == [(1,)]
    events = [row[0] for row in await running.rows(
        "SELECT e.type FROM saga_events e JOIN sagas s USING (saga_id)"
        " WHERE s.business_key = :key ORDER BY e.seq", key=str(topup_id))]
    assert events == ["SagaStarted", "StepStarted", "StepSucceeded", "StepStarted",
                      "StepSucceeded", "StepStarted", "StepSucceeded", "SagaCompleted"]

    shown = await timeline(running.engine, str(topup_id), sagas=APPLICATION.saga_types)
    assert shown["saga_type"] == "card_topup" and shown["status"] == "COMPLETED"
    assert "SagaCompleted" in render_timeline(shown)


async def test_a_blocked_card_turns_the_top_up_back(running: Running) -> None:
    wallet_id, card_id = await running.wallet("50.00"), await running.card(blocked=True)
    topup_id = uuid.uuid4()

    running.publish(running.request(topup_id, wallet_id, card_id, "20.00"), str(topup_id))

    assert await wait_until(lambda: running.ended(topup_id), "the top-up ended") == "COMPENSATED"
    assert await running.wallet_totals(wallet_id) == (Decimal("50.00"), 0)  # hold released
    assert await running.rows("SELECT count(*) FROM topup_card_loads WHERE card_id = :c",
                              c=card_id) == [(0,)]


async def test_bad_and_conflicting_requests_are_refused_with_their_reason(
        running: Running) -> None:
    wallet_id, card_id = await running.wallet("40.00"), await running.card()
    first, bad = uuid.uuid4(), uuid.uuid4()
    running.publish(running.request(first, wallet_id, card_id, "10.00"), str(first))
    assert await wait_until(lambda: running.ended(first), "the top-up ended") == "COMPLETED"

    # The same top-up id with another amount: refused, the first top-up unchanged.
    running.publish(running.request(first, wallet_id, card_id, "11.00"), str(first))
    # An amount with more decimals than the currency has: refused at intake, never started.
    running.publish(running.request(bad, wallet_id, card_id, "1.005"), str(bad))

    assert await wait_until(lambda: running.ended(bad), "the bad request refused") == "REJECTED"
    assert await wait_until(lambda: running.dead_letter_codes(first), "the conflict letter") == [
        "CONFLICTING_DUPLICATE"]
    assert await running.dead_letter_codes(bad) == ["INVALID_AMOUNT"]
    assert await running.saga(first) == ("COMPLETED", 1)
    assert await running.wallet_totals(wallet_id) == (Decimal("30.00"), 0)


async def test_an_upstream_service_submits_with_the_client_and_hears_the_same_outcome_twice(
        running: Running) -> None:
    wallet_id, card_id = await running.wallet("25.00"), await running.card()
    request = CardTopUpRequested(topup_id=uuid.uuid4(), wallet_id=wallet_id, card_id=card_id,
                                 amount=Decimal("5.00"), currency="EUR", requested_by="e2e")

    async with SagaClient(running.settings, [CARD_TOPUP_TYPE], client_id="e2e") as client:
        first = await client.submit(CARD_TOPUP_TYPE, request, timeout_s=30)
        again = await client.submit(CARD_TOPUP_TYPE, request, timeout_s=30)

    assert first.outcome == "completed" and first.saga_type == "card_topup"
    assert first.business_key == str(request.topup_id)
    assert again == first
    assert await running.wallet_totals(wallet_id) == (Decimal("20.00"), 0)  # moved once


async def test_every_top_up_that_ended_has_exactly_one_outcome_event_on_its_topic(
        running: Running) -> None:
    """Read back with a plain consumer, as an upstream service would: every saga of this
    database that ended (the other tests' too) has one outcome event, keyed by its top-up id,
    whatever else (answers to conflicting requests, copies) the topic holds."""
    wallet_id, card_id = await running.wallet("10.00"), await running.card(blocked=True)
    turned_back = uuid.uuid4()
    running.publish(running.request(turned_back, wallet_id, card_id, "4.00"), str(turned_back))
    assert await wait_until(lambda: running.ended(turned_back), "ended") == "COMPENSATED"
    ended = {uuid.UUID(str(saga_id)): (key, status) for saga_id, key, status in await running.rows(
        "SELECT saga_id, business_key, status FROM sagas WHERE status NOT IN"
        " ('RUNNING', 'COMPENSATING')")}
    topic = running.settings.topic(CARD_TOPUP_TYPE.events_topic)
    assert topic.endswith("card_topup.events.v1")  # the default: no events topic was named

    def read_all() -> list[Any]:
        consumer = Consumer({"bootstrap.servers": running.settings.kafka_bootstrap,
                             "group.id": f"e2e-outcomes-{uuid.uuid4()}",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records, quiet_since = [], time.monotonic()
        while time.monotonic() - quiet_since < 2.0:
            message = consumer.poll(0.1)
            if message is not None and not message.error():
                records.append(message)
                quiet_since = time.monotonic()
        consumer.close()
        return records

    records = await asyncio.to_thread(read_all)

    outcomes = [(r.key().decode(), SAGA_OUTCOME_ADAPTER.validate_json(r.value()))
                for r in records]
    for saga_id, (key, status) in ended.items():
        mine = {o.event_id: o for k, o in outcomes
                if o.event_id == outcome_event_id(saga_id) and k == key}
        assert len(mine) == 1, (key, status, mine)
        [outcome] = mine.values()
        assert outcome.outcome == status.lower()
    assert {o.saga_id for _, o in outcomes} <= set(ended)  # none for a saga still running
