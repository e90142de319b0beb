"""Partition ownership by PostgreSQL leases, instead of Kafka consumer-group membership.

Why (ADR 0004): when a consumer dies, a consumer group hands its partitions on only after the
session timeout plus a rejoin; on the embedded broker that is ~11 s, and static membership
(`group.instance.id`) still waits out the session timeout (measured 6.1 s). A worker that is
killed and restarted must pick its partitions up again in well under 2 s.

So each worker assigns itself partitions (`assign()`, no group protocol; offsets are still
committed to Kafka under the group id) and owns each one through a session-level advisory lock
on one dedicated PostgreSQL connection:

- a killed worker's connection closes with it, PostgreSQL drops its locks at once, and the
  restarted worker (or a survivor) takes the partitions on its next lease pass;
- a frozen worker (SIGSTOP, a long GC pause) stops heartbeating; its connection is ended by
  `idle_session_timeout` after `lease_timeout_s`, which frees its partitions for the others;
  when it wakes, its heartbeat fails and it drops every partition before it goes on. Anything
  it still writes is fenced by the event store's `(saga_id, seq)` key, the inbox and the
  participants' stored replies: late writes are refused, not applied twice;
- several instances of one worker share the partitions: each also holds a shared "member" lock,
  and takes at most ceil(partitions / members), so a new instance gets its share as the others
  release theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from orchestrator.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Partition:
    topic: str
    partition: int


def _key(text: str) -> int:
    """A non-negative int4 lock key (pg_locks shows keys as unsigned oids)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def plain_dsn(url: str) -> str:
    """asyncpg's DSN from the SQLAlchemy URL the settings hold."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# Called with (acquired, released) whenever ownership changes; runs the consumer's assign calls.
OnChange = Callable[[Sequence[Partition], Sequence[Partition]], Awaitable[None]]


@dataclass
class PartitionLeases:
    settings: Settings
    group: str
    partitions: Sequence[Partition]
    on_change: OnChange
    owned: frozenset[Partition] = frozenset()
    member_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _conn: Any = None
    _task: asyncio.Task[None] | None = None
    _first_pass: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def group_key(self) -> int:
        return _key(f"group:{self.group}")

    def partition_key(self, partition: Partition) -> int:
        # 0 is the member lock; partition keys avoid it.
        return _key(f"{partition.topic}:{partition.partition}") or 1

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"leases:{self.group}")

    async def wait_first_pass(self, timeout_s: float = 30.0) -> None:
        await asyncio.wait_for(self._first_pass.wait(), timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drop_all()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def _run(self) -> None:
        backoff = self.settings.lease_heartbeat_s
        while True:
            try:
                await self._pass()
                backoff = self.settings.lease_heartbeat_s
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if self.owned:
                    log.warning("lost the partition leases of %s (%s); dropping %d partitions",
                                self.group, error, len(self.owned))
                await self._drop_all()
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.terminate()
                    self._conn = None
                backoff = min(backoff * 2, 2.0)
            self._first_pass.set()
            await asyncio.sleep(backoff)

    async def _connect(self) -> Any:
        assert self.settings.database_url
        conn = await asyncpg.connect(plain_dsn(self.settings.database_url), timeout=5)
        # The heartbeat keeps this session busy; a frozen owner's session ends after this long,
        # and its locks with it.
        timeout_ms = int(self.settings.lease_timeout_s * 1000)
        await conn.execute(f"SET idle_session_timeout = {timeout_ms}")
        await conn.execute(f"SET application_name = 'saga-leases {self.group}'")
        await conn.fetchval("SELECT pg_advisory_lock_shared($1, 0)", self.group_key)
        return conn

    async def _pass(self) -> None:
        """One heartbeat: prove the session is alive, then take or give partitions so this
        member owns its fair share."""
        if self._conn is None:
            self._conn = await self._connect()
        conn = self._conn
        # Advisory locks belong to a database: members of the same group in another database
        # on this server (another deployment) are not ours to share partitions with.
        members = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid = $1::bigint::oid AND objid = 0 AND objsubid = 2", self.group_key)
        share = math.ceil(len(self.partitions) / max(1, members))
        owned = set(self.owned)
        acquired: list[Partition] = []
        released: list[Partition] = []
        if len(owned) > share:
            released = sorted(owned)[share:]
            # Stop consuming first, then unlock: a partition is never consumed without a lease.
            self.owned = frozenset(owned - set(released))
            await self.on_change([], released)
            for partition in released:
                await conn.fetchval("SELECT pg_advisory_unlock($1, $2)", self.group_key,
                                    self.partition_key(partition))
        elif len(owned) < share:
            # Start from a member-specific place, so members do not all race for partition 0.
            start = _key(self.member_id) % max(1, len(self.partitions))
            ordered = [*self.partitions[start:], *self.partitions[:start]]
            for partition in ordered:
                if len(owned) >= share:
                    break
                if partition in owned:
                    continue
                if await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", self.group_key,
                                       self.partition_key(partition)):
                    owned.add(partition)
                    acquired.append(partition)
            if acquired:
                self.owned = frozenset(owned)
                await self.on_change(acquired, [])
        else:
            await conn.fetchval("SELECT 1")
        if acquired or released:
            log.info("%s owns %d of %d partitions (%d members)", self.group, len(self.owned),
                     len(self.partitions), members)

    async def _drop_all(self) -> None:
        if not self.owned:
            return
        dropped = sorted(self.owned)
        self.owned = frozenset()
        with contextlib.suppress(Exception):
            await self.on_change([], dropped)
