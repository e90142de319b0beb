"""The outbox relay and the participant runtime's edge cases, on the real broker and PostgreSQL.

The relay tests write outbox rows as a crashed fast path or a participant would have left them and
watch the session's relay worker publish them (I6 end to end). The participant tests drive a
`ParticipantWorker` directly against the real database: `_apply` returns the replies without
producing them, `handle_batch` is the full path (transaction, dead letters, produce).

Ledger entries must belong to a known saga (I7), so a case that applies an effect uses a saga made
through the normal path and redelivers that saga's own commands; a case on a fresh saga id only
uses commands that create no entry.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import schemas
from orchestrator.core.saga import command_id_for
from orchestrator.kafka.consumer import Consumed, encode_headers
from orchestrator.kafka.producer import KafkaProducer
from orchestrator.participant import CANCELLED, Decided, ParticipantWorker
from orchestrator.postgres.store import json_value
from schemas import Direction, Outcome, StepCommand, StepReply, step_topic
from steps.ledger import LEDGER
from steps.notify import NOTIFY
from steps.risk import risk_participant
from steps.saga import TRANSFER
from tests.integration.conftest import DeadLetterTap, Harness, Isolated

pytestmark = pytest.mark.integration

FORWARD, COMPENSATE = Direction.FORWARD, Direction.COMPENSATE


# ----------------------------------------------------------------------------------- helpers

@pytest.fixture
async def ledger_worker(harness: Harness) -> AsyncIterator[ParticipantWorker]:
    producer = KafkaProducer(harness.settings, f"it-direct-ledger-{uuid.uuid4().hex[:6]}")
    worker = ParticipantWorker(harness.settings, harness.engine, LEDGER, producer)
    yield worker
    await worker.close()
    producer.close()


def step_command(saga_id: uuid.UUID, step: str, action: str, direction: Direction,
                 payload: dict[str, Any], attempt: int = 1) -> StepCommand:
    return StepCommand(
        command_id=command_id_for(saga_id, step, direction, attempt), saga_id=saga_id,
        saga_type=TRANSFER.name, step=step, action=action, direction=direction, attempt=attempt,
        deadline_at=datetime.now(UTC) + timedelta(seconds=10), payload=payload)


def transfer_payload(source: str, destination: str, amount: str) -> dict[str, Any]:
    return {"source_account": source, "destination_account": destination, "amount": amount,
            "currency": "EUR"}


def release_for(reserve: StepCommand) -> StepCommand:
    """The compensation of a reserve command, as the orchestrator would build it."""
    return reserve.model_copy(update={
        "command_id": command_id_for(reserve.saga_id, reserve.step, COMPENSATE, 1),
        "direction": COMPENSATE, "action": "release", "attempt": 1})


async def finished_transfer(harness: Harness, source_balance: str, amount: str,
                            expected_status: str) -> tuple[Any, str, str]:
    source = await harness.open("src", source_balance)
    destination = await harness.open("dst", "0.00")
    request = harness.request(source, destination, amount)
    harness.publish(request)
    saga = await harness.wait_terminal(request["transfer_id"])
    assert saga.status == expected_status, saga.state
    return saga, source, destination


async def ledger_commands(harness: Harness, saga_id: Any) -> list[StepCommand]:
    """The saga's own ledger step commands, as the orchestrator wrote them to the outbox."""
    async with harness.engine.connect() as conn:
        values = (await conn.execute(text(
            "SELECT value FROM outbox WHERE saga_id = :s AND topic LIKE '%saga.steps.ledger%'"
            " ORDER BY id"), {"s": saga_id})).scalars().all()
    return [StepCommand.model_validate_json(bytes(value)) for value in values]


async def screen_command(harness: Harness, saga_id: Any) -> StepCommand:
    """The saga's own screening command, as the orchestrator wrote it to the outbox."""
    async with harness.engine.connect() as conn:
        [value] = (await conn.execute(text(
            "SELECT value FROM outbox WHERE saga_id = :s AND topic = :t"),
            {"s": saga_id, "t": harness.settings.topic(step_topic("risk"))})).scalars()
    return StepCommand.model_validate_json(bytes(value))


async def stored_replies(harness: Harness, saga_id: Any) -> dict[tuple[str, str], dict[str, Any]]:
    async with harness.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT step, direction, reply FROM participant_replies"
            " WHERE saga_id = :s AND participant = 'ledger'"), {"s": saga_id})).all()
    return {(row.step, row.direction): json_value(row.reply) for row in rows}


def consumed(worker: ParticipantWorker, value: bytes, partition: int, offset: int,
             key: bytes | None = None) -> Consumed:
    return Consumed(topic=worker.topic, partition=partition, offset=offset, key=key, value=value,
                    headers=(("type", b"StepCommand"),), timestamp_ms=None)


def unused_offset() -> int:
    """An offset no real record of this session has, so derived dead-letter ids never collide
    with the session workers' own."""
    return 10**12 + uuid.uuid4().int % 10**12


class ReplyReader:
    """Reads the real replies topic from its current end (assigned: no group join)."""

    def __init__(self, harness: Harness) -> None:
        self.topic = harness.settings.topic(schemas.TOPIC_REPLIES)
        self._consumer = Consumer({
            "bootstrap.servers": harness.settings.kafka_bootstrap,
            "group.id": f"replies-{uuid.uuid4()}", "enable.auto.commit": False,
            "fetch.wait.max.ms": 5})
        partitions = self._consumer.list_topics(self.topic, timeout=10).topics[
            self.topic].partitions
        starts = []
        for p in partitions:
            _low, high = self._consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=10)
            starts.append(TopicPartition(self.topic, p, high))
        self._consumer.assign(starts)

    def wait_for(self, command_id: uuid.UUID, timeout_s: float = 20) -> StepReply:
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                message = self._consumer.poll(0.1)
                if message is None or message.error():
                    continue
                reply = StepReply.model_validate_json(message.value())
                if reply.command_id == command_id:
                    return reply
            raise AssertionError(f"no reply to {command_id} on {self.topic} in {timeout_s}s")
        finally:
            self._consumer.close()


async def wait_tapped(dlq_tap: DeadLetterTap, value: bytes, timeout_s: float = 20
                      ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = dlq_tap.find(value)
        if record is not None:
            return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"{value[:60]!r} never reached the dead-letter topic")


# -------------------------------------------------------------------------------------- relay

async def _insert_stale_outbox_row(harness: Harness, value: bytes, key: bytes | None,
                                   headers: list[list[str]]) -> int:
    async with harness.engine.begin() as conn:
        return int((await conn.execute(text(
            "INSERT INTO outbox (topic, key, value, headers, created_at, published_at)"
            " VALUES (:t, :k, :v, CAST(:h AS jsonb), now() - interval '5 seconds', NULL)"
            " RETURNING id"),
            {"t": harness.settings.topic(schemas.TOPIC_DEAD_LETTERS), "k": key, "v": value,
             "h": json.dumps(headers)})).scalar_one())


async def _wait_published(harness: Harness, row_id: int, timeout_s: float = 20) -> datetime:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with harness.engine.connect() as conn:
            published_at = (await conn.execute(text(
                "SELECT published_at FROM outbox WHERE id = :id"), {"id": row_id})).scalar_one()
        if published_at is not None:
            return published_at  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError(f"outbox row {row_id} still unpublished after {timeout_s}s")


async def test_relay_publishes_what_the_fast_path_left_behind(
        harness: Harness, dlq_tap: DeadLetterTap) -> None:
    value = f"left behind by a crashed fast path {uuid.uuid4()}".encode()
    row_id = await _insert_stale_outbox_row(harness, value, None, [])

    published_at = await _wait_published(harness, row_id)
    record = await wait_tapped(dlq_tap, value)

    assert record["value"] == value
    assert record["headers"] == {}
    async with harness.engine.connect() as conn:
        created_at = (await conn.execute(text(
            "SELECT created_at FROM outbox WHERE id = :id"), {"id": row_id})).scalar_one()
    assert published_at > created_at
    await harness.assert_invariants()


async def test_relay_keeps_the_rows_key_and_headers(harness: Harness,
                                                    dlq_tap: DeadLetterTap) -> None:
    value = f"with headers {uuid.uuid4()}".encode()
    headers = [("message-id", b"m-1"), ("type", b"DeadLetter"), ("dlq-reason-code", b"TEST")]
    row_id = await _insert_stale_outbox_row(harness, value, b"some-key", encode_headers(headers))

    await _wait_published(harness, row_id)
    record = await wait_tapped(dlq_tap, value)

    assert record["headers"] == {"message-id": "m-1", "type": "DeadLetter",
                                 "dlq-reason-code": "TEST"}
    await harness.assert_invariants()


async def test_relay_leaves_fresh_rows_to_the_fast_path(harness: Harness) -> None:
    """Inside its grace period a row belongs to the fast path; the relay takes it only after."""
    value = f"fresh {uuid.uuid4()}".encode()
    async with harness.engine.begin() as conn:
        row_id = (await conn.execute(text(
            "INSERT INTO outbox (topic, value, created_at) VALUES (:t, :v, now() + interval"
            " '2 seconds') RETURNING id"),
            {"t": harness.settings.topic(schemas.TOPIC_DEAD_LETTERS), "v": value})).scalar_one()
    # Several relay passes (every ~0.2 s) go by while the row is younger than the grace.
    await asyncio.sleep(1.0)
    async with harness.engine.connect() as conn:
        assert (await conn.execute(text("SELECT published_at FROM outbox WHERE id = :id"),
                                   {"id": row_id})).scalar_one() is None
    assert await _wait_published(harness, row_id) is not None
    await harness.assert_invariants()


# ------------------------------------------------------------------------- participant runtime

async def test_redelivered_forward_commands_get_their_stored_replies(
        harness: Harness, ledger_worker: ParticipantWorker) -> None:
    saga, source, destination = await finished_transfer(harness, "100.00", "20.00", "COMPLETED")
    commands = await ledger_commands(harness, saga.saga_id)
    assert [(c.step, c.direction) for c in commands] == [
        ("reserve", FORWARD), ("credit", FORWARD), ("settle", FORWARD)]
    entries_before = await harness.entries(saga.saga_id)
    stored = await stored_replies(harness, saga.saga_id)

    replies = await ledger_worker._apply(commands, [])

    assert [(r.command_id, r.step, r.outcome, r.replayed) for r in replies] == [
        (c.command_id, c.step, Outcome.SUCCEEDED, True) for c in commands]
    assert [r.result for r in replies] == [stored[(c.step, "forward")]["result"]
                                           for c in commands]
    # A later attempt of the same effect (a new command id) is answered the same way, addressed
    # to that attempt.
    retry = commands[0].model_copy(update={
        "attempt": 2, "command_id": command_id_for(saga.saga_id, "reserve", FORWARD, 2)})
    [again] = await ledger_worker._apply([retry], [])
    assert (again.command_id, again.attempt, again.outcome, again.replayed) == (
        retry.command_id, 2, Outcome.SUCCEEDED, True)
    assert again.reply_id == uuid.uuid5(retry.command_id, "reply")
    assert await harness.entries(saga.saga_id) == entries_before
    assert await stored_replies(harness, saga.saga_id) == stored
    assert await harness.balances(source, destination) == {
        source: (Decimal("80.00"), Decimal("0")), destination: (Decimal("20.00"), Decimal("0"))}
    await harness.assert_invariants()


async def test_compensation_before_its_forward_effect_cancels_the_late_forward(
        harness: Harness, ledger_worker: ParticipantWorker) -> None:
    source = await harness.open("src", "50.00")
    destination = await harness.open("dst", "0.00")
    saga_id = uuid.uuid4()
    reserve = step_command(saga_id, "reserve", "reserve", FORWARD,
                           transfer_payload(source, destination, "5.00"))
    release = release_for(reserve)

    [undone] = await ledger_worker._apply([release], [])
    [late] = await ledger_worker._apply([reserve], [])
    [redelivered] = await ledger_worker._apply([release], [])

    assert (undone.outcome, undone.replayed) == (Outcome.SUCCEEDED, False)
    assert "noop" in undone.result
    assert (late.command_id, late.outcome, late.code) == (
        reserve.command_id, Outcome.FAILED, CANCELLED)
    assert late.retryable is False
    assert (redelivered.outcome, redelivered.replayed) == (Outcome.SUCCEEDED, True)
    assert await harness.entries(saga_id) == []
    assert (await harness.balances(source))[source] == (Decimal("50.00"), Decimal("0"))
    await harness.assert_invariants()


async def test_compensating_a_refused_forward_step_is_a_noop(
        harness: Harness, ledger_worker: ParticipantWorker) -> None:
    saga, source, _ = await finished_transfer(harness, "3.00", "7.50", "COMPENSATED")
    [reserve] = await ledger_commands(harness, saga.saga_id)
    assert (reserve.step, reserve.direction) == ("reserve", FORWARD)
    stored = await stored_replies(harness, saga.saga_id)
    assert list(stored) == [("reserve", "forward")]
    assert stored[("reserve", "forward")]["code"] == "INSUFFICIENT_FUNDS"
    release = release_for(reserve)

    [first] = await ledger_worker._apply([release], [])
    [second] = await ledger_worker._apply([release], [])
    twins = await ledger_worker._apply([release, release], [])
    [forward_again] = await ledger_worker._apply([reserve], [])

    assert (first.outcome, first.replayed) == (Outcome.SUCCEEDED, False)
    assert "noop" in first.result
    assert (second.outcome, second.replayed) == (Outcome.SUCCEEDED, True)
    assert [(r.outcome, r.replayed) for r in twins] == [(Outcome.SUCCEEDED, True)] * 2
    # The refusal stays final: no tombstone replaced it.
    assert (forward_again.outcome, forward_again.code, forward_again.replayed) == (
        Outcome.FAILED, "INSUFFICIENT_FUNDS", True)
    assert set(await stored_replies(harness, saga.saga_id)) == {
        ("reserve", "forward"), ("reserve", "compensate")}
    assert await harness.entries(saga.saga_id) == []
    assert (await harness.balances(source))[source] == (Decimal("3.00"), Decimal("0"))
    await harness.assert_invariants()


async def test_malformed_command_is_dead_lettered_and_the_batch_goes_on(
        harness: Harness, ledger_worker: ParticipantWorker, dlq_tap: DeadLetterTap) -> None:
    saga, source, destination = await finished_transfer(harness, "40.00", "15.00", "COMPLETED")
    good = (await ledger_commands(harness, saga.saga_id))[0]
    entries_before = await harness.entries(saga.saga_id)
    bad = b'{"command_id": "' + str(uuid.uuid4()).encode() + b'", "saga_id": '
    offset = unused_offset()
    reader = await asyncio.to_thread(ReplyReader, harness)

    await ledger_worker.handle_batch([
        consumed(ledger_worker, bad, 0, offset, key=b"k"),
        consumed(ledger_worker, good.model_dump_json().encode(), 0, offset + 1,
                 key=str(saga.saga_id).encode()),
    ])

    letter = await harness.wait_dead_letter(bad)
    assert (letter.stage, letter.reason_code) == ("participant:ledger", "SCHEMA_VIOLATION")
    assert (letter.original_topic, letter.original_partition, letter.original_offset) == (
        ledger_worker.topic, 0, offset)
    assert letter.reason.startswith("not a StepCommand")
    # The good command behind it was answered (from its stored reply) on the real replies topic.
    reply = await asyncio.to_thread(reader.wait_for, good.command_id)
    assert (reply.saga_id, reply.step, reply.outcome, reply.replayed) == (
        saga.saga_id, "reserve", Outcome.SUCCEEDED, True)
    # The participant's dead letter reaches the dead-letter topic through the relay.
    record = await wait_tapped(dlq_tap, bad)
    assert record["headers"]["dlq-reason-code"] == "SCHEMA_VIOLATION"
    assert record["headers"]["dlq-original-topic"] == ledger_worker.topic
    assert await harness.entries(saga.saga_id) == entries_before
    assert await harness.balances(source, destination) == {
        source: (Decimal("25.00"), Decimal("0")), destination: (Decimal("15.00"), Decimal("0"))}
    await harness.assert_invariants()


async def test_a_command_without_a_handler_is_dead_lettered_and_the_batch_goes_on(
        harness: Harness, ledger_worker: ParticipantWorker, dlq_tap: DeadLetterTap) -> None:
    """A command for an action the participant does not handle (here in a direction it does not
    handle it either) is dead-lettered with UNKNOWN_ACTION and its saga id, never decided; the
    command beside it is answered."""
    saga, source, destination = await finished_transfer(harness, "40.00", "15.00", "COMPLETED")
    good = (await ledger_commands(harness, saga.saga_id))[0]
    entries_before = await harness.entries(saga.saga_id)
    unknown = step_command(uuid.uuid4(), "reserve", "teleport", FORWARD,
                           transfer_payload(source, destination, "1.00"))
    backwards = step_command(uuid.uuid4(), "settle", "settle", COMPENSATE,
                             transfer_payload(source, destination, "1.00"))
    offset = unused_offset()
    reader = await asyncio.to_thread(ReplyReader, harness)

    await ledger_worker.handle_batch([
        consumed(ledger_worker, unknown.model_dump_json().encode(), 0, offset),
        consumed(ledger_worker, good.model_dump_json().encode(), 0, offset + 1),
        consumed(ledger_worker, backwards.model_dump_json().encode(), 0, offset + 2),
    ])

    for refused, wording in ((unknown, "forward action 'teleport'"),
                             (backwards, "compensation 'settle'")):
        letter = await harness.wait_dead_letter(refused.model_dump_json().encode())
        assert (letter.stage, letter.reason_code, letter.saga_id) == (
            "participant:ledger", "UNKNOWN_ACTION", refused.saga_id)
        assert letter.error_class == "participant.ledger.UNKNOWN_ACTION"
        assert f"participant 'ledger' has no handler for the {wording}" in letter.reason
        record = await wait_tapped(dlq_tap, refused.model_dump_json().encode())
        assert record["headers"]["dlq-reason-code"] == "UNKNOWN_ACTION"
        assert record["headers"]["dlq-saga-id"] == str(refused.saga_id)
        assert await stored_replies(harness, refused.saga_id) == {}
    reply = await asyncio.to_thread(reader.wait_for, good.command_id)
    assert (reply.saga_id, reply.outcome, reply.replayed) == (saga.saga_id, Outcome.SUCCEEDED,
                                                              True)
    assert await harness.entries(saga.saga_id) == entries_before
    await harness.assert_invariants()


async def test_a_poison_command_is_set_aside_and_the_partition_goes_on(
        harness: Harness, ledger_worker: ParticipantWorker, dlq_tap: DeadLetterTap) -> None:
    """A command that parses but makes the participant raise (its payload lacks the transfer's
    fields) would be redelivered forever and block its partition; it is set aside after three
    tries with PROCESSING_FAILED, and the good command in the same batch is answered."""
    saga, _source, _destination = await finished_transfer(harness, "40.00", "15.00", "COMPLETED")
    good = (await ledger_commands(harness, saga.saga_id))[0]
    poison = step_command(uuid.uuid4(), "reserve", "reserve", FORWARD, {"note": "no fields"})
    poison_bytes = poison.model_dump_json().encode()
    offset = unused_offset()
    reader = await asyncio.to_thread(ReplyReader, harness)

    await ledger_worker.handle_batch([
        consumed(ledger_worker, poison_bytes, 1, offset, key=str(poison.saga_id).encode()),
        consumed(ledger_worker, good.model_dump_json().encode(), 1, offset + 1,
                 key=str(saga.saga_id).encode()),
    ])

    letter = await harness.wait_dead_letter(poison_bytes)
    assert (letter.stage, letter.reason_code, letter.attempts) == (
        "participant:ledger", "PROCESSING_FAILED", 3)
    assert letter.error_class.startswith("participant:ledger.")
    assert letter.first_failed_at <= letter.last_failed_at
    assert (letter.original_partition, letter.original_offset) == (1, offset)
    reply = await asyncio.to_thread(reader.wait_for, good.command_id)
    assert (reply.saga_id, reply.outcome, reply.replayed) == (saga.saga_id, Outcome.SUCCEEDED,
                                                              True)
    record = await wait_tapped(dlq_tap, poison_bytes)
    assert record["headers"]["dlq-reason-code"] == "PROCESSING_FAILED"
    assert record["headers"]["dlq-attempts"] == "3"
    # Nothing of the poison touched money: no entry, no stored reply for its saga.
    assert await harness.entries(poison.saga_id) == []
    assert await stored_replies(harness, poison.saga_id) == {}
    await harness.assert_invariants()


# ----------------------------------------------------------- regressions of bugs these found

@pytest.mark.parametrize("order", ["forward_first", "compensation_first"])
async def test_forward_and_its_compensation_in_one_batch(
        harness: Harness, ledger_worker: ParticipantWorker, order: str) -> None:
    # forward_first: the reserve is refused (too little money), so a correct runtime makes no
    # entry either way; compensation_first: the late reserve must be cancelled, not applied.
    source = await harness.open("src", "2.00" if order == "forward_first" else "50.00")
    destination = await harness.open("dst", "0.00")
    saga_id = uuid.uuid4()
    reserve = step_command(saga_id, "reserve", "reserve", FORWARD,
                           transfer_payload(source, destination, "5.00"))
    release = release_for(reserve)
    batch = [reserve, release] if order == "forward_first" else [release, reserve]

    replies = await ledger_worker._apply(batch, [])

    by_direction = {r.direction: r for r in replies}
    assert by_direction[COMPENSATE].outcome is Outcome.SUCCEEDED
    assert by_direction[FORWARD].outcome is Outcome.FAILED
    assert by_direction[FORWARD].code == (
        "INSUFFICIENT_FUNDS" if order == "forward_first" else CANCELLED)
    assert await harness.entries(saga_id) == []
    await harness.assert_invariants()


async def test_malformed_commands_on_two_partitions_are_two_dead_letters(
        harness: Harness, ledger_worker: ParticipantWorker, dlq_tap: DeadLetterTap) -> None:
    offset = unused_offset()
    bad = [f'{{"not a command": "{uuid.uuid4()}"'.encode() for _ in range(2)]

    await ledger_worker.handle_batch([consumed(ledger_worker, bad[0], 0, offset),
                                      consumed(ledger_worker, bad[1], 1, offset)])

    # Both are on the dead-letter topic...
    for value in bad:
        await wait_tapped(dlq_tap, value)
    # ...and both must be in the table operators redrive from.
    async with harness.engine.connect() as conn:
        recorded = (await conn.execute(text(
            "SELECT payload FROM dead_letters WHERE original_topic = :t AND original_offset = :o"),
            {"t": ledger_worker.topic, "o": offset})).scalars().all()
    assert sorted(bytes(p) for p in recorded) == sorted(bad)
    await harness.assert_invariants()


async def test_a_redelivered_screen_replays_its_stored_reply_even_while_the_provider_is_down(
        harness: Harness) -> None:
    """A command answered before gets its stored reply, even when answering it afresh would be
    a retryable refusal (which is never stored: a later attempt must be free to try again)."""
    saga, _, _ = await finished_transfer(harness, "10.00", "1.00", "COMPLETED")
    screen = await screen_command(harness, saga.saga_id)
    producer = KafkaProducer(harness.settings, f"it-direct-risk-{uuid.uuid4().hex[:6]}")
    down = harness.settings.model_copy(update={"risk_failure_rate": 1.0})
    risk = ParticipantWorker(down, harness.engine, risk_participant(down), producer)
    try:
        [replayed] = await risk._apply([screen], [])
        fresh = step_command(uuid.uuid4(), "screen", "screen", FORWARD, screen.payload)
        [refused] = await risk._apply([fresh], [])
    finally:
        await risk.close()
        producer.close()
    assert (replayed.outcome, replayed.replayed, replayed.retryable) == (
        Outcome.SUCCEEDED, True, False)
    assert (refused.outcome, refused.retryable, refused.code) == (
        Outcome.FAILED, True, "PROVIDER_UNAVAILABLE")
    async with harness.engine.connect() as conn:
        assert (await conn.execute(text(
            "SELECT count(*) FROM participant_replies WHERE saga_id = :s"),
            {"s": fresh.saga_id})).scalar() == 0  # a retryable refusal leaves no reply


# ------------------------------------------------------------ participant fast path (ADR 0006)

async def test_the_fast_path_writes_nothing_for_a_batch_answered_before(
        harness: Harness, ledger_worker: ParticipantWorker) -> None:
    """The fast path does not read the stored replies first: an effect that has one makes the
    single write fail whole, and the batch is left to the careful path."""
    saga, source, destination = await finished_transfer(harness, "100.00", "20.00", "COMPLETED")
    commands = await ledger_commands(harness, saga.saga_id)
    entries_before = await harness.entries(saga.saga_id)
    stored = await stored_replies(harness, saga.saga_id)

    assert await ledger_worker._answer_fast(commands, []) is None

    assert await harness.entries(saga.saga_id) == entries_before
    assert await stored_replies(harness, saga.saga_id) == stored
    assert await harness.balances(source, destination) == {
        source: (Decimal("80.00"), Decimal("0")), destination: (Decimal("20.00"), Decimal("0"))}
    await harness.assert_invariants()


async def test_a_fast_path_collision_leaves_the_new_effects_of_its_batch_unwritten(
        harness: Harness) -> None:
    """One answered effect in a batch: the new one beside it is not written by the failed fast
    path, and the careful path then answers the new one afresh and replays the old one."""
    saga, _, _ = await finished_transfer(harness, "10.00", "1.00", "COMPLETED")
    answered = await screen_command(harness, saga.saga_id)
    fresh = step_command(uuid.uuid4(), "screen", "screen", FORWARD, answered.payload)
    producer = KafkaProducer(harness.settings, f"it-fast-risk-{uuid.uuid4().hex[:6]}")
    risk = ParticipantWorker(harness.settings, harness.engine, risk_participant(harness.settings),
                             producer)
    try:
        collided = await risk._answer_fast([fresh, answered], [])
        async with harness.engine.connect() as conn:
            fresh_replies_after_collision = (await conn.execute(text(
                "SELECT count(*) FROM participant_replies WHERE saga_id = :s"),
                {"s": fresh.saga_id})).scalar()
        careful = await risk._apply([fresh, answered], [])
        fast_again = await risk._answer_fast([fresh], [])
    finally:
        await risk.close()
        producer.close()

    assert collided is None
    assert fresh_replies_after_collision == 0
    assert [(r.command_id, r.outcome, r.replayed) for r in careful] == [
        (fresh.command_id, Outcome.SUCCEEDED, False),
        (answered.command_id, Outcome.SUCCEEDED, True)]
    assert fast_again is None  # now stored, so the fast path collides on it too
    await harness.assert_invariants()


async def test_the_fast_path_writes_an_effect_and_its_reply_together(harness: Harness) -> None:
    saga_id = uuid.uuid4()
    command = step_command(saga_id, "notify", "send", FORWARD,
                           {**transfer_payload("a", "dst-1", "2.50"), "reference": "rent"})
    producer = KafkaProducer(harness.settings, f"it-fast-notify-{uuid.uuid4().hex[:6]}")
    notify = ParticipantWorker(harness.settings, harness.engine, NOTIFY, producer)
    try:
        replies = await notify._answer_fast([command], [])
    finally:
        await notify.close()
        producer.close()

    assert replies is not None
    [reply] = replies
    assert (reply.command_id, reply.outcome, reply.replayed) == (
        command.command_id, Outcome.SUCCEEDED, False)
    async with harness.engine.connect() as conn:
        notification = (await conn.execute(text(
            "SELECT recipient, message FROM notifications WHERE saga_id = :s"),
            {"s": saga_id})).one()
        stored = (await conn.execute(text(
            "SELECT direction, outcome FROM participant_replies WHERE saga_id = :s"),
            {"s": saga_id})).all()
    assert tuple(notification) == ("dst-1", "received 2.50 EUR (rent)")
    assert [tuple(row) for row in stored] == [("forward", "succeeded")]


async def test_a_compensation_never_takes_the_fast_path(
        harness: Harness, ledger_worker: ParticipantWorker) -> None:
    """A compensation depends on its forward effect's stored reply, which the fast path does
    not read: a batch holding one is answered on the careful path only."""
    source = await harness.open("src", "50.00")
    destination = await harness.open("dst", "0.00")
    reserve = step_command(uuid.uuid4(), "reserve", "reserve", FORWARD,
                           transfer_payload(source, destination, "5.00"))

    assert await ledger_worker._answer_fast([release_for(reserve)], []) is None
    assert await stored_replies(harness, reserve.saga_id) == {}


# The ledger's fence is shown in a database of its own: these cases write entries for sagas that
# do not exist, which the session database's invariant checks (I7) would rightly refuse.

class ReadThenRace:
    """The real ledger, with another writer's batch run between its read and its write, once.
    A participant of the runtime's low-level protocol, wrapping the kit's ledger: the protocol
    stays open to a participant that decides a whole batch itself."""

    def __init__(self, meanwhile: Callable[[], Awaitable[object]], locks: bool = False) -> None:
        self.meanwhile: Callable[[], Awaitable[object]] | None = meanwhile
        self.name, self.effects, self.locks = LEDGER.name, LEDGER.effects, locks

    async def read(self, conn: Any, commands: Any, now: datetime, *, lock: bool) -> Any:
        view = await LEDGER.read(conn, commands, now, lock=lock)
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            await meanwhile()
        return view

    def decide(self, commands: Any, view: Any, now: datetime) -> list[Decided]:
        return LEDGER.decide(commands, view, now)

    def unhandled(self, command: StepCommand) -> str | None:
        return LEDGER.unhandled(command)


async def test_a_ledger_write_decided_from_an_outdated_balance_collides_on_the_fence(
        isolated: Isolated) -> None:
    """Two reserves of 8.00 on an account holding 10.00. The second writer read the account
    before the first wrote: its fast path collides on the account's fence and writes nothing,
    and the careful path, reading again under the lock, refuses it. Without the fence both
    holds would be written and the available balance would be -6.00."""
    h = isolated.harness
    source = await h.open("src", "10.00")
    destination = await h.open("dst", "0.00")
    first = step_command(uuid.uuid4(), "reserve", "reserve", FORWARD,
                         transfer_payload(source, destination, "8.00"))
    second = step_command(uuid.uuid4(), "reserve", "reserve", FORWARD,
                          transfer_payload(source, destination, "8.00"))
    producer = KafkaProducer(h.settings, f"it-fence-{uuid.uuid4().hex[:6]}")
    other = ParticipantWorker(h.settings, isolated.engine, LEDGER, producer)
    first_replies: list[StepReply] | None = None

    async def first_writer() -> None:
        nonlocal first_replies
        first_replies = await other._answer_fast([first], [])

    racing = ParticipantWorker(h.settings, isolated.engine, ReadThenRace(first_writer), producer)
    try:
        collided = await racing._answer_fast([second], [])
        [refused] = await racing._apply([second], [])
    finally:
        await racing.close()
        await other.close()
        producer.close()

    assert first_replies is not None and first_replies[0].outcome is Outcome.SUCCEEDED
    assert collided is None
    assert (refused.outcome, refused.code) == (Outcome.FAILED, "INSUFFICIENT_FUNDS")
    assert await h.balances(source) == {source: (Decimal("10.00"), Decimal("8.00"))}
    async with isolated.engine.connect() as conn:
        fences = (await conn.execute(text(
            "SELECT saga_id, fence_account, fence_seq FROM ledger_entries ORDER BY fence_seq"
        ))).all()
    assert [tuple(row) for row in fences] == [(first.saga_id, source, 1)]


async def test_a_participant_that_locks_holds_its_read_locks_until_its_fast_write(
        isolated: Isolated) -> None:
    h = isolated.harness
    source = await h.open("src", "10.00")
    destination = await h.open("dst", "0.00")
    command = step_command(uuid.uuid4(), "reserve", "reserve", FORWARD,
                           transfer_payload(source, destination, "4.00"))
    refused: list[str] = []

    async def another_writer_tries_the_account() -> None:
        with pytest.raises(DBAPIError) as error:
            async with isolated.engine.begin() as conn:
                await conn.execute(text("SELECT 1 FROM accounts WHERE account_id = :a"
                                        " FOR UPDATE NOWAIT"), {"a": source})
        refused.append(str(getattr(error.value.orig, "sqlstate", None)))

    producer = KafkaProducer(h.settings, f"it-locks-{uuid.uuid4().hex[:6]}")
    # The ledger as a participant that declares `locks`: its fast path must hold what `read`
    # locked until its write, in one transaction.
    worker = ParticipantWorker(h.settings, isolated.engine,
                               ReadThenRace(another_writer_tries_the_account, locks=True),
                               producer)
    try:
        replies = await worker._answer_fast([command], [])
    finally:
        await worker.close()
        producer.close()

    assert replies is not None and replies[0].outcome is Outcome.SUCCEEDED
    assert refused == ["55P03"]  # lock_not_available: the fast path's transaction held it
    assert await h.balances(source) == {source: (Decimal("10.00"), Decimal("4.00"))}


async def test_the_database_refuses_an_unfenced_entry_and_a_reused_fence(
        isolated: Isolated) -> None:
    h = isolated.harness
    source = await h.open("src", "10.00")
    insert = text(
        "INSERT INTO ledger_entries (saga_id, step, direction, currency, amount, hold_account,"
        " hold_delta, fence_account, fence_seq, fence_balance, fence_held, fence_settled_total)"
        " VALUES (:saga, 'reserve', 'forward', 'EUR', 1, :account, 1, :fence, :seq, 10, :held,"
        " 0)")
    async with isolated.engine.begin() as conn:
        await conn.execute(insert, {"saga": uuid.uuid4(), "account": source, "fence": source,
                                    "seq": 1, "held": 1})
    refused = {}
    for case, fence, seq, held in (("reused", source, 1, 2), ("unfenced", None, None, 2),
                                   ("foreign account", "someone-else", 2, 2),
                                   ("without running totals", source, 2, None)):
        with pytest.raises(DBAPIError) as error:
            async with isolated.engine.begin() as conn:
                await conn.execute(insert, {"saga": uuid.uuid4(), "account": source,
                                            "fence": fence, "seq": seq, "held": held})
        refused[case] = type(error.value.orig).__name__
    assert refused == {"reused": "UniqueViolationError", "unfenced": "CheckViolationError",
                       "foreign account": "CheckViolationError",
                       "without running totals": "CheckViolationError"}
