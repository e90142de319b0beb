"""The participant kit: what a team writing a participant service uses, without reading the
engine. It declares a handler per action and per compensation, with the same `Action` objects
its saga definitions refer to (`ParticipantService`); the kit applies each effect at most once
per (saga, step, direction), stores and replays the reply, writes tombstones for compensations
that arrive first, dead-letters bad commands and commands it has no handler for, and commits
offsets after its database commit (`ParticipantWorker`, the runtime).

A participant needs only this package, `orchestrator.core` (`Action`, `SagaDefinition`) and
`schemas` (`StepCommand`). `Participant` is the low-level protocol the runtime runs, for a
participant that wants to decide a whole batch itself; `ParticipantService` builds one."""

from orchestrator.participant.kit import Handler, ParticipantService, Reader, ServiceParticipant
from orchestrator.participant.runtime import (
    CANCELLED,
    Decided,
    EffectTable,
    Participant,
    ParticipantWorker,
    StepResult,
)

__all__ = [
    "CANCELLED",
    "Decided",
    "EffectTable",
    "Handler",
    "Participant",
    "ParticipantService",
    "ParticipantWorker",
    "Reader",
    "ServiceParticipant",
    "StepResult",
]
