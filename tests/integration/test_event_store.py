"""The event store's guarantees, enforced by PostgreSQL itself."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from orchestrator.ops.checker import replay_mismatches
from orchestrator.ops.queries import SAGA_DEAD_LETTERS
from orchestrator.postgres.store import HeldConnection, rebuild_projection
from tests.integration.conftest import Harness

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("statement", [
    "UPDATE saga_events SET type = 'Tampered' WHERE saga_id = :s",
    "DELETE FROM saga_events WHERE saga_id = :s",
    "TRUNCATE saga_events",
    "UPDATE ledger_entries SET amount = 1 WHERE saga_id = :s",
    "DELETE FROM ledger_entries WHERE saga_id = :s",
    "TRUNCATE ledger_entries CASCADE",
])
async def test_history_cannot_be_rewritten(harness: Harness, statement: str) -> None:
    source = await harness.open("src", "10.00")
    destination = await harness.open("dst", "0.00")
    request = harness.request(source, destination, "1.00")
    harness.publish(request)
    saga = await harness.wait_terminal(request["transfer_id"])

    with pytest.raises(DBAPIError, match="append-only"):
        async with harness.engine.begin() as conn:
            await conn.execute(text(statement), {"s": saga.saga_id})

    assert len(await harness.events(saga.saga_id)) == saga.version


async def test_projection_rebuilt_from_events_equals_the_live_one(harness: Harness) -> None:
    source = await harness.open("src", "50.00", daily_limit="5.00")
    destination = await harness.open("dst", "0.00")
    requests = [harness.request(source, destination, amount) for amount in ("1.00", "9.00")]
    for request in requests:
        harness.publish(request)
    for request in requests:
        await harness.wait_terminal(request["transfer_id"])
    columns = ("saga_id, saga_type, business_key, definition_version, status, current_step,"
               " direction, attempt, version, deadline_at, requested_at, state")

    async with harness.engine.connect() as conn:
        # Hold off the workers' writes so both reads see the same history.
        await conn.execute(text("LOCK TABLE sagas IN EXCLUSIVE MODE"))
        live = (await conn.execute(text(f"SELECT {columns} FROM sagas ORDER BY saga_id"))).all()
        assert await replay_mismatches(conn) == []
        rebuilt_count = await rebuild_projection(conn)
        rebuilt = (await conn.execute(text(f"SELECT {columns} FROM sagas ORDER BY saga_id"))).all()
        await conn.rollback()  # leave the live projection to the workers

    assert rebuilt_count == len(live) >= 2
    assert rebuilt == live


async def test_a_held_connection_is_kept_and_replaced_once_its_session_is_gone(
        harness: Harness) -> None:
    """The one-statement writes keep one autocommit connection (`HeldConnection`): the same
    server session batch after batch, and after an error a new one, so a session the server
    ended (a restart, a terminated backend) costs one failed batch and no more."""
    held = HeldConnection(harness.engine)
    pid_of = text("SELECT pg_backend_pid()")
    try:
        async with held.use() as conn:
            first = (await conn.execute(pid_of)).scalar_one()
        async with held.use() as conn:
            assert (await conn.execute(pid_of)).scalar_one() == first
            # Autocommit: nothing is left open between statements.
            assert (await conn.execute(text(
                "SELECT state FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ))).scalar_one() == "active"
        async with harness.engine.connect() as admin:
            await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        with pytest.raises(DBAPIError):
            async with held.use() as conn:
                await conn.execute(pid_of)
        async with held.use() as conn:
            second = (await conn.execute(pid_of)).scalar_one()
    finally:
        await held.close()
    assert second != first
    async with harness.engine.connect() as admin:
        # Given back to the pool when the worker closes it, with no transaction left open.
        assert (await admin.execute(text(
            "SELECT state FROM pg_stat_activity WHERE pid = :pid"), {"pid": second}
        )).scalar_one() == "idle"


async def test_a_timeline_finds_its_dead_letters_through_indexes(harness: Harness) -> None:
    """Both halves of the timeline's dead-letter lookup can use an index (migration 0012):
    with sequential scans priced out, the plan reads the two partial indexes, not the table."""
    async with harness.engine.connect() as conn:
        await conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join((await conn.execute(text(f"EXPLAIN {SAGA_DEAD_LETTERS}"), {
            "id": "00000000-0000-0000-0000-000000000001", "type": "transfer",
            "key": "k"})).scalars())
    assert "dead_letters_by_saga" in plan and "dead_letters_by_key" in plan, plan
    assert "Seq Scan" not in plan, plan
