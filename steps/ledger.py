"""The ledger participant: accounts, append-only journal entries and holds.

Balances are never updated in place; by definition they are derived from the entries:
    balance(a)   = opening_balance + sum amount credited to a - sum amount debited from a
    held(a)      = sum hold_delta on a
    available(a) = balance(a) - held(a)
A customer account's available balance never goes below zero: every entry is decided against
the state of its customer account and takes that account's next fence number (unique per
account), so of two writers that decided from the same state only one can write; the other is
decided again with the account row locked (`FOR UPDATE`). Concurrent transfers on one hot account
are thus serialised and each sees the effects of the ones before it. The per-currency clearing
account fronts credits until the source is settled; it is never fenced and may go negative in
flight. Nothing decides against a clearing account, so its view is only ever the sums.

Because a customer account's entries form that one serial chain, each entry also carries the
account's running totals after it (balance, held, settled total; ADR 0008), computed by the
pure `after` from the view it was decided against. The decisions read the latest entry instead
of summing the history: O(log n) per account, not O(n). An entry from before the totals existed
has none; the view then falls back to the sums, and the next entry carries exact totals again.
The sums (`ACCOUNT_VIEW_SQL`) stay the truth, which `saga check` compares the totals with.

The rules are pure (`decide_entry`, and `post_entry`, the one handler of all five actions); the
I/O is `read_accounts` and the kit's write. `LEDGER` is the participant the kit runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.participant import Decided, EffectTable, ParticipantService, StepResult
from orchestrator.redact import mask_account
from schemas import Direction, StepCommand
from steps.registry import ledger
from steps.saga import DEFINITIONS


def clearing_account(currency: str) -> str:
    return f"clearing.{currency}"


@dataclass(frozen=True)
class AccountView:
    account_id: str
    currency: str
    closed: bool
    balance: Decimal
    held: Decimal
    daily_outflow_limit: Decimal | None
    settled_today: Decimal
    # The account's last fence number: the next entry decided against it takes the one after.
    fence_seq: int = 0
    # Everything ever settled out of the account (all days): what an entry carries, so that
    # settled_today is this total minus the total as it was when the day began.
    settled_total: Decimal = Decimal(0)

    @property
    def available(self) -> Decimal:
        return self.balance - self.held


@dataclass(frozen=True)
class Entry:
    step: str
    direction: Direction
    currency: str
    amount: Decimal
    debit_account: str | None = None
    credit_account: str | None = None
    hold_account: str | None = None
    hold_delta: Decimal = Decimal(0)


@dataclass(frozen=True)
class TransferInput:
    source: str
    destination: str
    amount: Decimal
    currency: str

    @classmethod
    def of(cls, command: StepCommand) -> TransferInput:
        payload: dict[str, Any] = command.payload
        return cls(str(payload["source_account"]), str(payload["destination_account"]),
                   Decimal(str(payload["amount"])), str(payload["currency"]))


def account_in_question(command: StepCommand) -> str:
    """The customer account whose balance the command's rule depends on."""
    transfer = TransferInput.of(command)
    if command.action in (ledger.CREDIT.name, ledger.REVERSE_CREDIT.name):
        return transfer.destination
    return transfer.source


def decide_entry(command: StepCommand, account: AccountView | None
                 ) -> tuple[Entry | None, StepResult]:
    """The ledger's rules for one command, given the (locked) account it depends on."""
    t = TransferInput.of(command)
    action = command.action
    if account is None:
        return None, StepResult.refused(
            "UNKNOWN_ACCOUNT", f"account {mask_account(account_in_question(command))} does not"
                               " exist")
    base = Entry(step=command.step, direction=command.direction, currency=t.currency,
                 amount=t.amount)
    if account.currency != t.currency:
        return None, StepResult.refused(
            "CURRENCY_MISMATCH",
            f"account {mask_account(account.account_id)} holds {account.currency}")
    if action == ledger.RESERVE.name:
        if account.closed:
            return None, StepResult.refused(
                "ACCOUNT_CLOSED", f"account {mask_account(account.account_id)} is closed")
        if account.available < t.amount:
            return None, StepResult.refused(
                "INSUFFICIENT_FUNDS",
                f"account {mask_account(account.account_id)} has less than {t.amount}"
                " available")
        return replace(base, hold_account=t.source, hold_delta=t.amount), StepResult.ok(
            held=str(t.amount))
    if action == ledger.RELEASE.name:
        return replace(base, hold_account=t.source, hold_delta=-t.amount), StepResult.ok(
            released=str(t.amount))
    if action == ledger.CREDIT.name:
        if account.closed:
            return None, StepResult.refused(
                "ACCOUNT_CLOSED", f"account {mask_account(account.account_id)} is closed")
        return replace(base, debit_account=clearing_account(t.currency),
                       credit_account=t.destination), StepResult.ok(credited=str(t.amount))
    if action == ledger.REVERSE_CREDIT.name:
        if account.available < t.amount:
            return None, StepResult.refused(
                "INSUFFICIENT_FUNDS_FOR_REVERSAL",
                f"account {mask_account(account.account_id)} has less than {t.amount} left"
                " to reverse")
        return replace(base, debit_account=t.destination,
                       credit_account=clearing_account(t.currency)), StepResult.ok(
            reversed=str(t.amount))
    if action == ledger.SETTLE.name:
        limit = account.daily_outflow_limit
        if limit is not None and account.settled_today + t.amount > limit:
            return None, StepResult.refused(
                "DAILY_LIMIT_EXCEEDED",
                f"account {mask_account(account.account_id)}: {t.amount} more today would"
                " exceed its daily outflow limit")
        # Debit the source and consume its hold: the hold guaranteed the funds are there.
        return replace(base, debit_account=t.source, credit_account=clearing_account(t.currency),
                       hold_account=t.source, hold_delta=-t.amount), StepResult.ok(
            settled=str(t.amount))
    return None, StepResult.refused("UNKNOWN_ACTION", f"ledger has no action {action!r}")


def after(account: AccountView, entry: Entry) -> AccountView:
    """The account as it is once `entry` is applied (for the next command in the batch)."""
    balance = account.balance
    if entry.credit_account == account.account_id:
        balance += entry.amount
    if entry.debit_account == account.account_id:
        balance -= entry.amount
    held = account.held + (entry.hold_delta if entry.hold_account == account.account_id else 0)
    settled_today, settled_total = account.settled_today, account.settled_total
    # Daily limits count settlements per UTC day.
    if entry.step == "settle" and entry.debit_account == account.account_id:
        settled_today += entry.amount
        settled_total += entry.amount
    return replace(account, balance=balance, held=held, settled_today=settled_today,
                   settled_total=settled_total)


# The sums over an account's whole history (`a`), each O(entries of the account).
_DAY_START = "date_trunc('day', CAST(:now AS timestamptz), 'UTC')"
_SUM_BALANCE = """a.opening_balance
         + COALESCE((SELECT sum(amount) FROM ledger_entries
                     WHERE credit_account = a.account_id), 0)
         - COALESCE((SELECT sum(amount) FROM ledger_entries
                     WHERE debit_account = a.account_id), 0)"""
_SUM_HELD = (
    "COALESCE((SELECT sum(hold_delta) FROM ledger_entries WHERE hold_account = a.account_id), 0)")
_SUM_SETTLED_TOTAL = """COALESCE((SELECT sum(amount) FROM ledger_entries
                 WHERE debit_account = a.account_id AND step = 'settle'), 0)"""
_SUM_SETTLED_TODAY = f"""COALESCE((SELECT sum(amount) FROM ledger_entries
                 WHERE debit_account = a.account_id AND step = 'settle'
                   AND recorded_at >= {_DAY_START}), 0)"""

# The one derivation of balances from entries, the truth: the checker and `balances` read it,
# and the running totals (below) must always equal it.
ACCOUNT_VIEW_SQL = f"""
SELECT a.account_id, a.kind, a.currency, a.closed, a.daily_outflow_limit, a.opening_balance,
       {_SUM_BALANCE} AS balance,
       {_SUM_HELD} AS held,
       {_SUM_SETTLED_TODAY} AS settled_today,
       {_SUM_SETTLED_TOTAL} AS settled_total,
       COALESCE((SELECT max(fence_seq) FROM ledger_entries WHERE fence_account = a.account_id), 0)
         AS fence_seq
FROM accounts a
"""

# What the decisions read: a customer account from its latest entry's running totals, found by
# the fence index; settled_today from the settled total as it was when the UTC day began (the
# latest entry recorded before then, by `ledger_entries_fence_by_time`). Where the latest entry
# predates the totals (or there is none), the same sums as ACCOUNT_VIEW_SQL (CASE evaluates only
# the branch taken, so the sums cost nothing otherwise). Where no chained entry predates the
# day, what was settled before it can only be in entries written before the fence, which the
# small partial index `ledger_entries_unfenced_settles` holds. Exact as long as each customer
# account's entries are all fenced by it, which `saga check` verifies (I7).
CUSTOMER_VIEW_SQL = f"""
SELECT a.account_id, a.kind, a.currency, a.closed, a.daily_outflow_limit, a.opening_balance,
       CASE WHEN latest.fence_balance IS NULL THEN {_SUM_BALANCE}
            ELSE latest.fence_balance END AS balance,
       CASE WHEN latest.fence_held IS NULL THEN {_SUM_HELD}
            ELSE latest.fence_held END AS held,
       CASE WHEN latest.fence_settled_total IS NULL THEN {_SUM_SETTLED_TODAY}
            WHEN day_began.fence_seq IS NULL THEN latest.fence_settled_total
              - COALESCE((SELECT sum(amount) FROM ledger_entries
                          WHERE debit_account = a.account_id AND fence_account IS NULL
                            AND step = 'settle' AND recorded_at < {_DAY_START}), 0)
            WHEN day_began.fence_settled_total IS NULL THEN {_SUM_SETTLED_TODAY}
            ELSE latest.fence_settled_total - day_began.fence_settled_total
       END AS settled_today,
       CASE WHEN latest.fence_settled_total IS NULL THEN {_SUM_SETTLED_TOTAL}
            ELSE latest.fence_settled_total END AS settled_total,
       COALESCE(latest.fence_seq, 0) AS fence_seq
FROM accounts a
LEFT JOIN LATERAL (
    SELECT fence_seq, fence_balance, fence_held, fence_settled_total FROM ledger_entries
    WHERE fence_account = a.account_id ORDER BY fence_seq DESC LIMIT 1) latest ON true
LEFT JOIN LATERAL (
    SELECT fence_seq, fence_settled_total FROM ledger_entries
    WHERE fence_account = a.account_id AND recorded_at < {_DAY_START}
    ORDER BY recorded_at DESC, fence_seq DESC LIMIT 1) day_began ON true
WHERE a.kind = 'customer'
"""

_CUSTOMERS_SQL = CUSTOMER_VIEW_SQL + "  AND a.account_id = ANY(:ids)\n"
_CUSTOMER_VIEW = text(_CUSTOMERS_SQL)
_LOCK_AND_VIEW = text(_CUSTOMERS_SQL + "ORDER BY a.account_id\nFOR UPDATE OF a\n")
_VIEW = text(ACCOUNT_VIEW_SQL + "WHERE a.account_id = ANY(:ids)")


def _view(row: Any) -> AccountView:
    return AccountView(row.account_id, row.currency.strip(), row.closed, row.balance, row.held,
                       row.daily_outflow_limit, row.settled_today, row.fence_seq,
                       row.settled_total)


ENTRIES = EffectTable("ledger_entries", (
    ("saga_id", "uuid"), ("step", "text"), ("direction", "text"), ("currency", "text"),
    ("amount", "numeric"), ("debit_account", "text"), ("credit_account", "text"),
    ("hold_account", "text"), ("hold_delta", "numeric"), ("fence_account", "text"),
    ("fence_seq", "bigint"), ("fence_balance", "numeric"), ("fence_held", "numeric"),
    ("fence_settled_total", "numeric"),
))


def entry_row(command: StepCommand, entry: Entry, fence: AccountView) -> dict[str, Any]:
    """The entry as a row, fenced by the account it was decided against, as it is after it
    (`after`): its next fence number and its running totals. The fence makes the totals exact:
    had another entry been written since the view was read, this one collides and is not
    written."""
    return {"saga_id": command.saga_id, "step": entry.step, "direction": entry.direction.value,
            "currency": entry.currency, "amount": entry.amount,
            "debit_account": entry.debit_account, "credit_account": entry.credit_account,
            "hold_account": entry.hold_account, "hold_delta": entry.hold_delta,
            "fence_account": fence.account_id, "fence_seq": fence.fence_seq,
            "fence_balance": fence.balance, "fence_held": fence.held,
            "fence_settled_total": fence.settled_total}


async def read_accounts(conn: AsyncConnection, commands: Sequence[StepCommand], now: datetime,
                        *, lock: bool) -> dict[str, AccountView]:
    """The customer accounts the commands depend on. Locked on the careful path (in sorted
    order, so two batches cannot deadlock), until its commit; the fast path's plain read takes
    no lock (which would also cost a transaction id and a WAL flush per read): the fence catches
    whatever changed since."""
    wanted = sorted({account_in_question(c) for c in commands})
    rows = await conn.execute(_LOCK_AND_VIEW if lock else _CUSTOMER_VIEW,
                              {"ids": wanted, "now": now})
    return {row.account_id: _view(row) for row in rows}


# Decides from the accounts as read, and writes fenced entries (ADR 0006). Every entry takes the
# next fence number of the customer account it was decided against, under the unique key
# (fence_account, fence_seq): a writer that decided from an account state that another writer
# has since moved on collides and writes nothing, and its batch is decided again on the careful
# path, where the accounts stay locked from the read to the commit. So the rules always see
# every entry before their own, without the fast path holding a lock (`locks=False`). No need
# to create clearing accounts with the entries: an entry needs a customer account of its
# currency, and `open_account` creates that currency's clearing account with it.
service = ParticipantService("ledger", read=read_accounts, effects=(ENTRIES,), locks=False)


@service.handles(ledger.RESERVE, ledger.CREDIT, ledger.SETTLE)
@service.compensates(ledger.RELEASE, ledger.REVERSE_CREDIT)
def post_entry(command: StepCommand, accounts: dict[str, AccountView],
               now: datetime) -> Decided:
    """Any of the ledger's actions: its entry (`decide_entry`), fenced by the account it was
    decided against. The batch's view moves on with it, so the next command of the batch on
    that account is decided against the account as this entry leaves it."""
    account_id = account_in_question(command)
    account = accounts.get(account_id)
    entry, result = decide_entry(command, account)
    if entry is None or account is None:
        return Decided(result)
    moved = replace(after(account, entry), fence_seq=account.fence_seq + 1)
    accounts[account_id] = moved
    return Decided(result, ((ENTRIES.table, entry_row(command, entry, moved)),))


LEDGER = service.participant(*DEFINITIONS)


async def _ensure_clearing_accounts(conn: AsyncConnection, currencies: set[str]) -> None:
    await conn.execute(
        text("INSERT INTO accounts (account_id, currency, kind, opening_balance)"
             " VALUES (:id, :currency, 'clearing', 0) ON CONFLICT (account_id) DO NOTHING"),
        [{"id": clearing_account(c), "currency": c} for c in sorted(currencies)],
    )


async def open_account(conn: AsyncConnection, account_id: str, currency: str,
                       opening_balance: Decimal, daily_outflow_limit: Decimal | None = None,
                       closed: bool = False) -> None:
    """Open a customer account. Its opening balance is the only money not explained by an
    entry, which is why it can be set once, here, and never changed."""
    await conn.execute(
        text("INSERT INTO accounts (account_id, currency, kind, opening_balance,"
             " daily_outflow_limit, closed) VALUES (:id, :currency, 'customer', :opening,"
             " :limit, :closed)"),
        {"id": account_id, "currency": currency, "opening": opening_balance,
         "limit": daily_outflow_limit, "closed": closed},
    )
    await _ensure_clearing_accounts(conn, {currency})


async def balances(conn: AsyncConnection, account_ids: Sequence[str]) -> dict[str, AccountView]:
    rows = await conn.execute(_VIEW, {"ids": list(account_ids), "now": datetime.now(UTC)})
    return {row.account_id: _view(row) for row in rows}
