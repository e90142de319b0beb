"""The running totals an entry carries (ADR 0008): computed by the pure `after`, written by
`entry_row`, and always equal to the sums over the account's entries."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import uuid4

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import Direction, StepCommand
from steps.ledger import LEDGER, AccountView
from steps.registry import Action, ledger

PROPERTY = settings(deadline=None, database=None, derandomize=True)
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
STEP = {"reserve": "reserve", "release": "reserve", "credit": "credit",
        "reverse_credit": "credit", "settle": "settle"}


def on_alice(action: Action, amount: Decimal) -> StepCommand:
    """A command whose rule depends on alice: she is the source of reserve, release and settle,
    and the destination of credit and its reversal."""
    compensating = action in (ledger.RELEASE, ledger.REVERSE_CREDIT)
    receives = action in (ledger.CREDIT, ledger.REVERSE_CREDIT)
    return StepCommand(
        command_id=uuid4(), saga_id=uuid4(), saga_type="transfer", step=STEP[action.name],
        action=action.name,
        direction=Direction.COMPENSATE if compensating else Direction.FORWARD,
        attempt=1, deadline_at=NOW,
        payload={"transfer_id": str(uuid4()),
                 "source_account": "bob" if receives else "alice",
                 "destination_account": "alice" if receives else "bob",
                 "amount": str(amount), "currency": "EUR", "reference": "",
                 "requested_by": "test", "schema_version": 1})


def alice(balance: str = "100.00", *, held: str = "0.00", settled_today: str = "0.00",
          settled_total: str = "0.00", fence_seq: int = 0) -> AccountView:
    return AccountView("alice", "EUR", False, Decimal(balance), Decimal(held), None,
                       Decimal(settled_today), fence_seq, Decimal(settled_total))


def rows_of(commands: list[StepCommand], view: AccountView) -> list[dict[str, Any]]:
    decided = LEDGER.decide(commands, {"alice": view}, NOW)
    return [row for d in decided for table, row in d.rows if table == "ledger_entries"]


def totals(row: dict[str, Any]) -> tuple[Decimal, Decimal, Decimal, int]:
    return (row["fence_balance"], row["fence_held"], row["fence_settled_total"],
            row["fence_seq"])


def test_each_entry_carries_the_totals_after_it_on_top_of_the_view() -> None:
    # A settled total from earlier days: it goes on, whatever settled_today says.
    view = alice("100.00", held="10.00", settled_today="5.00", settled_total="250.00",
                 fence_seq=41)
    rows = rows_of([on_alice(ledger.RESERVE, Decimal("30.00")),
                    on_alice(ledger.SETTLE, Decimal("30.00")),
                    on_alice(ledger.CREDIT, Decimal("2.50")),
                    on_alice(ledger.REVERSE_CREDIT, Decimal("1.00")),
                    on_alice(ledger.RELEASE, Decimal("10.00"))], view)

    assert [totals(r) for r in rows] == [
        (Decimal("100.00"), Decimal("40.00"), Decimal("250.00"), 42),
        (Decimal("70.00"), Decimal("10.00"), Decimal("280.00"), 43),
        (Decimal("72.50"), Decimal("10.00"), Decimal("280.00"), 44),
        (Decimal("71.50"), Decimal("10.00"), Decimal("280.00"), 45),
        (Decimal("71.50"), Decimal("0.00"), Decimal("280.00"), 46),
    ]
    assert {r["fence_account"] for r in rows} == {"alice"}


def test_a_refused_command_writes_no_entry_and_moves_no_total() -> None:
    view = alice("10.00")
    rows = rows_of([on_alice(ledger.RESERVE, Decimal("30.00")),
                    on_alice(ledger.RESERVE, Decimal("4.00"))], view)

    assert [totals(r) for r in rows] == [(Decimal("10.00"), Decimal("4.00"), Decimal("0"), 1)]


_CENTS = st.integers(min_value=1, max_value=20_000).map(lambda c: Decimal(c).scaleb(-2))
_ACTIONS = st.sampled_from([ledger.RESERVE, ledger.RELEASE, ledger.CREDIT,
                            ledger.REVERSE_CREDIT, ledger.SETTLE])


@PROPERTY
@given(opening=_CENTS, operations=st.lists(st.tuples(_ACTIONS, _CENTS), max_size=40),
       batch=st.integers(min_value=1, max_value=8))
def test_running_totals_equal_the_sums_after_every_entry(
    opening: Decimal, operations: list[tuple[Action, Decimal]], batch: int
) -> None:
    """Any sequence of ledger commands on one account, decided in batches of any size, each
    batch from the view the previous one left (as the ledger reads its latest entry): every
    entry's totals equal the sums over the entries up to it, as ACCOUNT_VIEW_SQL derives them,
    and the fence numbers run 1, 2, 3, ... without a gap."""
    view = alice(str(opening))
    written: list[dict[str, Any]] = []
    commands = [on_alice(action, amount) for action, amount in operations]
    for start in range(0, len(commands), batch):
        rows = rows_of(commands[start:start + batch], view)
        written.extend(rows)
        if rows:
            last = rows[-1]
            view = alice(str(last["fence_balance"]), held=str(last["fence_held"]),
                         settled_total=str(last["fence_settled_total"]),
                         fence_seq=last["fence_seq"])
    for n, row in enumerate(written, start=1):
        upto = written[:n]
        balance = (opening
                   + sum((r["amount"] for r in upto if r["credit_account"] == "alice"),
                         Decimal(0))
                   - sum((r["amount"] for r in upto if r["debit_account"] == "alice"),
                         Decimal(0)))
        held = sum((r["hold_delta"] for r in upto if r["hold_account"] == "alice"), Decimal(0))
        settled = sum((r["amount"] for r in upto
                       if r["step"] == "settle" and r["debit_account"] == "alice"), Decimal(0))
        assert totals(row) == (balance, held, settled, n), (n, row)
        assert row["fence_account"] == "alice"
