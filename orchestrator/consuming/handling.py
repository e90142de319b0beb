"""The consuming discipline every worker and participant shares: a batch that fails for a
reason other than an outage is split to find its poison record, which is dead-lettered with its
reason; the dead letter's identity, record and size limits; bounded retries of lost races.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from uuid import UUID, uuid5

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from orchestrator.errors import SagaError
from orchestrator.kafka.consumer import Consumed, encode_headers
from orchestrator.kafka.producer import MESSAGE_MAX_BYTES, Record, record_size
from orchestrator.metrics import DEAD_LETTERS
from orchestrator.postgres import store
from orchestrator.redact import describe_error
from orchestrator.settings import Settings
from schemas import TOPIC_DEAD_LETTERS, DeadLetter, RejectionCode

log = logging.getLogger(__name__)

REDRIVE_HEADER = "saga-redrive-id"
_DEAD_LETTER_NAMESPACE = UUID("0b5e9b1e-2a7c-4c55-9e4f-6d0f3a8c1b22")
# How many sagas' states the orchestrator keeps for its known-state path (the least recently
# written go first).
KNOWN_SAGAS_MAX = 20_000


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, SagaError) and error.retryable


def is_transient(error: BaseException) -> bool:
    """Infrastructure trouble (database or broker away, a lost race) that says nothing about
    the messages: the batch is redelivered until it passes, never set aside."""
    return is_retryable(error) or store.is_transient_db_error(error)


# Sets one record aside: (record, the error, tries, time of the first failure).
SetAside = Callable[[Consumed, BaseException, int, datetime], Awaitable[None]]


async def handle_isolating_poison(
    batch: Sequence[Consumed],
    handle: Callable[[Sequence[Consumed]], Awaitable[None]],
    set_aside: SetAside,
    attempts: int = 3,
) -> None:
    """Handle `batch`; if it fails for a reason that is not transient, find the record(s) that
    make it fail and set them aside (dead-letter them) so that the rest of the partition goes
    on. A poison record would otherwise be redelivered forever and block its partition.

    The batch's transaction was rolled back, so each record is handled again on its own; one
    that fails `attempts` times in a row is set aside. Transient errors propagate: the batch is
    redelivered and nothing is dead-lettered for an outage."""
    try:
        await handle(batch)
        return
    except Exception as error:
        if is_transient(error):
            raise
        log.warning("a batch of %d failed (%s: %s); handling its records one by one to find "
                    "the poison", len(batch), type(error).__name__, error)
    for message in batch:
        first_failed_at: datetime | None = None
        for attempt in range(1, attempts + 1):
            try:
                await handle([message])
                break
            except Exception as error:
                if is_transient(error):
                    raise
                first_failed_at = first_failed_at or datetime.now(UTC)
                if attempt < attempts:
                    await asyncio.sleep(0.05 * attempt)
                    continue
                log.error("setting aside the record at %s/%s/%s after %d failures: %s: %s",
                          message.topic, message.partition, message.offset, attempts,
                          type(error).__name__, error)
                await set_aside(message, error, attempts, first_failed_at)
                DEAD_LETTERS.add(1, {"stage": "poison",
                                     "reason": RejectionCode.PROCESSING_FAILED.value})


def poison_dead_letter(settings: Settings, stage: str, message: Consumed, error: BaseException,
                       attempts: int, first_failed_at: datetime
                       ) -> tuple[store.DeadLetterRow, store.OutboxRow, str]:
    """The dead letter of a record that kept failing: its row, its DLQ record, its message id."""
    now = datetime.now(UTC)
    message_id = message_id_of(message)
    letter = dead_letter_for(message, RejectionCode.PROCESSING_FAILED,
                             describe_error(error)[:2000],
                             f"{stage}.{type(error).__qualname__}", now,
                             message_id=message_id).model_copy(
        update={"attempts": attempts, "first_failed_at": first_failed_at})
    record = dead_letter_record(settings, message, letter)
    row = store.DeadLetterRow(
        dead_letter_id=letter.dead_letter_id, stage=stage,
        reason_code=letter.reason_code.value, reason=letter.reason,
        error_class=letter.error_class, original_topic=message.topic,
        original_partition=message.partition, original_offset=message.offset,
        original_key=letter.original_key, payload=message.value,
        headers=encode_headers(message.headers), failed_at=now, saga_id=None,
        attempts=attempts, first_failed_at=first_failed_at)
    outbox = store.OutboxRow(record.topic, record.key, record.value,
                             encode_headers(record.headers), None)
    return row, outbox, message_id


def retrying(attempts: int = 5) -> AsyncRetrying:
    """Bounded retries for races and transient faults at the edges; never forever."""
    return AsyncRetrying(
        retry=retry_if_exception(is_retryable),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.01, max=0.5),
        reraise=True,
    )


def message_id_of(message: Consumed) -> str:
    """Identity of an intake record: its content (plus a redrive id, so a redriven copy of a
    dead letter is a new message). Broker coordinates are not stable: a memory broker that
    restarts hands out the same offsets again."""
    digest = hashlib.sha256(message.value)
    redrive = message.header(REDRIVE_HEADER)
    if redrive:
        digest.update(b"\0redrive:" + redrive.encode())
    return "sha256:" + digest.hexdigest()


def dead_letter_record(settings: Settings, message: Consumed, letter: DeadLetter) -> Record:
    """The DLQ record: the original bytes and headers, plus `dlq-*` headers saying why;
    shortened if it would not fit (`fit_dead_letter`)."""
    return fit_dead_letter(settings.topic(TOPIC_DEAD_LETTERS), message.value, message.key,
                           message.headers, letter)


# What a dead letter's copy may weigh (value, key and headers): a tenth under the producer's
# `message.max.bytes`, which also counts the record's and its batch's framing.
DEAD_LETTER_MAX_BYTES = MESSAGE_MAX_BYTES * 9 // 10
# A `dlq-*` header value is cut to this in a copy that fits no other way (a reason or an
# original key of hundreds of kilobytes): the full text is in the `dead_letters` row.
_HEADER_VALUE_MAX_BYTES = 1024


def fit_dead_letter(topic: str, value: bytes, key: bytes | None,
                    headers: Sequence[tuple[str, bytes]], letter: DeadLetter,
                    limit: int = DEAD_LETTER_MAX_BYTES) -> Record:
    """The dead letter's record on `topic`: the original value, key and headers plus the
    letter's `dlq-*` headers, or, if that is over `limit` bytes, a shortened copy that still
    tells what failed, where and why: the letter's headers with the original's size and SHA-256
    added, the original key and headers if they fit, and as much of the value's start as fits.
    A copy larger than the producer's limit would be refused on every relay pass; the whole
    original stays in the `dead_letters` table, which the redrive reads."""
    whole = Record(topic, value, key, (*headers, *letter.to_headers()))
    if record_size(whole) <= limit:
        return whole
    described = letter.model_copy(update={
        "original_size_bytes": len(value),
        "original_sha256": hashlib.sha256(value).hexdigest()}).to_headers()
    # The smallest copy first; then what is left of the budget goes to the value.
    copy = Record(topic, b"", key, (*headers, *described))
    if record_size(copy) > limit:  # the original headers alone are too large: leave them out
        copy = Record(topic, b"", key, tuple(described))
    if record_size(copy) > limit:  # so is the key, or a header of the letter: cut them
        copy = Record(topic, b"", None, tuple(
            (name, content[:_HEADER_VALUE_MAX_BYTES]) for name, content in described))
    room = limit - record_size(copy)
    return Record(topic, value[:room], copy.key, copy.headers)


def dead_letter_for(
    message: Consumed,
    code: RejectionCode,
    reason: str,
    error_class: str,
    now: datetime,
    saga_id: UUID | None = None,
    saga_type: str | None = None,
    business_key: str | None = None,
    message_id: str = "",
) -> DeadLetter:
    return DeadLetter(
        # Derived from the record's coordinates and content, so reprocessing the same record
        # after a crash does not dead-letter it twice, while two records never share an id.
        dead_letter_id=uuid5(_DEAD_LETTER_NAMESPACE,
                             f"{message.topic}:{message.partition}:{message.offset}:"
                             f"{message_id}:{code.value}"),
        reason_code=code,
        reason=reason,
        error_class=error_class,
        original_topic=message.topic,
        original_partition=message.partition,
        original_offset=message.offset,
        original_key=message.key.decode(errors="replace") if message.key is not None else None,
        first_failed_at=now,
        last_failed_at=now,
        saga_id=saga_id,
        saga_type=saga_type,
        business_key=business_key,
    )


