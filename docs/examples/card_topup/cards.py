"""The card processor participant: loads prepaid cards (a stand-in for the processor's API).

A load is the saga's pivot: once a card is loaded the money is spendable at any shop, so it is
never called back. The processor refuses unknown or blocked cards for good; while the card's
issuer is offline (`issuer_online`) it refuses with a retryable answer, which the kit neither
stores nor writes: the saga tries again after its backoff and the load is decided afresh.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from card_topup.actions import cards
from card_topup.messages import CardTopUpRequested
from card_topup.saga import CARD_TOPUP
from orchestrator.participant import Decided, EffectTable, ParticipantService, StepResult
from schemas import StepCommand, format_amount


@dataclass(frozen=True)
class Card:
    card_id: str
    currency: str
    blocked: bool
    issuer_online: bool


LOADS = EffectTable("topup_card_loads", (
    ("saga_id", "uuid"), ("card_id", "text"), ("amount", "numeric"), ("currency", "text"),
))
_CARDS = text("SELECT card_id, currency, blocked, issuer_online FROM topup_cards"
              " WHERE card_id = ANY(:ids)")


async def read_cards(conn: AsyncConnection, commands: Sequence[StepCommand], now: datetime,
                     *, lock: bool) -> dict[str, Card]:
    # No lock, even on the careful path: a card blocked a moment after the read would have
    # been loaded a moment earlier anyway, and a saga loads its card at most once (the stored
    # reply's key; `topup_card_loads` is keyed by the saga too).
    rows = await conn.execute(_CARDS, {"ids": sorted({CardTopUpRequested.of(c).card_id
                                                      for c in commands})})
    return {row.card_id: Card(row.card_id, row.currency.strip(), row.blocked,
                              row.issuer_online) for row in rows}


service = ParticipantService("cards", read=read_cards, effects=(LOADS,))


@service.handles(cards.LOAD)
def load(command: StepCommand, found: dict[str, Card], now: datetime) -> Decided | StepResult:
    topup = CardTopUpRequested.of(command)
    card = found.get(topup.card_id)
    if card is None:
        return StepResult.refused("UNKNOWN_CARD", "no such card")
    if card.blocked:
        return StepResult.refused("CARD_BLOCKED", "the card is blocked")
    if card.currency != topup.currency:
        return StepResult.refused("CURRENCY_MISMATCH", f"the card is in {card.currency}")
    if not card.issuer_online:
        return StepResult.refused("ISSUER_UNAVAILABLE", "the card's issuer did not answer",
                                  retryable=True)
    return Decided(StepResult.ok(loaded=format_amount(topup.amount, topup.currency)),
                   (LOADS.row(saga_id=command.saga_id, card_id=card.card_id,
                              amount=topup.amount, currency=topup.currency),))


CARDS = service.participant(CARD_TOPUP)


async def add_card(conn: AsyncConnection, card_id: str, currency: str, *, blocked: bool = False,
                   issuer_online: bool = True) -> None:
    await conn.execute(text("INSERT INTO topup_cards (card_id, currency, blocked, issuer_online)"
                            " VALUES (:id, :currency, :blocked, :online)"),
                       {"id": card_id, "currency": currency, "blocked": blocked,
                        "online": issuer_online})
