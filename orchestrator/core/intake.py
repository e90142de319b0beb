"""Classify one raw `transfers.commands.v1` record: a valid request, or why it is refused.

Pure: bytes in, a decision input out. Refusal codes come from the validation error *types* set by
the schema (`unknown_currency`, `invalid_amount`, `same_account`), never from message text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from pydantic import ValidationError

from orchestrator.core.saga import RejectTransfer, StartTransfer, request_hash
from schemas import RejectionCode, TransferRequested

_CODE_BY_ERROR_TYPE = {
    "unknown_currency": RejectionCode.UNKNOWN_CURRENCY,
    "invalid_amount": RejectionCode.INVALID_AMOUNT,
    "same_account": RejectionCode.SAME_ACCOUNT,
}


@dataclass(frozen=True)
class Unparseable:
    """Refused with no transfer id to attach a saga to."""

    code: RejectionCode
    reason: str


def classify(
    value: bytes, timestamp_ms: int | None
) -> StartTransfer | RejectTransfer | Unparseable:
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return Unparseable(RejectionCode.MALFORMED_JSON, f"not valid JSON: {error}")
    try:
        request = TransferRequested.model_validate(document)
    except ValidationError as error:
        code, reason = _refusal(error)
        transfer_id = _transfer_id_of(document)
        if transfer_id is None:
            return Unparseable(code, reason)
        return RejectTransfer(transfer_id=transfer_id, code=code, reason=reason)
    requested_at = (
        datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC) if timestamp_ms is not None else None
    )
    return StartTransfer(request, request_hash(request), requested_at)


def _refusal(error: ValidationError) -> tuple[RejectionCode, str]:
    problems = error.errors(include_url=False)
    first = problems[0]
    code = _CODE_BY_ERROR_TYPE.get(first["type"])
    if code is None and first["loc"][:1] == ("amount",):
        code = RejectionCode.INVALID_AMOUNT
    location = ".".join(str(part) for part in first["loc"]) or "request"
    reason = "; ".join(
        f"{'.'.join(str(p) for p in problem['loc']) or 'request'}: {problem['msg']}"
        for problem in problems
    )
    return code or RejectionCode.SCHEMA_VIOLATION, reason if len(problems) > 1 else (
        f"{location}: {first['msg']}"
    )


def _transfer_id_of(document: object) -> UUID | None:
    if not isinstance(document, dict):
        return None
    try:
        return UUID(str(document.get("transfer_id")))
    except ValueError:
        return None
