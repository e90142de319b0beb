"""Operating the dead letters: list them, show one, and redrive them exactly once.

A redrive does not publish anything itself. In one transaction it marks the dead letters
redriven and writes, for each, an outbox row that republishes the original payload, key and
headers to the original topic, with a `saga-redrive-id: <dead_letter_id>` header added; the
outbox relay publishes it. Two facts make that exactly once:

- `UPDATE dead_letters SET redriven_at = now() ... WHERE redriven_at IS NULL RETURNING ...` is the
  only way to obtain a row to republish, so of two redrives of one dead letter (run one after the
  other, or racing: the second waits on the row lock, then re-checks the condition) exactly one
  gets the row and writes its outbox row; the other reports it as already redriven.
- The orchestrator's inbox id of an intake record covers the `saga-redrive-id` header
  (`orchestrator.consuming.message_id_of`), so the republished copy is a new message, processed once
  (a second delivery of it by the relay or the broker is a duplicate of that one message). A
  reply's inbox id is its `reply_id` plus the redrive id when there is one, so a redriven reply
  is decided once more too; the saga's command id decides whether it still applies.

Who redrove a dead letter is recorded with it (`redriven_by`, migration 0011, beside
`redriven_at`; `saga timeline` and the dead-letter pages show it) and travels as the
`saga-redriven-by` header of the outbox row and of the republished record.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final, Literal, overload
from uuid import UUID

from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.consuming.handling import REDRIVE_HEADER
from orchestrator.errors import ConfigurationError, NotFound
from orchestrator.kafka.consumer import decode_headers, encode_headers
from orchestrator.postgres.store import json_value
from orchestrator.workers.recovery import RECOVERY_STAGE
from schemas import DLQ_HEADER_PREFIX

REDRIVEN_BY_HEADER: Final = "saga-redriven-by"
# Shorter prefixes match too much by accident (and a 1-digit typo could name the wrong letter).
MIN_PREFIX_HEX_DIGITS: Final = 4
_AMBIGUOUS_SHOWN = 5


class Select(Enum):
    """What to redrive when not a list of ids (a sentinel: a str is also a Sequence[str])."""

    ALL_PENDING = "all_pending"


ALL_PENDING: Final = Select.ALL_PENDING


# What `saga dlq show` prints of a payload (and of each header) unless asked for all of it: a
# record of megabytes would otherwise flood the terminal. Enough to read any normal message.
SHOW_MAX_BYTES: Final = 4096


@dataclass(frozen=True)
class Encoded:
    """Bytes shown to a person: as text when they are UTF-8, else as base64; the first
    `limit` bytes only when a limit is given (`truncated` says whether anything was left out;
    `size_bytes` is always the whole size)."""

    value: str
    encoding: Literal["utf-8", "base64"]
    size_bytes: int
    truncated: bool = False

    @classmethod
    def of(cls, data: bytes, limit: int | None = None) -> Encoded:
        shown = data if limit is None or len(data) <= limit else data[:limit]
        truncated = len(shown) < len(data)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return cls(base64.b64encode(shown).decode(), "base64", len(data), truncated)
        # Cut inside a multi-byte character: the partial character is left out, nothing else.
        return cls(shown.decode("utf-8", errors="ignore") if truncated else shown.decode(),
                   "utf-8", len(data), truncated)

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "encoding": self.encoding, "size_bytes": self.size_bytes,
                "truncated": self.truncated}


@dataclass(frozen=True)
class DeadLetterSummary:
    """One line of `saga dlq list`."""

    dead_letter_id: UUID
    stage: str
    reason_code: str
    error_class: str
    original_topic: str
    original_partition: int | None
    original_offset: int | None
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    saga_id: UUID | None
    saga_type: str | None
    business_key: str | None
    redriven_at: datetime | None
    redriven_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "dead_letter_id": str(self.dead_letter_id), "stage": self.stage,
            "reason_code": self.reason_code, "error_class": self.error_class,
            "original_topic": self.original_topic,
            "original_partition": self.original_partition,
            "original_offset": self.original_offset, "attempts": self.attempts,
            "first_failed_at": self.first_failed_at.isoformat(),
            "last_failed_at": self.last_failed_at.isoformat(),
            "saga_id": _str_or_none(self.saga_id), "saga_type": self.saga_type,
            "business_key": self.business_key,
            "redriven_at": self.redriven_at.isoformat() if self.redriven_at else None,
            "redriven_by": self.redriven_by,
        }


@dataclass(frozen=True)
class DeadLetterDetail:
    """Everything `dead_letters` holds about one dead letter, bytes made readable."""

    summary: DeadLetterSummary
    reason: str
    original_key: str | None
    headers: tuple[tuple[str, Encoded], ...]
    payload: Encoded
    # The payload byte for byte, for `saga dlq show --out FILE` (never printed).
    original_payload: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary.to_json(), "reason": self.reason, "original_key": self.original_key,
            "headers": [{"name": name, **value.to_json()} for name, value in self.headers],
            "payload": self.payload.to_json(),
        }


@dataclass(frozen=True)
class RedriveResult:
    """What one `redrive` did. Only `redriven` caused anything (one outbox row each)."""

    actor: str
    redriven: tuple[UUID, ...]
    already_redriven: tuple[UUID, ...]
    not_found: tuple[str, ...]  # as the caller spelled them
    outbox_ids: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "actor": self.actor, "redriven": [str(i) for i in self.redriven],
            "already_redriven": [str(i) for i in self.already_redriven],
            "not_found": list(self.not_found), "outbox_ids": list(self.outbox_ids),
        }

    def describe(self) -> str:
        return (f"redriven {len(self.redriven)}, already redriven {len(self.already_redriven)}"
                " (nothing done), not found " + str(len(self.not_found)))


def _str_or_none(value: UUID | None) -> str | None:
    return str(value) if value is not None else None


@overload
def _uuid(value: None) -> None: ...
@overload
def _uuid(value: object) -> UUID: ...
def _uuid(value: object) -> UUID | None:
    """A uuid column as the standard library's type (asyncpg hands over its own subclass)."""
    return None if value is None else UUID(str(value))


_SUMMARY_COLUMNS = (
    "dead_letter_id, stage, reason_code, error_class, original_topic, original_partition,"
    " original_offset, attempts, first_failed_at, last_failed_at, saga_id, saga_type,"
    " business_key, redriven_at, redriven_by"
)


def _summary(row: Row[Any]) -> DeadLetterSummary:
    return DeadLetterSummary(
        dead_letter_id=_uuid(row.dead_letter_id), stage=row.stage, reason_code=row.reason_code,
        error_class=row.error_class, original_topic=row.original_topic,
        original_partition=row.original_partition, original_offset=row.original_offset,
        attempts=row.attempts, first_failed_at=row.first_failed_at,
        last_failed_at=row.last_failed_at, saga_id=_uuid(row.saga_id),
        saga_type=row.saga_type, business_key=row.business_key,
        redriven_at=row.redriven_at, redriven_by=row.redriven_by,
    )


async def list_dead_letters(conn: AsyncConnection, *, limit: int, include_redriven: bool,
                            reason: str | None) -> list[DeadLetterSummary]:
    """Dead letters, most recently failed first; by default only those not redriven yet."""
    rows = (await conn.execute(
        text(
            f"SELECT {_SUMMARY_COLUMNS} FROM dead_letters"
            " WHERE (CAST(:all AS boolean) OR redriven_at IS NULL)"
            " AND (CAST(:reason AS text) IS NULL OR reason_code = :reason)"
            " ORDER BY last_failed_at DESC, dead_letter_id LIMIT :limit"
        ),
        {"all": include_redriven, "reason": reason, "limit": limit},
    )).all()
    return [_summary(row) for row in rows]


def prefix_bounds(wanted: str) -> UUID | tuple[UUID, UUID]:
    """A full id as itself; a prefix as the lowest and highest id it can stand for.

    PostgreSQL orders uuids by their bytes, which is the order of their hex spelling, so a prefix
    is a range on the primary key (an index scan, not a cast of every id to text).
    """
    digits = wanted.strip().lower().replace("-", "")
    if not digits or len(digits) > 32 or any(c not in "0123456789abcdef" for c in digits):
        raise NotFound(f"{wanted!r} is not a dead letter id (a UUID) or a prefix of one")
    if len(digits) == 32:
        return UUID(digits)
    if len(digits) < MIN_PREFIX_HEX_DIGITS:
        raise NotFound(f"dead letter id prefix {wanted!r} is too short: give at least "
                       f"{MIN_PREFIX_HEX_DIGITS} hex digits")
    return UUID(digits.ljust(32, "0")), UUID(digits.ljust(32, "f"))


async def resolve_id(conn: AsyncConnection, wanted: str) -> UUID | None:
    """The dead letter id that `wanted` (an id or a unique prefix of one) names, or None.

    A full id is returned as given, whether or not it exists (the caller's query says). A prefix
    matching more than one dead letter raises NotFound listing some of them: guessing would act
    on a dead letter the operator did not mean.
    """
    bounds = prefix_bounds(wanted)
    if isinstance(bounds, UUID):
        return bounds
    matches = list((await conn.execute(
        text("SELECT dead_letter_id FROM dead_letters WHERE dead_letter_id BETWEEN :lo AND :hi"
             " ORDER BY dead_letter_id LIMIT :n"),
        {"lo": bounds[0], "hi": bounds[1], "n": _AMBIGUOUS_SHOWN + 1},
    )).scalars())
    if len(matches) > 1:
        shown = ", ".join(str(m) for m in matches[:_AMBIGUOUS_SHOWN])
        more = " and more" if len(matches) > _AMBIGUOUS_SHOWN else ""
        raise NotFound(f"dead letter id prefix {wanted!r} is ambiguous: it matches {shown}{more};"
                       " give more of the id")
    return _uuid(matches[0]) if matches else None


async def show_dead_letter(conn: AsyncConnection, wanted: str,
                           limit: int | None = SHOW_MAX_BYTES) -> DeadLetterDetail:
    """One dead letter by id or unique id prefix; NotFound if there is none. Its payload and
    header values are shown up to `limit` bytes each (None: whole); `original_payload` is
    always whole."""
    dead_letter_id = await resolve_id(conn, wanted)
    row = None
    if dead_letter_id is not None:
        row = (await conn.execute(
            text(f"SELECT {_SUMMARY_COLUMNS}, reason, original_key, payload, headers"
                 " FROM dead_letters WHERE dead_letter_id = :id"),
            {"id": dead_letter_id},
        )).one_or_none()
    if row is None:
        raise NotFound(f"no dead letter with id {wanted}")
    return DeadLetterDetail(
        summary=_summary(row), reason=row.reason, original_key=row.original_key,
        headers=tuple((name, Encoded.of(value, limit))
                      for name, value in decode_headers(json_value(row.headers))),
        payload=Encoded.of(bytes(row.payload), limit),
        original_payload=bytes(row.payload),
    )


def redrive_headers(original: Sequence[tuple[str, bytes]], dead_letter_id: UUID,
                    actor: str) -> tuple[tuple[str, bytes], ...]:
    """The headers of a redriven record: the original ones, minus what a redrive must replace.

    Dropped: `dlq-*` headers (they describe a failure, not the message) and the
    `saga-redrive-id` / `saga-redriven-by` of an earlier redrive of the same bytes: the worker
    reads the first `saga-redrive-id` it finds, so a stale one left in front would give the copy
    the inbox id of the earlier redrive and it would be skipped as a duplicate. Names are
    compared case-insensitively, so a differently cased leftover cannot survive either. Then the
    new `saga-redrive-id` and `saga-redriven-by` are appended; everything else keeps its order.
    """
    replaced = {REDRIVE_HEADER, REDRIVEN_BY_HEADER}
    kept = tuple((name, value) for name, value in original
                 if not name.lower().startswith(DLQ_HEADER_PREFIX)
                 and name.lower() not in replaced)
    return (*kept, (REDRIVE_HEADER, str(dead_letter_id).encode()),
            (REDRIVEN_BY_HEADER, actor.encode()))


_MARK_REDRIVEN_COLUMNS = (
    "RETURNING dead_letter_id, original_topic, original_key, payload, headers, saga_id,"
    " first_failed_at, original_partition, original_offset"
)

_INSERT_OUTBOX = text(
    "INSERT INTO outbox (topic, key, value, headers, saga_id)"
    " SELECT * FROM unnest(CAST(:topic AS text[]), CAST(:key AS bytea[]),"
    " CAST(:value AS bytea[]), CAST(:headers AS jsonb[]), CAST(:saga AS uuid[]))"
    " RETURNING id"
)


async def redrive(conn: AsyncConnection, ids: Sequence[str] | Select, *,
                  actor: str) -> RedriveResult:
    """Republish dead letters (the given ids or unique prefixes, or every one not yet
    redriven) through the outbox, each at most once ever.

    Runs in the caller's transaction, which must commit for anything to happen: the marking and
    the outbox rows are one unit, so a failure leaves the dead letters pending, not marked with
    nothing sent. An id that is not found does not stop the others; an ambiguous prefix stops
    everything (NotFound) before anything is marked.
    """
    if isinstance(ids, str):
        raise TypeError("ids must be a sequence of ids, not one string")
    if not actor.strip():
        raise ValueError("a redrive needs an actor: who asked for it")
    not_found: list[str] = []
    wanted: dict[UUID, str] = {}
    if not isinstance(ids, Select):
        for spelled in dict.fromkeys(ids):  # the same id twice is one request
            resolved = await resolve_id(conn, spelled)
            if resolved is None:
                not_found.append(spelled)
            else:
                wanted.setdefault(resolved, spelled)
        if not wanted:
            return RedriveResult(actor, (), (), tuple(not_found), ())
        failed_sagas = list((await conn.execute(
            text("SELECT dead_letter_id FROM dead_letters WHERE dead_letter_id = ANY(:ids)"
                 " AND stage = :stage"), {"ids": list(wanted), "stage": RECOVERY_STAGE},
        )).scalars())
        if failed_sagas:
            raise ConfigurationError(
                f"dead letter {failed_sagas[0]} records a saga that FAILED in recovery: no "
                "message caused it, so there is nothing to redrive; resolve the saga instead "
                "(docs/operations/runbook.md, FAILED)")
        marked = list((await conn.execute(
            text("UPDATE dead_letters SET redriven_at = now(), redriven_by = :actor"
                 " WHERE dead_letter_id = ANY(:ids) AND redriven_at IS NULL "
                 + _MARK_REDRIVEN_COLUMNS),
            {"ids": list(wanted), "actor": actor},
        )).all())
    else:
        # A FAILED saga's dead letter (stage recovery) has no message to send again.
        marked = list((await conn.execute(text(
            "UPDATE dead_letters SET redriven_at = now(), redriven_by = :actor"
            " WHERE redriven_at IS NULL AND stage <> :stage " + _MARK_REDRIVEN_COLUMNS),
            {"stage": RECOVERY_STAGE, "actor": actor}
        )).all())

    # Oldest failure first, so the relay (which publishes in outbox id order) republishes in
    # roughly the order the records first arrived.
    marked.sort(key=lambda r: (r.first_failed_at, r.original_partition or 0,
                               r.original_offset or 0, r.dead_letter_id))
    redriven = tuple(_uuid(row.dead_letter_id) for row in marked)
    already: list[UUID] = []
    skipped = {i: spelled for i, spelled in wanted.items() if i not in frozenset(redriven)}
    if skipped:
        # What the UPDATE skipped exists but was redriven before (by an earlier command, or by
        # one that raced this one and committed first), or does not exist at all.
        existing = {_uuid(i) for i in (await conn.execute(
            text("SELECT dead_letter_id FROM dead_letters WHERE dead_letter_id = ANY(:ids)"),
            {"ids": list(skipped)},
        )).scalars()}
        for dead_letter_id, spelled in skipped.items():
            if dead_letter_id in existing:
                already.append(dead_letter_id)
            else:
                not_found.append(spelled)

    outbox_ids: tuple[int, ...] = ()
    if marked:
        outbox_ids = tuple((await conn.execute(_INSERT_OUTBOX, {
            "topic": [row.original_topic for row in marked],
            # The table keeps the key as text: a key that was not UTF-8 was stored with
            # replacement characters and cannot be restored byte for byte.
            "key": [row.original_key.encode() if row.original_key is not None else None
                    for row in marked],
            "value": [bytes(row.payload) for row in marked],
            "headers": [json.dumps(encode_headers(redrive_headers(
                decode_headers(json_value(row.headers)), row.dead_letter_id, actor)))
                for row in marked],
            "saga": [row.saga_id for row in marked],
        })).scalars())
    return RedriveResult(actor, redriven, tuple(already), tuple(not_found), outbox_ids)


# Rendering for people (the CLI's default output; `--json` prints `to_json()` instead).

SHORT_ID_HEX_DIGITS: Final = 8


def _when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if at is not None else ""


def _origin(letter: DeadLetterSummary) -> str:
    """topic[partition]@offset, the coordinates of the record that failed."""
    partition = "" if letter.original_partition is None else f"[{letter.original_partition}]"
    offset = "" if letter.original_offset is None else f"@{letter.original_offset}"
    return f"{letter.original_topic}{partition}{offset}"


def render_list(letters: Sequence[DeadLetterSummary]) -> str:
    """An aligned table. Ids are shortened like git's; every command here accepts the short id
    (and refuses it if it ever becomes ambiguous)."""
    if not letters:
        return "no dead letters"
    header = ("id", "last failed (UTC)", "stage", "reason", "att", "original record",
              "saga", "saga type", "business key", "redriven (UTC)")
    # `saga`: the short saga id, which `saga timeline` takes (as it takes the dead letter's).
    rows = [(str(d.dead_letter_id)[:SHORT_ID_HEX_DIGITS], _when(d.last_failed_at), d.stage,
             d.reason_code, str(d.attempts), _origin(d),
             str(d.saga_id)[:SHORT_ID_HEX_DIGITS] if d.saga_id else "", d.saga_type or "",
             d.business_key or "", _when(d.redriven_at)) for d in letters]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    right_aligned = {header.index("att")}
    return "\n".join(
        "  ".join(cell.rjust(width) if i in right_aligned else cell.ljust(width)
                  for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in (header, *rows))


def render_detail(detail: DeadLetterDetail) -> str:
    letter = detail.summary

    def coordinate(value: int | None) -> str:
        return "(unknown)" if value is None else str(value)

    fields = [
        ("dead letter", str(letter.dead_letter_id)),
        ("stage", letter.stage),
        ("reason code", letter.reason_code),
        ("reason", detail.reason),
        ("error class", letter.error_class),
        ("original topic", letter.original_topic),
        ("partition", coordinate(letter.original_partition)),
        ("offset", coordinate(letter.original_offset)),
        ("key", "(none)" if detail.original_key is None else detail.original_key),
        ("attempts", str(letter.attempts)),
        ("first failed", _when(letter.first_failed_at) + " UTC"),
        ("last failed", _when(letter.last_failed_at) + " UTC"),
        ("saga id", _str_or_none(letter.saga_id) or "(none)"),
        ("saga type", letter.saga_type or "(none)"),
        ("business key", letter.business_key or "(none)"),
        ("redriven at", _when(letter.redriven_at) + " UTC" if letter.redriven_at
         else "(not yet: pending)"),
        ("headers", str(len(detail.headers)) if detail.headers else "(none)"),
    ]
    lines = [f"{name:<15} {value}" for name, value in fields]
    lines += [f"  {name}: {value.value}" + ("  (base64)" if value.encoding == "base64" else "")
              + (f" ... ({value.size_bytes} bytes in all)" if value.truncated else "")
              for name, value in detail.headers]
    payload = detail.payload
    lines.append(f"{'payload':<15} {payload.size_bytes} bytes, shown as {payload.encoding}")
    lines.append(payload.value)
    if payload.truncated or any(value.truncated for _, value in detail.headers):
        short = str(letter.dead_letter_id)[:SHORT_ID_HEX_DIGITS]
        lines.append(f"... truncated: only the first {SHOW_MAX_BYTES} bytes of the payload and"
                     f" of each header are shown; `saga dlq show {short} --full` prints all,"
                     f" `saga dlq show {short} --out FILE` writes the original payload to FILE")
    return "\n".join(lines)
