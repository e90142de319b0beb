"""The HTTP API, `/api/v1`: reads for every role (account ids masked for viewers), operator
actions on a saga and dead-letter redrives for operators (one) and admins (in bulk). Every
action records the token's subject as its actor. The routes only translate: the queries, the
actions and the redrive are `orchestrator.ops`'s, the same the CLI runs.
"""

from __future__ import annotations

import base64
import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import AwareDatetime, ValidationError

from orchestrator.console import models
from orchestrator.console.auth import Principal, Role
from orchestrator.console.problems import Problem
from orchestrator.console.security import Console, console_of, require
from orchestrator.core.saga import ActOnSaga, OperatorAction
from orchestrator.core.saga_type import SagaTypes
from orchestrator.errors import ConfigurationError, Conflict, NotAllowed, NotFound
from orchestrator.ops import dlq, queries
from orchestrator.ops.actions import act_on_saga
from orchestrator.ops.overview import overview, saga_id_by_prefix

log = logging.getLogger(__name__)
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
Ctx = Annotated[Console, Depends(console_of)]
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many rows")]
DeadLetterRef = Annotated[str, Path(
    min_length=4, max_length=36, description="a dead letter id or a unique prefix of one")]

router = APIRouter(prefix="/api/v1", responses={
    401: {"model": Problem, "description": "no credentials, or untrusted ones"},
    403: {"model": Problem, "description": "the role does not allow it"},
    422: {"model": Problem, "description": "bad parameters"},
})


def _masked(console: Console, principal: Principal, data: Any) -> Any:
    return data if principal.sees_accounts else console.mask.json(data)


@router.get("/whoami", response_model=models.Whoami, summary="who the token says you are")
async def whoami(principal: Viewer) -> dict[str, Any]:
    return {"subject": principal.subject, "role": principal.role.label,
            "accounts_masked": not principal.sees_accounts}


@router.get("/sagas", response_model=models.SagaList,
            summary="sagas, most recently changed first, one page at a time")
async def list_sagas(
        principal: Viewer, console: Ctx,
        status: Annotated[models.SagaStatus | None, Query(description=(
            "in any case: `completed` is `COMPLETED`"))] = None,
        saga_type: Annotated[str | None, Query(alias="type", max_length=200)] = None,
        definition_version: Annotated[int | None, Query(ge=1)] = None,
        key: Annotated[str | None, Query(max_length=500, description="a business key")] = None,
        account: Annotated[str | None, Query(min_length=1, max_length=200, description=(
            "an account id any of the saga's account fields holds (`SagaType.account_fields`:"
            " a transfer's source or destination)"))] = None,
        since: Annotated[AwareDatetime | None, Query(description=(
            "started at or after this time (ISO 8601 with a time zone)"))] = None,
        until: Annotated[AwareDatetime | None, Query(description=(
            "started before this time (ISO 8601 with a time zone)"))] = None,
        limit: Limit = 50,
        offset: Annotated[int, Query(ge=0, description="rows of the listing to skip")] = 0,
) -> dict[str, Any]:
    try:
        wanted = queries.SagaFilter(
            status=status, saga_type=saga_type, business_key=key,
            definition_version=definition_version, account=account, since=since, until=until,
            limit=limit, offset=offset)
    except ValidationError as error:  # since after until: a bad parameter, not a fault
        raise RequestValidationError(
            [{**e, "loc": ("query", *e["loc"])} for e in error.errors()]) from None
    try:
        rows = await queries.search_sagas(console.database(), wanted, console.sagas)
    except ConfigurationError as error:  # a type that declares no account fields
        raise RequestValidationError([{"loc": ("query", "account"), "msg": str(error),
                                       "type": "value_error"}]) from None
    return {"sagas": _masked(console, principal, rows),
            "accounts_masked": not principal.sees_accounts,
            "offset": offset,
            "next_offset": offset + len(rows) if len(rows) == limit else None}


@router.get("/sagas/{saga_ref}", response_model=models.Saga,
            summary="one saga: its state and its timeline",
            responses={404: {"description": "no such saga, or an ambiguous id prefix"}})
async def get_saga(
        principal: Viewer, console: Ctx,
        saga_ref: Annotated[str, Path(min_length=1, max_length=500, description=(
            "a saga id, a unique prefix of one (4+ hex digits), or a business key"))],
        saga_type: Annotated[str | None, Query(alias="type", max_length=200, description=(
            "the saga type, when a business key names sagas of several types"))] = None,
) -> dict[str, Any]:
    engine = console.database()
    try:
        data = await queries.timeline(engine, saga_ref, saga_type, console.sagas)
    except NotFound:
        saga_id = await saga_id_by_prefix(engine, saga_ref)
        if saga_id is None:
            raise
        data = await queries.timeline(engine, str(saga_id), saga_type, console.sagas)
    except ConfigurationError as error:  # a business key several types share
        raise Conflict(str(error).replace("pass --type", "pass ?type=")) from error
    return {**_masked(console, principal, data), "accounts_masked": not principal.sees_accounts}


async def saga_id_of(console: Console, saga_ref: str, saga_type: str | None) -> uuid.UUID:
    """The saga a reference names: an id, a unique prefix of one, or a business key."""
    engine = console.database()
    try:
        return await queries.resolve_saga_id(engine, saga_ref, saga_type)
    except NotFound:
        saga_id = await saga_id_by_prefix(engine, saga_ref)
        if saga_id is None:
            raise
        return saga_id
    except ConfigurationError as error:  # a business key several types share
        raise Conflict(str(error).replace("pass --type", "pass ?type=")) from error


async def act(console: Console, principal: Principal, saga_ref: str, saga_type: str | None,
              action: models.ActionName, body: models.ActionRequest) -> dict[str, Any]:
    """An operator action with the token's subject as its actor (the pages call this too)."""
    saga_id = await saga_id_of(console, saga_ref, saga_type)
    sagas = (console.sagas if isinstance(console.sagas, SagaTypes)
             else SagaTypes(console.sagas.values()))
    request = ActOnSaga(OperatorAction(action.value.replace("-", "_")),
                        body.action_id or uuid.uuid4(), principal.subject, body.reason)
    result = await act_on_saga(console.database(), console.settings, sagas, saga_id, request)
    log.info("operator action %s on saga %s by %s", request.action.value, saga_id,
             principal.subject)
    return result.to_json()


@router.post("/sagas/{saga_ref}/actions/{action}", response_model=models.ActionResult,
             summary="an operator action on one saga, recorded in its history with the token's"
                     " subject as actor",
             description=(
                 "`retry-now`: start a waiting retry or send the outstanding command again,"
                 " now (a saga FAILED past its pivot: send the step that failed again)."
                 " `cancel`: a running saga compensates what it applied (refused after the"
                 " pivot). `retry-compensation`: a saga that FAILED while compensating tries"
                 " its remaining compensations again. `resolve`: close a FAILED saga as"
                 " RESOLVED. The same `action_id` sent again acts once and answers the first"
                 " result (`repeated: true`)."),
             responses={404: {"description": "no such saga"},
                        409: {"description": "the saga's state does not allow the action (the"
                              " reason says why; nothing changed), or the action id was used"
                              " for another action"}})
async def saga_action(
        principal: Operator, console: Ctx, action: models.ActionName,
        body: models.ActionRequest,
        saga_ref: Annotated[str, Path(min_length=1, max_length=500, description=(
            "a saga id, a unique prefix of one (4+ hex digits), or a business key"))],
        saga_type: Annotated[str | None, Query(alias="type", max_length=200)] = None,
) -> dict[str, Any]:
    return await act(console, principal, saga_ref, saga_type, action, body)


@router.get("/stuck", response_model=models.Stuck,
            summary="in-flight sagas past their due time, and outbox rows set aside")
async def stuck(
        principal: Viewer, console: Ctx,
        grace_s: Annotated[float, Query(ge=0, le=86400 * 30, description=(
            "seconds past its due time before a saga counts as stuck"))] = 30.0,
        limit: Limit = 100) -> dict[str, Any]:
    engine = console.database()
    data = {"sagas": await queries.stuck_sagas(engine, grace_s, limit),
            "outbox_set_aside": await queries.outbox_set_aside(engine, limit)}
    return {**_masked(console, principal, data), "accounts_masked": not principal.sees_accounts}


@router.get("/overview", response_model=models.Overview,
            summary="sagas by status and type; the last hour's throughput, p50 and p99")
async def get_overview(_: Viewer, console: Ctx) -> dict[str, Any]:
    return await overview(console.database())


@router.get("/dead-letters", response_model=models.DeadLetterList,
            summary="dead letters, most recently failed first")
async def list_dead_letters(
        principal: Viewer, console: Ctx,
        include_redriven: Annotated[bool, Query(description="also those already redriven")]
        = False,
        reason: Annotated[str | None, Query(max_length=100, pattern=r"^[A-Za-z_]+$",
                                            description="a reason code")] = None,
        limit: Limit = 50) -> dict[str, Any]:
    async with console.database().connect() as conn:
        letters = await dlq.list_dead_letters(conn, limit=limit,
                                              include_redriven=include_redriven,
                                              reason=reason.upper() if reason else None)
    return {"dead_letters": _masked(console, principal, [d.to_json() for d in letters])}


def _preview(console: Console, principal: Principal, detail: dlq.DeadLetterDetail,
             download_url: str) -> dict[str, Any]:
    """A dead letter with its payload cut to the preview size, masked for a viewer (then the
    headers and the reason too, and a payload that is not text is not shown at all)."""
    data = detail.to_json()
    payload = detail.payload
    value = payload.value
    if not principal.sees_accounts:
        mask = console.mask
        accounts = mask.values_in_text(value) if payload.encoding == "utf-8" else set()
        value = mask.text(value) if payload.encoding == "utf-8" else ""
        data = mask.json({key: item for key, item in data.items() if key != "payload"},
                         also=accounts)
        data["headers"] = [{**header, "value": mask.text(header["value"], accounts)}
                           if header["encoding"] == "utf-8" else {**header, "value": ""}
                           for header in data["headers"]]
    limit = console.settings.console_payload_preview_bytes
    if payload.encoding == "utf-8":
        shown = value.encode()[:limit].decode("utf-8", "ignore")
    else:
        shown = value[:limit // 3 * 4]  # base64 of the first `limit` bytes
    data["payload"] = {"value": shown, "encoding": payload.encoding,
                       "size_bytes": payload.size_bytes, "truncated": shown != value,
                       "download_url": download_url}
    data["accounts_masked"] = not principal.sees_accounts
    return data


@router.get("/dead-letters/{dead_letter_ref}", response_model=models.DeadLetterDetail,
            summary="one dead letter, its payload cut to a preview",
            responses={404: {"description": "no such dead letter, or an ambiguous prefix"}})
async def show_dead_letter(principal: Viewer, console: Ctx, request: Request,
                           dead_letter_ref: DeadLetterRef) -> dict[str, Any]:
    async with console.database().connect() as conn:
        # Whole: the preview is cut below, after masking, to the console's own size.
        detail = await dlq.show_dead_letter(conn, dead_letter_ref, limit=None)
    url = str(request.url_for("download_dead_letter_payload",
                              dead_letter_ref=str(detail.summary.dead_letter_id)).path)
    return _preview(console, principal, detail, url)


@router.get("/dead-letters/{dead_letter_ref}/payload", response_class=Response,
            summary="a dead letter's whole payload, as received",
            responses={200: {"content": {"application/octet-stream": {}}}})
async def download_dead_letter_payload(principal: Viewer, console: Ctx,
                                       dead_letter_ref: DeadLetterRef) -> Response:
    async with console.database().connect() as conn:
        detail = await dlq.show_dead_letter(conn, dead_letter_ref, limit=None)
    dead_letter_id = detail.summary.dead_letter_id
    if principal.sees_accounts:
        body = (detail.payload.value.encode() if detail.payload.encoding == "utf-8"
                else base64.b64decode(detail.payload.value))
    elif detail.payload.encoding == "utf-8":
        body = console.mask.text(detail.payload.value).encode()
    else:
        raise NotAllowed("this payload is not text, so the account ids in it cannot be"
                         " masked: a viewer may not download it")
    return Response(body, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="dead-letter-{dead_letter_id}.bin"'})


async def redrive(console: Console, ids: list[str] | dlq.Select, actor: str) -> dict[str, Any]:
    try:
        async with console.database().begin() as conn:
            result = await dlq.redrive(conn, ids, actor=actor)
    except ConfigurationError as error:  # the dead letter of a FAILED saga: no message
        raise Conflict(str(error)) from error
    # The record of who acted is the outbox row's header; this line is for the console's log.
    log.info("redrive by %s: %s", actor, result.describe())
    return result.to_json()


@router.post("/dead-letters/{dead_letter_ref}/redrive", response_model=models.RedriveResult,
             summary="republish one dead letter to its original topic, at most once ever",
             responses={404: {"description": "no such dead letter"},
                        409: {"description": "it records a FAILED saga: nothing to redrive"}})
async def redrive_one(principal: Operator, console: Ctx,
                      dead_letter_ref: DeadLetterRef) -> dict[str, Any]:
    result = await redrive(console, [dead_letter_ref], principal.subject)
    if result["not_found"]:
        raise NotFound(f"no dead letter with id {dead_letter_ref}")
    return result


@router.post("/dead-letters/redrive", response_model=models.RedriveResult,
             summary="redrive dead letters in bulk: the given ids, or every pending one",
             responses={409: {"description": "one of them records a FAILED saga"}})
async def redrive_bulk(principal: Admin, console: Ctx,
                       body: models.BulkRedrive) -> dict[str, Any]:
    if (body.ids is None) == (not body.all):
        raise RequestValidationError([{
            "loc": ("body",), "msg": "give either `ids` or `all: true`, not both or neither",
            "type": "value_error"}])
    return await redrive(console, body.ids if body.ids is not None else dlq.ALL_PENDING,
                          principal.subject)
