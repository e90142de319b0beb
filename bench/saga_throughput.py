"""Saga throughput and latency on the embedded stack, beside a raw Kafka round trip.

    python bench/saga_throughput.py [--runs 3] [--transfers 2000] [--concurrency 1 200]
    python bench/saga_throughput.py --sustain-s 300 --concurrency 32 [--json]

For each concurrency C, a closed-loop driver keeps C transfers in flight until K completed:
it submits a request with `SagaClient`, awaits the saga's outcome event on
`transfers.events.v1`, and submits the next. Latency is end to end as the upstream sees it:
from publishing the request to reading its outcome event. Workers are separate processes, as in
production. Every figure printed is the median of `--runs` runs; the invariants are checked
after each run.

With `--sustain-s N` the same driver keeps C in flight for N seconds instead (one run, one
concurrency) and reports each minute on its own: sagas ended per second, p50 and p99 of the
sagas that ended in it, and how many of them waited out a step deadline (a `StepTimedOut` in
their history: a command re-sent because no reply came in time). A last minute shorter than 60
s is reported as partial, over its own length; the comparison of the last minute with the first
uses full minutes only. Sagas still in flight at the end are waited for but not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.client import SagaClient
from orchestrator.dev.embedded import EmbeddedStack, settings_for
from orchestrator.dev.processes import WorkerProcesses
from orchestrator.errors import OutcomeTimeout
from orchestrator.ops.checker import check
from orchestrator.postgres.store import create_engine, migrate
from orchestrator.settings import Settings
from schemas import TransferRequested
from steps import APPLICATION
from steps.demo import percentile
from steps.saga import TRANSFER_TYPE

ACCOUNTS = 200
# A request with no outcome event this long after it was published counts as stuck.
STUCK_AFTER_S = 30.0


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
    p95_ms: float = 0.0
    # Each saga that ended: (transfer id, wall-clock end, latency ms); and the wall-clock start.
    ended: list[tuple[str, float, float]] = field(default_factory=list)
    started_at: float = 0.0


def _sustained_status(i: int, minute: list[float], length_s: float) -> str:
    return (f"  minute {i + 1}: {len(minute) / length_s:.1f} sagas/s, "
            f"p50 {percentile(minute, 50):.1f} ms, p99 {percentile(minute, 99):.1f} ms")


async def run_once(settings: Settings, engine: AsyncEngine, concurrency: int, transfers: int,
                   run_id: str, duration_s: float | None = None) -> RunResult:
    """K = `transfers` sagas with C in flight; or, with `duration_s`, C in flight for that long
    (no new request after it; those in flight then are waited for)."""
    from steps.ledger import open_account

    accounts = [f"b{run_id}-{i}" for i in range(ACCOUNTS)]
    async with engine.begin() as conn:
        for account in accounts:
            await open_account(conn, account, "EUR", Decimal("1000000.00"))
    latencies: list[float] = []
    ended: list[tuple[str, float, float]] = []
    stuck: list[str] = []
    next_index = 0
    started_at = time.time()

    def take() -> int | None:
        """The index of the next request, if the run wants one."""
        nonlocal next_index
        if duration_s is not None:
            if time.time() - started_at >= duration_s:
                return None
        elif next_index >= transfers:
            return None
        next_index += 1
        return next_index - 1

    async def driver(client: SagaClient) -> None:
        """One of the C closed loops: submit a request, await its outcome event, go on."""
        while (i := take()) is not None:
            request = TransferRequested(
                transfer_id=uuid.uuid4(), source_account=accounts[i % ACCOUNTS],
                destination_account=accounts[(i * 7 + 1) % ACCOUNTS], amount=Decimal("1.00"),
                currency="EUR", reference="bench", requested_by="bench")
            sent = time.time()
            try:
                await client.submit(TRANSFER_TYPE, request, timeout_s=STUCK_AFTER_S)
            except OutcomeTimeout:
                stuck.append(str(request.transfer_id))
                continue
            at = time.time()
            latencies.append((at - sent) * 1000)
            ended.append((str(request.transfer_id), at, latencies[-1]))

    async def minutes(stop: asyncio.Event) -> None:
        """Sustained: each full minute on stderr as it ends."""
        reported = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if time.time() - started_at >= 60 * (reported + 1):
                minute = [ms for _, at, ms in ended
                          if 60 * reported <= at - started_at < 60 * (reported + 1)]
                print(_sustained_status(reported, minute, 60.0), file=sys.stderr, flush=True)
                reported += 1

    # Outcomes come as an upstream service sees them: on transfers.events.v1, through the
    # client (positioned before the first request), not from the database.
    async with SagaClient(settings, [TRANSFER_TYPE], client_id=f"bench-{run_id}") as client:
        stop = asyncio.Event()
        reporter = asyncio.create_task(minutes(stop)) if duration_s is not None else None
        started = time.perf_counter()
        started_at = time.time()
        await asyncio.gather(*(driver(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        stop.set()
        if reporter is not None:
            await reporter
    if stuck:
        print(f"  no outcome within {STUCK_AFTER_S:g} s for {len(stuck)} sagas: {stuck[:5]}",
              file=sys.stderr)
    report = await check(engine, APPLICATION)
    for failure in report.failures():
        print(f"  VIOLATION {failure.invariant} {failure.name}: {failure.detail}", file=sys.stderr)
    published = transfers if duration_s is None else len(latencies) + len(stuck)
    return RunResult(concurrency, published, elapsed,
                     len(latencies) / elapsed, percentile(latencies, 50),
                     percentile(latencies, 99), report.ok, stuck=len(stuck),
                     p95_ms=percentile(latencies, 95), ended=ended, started_at=started_at)


async def sagas_with_deadline_waits(engine: AsyncEngine, transfer_ids: list[str]) -> set[str]:
    """The transfers whose saga waited out a step deadline at least once (re-sent or gave up)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT DISTINCT s.business_key FROM sagas s JOIN saga_events e USING (saga_id)"
            " WHERE e.type = 'StepTimedOut' AND s.saga_type = 'transfer'"
            " AND s.business_key = ANY(:ids)"),
            {"ids": transfer_ids})).scalars().all()
    return {str(t) for t in rows}


def minutes_of(ended: list[tuple[str, float, float]], started_at: float, duration_s: float,
               waited: set[str]) -> dict[str, Any]:
    """The sustained report from each ended saga (transfer id, wall-clock end, latency ms):
    one entry per minute of the window by end time, the last one partial if the window is not
    a whole number of minutes; sagas that ended after the window are counted apart."""
    minutes = []
    for i in range(int(-(-duration_s // 60))):
        length = min(60.0, duration_s - 60 * i)
        mine = [(t, ms) for t, at, ms in ended
                if 60 * i <= at - started_at < min(60 * (i + 1), duration_s)]
        latencies = [ms for _, ms in mine]
        minutes.append({
            "minute": i + 1, "duration_s": round(length, 1), "partial": length < 60,
            "sagas": len(mine), "sagas_per_s": round(len(mine) / length, 1),
            "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1),
            "deadline_waits": sum(t in waited for t, _ in mine),
        })
    full = [m for m in minutes if not m["partial"]]
    change_pct = None
    if len(full) >= 2 and full[0]["sagas_per_s"]:
        change_pct = round(100 * (full[-1]["sagas_per_s"] / full[0]["sagas_per_s"] - 1), 1)
    return {
        "sustain_s": duration_s, "minutes": minutes,
        # The last full minute against the first, in sagas/s (None: fewer than two full minutes).
        "last_vs_first_pct": change_pct,
        "last_within_10pct_of_first": None if change_pct is None else abs(change_pct) <= 10,
        "deadline_waits": sum(m["deadline_waits"] for m in minutes),
        "drained_after_window": sum(1 for _, at, _ in ended if at - started_at >= duration_s),
    }


async def sustained(settings: Settings, engine: AsyncEngine, concurrency: int, duration_s: float
                    ) -> dict[str, Any]:
    """One run of `duration_s` at `concurrency`, reported minute by minute (see the module)."""
    result = await run_once(settings, engine, concurrency, 0, f"s{concurrency}",
                            duration_s=duration_s)
    waited = await sagas_with_deadline_waits(engine, [t for t, _, _ in result.ended])
    return {"concurrency": concurrency,
            **minutes_of(result.ended, result.started_at, duration_s, waited),
            "invariants_ok": result.invariants_ok, "stuck": result.stuck}


def render_sustained(data: dict[str, Any]) -> str:
    lines = [f"\nsustained: concurrency {data['concurrency']} for {data['sustain_s']:g} s",
             f"{'minute':>7} {'sagas/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'deadline waits':>15}"]
    for m in data["minutes"]:
        partial = f"  (partial: {m['duration_s']:g} s)" if m["partial"] else ""
        lines.append(f"{m['minute']:>7} {m['sagas_per_s']:>9} {m['p50_ms']:>8} "
                     f"{m['p99_ms']:>8} {m['deadline_waits']:>15}{partial}")
    within = data["last_within_10pct_of_first"]
    if within is None:
        lines.append("last minute against the first: not judged (fewer than two full minutes)")
    else:
        lines.append(f"last full minute within 10% of the first: {'yes' if within else 'NO'} "
                     f"({data['last_vs_first_pct']:+.1f}% sagas/s)")
    lines.append(f"invariants {'ok' if data['invariants_ok'] else 'VIOLATED'}, "
                 f"stuck {data['stuck']}, {data['drained_after_window']} sagas ended after "
                 "the window (not counted)")
    return "\n".join(lines)


def kafka_round_trip_ms(settings: Settings, samples: int = 200) -> float:
    """Median request/reply round trip through the broker: produce a request, an echo consumer
    replies, the requester consumes the reply. Same fetch settings as the workers."""
    tag = uuid.uuid4().hex[:8]
    requests, replies = f"rt-req-{tag}", f"rt-rep-{tag}"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap or ""})
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
    parser.add_argument("--sustain-s", type=float, default=None, metavar="N",
                        help="instead of --runs: keep --concurrency (one value) sagas in flight"
                             " for N seconds and report each minute")
    parser.add_argument("--trace-sink", action="store_true",
                        help="workers export their spans (OTLP over HTTP) to a receiver in "
                             "this process that counts and drops them: the cost of tracing on")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.sustain_s is not None:
        if args.sustain_s <= 0:
            parser.error("--sustain-s must be positive")
        if "--concurrency" not in sys.argv[1:] or len(args.concurrency) != 1:
            parser.error("--sustain-s takes exactly one --concurrency value")

    sink = SpanSink() if args.trace_sink else None
    if sink is not None:
        # The workers inherit the environment: every one exports its spans over OTLP/HTTP.
        os.environ.update({"OTEL_TRACES_EXPORTER": "otlp",
                           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{sink.endpoint}/v1/traces"})
    with EmbeddedStack() as stack, (sink or contextlib.nullcontext()):
        settings = settings_for(stack, Settings(topic_prefix="bench."))
        engine = create_engine(stack.postgres.url)
        await migrate(engine, APPLICATION.migrations)
        workers = WorkerProcesses(settings, stack.root / "logs")
        workers.start()
        try:
            await workers.wait_ready(engine)
            if args.sustain_s is not None:
                [concurrency] = args.concurrency
                # One unmeasured warm-up run, as for --runs (connection pools, plan caches).
                await run_once(settings, engine, concurrency, 100, f"warm{concurrency}")
                data = await sustained(settings, engine, concurrency, args.sustain_s)
                print(json.dumps(data) if args.json else render_sustained(data))
                return
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
                          f"p50 {r.p50_ms:.1f} ms, p95 {r.p95_ms:.1f} ms, "
                          f"p99 {r.p99_ms:.1f} ms, "
                          f"invariants {'ok' if r.invariants_ok else 'VIOLATED'}, "
                          f"stuck {r.stuck}",
                          file=sys.stderr)
                rows.append({
                    "concurrency": concurrency, "transfers_per_run": transfers,
                    "runs": args.runs,
                    "sagas_per_s": round(statistics.median(r.sagas_per_s for r in results), 1),
                    "p50_ms": round(statistics.median(r.p50_ms for r in results), 1),
                    "p95_ms": round(statistics.median(r.p95_ms for r in results), 1),
                    "p99_ms": round(statistics.median(r.p99_ms for r in results), 1),
                    # each run's own figures, for comparisons across invocations
                    "runs_p50_ms": [round(r.p50_ms, 1) for r in results],
                    "runs_p95_ms": [round(r.p95_ms, 1) for r in results],
                    # Each run's figures, for comparisons across invocations.
                    "per_run": [{"sagas_per_s": round(r.sagas_per_s, 1),
                                 "p50_ms": round(r.p50_ms, 1), "p95_ms": round(r.p95_ms, 1),
                                 "p99_ms": round(r.p99_ms, 1)} for r in results],
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
    print(f"\n{'concurrency':>11} {'sagas/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
          "  invariants")
    for row in rows:
        print(f"{row['concurrency']:>11} {row['sagas_per_s']:>9} {row['p50_ms']:>8} "
              f"{row['p95_ms']:>8} {row['p99_ms']:>8}  "
              f"{'ok' if row['invariants_ok'] else 'VIOLATED'}")
    print(f"\nraw Kafka request/reply round trip on the same broker: {kafka_rt} ms (median)")
    print("a transfer saga is 11 Kafka hops (1 intake + 5 steps x 2) plus 6 orchestrator and "
          "5 participant transactions")


class SpanSink:
    """An OTLP/HTTP trace receiver on loopback that counts the spans it gets and keeps nothing:
    what tracing costs the workers, without a collector's own load on the machine."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        sink = self
        self.spans = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                sink.spans += sum(len(scope.spans) for resource in request.resource_spans
                                  for scope in resource.scope_spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> SpanSink:
        return self

    def __exit__(self, *exc: object) -> None:
        print(f"span sink: {self.spans} spans received", file=sys.stderr)
        self.server.shutdown()


def _interrupt(*_args: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGTERM (a timeout, Ctrl-C's cousin) unwinds like Ctrl-C, so the stack and workers stop.
    signal.signal(signal.SIGTERM, _interrupt)
    asyncio.run(main())
