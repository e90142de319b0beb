"""Running totals on the ledger's entries (ADR 0008), against the real database: the view the
ledger decides on equals the sums, across migration 0007 too, and the checker sees a wrong
total. Each test has a database of its own."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator.ops.checker import check
from orchestrator.participant.runtime import write_statement
from orchestrator.postgres import store
from orchestrator.postgres.store import create_engine, migrate
from orchestrator.settings import Settings
from schemas import Direction, StepCommand
from steps import APPLICATION
from steps.ledger import ENTRIES, LEDGER, AccountView, balances, open_account
from steps.registry import Action, ledger
from tests.integration.conftest import Isolated, database_of_its_own
from tests.integration.test_checker import consume_start, failing
from tests.integration.test_cli import saga_cli

pytestmark = pytest.mark.integration

VIEW_CHECK = "the running totals the ledger decides on equal the sums of the entries"
CHAIN_CHECK = "each entry's running totals are its predecessor's plus its own movement"
STEP = {"reserve": "reserve", "release": "reserve", "credit": "credit",
        "reverse_credit": "credit", "settle": "settle"}
_WRITE = write_statement([ENTRIES])
_TOTALS = ("fence_balance", "fence_held", "fence_settled_total")


def cmd(action: Action, amount: str, source: str, destination: str = "nobody",
        saga_id: uuid.UUID | None = None) -> StepCommand:
    compensating = action in (ledger.RELEASE, ledger.REVERSE_CREDIT)
    return StepCommand(
        command_id=uuid.uuid4(), saga_id=saga_id or uuid.uuid4(), saga_type="transfer",
        step=STEP[action.name], action=action.name,
        direction=Direction.COMPENSATE if compensating else Direction.FORWARD, attempt=1,
        deadline_at=datetime.now(UTC),
        payload={"transfer_id": str(uuid.uuid4()), "source_account": source,
                 "destination_account": destination, "amount": amount, "currency": "EUR",
                 "reference": "", "requested_by": "it", "schema_version": 1})


async def decide(conn: AsyncConnection, commands: Sequence[StepCommand]) -> list[dict[str, Any]]:
    """The ledger's own read and rules, as its careful path runs them; the entries' rows."""
    now = datetime.now(UTC)
    view = await LEDGER.read(conn, commands, now, lock=True)
    decided = LEDGER.decide(commands, view, now)
    assert all(d.rows for d in decided), [d.result for d in decided]
    return [row for d in decided for _, row in d.rows]


def decide_as_before(account: str, commands: Sequence[StepCommand]) -> list[dict[str, Any]]:
    """The rows an older ledger would have written (it read its accounts its own way; the rules
    are the same), from a plain view of the account as opened with plenty of funds: only the
    entry's own columns and fence are kept from them."""
    view = AccountView(account, "EUR", False, Decimal("1000.00"), Decimal(0), None, Decimal(0))
    decided = LEDGER.decide(commands, {account: view}, datetime.now(UTC))
    return [row for d in decided for _, row in d.rows]


async def write(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """The runtime's one-statement write (no stored replies here, only the entries)."""
    params: dict[str, Any] = {f"r_{k}": [] for k in
                              ("saga", "step", "direction", "participant", "outcome", "reply")}
    for column, _ in ENTRIES.columns:
        params[f"x0_{column}"] = [row[column] for row in rows]
    await conn.execute(_WRITE, params)


async def insert_as_of(conn: AsyncConnection, rows: Sequence[dict[str, Any]],
                       recorded_at: datetime, *, columns: Sequence[str]) -> None:
    """Rows as an older ledger wrote them: only `columns`, at a chosen time."""
    names = [*columns, "recorded_at"]
    await conn.execute(
        text(f"INSERT INTO ledger_entries ({', '.join(names)})"
             f" VALUES ({', '.join(':' + n for n in names)})"),
        [{**{c: row[c] for c in columns}, "recorded_at": recorded_at} for row in rows])


def transfer_out(account: str, amount: str) -> list[StepCommand]:
    saga_id = uuid.uuid4()
    return [cmd(ledger.RESERVE, amount, account, saga_id=saga_id),
            cmd(ledger.SETTLE, amount, account, saga_id=saga_id)]


async def views(engine: AsyncEngine, *ids: str) -> tuple[dict[str, AccountView],
                                                         dict[str, AccountView]]:
    """What the ledger decides on, and the truth (the sums), for the same moment."""
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        fast = await LEDGER.read(
            conn, [cmd(ledger.RESERVE, "1", i) for i in ids], now, lock=False)
        truth = await balances(conn, list(ids))
    return fast, truth


def summary(view: AccountView) -> tuple[Decimal, Decimal, Decimal, Decimal, int]:
    return (view.balance, view.held, view.settled_today, view.settled_total, view.fence_seq)


@pytest.fixture
async def own_database(stack_settings: Settings, engine: AsyncEngine
                       ) -> AsyncIterator[AsyncEngine]:
    """An empty database of its own, no migration applied."""
    async with database_of_its_own(engine, stack_settings, "totals_it") as url:
        own = create_engine(url, pool_size=2)
        try:
            yield own
        finally:
            await own.dispose()


async def migrate_up_to(engine: AsyncEngine, last: str, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    subset = tmp_path / last
    subset.mkdir()
    # The engine's and the ledger's migrations up to `last`, in the order they were written.
    for folder in (store.MIGRATIONS_DIR, *APPLICATION.migrations):
        for path in sorted(folder.glob("*.sql")):
            if path.name[:4] <= last:
                shutil.copy(path, subset / path.name)
    with monkeypatch.context() as patch:
        patch.setattr(store, "MIGRATIONS_DIR", subset)
        await migrate(engine)


async def test_a_database_with_entries_from_before_the_totals_keeps_exact_balances(
        own_database: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = own_database
    yesterday = datetime.now(UTC) - timedelta(days=1)
    today = datetime.now(UTC)
    legacy = ("saga_id", "step", "direction", "currency", "amount", "debit_account",
              "credit_account", "hold_account", "hold_delta")
    fenced = (*legacy, "fence_account", "fence_seq")

    # Before the fence (0005): unfenced entries, settled yesterday and today.
    await migrate_up_to(db, "0004", tmp_path, monkeypatch)
    async with db.begin() as conn:
        for account, opening in (("old", "100.00"), ("mid", "50.00")):
            await open_account(conn, account, "EUR", Decimal(opening), Decimal("1000.00"))
        await insert_as_of(conn, decide_as_before("old", transfer_out("old", "40.00")),
                           yesterday, columns=legacy)
        await insert_as_of(conn, decide_as_before("old", transfer_out("old", "10.00")),
                           today, columns=legacy)

    # Fenced, but before the running totals (0007): today on `old`, yesterday on `mid`.
    await migrate_up_to(db, "0006", tmp_path, monkeypatch)
    async with db.begin() as conn:
        await insert_as_of(conn, decide_as_before("old", transfer_out("old", "5.00")), today,
                           columns=fenced)
        await insert_as_of(conn, decide_as_before("mid", transfer_out("mid", "7.00")),
                           yesterday, columns=fenced)
        assert (await conn.execute(text(
            "SELECT count(*) FROM ledger_entries WHERE fence_account IS NOT NULL"))
        ).scalar_one() == 4

    assert await migrate(db, APPLICATION.migrations) == [  # the engine's first
        "0008_participant_replies.sql", "0009_generic_sagas.sql", "0010_trace_context.sql",
        "0011_dead_letter_redriven_by.sql", "0012_dead_letters_by_saga.sql",
        "0007_ledger_running_totals.sql"]
    fast, truth = await views(db, "old", "mid")
    # (balance, held, settled today, settled ever, fence number)
    assert summary(fast["old"]) == summary(truth["old"]) == (
        Decimal("45.00"), 0, Decimal("15.00"), Decimal("55.00"), 2)
    assert summary(fast["mid"]) == summary(truth["mid"]) == (
        Decimal("43.00"), 0, 0, Decimal("7.00"), 2)

    # The next entries, written as the ledger writes them, carry exact totals.
    async with db.begin() as conn:
        rows = await decide(conn, [*transfer_out("old", "3.00"), *transfer_out("mid", "2.00")])
        await write(conn, rows)
    assert [(r["fence_account"], r["fence_seq"], *(r[t] for t in _TOTALS)) for r in rows] == [
        ("old", 3, Decimal("45.00"), Decimal("3.00"), Decimal("55.00")),
        ("old", 4, Decimal("42.00"), 0, Decimal("58.00")),
        ("mid", 3, Decimal("43.00"), Decimal("2.00"), Decimal("7.00")),
        ("mid", 4, Decimal("41.00"), 0, Decimal("9.00")),
    ]
    fast, truth = await views(db, "old", "mid")
    assert summary(fast["old"]) == summary(truth["old"]) == (
        Decimal("42.00"), 0, Decimal("18.00"), Decimal("58.00"), 4)
    assert summary(fast["mid"]) == summary(truth["mid"]) == (
        Decimal("41.00"), 0, Decimal("2.00"), Decimal("9.00"), 4)

    # An account whose chain began before today: the day starts from its last entry before.
    async with db.begin() as conn:
        await open_account(conn, "fresh", "EUR", Decimal("80.00"), Decimal("30.00"))
        await insert_as_of(conn, await decide(conn, transfer_out("fresh", "25.00")), yesterday,
                           columns=(*fenced, *_TOTALS))
        await write(conn, await decide(conn, transfer_out("fresh", "20.00")))
    fast, truth = await views(db, "fresh")
    assert summary(fast["fresh"]) == summary(truth["fresh"]) == (
        Decimal("35.00"), 0, Decimal("20.00"), Decimal("45.00"), 4)
    # ...which the daily limit of 30.00 is decided against: 20 settled today, 10.01 is too much.
    async with db.begin() as conn:
        over = transfer_out("fresh", "10.01")
        await write(conn, await decide(conn, over[:1]))
        now = datetime.now(UTC)
        [refused] = LEDGER.decide(over[1:], await LEDGER.read(
            conn, over[1:], now, lock=True), now)
    assert refused.result.code == "DAILY_LIMIT_EXCEEDED", refused.result

    report = await check(db, APPLICATION)
    ours = [c for c in report.checks if c.name in (VIEW_CHECK, CHAIN_CHECK)]
    assert [(c.invariant, c.ok) for c in ours] == [("I7", True), ("I7", True)], ours


async def test_a_wrong_running_total_is_a_violation(isolated: Isolated) -> None:
    db = isolated.engine
    _, saga_a = await consume_start(isolated, offset=0)
    _, saga_b = await consume_start(isolated, offset=1)
    async with db.begin() as conn:
        await open_account(conn, "a", "EUR", Decimal("10.00"))
        await open_account(conn, "b", "EUR", Decimal("0.00"))
        for saga_id in (saga_a, saga_b):
            await write(conn, await decide(conn, [
                cmd(ledger.RESERVE, "1.00", "a", "b", saga_id),
                cmd(ledger.CREDIT, "1.00", "a", "b", saga_id),
                cmd(ledger.SETTLE, "1.00", "a", "b", saga_id)]))
    healthy = await check(db, APPLICATION)
    assert healthy.ok, healthy.failures()

    async def tamper(account: str, seq: int, by: str) -> None:
        # The table is append-only; only a saboteur with the owner's rights gets past that.
        async with db.begin() as conn:
            await conn.execute(text(
                "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only"))
            await conn.execute(text(
                "UPDATE ledger_entries SET fence_balance = fence_balance + :by"
                " WHERE fence_account = :a AND fence_seq = :s"), {"by": Decimal(by),
                                                                   "a": account, "s": seq})
            await conn.execute(text(
                "ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only"))

    # An entry inside the chain: the view is still right, the chain is not.
    await tamper("a", 2, "5.00")
    inside = await check(db, APPLICATION)
    assert [(c.invariant, c.name) for c in inside.failures()] == [("I7", CHAIN_CHECK)]
    # The rows are named in plain text (ids, times in ISO 8601), not in Python reprs.
    assert "(a, 3" in inside.failures()[0].detail or "(a, 2" in inside.failures()[0].detail
    await tamper("a", 2, "-5.00")
    assert (await check(db, APPLICATION)).ok

    # The latest entry: what the next decision would read (a 5.00 overdraft waiting to happen).
    await tamper("a", 4, "5.00")
    latest = await check(db, APPLICATION)
    assert [(c.invariant, c.name) for c in latest.failures()] == [
        ("I7", VIEW_CHECK), ("I7", CHAIN_CHECK)]
    # Named in plain text: the account, the column, the view's value and the truth.
    assert "(a, (balance, 13.0000, 8.0000))" in latest.failures()[0].detail
    # Money is still conserved by the sums: I1 cannot see this, only I7 does.
    assert latest.money_conserved

    result = await saga_cli(isolated.harness, "check", "--json")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert [c["name"] for c in failing(json.loads(result.stdout))] == [VIEW_CHECK, CHAIN_CHECK]


async def _blocks(conn: AsyncConnection, sql: str, params: dict[str, Any]) -> int:
    """Buffers the query touched (hit or read), all plan nodes included: a measure of work that,
    unlike time, does not depend on the machine's load."""
    plan = (await conn.execute(text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql),
                               params)).scalar_one()
    top = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


async def test_the_view_costs_the_same_whatever_the_history(isolated: Isolated) -> None:
    from steps.ledger import ACCOUNT_VIEW_SQL, CUSTOMER_VIEW_SQL

    db = isolated.engine
    async with db.begin() as conn:
        await open_account(conn, "hot", "EUR", Decimal("1000000.00"), Decimal("1000000.00"))
        await open_account(conn, "cold", "EUR", Decimal("100.00"), Decimal("1000.00"))
        await write(conn, await decide(conn, transfer_out("cold", "1.00")))
        # 3,000 entries on `hot`, half of them before today: the view's cost must not see them.
        await insert_as_of(conn, await decide(conn, [
            c for _ in range(750) for c in transfer_out("hot", "1.00")]),
            datetime.now(UTC) - timedelta(days=1), columns=[c for c, _ in ENTRIES.columns])
        await write(conn, await decide(conn, [
            c for _ in range(750) for c in transfer_out("hot", "2.00")]))
        await conn.execute(text("ANALYZE ledger_entries"))
    fast, truth = await views(db, "hot", "cold")
    assert summary(fast["hot"]) == summary(truth["hot"]) == (
        Decimal("997750.00"), 0, Decimal("1500.00"), Decimal("2250.00"), 3000)

    sql = CUSTOMER_VIEW_SQL + "  AND a.account_id = ANY(:ids)"
    async with db.connect() as conn:
        now = datetime.now(UTC)
        cold = await _blocks(conn, sql, {"ids": ["cold"], "now": now})
        hot = await _blocks(conn, sql, {"ids": ["hot"], "now": now})
        summed = await _blocks(conn, ACCOUNT_VIEW_SQL + "WHERE a.account_id = ANY(:ids)",
                               {"ids": ["hot"], "now": now})
    # A few index probes each (a B-tree one level deeper at most), where the sums visit the
    # history: 3,000 entries span some sixty heap pages and their index entries.
    assert hot <= cold + 6, (hot, cold, summed)
    assert summed > 4 * hot, (hot, cold, summed)
