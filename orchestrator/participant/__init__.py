"""The participant kit: what a team writing a participant service uses. A participant reads
what its rules need, decides without I/O, and the kit applies each effect at most once per
(saga, step, direction), stores and replays the reply, writes tombstones for compensations that
arrive first, dead-letters bad commands and commits offsets after its database commit."""

from orchestrator.participant.runtime import (
    Decided,
    EffectTable,
    Participant,
    ParticipantWorker,
    StepResult,
)

__all__ = ["Decided", "EffectTable", "Participant", "ParticipantWorker", "StepResult"]
