"""One embedded stack (real PostgreSQL + real tansu broker) and the five workers, in-process, per
test session; or an external PostgreSQL and Kafka when SAGA_DATABASE_URL and SAGA_KAFKA_BOOTSTRAP
are set (then topics get a random prefix so runs do not collide)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.dev.embedded import EmbeddedStack, settings_for
from orchestrator.ops.checker import check
from orchestrator.postgres.store import create_engine, migrate
from orchestrator.settings import Settings
from orchestrator.workers.runner import prepare, run_worker, workers_ready
from schemas import TOPIC_DEAD_LETTERS, TOPIC_TRANSFER_COMMANDS
from steps import APPLICATION

pytestmark = pytest.mark.integration
DENIED = "it-sanctioned-party"


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Settings]:
    external = Settings()
    prefix = f"it-{uuid.uuid4().hex[:8]}."
    if not external.embedded:
        yield external.model_copy(update={"topic_prefix": prefix,
                                          "risk_denied_accounts": [DENIED]})
        return
    with EmbeddedStack() as stack:
        # No trimming here: tests read topics from their start to count what was published, and
        # the recovery worker's trim (every 30 s) would delete what the groups committed under
        # them. Trimming has its own test (test_log_rewinds.py).
        yield settings_for(stack, Settings(topic_prefix=prefix, risk_denied_accounts=[DENIED],
                                           kafka_trim_committed=False))


@pytest.fixture(scope="session")
async def engine(stack_settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = await prepare(stack_settings, APPLICATION)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def workers(stack_settings: Settings, engine: AsyncEngine) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_worker(kind, stack_settings.model_copy(
        update={"worker_name": f"it-{kind}"}), stop), name=kind)
        for kind in APPLICATION.worker_kinds]
    await workers_started(engine, tasks, {f"it-{kind}" for kind in APPLICATION.worker_kinds})
    yield
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)


class DeadLetterTap:
    """Reads the real dead-letter topic in the background, so tests can see what landed there."""

    def __init__(self, settings: Settings) -> None:
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap, "group.id": f"tap-{uuid.uuid4()}",
            "auto.offset.reset": "earliest", "fetch.wait.max.ms": 5,
            "enable.auto.commit": False})
        # Assigned, not subscribed: a reader of every partition needs no group (and no join).
        topic = settings.topic(TOPIC_DEAD_LETTERS)
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.1)
            if message is None or message.error():
                continue
            headers = {k: (v or b"").decode(errors="replace") for k, v in message.headers() or []}
            self.records.append({"value": message.value(), "headers": headers})
        self._consumer.close()

    def find(self, value: bytes) -> dict[str, Any] | None:
        return next((r for r in self.records if r["value"] == value), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="session")
def dlq_tap(stack_settings: Settings) -> Iterator[DeadLetterTap]:
    tap = DeadLetterTap(stack_settings)
    yield tap
    tap.close()


class Harness:
    """What a test needs: publish requests, open accounts, wait, read balances, check."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap,
                                  "linger.ms": 0, "enable.idempotence": True})
        self.run_id = uuid.uuid4().hex[:8]

    def account(self, name: str) -> str:
        return f"it-{self.run_id}-{name}"

    async def open(self, name: str, balance: str, currency: str = "EUR",
                   daily_limit: str | None = None, closed: bool = False) -> str:
        from steps.ledger import open_account

        account_id = self.account(name)
        async with self.engine.begin() as conn:
            await open_account(conn, account_id, currency, Decimal(balance),
                               Decimal(daily_limit) if daily_limit else None, closed)
        return account_id

    def request(self, source: str, destination: str, amount: str, currency: str = "EUR",
                **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "transfer_id": str(uuid.uuid4()), "source_account": source,
            "destination_account": destination, "amount": amount, "currency": currency,
            "reference": "integration test", "requested_by": "pytest"}
        body.update(overrides)
        return body

    def publish(self, value: bytes | dict[str, Any], key: str | None = None) -> bytes:
        raw = json.dumps(value).encode() if isinstance(value, dict) else value
        if key is None and isinstance(value, dict):
            key = str(value.get("transfer_id"))
        self.producer.produce(self.settings.topic(TOPIC_TRANSFER_COMMANDS), value=raw,
                              key=key.encode() if key else None)
        assert self.producer.flush(10) == 0
        return raw

    async def saga(self, transfer_id: str) -> Any:
        """The transfer's saga: of type "transfer", with the transfer id as its business key."""
        async with self.engine.connect() as conn:
            return (await conn.execute(text(
                "SELECT saga_id, status, version, definition_version, state FROM sagas"
                " WHERE saga_type = 'transfer' AND business_key = :t"),
                {"t": str(uuid.UUID(transfer_id))})).one_or_none()

    async def wait_terminal(self, transfer_id: str, timeout_s: float = 30) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            row = await self.saga(transfer_id)
            if row is not None and row.status in ("COMPLETED", "COMPENSATED", "REJECTED",
                                                   "FAILED"):
                return row
            await asyncio.sleep(0.02)
        raise AssertionError(f"transfer {transfer_id} not terminal after {timeout_s}s: {row}")

    async def wait_dead_letter(self, payload: bytes, timeout_s: float = 30) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            async with self.engine.connect() as conn:
                row = (await conn.execute(text(
                    "SELECT * FROM dead_letters WHERE payload = :p"), {"p": payload})).first()
            if row is not None:
                return row
            await asyncio.sleep(0.02)
        raise AssertionError(f"no dead letter for {payload[:80]!r} after {timeout_s}s")

    async def balances(self, *account_ids: str) -> dict[str, tuple[Decimal, Decimal]]:
        from steps.ledger import balances

        async with self.engine.connect() as conn:
            views = await balances(conn, list(account_ids))
        return {a: (v.balance, v.held) for a, v in views.items()}

    async def events(self, saga_id: Any) -> list[Any]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(text(
                "SELECT seq, type, step, payload FROM saga_events WHERE saga_id = :s"
                " ORDER BY seq"), {"s": saga_id})).all())

    async def entries(self, saga_id: Any) -> list[Any]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(text(
                "SELECT step, direction, amount, debit_account, credit_account, hold_account,"
                " hold_delta FROM ledger_entries WHERE saga_id = :s ORDER BY entry_id"),
                {"s": saga_id})).all())

    async def assert_invariants(self) -> None:
        report = await check(self.engine, APPLICATION)
        assert report.ok, "\n".join(f"{c.invariant} {c.name}: {c.detail}"
                                    for c in report.failures())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.producer.flush(5)


@pytest.fixture
async def harness(stack_settings: Settings, engine: AsyncEngine, workers: None
                  ) -> AsyncIterator[Harness]:
    h = Harness(stack_settings, engine)
    yield h
    h.close()


# Databases of their own on the stack's PostgreSQL server.

async def admin(engine: AsyncEngine, statement: str) -> None:
    """A statement outside any transaction (CREATE and DROP DATABASE cannot run in one)."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(statement))


def database_url(settings: Settings, database: str) -> str:
    """`settings`' database URL, naming `database` instead."""
    assert settings.database_url
    return make_url(settings.database_url).set(database=database).render_as_string(
        hide_password=False)


@contextlib.asynccontextmanager
async def database_of_its_own(engine: AsyncEngine, settings: Settings, prefix: str
                              ) -> AsyncIterator[str]:
    """A new, empty database named `prefix` and a random suffix: yields its URL, and drops it
    afterwards (ending the sessions still on it)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await admin(engine, f'CREATE DATABASE "{name}"')
    try:
        yield database_url(settings, name)
    finally:
        await admin(engine, f'DROP DATABASE "{name}" WITH (FORCE)')


async def workers_started(engine: AsyncEngine, tasks: list[asyncio.Task[None]],
                          names: set[str], timeout_s: float = 60) -> None:
    """Wait until the in-process workers `names` (running as `tasks`) have their partitions;
    a worker that ended meanwhile raises its startup error. Their workers table may not exist
    yet (the workers apply the migrations as they start)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for task in tasks:
            if task.done():
                task.result()  # raises the worker's startup error
        try:
            if await workers_ready(engine, names):
                return
        except Exception:  # the workers table does not exist before the migrations
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, (
            f"workers {sorted(names)} did not get their partitions in {timeout_s:g} s")
        await asyncio.sleep(0.1)


# A database of its own, for what must see every dead letter there is.

@dataclass(frozen=True)
class Isolated:
    engine: AsyncEngine
    harness: Harness  # its settings point at the isolated database, for `saga_cli`


@pytest.fixture
async def isolated(stack_settings: Settings, engine: AsyncEngine) -> AsyncIterator[Isolated]:
    name = f"dlq_it_{uuid.uuid4().hex[:12]}"
    try:
        await admin(engine, f'CREATE DATABASE "{name}"')
    except DBAPIError as error:
        pytest.skip(f"cannot create a database of its own on this server: {error}")
    url = database_url(stack_settings, name)
    own = create_engine(url, pool_size=2)
    harness = Harness(stack_settings.model_copy(update={"database_url": url}), own)
    try:
        await migrate(own, APPLICATION.migrations)
        yield Isolated(own, harness)
    finally:
        harness.close()
        await own.dispose()
        await admin(engine, f'DROP DATABASE "{name}" WITH (FORCE)')
