"""What every consumer of the engine shares: a batch that fails for a reason other than an
outage is split to find its poison, which is dead-lettered with its reason, never retried
forever; dead letters' identity and size; bounded retries of lost races."""

from orchestrator.consuming.handling import (
    DEAD_LETTER_MAX_BYTES,
    REDRIVE_HEADER,
    dead_letter_for,
    dead_letter_record,
    fit_dead_letter,
    handle_isolating_poison,
    is_retryable,
    is_transient,
    message_id_of,
    poison_dead_letter,
    retrying,
)

__all__ = [
    "DEAD_LETTER_MAX_BYTES",
    "REDRIVE_HEADER",
    "dead_letter_for",
    "dead_letter_record",
    "fit_dead_letter",
    "handle_isolating_poison",
    "is_retryable",
    "is_transient",
    "message_id_of",
    "poison_dead_letter",
    "retrying",
]
