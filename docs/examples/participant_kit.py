"""A participant written with the kit, and its rules tested the way a team would: no broker, no
database. The participant is the card top-up's wallet (docs/examples/card_topup/wallet.py).

Run it: `python docs/examples/participant_kit.py` (tests/unit/test_docs_examples.py runs it too).
tests/integration/test_example_participant.py runs the same participants on the real broker
and PostgreSQL: stored replies, replays, tombstones, dead letters.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID

from card_topup.actions import cards, wallet
from card_topup.messages import CardTopUpRequested
from card_topup.saga import CARD_TOPUP
from card_topup.wallet import WALLET, Wallet, hold
from orchestrator.core import Action, SagaDefinition, Step, command_id_for
from orchestrator.errors import ConfigurationError
from orchestrator.participant import ParticipantService, StepResult
from schemas import Direction, Outcome, StepCommand

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def command(n: int, action: Action, amount: str = "25.00",
            direction: Direction = Direction.FORWARD) -> StepCommand:
    """The step command the orchestrator would send for top-up `n`: its payload is the
    saga's input, the request."""
    request = CardTopUpRequested(topup_id=UUID(int=n), wallet_id="w-1", card_id="card-9",
                                 amount=Decimal(amount), currency="EUR", requested_by="docs")
    step = {"hold": "hold", "release": "hold", "capture": "capture", "load": "load"}[action.name]
    saga_id = UUID(int=1000 + n)
    return StepCommand(command_id=command_id_for(saga_id, step, direction, 1), saga_id=saga_id,
                       saga_type=CARD_TOPUP.name, step=step, action=action.name,
                       direction=direction, attempt=1, deadline_at=NOW,
                       payload=request.model_dump(mode="json"))


# ---- a handler is a plain function: call it with a command and the view it would be given

wallets = {"w-1": Wallet("w-1", "EUR", balance=Decimal("60.00"), held=Decimal("0.00"))}
answer = hold(command(1, wallet.HOLD, "25.00"), wallets, NOW)
print("hold 25.00:", answer.result.outcome.value, answer.result.result)
print("  its row: ", answer.rows[0][0], {k: str(v) for k, v in answer.rows[0][1].items()})
assert answer.result == StepResult.ok(held="25.00")
assert wallets["w-1"].available == Decimal("35.00")  # the view moved on for the next command

# ---- the built participant decides a batch in order, each command seeing the ones before

wallets = {"w-1": Wallet("w-1", "EUR", balance=Decimal("60.00"), held=Decimal("0.00"))}
batch = [command(2, wallet.HOLD, "25.00"), command(3, wallet.HOLD, "25.00"),
         command(4, wallet.HOLD, "25.00")]
decided = WALLET.decide(batch, wallets, NOW)
for n, answered in enumerate(decided, start=2):
    print(f"hold of top-up {n}:", answered.result.outcome.value, answered.result.code or "",
          answered.result.reason or "")
assert [d.result.outcome for d in decided] == [Outcome.SUCCEEDED, Outcome.SUCCEEDED,
                                               Outcome.FAILED]
assert decided[2].result.code == "INSUFFICIENT_FUNDS" and not decided[2].rows

# ---- routing: the kit takes a command only for an action, in a direction, it has a rule for;
# the runtime dead-letters the others (UNKNOWN_ACTION) before anything is read or decided

print("release, compensating:", WALLET.unhandled(command(5, wallet.RELEASE,
                                                         direction=Direction.COMPENSATE)))
backwards = WALLET.unhandled(command(5, wallet.HOLD, direction=Direction.COMPENSATE))
print("hold, compensating:   ", backwards)
elsewhere = WALLET.unhandled(command(5, cards.LOAD))
print("load (a cards action):", elsewhere)
assert WALLET.unhandled(command(5, wallet.RELEASE, direction=Direction.COMPENSATE)) is None
assert backwards is not None and "no handler for the compensation 'hold'" in backwards
assert elsewhere is not None and "no handler for the forward action 'load'" in elsewhere

# ---- built against a definition, a participant without every handler it needs is refused

REFUND = Action("wallet", "refund")
EXTENDED = SagaDefinition("card_topup_with_refund", (
    *CARD_TOPUP.steps[:2],
    Step("refund", action=REFUND, compensation=None, has_effect=False),
))
half = ParticipantService("wallet")


@half.handles(wallet.HOLD)
def hold_only(one: StepCommand, view: None, now: datetime) -> StepResult:
    return StepResult.ok()


try:
    half.participant(EXTENDED)
except ConfigurationError as error:
    refusal = str(error)
else:
    raise AssertionError("a participant without its handlers must not build")
print("refused:", refusal)
assert refusal == (
    "participant 'wallet' has no handler for: card_topup_with_refund.hold: compensation"
    " wallet.release (@compensates); card_topup_with_refund.refund: forward action"
    " wallet.refund (@handles)")
