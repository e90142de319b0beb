"""`saga demo`: the whole product on the embedded stack in one command.

Starts PostgreSQL and the broker, the five workers as processes, opens accounts, publishes N
transfer requests (a mix that completes, compensates at each depth, and is refused at intake),
re-sends some of them (same payload: ignored; different payload: refused), waits until every
transfer has its outcome event on `transfers.events.v1` (through `SagaClient`, as an upstream
service would; a request with no readable transfer id has none, only its dead letter), checks the
invariants, counts the distinct outcome events on the topic, and prints a summary and one
compensated timeline.

With SAGA_DATABASE_URL or SAGA_KAFKA_BOOTSTRAP set it refuses, before connecting to anything,
unless `--allow-external-stack` asks it to write into that stack (`refuse_external_stack`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from pydantic import ValidationError
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.client import SagaClient
from orchestrator.core import request_hash
from orchestrator.dev.embedded import EmbeddedBroker, EmbeddedStack, settings_for
from orchestrator.dev.processes import WorkerProcesses
from orchestrator.errors import ConfigurationError
from orchestrator.ops.checker import check
from orchestrator.ops.queries import render_timeline, timeline
from orchestrator.postgres.store import create_engine, migrate
from orchestrator.settings import Settings
from schemas import (
    SAGA_OUTCOME_ADAPTER,
    TOPIC_TRANSFER_COMMANDS,
    TOPIC_TRANSFER_EVENTS,
    RejectionCode,
    SagaOutcome,
    TransferRequested,
)
from steps import APPLICATION
from steps.saga import TRANSFER_TYPE

SANCTIONED = "demo-sanctioned"
# How long `--chaos` publishes (and kills) for, by default.
CHAOS_SECONDS = 20.0
# `--chaos-broker`: how long the killed broker stays down before it starts again on its port.
BROKER_DOWN_S = 2.0


@dataclass(frozen=True)
class Planned:
    kind: str  # ok | insufficient | closed_destination | over_limit | sanctioned | invalid:*
    payload: bytes
    transfer_id: str | None


def demo_accounts(prefix: str) -> list[tuple[str, str, Decimal, Decimal | None, bool]]:
    """(account id, currency, opening balance, daily outflow limit, closed)."""
    accounts: list[tuple[str, str, Decimal, Decimal | None, bool]] = [
        (f"{prefix}c{i:03d}", "EUR", Decimal("100000.00"), None, False) for i in range(40)
    ]
    accounts += [(f"{prefix}poor{i}", "EUR", Decimal("5.00"), None, False) for i in range(3)]
    accounts += [(f"{prefix}closed{i}", "EUR", Decimal("0.00"), None, True) for i in range(2)]
    accounts += [(f"{prefix}limited{i}", "EUR", Decimal("100000.00"), Decimal("50.00"), False)
                 for i in range(3)]
    accounts += [(f"{prefix}yen{i}", "JPY", Decimal("10000000"), None, False) for i in range(4)]
    accounts.append((f"{prefix}{SANCTIONED}", "EUR", Decimal("1000.00"), None, False))
    return accounts


def plan_transfers(n: int, prefix: str, rng: random.Random) -> list[Planned]:
    customers = [f"{prefix}c{i:03d}" for i in range(40)]
    yen = [f"{prefix}yen{i}" for i in range(4)]
    plans: list[Planned] = []

    def transfer(kind: str, source: str, destination: str, amount: str, currency: str = "EUR",
                 overrides: dict[str, Any] | None = None) -> Planned:
        transfer_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        body: dict[str, Any] = {
            "transfer_id": transfer_id, "source_account": source,
            "destination_account": destination, "amount": amount, "currency": currency,
            "reference": f"demo {len(plans)}", "requested_by": "demo@saga",
        }
        body.update(overrides or {})
        return Planned(kind, json.dumps(body).encode(), transfer_id)

    invalid_kinds = ["malformed", "float_amount", "unknown_currency", "zero", "negative",
                     "too_precise", "same_account", "missing_field"]
    for i in range(n):
        roll = rng.random()
        a, b = rng.sample(customers, 2)
        amount = f"{rng.randint(1, 20000) / 100:.2f}"
        if roll < 0.04:
            kind = invalid_kinds[i % len(invalid_kinds)]
            if kind == "malformed":
                plans.append(Planned("invalid:malformed", b'{"transfer_id": "' + str(i).encode()
                                     + b'", "amount": ', None))
                continue
            overrides: dict[str, Any] = {  # type: ignore[assignment]
                "float_amount": {"amount": 12.5}, "unknown_currency": {"currency": "XTS"},
                "zero": {"amount": "0.00"}, "negative": {"amount": "-3.00"},
                "too_precise": {"amount": "1.001"}, "same_account": {"destination_account": a},
                "missing_field": {"requested_by": None},
            }[kind]
            plans.append(transfer(f"invalid:{kind}", a, b, amount, overrides=overrides))
        elif roll < 0.07:
            plans.append(transfer("insufficient", f"{prefix}poor{i % 3}", b, "50.00"))
        elif roll < 0.10:
            plans.append(transfer("closed_destination", a, f"{prefix}closed{i % 2}", amount))
        elif roll < 0.13:
            plans.append(transfer("over_limit", f"{prefix}limited{i % 3}", b, "75.00"))
        elif roll < 0.15:
            plans.append(transfer("sanctioned", a, f"{prefix}{SANCTIONED}", amount))
        elif roll < 0.20:
            y1, y2 = rng.sample(yen, 2)
            plans.append(transfer("ok", y1, y2, str(rng.randint(1, 50000)), "JPY"))
        else:
            plans.append(transfer("ok", a, b, amount))
    return plans


async def seed(engine: AsyncEngine, prefix: str) -> None:
    from steps.ledger import open_account

    async with engine.begin() as conn:
        for account_id, currency, opening, limit, closed in demo_accounts(prefix):
            await open_account(conn, account_id, currency, opening, limit, closed)


def publish(settings: Settings, payloads: list[tuple[bytes, bytes | None]]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 2,
                         "enable.idempotence": True})
    topic = settings.topic(TOPIC_TRANSFER_COMMANDS)
    for value, key in payloads:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(30)
    if remaining:
        raise RuntimeError(f"{remaining} transfer requests were not acknowledged by the broker")


async def _progress(engine: AsyncEngine, transfer_ids: list[str], refused_payloads: list[bytes]
                    ) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT status, count(*) FROM sagas WHERE saga_type = 'transfer'"
            " AND business_key = ANY(:ids) GROUP BY status"), {"ids": transfer_ids})).all()
        refused_without_saga = (await conn.execute(text(
            "SELECT count(DISTINCT payload) FROM dead_letters WHERE stage = 'intake'"
            " AND business_key IS NULL AND payload = ANY(:p)"),
            {"p": refused_payloads})).scalar_one()
    counts = {status.lower(): n for status, n in rows}
    counts["rejected"] = counts.get("rejected", 0) + refused_without_saga
    return counts


async def _outcomes_expected(engine: AsyncEngine, transfer_ids: list[str]) -> int:
    """How many distinct outcome events the topic must hold: one per saga that ended (a
    refused request with a readable transfer id is a REJECTED saga), plus one per conflicting
    re-send (refused on a key that has its saga, answered with its own `rejected`)."""
    async with engine.connect() as conn:
        ended = (await conn.execute(text(
            "SELECT count(*) FROM sagas WHERE saga_type = 'transfer'"
            " AND business_key = ANY(:ids)"
            " AND status IN ('COMPLETED', 'COMPENSATED', 'REJECTED', 'FAILED', 'RESOLVED')"),
            {"ids": transfer_ids})).scalar_one()
        # By key, not by the re-sent payloads: a re-send consumed before its original (another
        # partition) starts the saga, and the original is the one refused.
        conflicts = (await conn.execute(text(
            "SELECT count(DISTINCT payload) FROM dead_letters WHERE stage = 'intake'"
            " AND reason_code = :code AND saga_type = 'transfer'"
            " AND business_key = ANY(:ids)"),
            {"code": RejectionCode.CONFLICTING_DUPLICATE.value,
             "ids": transfer_ids})).scalar_one()
    return int(ended) + int(conflicts)


def count_outcome_events(settings: Settings, quiet_s: float = 1.0, timeout_s: float = 60.0
                         ) -> int:
    """The distinct outcome events (by `event_id`) on the transfers' events topic, read from
    its start with a plain consumer until it has been quiet for `quiet_s` past every
    partition's end as first seen. Copies of one event (published again after a crash, or to
    answer a re-sent request) count once."""
    topic = settings.topic(TOPIC_TRANSFER_EVENTS)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"demo-outcomes-{uuid.uuid4()}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 5})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        targets = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)]
        ends: dict[int, int] = {}
        for tp in targets:
            watermarks = consumer.get_watermark_offsets(tp, timeout=10)
            ends[tp.partition] = watermarks[1] if watermarks else 0
        consumer.assign(targets)
        reached: dict[int, int] = {}
        event_ids: set[uuid.UUID] = set()
        quiet_since = time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = consumer.poll(0.05)
            if message is not None and not message.error():
                event_ids.add(SAGA_OUTCOME_ADAPTER.validate_json(message.value() or b"").event_id)
                reached[message.partition() or 0] = (message.offset() or 0) + 1
                quiet_since = time.monotonic()
                continue
            caught_up = all(reached.get(p, 0) >= end for p, end in ends.items())
            if caught_up and time.monotonic() - quiet_since >= quiet_s:
                break
        return len(event_ids)
    finally:
        consumer.close()


def _hash_of(payload: bytes) -> str | None:
    """The request hash the orchestrator will give a valid transfer request (its outcome
    carries it); None for one it will refuse (its outcome carries none)."""
    try:
        return request_hash(TransferRequested.model_validate_json(payload))
    except ValidationError:
        return None


async def _latencies_ms(engine: AsyncEngine, transfer_ids: list[str]) -> list[float]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT EXTRACT(EPOCH FROM (e.recorded_at - s.requested_at)) * 1000"
            " FROM sagas s JOIN saga_events e ON e.saga_id = s.saga_id AND e.seq = s.version"
            " WHERE s.saga_type = 'transfer' AND s.business_key = ANY(:ids)"
            " AND s.requested_at IS NOT NULL"
            " AND s.status IN ('COMPLETED', 'COMPENSATED', 'FAILED')"),
            {"ids": transfer_ids})).scalars().all()
    return [float(v) for v in rows]


async def _traces(engine: AsyncEngine, transfer_ids: list[str]) -> tuple[int, int, int]:
    """Of these transfers' sagas: how many distinct trace ids their events carry, how many
    sagas there are, and how many of them have events in more than one trace or in none (one
    saga is one trace: ADR 0015)."""
    async with engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT count(DISTINCT e.trace_id) AS traces, count(DISTINCT s.saga_id) AS sagas"
            " FROM sagas s JOIN saga_events e ON e.saga_id = s.saga_id"
            " WHERE s.saga_type = 'transfer' AND s.business_key = ANY(:ids)"),
            {"ids": transfer_ids})).one()
        split = (await conn.execute(text(
            "SELECT count(*) FROM (SELECT e.saga_id FROM sagas s"
            " JOIN saga_events e ON e.saga_id = s.saga_id"
            " WHERE s.saga_type = 'transfer' AND s.business_key = ANY(:ids)"
            " GROUP BY e.saga_id"
            " HAVING count(DISTINCT e.trace_id) <> 1 OR bool_or(e.trace_id IS NULL)) AS t"),
            {"ids": transfer_ids})).scalar_one()
    return int(row.traces), int(row.sagas), int(split)


async def _pick_compensated(engine: AsyncEngine, transfer_ids: list[str]) -> str | None:
    """The compensated saga that undid the most effects: the most instructive timeline."""
    async with engine.connect() as conn:
        return (await conn.execute(text(
            "SELECT s.saga_id FROM sagas s WHERE s.status = 'COMPENSATED'"
            " AND s.saga_type = 'transfer' AND s.business_key = ANY(:ids)"
            " ORDER BY s.version DESC LIMIT 1"),
            {"ids": transfer_ids})).scalar()


async def _wait_outbox_settled(engine: AsyncEngine, timeout_s: float, out: TextIO) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with engine.connect() as conn:
            pending = (await conn.execute(text(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
                " AND set_aside_at IS NULL"))).scalar_one()
        if pending == 0:
            return
        await asyncio.sleep(0.1)
    # Left for the checker to judge (I6); say which rows, so a slow relay can be told apart.
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT id, topic, attempts, last_error, created_at FROM outbox"
            " WHERE published_at IS NULL AND set_aside_at IS NULL ORDER BY id LIMIT 5"))).all()
    print(f"outbox rows still unpublished after {timeout_s:.0f} s: "
          + "; ".join(f"{r.id} {r.topic} attempts={r.attempts} error={r.last_error}"
                      f" created {r.created_at.isoformat()}" for r in rows), file=out)


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1..99), inclusive method; 0.0 for no values."""
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def sagas_in_flight(engine: AsyncEngine, transfer_ids: list[str]) -> int:
    """How many of these transfers' sagas are RUNNING or COMPENSATING now."""
    async with engine.connect() as conn:
        return int((await conn.execute(text(
            "SELECT count(*) FROM sagas WHERE status IN ('RUNNING', 'COMPENSATING')"
            " AND saga_type = 'transfer' AND business_key = ANY(:ids)"),
            {"ids": transfer_ids})).scalar_one())


@dataclass(frozen=True)
class Fault:
    """One fault the chaos demo caused, and how many sagas were in flight just before it."""

    fault: str  # "worker" (SIGKILLed and restarted) or "broker" (SIGKILLed, restarted later)
    target: str  # the worker's label, or the broker's address
    at_s: float  # seconds since publishing began
    sagas_in_flight: int


@dataclass
class ChaosMonkey:
    """`saga demo --chaos`: SIGKILL a random worker every 0.5-2 s and restart it at once, as
    long as transfers are being published, so sagas are in flight at every kill."""

    workers: WorkerProcesses
    rng: random.Random
    engine: AsyncEngine
    transfer_ids: list[str]
    started: float = field(default_factory=time.monotonic)
    kills: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(0.5, 2.0))
            if stop.is_set():
                return
            label = self.rng.choice(sorted(self.workers.processes))
            in_flight = await self._note("worker", label)
            await asyncio.to_thread(self.workers.restart, label)
            self.kills.append(label)
            print(f"  chaos: SIGKILLed {label} and restarted it ({in_flight} sagas in flight)",
                  file=sys.stderr, flush=True)

    async def _note(self, fault: str, target: str) -> int:
        in_flight = await sagas_in_flight(self.engine, self.transfer_ids)
        self.faults.append(Fault(fault, target, round(time.monotonic() - self.started, 3),
                                 in_flight))
        return in_flight

    async def crash_broker(self, crasher: BrokerCrasher, after_s: float) -> None:
        """SIGKILL the broker `after_s` into the run; it starts again `BROKER_DOWN_S` later."""
        await asyncio.sleep(after_s)
        in_flight = await self._note("broker", crasher.broker.bootstrap)
        print(f"  chaos: broker SIGKILLed ({in_flight} sagas in flight); it restarts on "
              f"{crasher.broker.bootstrap} in {BROKER_DOWN_S:g} s, with nothing in memory",
              file=sys.stderr, flush=True)
        await crasher.crash(BROKER_DOWN_S)


class BrokerCrasher:
    """Kills and restarts the embedded broker from a thread of its own that lives until
    `release`: the restarted broker gets the parent-death signal when the thread that started
    it ends (see `EmbeddedBroker.restart`), so that thread must outlive the broker. Release it
    only after the stack is stopped."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self._release = threading.Event()
        self._threads: list[threading.Thread] = []

    async def crash(self, down_s: float) -> None:
        """Returns once the broker listens again (or raises why it could not start)."""
        loop = asyncio.get_running_loop()
        restarted = asyncio.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.broker.restart(down_s=down_s, kill=True)
            except BaseException as error:
                errors.append(error)
            finally:
                loop.call_soon_threadsafe(restarted.set)
            self._release.wait()

        thread = threading.Thread(target=run, name="broker-crash", daemon=True)
        self._threads.append(thread)
        thread.start()
        await restarted.wait()
        if errors:
            raise errors[0]

    def release(self) -> None:
        self._release.set()
        for thread in self._threads:
            thread.join(5)


async def _publish_paced(settings: Settings, payloads: list[tuple[bytes, bytes | None]],
                         duration_s: float) -> None:
    """Publish in waves over `duration_s`, so that the chaos monkey always hits sagas in
    flight (a burst would be over before the first kill)."""
    waves = max(1, int(duration_s / 0.5))
    size = -(-len(payloads) // waves)
    for start in range(0, len(payloads), size):
        await asyncio.to_thread(publish, settings, payloads[start:start + size])
        await asyncio.sleep(0.5)


def refuse_external_stack(settings: Settings, transfers: int) -> None:
    """Raise ConfigurationError unless the settings leave the demo its own embedded stack.

    Pointed at an external PostgreSQL and Kafka, the demo writes into them: accounts with
    invented money, transfers, events, dead letters, and its workers' rows. That is only right
    when asked for by name (`--allow-external-stack`): settings left over in a shell, or a
    compose file's, must not turn a demo into writes to a real ledger. Nothing connects before
    this is decided."""
    if settings.embedded:
        return
    database = (make_url(settings.database_url).render_as_string(hide_password=True)
                if settings.database_url else "(SAGA_DATABASE_URL is not set)")
    broker = settings.kafka_bootstrap or "(SAGA_KAFKA_BOOTSTRAP is not set)"
    accounts = demo_accounts("")
    opening: dict[str, Decimal] = {}
    for _, currency, balance, _, _ in accounts:
        opening[currency] = opening.get(currency, Decimal(0)) + balance
    money = " and ".join(f"{total:,} {currency}" for currency, total in sorted(opening.items()))
    raise ConfigurationError(
        "refusing to run the demo against an external stack (SAGA_DATABASE_URL or "
        "SAGA_KAFKA_BOOTSTRAP is set). It would apply the migrations to the PostgreSQL at "
        f"{database} and open {len(accounts)} demo accounts there holding {money}, start its "
        f"own worker processes, and publish {transfers} transfer requests (and some re-sends) "
        f"to the Kafka at {broker}, under a fresh demo-xxxxxx- prefix for topics and accounts "
        "unless SAGA_TOPIC_PREFIX is set. To run it on its own embedded stack, unset both "
        "variables; to write into this stack, pass --allow-external-stack.")


async def run_demo(settings: Settings, transfers: int, timeout_s: float, as_json: bool,
                   seed_value: int | None = None, keep_files: bool = False,
                   chaos: bool = False, chaos_s: float = CHAOS_SECONDS,
                   chaos_broker: bool = False, allow_external_stack: bool = False
                   ) -> dict[str, Any]:
    out = sys.stderr
    if chaos_broker and not chaos:
        raise ConfigurationError("--chaos-broker adds a broker crash to --chaos: give both")
    if chaos_broker and not settings.embedded:
        raise ConfigurationError(
            "--chaos-broker kills and restarts the embedded broker, so it needs the embedded "
            "stack: unset SAGA_DATABASE_URL and SAGA_KAFKA_BOOTSTRAP")
    if not allow_external_stack:
        refuse_external_stack(settings, transfers)
    if not settings.embedded and not (settings.database_url and settings.kafka_bootstrap):
        raise ConfigurationError(
            "an external stack needs both SAGA_DATABASE_URL and SAGA_KAFKA_BOOTSTRAP (the "
            "demo publishes transfers and keeps their sagas): set both, or neither for the "
            "embedded stack")
    rng = random.Random(seed_value)
    stack: EmbeddedStack | None = None
    if settings.embedded:
        print("starting the embedded stack (PostgreSQL + tansu broker)...", file=out)
        stack = EmbeddedStack(keep_files=keep_files).start()
        settings = settings_for(stack, settings)
    prefix = f"demo-{uuid.uuid4().hex[:6]}-"
    settings = settings.model_copy(update={
        "topic_prefix": settings.topic_prefix or prefix,
        "risk_denied_accounts": [*settings.risk_denied_accounts, f"{prefix}{SANCTIONED}"]})
    assert settings.database_url
    engine = create_engine(settings.database_url)
    log_dir = (stack.root if stack else Path(".saga")) / "logs"
    workers = WorkerProcesses(settings, log_dir)
    crasher = BrokerCrasher(stack.broker) if stack is not None and chaos_broker else None
    closing: list[SagaClient] = []
    try:
        await migrate(engine, APPLICATION.migrations)
        print("starting workers:", ", ".join(workers.kinds), file=out)
        workers.start()
        await workers.wait_ready(engine)
        await seed(engine, prefix)
        plans = plan_transfers(transfers, prefix, rng)
        by_id = [p for p in plans if p.transfer_id and not p.kind.startswith("invalid:malformed")]
        transfer_ids = [p.transfer_id for p in by_id if p.transfer_id]
        refused_payloads = [p.payload for p in plans if p.kind == "invalid:malformed"]
        # Re-sends: an exact duplicate must be ignored; a changed payload must be refused.
        valid = [p for p in plans if p.kind == "ok"]
        duplicates = rng.sample(valid, min(len(valid), max(1, transfers // 100)))
        conflicts = rng.sample(valid, min(len(valid), max(1, transfers // 200)))
        conflict_payloads = []
        for p in conflicts:
            body = json.loads(p.payload)
            body["reference"] = body["reference"] + " (changed)"
            conflict_payloads.append(json.dumps(body).encode())
        # Positioned at the end of the events topic, with a waiter per transfer, before anything
        # is published: every outcome is seen.
        client = SagaClient(settings, [TRANSFER_TYPE], client_id="demo")
        closing.append(client)
        await client.start()
        waiting: dict[str, asyncio.Future[SagaOutcome]] = {
            p.transfer_id: client.expect(TRANSFER_TYPE, p.transfer_id, _hash_of(p.payload))
            for p in by_id if p.transfer_id}
        print(f"publishing {transfers} transfer requests (+{len(duplicates)} exact re-sends, "
              f"+{len(conflicts)} conflicting re-sends)...", file=out)
        started = time.monotonic()
        requests = [(p.payload, p.transfer_id.encode() if p.transfer_id else None)
                    for p in plans]
        resends = [(p.payload, p.transfer_id.encode() if p.transfer_id else None)
                   for p in duplicates] + [(c, None) for c in conflict_payloads]
        monkey: ChaosMonkey | None = None
        if chaos:
            monkey = ChaosMonkey(workers, rng, engine, transfer_ids)
            calm = asyncio.Event()
            chaos_tasks = [asyncio.create_task(monkey.run(calm))]
            print("chaos: killing and restarting a random worker every 0.5-2 s while "
                  "publishing" + (", and the broker once" if crasher else ""), file=out)
            if crasher is not None:
                # Mid-run, so that requests are published before, during and after the outage.
                chaos_tasks.append(asyncio.create_task(
                    monkey.crash_broker(crasher, rng.uniform(0.3, 0.5) * chaos_s)))
            try:
                await _publish_paced(settings, requests + resends, duration_s=chaos_s)
            finally:
                calm.set()
                await asyncio.gather(*chaos_tasks)
            print(f"chaos over after {len(monkey.faults)} faults; waiting for every transfer",
                  file=out)
        else:
            await asyncio.to_thread(publish, settings, requests)
            await asyncio.to_thread(publish, settings, resends)
        counts: dict[str, int] = {}
        terminal = 0
        last_line = 0.0
        refused_without_key = 0
        while time.monotonic() - started < timeout_s:
            # What an upstream service sees: the outcome events, and (for requests without a
            # readable transfer id, which have none) the dead letters.
            outcomes = [f.result() for f in waiting.values() if f.done() and not f.cancelled()]
            counts = dict(Counter(o.outcome for o in outcomes))
            if refused_payloads and refused_without_key < len(refused_payloads):
                refused_without_key = (await _progress(engine, [], refused_payloads)).get(
                    "rejected", 0)
            counts["rejected"] = counts.get("rejected", 0) + refused_without_key
            terminal = len(outcomes) + refused_without_key
            now = time.monotonic()
            done = terminal >= transfers
            # On a terminal: one line redrawn in place; in a log: a line every 2 s.
            if out.isatty() or done or now - last_line >= 2.0:
                line = (f"  {terminal}/{transfers} terminal  "
                        + "  ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                        + f"  {now - started:.1f}s")
                print(("\r" + line) if out.isatty() else line,
                      end="" if out.isatty() and not done else "\n", file=out, flush=True)
                last_line = now
            if done:
                break
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        await client.close()
        counts = await _progress(engine, transfer_ids, refused_payloads)
        # Published rows are marked in the background and leftovers swept after a grace period:
        # give the outbox a bounded time to settle before judging it (I6). 30 s: a 2-core
        # machine under a test suite once left a dead-letter row unpublished past 10 s.
        await _wait_outbox_settled(engine, timeout_s=30.0, out=out)
        report = await check(engine, APPLICATION, expect_quiescent=terminal >= transfers)
        latencies = await _latencies_ms(engine, transfer_ids)
        traces, sagas, sagas_not_in_one_trace = await _traces(engine, transfer_ids)
        finished = counts.get("completed", 0) + counts.get("compensated", 0)
        summary: dict[str, Any] = {
            "transfers": transfers,
            "completed": counts.get("completed", 0),
            "compensated": counts.get("compensated", 0),
            "rejected": counts.get("rejected", 0),
            "failed": counts.get("failed", 0),
            "stuck": transfers - terminal,
            # Of those, the sagas still in flight; the rest have no saga or dead letter at all.
            "stuck_in_flight": await sagas_in_flight(engine, transfer_ids),
            "money_conserved": report.money_conserved,
            "duplicate_effects": report.duplicate_effects,
            "invariants_ok": report.ok,
            "violations": [f"{c.invariant} {c.name}: {c.detail}" for c in report.failures()],
            "exact_resends": len(duplicates),
            "conflicting_resends": len(conflicts),
            "dead_letters": report.counts.get("dead_letters", 0),
            # Distinct outcome events on transfers.events.v1, read back with a plain consumer;
            # equal to the sagas that ended plus the conflicting re-sends when all is well.
            "outcome_events": await asyncio.to_thread(count_outcome_events, settings),
            "outcome_events_expected": await _outcomes_expected(engine, transfer_ids),
            # Distinct trace ids among the sagas' events: one per saga.
            "sagas": sagas,
            "traces": traces,
            "sagas_not_in_one_trace": sagas_not_in_one_trace,
            "elapsed_s": round(elapsed, 3),
            "sagas_per_s": round(finished / elapsed, 1) if elapsed else 0.0,
            "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1),
        }
        if monkey is not None:
            summary["chaos_kills"] = len(monkey.kills)
            summary["chaos_killed"] = dict(sorted(Counter(monkey.kills).items()))
            summary["chaos_broker_crashes"] = sum(f.fault == "broker" for f in monkey.faults)
            summary["chaos_faults"] = [asdict(f) for f in monkey.faults]
        compensated = await _pick_compensated(engine, transfer_ids)
        summary["example_compensated_saga"] = compensated and str(compensated)
        if compensated:
            summary["example_timeline"] = await timeline(engine, str(compensated))
        return summary
    finally:
        for opened in closing:
            await opened.close()
        workers.stop()
        await engine.dispose()
        if stack is not None:
            stack.stop()
            if crasher is not None:
                crasher.release()  # only now: the restarted broker is stopped
            if keep_files:
                print(f"kept the embedded stack's files and worker logs in {stack.root}",
                      file=out)


def render_summary(summary: dict[str, Any]) -> str:
    lines = ["", "demo summary"]
    keys = ["transfers", "completed", "compensated", "rejected", "failed", "stuck",
            "stuck_in_flight", "money_conserved", "duplicate_effects", "exact_resends",
            "conflicting_resends", "dead_letters", "outcome_events",
            "outcome_events_expected", "sagas", "traces", "elapsed_s", "sagas_per_s", "p50_ms",
            "p99_ms", "chaos_kills", "chaos_killed", "chaos_broker_crashes"]
    lines += [f"  {key:<20} {summary[key]}" for key in keys if key in summary]
    if summary.get("chaos_faults"):
        lines.append("  faults, and the sagas in flight at each:")
        lines += [f"    {f['at_s']:>7.2f} s  {f['fault']:<6} {f['target']:<24} "
                  f"{f['sagas_in_flight']} in flight" for f in summary["chaos_faults"]]
    for violation in summary["violations"]:
        lines.append(f"  VIOLATION {violation}")
    if summary.get("example_timeline"):
        lines += ["", "timeline of a compensated saga (saga timeline "
                  f"{summary['example_compensated_saga']}):",
                  render_timeline(summary["example_timeline"])]
    return "\n".join(lines)


async def cli_demo(settings: Settings, args: argparse.Namespace) -> int:
    """`saga demo`: run it, print the summary (`--json`: one object), exit 1 unless clean."""
    summary = await run_demo(settings, args.transfers, args.timeout, args.json, args.seed,
                             args.keep, chaos=args.chaos, chaos_s=args.chaos_seconds,
                             chaos_broker=args.chaos_broker,
                             allow_external_stack=args.allow_external_stack)
    if args.json:
        compact = {k: v for k, v in summary.items() if k != "example_timeline"}
        print(json.dumps(compact, default=str))
    else:
        print(render_summary(summary))
    clean = (summary["stuck"] == 0 and summary["invariants_ok"]
             and summary["outcome_events"] == summary["outcome_events_expected"])
    return 0 if clean else 1
