"""Record sequential transfer sagas driven through the pure core: every input, every decision,
and the state as the `sagas` row caches it (`SagaState.to_json`) after each decision.

`sequential_histories.json` beside this file was recorded by the code before parallel groups
(commit 09cd005, whose TRANSFER was sequential):

    PYTHONPATH=<a checkout of 09cd005> python tests/unit/data/record_sequential_histories.py \\
        > tests/unit/data/sequential_histories.json

`tests/unit/test_sequential_compat.py` records again with today's code and compares: the same
inputs must give the same events and commands, and each state cached then must load as the
state today's fold gives. The driver uses only what both versions have.
"""

from __future__ import annotations

import json
import random
import sys
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid5

from orchestrator.core.definition import SagaDefinition
from orchestrator.core.saga import (
    Decision,
    SagaState,
    StartSaga,
    decide_due,
    decide_reply,
    decide_start,
    evolve,
    request_hash,
)
from schemas import Outcome, StepReply, TransferRequested
from steps.saga import TRANSFER

SEED = 20250301
SAGAS = 16
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
# What a participant does with a command: answer (success, refusal for good, retryable
# refusal), stay silent until the deadline passes, or answer and then send the same reply
# again (a duplicate) or a reply to an earlier command of the saga (late).
CHOICES = ("succeed", "succeed", "succeed", "refuse", "retry", "timeout", "duplicate", "late")


def sequential_transfer() -> SagaDefinition:
    """The transfer saga's steps, one after the other (today's TRANSFER runs two in parallel)."""
    return SagaDefinition("transfer", steps=tuple(getattr(TRANSFER, "all_steps", TRANSFER.steps)))


def _decision(decision: Decision | None, first: bool = False) -> dict[str, Any] | None:
    if decision is None:
        return None
    # A command's payload is the saga's input: kept with the first decision only, to keep the
    # file small (the states say it stays the same).
    return {
        "verdict": decision.verdict.value,
        "events": [event.model_dump(mode="json") for event in decision.events],
        "commands": [command.model_dump(mode="json", exclude=None if first else {"payload"})
                     for command in decision.commands],
        "rejection": [decision.rejection[0].value, decision.rejection[1]]
        if decision.rejection else None,
        "saga_failed": decision.saga_failed,
    }


def _reply(state: SagaState, n: int, outcome: Outcome, retryable: bool = False) -> StepReply:
    assert state.command_id is not None and state.step and state.direction
    failed = outcome is Outcome.FAILED
    return StepReply(
        reply_id=uuid5(state.command_id, f"reply {n}"), command_id=state.command_id,
        saga_id=state.saga_id, step=state.step, direction=state.direction,
        attempt=state.attempt, participant="golden", outcome=outcome, retryable=retryable,
        code=("BUSY" if retryable else "REFUSED") if failed else None,
        reason="recorded" if failed else None, result={} if failed else {"n": n})


def record() -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    definition = sequential_transfer()
    sagas = []
    for n in range(SAGAS):
        request = TransferRequested(
            transfer_id=UUID(int=n + 1), source_account="alice", destination_account="bob",
            amount="25.10", currency="EUR", reference=f"golden {n}", requested_by="test")
        now = NOW
        decision = decide_start(definition, None, StartSaga(
            "transfer", str(request.transfer_id), request, request_hash(request), NOW), now)
        state: SagaState | None = None
        for event in decision.events:
            state = evolve(state, event)
        assert state is not None
        steps: list[dict[str, Any]] = [{"input": {"start": request.model_dump(mode="json")},
                                        "decision": _decision(decision, first=True),
                                        "state": state.to_json()}]
        answered: list[StepReply] = []
        while not state.terminal:
            message: dict[str, Any]
            if state.command_id is None:  # a retry waits out its backoff
                assert state.due_at is not None
                now = state.due_at
                message = {"due": now.isoformat()}
                decision = decide_due(definition, state, now)
            else:
                choice = rng.choice(CHOICES)
                if choice == "timeout":
                    assert state.due_at is not None
                    now = state.due_at
                    message = {"due": now.isoformat()}
                    decision = decide_due(definition, state, now)
                else:
                    if choice == "duplicate" and answered:
                        reply = answered[-1]
                    elif choice == "late" and answered:
                        reply = rng.choice(answered).model_copy(
                            update={"reply_id": uuid5(state.saga_id, f"late {len(steps)}")})
                    else:
                        outcome = Outcome.FAILED if choice in ("refuse", "retry") else (
                            Outcome.SUCCEEDED)
                        reply = _reply(state, len(steps), outcome, choice == "retry")
                        answered.append(reply)
                    message = {"reply": reply.model_dump(mode="json")}
                    decision = decide_reply(definition, state, reply, now)
            for event in decision.events if decision else ():
                state = evolve(state, event)
            cached = state.to_json()
            assert cached["input"] == steps[0]["state"]["input"]
            del cached["input"]  # as the first state has it
            steps.append({"input": message, "decision": _decision(decision), "state": cached})
        sagas.append({"saga": n, "steps": steps})
    return sagas


if __name__ == "__main__":
    json.dump({"seed": SEED, "sagas": record()}, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")
