"""Define a saga and drive it through the pure decision core, with no broker and no database.

Run it: `python docs/examples/define_saga.py` (tests/unit/test_docs_examples.py runs it too).

The saga here is a small "payout": screen the parties, hold the funds on a wallet, send them to a
bank (the pivot: a bank transfer cannot be called back), then notify. It is driven three times:
every step succeeds; the bank refuses for good (the hold is released, the saga is compensated);
the bank is briefly unavailable (the step is retried with a new attempt).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID, uuid5

from orchestrator.core import (
    Decision,
    SagaState,
    SagaStatus,
    StartTransfer,
    Verdict,
    decide_reply,
    decide_start,
    evolve,
    participant_of,
    request_hash,
)
from orchestrator.definition import SagaDefinition, Step
from orchestrator.errors import SagaDefinitionError
from schemas import Direction, Outcome, StepCommand, StepReply, TransferRequested
from steps.registry import Action, notify, risk

# Actions are objects, not strings: a typo in a definition is an import error. Existing ones come
# from steps.registry; a new participant ("wallet", "bank") declares its own. The (participant,
# name) pair is persisted in events and routes the command to `saga.steps.<participant>.v1`.
HOLD = Action("wallet", "hold")
RELEASE = Action("wallet", "release")
SEND = Action("bank", "send")

PAYOUT = SagaDefinition(
    name="payout",
    steps=(
        Step("screen", action=risk.SCREEN, compensation=None, has_effect=False),
        Step("hold", action=HOLD, compensation=RELEASE, timeout_s=5),
        Step("send", action=SEND, compensation=None, pivot=True, max_attempts=3),
        Step("notify", action=notify.SEND, compensation=None, has_effect=False),
    ),
)


# ---- the definition's rules are checked when it is built, not when a worker meets it

def refused(steps: tuple[Step, ...]) -> str:
    try:
        SagaDefinition(name="broken", steps=steps)
    except SagaDefinitionError as error:
        return str(error)
    raise AssertionError("this definition should have been refused")


no_compensation = refused((Step("hold", action=HOLD, compensation=None),
                           Step("send", action=SEND, compensation=None, pivot=True)))
undo_after_pivot = refused((Step("send", action=SEND, compensation=None, pivot=True),
                            Step("hold", action=HOLD, compensation=RELEASE)))
twice = refused((Step("screen", action=risk.SCREEN, compensation=None, has_effect=False),
                 Step("screen", action=risk.SCREEN, compensation=None, has_effect=False)))
undo_nothing = refused((Step("screen", action=risk.SCREEN, compensation=HOLD, has_effect=False),))
for reason in (no_compensation, undo_after_pivot, twice, undo_nothing):
    print("refused:", reason)


# ---- the core: (state, message, now) -> events + commands; the caller folds and records them

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def request(n: int) -> StartTransfer:
    transfer = TransferRequested(
        transfer_id=UUID(int=n), source_account="wallet-7", destination_account="bank-9",
        amount=Decimal("25.00"), currency="EUR", reference=f"payout {n}", requested_by="docs",
    )
    return StartTransfer(transfer, request_hash(transfer), requested_at=NOW)


def reply(command: StepCommand, outcome: Outcome = Outcome.SUCCEEDED, code: str | None = None,
          retryable: bool = False) -> StepReply:
    """What the participant would send back on `saga.replies.v1`."""
    return StepReply(
        reply_id=uuid5(command.command_id, "reply"), command_id=command.command_id,
        saga_id=command.saga_id, step=command.step, direction=command.direction,
        attempt=command.attempt, participant=participant_of(PAYOUT, command), outcome=outcome,
        code=code, reason=code and f"the bank said {code}", retryable=retryable,
    )


def record(state: SagaState | None, decision: Decision, log: list[str]) -> SagaState:
    """What the orchestrator's shell does with a decision, minus the database: fold the events."""
    for event in decision.events:
        state = evolve(state, event)
        step = getattr(event, "step", None)
        undo = getattr(event, "direction", None) is Direction.COMPENSATE
        log.append(event.type + (f"({step}{', compensate' if undo else ''})" if step else ""))
    assert state is not None
    return state


# (step, direction, attempt) -> (outcome, failure code, retryable); unlisted commands succeed.
Answers = dict[tuple[str, str, int], tuple[Outcome, str, bool]]


def run(n: int, answer: Answers) -> tuple[SagaState, list[str]]:
    """Start one saga and answer each command it sends, by (step, direction, attempt)."""
    log: list[str] = []
    decision = decide_start(PAYOUT, None, request(n), NOW)
    assert decision.verdict is Verdict.STARTED
    state = record(None, decision, log)
    while decision.commands:
        (command,) = decision.commands  # at most one step command is outstanding per saga
        outcome, code, retryable = answer.get(
            (command.step, command.direction.value, command.attempt),
            (Outcome.SUCCEEDED, "", False))
        message = reply(command, outcome, code or None, retryable)
        decision = decide_reply(PAYOUT, state, message, NOW)
        state = record(state, decision, log)
        # The same reply again (a redelivery) changes nothing: the command it answers is done.
        assert decide_reply(PAYOUT, state, message, NOW).verdict is Verdict.STALE
    return state, log


happy, happy_log = run(1, {})
print("\ncompleted:  ", " ".join(happy_log))

refused_by_bank, refused_log = run(2, {("send", "forward", 1): (Outcome.FAILED, "IBAN_CLOSED",
                                                                 False)})
print("compensated:", " ".join(refused_log))

retried, retried_log = run(3, {("send", "forward", 1): (Outcome.FAILED, "BANK_DOWN", True)})
print("retried:    ", " ".join(retried_log))

# Deciding is deterministic: the same input gives the same events and commands (ids are uuid5),
# which is what makes re-processing a redelivered message after a crash safe.
assert decide_start(PAYOUT, None, request(1), NOW) == decide_start(PAYOUT, None, request(1), NOW)
# A re-sent request for a saga that exists is a duplicate, not a second saga.
assert decide_start(PAYOUT, happy, request(1), NOW).verdict is Verdict.DUPLICATE

assert "no compensation" in no_compensation and "must not have a compensation" in undo_after_pivot
assert "repeats a step name" in twice and "must not have a compensation" in undo_nothing
assert happy.status is SagaStatus.COMPLETED and happy.applied == ("screen", "hold", "send",
                                                                  "notify")
assert happy_log == ["SagaStarted", "StepStarted(screen)", "StepSucceeded(screen)",
                     "StepStarted(hold)", "StepSucceeded(hold)", "StepStarted(send)",
                     "StepSucceeded(send)", "StepStarted(notify)", "StepSucceeded(notify)",
                     "SagaCompleted"]
assert refused_by_bank.status is SagaStatus.COMPENSATED
# Only the hold had an effect to undo: the screen has none, the send never happened.
assert refused_log[-4:] == ["StepFailed(send)", "StepStarted(hold, compensate)",
                            "StepCompensated(hold)", "SagaCompensated"]
assert retried.status is SagaStatus.COMPLETED and retried.version == len(retried_log)
assert retried_log.count("StepStarted(send)") == 2 and "StepFailed(send)" in retried_log
