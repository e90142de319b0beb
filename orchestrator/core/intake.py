"""Classify one raw start record of a saga type: a valid start, or why it is refused.

Pure: bytes in, a decision input out. Generic over saga types: parse the JSON, validate it with
the type's start model, apply the type's intake rules (`IntakeRules`: which validation error
stands for which refusal code, and the checks a valid message must pass). Refusal codes come
from error *types* and the rules' own `Refusal`s, never from message text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from orchestrator.core.saga import RejectSaga, StartSaga
from orchestrator.core.saga_type import BUSINESS_KEY_MAX, IntakeRules, SagaType
from schemas import RejectionCode


@dataclass(frozen=True)
class Unparseable:
    """Refused with no business key to attach a saga to."""

    code: RejectionCode
    reason: str


def classify(
    saga_type: SagaType[Any], value: bytes, timestamp_ms: int | None
) -> StartSaga | RejectSaga | Unparseable:
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return Unparseable(RejectionCode.MALFORMED_JSON,
                           unreadable(value) or f"not valid JSON: {error}")
    try:
        request = saga_type.start_model.model_validate(document)
    except ValidationError as error:
        code, reason = _refusal(saga_type.intake, error)
        key = _usable(saga_type.intake.key_of_refused(document))
        if key is None:
            return Unparseable(code, reason)
        return saga_type.reject(key, code, reason)
    try:
        start = saga_type.start(request, _requested_at(timestamp_ms))
    except ValueError as error:
        return Unparseable(RejectionCode.SCHEMA_VIOLATION, str(error))
    for check in saga_type.intake.checks:
        refusal = check(request)
        if refusal is not None:
            return saga_type.reject(start.business_key, refusal.code, refusal.reason,
                                    start.request_hash)
    return start


def unreadable(value: bytes) -> str | None:
    """Why `value` cannot even be read as JSON text, or None when it can (and what is wrong, if
    anything, is its JSON): an empty record, or bytes that are not UTF-8 (RFC 8259 asks JSON
    text to be UTF-8, and the JSON decoder's own message for both is "Expecting value",
    which sends on-call looking for a syntax error that is not there). Called only once a
    record failed to parse, so a valid record never pays for it."""
    if not value:
        return "empty payload (0 bytes): expected a JSON object"
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as error:
        return (f"not UTF-8 text: byte 0x{value[error.start]:02x} at offset {error.start} of "
                f"{len(value)} cannot be decoded (JSON must be UTF-8)")
    return None


def _requested_at(timestamp_ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC) if timestamp_ms is not None else None


def _usable(key: str | None) -> str | None:
    return key if isinstance(key, str) and 0 < len(key) <= BUSINESS_KEY_MAX else None


def _refusal(rules: IntakeRules[Any], error: ValidationError) -> tuple[RejectionCode, str]:
    problems = error.errors(include_url=False)
    first = problems[0]
    code = rules.codes_by_error_type.get(first["type"])
    if code is None and first["loc"]:
        code = rules.codes_by_field.get(str(first["loc"][0]))
    location = ".".join(str(part) for part in first["loc"]) or "request"
    reason = "; ".join(
        f"{'.'.join(str(p) for p in problem['loc']) or 'request'}: {problem['msg']}"
        for problem in problems
    )
    return code or RejectionCode.SCHEMA_VIOLATION, reason if len(problems) > 1 else (
        f"{location}: {first['msg']}"
    )
