"""The web console: pages rendered on the server (Jinja2) over the API's own route functions,
under the same `require(role)` dependencies, so a page shows exactly what the API answers the
same principal (account ids masked for a viewer) and acts through the same code.

Pages: the saga list (`/sagas`), one saga with its timeline chart (`/sagas/{ref}`, its live
part re-read every 2 s from `/sagas/{ref}/live` while the saga is not terminal), the dead
letters (`/dead-letters`, `/dead-letters/{ref}`). The only script is `static/console.js`, served
from the package: no build step, nothing loaded from elsewhere (the Content-Security-Policy
says so).

**Actions** are listed in one place each: `SAGA_ACTIONS` and `DEAD_LETTER_ACTIONS`. An action
names its button, the role it needs, when it applies (from the thing's state) and what it does;
the page lists the ones that apply to the principal, each as a form that asks for a reason
(`templates/_actions.html`), and `POST /{sagas|dead-letters}/{ref}/actions/{name}` performs it
and answers the result as a fragment the page shows. A viewer sees no action at all. Adding
one (retry now, cancel, retry compensation, resolve, once the core has them as commands) is an
entry in `SAGA_ACTIONS` and its `perform` function.
"""

from __future__ import annotations

import logging
import typing
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, BeforeValidator, Field
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.console import api, models
from orchestrator.console.auth import Principal, Role
from orchestrator.console.security import Console, console_of, require
from orchestrator.console.timeline import TERMINAL, format_ms, layout
from orchestrator.core.definition import SagaDefinition
from orchestrator.errors import Conflict, NotAllowed, NotFound
from orchestrator.ops import queries
from orchestrator.ops.overview import overview

log = logging.getLogger(__name__)
HERE: Final = Path(__file__).parent
STATIC_DIR: Final = HERE / "static"
LIVE_INTERVAL_MS: Final = 2000
templates = Jinja2Templates(directory=HERE / "templates")

Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Ctx = Annotated[Console, Depends(console_of)]
SagaRef = Annotated[str, PathParam(min_length=1, max_length=500)]
DeadLetterRef = Annotated[str, PathParam(min_length=4, max_length=36)]

router = APIRouter(include_in_schema=False)
# An empty field of a filter form means "any".
Blank = BeforeValidator(lambda value: None if value == "" else value)


# The actions: the one list per kind of thing the pages act on.

class ActionForm(BaseModel):
    """What an action's form sends: why, in the person's words, and an id made when the form
    was rendered (a double click sends the same id twice; actions that record it act once)."""

    reason: str = Field(min_length=3, max_length=1000)
    action_id: uuid.UUID


Perform = Callable[[Console, Principal, str, ActionForm], Awaitable[str]]


@dataclass(frozen=True)
class Action:
    name: str  # in the URL: /{kind}/{ref}/actions/{name}
    label: str  # the button
    explain: str  # one line next to the form: what it will do
    role: Role
    applies: Callable[[Mapping[str, Any]], bool]  # given the thing as the API answers it
    perform: Perform  # does it; answers the result in words
    confirm: str = ""  # asked in the browser before sending, when set
    reason_kept: str = "on the saga's timeline, with your name"  # where the reason goes
    # Set when `perform` asks the engine, which refuses what the state does not allow (409,
    # with its reason) and answers a repeat of the same action id with the first result: then
    # `applies` only picks the forms to show, and a double click is not refused by it.
    decided_by_engine: bool = False


async def _redrive(console: Console, principal: Principal, ref: str, form: ActionForm) -> str:
    result = await api.redrive(console, [ref], principal.subject)
    # The actor travels with the republished record; the reason is the console log's.
    log.info("dead letter %s redrive by %s (action %s): %s", ref, principal.subject,
             form.action_id, form.reason)
    if result["not_found"]:
        raise NotFound(f"no dead letter with id {ref}")
    if result["already_redriven"]:
        return f"Already redriven before: nothing was sent again (asked by {result['actor']})."
    outbox = ", ".join(str(i) for i in result["outbox_ids"])
    return (f"Redriven by {result['actor']}: the original record goes back to its topic"
            f" (outbox row {outbox}), once.")


REDRIVE: Final = Action(
    name="redrive", label="Redrive",
    explain="Republish the original record to its topic, once ever.",
    role=Role.OPERATOR,
    applies=lambda letter: letter.get("redriven_at") is None and letter.get("stage") != "recovery",
    perform=_redrive,
    reason_kept="in the console's log with your name; your name also travels with the record")

def _saga_action(name: models.ActionName) -> Perform:
    async def perform(console: Console, principal: Principal, ref: str,
                      form: ActionForm) -> str:
        result = await api.act(console, principal, ref, None, name,
                               models.ActionRequest(reason=form.reason,
                                                    action_id=form.action_id))
        said = (f"Already done: this form was sent before (by {result['actor']})."
                if result["repeated"] else f"Done by {result['actor']}.")
        said += f" The saga is {result['status']} now; recorded: {', '.join(result['events'])}"
        if result["commands"]:
            said += f"; {result['commands']} command(s) sent"
        if result["outcome"]:
            said += f"; its {result['outcome']['outcome']} outcome event published"
        return said + ". Its timeline shows it."
    return perform


def _failed_compensating(saga: Mapping[str, Any]) -> bool:
    """A FAILED saga whose failure was a compensation's (the core decides; this only picks the
    button to offer)."""
    failed = [e for e in saga.get("events", ()) if e.get("type") == "SagaFailed"]
    return (saga.get("status") == "FAILED" and bool(failed)
            and str(failed[-1].get("payload", {}).get("reason", "")).startswith("compensation"))


def _failed_forward(saga: Mapping[str, Any]) -> bool:
    """A FAILED saga whose failure was a forward step's, past its pivot (retry now sends it
    again)."""
    return saga.get("status") == "FAILED" and not _failed_compensating(saga)


# The saga actions of orchestrator/ops/actions.py: the core refuses, with its reason, what the
# saga's state does not allow (cancel after the pivot, say); `applies` only picks the buttons.
SAGA_ACTIONS: tuple[Action, ...] = (
    Action("retry-now", "Retry now",
           "Start the waiting retry, or send the outstanding command again, now; a saga that"
           " failed past its pivot sends the step that failed again and goes on.",
           Role.OPERATOR,
           lambda saga: saga.get("status") in ("RUNNING", "COMPENSATING") or _failed_forward(saga),
           _saga_action(models.ActionName.RETRY_NOW), decided_by_engine=True),
    Action("cancel", "Cancel",
           "Turn back: compensate what it applied, as if its current step had failed for good"
           " (refused once the pivot step succeeded).",
           Role.OPERATOR, lambda saga: saga.get("status") == "RUNNING",
           _saga_action(models.ActionName.CANCEL), decided_by_engine=True,
           confirm="Cancel this saga and compensate what it applied?"),
    Action("retry-compensation", "Retry compensation",
           "Try the compensation that failed, then the rest, again.",
           Role.OPERATOR, _failed_compensating,
           _saga_action(models.ActionName.RETRY_COMPENSATION), decided_by_engine=True),
    Action("resolve", "Resolve",
           "Close this FAILED saga as RESOLVED, once what it left was set right by hand.",
           Role.OPERATOR, lambda saga: saga.get("status") == "FAILED",
           _saga_action(models.ActionName.RESOLVE), decided_by_engine=True,
           confirm="Close this saga as RESOLVED? It never changes again."),
)
DEAD_LETTER_ACTIONS: tuple[Action, ...] = (REDRIVE,)
_ACTIONS: Final[dict[str, tuple[Action, ...]]] = {"sagas": SAGA_ACTIONS,
                                                  "dead-letters": DEAD_LETTER_ACTIONS}


def allowed_actions(actions: Sequence[Action], thing: Mapping[str, Any],
                    principal: Principal) -> list[Action]:
    return [a for a in actions if principal.role >= a.role and a.applies(thing)]


# Rendering helpers, also registered as template filters.

def when(value: str | datetime | None, precise: bool = False) -> str:
    """`2026-12-05 10:12:03 UTC` (with milliseconds when `precise`)."""
    if value is None:
        return ""
    at = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S") + (f".{at.microsecond // 1000:03d}"
                                               if precise else "") + " UTC"


def money(saga_input: Mapping[str, Any] | None) -> str:
    """A start message's amount with its currency, when it has one (the engine is generic:
    any saga type whose start message has an `amount` gets it shown)."""
    if not saga_input or "amount" not in saga_input:
        return ""
    return f"{saga_input['amount']} {saga_input.get('currency', '')}".strip()


def summary(console: Console, saga_type: str, saga_input: Mapping[str, Any] | None) -> str:
    """The start message in a line, by the saga type's own `describe` when it has one."""
    if not saga_input:
        return ""
    known = console.sagas.get(saga_type)
    if known is not None and known.describe is not None:
        try:
            return known.describe(saga_input)
        except (KeyError, TypeError, ValueError):
            pass
    return " ".join(f"{k}={v}" for k, v in sorted(saga_input.items()) if k != "schema_version")


def _result_words(result: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" if not isinstance(v, bool) else k for k, v in result.items())


templates.env.filters.update(when=when, ms=format_ms, result_words=_result_words)
templates.env.globals.update(live_interval_ms=LIVE_INTERVAL_MS, new_id=uuid.uuid4, statuses=(
    typing.get_args(typing.get_args(models.SagaStatus)[0])))


def _page(request: Request, name: str, principal: Principal, console: Console,
          status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {
        "principal": principal, "masked": not principal.sees_accounts,
        "saga_types": sorted(console.sagas), **context}, status_code=status_code)


# The pages.

@router.get("/")
async def home() -> RedirectResponse:
    return RedirectResponse("/sagas", status_code=303)


@router.get("/sagas", response_class=HTMLResponse)
async def saga_list(
        request: Request, principal: Viewer, console: Ctx,
        status: Annotated[models.SagaStatus | None, Blank, Query()] = None,
        saga_type: Annotated[str | None, Blank, Query(alias="type", max_length=200)] = None,
        definition_version: Annotated[int | None, Blank, Query(ge=1)] = None,
        key: Annotated[str | None, Blank, Query(max_length=500)] = None,
        account: Annotated[str | None, Blank, Query(max_length=200)] = None,
        since: Annotated[str | None, Blank, Query(max_length=40)] = None,
        until: Annotated[str | None, Blank, Query(max_length=40)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0) -> HTMLResponse:
    listed = await api.list_sagas(
        principal, console, status=status, saga_type=saga_type, key=key,
        definition_version=definition_version, account=account,
        since=_point_in_time("since", since), until=_point_in_time("until", until),
        limit=limit, offset=offset)
    rows = [{**row, "summary": summary(console, row["saga_type"], row["input"]),
             "money": money(row["input"])} for row in listed["sagas"]]
    counts = (await overview(console.database()))["by_status"]
    filters = {"status": status or "", "type": saga_type or "", "key": key or "",
               "account": account or "", "since": since or "", "until": until or "",
               "definition_version": definition_version or "", "limit": limit}
    next_page = None
    if listed["next_offset"] is not None:
        next_page = "/sagas?" + urlencode({**{k: v for k, v in filters.items() if v},
                                           "offset": listed["next_offset"]})
    return _page(request, "sagas.html", principal, console, rows=rows, counts=counts,
                 filters=filters, offset=offset, next_page=next_page)


def _point_in_time(name: str, value: str | None) -> datetime | None:
    """A filter's time as the CLI takes it: ISO 8601 (UTC without an offset) or an age such
    as `15m`, `2h`, `3d`; a bad one is a 422 naming the field."""
    if value is None:
        return None
    try:
        return queries.parse_time(value, datetime.now(UTC))
    except ValueError as error:
        raise RequestValidationError([{"loc": ("query", name), "msg": str(error),
                                       "type": "value_error"}]) from None


async def _saga_view(console: Console, principal: Principal, saga_ref: str,
                     saga_type: str | None) -> dict[str, Any]:
    saga = await api.get_saga(principal, console, saga_ref, saga_type)
    saga_input = next((e["payload"].get("input") for e in saga["events"]
                       if e["type"] == "SagaStarted"), None)
    chart = layout(saga["events"], saga["status"], datetime.now(UTC),
                   _definition(console, saga["saga_type"], saga["definition_version"]))
    failure = next((e for e in reversed(saga["events"])
                    if e["type"] in ("SagaFailed", "SagaCompensated", "SagaRejected")), None)
    return {"saga": saga, "chart": chart, "input": saga_input, "money": money(saga_input),
            "summary": summary(console, saga["saga_type"], saga_input), "failure": failure,
            "terminal": saga["status"] in TERMINAL}


def _definition(console: Console, saga_type: str, version: int | None) -> SagaDefinition | None:
    known = console.sagas.get(saga_type)
    if known is None or version is None or version not in known.versions:
        return None
    return known.definition(version)


@router.get("/sagas/{saga_ref}", response_class=HTMLResponse)
async def saga_page(request: Request, principal: Viewer, console: Ctx, saga_ref: SagaRef,
                    saga_type: Annotated[str | None, Query(alias="type", max_length=200)] = None,
                    ) -> HTMLResponse:
    view = await _saga_view(console, principal, saga_ref, saga_type)
    actions = allowed_actions(SAGA_ACTIONS, view["saga"], principal)
    return _page(request, "saga.html", principal, console, actions=actions,
                 action_base=f"/sagas/{view['saga']['saga_id']}/actions", **view)


@router.get("/sagas/{saga_ref}/live", response_class=HTMLResponse)
async def saga_live(request: Request, principal: Viewer, console: Ctx, saga_ref: SagaRef,
                    ) -> HTMLResponse:
    """The part of the saga page that changes while it runs."""
    view = await _saga_view(console, principal, saga_ref, None)
    return _page(request, "_saga_live.html", principal, console, **view)


@router.get("/dead-letters", response_class=HTMLResponse)
async def dead_letter_list(
        request: Request, principal: Viewer, console: Ctx,
        include_redriven: Annotated[bool, Query()] = False,
        reason: Annotated[str | None, Blank, Query(max_length=100, pattern=r"^[A-Za-z_]+$")
                          ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> HTMLResponse:
    listed = await api.list_dead_letters(principal, console, include_redriven, reason or None,
                                         limit)
    return _page(request, "dead_letters.html", principal, console,
                 letters=listed["dead_letters"],
                 filters={"include_redriven": include_redriven, "reason": reason or "",
                          "limit": limit})


@router.get("/dead-letters/{dead_letter_ref}", response_class=HTMLResponse)
async def dead_letter_page(request: Request, principal: Viewer, console: Ctx,
                           dead_letter_ref: DeadLetterRef) -> HTMLResponse:
    letter = await api.show_dead_letter(principal, console, request, dead_letter_ref)
    actions = allowed_actions(DEAD_LETTER_ACTIONS, letter, principal)
    return _page(request, "dead_letter.html", principal, console, letter=letter,
                 actions=actions, action_base=f"/dead-letters/{letter['dead_letter_id']}/actions")


@router.post("/{kind}/{ref}/actions/{name}", response_class=HTMLResponse)
async def act(request: Request, principal: Operator, console: Ctx,
              kind: Literal["sagas", "dead-letters"], ref: Annotated[str, PathParam(
                  min_length=4, max_length=500)],
              name: Annotated[str, PathParam(max_length=50)], form: ActionForm) -> HTMLResponse:
    """Perform one action of the lists above (for a role below it, 403 like the API)."""
    action = next((a for a in _ACTIONS[kind] if a.name == name), None)
    if action is None:
        raise NotFound(f"there is no action {name!r} on {kind}")
    if principal.role < action.role:
        raise NotAllowed(f"{principal.subject} has the {principal.role.label} role;"
                         f" {action.label} needs {action.role.label}")
    thing: Mapping[str, Any]
    if kind == "sagas":
        thing = await api.get_saga(principal, console, ref, None)
        ref = str(thing["saga_id"])
    else:
        thing = await api.show_dead_letter(principal, console, request, ref)
        ref = str(thing["dead_letter_id"])
    if not action.decided_by_engine and not action.applies(thing):
        raise Conflict(f"{action.label} does not apply to this {kind.rstrip('s')} in its"
                       " present state: reload the page to see it")
    message = await action.perform(console, principal, ref, form)
    return _page(request, "_result.html", principal, console, message=message,
                 action=action, reason=form.reason)


# Error pages for a browser; problem details for everything else.

def wants_page(request: Request) -> bool:
    path = request.url.path
    return (request.method == "GET" and not path.startswith(("/api/", "/dev/", "/static/"))
            and not path.endswith("/live") and "text/html" in request.headers.get("accept", ""))


def error_page(request: Request, status: int, title: str, detail: str,
               headers: Mapping[str, str] | None = None) -> Response | None:
    """The error as a page, for a browser asking for one (else None: problem details)."""
    if not wants_page(request):
        return None
    dev = request.app.state.dev_login
    return templates.TemplateResponse(request, "error.html", {
        "status": status, "title": title, "detail": detail, "principal": None,
        "dev_login": dev}, status_code=status, headers=dict(headers or {}))


class SecurityHeaders:
    """Pages load only the console's own script and style, may not be framed, leak no URL."""

    POLICY: Final = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' "
                     "data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
                     "frame-ancestors 'none'")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", self.POLICY)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
            await send(message)

        await self.app(scope, receive, with_headers)

