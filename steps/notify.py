"""The notification participant: records one notification per saga (no money effect)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas import StepCommand
from steps.runtime import StepResult


class NotifyParticipant:
    name = "notify"

    async def apply(self, conn: AsyncConnection, commands: Sequence[StepCommand],
                    now: datetime) -> list[StepResult]:
        await conn.execute(
            text("INSERT INTO notifications (saga_id, recipient, message) VALUES"
                 " (:saga_id, :recipient, :message) ON CONFLICT (saga_id) DO NOTHING"),
            [
                {"saga_id": c.saga_id, "recipient": str(c.payload.get("destination_account")),
                 "message": f"received {c.payload.get('amount')} {c.payload.get('currency')}"
                            f" ({c.payload.get('reference')})"}
                for c in commands
            ],
        )
        return [StepResult.ok(notified=True) for _ in commands]
