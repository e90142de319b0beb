"""The notification participant: records one notification per saga (no money effect)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.participant.runtime import Decided, EffectTable, StepResult
from schemas import StepCommand

NOTIFICATIONS = EffectTable(
    "notifications", (("saga_id", "uuid"), ("recipient", "text"), ("message", "text")),
    # One notification per saga, whichever attempt or path wrote it first.
    on_conflict="ON CONFLICT (saga_id) DO NOTHING",
)


class NotifyParticipant:
    name = "notify"
    effects: tuple[EffectTable, ...] = (NOTIFICATIONS,)
    locks = False  # nothing is read: the row is decided from the command alone

    async def read(self, conn: AsyncConnection, commands: Sequence[StepCommand],
                   now: datetime, *, lock: bool) -> None:
        return None

    def decide(self, commands: Sequence[StepCommand], view: None,
               now: datetime) -> list[Decided]:
        return [
            Decided(StepResult.ok(notified=True), (("notifications", {
                "saga_id": c.saga_id, "recipient": str(c.payload.get("destination_account")),
                "message": f"received {c.payload.get('amount')} {c.payload.get('currency')}"
                           f" ({c.payload.get('reference')})",
            }),))
            for c in commands
        ]
