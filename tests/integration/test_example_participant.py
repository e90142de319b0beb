"""The card top-up example's participants (docs/examples/card_topup), written with the kit, run
as real workers of their own application on the real broker and PostgreSQL.

The application gets a database of its own (the engine's migrations and its own, not the
transfer's) and a topic prefix of its own. The test plays the orchestrator's part from the
outside: it publishes step commands to the participants' topics with a plain Kafka client,
reads the replies and the dead-letter topic, and checks the tables with its own SQL. The saga
run end to end (a start message in, the saga completed or compensated) is
`test_example_saga_end_to_end.py`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import card_topup
from card_topup.actions import cards, wallet
from card_topup.cards import add_card
from card_topup.messages import CardTopUpRequested
from card_topup.saga import CARD_TOPUP
from card_topup.wallet import open_wallet
from orchestrator.core import Action, command_id_for, participant_of
from orchestrator.kafka.consumer import participant_group
from orchestrator.participant import CANCELLED
from orchestrator.postgres.store import create_engine
from orchestrator.settings import Settings
from orchestrator.workers.runner import run_worker
from schemas import TOPIC_REPLIES, Direction, Outcome, StepCommand, StepReply, step_topic
from tests.integration.conftest import DeadLetterTap, database_of_its_own, workers_started

pytestmark = pytest.mark.integration

FORWARD, COMPENSATE = Direction.FORWARD, Direction.COMPENSATE
KINDS = ("relay", "participant:wallet", "participant:cards")
STEP_OF = {"hold": "hold", "release": "hold", "load": "load", "capture": "capture"}


class ReplyTap:
    """Every reply on the application's replies topic, read in the background from its start."""

    def __init__(self, settings: Settings) -> None:
        self.replies: list[StepReply] = []
        self._stop = threading.Event()
        self._consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap, "group.id": f"tap-{uuid.uuid4()}",
            "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        topic = settings.topic(TOPIC_REPLIES)
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.1)
            if message is not None and not message.error():
                self.replies.append(StepReply.model_validate_json(message.value() or b""))
        self._consumer.close()

    async def to(self, command: StepCommand, count: int = 1, timeout_s: float = 20
                 ) -> list[StepReply]:
        """The first `count` replies to `command` (each delivery of a command is answered)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [r for r in self.replies if r.command_id == command.command_id]
            if len(found) >= count:
                return found[:count]
            await asyncio.sleep(0.02)
        raise AssertionError(f"{count} replies to {command.step}/{command.direction} expected")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class TopUps:
    """The example application running: its settings, its database, what it published."""

    settings: Settings
    engine: AsyncEngine
    replies: ReplyTap
    dead_letters: DeadLetterTap
    producer: Producer
    run_id: str

    def name(self, what: str) -> str:
        return f"{what}-{self.run_id}-{uuid.uuid4().hex[:6]}"

    async def wallet(self, balance: str) -> str:
        wallet_id = self.name("w")
        async with self.engine.begin() as conn:
            await open_wallet(conn, wallet_id, "EUR", Decimal(balance))
        return wallet_id

    async def card(self, *, blocked: bool = False, issuer_online: bool = True) -> str:
        card_id = self.name("c")
        async with self.engine.begin() as conn:
            await add_card(conn, card_id, "EUR", blocked=blocked, issuer_online=issuer_online)
        return card_id

    def publish(self, participant: str, value: bytes, key: bytes | None = None) -> None:
        self.producer.produce(self.settings.topic(step_topic(participant)), value=value, key=key)
        assert self.producer.flush(10) == 0

    def send(self, command: StepCommand) -> None:
        """What the orchestrator's outbox relay does with a step command."""
        self.publish(participant_of(CARD_TOPUP, command), command.model_dump_json().encode(),
                     str(command.saga_id).encode())

    async def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        async with self.engine.connect() as conn:
            return [tuple(row) for row in (await conn.execute(text(sql), params)).all()]

    async def available(self, wallet_id: str) -> tuple[Decimal, Decimal]:
        """The wallet's balance and hold, summed by this test from the movements."""
        [(balance, held)] = await self.rows(
            "SELECT w.opening_balance + COALESCE(sum(m.balance_delta), 0),"
            " COALESCE(sum(m.hold_delta), 0) FROM topup_wallets w"
            " LEFT JOIN topup_wallet_movements m USING (wallet_id)"
            " WHERE w.wallet_id = :w GROUP BY w.wallet_id", w=wallet_id)
        return balance, held


def command(request: CardTopUpRequested, action: Action, direction: Direction = FORWARD,
            attempt: int = 1, saga_id: uuid.UUID | None = None) -> StepCommand:
    """A step command of top-up `request`, as the orchestrator would build it."""
    saga_id = saga_id or uuid.uuid5(uuid.NAMESPACE_URL, f"card_topup:{request.topup_id}")
    step = STEP_OF.get(action.name, action.name)
    return StepCommand(
        command_id=command_id_for(saga_id, step, direction, attempt), saga_id=saga_id,
        saga_type=CARD_TOPUP.name, step=step, action=action.name, direction=direction,
        attempt=attempt, deadline_at=datetime.now(UTC) + timedelta(seconds=10),
        payload=request.model_dump(mode="json"))


def topup(wallet_id: str, card_id: str, amount: str) -> CardTopUpRequested:
    return CardTopUpRequested(topup_id=uuid.uuid4(), wallet_id=wallet_id, card_id=card_id,
                              amount=Decimal(amount), currency="EUR", requested_by="it")


async def wait_until(check: Callable[[], Any], what: str, timeout_s: float = 20) -> Any:
    """The first truthy answer of `check` (a function, or a coroutine function)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} after {timeout_s}s")


@pytest.fixture(scope="module")
async def topups(stack_settings: Settings, engine: AsyncEngine) -> AsyncIterator[TopUps]:
    """The card top-up application with its relay and both participants running, in a database
    and under a topic prefix of its own."""
    run_id = uuid.uuid4().hex[:8]
    async with database_of_its_own(engine, stack_settings, "topup_it") as url:
        settings = stack_settings.model_copy(update={"database_url": url,
                                                     "topic_prefix": f"topup-{run_id}."})
        stop = asyncio.Event()
        tasks = [asyncio.create_task(run_worker(
            kind, settings.model_copy(update={"worker_name": f"topup-{kind}"}), stop,
            application=card_topup.APPLICATION), name=kind) for kind in KINDS]
        own = create_engine(url, pool_size=2)
        try:
            await workers_started(own, tasks, {f"topup-{kind}" for kind in KINDS})
            replies, dead_letters = ReplyTap(settings), DeadLetterTap(settings)
            producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0,
                                 "enable.idempotence": True})
            yield TopUps(settings, own, replies, dead_letters, producer, run_id)
            replies.close()
            dead_letters.close()
            producer.flush(5)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            await own.dispose()


async def test_the_application_has_its_own_tables_and_not_the_transfers(topups: TopUps) -> None:
    tables = {row[0] for row in await topups.rows(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}

    assert {"topup_wallets", "topup_wallet_movements", "topup_cards", "topup_card_loads",
            "participant_replies", "dead_letters", "outbox"} <= tables
    assert not {"accounts", "ledger_entries", "notifications"} & tables


async def test_a_hold_is_applied_once_and_its_stored_reply_replayed(topups: TopUps) -> None:
    wallet_id = await topups.wallet("60.00")
    request = topup(wallet_id, "any-card", "25.00")
    hold = command(request, wallet.HOLD)

    topups.send(hold)
    [first] = await topups.replies.to(hold)
    topups.send(hold)  # a redelivery, or the relay re-sending a row it did not see published
    [_, again] = await topups.replies.to(hold, 2)
    retry = command(request, wallet.HOLD, attempt=2)  # a later attempt of the same effect
    topups.send(retry)
    [later] = await topups.replies.to(retry)

    assert (first.participant, first.outcome, first.result, first.replayed) == (
        "wallet", Outcome.SUCCEEDED, {"held": "25.00"}, False)
    assert (again.reply_id, again.outcome, again.result, again.replayed) == (
        first.reply_id, Outcome.SUCCEEDED, {"held": "25.00"}, True)
    assert (later.command_id, later.attempt, later.result, later.replayed) == (
        retry.command_id, 2, {"held": "25.00"}, True)
    assert await topups.rows(
        "SELECT step, direction, balance_delta, hold_delta FROM topup_wallet_movements"
        " WHERE saga_id = :s", s=hold.saga_id) == [("hold", "forward", 0, Decimal("25.00"))]
    assert await topups.rows(
        "SELECT step, direction, participant, outcome FROM participant_replies"
        " WHERE saga_id = :s", s=hold.saga_id) == [("hold", "forward", "wallet", "succeeded")]
    assert await topups.available(wallet_id) == (Decimal("60.00"), Decimal("25.00"))


async def test_a_refusal_is_stored_and_stays_final(topups: TopUps) -> None:
    wallet_id = await topups.wallet("10.00")
    hold = command(topup(wallet_id, "any-card", "10.01"), wallet.HOLD)

    topups.send(hold)
    [refused] = await topups.replies.to(hold)
    topups.send(hold)
    [_, replayed] = await topups.replies.to(hold, 2)

    assert (refused.outcome, refused.code, refused.retryable, refused.reason) == (
        Outcome.FAILED, "INSUFFICIENT_FUNDS", False, "10.00 available, 10.01 needed")
    assert (replayed.outcome, replayed.code, replayed.replayed) == (
        Outcome.FAILED, "INSUFFICIENT_FUNDS", True)
    assert await topups.rows("SELECT count(*) FROM topup_wallet_movements WHERE saga_id = :s",
                             s=hold.saga_id) == [(0,)]


async def test_a_release_that_arrives_first_leaves_a_tombstone_for_the_late_hold(
        topups: TopUps) -> None:
    wallet_id = await topups.wallet("50.00")
    request = topup(wallet_id, "any-card", "5.00")
    hold, release = command(request, wallet.HOLD), command(request, wallet.RELEASE, COMPENSATE)

    topups.send(release)
    [undone] = await topups.replies.to(release)
    topups.send(hold)
    [late] = await topups.replies.to(hold)

    assert (undone.outcome, undone.replayed, undone.result) == (
        Outcome.SUCCEEDED, False, {"noop": "forward effect was never applied"})
    assert (late.outcome, late.code, late.retryable) == (Outcome.FAILED, CANCELLED, False)
    assert sorted(await topups.rows(
        "SELECT direction, outcome FROM participant_replies WHERE saga_id = :s",
        s=hold.saga_id)) == [("compensate", "succeeded"), ("forward", "failed")]
    assert await topups.rows("SELECT count(*) FROM topup_wallet_movements WHERE saga_id = :s",
                             s=hold.saga_id) == [(0,)]
    assert await topups.available(wallet_id) == (Decimal("50.00"), Decimal("0"))


async def test_a_topup_through_its_steps_and_one_turned_back_at_the_card(topups: TopUps) -> None:
    """The commands in the order the saga sends them: hold, load, capture for a card that
    loads; hold, load (refused for good), release for a blocked one."""
    wallet_id = await topups.wallet("100.00")
    good_card, blocked_card = await topups.card(), await topups.card(blocked=True)
    loaded, turned_back = topup(wallet_id, good_card, "30.00"), topup(wallet_id, blocked_card,
                                                                        "20.00")
    answers: dict[str, list[tuple[str, Outcome, str | None]]] = {}
    for request, actions in ((loaded, [(wallet.HOLD, FORWARD), (cards.LOAD, FORWARD),
                                       (wallet.CAPTURE, FORWARD)]),
                             (turned_back, [(wallet.HOLD, FORWARD), (cards.LOAD, FORWARD),
                                            (wallet.RELEASE, COMPENSATE)])):
        for action, direction in actions:
            step_command = command(request, action, direction)
            topups.send(step_command)
            [reply] = await topups.replies.to(step_command)
            answers.setdefault(request.card_id, []).append(
                (reply.participant, reply.outcome, reply.code))

    assert answers == {
        good_card: [("wallet", Outcome.SUCCEEDED, None), ("cards", Outcome.SUCCEEDED, None),
                     ("wallet", Outcome.SUCCEEDED, None)],
        blocked_card: [("wallet", Outcome.SUCCEEDED, None),
                       ("cards", Outcome.FAILED, "CARD_BLOCKED"),
                       ("wallet", Outcome.SUCCEEDED, None)]}
    # 30.00 left the wallet onto the card; the 20.00 held for the blocked card is free again.
    assert await topups.available(wallet_id) == (Decimal("70.00"), Decimal("0"))
    assert await topups.rows("SELECT card_id, amount FROM topup_card_loads WHERE card_id"
                             " IN (:a, :b)", a=good_card, b=blocked_card) == [
        (good_card, Decimal("30.00"))]


async def test_an_issuer_outage_is_retryable_and_leaves_nothing_behind(topups: TopUps) -> None:
    card_id = await topups.card(issuer_online=False)
    request = topup("any-wallet", card_id, "12.00")
    first = command(request, cards.LOAD)

    topups.send(first)
    [down] = await topups.replies.to(first)
    stored = await topups.rows("SELECT count(*) FROM participant_replies WHERE saga_id = :s",
                               s=first.saga_id)
    async with topups.engine.begin() as conn:
        await conn.execute(text("UPDATE topup_cards SET issuer_online = true WHERE card_id = :c"),
                           {"c": card_id})
    retry = command(request, cards.LOAD, attempt=2)  # the saga's retry after its backoff
    topups.send(retry)
    [up] = await topups.replies.to(retry)

    assert (down.outcome, down.code, down.retryable) == (Outcome.FAILED, "ISSUER_UNAVAILABLE",
                                                         True)
    assert stored == [(0,)]  # nothing happened, so nothing was stored: the retry decides afresh
    assert (up.outcome, up.result, up.replayed) == (Outcome.SUCCEEDED, {"loaded": "12.00"},
                                                    False)
    assert await topups.rows("SELECT amount FROM topup_card_loads WHERE saga_id = :s",
                             s=first.saga_id) == [(Decimal("12.00"),)]


async def test_bad_commands_are_dead_lettered_and_the_partition_goes_on(topups: TopUps) -> None:
    wallet_id = await topups.wallet("5.00")
    request = topup(wallet_id, "any-card", "1.00")
    # All keyed alike, so all on one partition, in this order.
    key = str(uuid.uuid4()).encode()
    malformed = b'{"command_id": "' + str(uuid.uuid4()).encode() + b'", "saga_id": '
    refund = command(request, Action("wallet", "refund"))  # no such handler
    hold = command(request, wallet.HOLD)

    topups.publish("wallet", malformed, key)
    topups.publish("wallet", refund.model_dump_json().encode(), key)
    topups.publish("wallet", hold.model_dump_json().encode(), key)
    [answered] = await topups.replies.to(hold)

    letters = await wait_until(lambda: topups.rows(
        "SELECT reason_code, stage, saga_id, reason FROM dead_letters WHERE payload IN (:a, :b)"
        " ORDER BY original_offset", a=malformed, b=refund.model_dump_json().encode()),
        "two dead letters")
    assert [row[:3] for row in letters] == [
        ("SCHEMA_VIOLATION", "participant:wallet", None),
        ("UNKNOWN_ACTION", "participant:wallet", refund.saga_id)]
    assert letters[1][3] == ("participant 'wallet' has no handler for the forward action"
                             " 'refund' (step 'refund' of a 'card_topup' saga)")
    # Both reach the dead-letter topic through the application's relay, with the reason.
    for value, code in ((malformed, "SCHEMA_VIOLATION"),
                        (refund.model_dump_json().encode(), "UNKNOWN_ACTION")):
        record = await wait_until(functools.partial(topups.dead_letters.find, value),
                                  f"{code} on the dead-letter topic")
        assert record["headers"]["dlq-reason-code"] == code
        assert record["headers"]["dlq-original-topic"] == topups.settings.topic(
            step_topic("wallet"))
    assert (answered.outcome, answered.result) == (Outcome.SUCCEEDED, {"held": "1.00"})
    assert [r for r in topups.replies.replies if r.saga_id == refund.saga_id
            and r.step == "refund"] == []


async def test_offsets_are_committed_once_the_replies_are_out(topups: TopUps) -> None:
    """After the replies, each participant group's committed offsets reach the end of its
    topic: nothing answered is read again by a restarted worker (and the stored replies make
    it harmless if it were)."""
    wallet_id = await topups.wallet("9.00")
    hold = command(topup(wallet_id, "any-card", "9.00"), wallet.HOLD)
    topups.send(hold)
    await topups.replies.to(hold)
    reader = Consumer({"bootstrap.servers": topups.settings.kafka_bootstrap,
                       "group.id": participant_group("wallet"), "enable.auto.commit": False})
    topic = topups.settings.topic(step_topic("wallet"))
    try:
        partitions = [TopicPartition(topic, p) for p in
                      reader.list_topics(topic, timeout=10).topics[topic].partitions]
        ends = {tp.partition: reader.get_watermark_offsets(tp, timeout=10)[1]
                for tp in partitions}

        async def caught_up() -> bool:
            committed = await asyncio.to_thread(reader.committed, partitions, 10)
            # A partition nothing was ever written to has no committed offset (negative).
            return all(max(tp.offset, 0) == ends[tp.partition] for tp in committed)

        assert sum(ends.values()) > 0
        assert await wait_until(caught_up, "the wallet group's offsets at the topic's end")
    finally:
        reader.close()
