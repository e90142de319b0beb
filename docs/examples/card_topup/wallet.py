"""The wallet participant: holds, releases and captures amounts on customers' wallets.

A wallet's balance and hold are derived from its movements, never updated in place:
    balance = opening_balance + sum(balance_delta)     held = sum(hold_delta)
    available = balance - held, never below zero.
A hold depends on the available funds, which another batch may change between the read and the
write: the service declares `locks=True`, so the kit holds the wallet rows that `read_wallets`
locks from the read to the commit, on the fast path too. (The ledger of the transfer
application shows the alternative, a fence: more code, no lock held across the round trip.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from card_topup.actions import wallet
from card_topup.messages import CardTopUpRequested
from card_topup.saga import CARD_TOPUP
from orchestrator.participant import Decided, EffectTable, ParticipantService, StepResult
from schemas import StepCommand, format_amount


@dataclass(frozen=True)
class Wallet:
    wallet_id: str
    currency: str
    balance: Decimal
    held: Decimal

    @property
    def available(self) -> Decimal:
        return self.balance - self.held


# The batch's view: the wallets its commands name, as the handlers before have left them.
Wallets = dict[str, Wallet]

MOVEMENTS = EffectTable("topup_wallet_movements", (
    ("saga_id", "uuid"), ("step", "text"), ("direction", "text"), ("wallet_id", "text"),
    ("balance_delta", "numeric"), ("hold_delta", "numeric"),
))

_WALLETS = """
SELECT w.wallet_id, w.currency,
       w.opening_balance + COALESCE((SELECT sum(balance_delta) FROM topup_wallet_movements m
                                     WHERE m.wallet_id = w.wallet_id), 0) AS balance,
       COALESCE((SELECT sum(hold_delta) FROM topup_wallet_movements m
                 WHERE m.wallet_id = w.wallet_id), 0) AS held
FROM topup_wallets w WHERE w.wallet_id = ANY(:ids)
"""
# In a stable order, so that two batches lock the wallets they share without deadlocking.
_LOCKED = text(_WALLETS + "ORDER BY w.wallet_id FOR UPDATE OF w")
_PLAIN = text(_WALLETS)


async def read_wallets(conn: AsyncConnection, commands: Sequence[StepCommand], now: datetime,
                       *, lock: bool) -> Wallets:
    wanted = sorted({CardTopUpRequested.of(c).wallet_id for c in commands})
    rows = await conn.execute(_LOCKED if lock else _PLAIN, {"ids": wanted})
    return {row.wallet_id: Wallet(row.wallet_id, row.currency.strip(), row.balance, row.held)
            for row in rows}


service = ParticipantService("wallet", read=read_wallets, effects=(MOVEMENTS,), locks=True)


def _moved(command: StepCommand, wallets: Wallets, wallet_id: str, balance_delta: Decimal,
           hold_delta: Decimal, result: StepResult) -> Decided:
    """The movement as a row, and the batch's view of the wallet after it."""
    before = wallets[wallet_id]
    wallets[wallet_id] = replace(before, balance=before.balance + balance_delta,
                                 held=before.held + hold_delta)
    return Decided(result, (MOVEMENTS.row(
        saga_id=command.saga_id, step=command.step, direction=command.direction.value,
        wallet_id=wallet_id, balance_delta=balance_delta, hold_delta=hold_delta),))


@service.handles(wallet.HOLD)
def hold(command: StepCommand, wallets: Wallets, now: datetime) -> Decided:
    topup = CardTopUpRequested.of(command)
    found = wallets.get(topup.wallet_id)
    if found is None:
        return Decided(StepResult.refused("UNKNOWN_WALLET", "no such wallet"))
    if found.currency != topup.currency:
        return Decided(StepResult.refused("CURRENCY_MISMATCH",
                                          f"the wallet holds {found.currency}"))
    if found.available < topup.amount:
        return Decided(StepResult.refused(
            "INSUFFICIENT_FUNDS",
            f"{format_amount(found.available, found.currency)} available,"
            f" {format_amount(topup.amount, topup.currency)} needed"))
    return _moved(command, wallets, topup.wallet_id, Decimal(0), topup.amount,
                  StepResult.ok(held=format_amount(topup.amount, topup.currency)))


@service.compensates(wallet.RELEASE)
def release(command: StepCommand, wallets: Wallets, now: datetime) -> Decided:
    # Called only when the hold succeeded (the kit answers the other releases itself), so the
    # wallet exists and holds the amount.
    topup = CardTopUpRequested.of(command)
    return _moved(command, wallets, topup.wallet_id, Decimal(0), -topup.amount,
                  StepResult.ok(released=format_amount(topup.amount, topup.currency)))


@service.handles(wallet.CAPTURE)
def capture(command: StepCommand, wallets: Wallets, now: datetime) -> Decided:
    # After the pivot, and after the hold succeeded: the held funds are there to take.
    topup = CardTopUpRequested.of(command)
    return _moved(command, wallets, topup.wallet_id, -topup.amount, -topup.amount,
                  StepResult.ok(captured=format_amount(topup.amount, topup.currency)))


WALLET = service.participant(CARD_TOPUP)


async def open_wallet(conn: AsyncConnection, wallet_id: str, currency: str,
                      opening_balance: Decimal) -> None:
    await conn.execute(text("INSERT INTO topup_wallets (wallet_id, currency, opening_balance)"
                            " VALUES (:id, :currency, :opening)"),
                       {"id": wallet_id, "currency": currency, "opening": opening_balance})
