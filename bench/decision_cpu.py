"""CPU the orchestrator spends per message before its one statement: parse, decide with the
core, build the rows (events, projection, outbox with headers). No database, no broker: what a
change on the orchestrator's hot path adds per message, without the noise of the full stack.

    python bench/decision_cpu.py [--messages 500] [--runs 11]

It starts `--messages` transfers from known-state (as the orchestrator's fast path does), then
folds a successful reply to each command they sent, carrying the trace context the participants
send back. Prints the best of `--runs` in process time per message. To compare two versions,
run it alternately from each checkout (ADR 0015 did, against `git archive main`), with the same
interpreter.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import create_async_engine

from orchestrator.kafka.consumer import Consumed, decode_headers
from orchestrator.postgres.store import OutboxRow
from orchestrator.settings import Settings
from orchestrator.workers.saga_worker import OrchestratorWorker
from schemas import TOPIC_REPLIES, TOPIC_TRANSFER_COMMANDS, Outcome, StepCommand, StepReply
from steps import APPLICATION

# Never connected to: the worker only needs an engine object to exist.
SETTINGS = Settings(kafka_bootstrap="127.0.0.1:1",
                    database_url="postgresql+asyncpg://bench@127.0.0.1:1/none")


def _starts(count: int) -> list[Consumed]:
    records = []
    for offset in range(count):
        transfer_id = str(uuid.uuid4())
        body = {"transfer_id": transfer_id, "source_account": f"a{offset}",
                "destination_account": f"b{offset}", "amount": "12.34", "currency": "EUR",
                "reference": "bench", "requested_by": "bench"}
        records.append(Consumed(SETTINGS.topic(TOPIC_TRANSFER_COMMANDS), 0, offset,
                                transfer_id.encode(), json.dumps(body).encode(), (),
                                int(time.time() * 1000)))
    return records


def _replies(outbox: list[OutboxRow]) -> list[Consumed]:
    records = []
    for offset, row in enumerate(outbox):
        command = StepCommand.model_validate_json(row.value)
        trace = tuple(h for h in decode_headers(row.headers)
                      if h[0] in ("traceparent", "tracestate"))
        reply = StepReply(reply_id=uuid.uuid5(command.command_id, "reply"),
                          command_id=command.command_id, saga_id=command.saga_id,
                          step=command.step, direction=command.direction,
                          attempt=command.attempt, participant="bench",
                          outcome=Outcome.SUCCEEDED)
        records.append(Consumed(SETTINGS.topic(TOPIC_REPLIES), 0, offset, None,
                                reply.model_dump_json().encode(),
                                (("message-id", b"m"), ("type", b"StepReply"), *trace), None))
    return records


def run_once(count: int) -> tuple[float, float]:
    """(µs per start, µs per reply) of one run."""
    engine = create_async_engine(SETTINGS.database_url or "")
    worker = OrchestratorWorker(SETTINGS, engine, None, APPLICATION.saga_types)  # type: ignore[arg-type]
    starts = _starts(count)
    began = time.process_time()
    writes = worker._decide_from_known([worker._parse(m) for m in starts], datetime.now(UTC))
    assert writes is not None
    worker._committed(writes, datetime.now(UTC))
    start_s = time.process_time() - began
    replies = _replies(list(writes.outbox))
    began = time.process_time()
    decided = worker._decide_from_known([worker._parse(m) for m in replies], datetime.now(UTC))
    reply_s = time.process_time() - began
    assert decided is not None
    return start_s / count * 1e6, reply_s / len(replies) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()
    runs = [run_once(args.messages) for _ in range(args.runs)]
    print(f"start: {min(r[0] for r in runs):.1f} us/message   "
          f"reply: {min(r[1] for r in runs):.1f} us/message")


if __name__ == "__main__":
    main()
