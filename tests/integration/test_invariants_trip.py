"""Every check of `saga check` is one a broken database trips.

A healthy database is made once for the module the way production makes one: the real workers
run against a database and topics of their own and carry transfers to every end (completed,
compensated, rejected at intake with and without a saga), and an operator redrives a dead
letter. Each test then copies it (`CREATE DATABASE ... TEMPLATE`), breaks the copy in one way,
with the append-only triggers disabled where the break needs it, runs the real `saga check`
as a process, and expects exit 1 with the invariant and the check named, in the text output
and in `--json`. Nothing else may fail but what the break explains: the set of failing checks
is asserted whole, so each case also shows which other checks the same damage reaches.

I8 (`saga check --against-topic`) reads the broker, not the database: test_checker.py publishes
requests nobody reads and sees it fail the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator.cli import build_parser, cmd_check
from orchestrator.consuming import message_id_of
from orchestrator.core.saga import decide_start, evolve
from orchestrator.kafka.consumer import Consumed, ensure_topics
from orchestrator.ops.checker import check
from orchestrator.ops.dlq import redrive
from orchestrator.postgres import store
from orchestrator.postgres.store import create_engine, migrate
from orchestrator.settings import Settings
from orchestrator.workers.runner import run_worker, workers_ready
from orchestrator.workers.saga_worker import CONSUMER
from schemas import TOPIC_TRANSFER_COMMANDS, TransferRequested
from steps import APPLICATION, TRANSFER
from steps.saga import TRANSFER_TYPE
from tests.integration.conftest import Harness, admin, database_url
from tests.integration.test_cli import saga_cli
from tests.integration.test_dlq import eventually, redriven_message_id

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# The checks, by the names `saga check` prints.
I1_SUM = "sum of balances equals sum of opening balances"
I1_NETS = "each terminal saga moved all of its amount or nothing"
I1_ZERO = "with nothing in flight, clearing and holds are zero"
I2_ONCE = "at most one entry per (saga, step, direction)"
I2_FORWARD = "compensation entries only where the forward entry exists"
I3_DUE = "every saga in flight is due at some time (recovery will look at it)"
I3_TERMINAL = "every saga is terminal"
I4_GAPLESS = "event log gapless per saga (seq 1..n)"
I4_TRIGGERS = "append-only triggers enabled on saga_events"
I4_PAIRED = "every event log has its projection row and every projection row its events"
I4_REPLAY = "replaying events reproduces every saga's projection"
I4_VERSION = "projection version equals event count"
I5_VERDICT = ("every consumed message's verdict is backed by what it recorded (its events,"
              " its saga, or its dead letter)")
I5_REQUESTS = "every consumed request led to a saga or a dead letter"
I5_REASON = "every dead letter carries a known reason code and a reason"
I5_REDRIVE = "every redriven dead letter was republished once and, once published, consumed"
I6_OUTBOX = "no outbox row left unpublished"
I7_NEGATIVE = "no customer balance or available balance below zero"
I7_TIED = "every ledger entry is tied to a known saga"
I7_VIEW = "the running totals the ledger decides on equal the sums of the entries"
I7_CHAIN = "each entry's running totals are its predecessor's plus its own movement"


@dataclass(frozen=True)
class Healthy:
    """The healthy database (a template now: nothing connects to it) and what the breaks aim
    at in it."""

    database: str
    source: str  # a customer account with a completed transfer out of it (two fenced entries)
    destination: str
    poor: str  # 5.00 opened, 1.00 sent
    completed: uuid.UUID  # saga: 10.00 from source to destination
    poor_completed: uuid.UUID  # saga: 1.00 from poor to destination
    compensated: uuid.UUID  # saga: credit refused (closed destination), reserve released
    rejected: uuid.UUID  # saga: refused at intake (zero amount), no entry
    rejected_letter: uuid.UUID  # dead letter of a request refused at intake, with a saga
    malformed_letter: uuid.UUID  # dead letter of a malformed request (no saga), redriven
    redriven_copy: str  # inbox message id of the malformed request's redriven copy


async def _copy_database(engine: AsyncEngine, template: str, name: str) -> None:
    """A copy of `template`; waits out the moment its last sessions take to close."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await admin(engine, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            return
        except DBAPIError as error:
            if "being accessed by other users" not in str(error) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _all_published(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        return not (await conn.execute(text(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"))).scalar_one()


async def _make_healthy(settings: Settings, engine: AsyncEngine, name: str) -> Healthy:
    """Run the workers on the database `name` until every transfer ended and every outbox row
    went out; stop them."""
    await asyncio.to_thread(ensure_topics, settings)
    stop = asyncio.Event()
    names = {kind: f"trip-{kind}-{uuid.uuid4().hex[:6]}" for kind in APPLICATION.worker_kinds}
    tasks = [asyncio.create_task(run_worker(kind, settings.model_copy(
        update={"worker_name": names[kind]}), stop)) for kind in APPLICATION.worker_kinds]
    upstream = Harness(settings, engine)
    try:
        deadline = time.monotonic() + 60
        while not await workers_ready(engine, set(names.values())):
            for task in tasks:
                if task.done():
                    task.result()
            assert time.monotonic() < deadline, "workers did not get their partitions in 60 s"
            await asyncio.sleep(0.1)
        source = await upstream.open("src", "100.00")
        destination = await upstream.open("dst", "0.00")
        poor = await upstream.open("poor", "5.00")
        undo_source = await upstream.open("undo", "100.00")
        closed = await upstream.open("closed", "0.00", closed=True)
        await upstream.open("yen", "1000", currency="JPY")  # so that clearing.JPY exists
        completed = upstream.request(source, destination, "10.00")
        poor_completed = upstream.request(poor, destination, "1.00")
        compensated = upstream.request(undo_source, closed, "2.00")
        rejected = upstream.request(source, destination, "0.00")  # refused: zero amount
        malformed = f'{{"transfer_id": "{uuid.uuid4()}", "amount": '.encode()
        for request in (completed, poor_completed, compensated, rejected):
            upstream.publish(request)
        upstream.publish(malformed)
        ends = {r["transfer_id"]: (await upstream.wait_terminal(r["transfer_id"], 60))
                for r in (completed, poor_completed, compensated, rejected)}
        assert [ends[r["transfer_id"]].status for r in (
            completed, poor_completed, compensated, rejected)] == [
            "COMPLETED", "COMPLETED", "COMPENSATED", "REJECTED"]
        rejected_letter = await upstream.wait_dead_letter(json.dumps(rejected).encode())
        malformed_letter = await upstream.wait_dead_letter(malformed)
        malformed_id = uuid.UUID(str(malformed_letter.dead_letter_id))
        async with engine.begin() as conn:
            assert (await redrive(conn, [str(malformed_id)], actor="it")).redriven == (
                malformed_id,)
        copy = redriven_message_id(malformed, malformed_id)

        async def consumed() -> bool:
            async with engine.connect() as conn:
                return bool((await conn.execute(text(
                    "SELECT count(*) FROM inbox WHERE consumer = :c AND message_id = :m"),
                    {"c": CONSUMER, "m": copy})).scalar_one())

        await eventually(consumed, "the redriven copy was never consumed")
        await eventually(lambda: _all_published(engine), "the outbox never emptied", 60)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        upstream.close()
    return Healthy(
        database=name, source=source, destination=destination, poor=poor,
        completed=ends[completed["transfer_id"]].saga_id,
        poor_completed=ends[poor_completed["transfer_id"]].saga_id,
        compensated=ends[compensated["transfer_id"]].saga_id,
        rejected=ends[rejected["transfer_id"]].saga_id,
        rejected_letter=uuid.UUID(str(rejected_letter.dead_letter_id)),
        malformed_letter=malformed_id, redriven_copy=copy)


@pytest.fixture(scope="module")
async def healthy(stack_settings: Settings, engine: AsyncEngine) -> AsyncIterator[Healthy]:
    name = f"trip_healthy_{uuid.uuid4().hex[:10]}"
    try:
        await admin(engine, f'CREATE DATABASE "{name}"')
    except DBAPIError as error:
        pytest.skip(f"cannot create a database of its own on this server: {error}")
    settings = stack_settings.model_copy(update={
        "database_url": database_url(stack_settings, name),
        "topic_prefix": f"trip-{uuid.uuid4().hex[:8]}."})
    own = create_engine(database_url(stack_settings, name), pool_size=2)
    try:
        await migrate(own, APPLICATION.migrations)
        made = await _make_healthy(settings, own, name)
        report = await check(own, APPLICATION, expect_quiescent=True)
        assert report.ok, report.failures()
    finally:
        await own.dispose()
    try:
        yield made
    finally:
        await admin(engine, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class Broken:
    engine: AsyncEngine
    harness: Harness  # its settings point at the copy, for `saga_cli`


@pytest.fixture
async def broken(stack_settings: Settings, engine: AsyncEngine, healthy: Healthy
                 ) -> AsyncIterator[Broken]:
    """A fresh copy of the healthy database, for one test to break."""
    name = f"trip_case_{uuid.uuid4().hex[:10]}"
    await _copy_database(engine, healthy.database, name)
    url = database_url(stack_settings, name)
    own = create_engine(url, pool_size=2)
    harness = Harness(stack_settings.model_copy(update={"database_url": url}), own)
    try:
        yield Broken(own, harness)
    finally:
        harness.close()
        await own.dispose()
        await admin(engine, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- how a database gets broken ---------------------------------------------------------------

async def add_entry(conn: AsyncConnection, saga_id: uuid.UUID, step: str, direction: str,
                    amount: str, *, fence: str, debit: str | None = None,
                    credit: str | None = None, hold: str | None = None,
                    hold_delta: str = "0") -> None:
    """An entry as the ledger writes one: fenced by `fence` with its next number and carrying
    its running totals, so the fence and the chain of totals stay whole and only the damage
    the entry itself does shows."""
    latest = (await conn.execute(text(
        "SELECT fence_seq, fence_balance, fence_held, fence_settled_total FROM ledger_entries"
        " WHERE fence_account = :a ORDER BY fence_seq DESC LIMIT 1"), {"a": fence})).first()
    seq, balance, held, settled = latest or (0, Decimal(0), Decimal(0), Decimal(0))
    moved = Decimal(amount)
    balance += (moved if credit == fence else 0) - (moved if debit == fence else 0)
    held += Decimal(hold_delta) if hold == fence else 0
    settled += moved if step == "settle" and debit == fence else 0
    await conn.execute(text(
        "INSERT INTO ledger_entries (saga_id, step, direction, currency, amount, debit_account,"
        " credit_account, hold_account, hold_delta, fence_account, fence_seq, fence_balance,"
        " fence_held, fence_settled_total) VALUES (:saga, :step, :direction, 'EUR', :amount,"
        " :debit, :credit, :hold, :hold_delta, :fence, :seq, :balance, :held, :settled)"),
        {"saga": saga_id, "step": step, "direction": direction, "amount": moved,
         "debit": debit, "credit": credit, "hold": hold, "hold_delta": Decimal(hold_delta),
         "fence": fence, "seq": seq + 1, "balance": balance, "held": held,
         "settled": settled})


async def without_trigger(conn: AsyncConnection, table: str, sql: str,
                          params: dict[str, Any] | None = None) -> None:
    """Run `sql` with `table`'s append-only trigger disabled, and enable it again in the same
    transaction: the damage stays, the trigger is back."""
    await conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER {table}_append_only"))
    await conn.execute(text(sql), params or {})
    await conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER {table}_append_only"))


async def start_saga(conn: AsyncConnection, first_events: int | None = None) -> uuid.UUID:
    """A transfer consumed and started as the orchestrator records it (inbox row, events with
    their causation, projection), at its decision's first `first_events` events (all of them
    by default); no step command is written, so the outbox has nothing pending."""
    now = datetime.now(UTC)
    request = TransferRequested(transfer_id=uuid.uuid4(), source_account="x",
                                destination_account="y", amount="1.00", currency="EUR",
                                requested_by="it")
    message = Consumed(f"trip.{TOPIC_TRANSFER_COMMANDS}", 0, 0, None,
                       request.model_dump_json().encode(), (), None)
    decision = decide_start(TRANSFER, None, TRANSFER_TYPE.start(request), now)
    state = None
    events = []
    for event in decision.events[:first_events]:
        state = evolve(state, event)
        events.append(store.NewEvent(state.saga_id, state.version, event, "it",
                                     message_id_of(message)))
    assert state is not None
    inbox = store.InboxRow(message_id_of(message), message.topic, 0, 0, "started",
                           state.saga_id)
    await store.write_batch(conn, CONSUMER, [inbox], events, [state], [], [], now)
    return state.saga_id


Break = Callable[[AsyncConnection, Healthy], Awaitable[Any]]


async def cross_currency_entry(conn: AsyncConnection, h: Healthy) -> None:
    # The ledger credits a JPY account from the EUR clearing: euros vanish, yen appear.
    await add_entry(conn, h.completed, "fx", "forward", "5.00", debit="clearing.EUR",
                    credit="clearing.JPY", fence="clearing.JPY")


async def release_lost(conn: AsyncConnection, h: Healthy) -> None:
    await without_trigger(conn, "ledger_entries", (
        "DELETE FROM ledger_entries WHERE saga_id = :s AND direction = 'compensate'"),
        {"s": h.compensated})


async def reserve_applied_twice(conn: AsyncConnection, h: Healthy) -> None:
    # Only without its unique key can the ledger write one effect twice.
    [key] = (await conn.execute(text(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'ledger_entries'::regclass"
        " AND contype = 'u'"))).scalars()
    await conn.execute(text(f'ALTER TABLE ledger_entries DROP CONSTRAINT "{key}"'))
    await add_entry(conn, h.completed, "reserve", "forward", "10.00", fence=h.source,
                    hold=h.source, hold_delta="10.00")


async def compensation_without_forward(conn: AsyncConnection, h: Healthy) -> None:
    # A release for the saga refused at intake, which never reserved anything: the ledger
    # must answer such a compensation with a no-op (and a tombstone), never with an entry.
    await add_entry(conn, h.rejected, "reserve", "compensate", "3.00", fence=h.source,
                    hold=h.source, hold_delta="-3.00")


async def saga_without_due_time(conn: AsyncConnection, h: Healthy) -> None:
    # Started, but its first command never recorded: nothing will ever look at it again.
    await start_saga(conn, first_events=1)


async def saga_in_flight(conn: AsyncConnection, h: Healthy) -> None:
    await start_saga(conn)


async def event_past_a_gap(conn: AsyncConnection, h: Healthy) -> None:
    # An append that skipped a number (no trigger stops an INSERT).
    await conn.execute(text(
        "INSERT INTO saga_events (saga_id, seq, type, step, attempt, payload, actor,"
        " causation_id) SELECT saga_id, seq + 2, type, step, attempt, payload, actor,"
        " causation_id FROM saga_events WHERE saga_id = :s"
        " AND seq = (SELECT max(seq) FROM saga_events WHERE saga_id = :s)"),
        {"s": h.completed})


async def trigger_disabled(conn: AsyncConnection, h: Healthy) -> None:
    await conn.execute(text("ALTER TABLE saga_events DISABLE TRIGGER saga_events_append_only"))


async def cached_state_edited(conn: AsyncConnection, h: Healthy) -> None:
    await conn.execute(text(
        "UPDATE sagas SET state = jsonb_set(state, '{failure}', '\"edited by hand\"')"
        " WHERE saga_id = :s"), {"s": h.completed})


async def status_column_edited(conn: AsyncConnection, h: Healthy) -> None:
    # What `saga list` and the runbook's queries read, while the cached state still says
    # COMPENSATED.
    await conn.execute(text("UPDATE sagas SET status = 'FAILED' WHERE saga_id = :s"),
                       {"s": h.compensated})


async def projection_without_events(conn: AsyncConnection, h: Healthy) -> None:
    phantom = uuid.uuid4()
    await conn.execute(text(
        "INSERT INTO sagas (saga_id, saga_type, business_key, definition_version, status,"
        " current_step, direction, attempt, version, deadline_at, due_at, requested_at,"
        " created_at, updated_at, state)"
        " SELECT :phantom, saga_type, gen_random_uuid()::text, definition_version, status,"
        " current_step, direction, attempt, version, deadline_at, due_at, requested_at,"
        " created_at, updated_at, state"
        " FROM sagas WHERE saga_id = :s"), {"phantom": phantom, "s": h.completed})


async def version_drifted(conn: AsyncConnection, h: Healthy) -> None:
    await conn.execute(text("UPDATE sagas SET version = version + 1 WHERE saga_id = :s"),
                       {"s": h.completed})


async def rejection_letter_lost(conn: AsyncConnection, h: Healthy) -> None:
    # The refused request still has its REJECTED saga, but the dead letter its verdict
    # promises is gone.
    await conn.execute(text("DELETE FROM dead_letters WHERE dead_letter_id = :d"),
                       {"d": h.rejected_letter})


async def verdict_unknown(conn: AsyncConnection, h: Healthy) -> None:
    # The old check's case, an empty verdict, is one way of a verdict nothing explains.
    await conn.execute(text("UPDATE inbox SET verdict = '' WHERE message_id = :m"),
                       {"m": h.redriven_copy})


async def malformed_letter_lost(conn: AsyncConnection, h: Healthy) -> None:
    # A request with no saga, whose only trace was its dead letter.
    await conn.execute(text(
        "DELETE FROM dead_letters WHERE payload = (SELECT payload FROM dead_letters"
        " WHERE dead_letter_id = :d)"), {"d": h.malformed_letter})


async def reason_blank(conn: AsyncConnection, h: Healthy) -> None:
    await conn.execute(text("UPDATE dead_letters SET reason = ' ' WHERE dead_letter_id = :d"),
                       {"d": h.rejected_letter})


async def redrive_never_republished(conn: AsyncConnection, h: Healthy) -> None:
    await conn.execute(text(
        "UPDATE dead_letters SET redriven_at = now() WHERE dead_letter_id = :d"),
        {"d": h.rejected_letter})


async def redrive_republished_twice(conn: AsyncConnection, h: Healthy) -> None:
    await conn.execute(text(
        "INSERT INTO outbox (topic, key, value, headers, saga_id, created_at, published_at)"
        " SELECT topic, key, value, headers, saga_id, created_at, published_at FROM outbox"
        " WHERE right(topic, length(:t)) = :t AND headers::text LIKE '%saga-redrive-id%'"),
        {"t": TOPIC_TRANSFER_COMMANDS})


async def redriven_copy_never_consumed(conn: AsyncConnection, h: Healthy) -> None:
    await conn.execute(text("DELETE FROM inbox WHERE message_id = :m"), {"m": h.redriven_copy})


async def outbox_row_left(conn: AsyncConnection, h: Healthy) -> None:
    # A committed step command whose publication was never recorded, a minute ago.
    await conn.execute(text(
        "UPDATE outbox SET published_at = NULL, created_at = now() - interval '1 minute'"
        " WHERE id = (SELECT min(id) FROM outbox)"))


async def overdraft(conn: AsyncConnection, h: Healthy) -> None:
    await add_entry(conn, h.poor_completed, "fee", "forward", "50.00", fence=h.poor,
                    debit=h.poor, credit="clearing.EUR")


async def entry_of_no_saga(conn: AsyncConnection, h: Healthy) -> None:
    await add_entry(conn, uuid.uuid4(), "reserve", "forward", "3.00", fence=h.source,
                    hold=h.source, hold_delta="3.00")


async def opening_balance_edited(conn: AsyncConnection, h: Healthy) -> None:
    # Money out of nowhere, without an entry: both sides of I1's sum move together.
    await conn.execute(text(
        "UPDATE accounts SET opening_balance = opening_balance + 1000 WHERE account_id = :a"),
        {"a": h.source})


async def running_total_edited(conn: AsyncConnection, h: Healthy) -> None:
    await without_trigger(conn, "ledger_entries", (
        "UPDATE ledger_entries SET fence_balance = fence_balance + 1"
        " WHERE fence_account = :a AND fence_seq = 1"), {"a": h.source})


@dataclass(frozen=True)
class Case:
    invariant: str
    check: str
    damage: Break
    # Every check that fails, the one above included (as `saga check --json` lists them).
    failing: tuple[tuple[str, str], ...]
    args: tuple[str, ...] = ()


CASES = [
    Case("I1", I1_SUM, cross_currency_entry,
         (("I1", I1_SUM), ("I1", I1_NETS), ("I1", I1_ZERO))),
    Case("I1", I1_NETS, release_lost, (("I1", I1_NETS), ("I1", I1_ZERO))),
    Case("I2", I2_ONCE, reserve_applied_twice,
         (("I1", I1_NETS), ("I1", I1_ZERO), ("I2", I2_ONCE))),
    Case("I2", I2_FORWARD, compensation_without_forward,
         (("I1", I1_NETS), ("I1", I1_ZERO), ("I2", I2_FORWARD))),
    Case("I3", I3_DUE, saga_without_due_time, (("I3", I3_DUE),)),
    Case("I3", I3_TERMINAL, saga_in_flight, (("I3", I3_TERMINAL),), ("--quiescent",)),
    Case("I4", I4_GAPLESS, event_past_a_gap,
         (("I4", I4_GAPLESS), ("I4", I4_REPLAY), ("I4", I4_VERSION))),
    Case("I4", I4_TRIGGERS, trigger_disabled, (("I4", I4_TRIGGERS),)),
    Case("I4", I4_PAIRED, projection_without_events, (("I4", I4_PAIRED),)),
    Case("I4", I4_REPLAY, cached_state_edited, (("I4", I4_REPLAY),)),
    Case("I4", I4_REPLAY, status_column_edited, (("I4", I4_REPLAY),)),
    Case("I4", I4_VERSION, version_drifted, (("I4", I4_REPLAY), ("I4", I4_VERSION))),
    Case("I5", I5_VERDICT, rejection_letter_lost, (("I5", I5_VERDICT),)),
    Case("I5", I5_VERDICT, verdict_unknown, (("I5", I5_VERDICT),)),
    Case("I5", I5_REQUESTS, malformed_letter_lost, (("I5", I5_VERDICT), ("I5", I5_REQUESTS))),
    Case("I5", I5_REASON, reason_blank, (("I5", I5_REASON),)),
    Case("I5", I5_REDRIVE, redrive_never_republished, (("I5", I5_REDRIVE),)),
    Case("I5", I5_REDRIVE, redrive_republished_twice, (("I5", I5_REDRIVE),)),
    Case("I5", I5_REDRIVE, redriven_copy_never_consumed, (("I5", I5_REDRIVE),)),
    Case("I6", I6_OUTBOX, outbox_row_left, (("I6", I6_OUTBOX),)),
    Case("I7", I7_NEGATIVE, overdraft, (("I1", I1_NETS), ("I1", I1_ZERO), ("I7", I7_NEGATIVE))),
    Case("I7", I7_TIED, entry_of_no_saga, (("I1", I1_ZERO), ("I7", I7_TIED))),
    Case("I7", I7_VIEW, opening_balance_edited, (("I7", I7_VIEW),)),
    Case("I7", I7_CHAIN, running_total_edited, (("I7", I7_CHAIN),)),
]


async def test_the_healthy_database_passes_every_check(broken: Broken) -> None:
    """The copy, unbroken: exit 0, even quiescent, so whatever fails below is the damage."""
    result = await saga_cli(broken.harness, "check", "--quiescent", "--json")

    assert result.returncode == 0, (result.stdout, result.stderr)
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert {c["invariant"] for c in report["checks"]} == {f"I{i}" for i in range(1, 8)}
    assert report["counts"]["dead_letters_redriven"] == 1
    assert report["counts"]["messages_unaccounted"] == 0


async def check_in_process(settings: Settings, *args: str) -> tuple[int, str]:
    """`saga check` as its entry point runs it, parser and command, in this process: what it
    prints and its exit code. (The JSON run above is a process of its own; one per case is
    enough to pay for an interpreter's start.)"""
    parsed = build_parser().parse_args(["check", *args])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = await cmd_check(parsed, settings)
    return code, printed.getvalue()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.invariant}-{c.damage.__name__}")
async def test_a_broken_database_trips_its_invariant(broken: Broken, healthy: Healthy,
                                                     case: Case) -> None:
    async with broken.engine.begin() as conn:
        await case.damage(conn, healthy)

    as_json = await saga_cli(broken.harness, "check", "--json", *case.args)
    text_code, as_text = await check_in_process(broken.harness.settings, *case.args)

    assert as_json.returncode == 1, (as_json.stdout, as_json.stderr)
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    failing = [c for c in report["checks"] if not c["ok"]]
    assert {(c["invariant"], c["name"]) for c in failing} == set(case.failing), failing
    assert all(c["detail"] for c in failing), failing  # each says what it found
    assert text_code == 1, as_text
    assert f"VIOLATED  {case.invariant}  {case.check}" in as_text, as_text
