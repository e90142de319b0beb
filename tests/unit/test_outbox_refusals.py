"""The pure parts of issue 9's point 4: how a librdkafka error is classified, how a dead-letter
copy is shortened to fit one Kafka record, and how a repeating log line is thinned out.
(The relay's behaviour on the real broker: tests/integration/test_outbox_refusals.py.)"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from uuid import uuid4

import pytest
from confluent_kafka import KafkaError

from orchestrator.consuming.handling import DEAD_LETTER_MAX_BYTES, fit_dead_letter
from orchestrator.errors import BusError, RecordRefused, TopicRefused
from orchestrator.kafka.producer import MESSAGE_MAX_BYTES, Record, delivery_error, record_size
from orchestrator.throttle import LogThrottle
from schemas import DeadLetter, RejectionCode


@pytest.mark.parametrize("code", [
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError._INVALID_ARG, KafkaError.INVALID_MSG, KafkaError.TOPIC_EXCEPTION])
def test_a_record_refused_for_what_it_is_is_not_retryable(code: int) -> None:
    error = delivery_error(KafkaError(code), "t.v1")

    assert type(error) is RecordRefused and not error.retryable
    assert error.code == KafkaError(code).name()
    assert str(error).startswith("t.v1: ")


@pytest.mark.parametrize("code", [
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED])
def test_a_record_refused_for_its_topic_is_counted_but_may_heal(code: int) -> None:
    error = delivery_error(KafkaError(code))

    assert isinstance(error, RecordRefused) and isinstance(error, TopicRefused)
    assert error.retryable  # tried again with backoff, up to SAGA_OUTBOX_MAX_ATTEMPTS


@pytest.mark.parametrize("code", [
    KafkaError._MSG_TIMED_OUT, KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT,
    KafkaError._TRANSPORT, KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError._ALL_BROKERS_DOWN])
def test_a_transport_failure_is_transient_and_never_counted_against_the_record(
        code: int) -> None:
    error = delivery_error(KafkaError(code))

    assert type(error) is BusError and error.retryable
    assert not isinstance(error, RecordRefused)


def letter(reason: str = "reference: String should have at most 140 characters",
           key: str | None = "k") -> DeadLetter:
    now = datetime.now(UTC)
    return DeadLetter(
        dead_letter_id=uuid4(), reason_code=RejectionCode.SCHEMA_VIOLATION, reason=reason,
        error_class="intake.SCHEMA_VIOLATION", original_topic="transfers.commands.v1",
        original_partition=2, original_offset=404, original_key=key, first_failed_at=now,
        last_failed_at=now)


def test_a_copy_that_fits_is_the_original_with_the_dlq_headers_only() -> None:
    value = b"x" * 1000
    dead = letter()

    record = fit_dead_letter("dlq", value, b"k", [("traceparent", b"t")], dead)

    assert record == Record("dlq", value, b"k", (("traceparent", b"t"), *dead.to_headers()))
    assert not any(name.startswith("dlq-original-s") for name, _ in record.headers)


def test_an_oversized_copy_keeps_its_coordinates_reason_size_and_hash() -> None:
    value = bytes(range(256)) * 3905  # 999,680 bytes
    dead = letter()

    record = fit_dead_letter("dlq", value, b"k", [("traceparent", b"t")], dead)

    headers = dict(record.headers)
    assert record_size(record) <= DEAD_LETTER_MAX_BYTES < MESSAGE_MAX_BYTES
    assert record_size(record) > DEAD_LETTER_MAX_BYTES - 100  # the room went to the value
    assert value.startswith(record.value) and len(record.value) < len(value)
    assert headers["dlq-original-size-bytes"] == b"999680"
    assert headers["dlq-original-sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert (headers["dlq-original-topic"], headers["dlq-original-partition"],
            headers["dlq-original-offset"]) == (b"transfers.commands.v1", b"2", b"404")
    assert headers["dlq-reason-code"] == b"SCHEMA_VIOLATION"
    assert headers["dlq-dead-letter-id"] == str(dead.dead_letter_id).encode()
    assert headers["traceparent"] == b"t" and record.key == b"k"


def test_original_headers_too_large_to_keep_are_left_out_not_the_description() -> None:
    value = b"v" * 10
    huge_headers = [("h", b"y" * DEAD_LETTER_MAX_BYTES)]

    record = fit_dead_letter("dlq", value, b"k", huge_headers, letter())

    headers = dict(record.headers)
    assert record_size(record) <= DEAD_LETTER_MAX_BYTES
    assert "h" not in headers
    assert headers["dlq-original-size-bytes"] == b"10"
    assert record.value == value  # room enough for the whole value once the header went


def test_a_huge_key_and_reason_are_cut_and_the_copy_still_fits() -> None:
    key = b"k" * (DEAD_LETTER_MAX_BYTES // 2)
    dead = letter(reason="r" * (DEAD_LETTER_MAX_BYTES // 2), key=key.decode())

    record = fit_dead_letter("dlq", b"v" * 100, key, [], dead)

    headers = dict(record.headers)
    assert record_size(record) <= DEAD_LETTER_MAX_BYTES
    assert record.key is None
    assert len(headers["dlq-reason"]) == 1024
    assert headers["dlq-original-sha256"] == hashlib.sha256(b"v" * 100).hexdigest().encode()


def test_a_repeating_line_is_logged_once_per_interval_with_what_was_left_out() -> None:
    now = [0.0]
    throttle = LogThrottle(every_s=30, clock=lambda: now[0])

    assert throttle.admit("row 7") == 0  # the first occurrence: logged at once
    assert [throttle.admit("row 7") for _ in range(5)] == [None] * 5
    assert throttle.admit("row 8") == 0  # another key has its own interval
    now[0] = 30.0
    assert throttle.admit("row 7") == 5  # logged again, saying 5 were left out
    assert throttle.admit("row 7") is None
