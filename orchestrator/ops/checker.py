"""The invariant checker: proves from the data alone that money and history are right.

Every check below is one a broken database trips (tests/integration/test_invariants_trip.py
breaks each one and runs `saga check`): a check that cannot fail proves nothing.

    I1 money conserved: Σ balances of all accounts (customers and clearing) equals Σ opening
       balances, per currency; every terminal saga's net effect is all-or-nothing (a completed
       transfer moved exactly its amount from source to destination; a compensated or rejected
       one moved nothing); with nothing in flight, clearing accounts and holds are back to zero.
    I2 no double effect: at most one entry per (saga, step, direction); a compensation entry only
       where its forward entry exists.
    I3 termination: every saga in flight is due at some time (its command's deadline or its
       retry's start), so the recovery worker will look at it; no saga in flight at all (only a
       violation when `expect_quiescent`).
    I4 the event log is gapless per saga (seq 1..n), protected by its append-only triggers; every
       event log has its projection row and every projection row its events; folding each saga's
       events reproduces its projection, both the cached state and the columns that queries and
       recovery read (status, step, direction, attempt, version, deadline, due time, ...).
    I5 every message the orchestrator consumed is accounted for: its inbox verdict is backed by
       what it recorded (a message that started or moved a saga caused its events, a duplicate
       or a stale reply names a saga that exists, a refused one has its dead letter); every
       start request it consumed (any saga type's start topic) led to a saga or a dead letter;
       every dead letter carries a known reason code and a reason; every redriven dead letter
       was republished exactly once, and, once published, consumed (the orchestrator's topics:
       the copy's inbox row exists).
    I6 no outbox row left unpublished (older than `outbox_grace_s`). A row the broker refused
       for good and the relay set aside is accounted for, not left: it is reported as a
       *finding* (listed, for an operator) instead of a violation.
    I7 no customer balance or available balance below zero; every entry belongs to a known saga;
       the view the ledger decides against (each customer account's latest entry's running
       totals, ADR 0008) equals the sums over its whole history, and each entry's totals are
       its predecessor's plus its own movement: a wrong running total is how the ledger would
       overdraw an account or refuse a good transfer while I1's sums still add up, and a balance
       changed without an entry (an opening balance edited) shows as totals that no longer
       equal the sums.
    I8 (`check_topic`, from the broker's side) every request on a saga type's start topic led to
       a saga or a dead letter: nothing the broker acknowledged was skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator.application import Application
from orchestrator.consuming.handling import REDRIVE_HEADER, message_id_of
from orchestrator.core.intake import Unparseable, classify
from orchestrator.core.saga import SagaState, fold
from orchestrator.core.saga_type import SagaType
from orchestrator.errors import BusError, ConfigurationError
from orchestrator.kafka.consumer import Consumed
from orchestrator.postgres.store import parse_event, set_aside_outbox
from orchestrator.workers.recovery import RECOVERY_STAGE
from orchestrator.workers.saga_worker import CONSUMER
from schemas import TOPIC_REPLIES, RejectionCode


@dataclass(frozen=True)
class Check:
    invariant: str
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Finding:
    """Something an operator should look at that breaks no invariant (the data accounts for
    it), such as outbox rows set aside after the broker refused them."""

    invariant: str
    name: str
    count: int
    items: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def money_conserved(self) -> bool:
        return all(check.ok for check in self.checks if check.invariant == "I1")

    @property
    def duplicate_effects(self) -> int:
        return self.counts.get("duplicate_effects", 0)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "money_conserved": self.money_conserved,
                "duplicate_effects": self.duplicate_effects, "counts": self.counts,
                "checks": [asdict(check) for check in self.checks],
                "findings": [asdict(finding) for finding in self.findings]}


async def _rows(conn: AsyncConnection, sql: str, **params: Any) -> list[Any]:
    return list((await conn.execute(text(sql), params)).all())


def _plain(value: Any) -> str:
    """One value of a detail as a person reads it: a time in ISO 8601 (UTC), an id or an
    amount as written, never a Python repr such as `datetime.datetime(2026, ...)`."""
    if isinstance(value, datetime):
        return (value.astimezone(UTC) if value.tzinfo else value).isoformat()
    if value is None:
        return "NULL"
    if isinstance(value, tuple | list):  # a nested row (a view's columns beside the truth)
        return "(" + ", ".join(_plain(item) for item in value) + ")"
    return str(value)


def _sample(rows: list[Any], limit: int = 5) -> str:
    return "; ".join("(" + ", ".join(_plain(value) for value in row) + ")"
                     for row in rows[:limit]) + (
        f" (+{len(rows) - limit} more)" if len(rows) > limit else "")


# Net movement of each saga per account, from the entries, beside what its status promises.
_SAGA_NETS = """
WITH moves AS (
    SELECT saga_id, credit_account AS account, amount AS delta, 0::numeric AS hold
      FROM ledger_entries WHERE credit_account IS NOT NULL
    UNION ALL
    SELECT saga_id, debit_account, -amount, 0 FROM ledger_entries WHERE debit_account IS NOT NULL
    UNION ALL
    SELECT saga_id, hold_account, 0, hold_delta FROM ledger_entries WHERE hold_account IS NOT NULL
), nets AS (
    SELECT saga_id, account, sum(delta) AS delta, sum(hold) AS hold FROM moves
    GROUP BY saga_id, account
)
SELECT s.saga_id, s.status, n.account, n.delta, n.hold,
       (s.state->'input'->>'amount')::numeric AS amount,
       s.state->'input'->>'source_account' AS source,
       s.state->'input'->>'destination_account' AS destination
FROM nets n JOIN sagas s USING (saga_id)
WHERE s.status IN ('COMPLETED', 'COMPENSATED', 'REJECTED')
  AND NOT (
        (n.hold = 0 AND n.delta = 0)
     OR (s.status = 'COMPLETED' AND n.hold = 0 AND (
            (n.account = s.state->'input'->>'source_account'
                AND n.delta = -(s.state->'input'->>'amount')::numeric)
         OR (n.account = s.state->'input'->>'destination_account'
                AND n.delta = (s.state->'input'->>'amount')::numeric)))
  )
"""


# A dead letter's message id, computed in SQL from what the row keeps (the original bytes and
# headers) exactly as `orchestrator.consuming.message_id_of` computes it from the record: sha256 of
# the value, plus the first redrive header's value when there is a non-empty one. Written out
# here rather than stored, so that a dead letter is tied to its inbox row by its content, never
# by broker coordinates (a memory broker that restarts hands out the same offsets again).
_LETTER_MESSAGE_ID = """
'sha256:' || encode(sha256(d.payload || coalesce(
    '\\x00'::bytea || convert_to('redrive:', 'UTF8') || (
        SELECT nullif(decode(h.value->>1, 'base64'), ''::bytea)
        FROM jsonb_array_elements(d.headers) WITH ORDINALITY AS h(value, n)
        WHERE h.value->>0 = :redrive_header ORDER BY h.n LIMIT 1),
    ''::bytea)), 'hex')
"""

# Whether the topic `{column}` is one of the start topics `:commands` (any topic prefix: the
# name ends with the topic's).
_ON_START_TOPIC = """EXISTS (SELECT 1 FROM unnest(CAST(:commands AS text[])) AS c(name)
                    WHERE right({column}, length(c.name)) = c.name)"""

# The dead letters of the start topics by message id, each hashed once (MATERIALIZED: joined by
# hash, not recomputed per inbox row).
_COMMAND_LETTERS = f"""
letters AS MATERIALIZED (
    SELECT d.original_topic AS topic, {_LETTER_MESSAGE_ID} AS message_id FROM dead_letters d
    WHERE {_ON_START_TOPIC.format(column="d.original_topic")})
"""

# The orchestrator's inbox rows for the commands topic that led neither to a saga nor to a
# dead letter of the same message. Every path of the orchestrator writes the inbox row in the
# transaction that writes the saga's events or the dead letter, so one of the two must exist
# whatever the verdict.
_REQUESTS_WITHOUT_OUTCOME = f"""
WITH {_COMMAND_LETTERS}
SELECT i.message_id, i.topic, i.partition, i."offset", i.verdict, i.saga_id
FROM inbox i
WHERE i.consumer = :consumer AND {_ON_START_TOPIC.format(column="i.topic")}
  AND NOT EXISTS (SELECT 1 FROM sagas s WHERE s.saga_id = i.saga_id)
  AND NOT EXISTS (SELECT 1 FROM letters l
                  WHERE l.topic = i.topic AND l.message_id = i.message_id)
ORDER BY i.received_at
"""

# What each verdict the orchestrator records must have left behind, in the transaction that
# wrote the inbox row (`OrchestratorWorker._apply`, and `_set_aside` for a poison record):
#   started, applied        the saga's events, each with this message as its causation id;
#   duplicate, stale        the saga the message was judged against;
#   rejected, conflict,     a dead letter of this very message: an intake record's (or an
#   unknown_saga,           unparseable reply's, or a poison record's) found by its content
#   dead_lettered           hash, a parsed reply's by its coordinates and saga;
#   anything else           nothing explains it: not a verdict the orchestrator gives.
_CAUSED_EVENTS = ("started", "applied")
_NAMED_SAGA = ("duplicate", "stale")
_DEAD_LETTERED = ("rejected", "conflict", "unknown_saga", "dead_lettered")
_UNBACKED_VERDICTS = f"""
WITH letters AS MATERIALIZED (
    SELECT d.original_topic AS topic, {_LETTER_MESSAGE_ID} AS message_id FROM dead_letters d
    WHERE d.stage <> :recovery_stage),
reply_letters AS MATERIALIZED (
    SELECT d.original_topic AS topic, d.original_partition AS partition,
           d.original_offset AS "offset", d.saga_id FROM dead_letters d
    WHERE d.stage <> :recovery_stage AND d.original_partition IS NOT NULL
      AND d.original_offset IS NOT NULL AND d.saga_id IS NOT NULL)
SELECT i.message_id, i.topic, i.partition, i."offset", i.verdict, i.saga_id
FROM inbox i
WHERE i.consumer = :consumer AND (
       (i.verdict = ANY(:caused_events) AND NOT EXISTS (
            SELECT 1 FROM saga_events e
            WHERE e.saga_id = i.saga_id AND e.causation_id = i.message_id))
    OR (i.verdict = ANY(:named_saga) AND NOT EXISTS (
            SELECT 1 FROM sagas s WHERE s.saga_id = i.saga_id))
    OR (i.verdict = ANY(:dead_lettered)
        AND (i.topic, i.message_id) NOT IN (SELECT topic, message_id FROM letters)
        AND NOT (i.message_id LIKE 'reply:%' AND i.partition IS NOT NULL
                 AND i."offset" IS NOT NULL AND i.saga_id IS NOT NULL
                 AND (i.topic, i.partition, i."offset", i.saga_id) IN (
                     SELECT topic, partition, "offset", saga_id FROM reply_letters)))
    OR NOT (i.verdict = ANY(:caused_events) OR i.verdict = ANY(:named_saga)
            OR i.verdict = ANY(:dead_lettered)))
ORDER BY i.received_at
"""

# Dead letters without a reason an operator can act on: a code outside `RejectionCode` (which
# `saga dlq list --reason` and the runbook's table are keyed by) or an empty reason.
_LETTERS_WITHOUT_REASON = """
SELECT dead_letter_id, stage, reason_code, reason FROM dead_letters
WHERE NOT (reason_code = ANY(:codes)) OR btrim(reason) = ''
ORDER BY last_failed_at
"""

# Redriven dead letters not accounted for. A redrive (`orchestrator.ops.dlq.redrive`) marks the
# letter and writes, in the same transaction, exactly one outbox row to its original topic that
# carries `saga-redrive-id: <dead_letter_id>`; so a redriven letter with no such row was never
# republished, and one with two was republished twice. Once that row has been published for
# longer than the grace, a copy sent to the orchestrator's topics has been consumed: its inbox
# row is there, under the id the worker gives a redriven copy (`message_id_of`: the content
# hash with the redrive id; a parsed reply's: `reply:<reply_id>:redrive:<id>`). The copies are
# found in one pass over the outbox's headers (values stored base64), compared as bytes.
_REDRIVES_UNACCOUNTED = """
WITH copies AS MATERIALIZED (
    SELECT o.topic, decode(h.value->>1, 'base64') AS redrive_id, o.published_at
    FROM outbox o CROSS JOIN LATERAL jsonb_array_elements(o.headers) AS h(value)
    WHERE h.value->>0 = :redrive_header),
redriven AS (
    SELECT d.dead_letter_id, d.original_topic, d.payload, d.redriven_at,
           count(c.topic) AS copies,
           coalesce(bool_or(c.published_at < now() - make_interval(secs => :grace)), false)
             AS published,
           EXISTS (SELECT 1 FROM unnest(CAST(:commands AS text[])) AS t(name)
                   WHERE right(d.original_topic, length(t.name)) = t.name) AS to_commands,
           right(d.original_topic, length(:replies)) = :replies AS to_replies
    FROM dead_letters d
    LEFT JOIN copies c ON c.topic = d.original_topic
                      AND c.redrive_id = convert_to(d.dead_letter_id::text, 'UTF8')
    WHERE d.redriven_at IS NOT NULL
    GROUP BY d.dead_letter_id)
SELECT r.dead_letter_id, r.original_topic, r.redriven_at, r.copies,
       CASE WHEN r.copies <> 1 THEN 'republished ' || r.copies || ' times'
            ELSE 'published, never consumed' END AS problem
FROM redriven r
WHERE r.copies <> 1 OR (
      r.published AND (r.to_commands OR r.to_replies)
  AND NOT EXISTS (
        SELECT 1 FROM inbox i WHERE i.consumer = :consumer AND i.message_id = 'sha256:' || encode(
            sha256(r.payload || '\\x00'::bytea
                   || convert_to('redrive:' || r.dead_letter_id::text, 'UTF8')), 'hex'))
  AND NOT (r.to_replies AND EXISTS (
        SELECT 1 FROM inbox i WHERE i.consumer = :consumer
          AND i.message_id LIKE 'reply:%:redrive:' || r.dead_letter_id::text)))
ORDER BY r.redriven_at
"""


# Entries whose running totals are not their predecessor's (fence_seq - 1 of the same account)
# plus their own movement, or that were recorded before it. With the latest entry equal to the
# sums (checked apart), this proves every total of the chain right, back to its first entry
# with totals, and it proves the order by recorded_at that the daily limit relies on.
_BROKEN_CHAIN_LINKS = """
SELECT e.fence_account, e.fence_seq, e.fence_balance, e.fence_held, e.fence_settled_total
FROM ledger_entries e
JOIN ledger_entries p ON p.fence_account = e.fence_account AND p.fence_seq = e.fence_seq - 1
WHERE e.fence_balance IS NOT NULL AND p.fence_balance IS NOT NULL AND (
       e.fence_balance IS DISTINCT FROM p.fence_balance
         + CASE WHEN e.credit_account = e.fence_account THEN e.amount ELSE 0 END
         - CASE WHEN e.debit_account = e.fence_account THEN e.amount ELSE 0 END
    OR e.fence_held IS DISTINCT FROM p.fence_held
         + CASE WHEN e.hold_account = e.fence_account THEN e.hold_delta ELSE 0 END
    OR e.fence_settled_total IS DISTINCT FROM p.fence_settled_total
         + CASE WHEN e.step = 'settle' AND e.debit_account = e.fence_account
                THEN e.amount ELSE 0 END
    OR e.recorded_at < p.recorded_at)
ORDER BY e.fence_account, e.fence_seq
"""


async def check(engine: AsyncEngine, application: Application, expect_quiescent: bool = False,
                outbox_grace_s: float = 5.0) -> Report:
    if application.ledger is None:
        raise ConfigurationError(
            f"application {application.name!r} declares no ledger views for I1, I2 and I7")
    account_view_sql = application.ledger.account_view_sql
    customer_view_sql = application.ledger.customer_view_sql
    start_topics = [saga_type.start_topic for saga_type in application.sagas]
    report = Report()
    add = report.checks.append
    async with engine.connect() as conn:
        # One snapshot for every query, so a check never compares two moments.
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        in_flight = (await conn.execute(text(
            "SELECT count(*) FROM sagas WHERE status IN ('RUNNING', 'COMPENSATING')"))).scalar_one()
        status_rows = await _rows(conn, "SELECT status, count(*) FROM sagas GROUP BY status")
        report.counts.update({f"sagas_{s.lower()}": n for s, n in status_rows})
        report.counts["sagas_in_flight"] = in_flight

        # I1
        now = datetime.now(UTC)
        accounts = await _rows(conn, account_view_sql, now=now)
        by_currency: dict[str, list[Any]] = {}
        for row in accounts:
            by_currency.setdefault(row.currency.strip(), []).append(row)
        unbalanced = [
            (currency, sum(r.opening_balance for r in rows), sum(r.balance for r in rows))
            for currency, rows in sorted(by_currency.items())
            if sum(r.opening_balance for r in rows) != sum(r.balance for r in rows)
        ]
        add(Check("I1", "sum of balances equals sum of opening balances", not unbalanced,
                  _sample(unbalanced)))
        wrong_nets = await _rows(conn, _SAGA_NETS)
        add(Check("I1", "each terminal saga moved all of its amount or nothing", not wrong_nets,
                  _sample(wrong_nets)))
        if in_flight == 0:
            leftovers = [(r.account_id, r.balance, r.held) for r in accounts
                         if (r.kind == "clearing" and r.balance != 0) or r.held != 0]
            add(Check("I1", "with nothing in flight, clearing and holds are zero",
                      not leftovers, _sample(leftovers)))

        # I2
        doubled = await _rows(conn, (
            "SELECT saga_id, step, direction, count(*) FROM ledger_entries"
            " GROUP BY saga_id, step, direction HAVING count(*) > 1"))
        orphans = await _rows(conn, (
            "SELECT c.saga_id, c.step FROM ledger_entries c WHERE c.direction = 'compensate'"
            " AND NOT EXISTS (SELECT 1 FROM ledger_entries f WHERE f.saga_id = c.saga_id"
            " AND f.step = c.step AND f.direction = 'forward')"))
        report.counts["duplicate_effects"] = len(doubled) + len(orphans)
        add(Check("I2", "at most one entry per (saga, step, direction)", not doubled,
                  _sample(doubled)))
        add(Check("I2", "compensation entries only where the forward entry exists", not orphans,
                  _sample(orphans)))

        # I3
        # A saga in flight always waits on a command (its deadline) or on a retry's backoff
        # (its start): that time is what the recovery worker scans for. One without it is
        # never looked at again, so it never ends, whether or not anything is quiescent.
        undue = await _rows(conn, (
            "SELECT saga_id, status, current_step, direction, updated_at FROM sagas"
            " WHERE status IN ('RUNNING', 'COMPENSATING') AND due_at IS NULL"
            " ORDER BY updated_at"))
        add(Check("I3", "every saga in flight is due at some time (recovery will look at it)",
                  not undue, _sample(undue)))
        if expect_quiescent:
            stuck = await _rows(conn, (
                "SELECT saga_id, status, current_step, updated_at FROM sagas"
                " WHERE status IN ('RUNNING', 'COMPENSATING') ORDER BY updated_at"))
            add(Check("I3", "every saga is terminal", not stuck, _sample(stuck)))

        # I4
        gaps = await _rows(conn, (
            "SELECT saga_id, min(seq), max(seq), count(*) FROM saga_events GROUP BY saga_id"
            " HAVING min(seq) <> 1 OR max(seq) <> count(*)"))
        add(Check("I4", "event log gapless per saga (seq 1..n)", not gaps, _sample(gaps)))
        triggers = set((await conn.execute(text(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'saga_events'::regclass"
            " AND tgenabled <> 'D'"))).scalars())
        wanted = {"saga_events_append_only", "saga_events_no_truncate"}
        add(Check("I4", "append-only triggers enabled on saga_events", wanted <= triggers,
                  f"missing: {sorted(wanted - triggers)}" if not wanted <= triggers else ""))
        unpaired = await _rows(conn, (
            "SELECT e.saga_id, 'events without a projection row' FROM"
            " (SELECT DISTINCT saga_id FROM saga_events) e"
            " WHERE NOT EXISTS (SELECT 1 FROM sagas s WHERE s.saga_id = e.saga_id)"
            " UNION ALL"
            " SELECT s.saga_id, 'a projection row without events' FROM sagas s"
            " WHERE NOT EXISTS (SELECT 1 FROM saga_events e WHERE e.saga_id = s.saga_id)"))
        add(Check("I4", "every event log has its projection row and every projection row its"
                        " events", not unpaired, _sample(unpaired)))
        mismatched = await replay_mismatches(conn)
        add(Check("I4", "replaying events reproduces every saga's projection", not mismatched,
                  "; ".join(mismatched[:5])
                  + (f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else "")))
        version_drift = await _rows(conn, (
            "SELECT s.saga_id, s.version, e.n FROM sagas s JOIN (SELECT saga_id, count(*) AS n"
            " FROM saga_events GROUP BY saga_id) e USING (saga_id) WHERE s.version <> e.n"))
        add(Check("I4", "projection version equals event count", not version_drift,
                  _sample(version_drift)))

        # I5
        verdicts = await _rows(conn, "SELECT verdict, count(*) FROM inbox GROUP BY verdict")
        report.counts.update({f"inbox_{v}": n for v, n in verdicts})
        report.counts["dead_letters"] = (await conn.execute(
            text("SELECT count(*) FROM dead_letters"))).scalar_one()
        unbacked = await _rows(conn, _UNBACKED_VERDICTS, consumer=CONSUMER,
                               caused_events=list(_CAUSED_EVENTS), named_saga=list(_NAMED_SAGA),
                               dead_lettered=list(_DEAD_LETTERED),
                               recovery_stage=RECOVERY_STAGE, redrive_header=REDRIVE_HEADER)
        report.counts["messages_unaccounted"] = len(unbacked)
        add(Check("I5", "every consumed message's verdict is backed by what it recorded (its"
                        " events, its saga, or its dead letter)", not unbacked,
                  _sample(unbacked)))
        report.counts["requests_consumed"] = (await conn.execute(text(
            "SELECT count(*) FROM inbox WHERE consumer = :consumer"
            f" AND {_ON_START_TOPIC.format(column='topic')}"),
            {"consumer": CONSUMER, "commands": start_topics})).scalar_one()
        lost = await _rows(conn, _REQUESTS_WITHOUT_OUTCOME, consumer=CONSUMER,
                           commands=start_topics, redrive_header=REDRIVE_HEADER)
        report.counts["requests_without_outcome"] = len(lost)
        add(Check("I5", "every consumed request led to a saga or a dead letter", not lost,
                  _sample(lost)))
        reasonless = await _rows(conn, _LETTERS_WITHOUT_REASON,
                                 codes=[code.value for code in RejectionCode])
        add(Check("I5", "every dead letter carries a known reason code and a reason",
                  not reasonless, _sample(reasonless)))
        redrives = await _rows(conn, _REDRIVES_UNACCOUNTED, consumer=CONSUMER,
                               redrive_header=REDRIVE_HEADER,
                               grace=0.0 if expect_quiescent else outbox_grace_s,
                               commands=start_topics, replies=TOPIC_REPLIES)
        report.counts["dead_letters_redriven"] = (await conn.execute(text(
            "SELECT count(*) FROM dead_letters WHERE redriven_at IS NOT NULL"))).scalar_one()
        add(Check("I5", "every redriven dead letter was republished once and, once published,"
                        " consumed", not redrives, _sample(redrives)))

        # I6
        unpublished = await _rows(conn, (
            # now(): the snapshot's own time; the replay above can take seconds on a big log,
            # and rows published since then are still unpublished in this snapshot.
            "SELECT id, topic, created_at FROM outbox WHERE published_at IS NULL"
            " AND set_aside_at IS NULL"
            " AND created_at < now() - make_interval(secs => :grace)"),
            grace=0.0 if expect_quiescent else outbox_grace_s)
        report.counts["outbox_unpublished"] = len(unpublished)
        add(Check("I6", "no outbox row left unpublished", not unpublished, _sample(unpublished)))
        set_aside_count = (await conn.execute(text(
            "SELECT count(*) FROM outbox WHERE set_aside_at IS NOT NULL"
            " AND published_at IS NULL"))).scalar_one()
        report.counts["outbox_set_aside"] = set_aside_count
        if set_aside_count:
            report.findings.append(Finding(
                "I6", "outbox rows set aside unpublished after the broker refused them",
                set_aside_count, await set_aside_outbox(conn, limit=100)))

        # I7
        negative = [(r.account_id, r.balance, r.held) for r in accounts
                    if r.kind == "customer" and (r.balance < 0 or r.balance - r.held < 0)]
        add(Check("I7", "no customer balance or available balance below zero", not negative,
                  _sample(negative)))
        untied = await _rows(conn, (
            "SELECT e.entry_id, e.saga_id FROM ledger_entries e"
            " WHERE NOT EXISTS (SELECT 1 FROM sagas s WHERE s.saga_id = e.saga_id)"))
        add(Check("I7", "every ledger entry is tied to a known saga", not untied,
                  _sample(untied)))
        truth = {r.account_id: r for r in accounts if r.kind == "customer"}
        fields = ("balance", "held", "settled_today", "settled_total", "fence_seq")
        drifted = [
            (view.account_id, *((f, getattr(view, f), getattr(truth[view.account_id], f))
                                for f in fields
                                if getattr(view, f) != getattr(truth[view.account_id], f)))
            for view in await _rows(conn, customer_view_sql, now=now)
            if any(getattr(view, f) != getattr(truth[view.account_id], f) for f in fields)]
        add(Check("I7", "the running totals the ledger decides on equal the sums of the entries",
                  not drifted, _sample(drifted)))
        broken_links = await _rows(conn, _BROKEN_CHAIN_LINKS)
        add(Check("I7", "each entry's running totals are its predecessor's plus its own movement",
                  not broken_links, _sample(broken_links)))
        await conn.rollback()
    return report


# The projection's columns, each with what the folded state says it must hold (the writers,
# `store.write_batch` and `store.upsert_projection`, derive every one of them from the state).
_PROJECTED_COLUMNS: dict[str, Callable[[SagaState], Any]] = {
    "saga_type": lambda s: s.saga_type,
    "business_key": lambda s: s.business_key,
    "definition_version": lambda s: s.definition_version,
    "status": lambda s: s.status.value,
    "current_step": lambda s: s.step,
    "direction": lambda s: s.direction.value if s.direction else None,
    "attempt": lambda s: s.attempt,
    "version": lambda s: s.version,
    "deadline_at": lambda s: s.deadline_at,
    "due_at": lambda s: s.due_at,
    "requested_at": lambda s: s.requested_at,
}


async def replay_mismatches(conn: AsyncConnection) -> list[str]:
    """Fold every saga's events and compare with its projection row: the cached state and the
    columns queries and recovery read. Returns one line per saga that differs (its id, then
    what differs); a log that cannot be folded at all differs too. Streams the events so
    memory stays flat however many sagas there are."""
    mismatched: list[str] = []
    columns = ", ".join(f"s.{name}" for name in _PROJECTED_COLUMNS)
    result = await conn.stream(text(
        f"SELECT e.saga_id, e.payload, s.state, {columns}"
        " FROM saga_events e JOIN sagas s USING (saga_id) ORDER BY e.saga_id, e.seq"))
    current: Any = None
    payloads: list[Any] = []
    row_of_saga: Any = None

    def compare() -> None:
        try:
            state = fold(parse_event(payload) for payload in payloads)
        except Exception as error:  # a log the core cannot fold is a broken log, not a crash
            mismatched.append(f"{current}: its events do not fold ({type(error).__name__})")
            return
        if state is None:  # pragma: no cover - a saga in this join has at least one event
            return
        cached = row_of_saga.state
        try:
            expected: SagaState | None = SagaState.from_json(
                cached if isinstance(cached, dict) else json.loads(cached))
        except Exception:  # an unreadable cached state differs from any fold
            expected = None
        differs = [] if state == expected else ["state"]
        differs += [name for name, of_state in _PROJECTED_COLUMNS.items()
                    if getattr(row_of_saga, name) != of_state(state)]
        if differs:
            mismatched.append(f"{current}: {', '.join(differs)}")

    async for row in result:
        if row.saga_id != current:
            if current is not None:
                compare()
            current, payloads, row_of_saga = row.saga_id, [], row
        payloads.append(row.payload)
    if current is not None:
        compare()
    return mismatched


# --- I8 against the broker: `saga check --against-topic` -------------------------------------

# Records per database lookup while reading the commands topic: memory stays flat on any log.
_TOPIC_CHUNK = 5000
# How many missing records the report names (the count is always complete).
_TOPIC_SAMPLE = 20
# The reader gives up when the broker returns nothing, and not every partition has reached its
# end, for this long: a broker that stopped answering, not an empty topic.
_TOPIC_STALL_S = 30.0


@dataclass(frozen=True)
class TopicRecord:
    """What the topic check keeps of one record of a start topic."""

    partition: int
    offset: int
    timestamp_ms: int | None
    message_id: str
    business_key: str | None


@dataclass(frozen=True)
class Missing:
    partition: int
    offset: int
    business_key: str | None
    message_id: str
    # True: the orchestrator recorded it in its inbox, and that led nowhere (a bug: I5 flags it
    # too). False: the orchestrator never read it (skipped, or published while nothing ran).
    consumed: bool


@dataclass
class TopicReport:
    topic: str
    saga_type: str = ""
    records: int = 0
    missing: int = 0
    # Younger than the grace: the orchestrator may simply not have read them yet.
    too_recent: int = 0
    # Never read, but their business key has a saga from another copy of the request (different
    # bytes, same key): the request is not lost, this record was not read.
    unread_key_known: int = 0
    sample: list[Missing] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.missing == 0

    def check(self) -> Check:
        detail = (f"{self.missing} of {self.records} records: " + "; ".join(
            f"partition {m.partition} offset {m.offset} key {m.business_key or '-'}"
            f"{'' if m.consumed else ' (never read)'}" for m in self.sample[:5])
            + (f" (+{self.missing - 5} more)" if self.missing > 5 else "")) if self.missing else ""
        return Check("I8", f"every request on {self.topic} led to a saga or a dead letter",
                     self.ok, detail)

    def to_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "saga_type": self.saga_type, "records": self.records,
                "missing": self.missing, "too_recent": self.too_recent,
                "unread_key_known": self.unread_key_known,
                "missing_sample": [asdict(m) for m in self.sample]}


def _business_key_of(saga_type: SagaType[Any], value: bytes) -> str | None:
    """The request's business key as the orchestrator reads it (a valid request's, or the one
    a refused request names); None for anything it cannot attach to a saga."""
    intake = classify(saga_type, value, None)
    return None if isinstance(intake, Unparseable) else intake.business_key


class TopicReader:
    """Reads one topic from its earliest offset to its current end, without a consumer group:
    partitions are assigned, never subscribed, and no offset is ever committed, so the check
    moves no worker's position. The end is where the broker says each partition ends (a
    partition-EOF event), not the high watermark alone: tansu has reported watermarks below
    records it still served."""

    def __init__(self, bootstrap: str, topic: str, saga_type: SagaType[Any]) -> None:
        self.topic = topic
        self.saga_type = saga_type
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"saga-check-{uuid4()}",
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "enable.partition.eof": True, "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100})
        metadata = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            self._consumer.close()
            raise ConfigurationError(
                f"the broker at {bootstrap} has no topic {topic} (is SAGA_TOPIC_PREFIX right?"
                " a broker that lost its memory has lost the topic too)")
        self.partitions = sorted(metadata.partitions)
        self._at_end: set[int] = set()
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                               for p in self.partitions])

    def estimate(self) -> int:
        """About how many records there are, from the watermarks (for progress only)."""
        total = 0
        for partition in self.partitions:
            with contextlib.suppress(KafkaException):
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=5)
                total += max(0, high - low)
        return total

    @property
    def done(self) -> bool:
        return self._at_end >= set(self.partitions)

    def read(self, limit: int) -> list[TopicRecord]:
        """Up to `limit` records; an empty list once every partition has reached its end."""
        records: list[TopicRecord] = []
        quiet_since = time.monotonic()
        while len(records) < limit:
            message = self._consumer.poll(0.2 if self.done else 1.0)
            if message is None:
                if self.done:
                    break  # at the end everywhere, and nothing more came: the current end
                if time.monotonic() - quiet_since > _TOPIC_STALL_S:
                    behind = sorted(set(self.partitions) - self._at_end)
                    raise BusError(
                        f"reading {self.topic}: partitions {behind} returned nothing for"
                        f" {_TOPIC_STALL_S:g} s without reaching their end")
                continue
            quiet_since = time.monotonic()
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._at_end.add(message.partition() or 0)
                    continue
                raise BusError(f"reading {self.topic}: {error}")
            self._at_end.discard(message.partition() or 0)
            consumed = Consumed.from_confluent(message)
            records.append(TopicRecord(consumed.partition, consumed.offset,
                                       consumed.timestamp_ms, message_id_of(consumed),
                                       _business_key_of(self.saga_type, consumed.value)))
            if self.done:
                break
        return records

    def close(self) -> None:
        self._consumer.close()


async def _judge(conn: AsyncConnection, records: list[TopicRecord], report: TopicReport) -> None:
    """Find which of `records` the orchestrator consumed and what that led to (the same rule
    as I5 above), and, for those it never read, whether their business key has a saga anyway."""
    outcomes = {row.message_id: row.led for row in await _rows(conn, f"""
        WITH {_COMMAND_LETTERS}
        SELECT i.message_id,
               EXISTS (SELECT 1 FROM sagas s WHERE s.saga_id = i.saga_id)
               OR EXISTS (SELECT 1 FROM letters l WHERE l.topic = i.topic
                          AND l.message_id = i.message_id) AS led
        FROM inbox i WHERE i.consumer = :consumer AND i.message_id = ANY(:ids)""",
        consumer=CONSUMER, ids=sorted({r.message_id for r in records}),
        commands=[report.topic], redrive_header=REDRIVE_HEADER)}
    unread = [r for r in records if r.message_id not in outcomes]
    known = set((await conn.execute(text(
        "SELECT business_key FROM sagas WHERE saga_type = :type AND business_key = ANY(:keys)"),
        {"type": report.saga_type,
         "keys": sorted({r.business_key for r in unread if r.business_key})})).scalars())
    for r in records:
        consumed = r.message_id in outcomes
        if consumed and outcomes[r.message_id]:
            continue
        if not consumed and r.business_key in known:
            report.unread_key_known += 1
            continue
        report.missing += 1
        if len(report.sample) < _TOPIC_SAMPLE:
            report.sample.append(Missing(r.partition, r.offset, r.business_key, r.message_id,
                                         consumed))


async def check_topic(engine: AsyncEngine, bootstrap: str, topic: str,
                      saga_type: SagaType[Any], grace_s: float = 10.0,
                      progress: Callable[[int, int], None] | None = None) -> TopicReport:
    """I8 from the broker's side: every request on `topic` (the start topic of `saga_type`,
    prefixed), from its earliest offset to its current end, led to a saga or a dead letter.

    A record is identified as the orchestrator identifies it, by its message id (the SHA-256 of
    its bytes and redrive id, `message_id_of`): that is the only identity an undecodable record
    has, and it says whether *this* record was read, where a business key would take a
    never-read conflicting re-send for its original. A record never read whose key has a saga
    (another copy was read) is counted apart, not as missing. Records younger than `grace_s`
    are counted as too recent: the orchestrator may not have reached them yet. `progress` is
    called with (records read, estimated total) every few seconds."""
    report = TopicReport(topic, saga_type.name)
    cutoff_ms = (time.time() - grace_s) * 1000
    reader = await asyncio.to_thread(TopicReader, bootstrap, topic, saga_type)
    try:
        estimate = await asyncio.to_thread(reader.estimate)
        last_progress = time.monotonic()
        while records := await asyncio.to_thread(reader.read, _TOPIC_CHUNK):
            report.records += len(records)
            judged = [r for r in records
                      if r.timestamp_ms is None or r.timestamp_ms <= cutoff_ms]
            report.too_recent += len(records) - len(judged)
            if judged:
                async with engine.connect() as conn:
                    await _judge(conn, judged, report)
            if progress is not None and time.monotonic() - last_progress >= 2.0:
                progress(report.records, max(estimate, report.records))
                last_progress = time.monotonic()
    finally:
        await asyncio.to_thread(reader.close)
    return report
