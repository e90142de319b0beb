"""What every chaos scenario needs: a world (its own database on a shared embedded stack, its own
topics, worker subprocesses), transfers that complete or compensate (made by the demo's own
helpers), fault helpers, and the verdict: every accepted saga terminal within a stated bound after
the faults stopped, the invariant checker (I1-I7) clean over the whole database, and every saga
that ended with exactly one outcome event on `transfers.events.v1` (read back with a plain
consumer, counted by event id per business key).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from orchestrator.core import outcome_event_id
from orchestrator.dev.embedded import EmbeddedStack, settings_for
from orchestrator.dev.processes import WorkerProcesses
from orchestrator.kafka.consumer import ORCHESTRATOR_GROUP
from orchestrator.ops.checker import check
from orchestrator.ops.queries import render_timeline, timeline
from orchestrator.postgres.store import create_engine, migrate
from orchestrator.settings import Settings
from schemas import (
    SAGA_OUTCOME_ADAPTER,
    TOPIC_REPLIES,
    TOPIC_TRANSFER_COMMANDS,
    TOPIC_TRANSFER_EVENTS,
    step_topic,
)
from steps import APPLICATION
from steps.demo import Planned, plan_transfers, seed

LOG_ROOT = Path(tempfile.gettempdir()) / "saga-chaos-logs"
# A scenario slower than this to finish prints the timeline of its last saga, to show why.
SLOW_S = 5.0
TERMINAL = ("COMPLETED", "COMPENSATED", "REJECTED", "FAILED")

# What each kind of transfer planned by `steps.demo.plan_transfers` must end as, when no
# step runs out of attempts. `over_limit` is the deepest compensation: the source's daily outflow
# limit refuses `settle` (the pivot), so `credit` is reversed and the `reserve` hold released.
EXPECTED: dict[str, frozenset[str]] = {
    "ok": frozenset({"COMPLETED"}),
    "over_limit": frozenset({"COMPENSATED"}),         # settle refused: undo credit, reserve
    "closed_destination": frozenset({"COMPENSATED"}),  # credit refused: undo reserve
    "insufficient": frozenset({"COMPENSATED"}),        # reserve refused: nothing to undo
}

# A handful per crash-point case: every kind, so every step is crossed in both directions (the
# deepest compensation, of `credit` and then `reserve`, only by `over_limit`).
SMALL_MIX = {"ok": 4, "over_limit": 4, "closed_destination": 2, "insufficient": 2}

# Every scenario's one-line summary, printed again by conftest at the end of the run.
SUMMARIES: list[str] = []


def report(line: str) -> None:
    SUMMARIES.append(line)
    print(line)


def plan(prefix: str, rng: random.Random, counts: Mapping[str, int]) -> list[Planned]:
    """`counts` transfers of each kind, interleaved at random, for accounts opened by
    `steps.demo.seed(engine, prefix)`."""
    pool = plan_transfers(40 * sum(counts.values()) + 400, prefix, rng)
    chosen: list[Planned] = []
    for kind, n in counts.items():
        of_kind = [p for p in pool if p.kind == kind]
        assert len(of_kind) >= n, f"the demo planner made only {len(of_kind)} {kind} transfers"
        chosen += of_kind[:n]
    rng.shuffle(chosen)
    return chosen


def transfer_ids(plans: Iterable[Planned]) -> list[str]:
    return [p.transfer_id for p in plans if p.transfer_id]


async def create_database(stack: EmbeddedStack, name: str) -> str:
    """A fresh database on the stack's server: the checker then judges this world alone."""
    admin = create_async_engine(stack.postgres.url, isolation_level="AUTOCOMMIT",
                                hide_parameters=True)
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    return make_url(stack.postgres.url).set(database=name).render_as_string(hide_password=False)


@dataclass
class World:
    """One scenario's database, topics and workers on a shared embedded stack."""

    stack: EmbeddedStack
    settings: Settings
    engine: AsyncEngine
    workers: WorkerProcesses
    name: str
    _log_marks: dict[str, int] = field(default_factory=dict)
    # One producer for the world's transfer requests: a fresh idempotent producer waits ~0.5 s
    # for its producer id before its first record is sent.
    _producer: Producer | None = None

    @classmethod
    async def create(cls, stack: EmbeddedStack, name: str, **overrides: Any) -> World:
        url = await create_database(stack, name)
        settings = settings_for(stack, Settings(topic_prefix=f"{name}.", **overrides))
        settings = settings.model_copy(update={"database_url": url})
        engine = create_engine(url)
        await migrate(engine, APPLICATION.migrations)
        # Outside the stack's folder, which goes when the stack stops: a failed scenario's logs
        # stay for reading (see `close`).
        workers = WorkerProcesses(settings, LOG_ROOT / name)
        return cls(stack, settings, engine, workers, name)

    async def start(self, envs: Mapping[str, dict[str, str]] | None = None,
                    labels: Iterable[str] | None = None) -> None:
        """Start the workers (every kind, or `labels`), each with its env from `envs`, and wait
        until they own their partitions."""
        envs = envs or {}
        wanted = list(labels) if labels is not None else list(self.workers.kinds)
        for label in wanted:
            self.mark_log(label)
            self.workers.start(label, envs.get(label))
        await self.workers.wait_ready(self.engine, labels=wanted)

    async def restart(self, label: str, env: dict[str, str] | None = None,
                      wait: bool = True) -> None:
        """SIGKILL `label` if it still runs and start it again (with `env`, else plain)."""
        self.mark_log(label)
        self.workers.restart(label, env)
        if wait:
            await self.workers.wait_ready(self.engine, labels=[label])

    async def heal(self) -> list[str]:
        """Start again every worker that is not running (one a failed case left down), so one
        failure does not cascade into the next case; returns their labels."""
        down = [label for label in self.workers.processes if not self.workers.alive(label)]
        for label in down:
            await self.restart(label, wait=False)
        return down

    def mark_log(self, label: str) -> None:
        path = self.workers.log_path(label)
        self._log_marks[label] = path.stat().st_size if path.exists() else 0

    def log_since_mark(self, label: str) -> str:
        """What `label` wrote since it was last (re)started through this world."""
        path = self.workers.log_path(label)
        if not path.exists():
            return ""
        with open(path, "rb") as log:
            log.seek(self._log_marks.get(label, 0))
            return log.read().decode(errors="replace")

    async def expect_crash(self, label: str, point: str, timeout_s: float,
                           signal_number: int = 9) -> None:
        """`label` must end by `signal_number` (SIGKILL) and say at which crash point."""
        code = await self.workers.wait_exit(label, timeout_s)
        tail = self.log_since_mark(label)[-3000:]
        assert code is not None, f"{label} did not reach {point} in {timeout_s}s; log:\n{tail}"
        assert code == -signal_number, f"{label} exited with {code}, not by SIGKILL:\n{tail}"
        assert f"crash point {point}" in tail, (
            f"{label} died elsewhere than {point} ({self._crash_lines(label)}):\n{tail}")

    def _crash_lines(self, label: str) -> str:
        """Where the log's crash point lines are, against the mark: for a failure message."""
        path = self.workers.log_path(label)
        mark = self._log_marks.get(label, 0)
        data = path.read_bytes() if path.exists() else b""
        found, at = [], data.find(b"crash point")
        while at >= 0:
            line = data[at:data.find(b"\n", at)].decode(errors="replace")
            found.append(f"{at}: {line}")
            at = data.find(b"crash point", at + 1)
        return f"mark {mark}, size {len(data)}, crash lines {found[-3:]}"

    def consumer_groups(self, label: str) -> list[tuple[str, list[str]]]:
        """The consumer groups (and their topics) the worker `label` consumes in."""
        kind = label.split("#", 1)[0]
        if kind == "orchestrator":
            return [(ORCHESTRATOR_GROUP, [self.settings.topic(TOPIC_TRANSFER_COMMANDS),
                                          self.settings.topic(TOPIC_REPLIES)])]
        if kind.startswith("participant:"):
            name = kind.split(":", 1)[1]
            return [(f"saga-participant-{name}", [self.settings.topic(step_topic(name))])]
        return []  # the relay and the recovery worker poll the database

    def positions(self, label: str) -> dict[tuple[str, int], tuple[int, int]]:
        """For each partition `label` consumes: (the offset its group committed, the log's
        start if none; the broker's high watermark). Blocking: call it from a thread."""
        found: dict[tuple[str, int], tuple[int, int]] = {}
        for group, topics in self.consumer_groups(label):
            consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap,
                                 "group.id": group, "enable.auto.commit": False})
            try:
                partitions = [TopicPartition(topic, p) for topic in topics
                              for p in range(self.settings.topic_partitions)]
                for tp in consumer.committed(partitions, timeout=10):
                    low, high = consumer.get_watermark_offsets(tp, timeout=10)
                    # Nothing committed yet counts from the start of the log.
                    committed = tp.offset if tp.offset >= 0 else low
                    found[(tp.topic, tp.partition)] = (committed, high)
            finally:
                consumer.close()
        return found

    def _uncommitted(self, label: str, upto: Mapping[tuple[str, int], int] | None = None
                     ) -> list[str]:
        """Partitions where `label`'s group has not committed every record the broker holds
        (or, given `upto`, every record below those offsets)."""
        return [f"{topic}[{partition}] at {committed} of {high}"
                for (topic, partition), (committed, high) in self.positions(label).items()
                if committed < (high if upto is None else upto.get((topic, partition), 0))]

    async def wait_committed(self, label: str, timeout_s: float = 30.0,
                             upto: Mapping[tuple[str, int], int] | None = None) -> list[str]:
        """Until `label`'s consumer group has committed its offset past every record the broker
        holds. A worker's offsets are committed asynchronously after each batch: killed before
        that commit lands, its successor gets the last batch again. A crash plan must not be
        tripped by such a redelivered record of an earlier case (that crash would prove nothing
        about this case's sagas), so a worker is given a plan only once its group is caught up.
        `upto`: only the records below these offsets. Returns the partitions that were behind
        at first (for the scenario's summary)."""
        deadline = time.monotonic() + timeout_s
        first: list[str] | None = None
        while True:
            try:
                behind = await asyncio.to_thread(self._uncommitted, label, upto)
            except KafkaException as error:  # no group coordinator yet: ask again
                behind = [str(error)]
            first = behind if first is None else first
            if not behind:
                return first
            assert time.monotonic() < deadline, (
                f"{label} did not commit its offsets in {timeout_s}s: {behind[:4]}")
            await asyncio.sleep(0.05)

    async def seed(self, prefix: str) -> None:
        await seed(self.engine, prefix)

    async def publish(self, plans: Iterable[Planned]) -> None:
        """Publish the transfer requests and wait until the broker acknowledged them."""
        if self._producer is None:
            # Never creating a topic: idle, it still refreshes its metadata, and after a broker
            # restart that would re-create the commands topic with the broker's default
            # partition count before the recovery worker's `ensure_topics` does.
            self._producer = Producer({"bootstrap.servers": self.settings.kafka_bootstrap,
                                       "linger.ms": 2, "enable.idempotence": True,
                                       "allow.auto.create.topics": False})
        producer = self._producer
        topic = self.settings.topic(TOPIC_TRANSFER_COMMANDS)

        def run() -> None:
            for p in plans:
                key = p.transfer_id.encode() if p.transfer_id else None
                while True:
                    try:
                        producer.produce(topic, value=p.payload, key=key)
                        break
                    except BufferError:
                        producer.poll(0.05)
                producer.poll(0)
            assert producer.flush(30) == 0, "transfer requests not acknowledged by the broker"

        await asyncio.to_thread(run)

    def publish_paced(self, plans: list[Planned], duration_s: float) -> threading.Thread:
        """Publish `plans` evenly over `duration_s` from a thread of its own (started here; join
        it), so traffic goes on while the test's event loop is blocked restarting a server."""
        def run() -> None:
            producer = Producer({"bootstrap.servers": self.settings.kafka_bootstrap,
                                 "linger.ms": 0, "enable.idempotence": True,
                                 "allow.auto.create.topics": False})
            topic = self.settings.topic(TOPIC_TRANSFER_COMMANDS)
            started = time.monotonic()
            for i, p in enumerate(plans):
                time.sleep(max(0.0, started + duration_s * i / len(plans) - time.monotonic()))
                producer.produce(topic, value=p.payload,
                                 key=p.transfer_id.encode() if p.transfer_id else None)
                producer.poll(0)
            assert producer.flush(30) == 0, "transfer requests not acknowledged by the broker"

        thread = threading.Thread(target=run, name="paced-publisher")
        thread.start()
        return thread

    async def statuses(self, ids: list[str]) -> dict[str, str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(text(
                "SELECT business_key, status FROM sagas"
                " WHERE saga_type = 'transfer' AND business_key = ANY(:ids)"), {"ids": ids})
            return {row.business_key: row.status for row in rows}

    async def wait_accepted(self, ids: list[str], timeout_s: float) -> None:
        """Until every transfer has a saga (the orchestrator took the request)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(Exception):
                if len(await self.statuses(ids)) == len(ids):
                    return
            assert time.monotonic() < deadline, f"requests not all accepted in {timeout_s}s"
            await asyncio.sleep(0.05)

    async def wait_terminal(self, ids: list[str], bound_s: float) -> float:
        """Seconds until every transfer's saga is terminal; fails past `bound_s` with the
        sagas still in flight. Database errors (a restarting server) count as not yet."""
        started = time.monotonic()
        statuses: dict[str, str] = {}
        while time.monotonic() - started < bound_s:
            with contextlib.suppress(Exception):
                statuses = await self.statuses(ids)
                if len(statuses) == len(ids) and all(s in TERMINAL for s in statuses.values()):
                    return time.monotonic() - started
            await asyncio.sleep(0.05)
        missing = [t for t in ids if t not in statuses]
        in_flight = await self._in_flight_sample()
        raise AssertionError(
            f"{self.name}: not every saga terminal {bound_s}s after the faults stopped: "
            f"{Counter(statuses.values())}, {len(missing)} without a saga (lost), in flight: "
            f"{in_flight}; worker logs in {self.workers.log_dir}")

    async def _in_flight_sample(self) -> list[Any]:
        with contextlib.suppress(Exception):
            async with self.engine.connect() as conn:
                return list((await conn.execute(text(
                    "SELECT saga_id, status, current_step, direction, attempt, due_at FROM sagas"
                    " WHERE status IN ('RUNNING', 'COMPENSATING') LIMIT 5"))).all())
        return []

    async def last_to_end(self, ids: list[str]) -> str:
        async with self.engine.connect() as conn:
            last = (await conn.execute(text(
                "SELECT s.business_key FROM sagas s JOIN saga_events e"
                " ON e.saga_id = s.saga_id AND e.seq = s.version"
                " WHERE s.saga_type = 'transfer' AND s.business_key = ANY(:ids)"
                " ORDER BY e.recorded_at DESC LIMIT 1"), {"ids": ids})).scalar_one()
        return (f"{self.name}: the saga that ended last:\n"
                + render_timeline(await timeline(self.engine, last)))

    async def wait_outbox_published(self, timeout_s: float = 15.0) -> bool:
        """Whether every outbox row got marked published within `timeout_s`. Published rows are
        marked in the background and stragglers swept after a grace period, so the quiescent
        check (I6) is judged only after this."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            async with self.engine.connect() as conn:
                pending = (await conn.execute(text(
                    "SELECT count(*) FROM outbox WHERE published_at IS NULL"
                    " AND set_aside_at IS NULL"))).scalar_one()
            if pending == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    async def verdict(self, scenario: str, plans: list[Planned], faults_stopped_at: float,
                      bound_s: float, expected: Mapping[str, frozenset[str]] = EXPECTED,
                      details: Callable[[], Awaitable[str]] | None = None) -> None:
        """The end of every scenario: all accepted sagas terminal within `bound_s` of the faults
        stopping (measured from `faults_stopped_at`, a `time.monotonic()`), none lost, each kind
        in its expected status, every worker still up, and the checker clean (quiescent).
        `details` adds the scenario's own figures to its summary line."""
        ids = transfer_ids(plans)
        waited = await self.wait_terminal(ids, bound_s - (time.monotonic() - faults_stopped_at))
        to_terminal_s = time.monotonic() - faults_stopped_at
        statuses = await self.statuses(ids)
        assert len(statuses) == len(ids), f"lost: {len(ids) - len(statuses)} transfers"
        wrong = [(p.kind, p.transfer_id, statuses[p.transfer_id]) for p in plans
                 if p.transfer_id and statuses[p.transfer_id] not in expected[p.kind]]
        assert not wrong, f"unexpected outcomes (kind, transfer, status): {wrong[:5]}"
        down = {label: self.workers.returncode(label) for label in self.workers.processes
                if not self.workers.alive(label)}
        assert not down, f"workers died outside the plan: {down}; logs in {self.workers.log_dir}"
        # Every outbox row published belongs to the bound too (I6 is judged with no grace).
        await self.wait_outbox_published(
            max(5.0, bound_s - (time.monotonic() - faults_stopped_at)))
        result = await check(self.engine, APPLICATION, expect_quiescent=True)
        assert result.ok, "\n".join(f"{c.invariant} {c.name}: {c.detail}"
                                    for c in result.failures())
        assert result.duplicate_effects == 0
        outcomes = await self.assert_one_outcome_per_ended_saga()
        extra = await details() if details is not None else ""
        if to_terminal_s > SLOW_S:
            # Why it took this long: the on-call view of the saga that ended last.
            print(await self.last_to_end(ids))
        counts = Counter(statuses.values())
        report(f"chaos {scenario}: {len(ids)} sagas, 0 lost, "
               + " ".join(f"{s.lower()}={n}" for s, n in sorted(counts.items()))
               + f", all terminal {to_terminal_s:.1f}s after the faults stopped"
               f" (bound {bound_s:.0f}s, waited {waited:.1f}s), checker ok (I1-I7),"
               f" duplicate effects 0, one outcome event each ({outcomes}){extra}")

    def outcome_records(self, timeout_s: float = 60.0) -> list[tuple[str, Any]]:
        """Every record on the transfers' events topic, from its start, as (key, outcome):
        read with a plain consumer until it was quiet for a while past each partition's end as
        first seen.

        The ends are what must be read: `verdict` asks only once every outbox row is published
        (acknowledged) and the quiescent checker passed, so every outcome event the sagas wrote
        is below them. The quiet time past them is a margin for a late stray record, not a wait
        for known ones: 0.5 s (it was 2 s, paid by every scenario and every crash case). A
        broker whose high watermarks are wrong (tansu, ADR 0007) gives no ends to trust: there,
        as before, 2 s."""
        quiet_s = 0.5 if self.settings.kafka_trust_watermarks else 2.0
        topic = self.settings.topic(TOPIC_TRANSFER_EVENTS)
        consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap,
                             "group.id": f"chaos-outcomes-{uuid.uuid4()}",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            ends = {}
            for p in partitions:
                watermarks = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                ends[p] = watermarks[1] if watermarks else 0
            consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
            records: list[tuple[str, Any]] = []
            reached: dict[int, int] = {}
            quiet_since, deadline = time.monotonic(), time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                message = consumer.poll(0.05)
                if message is not None and not message.error():
                    records.append((message.key().decode(),
                                    SAGA_OUTCOME_ADAPTER.validate_json(message.value())))
                    reached[message.partition()] = message.offset() + 1
                    quiet_since = time.monotonic()
                elif (all(reached.get(p, 0) >= end for p, end in ends.items())
                      and time.monotonic() - quiet_since >= quiet_s):
                    break
            return records
        finally:
            consumer.close()

    async def assert_one_outcome_per_ended_saga(self) -> int:
        """Every saga of the world's database that ended has exactly one outcome event (one
        event id, however many copies) on the events topic, keyed by its business key, saying
        how it ended; a saga that did not end has none. Returns how many sagas were judged."""
        async with self.engine.connect() as conn:
            sagas = {uuid.UUID(str(row.saga_id)): row for row in (await conn.execute(text(
                "SELECT saga_id, business_key, status FROM sagas"
                " WHERE saga_type = 'transfer'"))).all()}
        records = await asyncio.to_thread(self.outcome_records)
        events_by_saga: dict[uuid.UUID, dict[uuid.UUID, Any]] = {}
        for key, outcome in records:
            assert key == outcome.business_key, (key, outcome)
            saga = sagas.get(outcome.saga_id)
            assert saga is not None, f"an outcome event for no saga of this world: {outcome}"
            if outcome.outcome == "resolved" or (
                    outcome.outcome == "rejected" and saga.status != "REJECTED"):
                continue  # an operator's close, or the answer to a refused request on its key
            seen = events_by_saga.setdefault(outcome.saga_id, {})
            # Copies of one event (a relay's retry, an answer to a re-sent request) are equal.
            assert seen.setdefault(outcome.event_id, outcome) == outcome, (seen, outcome)
        ended = {saga_id for saga_id, row in sagas.items()
                 if row.status not in ("RUNNING", "COMPENSATING")}
        early = [str(sagas[s].business_key) for s in events_by_saga if s not in ended]
        assert not early, f"outcome events for sagas that did not end: {early[:5]}"
        missing = [str(sagas[s].business_key) for s in ended if s not in events_by_saga]
        assert not missing, f"{len(missing)} sagas ended with no outcome event: {missing[:5]}"
        for saga_id, events in events_by_saga.items():
            assert list(events) == [outcome_event_id(saga_id)], (
                f"saga {saga_id} has {len(events)} outcome events: {list(events.values())}")
            [outcome] = events.values()
            status = sagas[saga_id].status
            assert outcome.outcome == ("failed" if status == "RESOLVED" else status.lower()), (
                status, outcome)
        return len(ended)

    async def close(self, keep_logs: bool) -> None:
        """Kill every worker (nothing of theirs needs a clean stop: the scenario is judged);
        the logs are deleted unless `keep_logs` (a failed scenario)."""
        for label in self.workers.processes:
            self.workers.signal(label, signal.SIGKILL)
        if self._producer is not None:
            self._producer.flush(1)
            self._producer = None  # destroyed now, not left reconnecting to a stopped broker
        await self.engine.dispose()
        if keep_logs:
            print(f"worker logs of {self.name} kept in {self.workers.log_dir}")
        else:
            shutil.rmtree(self.workers.log_dir, ignore_errors=True)


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:6]}"
