"""CPU time of the pure decision core per transfer saga, with no I/O at all.

    python bench/core_decisions.py [--sagas 1500] [--rounds 3] [--json]

Drives transfer sagas through `decide_start`, one successful reply per command
(`decide_reply`), `evolve` for every event and `SagaState.to_json`/`from_json` at each hop, as
the orchestrator does, until each ends. Reports process CPU time (not wall time: the figure
stays meaningful on a busy machine) per saga, for each round and their median. The
orchestrator's own CPU per saga at high concurrency is about twice this (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections import deque
from datetime import UTC, datetime

from orchestrator.core.saga import SagaState, decide_reply, decide_start, evolve
from schemas import Outcome, StepReply, TransferRequested
from steps.saga import TRANSFER, TRANSFER_TYPE


def one_saga(now: datetime) -> None:
    request = TransferRequested(
        transfer_id=uuid.uuid4(), source_account="acc-1", destination_account="acc-2",
        amount="1.00", currency="EUR", requested_by="bench")
    decision = decide_start(TRANSFER, None, TRANSFER_TYPE.start(request), now)
    state: SagaState | None = None
    for event in decision.events:
        state = evolve(state, event)
    commands = deque(decision.commands)
    while state is not None and not state.terminal and commands:
        command = commands.popleft()
        reply = StepReply(
            reply_id=uuid.uuid4(), command_id=command.command_id, saga_id=command.saga_id,
            step=command.step, direction=command.direction, attempt=command.attempt,
            participant="bench", outcome=Outcome.SUCCEEDED)
        decision = decide_reply(TRANSFER, state, reply, now)
        for event in decision.events:
            state = evolve(state, event)
        # The worker stores the state as JSON and a later batch may read it back.
        state = SagaState.from_json(json.loads(json.dumps(state.to_json())))
        commands.extend(decision.commands)
    if state is None or not state.terminal:
        raise SystemExit(f"the saga did not end: {state}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    now = datetime.now(UTC)
    one_saga(now)  # imports and caches warmed outside the measurement
    rounds = []
    for _ in range(args.rounds):
        started = time.process_time()
        for _ in range(args.sagas):
            one_saga(now)
        rounds.append((time.process_time() - started) / args.sagas * 1000)
    result = {"sagas_per_round": args.sagas,
              "cpu_ms_per_saga_by_round": [round(r, 3) for r in rounds],
              "cpu_ms_per_saga": round(statistics.median(rounds), 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"pure core: {result['cpu_ms_per_saga']} ms of CPU per transfer saga (median of "
              f"{args.rounds} rounds of {args.sagas}: {result['cpu_ms_per_saga_by_round']})")


if __name__ == "__main__":
    main()
