"""The notification participant: records one notification per saga (no money effect)."""

from __future__ import annotations

from datetime import datetime

from orchestrator.participant import Decided, EffectTable, ParticipantService, StepResult
from schemas import StepCommand
from steps.registry import notify
from steps.saga import DEFINITIONS

NOTIFICATIONS = EffectTable(
    "notifications", (("saga_id", "uuid"), ("recipient", "text"), ("message", "text")),
    # One notification per saga, whichever attempt or path wrote it first.
    on_conflict="ON CONFLICT (saga_id) DO NOTHING",
)

# Nothing is read: the row is decided from the command alone (so no locks either).
service = ParticipantService("notify", effects=(NOTIFICATIONS,))


@service.handles(notify.SEND)
def send(command: StepCommand, view: None, now: datetime) -> Decided:
    payload = command.payload
    return Decided(StepResult.ok(notified=True), (NOTIFICATIONS.row(
        saga_id=command.saga_id, recipient=str(payload.get("destination_account")),
        message=f"received {payload.get('amount')} {payload.get('currency')}"
                f" ({payload.get('reference')})"),))


NOTIFY = service.participant(*DEFINITIONS)
