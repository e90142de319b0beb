"""Define a saga type and drive it through the pure decision core, with no broker and no
database.

Run it: `python docs/examples/define_saga.py` (tests/unit/test_docs_examples.py runs it too).

The saga here is a small "payout": screen the parties, hold the funds on a wallet, send them to a
bank (the pivot: a bank transfer cannot be called back), then notify. It is a saga type of its
own: its start message (`PayoutRequested`), the topic it arrives on, its business key (the payout
id) and its intake rules. It is driven four times: every step succeeds; the bank refuses for good
(the hold is released, the saga is compensated); the bank is briefly unavailable (the step is
retried, after a backoff, as a new attempt); the wallet never answers (the hold is re-sent under
the same command id until the step gives up, and then released, since it may have been placed).
Then a second version of the definition is deployed beside the first: a saga started on version 1
finishes on it, new ones start on version 2.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated
from uuid import uuid5

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.core.definition import Backoff, SagaDefinition, Step
from orchestrator.core.intake import classify
from orchestrator.core.saga import (
    Decision,
    RejectSaga,
    SagaState,
    SagaStatus,
    StartSaga,
    Verdict,
    decide_due,
    decide_reply,
    decide_start,
    evolve,
    outstanding_command,
    participant_of,
)
from orchestrator.core.saga_type import IntakeRules, Refusal, SagaType, SagaTypes
from orchestrator.errors import SagaDefinitionError
from schemas import Direction, Outcome, RejectionCode, StepCommand, StepReply, StepTimedOut
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
        # An attempt with no reply after timeout_s is re-sent under the same command id (the
        # participant answers a command it already applied with its stored reply). Re-sends and
        # retries spend the same max_attempts (default 3).
        Step("hold", action=HOLD, compensation=RELEASE, timeout_s=5),
        # A retryable failure waits out an exponential backoff before the next attempt: 2 s,
        # then 4 s, 8 s ... up to 60 s, less a jitter of up to half that is derived from the
        # failed command's id, so deciding twice gives the same time while sagas that failed
        # together spread out.
        Step("send", action=SEND, compensation=None, pivot=True, max_attempts=3,
             backoff=Backoff(initial_s=2.0, multiplier=2.0, max_s=60.0, jitter=0.5)),
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
shrinking_wait = refused((Step("screen", action=risk.SCREEN, compensation=None, has_effect=False,
                               backoff=Backoff(multiplier=0.5)),))
for reason in (no_compensation, undo_after_pivot, twice, undo_nothing, shrinking_wait):
    print("refused:", reason)


# ---- the saga type: its start message, topic, business key and intake rules


class PayoutRequested(BaseModel):
    """The start message, published by upstream to `payouts.commands.v1`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    payout_id: Annotated[str, Field(min_length=1, max_length=64)]
    wallet: str
    iban: Annotated[str, Field(pattern=r"^[A-Z]{2}[0-9A-Z]{13,32}$")]
    amount_cents: Annotated[int, Field(gt=0)]


def under_the_daily_cap(request: PayoutRequested) -> Refusal | None:
    """An intake rule: what the type refuses, and why, before any step runs."""
    if request.amount_cents > 1_000_000:
        return Refusal(RejectionCode.INVALID_AMOUNT, "a payout is at most 10000.00")
    return None


def payout_id_of(document: object) -> str | None:
    """The key a refused request still names: its refusal is then a REJECTED saga on it."""
    key = document.get("payout_id") if isinstance(document, dict) else None
    return key if isinstance(key, str) and key else None


PAYOUT_TYPE = SagaType(
    name="payout",
    definitions=(PAYOUT,),
    start_model=PayoutRequested,
    start_topic="payouts.commands.v1",
    # The idempotency key: the same payout id with the same payload is one saga, with another
    # payload it is refused (CONFLICTING_DUPLICATE). The saga id is uuid5 of "payout:<key>".
    business_key=lambda request: request.payout_id,
    intake=IntakeRules(codes_by_field={"amount_cents": RejectionCode.INVALID_AMOUNT},
                       checks=(under_the_daily_cap,), key_of_refused=payout_id_of),
)

# What the intake does with raw records of the type's topic: parse, validate, apply the rules.
over_the_cap = classify(PAYOUT_TYPE, json.dumps(
    {"payout_id": "p-1", "wallet": "wallet-7", "iban": "DE89370400440532013000",
     "amount_cents": 5_000_000}).encode(), None)
no_amount = classify(PAYOUT_TYPE, json.dumps(
    {"payout_id": "p-2", "wallet": "wallet-7", "iban": "DE89370400440532013000"}).encode(), None)
assert isinstance(over_the_cap, RejectSaga) and over_the_cap.business_key == "p-1"
assert isinstance(no_amount, RejectSaga) and no_amount.code is RejectionCode.INVALID_AMOUNT
print("refused at intake:", over_the_cap.code.value, "-", over_the_cap.reason)


# ---- the core: (state, message, now) -> events + commands; the caller folds and records them

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def request(n: int) -> StartSaga:
    payout = PayoutRequested(payout_id=f"payout-{n}", wallet="wallet-7",
                             iban="DE89370400440532013000", amount_cents=2500)
    return PAYOUT_TYPE.start(payout, requested_at=NOW)


def reply(command: StepCommand, definition: SagaDefinition = PAYOUT,
          outcome: Outcome = Outcome.SUCCEEDED, code: str | None = None,
          retryable: bool = False) -> StepReply:
    """What the participant would send back on `saga.replies.v1`."""
    return StepReply(
        reply_id=uuid5(command.command_id, "reply"), command_id=command.command_id,
        saga_id=command.saga_id, step=command.step, direction=command.direction,
        attempt=command.attempt, participant=participant_of(definition, command),
        outcome=outcome,
        code=code, reason=code and f"the bank said {code}", retryable=retryable,
    )


def record(state: SagaState | None, decision: Decision, log: list[str]) -> SagaState:
    """What the orchestrator's shell does with a decision, minus the database: fold the events."""
    for event in decision.events:
        state = evolve(state, event)
        step = getattr(event, "step", None)
        undo = getattr(event, "direction", None) is Direction.COMPENSATE
        gave_up = isinstance(event, StepTimedOut) and event.gave_up
        detail = ", compensate" if undo else ", gave up" if gave_up else ""
        log.append(event.type + (f"({step}{detail})" if step else ""))
    assert state is not None
    return state


# (step, direction, attempt) -> (outcome, failure code, retryable), or None for no reply at all;
# unlisted commands succeed.
Answers = dict[tuple[str, str, int], tuple[Outcome, str, bool] | None]


def participant_reply(decision: Decision, answers: Answers, definition: SagaDefinition
                      ) -> StepReply | None:
    """The reply to the command `decision` sent, if there is one and its participant answers."""
    if not decision.commands:
        return None  # no command: a retry is waiting out its backoff
    (command,) = decision.commands  # at most one step command is outstanding per saga
    answer = answers.get((command.step, command.direction.value, command.attempt),
                         (Outcome.SUCCEEDED, "", False))
    if answer is None:
        return None  # the participant stays silent: the command's deadline will pass
    outcome, code, retryable = answer
    return reply(command, definition, outcome, code or None, retryable)


# The saga types of a deployment, by name: definitions are looked up by (type, version).
SAGAS = SagaTypes([PAYOUT_TYPE])


def run(n: int, answers: Answers, sagas: SagaTypes = SAGAS,
        state: SagaState | None = None) -> tuple[SagaState, list[str], timedelta]:
    """Start one saga (or go on with `state`) and play its participants and the recovery worker
    until it ends; return its final state, its events, and how long it took on the saga's
    clock. Every decision is taken on the definition the saga started on (`definition_of`)."""
    log: list[str] = []
    now = NOW
    if state is None:
        decision = decide_start(sagas["payout"].current, None, request(n), now)
        assert decision.verdict is Verdict.STARTED
        state = record(None, decision, log)
    else:
        command = outstanding_command(sagas.definition_of(state), state)
        assert command is not None
        decision = Decision(Verdict.APPLIED, commands=(command,))
    while not state.terminal:
        definition = sagas.definition_of(state)
        message = participant_reply(decision, answers, definition)
        if message is not None:
            decision = decide_reply(definition, state, message, now)
            state = record(state, decision, log)
            # The same reply again (a redelivery) changes nothing: the command it answers is done.
            assert decide_reply(definition, state, message, now).verdict is Verdict.STALE
            continue
        # Nothing to answer. The recovery worker wakes the saga at its `due_at` (a retry's
        # backoff is over, or the command's deadline passed) and starts the retry (a new command
        # id), re-sends the command (the same id, a new deadline) or, with the step's attempts
        # spent, gives up on the step. Before then it leaves the saga alone.
        assert state.due_at is not None and decide_due(definition, state, now) is None
        now = state.due_at
        due = decide_due(definition, state, now)
        assert due is not None
        decision = due
        state = record(state, decision, log)
    return state, log, now - NOW


happy, happy_log, _ = run(1, {})
print("\ncompleted:  ", " ".join(happy_log))

refused_by_bank, refused_log, _ = run(2, {("send", "forward", 1): (Outcome.FAILED, "IBAN_CLOSED",
                                                                    False)})
print("compensated:", " ".join(refused_log))

retried, retried_log, retry_took = run(3, {("send", "forward", 1): (Outcome.FAILED, "BANK_DOWN",
                                                                    True)})
print("retried:    ", " ".join(retried_log), f"(after {retry_took.total_seconds():.2f} s)")

silent, silent_log, silence_took = run(4, {("hold", "forward", 1): None})
print("timed out:  ", " ".join(silent_log), f"(after {silence_took.total_seconds():.0f} s)")

# Deciding is deterministic: the same input gives the same events and commands (ids are uuid5),
# which is what makes re-processing a redelivered message after a crash safe.
assert decide_start(PAYOUT, None, request(1), NOW) == decide_start(PAYOUT, None, request(1), NOW)
# A re-sent request for a saga that exists is a duplicate, not a second saga.
assert decide_start(PAYOUT, happy, request(1), NOW).verdict is Verdict.DUPLICATE

assert "no compensation" in no_compensation and "must not have a compensation" in undo_after_pivot
assert "repeats a step name" in twice and "must not have a compensation" in undo_nothing
assert "needs a backoff" in shrinking_wait
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
assert retried_log[6:9] == ["StepFailed(send)", "StepRetryScheduled(send)", "StepStarted(send)"]
# The one wait was the backoff after attempt 1: 2 s, less up to half of it.
assert timedelta(seconds=1) <= retry_took <= timedelta(seconds=2)
# The hold went out three times under one command id (at 0, 5 and 10 s); at 15 s the step gave
# up. It may have been placed, so it is released; the saga never reached the bank.
assert silent.status is SagaStatus.COMPENSATED and silence_took == timedelta(seconds=15)
assert silent_log[3:] == ["StepStarted(hold)", "StepTimedOut(hold)", "StepTimedOut(hold)",
                          "StepTimedOut(hold, gave up)", "StepStarted(hold, compensate)",
                          "StepCompensated(hold)", "SagaCompensated"]


# ---- versions: a new definition deployed beside the old one

VERIFY = Action("bank", "verify")
# Version 2 asks the bank to verify the IBAN before anything is held. Step names are persisted,
# so a change is a new version, never an edit of the one sagas may be running on.
PAYOUT_V2 = SagaDefinition(
    name="payout",
    version=2,
    steps=(PAYOUT.steps[0],
           Step("verify", action=VERIFY, compensation=None, has_effect=False),
           *PAYOUT.steps[1:]),
)
v1_only = SAGAS
both = SagaTypes([SagaType(name="payout", definitions=(PAYOUT, PAYOUT_V2),
                           start_model=PayoutRequested, start_topic="payouts.commands.v1",
                           business_key=lambda request: request.payout_id,
                           intake=PAYOUT_TYPE.intake)])

# A saga starts while only version 1 is deployed, and gets past its screen ...
started = decide_start(v1_only["payout"].current, None, request(5), NOW)
in_flight = record(None, started, [])
in_flight = record(in_flight, decide_reply(PAYOUT, in_flight, reply(started.commands[0]), NOW), [])
# ... then version 2 is deployed beside it: the saga finishes on version 1, new ones run version 2.
old, old_log, _ = run(5, {}, both, in_flight)
new, new_log, _ = run(6, {}, both)
print("\non v1:      ", " ".join(old_log))
print("on v2:      ", " ".join(new_log))
assert (old.definition_version, old.status) == (1, SagaStatus.COMPLETED)
assert "StepStarted(verify)" not in old_log and old.applied == ("screen", "hold", "send",
                                                                 "notify")
assert (new.definition_version, new.status) == (2, SagaStatus.COMPLETED)
assert new_log[1:3] == ["StepStarted(screen)", "StepSucceeded(screen)"]
assert new_log[3:5] == ["StepStarted(verify)", "StepSucceeded(verify)"]
# Removing version 1 while a saga runs on it is refused when a worker starts.
assert SagaTypes([SagaType(name="payout", definitions=(PAYOUT_V2,), start_model=PayoutRequested,
                           start_topic="payouts.commands.v1",
                           business_key=lambda request: request.payout_id)]
                 ).missing([("payout", 1)]) == [("payout", 1)]
