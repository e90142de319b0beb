"""The recovery worker (`orchestrator/workers/recovery.py`) and `decide_due`, on the real
PostgreSQL and the real broker.

Each test gets a database of its own on the session's PostgreSQL server (copied from a migrated
template) and a topic prefix of its own. The session's workers never see these sagas: its
recovery worker would act on them by the real clock, and the passes here, run at chosen times
ahead of the clock, would otherwise take every other test's in-flight sagas too (and send their
commands to this prefix's topics). Nobody consumes these step topics, so a test alone decides
what is answered and when: it hands intake records and replies it built to
`OrchestratorWorker.handle_batch`, and runs `RecoveryWorker.recover_once(now=...)` at explicit
times. What was sent is read back from the outbox and from the topics themselves.
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator import metrics as saga_metrics
from orchestrator.core.saga import (
    SagaState,
    SagaStatus,
    command_id_for,
    fold,
    saga_id_for,
)
from orchestrator.dev.processes import WorkerProcesses
from orchestrator.errors import ConcurrencyConflict
from orchestrator.kafka.consumer import Consumed, ensure_topics
from orchestrator.kafka.producer import KafkaProducer
from orchestrator.postgres.store import create_engine, json_value, migrate, parse_event
from orchestrator.settings import Settings
from orchestrator.workers.recovery import RecoveryPass, RecoveryWorker
from orchestrator.workers.saga_worker import OrchestratorWorker
from schemas import (
    TOPIC_DEAD_LETTERS,
    TOPIC_REPLIES,
    TOPIC_TRANSFER_COMMANDS,
    Direction,
    Outcome,
    SagaEvent,
    StepCommand,
    StepReply,
    StepRetryScheduled,
    StepStarted,
    StepTimedOut,
    step_topic,
)
from steps import APPLICATION
from steps.saga import TRANSFER
from tests.integration.conftest import admin, database_url

pytestmark = pytest.mark.integration

FORWARD, COMPENSATE = Direction.FORWARD, Direction.COMPENSATE
SCREEN_TIMEOUT = timedelta(seconds=TRANSFER.step("screen").timeout_s)
RESERVE_TIMEOUT = timedelta(seconds=TRANSFER.step("reserve").timeout_s)
TICK = timedelta(microseconds=1)


# ------------------------------------------------------------------------------- metrics

@pytest.fixture(scope="session")
def metric_reader() -> InMemoryMetricReader:
    """The process's SDK meter provider, with a reader to sum counters from. The API accepts a
    global provider once per process, so counts are read as deltas around an action."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.set_meter_provider(provider)
    if metrics.get_meter_provider() is not provider:
        pytest.fail("another test set the global MeterProvider first: share its reader through "
                    "a session fixture in tests/integration/conftest.py")
    return reader


def counter_total(reader: InMemoryMetricReader, name: str, **attributes: str) -> int:
    data = reader.get_metrics_data()
    total = 0
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    found = point.attributes or {}
                    if all(found.get(k) == v for k, v in attributes.items()):
                        total += int(point.value)  # type: ignore[union-attr]
    return total


# -------------------------------------------------------------------- isolated database

@pytest.fixture(scope="module")
async def template_db(stack_settings: Settings, engine: AsyncEngine) -> AsyncIterator[str]:
    """A migrated, empty database that each test's database is copied from."""
    name = f"it_recovery_template_{uuid.uuid4().hex[:8]}"
    await admin(engine, f'CREATE DATABASE "{name}"')
    template = create_engine(database_url(stack_settings, name))
    await migrate(template, APPLICATION.migrations)
    await template.dispose()
    yield name
    await admin(engine, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- the rig

class TopicTap:
    """Every record of one topic from its beginning (assigned: no group join).

    It reads until it has what the caller waits for and then one poll comes back empty; it does
    not stop at the broker's high watermark, which the embedded broker reports too low after a
    batch of several records (measured: 3 records in one batch on an empty partition, high
    watermark 1), so a read that stops there misses the end of that batch.
    """

    def __init__(self, settings: Settings, topic: str) -> None:
        self._consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                                   "group.id": f"it-recovery-tap-{uuid.uuid4()}",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self.records: list[Any] = []

    def _read(self, key: bytes, at_least: int, timeout_s: float) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._consumer.poll(0.05)
            if message is not None and not message.error():
                self.records.append(message)
                continue
            mine = [r for r in self.records if r.key() == key]
            if len(mine) >= at_least or time.monotonic() > deadline:
                return sorted(mine, key=lambda r: r.offset())  # one key: one partition

    async def read(self, key: bytes, at_least: int, timeout_s: float = 10.0) -> list[Any]:
        """The records with `key`, in offset order, once there are `at_least` of them (or
        what there is after `timeout_s`)."""
        return await asyncio.to_thread(self._read, key, at_least, timeout_s)

    def close(self) -> None:
        self._consumer.close()


@dataclass
class Rig:
    settings: Settings
    engine: AsyncEngine
    producer: KafkaProducer
    orchestrator: OrchestratorWorker
    recovery: RecoveryWorker
    offsets: Iterator[int]
    taps: dict[str, TopicTap] = field(default_factory=dict)

    def topic(self, participant: str) -> str:
        return self.settings.topic(step_topic(participant))

    def intake(self, transfer_id: uuid.UUID) -> Consumed:
        body = {"transfer_id": str(transfer_id), "source_account": "it-recovery-src",
                "destination_account": "it-recovery-dst", "amount": "12.34",
                "currency": "EUR", "reference": "recovery test", "requested_by": "pytest"}
        return Consumed(topic=self.settings.topic(TOPIC_TRANSFER_COMMANDS), partition=0,
                        offset=next(self.offsets), key=str(transfer_id).encode(),
                        value=json.dumps(body).encode(), headers=(),
                        timestamp_ms=int(time.time() * 1000))

    def reply(self, command: StepCommand, outcome: Outcome = Outcome.SUCCEEDED,
              retryable: bool = False, reply_id: uuid.UUID | None = None) -> Consumed:
        """A participant's reply to `command`; its id derived as a participant derives it."""
        failed = outcome is Outcome.FAILED
        reply = StepReply(
            reply_id=reply_id or uuid.uuid5(command.command_id, "reply"),
            command_id=command.command_id, saga_id=command.saga_id, step=command.step,
            direction=command.direction, attempt=command.attempt, participant="it",
            outcome=outcome, retryable=retryable,
            code=("IT_UNAVAILABLE" if retryable else "IT_REFUSED") if failed else None,
            reason="refused by the test" if failed else None)
        return Consumed(topic=self.settings.topic(TOPIC_REPLIES), partition=0,
                        offset=next(self.offsets), key=str(command.saga_id).encode(),
                        value=reply.model_dump_json().encode(),
                        headers=(("type", b"StepReply"),), timestamp_ms=None)

    async def start(self, count: int = 1) -> list[uuid.UUID]:
        """Start `count` sagas in one batch (so their deadlines are equal)."""
        transfer_ids = [uuid.uuid4() for _ in range(count)]
        await self.orchestrator.handle_batch([self.intake(t) for t in transfer_ids])
        return [saga_id_for("transfer", str(t)) for t in transfer_ids]

    async def saga(self, saga_id: uuid.UUID) -> tuple[SagaState, Any]:
        async with self.engine.connect() as conn:
            row = (await conn.execute(text(
                "SELECT status, version, due_at, deadline_at, state FROM sagas"
                " WHERE saga_id = :s"), {"s": saga_id})).one()
        return SagaState.from_json(json_value(row.state)), row

    async def events(self, saga_id: uuid.UUID) -> list[tuple[SagaEvent, str]]:
        """The saga's events and their actors, after checking that `seq` is 1..n."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT seq, payload, actor FROM saga_events WHERE saga_id = :s ORDER BY seq"),
                {"s": saga_id})).all()
        assert [row.seq for row in rows] == list(range(1, len(rows) + 1))
        return [(parse_event(row.payload), row.actor) for row in rows]

    async def types(self, saga_id: uuid.UUID) -> list[str]:
        return [event.type for event, _actor in await self.events(saga_id)]

    async def assert_consistent(self, saga_id: uuid.UUID) -> SagaState:
        """The projection is the fold of the gapless event log, and `due_at` follows it."""
        state, row = await self.saga(saga_id)
        folded = fold(event for event, _actor in await self.events(saga_id))
        assert folded == state
        assert row.version == state.version
        assert row.status == state.status.value
        assert row.due_at == state.due_at
        return state

    async def commands(self, saga_id: uuid.UUID, participant: str) -> list[StepCommand]:
        """The saga's step commands in the outbox, oldest first."""
        async with self.engine.connect() as conn:
            values = (await conn.execute(text(
                "SELECT value FROM outbox WHERE saga_id = :s AND topic = :t ORDER BY id"),
                {"s": saga_id, "t": self.topic(participant)})).scalars().all()
        return [StepCommand.model_validate_json(bytes(value)) for value in values]

    async def on_topic(self, topic: str, saga_id: uuid.UUID, at_least: int) -> list[Any]:
        if topic not in self.taps:
            self.taps[topic] = await asyncio.to_thread(TopicTap, self.settings, topic)
        return await self.taps[topic].read(str(saga_id).encode(), at_least)

    async def published(self, saga_id: uuid.UUID, participant: str, at_least: int
                        ) -> list[StepCommand]:
        """The saga's step commands on the participant's topic, in offset order, once there
        are `at_least` of them (so an extra one shows up as a difference, a missing one too)."""
        records = await self.on_topic(self.topic(participant), saga_id, at_least)
        return [StepCommand.model_validate_json(r.value()) for r in records]

    async def verdicts(self, message_id: str) -> list[str]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(text(
                "SELECT verdict FROM inbox WHERE consumer = 'orchestrator'"
                " AND message_id = :m"), {"m": message_id})).scalars())

    async def time_out(self, saga_id: uuid.UUID, worker: RecoveryWorker | None = None
                       ) -> RecoveryPass:
        """Run a pass exactly at the saga's due time."""
        state, _row = await self.saga(saga_id)
        assert state.due_at is not None
        return await (worker or self.recovery).recover_once(now=state.due_at)


async def new_rig(stack_settings: Settings, engine: AsyncEngine, template: str
                  ) -> tuple[Rig, str]:
    database = f"it_recovery_{uuid.uuid4().hex[:10]}"
    await admin(engine, f'CREATE DATABASE "{database}" TEMPLATE "{template}"')
    settings = stack_settings.model_copy(update={
        "database_url": database_url(stack_settings, database),
        "topic_prefix": f"it-recovery-{uuid.uuid4().hex[:8]}.", "worker_name": ""})
    await asyncio.to_thread(ensure_topics, settings)
    assert settings.database_url
    rig_engine = create_engine(settings.database_url)
    producer = KafkaProducer(settings, "it-recovery-rig")
    orchestrator = OrchestratorWorker(
        settings.model_copy(update={"worker_name": "it-orchestrator"}), rig_engine, producer,
        APPLICATION.sagas)
    recovery = RecoveryWorker(settings.model_copy(update={"worker_name": "it-recovery"}),
                              rig_engine, producer, APPLICATION.sagas)
    return Rig(settings, rig_engine, producer, orchestrator, recovery,
               itertools.count(10**12 + uuid.uuid4().int % 10**9)), database


@pytest.fixture
async def rig(stack_settings: Settings, engine: AsyncEngine, template_db: str
              ) -> AsyncIterator[Rig]:
    made, database = await new_rig(stack_settings, engine, template_db)
    yield made
    for tap in made.taps.values():
        tap.close()
    await made.orchestrator.close()
    await made.recovery.marker.close()
    made.producer.close()
    await made.engine.dispose()
    await admin(engine, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def only(events: Sequence[tuple[SagaEvent, str]], kind: type[Any]) -> list[Any]:
    return [event for event, _actor in events if isinstance(event, kind)]


async def reserve_running(rig: Rig) -> tuple[uuid.UUID, StepCommand]:
    """A saga whose screen succeeded and whose reserve command is outstanding."""
    [saga_id] = await rig.start()
    [screen] = await rig.commands(saga_id, "risk")
    await rig.orchestrator.handle_batch([rig.reply(screen)])
    [reserve] = await rig.commands(saga_id, "ledger")
    assert (reserve.step, reserve.direction, reserve.attempt) == ("reserve", FORWARD, 1)
    return saga_id, reserve


# ---------------------------------------------------------------------------- the tests

async def test_an_unanswered_command_is_resent_under_the_same_id_once_its_deadline_passed(
        rig: Rig, metric_reader: InMemoryMetricReader) -> None:
    [saga_id] = await rig.start()
    state, row = await rig.saga(saga_id)
    # screen and reserve run in parallel: both commands went out at once, with equal deadlines
    [screen] = await rig.commands(saga_id, "risk")
    [reserve] = await rig.commands(saga_id, "ledger")
    assert (screen.step, screen.attempt, screen.command_id) == ("screen", 1, state.command_id)
    assert (reserve.step, reserve.attempt) == ("reserve", 1)
    deadline = state.deadline_at
    assert deadline is not None and row.due_at == deadline == reserve.deadline_at

    early = await rig.recovery.recover_once(now=deadline - TICK)
    assert (early.scanned, early.acted) == (0, 0)
    assert await rig.types(saga_id) == ["SagaStarted", "StepStarted", "StepStarted"]

    resends = counter_total(metric_reader, "saga.recovery.actions", action="resend")
    done = await rig.recovery.recover_once(now=deadline)  # due at the deadline itself
    assert (done.scanned, done.resent, done.retried, done.gave_up) == (1, 2, 0, 0)
    assert counter_total(metric_reader, "saga.recovery.actions", action="resend") - resends == 2

    events = await rig.events(saga_id)
    assert [e.type for e, _ in events] == ["SagaStarted", "StepStarted", "StepStarted",
                                           "StepTimedOut", "StepTimedOut"]
    assert {actor for _, actor in events[-2:]} == {"it-recovery"}
    assert [e for e, _ in events[-2:]] == [
        StepTimedOut(step=c.step, direction=FORWARD, attempt=1, command_id=c.command_id,
                     resend=1, deadline_at=deadline + SCREEN_TIMEOUT) for c in (screen, reserve)]
    state = await rig.assert_consistent(saga_id)
    assert state.command_id == screen.command_id and state.resends == 1
    assert [(r.step, r.command_id, r.resends) for r in state.runs] == [
        ("screen", screen.command_id, 1), ("reserve", reserve.command_id, 1)]
    _state, row = await rig.saga(saga_id)
    assert row.due_at == row.deadline_at == deadline + SCREEN_TIMEOUT

    for participant, command in (("risk", screen), ("ledger", reserve)):
        resent = command.model_copy(update={"deadline_at": deadline + SCREEN_TIMEOUT})
        assert await rig.commands(saga_id, participant) == [command, resent]
        assert await rig.published(saga_id, participant, 2) == [command, resent]

    again = await rig.recovery.recover_once(now=deadline + SCREEN_TIMEOUT - TICK)
    assert again.acted == 0 and len(await rig.events(saga_id)) == 5


async def test_a_reply_to_the_resent_command_is_applied_once(rig: Rig) -> None:
    [saga_id] = await rig.start()
    [command] = await rig.commands(saga_id, "risk")
    [reserve] = await rig.commands(saga_id, "ledger")
    assert (await rig.time_out(saga_id)).resent == 2  # screen and reserve

    # The participant answers the re-sent command: the same command id, so the same reply id.
    reply = rig.reply(command)
    await rig.orchestrator.handle_batch([reply])
    assert await rig.types(saga_id) == ["SagaStarted", "StepStarted", "StepStarted",
                                        "StepTimedOut", "StepTimedOut", "StepSucceeded"]
    message_id = f"reply:{uuid.uuid5(command.command_id, 'reply')}"
    assert await rig.verdicts(message_id) == ["applied"]
    state = await rig.assert_consistent(saga_id)
    # reserve, its sibling, is still out: the saga waits on it alone
    assert (state.step, state.attempt, state.resends) == ("reserve", 1, 1)

    # A second copy (the participant also answered the original send) is skipped by the inbox;
    # one with another reply id for the same command is stale. Neither changes the saga.
    copy_ = rig.reply(command)
    other = rig.reply(command, reply_id=uuid.uuid4())
    await rig.orchestrator.handle_batch([copy_])
    await rig.orchestrator.handle_batch([other])
    assert await rig.verdicts(message_id) == ["applied"]
    assert await rig.verdicts(f"reply:{json.loads(other.value)['reply_id']}") == ["stale"]
    assert len(await rig.events(saga_id)) == 6
    assert await rig.assert_consistent(saga_id) == state

    # The screen's re-sent deadline no longer matters: the saga is due at reserve's.
    resent_reserve = reserve.deadline_at + RESERVE_TIMEOUT
    assert state.due_at == resent_reserve
    assert (await rig.recovery.recover_once(now=resent_reserve - TICK)).acted == 0
    await rig.orchestrator.handle_batch([rig.reply(reserve)])
    [_reserve, _resent, credit] = await rig.commands(saga_id, "ledger")
    assert credit.step == "credit"
    assert (await rig.assert_consistent(saga_id)).due_at == credit.deadline_at
    assert len(await rig.published(saga_id, "ledger", 3)) == 3
    assert len(await rig.published(saga_id, "risk", 2)) == 2


async def test_a_screen_that_never_answers_releases_the_hold_and_ends_compensated(
        rig: Rig) -> None:
    [saga_id] = await rig.start()
    [command] = await rig.commands(saga_id, "risk")
    [reserve] = await rig.commands(saga_id, "ledger")
    await rig.orchestrator.handle_batch([rig.reply(reserve)])  # the hold is placed
    passes = [await rig.time_out(saga_id) for _ in range(3)]
    assert [(p.resent, p.gave_up) for p in passes] == [(1, 0), (1, 0), (0, 1)]

    # The budget is 3 sends of the one attempt; screening has no effect, the hold is released.
    [_reserve, release] = await rig.commands(saga_id, "ledger")
    assert (release.step, release.direction, release.action) == ("reserve", COMPENSATE,
                                                                 "release")
    await rig.orchestrator.handle_batch([rig.reply(release)])
    events = await rig.events(saga_id)
    assert [e.type for e, _ in events] == [
        "SagaStarted", "StepStarted", "StepStarted", "StepSucceeded", "StepTimedOut",
        "StepTimedOut", "StepTimedOut", "StepStarted", "StepCompensated", "SagaCompensated"]
    timeouts = only(events, StepTimedOut)
    assert [(t.resend, t.gave_up, t.command_id) for t in timeouts] == [
        (1, False, command.command_id), (2, False, command.command_id),
        (2, True, command.command_id)]
    state = await rig.assert_consistent(saga_id)
    assert state.status is SagaStatus.COMPENSATED and state.due_at is None
    assert state.failed_step == "screen"
    assert len(await rig.published(saga_id, "risk", 3)) == 3
    assert await rig.published(saga_id, "ledger", 2) == [reserve, release]


async def test_a_members_retry_waits_in_the_database_while_its_sibling_stays_out(
        rig: Rig) -> None:
    [saga_id] = await rig.start()
    [screen] = await rig.commands(saga_id, "risk")
    [reserve] = await rig.commands(saga_id, "ledger")

    await rig.orchestrator.handle_batch([rig.reply(screen, Outcome.FAILED, retryable=True)])

    [scheduled] = only(await rig.events(saga_id), StepRetryScheduled)
    assert (scheduled.step, scheduled.attempt) == ("screen", 2)
    state = await rig.assert_consistent(saga_id)
    _state, row = await rig.saga(saga_id)
    # due at the earlier of the retry and reserve's deadline; the row shows the retry
    assert row.due_at == scheduled.not_before < reserve.deadline_at
    assert (state.step, state.next_attempt_at, row.deadline_at) == (
        "screen", scheduled.not_before, None)

    done = await rig.recovery.recover_once(now=scheduled.not_before)

    assert (done.retried, done.resent, done.gave_up) == (1, 0, 0)
    [_first, second] = await rig.commands(saga_id, "risk")
    assert (second.attempt, second.command_id) == (2, command_id_for(saga_id, "screen",
                                                                     FORWARD, 2))
    assert await rig.commands(saga_id, "ledger") == [reserve]  # untouched
    await rig.orchestrator.handle_batch([rig.reply(second), rig.reply(reserve)])
    state = await rig.assert_consistent(saga_id)
    assert (state.step, state.applied) == ("credit", ("screen", "reserve"))


async def test_a_broker_loss_re_sends_every_members_command(rig: Rig) -> None:
    """After a broker loss each in-flight saga's commands go out again as they were: for a
    saga in its parallel group, one per member still out."""
    running, answered = await rig.start(2)
    [screen] = await rig.commands(answered, "risk")
    await rig.orchestrator.handle_batch([rig.reply(screen)])  # only reserve is out there
    expected = [*await rig.commands(running, "risk"), *await rig.commands(running, "ledger"),
                *await rig.commands(answered, "ledger")]

    resent = await rig.recovery.restore_after_broker_loss(datetime.now(UTC))

    assert resent == 3
    assert await rig.published(running, "risk", 2) == [expected[0]] * 2
    assert await rig.published(running, "ledger", 2) == [expected[1]] * 2
    assert await rig.published(answered, "ledger", 2) == [expected[2]] * 2
    assert await rig.types(running) == ["SagaStarted", "StepStarted", "StepStarted"]


async def test_a_reserve_that_never_answers_is_released_and_a_release_that_never_answers_fails(
        rig: Rig, metric_reader: InMemoryMetricReader) -> None:
    saga_id, _reserve = await reserve_running(rig)
    passes = [await rig.time_out(saga_id) for _ in range(3)]
    assert [(p.resent, p.gave_up) for p in passes] == [(1, 0), (1, 0), (0, 1)]

    # Its outcome is unknown, so reserve counts as applied and its compensation starts.
    state = await rig.assert_consistent(saga_id)
    assert (state.status, state.step, state.direction) == (SagaStatus.COMPENSATING, "reserve",
                                                           COMPENSATE)
    assert state.applied == ("screen", "reserve")
    ledger = await rig.commands(saga_id, "ledger")
    assert [(c.action, c.direction, c.attempt) for c in ledger] == [
        ("reserve", FORWARD, 1)] * 3 + [("release", COMPENSATE, 1)]
    release = ledger[-1]
    assert release.command_id == command_id_for(saga_id, "reserve", COMPENSATE, 1)
    assert await rig.published(saga_id, "ledger", 4) == ledger

    # The release never answers either: after its own budget, the saga FAILS for an operator.
    for _ in range(2):
        assert (await rig.time_out(saga_id)).resent == 1
    failed = counter_total(metric_reader, "saga.failed", stage="recovery")
    done = await rig.time_out(saga_id)
    assert counter_total(metric_reader, "saga.failed", stage="recovery") - failed == 1
    assert done.gave_up == 1 and done.failed == [saga_id]

    events = await rig.events(saga_id)
    assert [e.type for e, _ in events][-4:] == ["StepTimedOut", "StepTimedOut", "StepTimedOut",
                                                "SagaFailed"]
    last_timeout = only(events, StepTimedOut)[-1]
    assert (last_timeout.direction, last_timeout.gave_up, last_timeout.command_id) == (
        COMPENSATE, True, release.command_id)
    state = await rig.assert_consistent(saga_id)
    assert state.status is SagaStatus.FAILED and state.due_at is None
    assert await rig.commands(saga_id, "ledger") == ledger + [
        release.model_copy(update={"deadline_at": d}) for d in (
            release.deadline_at + RESERVE_TIMEOUT, release.deadline_at + 2 * RESERVE_TIMEOUT)]

    async with rig.engine.connect() as conn:
        letters = (await conn.execute(text(
            "SELECT stage, reason_code, original_topic, saga_type, business_key, payload"
            " FROM dead_letters WHERE saga_id = :s"), {"s": saga_id})).all()
    assert len(letters) == 1
    letter = letters[0]
    assert (letter.stage, letter.reason_code, letter.saga_type, letter.business_key) == (
        "recovery", "STEP_TIMED_OUT", "transfer", state.business_key)
    assert SagaState.from_json(json.loads(bytes(letter.payload))) == state

    [record] = await rig.on_topic(rig.settings.topic(TOPIC_DEAD_LETTERS), saga_id, 1)
    headers = {k: (v or b"").decode() for k, v in record.headers() or []}
    assert headers["dlq-reason-code"] == "STEP_TIMED_OUT"
    assert headers["dlq-saga-id"] == str(saga_id)
    assert headers["dlq-attempts"] == "3"  # the release's one attempt and its two re-sends
    async with rig.engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT attempts, first_failed_at <= last_failed_at AS ordered FROM dead_letters"
            " WHERE stage = 'recovery'"))).one()
    assert (row.attempts, row.ordered) == (3, True)  # what `saga dlq list` shows
    assert bytes(record.value()) == bytes(letter.payload)

    # Terminal: no later pass touches it.
    assert (await rig.recovery.recover_once(now=release.deadline_at + timedelta(days=1))
            ).acted == 0


async def test_a_give_up_that_starts_a_compensation_is_not_counted_as_a_retry(
        rig: Rig, metric_reader: InMemoryMetricReader) -> None:
    saga_id, _reserve = await reserve_running(rig)
    for _ in range(2):
        assert (await rig.time_out(saga_id)).resent == 1
    retries = counter_total(metric_reader, "saga.recovery.actions", action="retry")
    done = await rig.time_out(saga_id)
    assert only(await rig.events(saga_id), StepStarted)[-1].direction is COMPENSATE
    assert done.gave_up == 1
    assert (done.retried, done.acted) == (0, 1)
    assert counter_total(metric_reader, "saga.recovery.actions", action="retry") == retries


async def test_a_pass_that_does_not_commit_counts_no_action(
        rig: Rig, metric_reader: InMemoryMetricReader) -> None:
    """The action counters move only with a committed pass: an exporter must never report a
    retry that a rollback undid, or one that is not in the event store yet."""
    saga_id, reserve = await reserve_running(rig)
    await rig.orchestrator.handle_batch([rig.reply(reserve, Outcome.FAILED, retryable=True)])
    [scheduled] = only(await rig.events(saga_id), StepRetryScheduled)
    retries = counter_total(metric_reader, "saga.recovery.actions", action="retry")
    async with rig.engine.connect() as blocker:
        # The pass decides, then waits on the event insert until it is cancelled.
        await blocker.execute(text("LOCK TABLE saga_events IN SHARE MODE"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rig.recovery.recover_once(now=scheduled.not_before), 1.0)
        assert counter_total(metric_reader, "saga.recovery.actions", action="retry") == retries
        await blocker.rollback()
    assert only(await rig.events(saga_id), StepStarted)[-1].attempt == 1

    done = await rig.recovery.recover_once(now=scheduled.not_before)
    assert done.retried == 1
    assert counter_total(metric_reader, "saga.recovery.actions", action="retry") - retries == 1
    assert only(await rig.events(saga_id), StepStarted)[-1].attempt == 2
    await rig.assert_consistent(saga_id)


async def test_a_retryable_failure_waits_in_the_database_and_retries_with_a_new_command_id(
        rig: Rig, metric_reader: InMemoryMetricReader) -> None:
    saga_id, reserve = await reserve_running(rig)
    await rig.orchestrator.handle_batch([rig.reply(reserve, Outcome.FAILED, retryable=True)])

    events = await rig.events(saga_id)
    assert [e.type for e, _ in events][-2:] == ["StepFailed", "StepRetryScheduled"]
    [scheduled] = only(events, StepRetryScheduled)
    assert (scheduled.step, scheduled.direction, scheduled.attempt) == ("reserve", FORWARD, 2)
    state = await rig.assert_consistent(saga_id)
    _state, row = await rig.saga(saga_id)
    assert row.due_at == scheduled.not_before == state.next_attempt_at
    assert state.command_id is None and row.deadline_at is None

    early = await rig.recovery.recover_once(now=scheduled.not_before - TICK)
    assert early.acted == 0
    assert await rig.commands(saga_id, "ledger") == [reserve]

    retries = counter_total(metric_reader, "saga.recovery.actions", action="retry")
    done = await rig.recovery.recover_once(now=scheduled.not_before)
    assert (done.retried, done.resent, done.gave_up) == (1, 0, 0)
    assert counter_total(metric_reader, "saga.recovery.actions", action="retry") - retries == 1

    started = only(await rig.events(saga_id), StepStarted)[-1]
    second_id = command_id_for(saga_id, "reserve", FORWARD, 2)
    assert (started.step, started.attempt, started.command_id) == ("reserve", 2, second_id)
    assert second_id != reserve.command_id
    assert started.deadline_at == scheduled.not_before + RESERVE_TIMEOUT
    state = await rig.assert_consistent(saga_id)
    assert state.next_attempt_at is None and state.due_at == started.deadline_at
    second = reserve.model_copy(update={"command_id": second_id, "attempt": 2,
                                        "deadline_at": started.deadline_at})
    assert await rig.commands(saga_id, "ledger") == [reserve, second]
    assert await rig.published(saga_id, "ledger", 2) == [reserve, second]

    # A late success of the superseded first attempt changes nothing. (Its reply id differs
    # from the failure's: a participant derives one id per command, so this stands for a reply
    # from elsewhere; one with the failure's id would be skipped by the inbox.)
    version = state.version
    late = uuid.uuid4()
    await rig.orchestrator.handle_batch([rig.reply(reserve, reply_id=late)])
    assert await rig.verdicts(f"reply:{late}") == ["stale"]
    assert (await rig.assert_consistent(saga_id)).version == version


async def test_two_recovery_workers_act_on_each_due_saga_exactly_once(rig: Rig) -> None:
    count = 30
    saga_ids = await rig.start(count)
    deadline = (await rig.saga(saga_ids[0]))[0].deadline_at
    assert deadline is not None
    # Small batches, so each worker needs several passes and their transactions interleave.
    settings = rig.settings.model_copy(update={"recovery_batch_max": 7})
    assert settings.database_url
    engines = [create_engine(settings.database_url) for _ in range(2)]
    producers = [KafkaProducer(settings, f"it-recovery-race-{i}") for i in range(2)]
    workers = [RecoveryWorker(settings.model_copy(update={"worker_name": f"race-{i}"}),
                              engines[i], producers[i], APPLICATION.sagas) for i in range(2)]
    try:
        for round_ in (1, 2, 3):  # two re-sends, then screen and reserve give up
            now = deadline + (round_ - 1) * SCREEN_TIMEOUT
            acted = 0
            for _ in range(count):
                passes = await asyncio.gather(*(w.recover_once(now=now) for w in workers))
                acted += sum(p.acted for p in passes)
                if not any(p.acted for p in passes):
                    break
            # each saga once per round; both of its members in that one decision
            assert acted == 2 * count, f"round {round_}"
            for saga_id in saga_ids:
                events = await rig.events(saga_id)
                timeouts = only(events, StepTimedOut)
                assert len(timeouts) == 2 * round_, (saga_id, [e.type for e, _ in events])
                for step in ("screen", "reserve"):
                    assert [t.resend for t in timeouts if t.step == step] == [1, 2, 2][:round_]
                assert {actor for e, actor in events if isinstance(e, StepTimedOut)} <= {
                    "race-0", "race-1"}
                await rig.assert_consistent(saga_id)
    finally:
        for worker in workers:
            await worker.marker.close()
        for producer in producers:
            producer.close()
        for engine_ in engines:
            await engine_.dispose()
    for saga_id in saga_ids:
        # reserve may have placed its hold: it is being released, once
        state = (await rig.saga(saga_id))[0]
        assert (state.status, state.step, state.direction) == (SagaStatus.COMPENSATING,
                                                               "reserve", COMPENSATE)
        assert len(await rig.published(saga_id, "risk", 3)) == 3
        ledger = await rig.published(saga_id, "ledger", 4)
        assert [(c.action, c.direction) for c in ledger] == [("reserve", FORWARD)] * 3 + [
            ("release", COMPENSATE)]


async def test_a_reply_and_a_timeout_decided_together_record_one_consistent_outcome(
        rig: Rig) -> None:
    # Measured over 200 rounds: about half the time the orchestrator decided on the state the
    # recovery pass was changing, lost on the event key and redid its batch from fresh state.
    for _ in range(12):
        [saga_id] = await rig.start()
        [command] = await rig.commands(saga_id, "risk")
        [reserve] = await rig.commands(saga_id, "ledger")
        await rig.orchestrator.handle_batch([rig.reply(reserve)])  # screen alone is out
        deadline = command.deadline_at

        async def recover(at: datetime = deadline) -> RecoveryPass:
            # What RecoveryWorker.run does with a pass that lost a race: try again.
            for _ in range(5):
                try:
                    return await rig.recovery.recover_once(now=at)
                except ConcurrencyConflict:
                    await asyncio.sleep(0.01)
            raise AssertionError("recovery lost the race five times")

        results = await asyncio.gather(rig.orchestrator.handle_batch([rig.reply(command)]),
                                       recover(), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors

        types = await rig.types(saga_id)
        assert types.count("StepSucceeded") == 2
        start = ["SagaStarted", "StepStarted", "StepStarted", "StepSucceeded"]
        assert types in (
            [*start, "StepSucceeded", "StepStarted"],
            [*start, "StepTimedOut", "StepSucceeded", "StepStarted"],
        ), types
        state = await rig.assert_consistent(saga_id)
        assert (state.step, state.direction, state.attempt, state.resends) == (
            "credit", FORWARD, 1, 0)
        assert await rig.verdicts(f"reply:{uuid.uuid5(command.command_id, 'reply')}") == [
            "applied"]
        assert len(await rig.commands(saga_id, "ledger")) == 2  # reserve, credit


async def test_saga_worker_recovery_runs_as_a_process_and_starts_a_due_retry(
        rig: Rig, tmp_path: Path) -> None:
    processes = WorkerProcesses(rig.settings, tmp_path, kinds=("recovery",))
    processes.start()
    try:
        await processes.wait_ready(rig.engine, timeout_s=60)
        name = processes.names["recovery"]
        async with rig.engine.connect() as conn:
            kind = (await conn.execute(text("SELECT kind FROM workers WHERE worker = :w"),
                                       {"w": name})).scalar_one()
        assert kind == "recovery"

        # A retryable failure of the screen is due in a fraction of a second, by the real clock.
        [saga_id] = await rig.start()
        [screen] = await rig.commands(saga_id, "risk")
        await rig.orchestrator.handle_batch([rig.reply(screen, Outcome.FAILED, retryable=True)])
        deadline = time.monotonic() + 20
        while (started := only(await rig.events(saga_id), StepStarted))[-1].attempt != 2:
            assert time.monotonic() < deadline, f"no retry; see {processes.log_path('recovery')}"
            await asyncio.sleep(0.05)
        events = await rig.events(saga_id)
        assert events[-1] == (started[-1], name)
        assert started[-1].command_id == command_id_for(saga_id, "screen", FORWARD, 2)
        await rig.assert_consistent(saga_id)
        # The worker's own outbox sweep sends the row again when the first send outlasts the
        # relay's grace (a cold producer can take that long): at least once, deduplicated by
        # the participant. What matters is which commands went out, in which order.
        sent = [(c.command_id, c.attempt) for c in await rig.published(saga_id, "risk", 2)]
        assert sorted(set(sent), key=sent.index) == [(screen.command_id, 1),
                                                     (started[-1].command_id, 2)]
    finally:
        processes.stop()
    assert not processes.alive("recovery")
    async with rig.engine.connect() as conn:
        stopped = (await conn.execute(text("SELECT stopped_at FROM workers WHERE worker = :w"),
                                      {"w": processes.names["recovery"]})).scalar_one()
    assert stopped is not None, "the worker did not record a clean stop on SIGTERM"


async def test_the_orchestrators_known_state_path_decides_again_when_another_writer_moved_the_saga(
        rig: Rig) -> None:
    """The orchestrator decides from the state it last wrote, without reading it back
    (`OrchestratorWorker._record`). Here a second instance (as after partitions moved) moves
    the saga on behind the first one's back; the first one's stale decision loses on the event
    key and the batch is decided again from the database, once."""
    first = rig.orchestrator
    second = OrchestratorWorker(rig.settings.model_copy(update={"worker_name": "it-second"}),
                                rig.engine, rig.producer, APPLICATION.sagas)
    try:
        [saga_id] = await rig.start()
        # started, screen and reserve sent: kept, not re-read
        assert first.known[saga_id].version == 3
        [screen] = await rig.commands(saga_id, "risk")
        [reserve] = await rig.commands(saga_id, "ledger")
        await second.handle_batch([rig.reply(screen)])  # the first instance does not know
        assert first.known[saga_id].version == 3

        await first.handle_batch([rig.reply(reserve)])
        assert await rig.types(saga_id) == ["SagaStarted", "StepStarted", "StepStarted",
                                            "StepSucceeded", "StepSucceeded", "StepStarted"]
        state = await rig.assert_consistent(saga_id)
        assert first.known[saga_id] == state
        assert (state.step, state.attempt) == ("credit", 1)

        # A byte-identical redelivery while the saga is known: the inbox key turns the
        # known-state path away as well, and the careful path skips the message.
        await first.handle_batch([rig.reply(reserve)])
        assert await rig.verdicts(f"reply:{uuid.uuid5(reserve.command_id, 'reply')}") == [
            "applied"]
        assert await rig.assert_consistent(saga_id) == state
        assert len(await rig.commands(saga_id, "ledger")) == 2  # reserve, credit: no extra
    finally:
        await second.close()


class OtlpReceiver:
    """The metrics half of an OpenTelemetry collector's OTLP/HTTP receiver, on loopback: it
    keeps every export request it is sent and answers as a collector does."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        )

        self.requests: list[Any] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportMetricsServiceRequest()
                request.ParseFromString(body)
                receiver.requests.append(request)
                answer = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def counter(self, name: str, **attributes: str) -> tuple[int, dict[str, str]]:
        """The latest value of the counter `name` for `attributes` (cumulative), with the
        resource attributes of the process that sent it."""
        value, resource = 0, {}
        for request in self.requests:
            for resource_metrics in request.resource_metrics:
                for scope in resource_metrics.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name != name:
                            continue
                        for point in metric.sum.data_points:
                            found = {a.key: a.value.string_value for a in point.attributes}
                            if found == attributes:
                                value = point.as_int
                                resource = {a.key: a.value.string_value
                                            for a in resource_metrics.resource.attributes}
        return value, resource

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_a_recovery_worker_process_exports_its_actions_to_an_otlp_collector(
        rig: Rig, tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    processes = WorkerProcesses(rig.settings, tmp_path, kinds=("recovery",))
    processes.start(env={"OTEL_METRICS_EXPORTER": "otlp",
                         "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.url,
                         "OTEL_METRIC_EXPORT_INTERVAL": "200",
                         "OTEL_SERVICE_NAME": "saga-recovery-it"})
    try:
        await processes.wait_ready(rig.engine, timeout_s=60)
        [saga_id] = await rig.start()
        [screen] = await rig.commands(saga_id, "risk")
        await rig.orchestrator.handle_batch([rig.reply(screen, Outcome.FAILED, retryable=True)])
        deadline = time.monotonic() + 20
        while (found := receiver.counter("saga.recovery.actions", action="retry"))[0] < 1:
            assert time.monotonic() < deadline, (
                f"no retry counted: {len(receiver.requests)} exports received; see "
                f"{processes.log_path('recovery')}")
            await asyncio.sleep(0.1)
        retried, resource = found
        assert retried == 1
        assert resource["service.name"] == "saga-recovery-it"
        assert resource["service.instance.id"] == processes.names["recovery"]
        assert only(await rig.events(saga_id), StepStarted)[-1].attempt == 2
    finally:
        processes.stop()
        receiver.close()


async def test_the_gauges_sample_what_the_database_holds(rig: Rig) -> None:
    """`sample_gauges` (the recovery worker's, every SAGA_METRICS_SAMPLE_S while metrics are
    exported) against our own SQL: sagas in flight by status, the outbox backlog and the age of
    its oldest row, dead letters not redriven by reason."""
    [running, turning] = await rig.start(2)
    # The screen is refused for good; once the hold is placed, it is released: COMPENSATING.
    [screen] = await rig.commands(turning, "risk")
    await rig.orchestrator.handle_batch([rig.reply(screen, Outcome.FAILED)])
    [reserve] = await rig.commands(turning, "ledger")
    await rig.orchestrator.handle_batch([rig.reply(reserve)])
    unreadable = Consumed(topic=rig.settings.topic(TOPIC_TRANSFER_COMMANDS), partition=0,
                          offset=next(rig.offsets), key=None, value=b"{not json",
                          headers=(), timestamp_ms=None)
    await rig.orchestrator.handle_batch([unreadable])
    await rig.orchestrator.marker.flush()
    async with rig.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO outbox (topic, value, created_at) VALUES"
            " ('it-nowhere', 'x', clock_timestamp() - interval '90 seconds')"))

    await rig.recovery.sample_gauges()

    async with rig.engine.connect() as conn:
        statuses = {row.status: row.n for row in await conn.execute(text(
            "SELECT status, count(*) AS n FROM sagas GROUP BY status"))}
        backlog = (await conn.execute(text(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            " AND set_aside_at IS NULL"))).scalar_one()
    assert statuses == {"RUNNING": 1, "COMPENSATING": 1}
    assert saga_metrics.SAMPLES.in_flight == {("transfer", "RUNNING"): 1,
                                         ("transfer", "COMPENSATING"): 1}
    assert saga_metrics.SAMPLES.outbox_backlog == backlog >= 1
    assert saga_metrics.SAMPLES.outbox_oldest_age_s is not None
    assert 90 <= saga_metrics.SAMPLES.outbox_oldest_age_s < 150
    assert {reason: count for reason, count in saga_metrics.SAMPLES.dead_letters_pending.items()
            if count} == {"MALFORMED_JSON": 1}
    assert running != turning
