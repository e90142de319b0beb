"""An existing database, made by the migrations from before saga types were generic and filled
the way that code filled it, brought to today's schema by `migrate`: its sagas in flight finish
on today's workers, and its finished ones still show their timelines.

The old database is built from the old migration files (`fixtures/migrations_before_generic`),
and its rows are written with SQL in the old shapes: events naming a `transfer_id` (no business
key, no definition version), `sagas` rows with a `transfer_id` column and states caching it,
dead letters with a `transfer_id`. Only the step progression (which did not change) is decided
with today's pure core, so the histories are ones the orchestrator really produces.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator.core.definition import SagaDefinition
from orchestrator.core.saga import (
    Decision,
    SagaState,
    decide_due,
    decide_reject,
    decide_reply,
    decide_start,
    fold,
    participant_of,
)
from orchestrator.ops.checker import check
from orchestrator.postgres.store import create_engine, migrate
from orchestrator.settings import Settings
from orchestrator.workers.runner import run_worker, workers_ready
from orchestrator.workers.saga_worker import CONSUMER, command_row
from schemas import (
    TOPIC_TRANSFER_COMMANDS,
    Outcome,
    RejectionCode,
    SagaEvent,
    SagaStarted,
    StepCommand,
    StepReply,
    TransferRequested,
)
from steps import APPLICATION
from steps.ledger import open_account
from steps.saga import TRANSFER, TRANSFER_TYPE
from tests.cli_process import run_saga
from tests.integration.conftest import Harness, database_of_its_own

pytestmark = pytest.mark.integration

# The transfer as the code before generic saga types ran it: its steps one after the other
# (screen and reserve became a parallel group later; a saga started before goes on from its own
# history, ADR 0012).
OLD_TRANSFER = SagaDefinition(name="transfer", steps=TRANSFER.all_steps)

OLD_MIGRATIONS = Path(__file__).parent / "fixtures" / "migrations_before_generic"
TERMINAL = ("COMPLETED", "COMPENSATED", "REJECTED", "FAILED")
# How the old code named a saga and a request's content (`saga_id_for_transfer`,
# `request_hash`), written out here so that the histories below are the old code's whatever
# today's code derives.
_OLD_NAMESPACE = uuid.UUID("6f1c3a52-8d0e-4f7b-9a51-2c0d9e7b4a10")


def old_saga_id(transfer_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(_OLD_NAMESPACE, f"transfer:{transfer_id}")


def old_request_hash(request: TransferRequested) -> str:
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


# ---------------------------------------------------------------- the old shapes


def old_payload(event: SagaEvent) -> dict[str, Any]:
    """An event as the old code wrote it: the start events named the transfer id alone."""
    payload: dict[str, Any] = json.loads(event.model_dump_json())
    if payload["type"] == "SagaStarted":
        payload["transfer_id"] = payload.pop("business_key")
        del payload["definition_version"]
    elif payload["type"] == "SagaRejected":
        payload["transfer_id"] = payload.pop("business_key")
        del payload["saga_type"]
    return payload


def old_state(state: SagaState) -> dict[str, Any]:
    """The `sagas.state` cache as the old code wrote it."""
    cached = state.to_json()
    cached["transfer_id"] = cached.pop("business_key")
    del cached["definition_version"]
    return cached


@dataclass
class OldSaga:
    """One transfer's history, decided step by step as the orchestrator decided it."""

    label: str
    request: TransferRequested
    at: datetime
    events: list[tuple[SagaEvent, datetime]] = field(default_factory=list)
    # the stored replies a participant wrote: (participant, reply)
    replies: list[tuple[str, StepReply]] = field(default_factory=list)
    commands: tuple[StepCommand, ...] = ()

    @property
    def transfer_id(self) -> str:
        return str(self.request.transfer_id)

    @property
    def raw(self) -> bytes:
        return self.request.model_dump_json().encode()

    @property
    def state(self) -> SagaState:
        state = fold(event for event, _ in self.events)
        assert state is not None
        assert state.saga_id == old_saga_id(self.request.transfer_id), "not the old saga id"
        return state

    def _record(self, decision: Decision) -> OldSaga:
        # The history is decided with today's core: it must be the one the old code decided,
        # under the saga id and request hash the old code derived.
        for event in decision.events:
            if isinstance(event, SagaStarted):
                assert event.request_hash == old_request_hash(self.request)
        for event in decision.events:
            self.at += timedelta(milliseconds=40)
            self.events.append((event, self.at))
        self.commands = decision.commands
        return self

    def start(self) -> OldSaga:
        message = TRANSFER_TYPE.start(self.request, self.at)
        return self._record(decide_start(OLD_TRANSFER, None, message, self.at))

    def reply(self, outcome: Outcome = Outcome.SUCCEEDED, code: str | None = None,
              retryable: bool = False, **result: str) -> OldSaga:
        (command,) = self.commands
        reply = StepReply(
            reply_id=uuid.uuid5(command.command_id, "reply"), command_id=command.command_id,
            saga_id=command.saga_id, step=command.step, direction=command.direction,
            attempt=command.attempt, participant=participant_of(OLD_TRANSFER, command),
            outcome=outcome, retryable=retryable, code=code,
            reason=f"refused: {code}" if code else None, result=result)
        if not retryable:  # a participant stores what is final, never a retryable refusal
            self.replies.append((reply.participant, reply))
        self.at += timedelta(milliseconds=15)
        return self._record(decide_reply(OLD_TRANSFER, self.state, reply, self.at))

    def due(self) -> OldSaga:
        due_at = self.state.due_at
        assert due_at is not None
        self.at = max(self.at, due_at)
        decision = decide_due(OLD_TRANSFER, self.state, self.at)
        assert decision is not None
        return self._record(decision)

    def reject(self, code: RejectionCode, reason: str) -> OldSaga:
        message = TRANSFER_TYPE.reject(self.transfer_id, code, reason)
        return self._record(decide_reject(None, message))


async def write_old(conn: AsyncConnection, saga: OldSaga, settings: Settings,
                    outbox_published: bool | None = None) -> None:
    """The rows the old orchestrator and participants left for `saga`: its events, its
    projection row, the inbox row of its request, the participants' stored replies, and (when
    `outbox_published` is given) the outbox row of its outstanding command."""
    state = saga.state
    # The old orchestrator recorded the consumed request's message id as each event's cause.
    request_id = "sha256:" + hashlib.sha256(saga.raw).hexdigest()
    for seq, (event, at) in enumerate(saga.events, start=1):
        await conn.execute(text(
            "INSERT INTO saga_events (saga_id, seq, type, step, attempt, payload, actor,"
            " causation_id, recorded_at) VALUES (:s, :seq, :type, :step, :attempt,"
            " CAST(:payload AS jsonb), 'orchestrator-old', :cause, :at)"),
            {"s": state.saga_id, "seq": seq, "type": event.type,
             "step": getattr(event, "step", None), "attempt": getattr(event, "attempt", None),
             "payload": json.dumps(old_payload(event)), "cause": request_id, "at": at})
    await conn.execute(text(
        "INSERT INTO sagas (saga_id, transfer_id, saga_type, status, current_step, direction,"
        " attempt, version, deadline_at, due_at, requested_at, created_at, updated_at, state)"
        " VALUES (:s, :t, 'transfer', :status, :step, :direction, :attempt, :version,"
        " :deadline, :due, :requested, :created, :updated, CAST(:state AS jsonb))"),
        {"s": state.saga_id, "t": saga.request.transfer_id, "status": state.status.value,
         "step": state.step, "direction": state.direction.value if state.direction else None,
         "attempt": state.attempt, "version": state.version, "deadline": state.deadline_at,
         "due": state.due_at, "requested": state.requested_at, "created": saga.events[0][1],
         "updated": saga.events[-1][1], "state": json.dumps(old_state(state))})
    await conn.execute(text(
        "INSERT INTO inbox (consumer, message_id, topic, partition, \"offset\", verdict, saga_id)"
        " VALUES (:c, :m, :topic, 0, :offset, :verdict, :s)"),
        {"c": CONSUMER, "m": "sha256:" + hashlib.sha256(saga.raw).hexdigest(),
         "topic": settings.topic(TOPIC_TRANSFER_COMMANDS), "offset": uuid.uuid4().int % 10**9,
         "verdict": "rejected" if state.status.value == "REJECTED" else "started",
         "s": state.saga_id})
    for participant, reply in saga.replies:
        await conn.execute(text(
            "INSERT INTO participant_replies (saga_id, step, direction, participant, outcome,"
            " reply) VALUES (:s, :step, :direction, :p, :outcome, CAST(:reply AS jsonb))"),
            {"s": reply.saga_id, "step": reply.step, "direction": reply.direction.value,
             "p": participant, "outcome": reply.outcome.value,
             "reply": reply.model_dump_json()})
    if outbox_published is not None:
        (command,) = saga.commands
        row = command_row(settings, OLD_TRANSFER, command)
        await conn.execute(text(
            "INSERT INTO outbox (topic, key, value, headers, saga_id, published_at) VALUES"
            " (:topic, :key, :value, CAST(:headers AS jsonb), :s, :published)"),
            {"topic": row.topic, "key": row.key, "value": row.value,
             "headers": json.dumps(row.headers), "s": row.saga_id,
             "published": saga.at if outbox_published else None})


async def write_entry(conn: AsyncConnection, saga: OldSaga, step: str, amount: Decimal, *,
                      fence: str, seq: int, balance: str, held: str, settled: str = "0",
                      debit: str | None = None, credit: str | None = None,
                      hold: str | None = None, hold_delta: Decimal = Decimal(0)) -> None:
    """A ledger entry as the ledger wrote it: fenced by its customer account, with that
    account's running totals after it (migrations 0005 and 0007)."""
    await conn.execute(text(
        "INSERT INTO ledger_entries (saga_id, step, direction, currency, amount, debit_account,"
        " credit_account, hold_account, hold_delta, fence_account, fence_seq, fence_balance,"
        " fence_held, fence_settled_total) VALUES (:s, :step, 'forward', 'EUR', :amount,"
        " :debit, :credit, :hold, :delta, :fence, :seq, :balance, :held, :settled)"),
        {"s": saga.state.saga_id, "step": step, "amount": amount, "debit": debit,
         "credit": credit, "hold": hold, "delta": hold_delta, "fence": fence, "seq": seq,
         "balance": Decimal(balance), "held": Decimal(held), "settled": Decimal(settled)})


async def write_old_dead_letter(conn: AsyncConnection, payload: bytes, code: str,
                                settings: Settings, saga: OldSaga | None) -> uuid.UUID:
    """An intake dead letter as the old orchestrator wrote it: naming the transfer id of the
    saga it was refused for, if the request had a usable one (else with its own inbox row)."""
    dead_letter_id = uuid.uuid4()
    await conn.execute(text(
        "INSERT INTO dead_letters (dead_letter_id, stage, reason_code, reason, error_class,"
        " original_topic, original_partition, original_offset, original_key, payload,"
        " first_failed_at, last_failed_at, saga_id, transfer_id) VALUES (:id, 'intake', :code,"
        " 'refused at intake', :error, :topic, 0, :offset, NULL, :payload, now(), now(),"
        " NULL, :t)"),
        {"id": dead_letter_id, "code": code, "error": f"intake.{code}",
         "topic": settings.topic(TOPIC_TRANSFER_COMMANDS), "offset": uuid.uuid4().int % 10**9,
         "payload": payload, "t": saga.request.transfer_id if saga else None})
    if saga is not None:
        return dead_letter_id  # its inbox row is the saga's (`write_old`)
    await conn.execute(text(
        "INSERT INTO inbox (consumer, message_id, topic, partition, \"offset\", verdict, saga_id)"
        " VALUES (:c, :m, :topic, 0, 0, 'rejected', :s)"),
        {"c": CONSUMER, "m": "sha256:" + hashlib.sha256(payload).hexdigest(),
         "topic": settings.topic(TOPIC_TRANSFER_COMMANDS), "s": None})
    return dead_letter_id


def _request(source: str, destination: str, amount: str,
             transfer_id: uuid.UUID | None = None) -> TransferRequested:
    return TransferRequested(transfer_id=transfer_id or uuid.uuid4(), source_account=source,
                             destination_account=destination, amount=Decimal(amount),
                             currency="EUR", reference="before generic sagas",
                             requested_by="old-upstream")


# ---------------------------------------------------------------- the old database


@dataclass(frozen=True)
class OldDatabase:
    engine: AsyncEngine
    settings: Settings


@pytest.fixture
async def old_database(stack_settings: Settings, engine: AsyncEngine
                       ) -> AsyncIterator[OldDatabase]:
    """A database of its own, made by the old migrations only, as the old `migrate` made it."""
    async with database_of_its_own(engine, stack_settings, "old_it") as url:
        own = create_engine(url, pool_size=4)
        try:
            async with own.begin() as conn:
                await conn.execute(text(
                    "CREATE TABLE schema_migrations (name text PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"))
                raw = (await conn.get_raw_connection()).driver_connection
                assert raw is not None
                for path in sorted(OLD_MIGRATIONS.glob("*.sql")):
                    await raw.execute(path.read_text())
                    await conn.execute(text("INSERT INTO schema_migrations (name) VALUES (:n)"),
                                       {"n": path.name})
            yield OldDatabase(own, stack_settings.model_copy(update={
                "database_url": url, "topic_prefix": f"mg-{uuid.uuid4().hex[:8]}."}))
        finally:
            await own.dispose()


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    assert settings.database_url and settings.kafka_bootstrap
    env.update(SAGA_DATABASE_URL=settings.database_url,
               SAGA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
               SAGA_TOPIC_PREFIX=settings.topic_prefix)
    return run_saga(args, env, 60)


async def _statuses(engine: AsyncEngine, keys: list[str]) -> dict[str, str]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT business_key, status FROM sagas WHERE saga_type = 'transfer'"
            " AND business_key = ANY(:keys)"), {"keys": keys})).all()
    return {row.business_key: row.status for row in rows}


async def _events(engine: AsyncEngine, saga_id: uuid.UUID) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(
            "SELECT seq, type, payload FROM saga_events WHERE saga_id = :s ORDER BY seq"),
            {"s": saga_id})).all())


# ---------------------------------------------------------------- the test


@pytest.mark.timeout(240)
async def test_an_old_database_migrates_and_its_sagas_finish_and_show_their_timelines(
        old_database: OldDatabase) -> None:
    db, settings = old_database.engine, old_database.settings
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    now = datetime.now(UTC)
    run = uuid.uuid4().hex[:6]

    def acct(name: str) -> str:
        return f"mg-{run}-{name}"

    async with db.begin() as conn:
        for name, opening, limit in (("s1", "100.00", None), ("d1", "0.00", None),
                                     ("s2", "100.00", None), ("d2", "0.00", None),
                                     ("s3", "100.00", None), ("d3", "0.00", None),
                                     ("s4", "100.00", "5.00"), ("d4", "0.00", None),
                                     ("s5", "100.00", None), ("d5", "0.00", None),
                                     ("s6", "100.00", None), ("d6", "0.00", None)):
            await open_account(conn, acct(name), "EUR", Decimal(opening),
                               Decimal(limit) if limit else None)

    # Finished before the upgrade: completed (with its ledger entries), rejected at intake
    # (with its dead letter), compensated at the screen; and a malformed request.
    completed = (OldSaga("completed", _request(acct("s1"), acct("d1"), "10.00"), an_hour_ago)
                 .start().reply().reply(held="10.00").reply(credited="10.00")
                 .reply(settled="10.00").reply(notified="True"))
    rejected = OldSaga("rejected", _request(acct("s6"), acct("d6"), "1.00"), an_hour_ago).reject(
        RejectionCode.INVALID_AMOUNT, "amount: more decimals than EUR has")
    sanctioned = (OldSaga("sanctioned", _request(acct("s6"), acct("d6"), "2.00"), an_hour_ago)
                  .start().reply(Outcome.FAILED, "SANCTIONS_HIT"))
    # In flight at the upgrade:
    # - waiting on its screen, whose command the broker lost, long past its deadline;
    waiting = OldSaga("waiting", _request(acct("s2"), acct("d2"), "3.00"), an_hour_ago).start()
    # - a retry of its screen scheduled, due long ago;
    retrying = (OldSaga("retrying", _request(acct("s3"), acct("d3"), "4.00"), an_hour_ago)
                .start().reply(Outcome.FAILED, "PROVIDER_UNAVAILABLE", retryable=True))
    # - its source's daily limit refused the settle: compensating, its reversal unanswered;
    compensating = (OldSaga("compensating", _request(acct("s4"), acct("d4"), "12.34"),
                            an_hour_ago)
                    .start().reply().reply(held="12.34").reply(credited="12.34")
                    .reply(Outcome.FAILED, "DAILY_LIMIT_EXCEEDED"))
    # - funds held, its credit committed to the outbox but never published (a crash).
    crediting = (OldSaga("crediting", _request(acct("s5"), acct("d5"), "5.00"), now)
                 .start().reply().reply(held="5.00"))
    assert [s.state.status.value for s in (completed, rejected, sanctioned, waiting, retrying,
                                           compensating, crediting)] == [
        "COMPLETED", "REJECTED", "COMPENSATED", "RUNNING", "RUNNING", "COMPENSATING", "RUNNING"]
    assert retrying.state.next_attempt_at is not None
    assert (compensating.state.step, crediting.state.step) == ("credit", "credit")

    clearing = "clearing.EUR"
    async with db.begin() as conn:
        for saga in (completed, rejected, sanctioned, retrying):
            await write_old(conn, saga, settings)
        await write_old(conn, waiting, settings, outbox_published=True)
        await write_old(conn, compensating, settings, outbox_published=True)
        await write_old(conn, crediting, settings, outbox_published=False)
        x = Decimal("10.00")
        await write_entry(conn, completed, "reserve", x, fence=acct("s1"), seq=1,
                          balance="100.00", held="10.00", hold=acct("s1"), hold_delta=x)
        await write_entry(conn, completed, "credit", x, fence=acct("d1"), seq=1,
                          balance="10.00", held="0", debit=clearing, credit=acct("d1"))
        await write_entry(conn, completed, "settle", x, fence=acct("s1"), seq=2,
                          balance="90.00", held="0", settled="10.00", debit=acct("s1"),
                          credit=clearing, hold=acct("s1"), hold_delta=-x)
        y = Decimal("12.34")
        await write_entry(conn, compensating, "reserve", y, fence=acct("s4"), seq=1,
                          balance="100.00", held="12.34", hold=acct("s4"), hold_delta=y)
        await write_entry(conn, compensating, "credit", y, fence=acct("d4"), seq=1,
                          balance="12.34", held="0", debit=clearing, credit=acct("d4"))
        z = Decimal("5.00")
        await write_entry(conn, crediting, "reserve", z, fence=acct("s5"), seq=1,
                          balance="100.00", held="5.00", hold=acct("s5"), hold_delta=z)
        rejected_letter = await write_old_dead_letter(
            conn, rejected.raw, "INVALID_AMOUNT", settings, rejected)
        malformed_letter = await write_old_dead_letter(
            conn, b'{"transfer_id": "not', "MALFORMED_JSON", settings, None)
        history_before = (await conn.execute(text(
            "SELECT saga_id, seq, type, payload, recorded_at FROM saga_events"
            " ORDER BY saga_id, seq"))).all()

    # The upgrade: today's migrations bring the old database to the new schema.
    assert await migrate(db, APPLICATION.migrations) == [
        "0008_participant_replies.sql", "0009_generic_sagas.sql", "0010_trace_context.sql",
        "0011_dead_letter_redriven_by.sql", "0012_dead_letters_by_saga.sql"]

    everyone = [completed, rejected, sanctioned, waiting, retrying, compensating, crediting]
    async with db.connect() as conn:
        # The event log is as it was: the migration rewrote no event (nor could it).
        assert (await conn.execute(text(
            "SELECT saga_id, seq, type, payload, recorded_at FROM saga_events"
            " ORDER BY saga_id, seq"))).all() == history_before
        projection = {row.saga_id: row for row in (await conn.execute(text(
            "SELECT saga_id, saga_type, business_key, definition_version, state FROM sagas")))}
        columns = set((await conn.execute(text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'sagas'"))
        ).scalars())
        letters = {row.dead_letter_id: row for row in (await conn.execute(text(
            "SELECT dead_letter_id, saga_type, business_key FROM dead_letters")))}
    assert "transfer_id" not in columns and {"business_key", "definition_version"} <= columns
    for saga in everyone:
        row = projection[saga.state.saga_id]
        version = None if saga is rejected else 1
        assert (row.saga_type, row.business_key, row.definition_version) == (
            "transfer", saga.transfer_id, version), saga.label
        assert SagaState.from_json(row.state) == saga.state, saga.label  # the cache, migrated
    assert (letters[rejected_letter].saga_type, letters[rejected_letter].business_key) == (
        "transfer", rejected.transfer_id)
    assert (letters[malformed_letter].saga_type, letters[malformed_letter].business_key) == (
        "transfer", None)
    # Replaying the old events gives the migrated projection; the old money adds up.
    report = await check(db, APPLICATION)
    assert report.ok, [(c.invariant, c.name, c.detail) for c in report.failures()]

    # Today's workers on the migrated database: the sagas in flight finish, on version 1.
    stop = asyncio.Event()
    names = {kind: f"mg-{kind}-{run}" for kind in APPLICATION.worker_kinds}
    tasks = [asyncio.create_task(run_worker(kind, settings.model_copy(
        update={"worker_name": names[kind]}), stop)) for kind in APPLICATION.worker_kinds]
    upstream = Harness(settings, db)
    try:
        deadline = time.monotonic() + 60
        while not await workers_ready(db, set(names.values())):
            for task in tasks:
                if task.done():
                    task.result()
            assert time.monotonic() < deadline, "workers did not start in 60 s"
            await asyncio.sleep(0.1)
        in_flight = [waiting, retrying, compensating, crediting]
        keys = [s.transfer_id for s in in_flight]
        deadline = time.monotonic() + 90
        while (statuses := await _statuses(db, keys)) and not all(
                status in TERMINAL for status in statuses.values()):
            assert time.monotonic() < deadline, f"not finished after 90 s: {statuses}"
            await asyncio.sleep(0.1)
        assert statuses == {waiting.transfer_id: "COMPLETED", retrying.transfer_id: "COMPLETED",
                            compensating.transfer_id: "COMPENSATED",
                            crediting.transfer_id: "COMPLETED"}

        # An old request delivered again (other bytes, same content) still finds its saga: the
        # same saga id and the same request hash as before the upgrade. Changed, it is refused.
        again = json.dumps(json.loads(completed.raw), indent=2).encode()
        upstream.publish(again, key=completed.transfer_id)
        conflicting = upstream.publish(
            {**json.loads(completed.raw), "amount": "99.00"}, key=completed.transfer_id)
        letter = await upstream.wait_dead_letter(conflicting)
        assert (letter.reason_code, letter.saga_type, letter.business_key) == (
            "CONFLICTING_DUPLICATE", "transfer", completed.transfer_id)
        async with db.connect() as conn:
            verdict = (await conn.execute(text(
                "SELECT verdict, saga_id FROM inbox WHERE message_id = :m"),
                {"m": "sha256:" + hashlib.sha256(again).hexdigest()})).one()
        assert (verdict.verdict, verdict.saga_id) == ("duplicate", completed.state.saga_id)

        deadline = time.monotonic() + 30
        while not (report := await check(db, APPLICATION, expect_quiescent=True)).ok:
            assert time.monotonic() < deadline, [
                (c.invariant, c.name, c.detail) for c in report.failures()]
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        upstream.close()

    # Each saga that was in flight: its old events untouched, the new ones after them, and
    # every step decided on version 1 (the transfer's steps, in order).
    old_count = {s.label: len(s.events) for s in everyone}
    for saga in in_flight:
        events = await _events(db, saga.state.saga_id)
        assert [e.payload for e in events[:old_count[saga.label]]] == [
            old_payload(e) for e, _ in saga.events]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert len(events) > old_count[saga.label]
    async with db.connect() as conn:
        versions = set((await conn.execute(text(
            "SELECT DISTINCT definition_version FROM sagas WHERE status <> 'REJECTED'"))
        ).scalars())
    assert versions == {1}
    balances = await upstream.balances(acct("s4"), acct("d4"), acct("s5"), acct("d5"))
    assert balances == {acct("s4"): (Decimal("100.00"), Decimal("0")),
                        acct("d4"): (Decimal("0.00"), Decimal("0")),
                        acct("s5"): (Decimal("95.00"), Decimal("0")),
                        acct("d5"): (Decimal("5.00"), Decimal("0"))}

    # The sagas that had finished before the upgrade still show their timelines, by transfer
    # id (their business key) or saga id, as text and as JSON, with their events as written.
    for saga, status in ((completed, "COMPLETED"), (rejected, "REJECTED"),
                         (sanctioned, "COMPENSATED")):
        shown = await asyncio.to_thread(_cli, settings, "timeline", saga.transfer_id, "--json")
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert (data["saga_id"], data["saga_type"], data["business_key"], data["status"]) == (
            str(saga.state.saga_id), "transfer", saga.transfer_id, status)
        assert [e["payload"] for e in data["events"]] == [old_payload(e) for e, _ in saga.events]
        as_text = await asyncio.to_thread(_cli, settings, "timeline", str(saga.state.saga_id))
        assert as_text.returncode == 0, as_text.stderr
        first, *lines = as_text.stdout.splitlines()
        definition = "" if saga is rejected else "  definition v1"
        assert first == f"saga {saga.state.saga_id}  transfer {saga.transfer_id}  " + (
            f"{status}{definition}")
        # the header, one line per event, then one per dead letter in the saga's name: the
        # conflicting re-send above (written today, with the saga id) for the completed saga,
        # the refused request (written before 0009, naming only the transfer id) for the
        # rejected one
        letters = [d["reason_code"] for d in data["dead_letters"]]
        assert letters == {"completed": ["CONFLICTING_DUPLICATE"],
                           "rejected": ["INVALID_AMOUNT"], "sanctioned": []}[saga.label]
        assert len(lines) == 1 + len(saga.events) + len(letters)
        assert all(line.split()[3] == "DeadLetter" for line in lines[1 + len(saga.events):])
    [started] = [e for e in json.loads((await asyncio.to_thread(
        _cli, settings, "timeline", completed.transfer_id, "--json")).stdout)["events"]
        if e["type"] == "SagaStarted"]
    assert started["detail"].startswith("definition v1: 10.00 EUR ")
    assert "transfer_id" in started["payload"]  # shown as it was written
    [rejection] = json.loads((await asyncio.to_thread(
        _cli, settings, "timeline", rejected.transfer_id, "--json")).stdout)["events"]
    assert rejection["detail"] == "INVALID_AMOUNT: amount: more decimals than EUR has"
