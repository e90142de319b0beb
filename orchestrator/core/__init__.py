"""The pure decision core: saga state, the decisions, derived ids, saga types and the definition
API.

Nothing here does I/O or reads settings: given the events so far, a message and `now`, it
returns the events to append and the commands to send (`lint-imports` keeps it so)."""

from orchestrator.core.definition import Action, Backoff, Parallel, SagaDefinition, Step
from orchestrator.core.intake import Unparseable, classify, unreadable
from orchestrator.core.saga import (
    IN_FLIGHT_STATUSES,
    TERMINAL_STATUSES,
    Decision,
    RejectSaga,
    SagaState,
    SagaStatus,
    StartSaga,
    Verdict,
    command_id_for,
    decide_due,
    decide_reject,
    decide_reply,
    decide_resolve,
    decide_start,
    evolve,
    fold,
    outcome_event_id,
    outcome_of,
    outstanding_command,
    outstanding_commands,
    participant_of,
    request_hash,
    saga_id_for,
)
from orchestrator.core.saga_type import IntakeRules, Refusal, SagaType, SagaTypes

__all__ = [
    "IN_FLIGHT_STATUSES",
    "TERMINAL_STATUSES",
    "Action",
    "Backoff",
    "Decision",
    "IntakeRules",
    "Parallel",
    "Refusal",
    "RejectSaga",
    "SagaDefinition",
    "SagaState",
    "SagaStatus",
    "SagaType",
    "SagaTypes",
    "StartSaga",
    "Step",
    "Unparseable",
    "Verdict",
    "classify",
    "command_id_for",
    "decide_due",
    "decide_reject",
    "decide_reply",
    "decide_resolve",
    "decide_start",
    "evolve",
    "fold",
    "outcome_event_id",
    "outcome_of",
    "outstanding_command",
    "outstanding_commands",
    "participant_of",
    "request_hash",
    "saga_id_for",
    "unreadable",
]
