"""Saga throughput and latency on the embedded stack, beside a raw Kafka round trip.

    python bench/saga_throughput.py [--runs 3] [--transfers 2000] [--concurrency 1 200]

For each concurrency C, a closed-loop driver keeps C transfers in flight until K completed:
it publishes a request, learns of the saga's end from the orchestrator's `saga_terminal`
notification, and publishes the next. Latency is end to end as the upstream sees it: from
publishing the request to the saga's terminal commit. Workers are separate processes, as in
production. Every figure printed is the median of `--runs` runs; the invariants are checked
after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from sqlalchemy import text

from orchestrator.checker import check
from orchestrator.demo import percentile
from orchestrator.embedded import EmbeddedStack, settings_for
from orchestrator.processes import WorkerProcesses
from orchestrator.settings import Settings
from orchestrator.store import TERMINAL_CHANNEL, create_engine, migrate
from schemas import TOPIC_TRANSFER_COMMANDS

ACCOUNTS = 200


@dataclass
class RunResult:
    concurrency: int
    transfers: int
    elapsed_s: float
    sagas_per_s: float
    p50_ms: float
    p99_ms: float
    invariants_ok: bool
    stuck: int = 0


async def run_once(settings: Settings, engine, concurrency: int, transfers: int,
                   run_id: str) -> RunResult:
    from steps.ledger import open_account

    accounts = [f"b{run_id}-{i}" for i in range(ACCOUNTS)]
    async with engine.begin() as conn:
        for account in accounts:
            await open_account(conn, account, "EUR", Decimal("1000000.00"))
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0,
                         "enable.idempotence": True})
    topic = settings.topic(TOPIC_TRANSFER_COMMANDS)
    sent_at: dict[str, float] = {}  # wall-clock seconds, comparable with the database's clock
    latencies: list[float] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    next_index = 0

    def publish_next() -> None:
        nonlocal next_index
        if next_index >= transfers:
            return
        i = next_index
        next_index += 1
        transfer_id = str(uuid.uuid4())
        body = {"transfer_id": transfer_id, "source_account": accounts[i % ACCOUNTS],
                "destination_account": accounts[(i * 7 + 1) % ACCOUNTS], "amount": "1.00",
                "currency": "EUR", "reference": "bench", "requested_by": "bench"}
        sent_at[transfer_id] = time.time()
        producer.produce(topic, value=json.dumps(body).encode(), key=transfer_id.encode())
        producer.poll(0)

    def finished(transfer_id: str, at: float) -> None:
        started = sent_at.pop(transfer_id, None)
        if started is None:
            return
        latencies.append((at - started) * 1000)
        if len(latencies) == transfers:
            loop.call_soon(done.set)
        else:
            publish_next()

    def on_terminal(_conn, _pid, _channel, transfer_id: str) -> None:
        finished(transfer_id, time.time())

    async def sweep_missed() -> int:
        """Sagas that ended without their notification reaching us (counted and reported)."""
        if not sent_at:
            return 0
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT s.transfer_id, extract(epoch FROM e.recorded_at) AS at FROM sagas s"
                " JOIN saga_events e ON e.saga_id = s.saga_id AND e.seq = s.version"
                " WHERE s.transfer_id = ANY(CAST(:ids AS uuid[]))"
                " AND s.status IN ('COMPLETED', 'COMPENSATED', 'REJECTED', 'FAILED')"
                " AND e.recorded_at < now() - interval '1 second'"),
                {"ids": list(sent_at)})).all()
        for row in rows:
            finished(str(row.transfer_id), float(row.at))
        return len(rows)

    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.add_listener(TERMINAL_CHANNEL, on_terminal)
        started = time.perf_counter()
        for _ in range(concurrency):
            publish_next()
        producer.flush(5)
        # Keep the producer's delivery reports moving while we wait; a run that makes no
        # progress for 30 s is reported with its stuck sagas rather than waited on for ever.
        last_progress, last_count = time.perf_counter(), 0
        last_sweep, missed = time.perf_counter(), 0
        while not done.is_set():
            producer.poll(0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.005)
            if time.perf_counter() - last_sweep > 1.0:
                missed += await sweep_missed()
                last_sweep = time.perf_counter()
            if len(latencies) != last_count:
                last_progress, last_count = time.perf_counter(), len(latencies)
            elif time.perf_counter() - last_progress > 30:
                print(f"  no progress for 30 s: {len(sent_at)} sagas stuck: "
                      f"{list(sent_at)[:5]}", file=sys.stderr)
                break
        elapsed = time.perf_counter() - started
        await raw.remove_listener(TERMINAL_CHANNEL, on_terminal)
    if missed:
        print(f"  {missed} saga ends were found by polling, not notification", file=sys.stderr)
    producer.flush(5)
    report = await check(engine)
    for failure in report.failures():
        print(f"  VIOLATION {failure.invariant} {failure.name}: {failure.detail}", file=sys.stderr)
    return RunResult(concurrency, transfers, elapsed, len(latencies) / elapsed,
                     percentile(latencies, 50), percentile(latencies, 99), report.ok,
                     stuck=len(sent_at))


def kafka_round_trip_ms(settings: Settings, samples: int = 200) -> float:
    """Median request/reply round trip through the broker: produce a request, an echo consumer
    replies, the requester consumes the reply. Same fetch settings as the workers."""
    tag = uuid.uuid4().hex[:8]
    requests, replies = f"rt-req-{tag}", f"rt-rep-{tag}"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    created = admin.create_topics([NewTopic(requests, 1, 1), NewTopic(replies, 1, 1)])
    for future in created.values():
        future.result(10)

    def consumer(topic: str) -> Consumer:
        c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"rt-{tag}",
                      "fetch.wait.max.ms": settings.kafka_fetch_wait_ms,
                      "enable.auto.commit": False})
        c.assign([TopicPartition(topic, 0, 0)])
        return c

    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0})
    stop = threading.Event()

    def echo() -> None:
        c = consumer(requests)
        echo_producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0})
        while not stop.is_set():
            m = c.poll(0.05)
            if m is not None and not m.error():
                echo_producer.produce(replies, m.value())
                echo_producer.flush(5)
        c.close()

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    reply_consumer = consumer(replies)
    times = []
    for i in range(samples + 20):
        t0 = time.perf_counter()
        producer.produce(requests, str(i).encode())
        producer.flush(5)
        while True:
            m = reply_consumer.poll(1.0)
            if m is not None and not m.error():
                break
        if i >= 20:  # warm-up excluded
            times.append((time.perf_counter() - t0) * 1000)
    stop.set()
    thread.join(5)
    reply_consumer.close()
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--transfers", type=int, default=2000,
                        help="transfers per run at high concurrency")
    parser.add_argument("--low-transfers", type=int, default=100,
                        help="transfers per run at concurrency 1")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 200])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with EmbeddedStack() as stack:
        settings = settings_for(stack, Settings(topic_prefix="bench."))
        engine = create_engine(stack.postgres.url)
        await migrate(engine)
        workers = WorkerProcesses(settings, stack.root / "logs")
        workers.start()
        try:
            await workers.wait_ready(engine)
            rows = []
            for concurrency in args.concurrency:
                transfers = args.low_transfers if concurrency == 1 else args.transfers
                # One unmeasured warm-up run per setting (connection pools, plan caches).
                await run_once(settings, engine, concurrency, min(transfers, 100),
                               f"warm{concurrency}")
                results = [await run_once(settings, engine, concurrency, transfers,
                                          f"{concurrency}x{run}") for run in range(args.runs)]
                for r in results:
                    print(f"  run c={r.concurrency}: {r.sagas_per_s:.1f} sagas/s, "
                          f"p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, "
                          f"invariants {'ok' if r.invariants_ok else 'VIOLATED'}, "
                          f"stuck {r.stuck}",
                          file=sys.stderr)
                rows.append({
                    "concurrency": concurrency, "transfers_per_run": transfers,
                    "runs": args.runs,
                    "sagas_per_s": round(statistics.median(r.sagas_per_s for r in results), 1),
                    "p50_ms": round(statistics.median(r.p50_ms for r in results), 1),
                    "p99_ms": round(statistics.median(r.p99_ms for r in results), 1),
                    "invariants_ok": all(r.invariants_ok for r in results),
                    "stuck": sum(r.stuck for r in results),
                })
            round_trips = [kafka_round_trip_ms(settings) for _ in range(args.runs)]
        finally:
            workers.stop()
            await engine.dispose()
    kafka_rt = round(statistics.median(round_trips), 2)
    if args.json:
        print(json.dumps({"sagas": rows, "kafka_round_trip_ms": kafka_rt}))
        return
    print(f"\n{'concurrency':>11} {'sagas/s':>9} {'p50 ms':>8} {'p99 ms':>8}  invariants")
    for row in rows:
        print(f"{row['concurrency']:>11} {row['sagas_per_s']:>9} {row['p50_ms']:>8} "
              f"{row['p99_ms']:>8}  {'ok' if row['invariants_ok'] else 'VIOLATED'}")
    print(f"\nraw Kafka request/reply round trip on the same broker: {kafka_rt} ms (median)")
    print("a transfer saga is 11 Kafka hops (1 intake + 5 steps x 2) plus 6 orchestrator and "
          "5 participant transactions")


def _interrupt(*_args: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGTERM (a timeout, Ctrl-C's cousin) unwinds like Ctrl-C, so the stack and workers stop.
    signal.signal(signal.SIGTERM, _interrupt)
    asyncio.run(main())
