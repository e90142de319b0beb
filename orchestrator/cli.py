"""`saga`: the command line on-call engineers live in. Every printing command takes `--json`.

Exit codes: 0 ok; 1 an invariant violated or the demo did not finish clean; 2 bad usage or
configuration; 3 not found (for `dlq redrive`: some id was not found; the others were redriven).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.application import load_application
from orchestrator.core.saga import SagaStatus
from orchestrator.errors import ConfigurationError, Conflict, NotFound, SagaError
from orchestrator.logs import configure_logging, set_worker
from orchestrator.settings import Settings, worker_name

if TYPE_CHECKING:
    # Imported when a command needs it: the workers never load the console's web stack.
    from orchestrator.console.server import ConsoleServer


def _engine(settings: Settings) -> Any:
    from orchestrator.postgres.store import create_engine

    if not settings.database_url:
        raise ConfigurationError(
            "SAGA_DATABASE_URL is not set: point it at the event store "
            "(`saga dev` prints the embedded one's URL)")
    return create_engine(settings.database_url, pool_size=2)


def _json_default(value: Any) -> Any:
    """What JSON cannot spell itself: times in ISO 8601, anything else (ids, amounts) as text."""
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _print(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2, default=_json_default) if as_json else render(data))


async def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    kind = args.kind if args.kind != "participant" else f"participant:{args.name}"
    if args.kind == "participant" and not args.name:
        raise ConfigurationError("usage: saga worker participant NAME (risk, ledger, notify)")
    settings = settings.model_copy(update={"worker_name": worker_name(kind, settings)})
    set_worker(settings.worker_name)
    # The producer first, before the heavy imports of `orchestrator.workers.runner`: it gets its
    # producer id while they run (see `orchestrator.kafka.producer`), so a restarted worker's first
    # publish does not wait for it. `run_worker` takes it over and closes it.
    producer = None
    if settings.kafka_bootstrap:
        from orchestrator.kafka.producer import KafkaProducer

        producer = KafkaProducer(settings, settings.worker_name)
    from orchestrator.metrics import configure_metrics
    from orchestrator.tracing import configure_tracing

    try:
        meters = configure_metrics(settings.worker_name)
        tracer_provider = configure_tracing(settings.worker_name)
    except ConfigurationError:
        if producer is not None:
            producer.close()
        raise
    from orchestrator.workers.runner import run_worker

    stop = await _stop_on_signals()
    try:
        await run_worker(kind, settings, stop, producer)
    finally:
        if meters is not None:
            meters.shutdown()  # exports what was counted since the last export
        if tracer_provider is not None:
            tracer_provider.shutdown()  # exports the spans still queued
    return 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    application = load_application(settings.application)
    if application.demo is None:
        raise ConfigurationError(f"application {application.name!r} has no demo")
    return await application.demo(settings, args)


def _dev_log_dir(wanted: str | None) -> Path:
    """Where `saga dev` keeps the logs: `--logs DIR`, else a folder named for the start time
    under `.saga/` (which git ignores), so that one run's logs never mix with another's."""
    if wanted:
        return Path(wanted).resolve()
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return (Path(".saga") / f"dev-{started}-{os.getpid()}" / "logs").resolve()


def _keep_server_logs(stack_root: Path, logs: Path) -> None:
    """Copy the embedded servers' own logs (PostgreSQL's, the broker's) next to the workers'
    before the stack removes its folder with its data."""
    for log in stack_root.glob("*.log"):
        with contextlib.suppress(OSError):
            shutil.copyfile(log, logs / log.name)


async def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.console.server import ConsoleServer
    from orchestrator.dev.embedded import EmbeddedStack, settings_for
    from orchestrator.dev.processes import WorkerProcesses
    from orchestrator.postgres.store import create_engine, migrate

    logs = _dev_log_dir(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    stack = EmbeddedStack(keep_files=False).start()
    settings = settings_for(stack, settings)
    engine = create_engine(stack.postgres.url)
    workers = WorkerProcesses(settings, logs)
    try:
        application = load_application(settings.application)
        await migrate(engine, application.migrations)
        workers.start()
        await workers.wait_ready(engine)
        # Before saying it is ready: a script that reads that line and signals at once stops
        # it cleanly, not by a KeyboardInterrupt.
        stop = await _stop_on_signals()
        console = ConsoleServer(settings, engine, application.saga_types,
                                port=args.console_port, dev=True)
        async with console, contextlib.AsyncExitStack() as cleanup:
            info = {"kafka_bootstrap": stack.broker.bootstrap,
                    "database_url": stack.postgres.url,
                    "workers": {k: p.pid for k, p in workers.processes.items()},
                    "logs": str(logs), **_dev_console(console, cleanup)}
            if args.json:
                print(json.dumps(info), flush=True)
            else:
                print(f"kafka bootstrap   {info['kafka_bootstrap']}\n"
                      f"database url      {info['database_url']}\n"
                      f"logs              {info['logs']} (kept when stopped)\n"
                      f"console           {info['console_url']}\n"
                      f"console login     {info['login_url']}\n"
                      f"dev tokens        {info['token_command']}\n\n"
                      f"export SAGA_KAFKA_BOOTSTRAP={info['kafka_bootstrap']} "
                      f"SAGA_DATABASE_URL={info['database_url']}\n"
                      "running; Ctrl-C stops everything", flush=True)
            await _until_stopped(stop, console)
    finally:
        workers.stop()
        await engine.dispose()
        _keep_server_logs(stack.root, logs)
        stack.stop()
        # Said on every way out, a failed start too: that is when the logs are wanted most.
        if args.json:
            print(json.dumps({"stopped": True, "logs": str(logs)}), flush=True)
        else:
            print(f"stopped; the workers' and servers' logs are kept in {logs}", flush=True)
    return 0


def _dev_console(server: ConsoleServer, cleanup: contextlib.AsyncExitStack) -> dict[str, str]:
    """What a person or a script needs to use a console started with the development identity
    provider; its state file (for `saga dev token`) lives as long as the server."""
    from orchestrator.console.devidp import dev_state_path, write_dev_state

    assert server.dev is not None
    state = dev_state_path()
    write_dev_state(state, server.dev)
    # The login key dies with the server that made it.
    cleanup.callback(state.unlink, missing_ok=True)
    return {"console_url": server.url, "login_url": server.dev.login_url(),
            "dev_state": str(state), "issuer": server.dev.issuer,
            "token_command": "saga dev token --role viewer|operator|admin"}


async def _until_stopped(stop: asyncio.Event, server: ConsoleServer) -> None:
    """Until a signal, or until the console's server ends on its own (its error raised)."""
    waiting = asyncio.create_task(stop.wait())
    serving = asyncio.create_task(server.wait())
    await asyncio.wait({waiting, serving}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if serving.done():
        serving.result()


async def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.console.server import ConsoleServer, require_identity_provider

    # Refused before anything is connected or bound: no door opens without an issuer.
    require_identity_provider(settings, dev=args.dev)
    engine = _engine(settings)
    try:
        server = ConsoleServer(settings, engine,
                               load_application(settings.application).saga_types,
                               host=args.host, port=args.port, dev=args.dev)
        async with server, contextlib.AsyncExitStack() as stack:
            info: dict[str, Any] = {"console_url": server.url,
                                    "api": f"{server.url}/api/v1",
                                    "openapi": f"{server.url}/api/openapi.json"}
            if server.dev is not None:
                info.update(_dev_console(server, stack))
            if args.json:
                print(json.dumps(info), flush=True)
            else:
                lines = [f"console      {info['console_url']}", f"api          {info['api']}"]
                if server.dev is not None:
                    lines += [f"dev login    {info['login_url']}",
                              "dev tokens   saga dev token --role viewer|operator|admin",
                              "(development identity provider: a key made at start, loopback"
                              " only)"]
                print("\n".join(lines) + "\nrunning; Ctrl-C stops it", flush=True)
            await _until_stopped(await _stop_on_signals(), server)
    finally:
        await engine.dispose()
    return 0


async def cmd_dev_token(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.console.auth import Role
    from orchestrator.console.devidp import dev_state_path, dev_token_from_state

    state = args.state or dev_state_path()
    token = dev_token_from_state(state, Role.named(args.role), args.subject)
    _print({"access_token": token, "token_type": "Bearer", "role": args.role}, args.json,
           lambda data: str(data["access_token"]))
    return 0


async def cmd_timeline(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.ops.queries import render_timeline, timeline

    engine = _engine(settings)
    try:
        sagas = load_application(settings.application).saga_types
        _print(await timeline(engine, args.id, args.type, sagas), args.json, render_timeline)
    finally:
        await engine.dispose()
    return 0


async def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from orchestrator.ops.queries import SagaFilter, search_sagas, steps_label

    try:
        wanted = SagaFilter(status=args.status, saga_type=args.type,
                            definition_version=args.definition_version, business_key=args.key,
                            account=args.account, since=args.since, until=args.until,
                            limit=args.limit, offset=args.offset)
    except ValidationError as error:
        raise ConfigurationError("; ".join(
            f"{'--' + str(e['loc'][0]).replace('_', '-') + ': ' if e['loc'] else ''}"
            f"{e['msg'].removeprefix('Value error, ')}" for e in error.errors())) from None
    engine = _engine(settings)
    try:
        rows = await search_sagas(engine, wanted,
                                  load_application(settings.application).saga_types)
    finally:
        await engine.dispose()

    def render(rows: list[dict[str, Any]]) -> str:
        type_width = max([len("type"), *(len(r["saga_type"]) for r in rows)])
        key_width = max([len("business key"), *(len(r["business_key"]) for r in rows)])
        lines = [f"{'saga id':<36}  {'type':<{type_width}} {'business key':<{key_width}} "
                 f"{'def':>3}  {'status':<12} {'step':<8} {'started (UTC)':<19}  updated (UTC)"]
        lines += [f"{r['saga_id']:<36}  {r['saga_type']:<{type_width}} "
                  f"{r['business_key']:<{key_width}} "
                  f"{'v' + str(r['definition_version']) if r['definition_version'] else '':>3}  "
                  f"{r['status']:<12} {steps_label(r):<8} {_utc_text(r['created_at']):<19}  "
                  f"{_utc_text(r['updated_at'])}"
                  for r in rows]
        if len(rows) == wanted.limit:
            lines.append(f"(a full page of {wanted.limit}: the next starts at"
                         f" --offset {wanted.offset + wanted.limit})")
        return "\n".join(lines)

    _print(rows, args.json, render)
    return 0


def _utc_text(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


async def cmd_stuck(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.ops.queries import outbox_set_aside, steps_label, stuck_sagas

    engine = _engine(settings)
    try:
        data = {"sagas": await stuck_sagas(engine, args.grace, args.limit),
                "outbox_set_aside": await outbox_set_aside(engine, args.limit)}
    finally:
        await engine.dispose()

    def render(data: dict[str, list[dict[str, Any]]]) -> str:
        rows = data["sagas"]
        if not rows:
            lines = [f"no saga is more than {args.grace:g} s past its due time"]
        else:
            lines = [f"{'saga id':<36}  {'status':<12} {'step':<8} {'dir':<10} {'att':>3} "
                     f"{'overdue s':>9}"]
            lines += [f"{r['saga_id']:<36}  {r['status']:<12} {steps_label(r):<8} "
                      f"{r['direction'] or '':<10} {r['attempt']:>3} {r['overdue_s']:>9}"
                      for r in rows]
            lines.append("is `saga worker recovery` running and reaching the broker? "
                         "see docs/operations/runbook.md")
        if data["outbox_set_aside"]:
            lines.append("outbox rows set aside unpublished (the broker refused them; see "
                         "docs/operations/runbook.md):")
            lines += [f"  outbox {r['outbox_id']} {r['topic']} saga {r['saga_id'] or '-'} "
                      f"attempts={r['attempts']} set aside {r['set_aside_at'][:19]}: "
                      f"{r['last_error']}" for r in data["outbox_set_aside"]]
        return "\n".join(lines)

    _print(data, args.json, render)
    # Only a stuck saga fails the command: a set-aside row is listed (and counted by the
    # `saga.outbox.set_aside` metric) but stays until an operator deals with its cause.
    return 1 if data["sagas"] else 0


async def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.ops.checker import check, check_topic

    if args.against_topic and not settings.kafka_bootstrap:
        raise ConfigurationError("--against-topic reads the start topics: set "
                                 "SAGA_KAFKA_BOOTSTRAP (and SAGA_TOPIC_PREFIX, if any)")
    engine = _engine(settings)
    application = load_application(settings.application)
    try:
        report = await check(engine, application, expect_quiescent=args.quiescent)
        data = report.to_json()
        if args.against_topic:
            assert settings.kafka_bootstrap

            def progress(read: int, total: int) -> None:
                print(f"  read {read} of about {total} records", file=sys.stderr, flush=True)

            topics = []
            for saga_type in application.sagas:  # each saga type's start topic
                topic = await check_topic(engine, settings.kafka_bootstrap,
                                          settings.topic(saga_type.start_topic), saga_type,
                                          args.grace, progress)
                report.checks.append(topic.check())
                topics.append(topic.to_json())
            data = {**report.to_json(), "topics": topics}
    finally:
        await engine.dispose()

    def render(data: dict[str, Any]) -> str:
        lines = [f"{'ok' if c['ok'] else 'VIOLATED':<9} {c['invariant']}  {c['name']}"
                 + (f"\n            {c['detail']}" if c["detail"] and not c["ok"] else "")
                 for c in data["checks"]]
        for finding in data["findings"]:
            lines.append(f"{'FINDING':<9} {finding['invariant']}  {finding['name']}: "
                         f"{finding['count']} (not a violation; see docs/operations/runbook.md)")
            lines += [f"            outbox {row['outbox_id']} {row['topic']} attempts="
                      f"{row['attempts']}: {row['last_error']}" for row in finding["items"][:10]]
        lines.append("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(data["counts"].items())))
        for t in data.get("topics", ()):
            lines.append(f"topic {t['topic']} ({t['saga_type']}): {t['records']} records read, "
                         f"{t['missing']} with neither a saga nor a dead letter, "
                         f"{t['too_recent']} too recent to judge, {t['unread_key_known']} never "
                         "read but their business key has a saga")
            lines += [f"  missing  partition {m['partition']} offset {m['offset']} key "
                      f"{m['business_key'] or '- (undecodable)'} "
                      f"{'consumed, led nowhere' if m['consumed'] else 'never read'}"
                      for m in t["missing_sample"]]
        return "\n".join(lines)

    _print(data, args.json, render)
    return 0 if report.ok else 1


async def cmd_outbox_retry(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.postgres.store import retry_set_aside

    engine = _engine(settings)
    try:
        async with engine.begin() as conn:
            retried = await retry_set_aside(conn, args.ids)
    finally:
        await engine.dispose()
    not_set_aside = sorted(set(args.ids) - set(retried))
    data = {"retried": sorted(retried), "not_set_aside": not_set_aside}
    _print(data, args.json, lambda d: f"given back to the relay: {d['retried'] or 'none'}; "
           f"not set aside (unknown, published or already retried): {d['not_set_aside'] or 'none'}")
    return 3 if not_set_aside else 0


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.postgres.store import migrate

    engine = _engine(settings)
    try:
        applied = await migrate(engine, load_application(settings.application).migrations)
    finally:
        await engine.dispose()
    _print({"applied": applied}, args.json, lambda d: "applied: " + (", ".join(d["applied"])
                                                                     or "nothing (up to date)"))
    return 0


async def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.ops.dlq import list_dead_letters, render_list

    engine = _engine(settings)
    try:
        async with engine.connect() as conn:
            letters = await list_dead_letters(conn, limit=args.limit, include_redriven=args.all,
                                              reason=args.reason)
    finally:
        await engine.dispose()
    if args.json:
        _print([letter.to_json() for letter in letters], True, str)
    else:
        print(render_list(letters))
    return 0


def _write_new_file(path: str, data: bytes) -> str:
    """Write `data` to `path`, which must not exist yet (nothing is ever overwritten); returns
    its absolute path."""
    try:
        with open(path, "xb") as out:
            out.write(data)
    except OSError as error:
        raise ConfigurationError(f"--out {path}: {error.strerror or error}"
                                 " (it must name a new file)") from None
    return os.path.abspath(path)


async def cmd_dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.ops.dlq import SHOW_MAX_BYTES, render_detail, show_dead_letter

    engine = _engine(settings)
    try:
        async with engine.connect() as conn:
            detail = await show_dead_letter(conn, args.id, None if args.full else SHOW_MAX_BYTES)
    finally:
        await engine.dispose()
    data = detail.to_json()
    if args.out:
        data["payload_file"] = _write_new_file(args.out, detail.original_payload)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(render_detail(detail))
        if args.out:
            print(f"payload written to {data['payload_file']} "
                  f"({detail.payload.size_bytes} bytes)")
    return 0


def _default_actor() -> str:
    """Who runs the command, for the record a redrive leaves: $USER, else the login name."""
    actor = os.environ.get("USER")
    if not actor:
        with contextlib.suppress(Exception):  # no such variable and no passwd entry
            actor = getpass.getuser()
    return actor or ""


async def cmd_dlq_redrive(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.ops.dlq import ALL_PENDING, redrive

    if bool(args.ids) == args.all:
        raise ConfigurationError("usage: saga dlq redrive (ID... | --all): give dead letter ids"
                                 " or --all, not both")
    actor = (args.actor if args.actor is not None else _default_actor()).strip()
    if not actor:
        raise ConfigurationError("who is redriving? $USER is not set: pass --actor NAME")
    engine = _engine(settings)
    try:
        # One transaction: the dead letters are marked redriven exactly when their outbox rows
        # are written; the relay publishes those rows after this commits.
        async with engine.begin() as conn:
            result = await redrive(conn, ALL_PENDING if args.all else args.ids, actor=actor)
    finally:
        await engine.dispose()

    def render(_: Any) -> str:
        lines = [result.describe()]
        lines += [f"  redriven          {i}" for i in result.redriven]
        lines += [f"  already redriven  {i}" for i in result.already_redriven]
        lines += [f"  not found         {i}" for i in result.not_found]
        return "\n".join(lines)

    _print(result.to_json(), args.json, render)
    if result.not_found:
        print(f"saga: no dead letter with id {', '.join(result.not_found)}", file=sys.stderr)
        return 3
    return 0


async def cmd_resolve(args: argparse.Namespace, settings: Settings) -> int:
    return await _act(args, settings, "resolve", args.note if args.note is not None
                      else args.reason)


async def cmd_retry_now(args: argparse.Namespace, settings: Settings) -> int:
    return await _act(args, settings, "retry_now", args.reason)


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    return await _act(args, settings, "cancel", args.reason)


async def cmd_retry_compensation(args: argparse.Namespace, settings: Settings) -> int:
    return await _act(args, settings, "retry_compensation", args.reason)


async def _act(args: argparse.Namespace, settings: Settings, action: str,
               reason: str | None) -> int:
    """An operator action (orchestrator/ops/actions.py) with the operating system user as its
    actor, refused (exit 2) before anything connects when there is no actor or no reason."""
    from orchestrator.core.saga import ActOnSaga, OperatorAction
    from orchestrator.ops.actions import act_on_saga
    from orchestrator.ops.queries import resolve_saga_id

    actor = (getattr(args, "actor", None) or _default_actor()).strip()
    if not actor:
        raise ConfigurationError("who is acting? $USER is not set"
                                 + (": pass --actor NAME" if action == "resolve" else ""))
    if not (reason or "").strip():
        raise ConfigurationError("say why (--reason), e.g. the incident ticket")
    assert reason is not None
    request = ActOnSaga(OperatorAction(action), args.action_id or uuid.uuid4(), actor, reason)
    sagas = load_application(settings.application).saga_types
    engine = _engine(settings)
    try:
        saga_id = await resolve_saga_id(engine, args.id, args.type)
        # One transaction: the events, the projection, the commands' and outcome's outbox
        # rows; the relay publishes them after the commit.
        result = await act_on_saga(engine, settings, sagas, saga_id, request)
    finally:
        await engine.dispose()
    data = result.to_json()
    if action == "resolve":
        data["resolved_by"] = result.actor  # as `saga resolve --json` always said

    def render(r: dict[str, Any]) -> str:
        line = (f"saga {r['saga_id']} ({r['saga_type']} {r['business_key']}):"
                f" {action.replace('_', ' ')} by {r['actor']}"
                f"{' (already done: this action id was used before)' if r['repeated'] else ''};"
                f" now {r['status']}; recorded {', '.join(r['events'])}")
        if r["commands"]:
            line += f"; {r['commands']} command(s) queued"
        if r["outcome"]:
            line += f"; outcome event {r['outcome']['event_id']} queued"
        return line

    _print(data, args.json, render)
    return 0


# Argument types: a bad value is refused by argparse (usage, the argument named, exit 2)
# before anything connects, never by the database (a raw traceback).

def _integer(value: str, low: int, high: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < low or (high is not None and number > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise argparse.ArgumentTypeError(f"must be {bounds}, not {number}")
    return number


def _positive_int(value: str) -> int:
    return _integer(value, 1)


def _page_size(value: str) -> int:
    from orchestrator.ops.queries import SEARCH_LIMIT_MAX

    return _integer(value, 1, SEARCH_LIMIT_MAX)


def _non_negative_int(value: str) -> int:
    return _integer(value, 0)


def _non_negative_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, not {value}")
    return seconds


def _point_in_time(value: str) -> datetime:
    from orchestrator.ops.queries import parse_time

    try:
        return parse_time(value, datetime.now(UTC))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _reason_code(value: str) -> str:
    from schemas import RejectionCode

    code = value.strip().upper()
    if code not in RejectionCode.__members__.values():
        raise argparse.ArgumentTypeError(
            f"no reason code {value!r}; the codes: {', '.join(c.value for c in RejectionCode)}")
    return code


def _add_dlq_parser(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="dead letters: list, show, redrive exactly once")
    commands = dlq.add_subparsers(dest="dlq_command", required=True)

    ls = commands.add_parser("list", help="dead letters, most recently failed first")
    ls.add_argument("--all", action="store_true", help="include those already redriven")
    ls.add_argument("--reason", type=_reason_code, metavar="CODE",
                    help="only this reason code, in any case, e.g. UNKNOWN_CURRENCY")
    ls.add_argument("--limit", type=_positive_int, default=50)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=cmd_dlq_list)

    show = commands.add_parser("show", help="every field of one dead letter, headers, payload")
    show.add_argument("id", help="a dead letter id or a unique prefix of one (4+ hex digits)")
    show.add_argument("--full", action="store_true",
                      help="print the whole payload and headers (by default, the first "
                           "4096 bytes of each)")
    show.add_argument("--out", metavar="FILE",
                      help="also write the original payload, byte for byte, to FILE (a new file)")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=cmd_dlq_show)

    rd = commands.add_parser(
        "redrive", help="republish dead letters to their original topic, each at most once")
    rd.add_argument("ids", nargs="*", metavar="ID",
                    help="dead letter ids or unique prefixes of them")
    rd.add_argument("--all", action="store_true", help="every dead letter not redriven yet")
    rd.add_argument("--actor", metavar="NAME",
                    help="who asks for it, recorded on the republished record (default: $USER)")
    rd.add_argument("--json", action="store_true")
    rd.set_defaults(run=cmd_dlq_redrive)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saga", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run N transfers end to end on the embedded stack")
    demo.add_argument("-n", "--transfers", type=int, default=1000)
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the end")
    demo.add_argument("--seed", type=int, default=None, help="random seed of the transfer mix")
    demo.add_argument("--keep", action="store_true",
                      help="keep the embedded stack's data and worker logs afterwards")
    demo.add_argument("--chaos", action="store_true",
                      help="SIGKILL and restart random workers while the demo runs")
    demo.add_argument("--chaos-seconds", type=float, default=20.0,
                      help="with --chaos: how long to publish and kill for")
    demo.add_argument("--chaos-broker", action="store_true",
                      help="with --chaos, on the embedded stack: also SIGKILL the broker once "
                           "mid-run and restart it on its port 2 s later (memory lost)")
    demo.add_argument("--allow-external-stack", action="store_true",
                      help="run against the PostgreSQL and Kafka that SAGA_DATABASE_URL and "
                           "SAGA_KAFKA_BOOTSTRAP name: open demo accounts and publish transfers "
                           "there (without it, the demo refuses any stack but its own)")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(run=cmd_demo)

    dev = sub.add_parser("dev", help="run the embedded stack and all workers in the foreground")
    dev.add_argument("--console-port", type=int, default=0, metavar="PORT",
                     help="the console's port on 127.0.0.1 (default: a free one)")
    dev.add_argument("--logs", metavar="DIR",
                     help="keep the workers' and servers' logs in DIR (default: a new folder "
                          ".saga/dev-<start time>-<pid>/logs); kept when it stops")
    dev.add_argument("--json", action="store_true",
                     help="one JSON object when ready (its addresses, worker pids, `logs`) and "
                          "one when stopped (`stopped`, `logs`)")
    dev.set_defaults(run=cmd_dev)
    dev_commands = dev.add_subparsers(dest="dev_command")
    token = dev_commands.add_parser(
        "token", help="a bearer token from the running `saga serve --dev`, for scripts")
    token.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    token.add_argument("--subject", metavar="NAME", help="the token's sub (default dev-ROLE)")
    token.add_argument("--state", type=Path, metavar="FILE",
                       help="the dev console's state file (default: the one it wrote)")
    token.add_argument("--json", action="store_true")
    token.set_defaults(run=cmd_dev_token)

    serve = sub.add_parser("serve", help="the console's HTTP API, every request authenticated")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080, help="0: a free port")
    serve.add_argument("--dev", action="store_true",
                       help="a development identity provider of its own (loopback only): a key"
                            " made at start, a login link, `saga dev token`")
    serve.add_argument("--json", action="store_true", help="print the addresses as JSON")
    serve.set_defaults(run=cmd_serve)

    worker = sub.add_parser("worker", help="run one worker against the configured stack")
    worker.add_argument("kind", choices=["orchestrator", "relay", "recovery", "participant"])
    worker.add_argument("name", nargs="?", help="participant name: risk, ledger or notify")
    worker.set_defaults(run=cmd_worker)

    tl = sub.add_parser("timeline", help="every event of one saga (saga id or business key, "
                                          "e.g. a transfer id)")
    tl.add_argument("id", help="a saga id, or a business key (a transfer's is its transfer id)")
    tl.add_argument("--type", metavar="SAGA_TYPE",
                    help="the saga type, when a business key names sagas of several types")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(run=cmd_timeline)

    ls = sub.add_parser("list", help="sagas, most recently changed first; filters combine")
    ls.add_argument("--status", type=str.upper, metavar="STATUS",
                    choices=[status.value for status in SagaStatus],
                    help="only sagas in this status, in any case: "
                         + ", ".join(status.value for status in SagaStatus))
    ls.add_argument("--type", metavar="SAGA_TYPE", help="only sagas of this type")
    ls.add_argument("--definition-version", type=_positive_int, metavar="N",
                    help="only sagas running (or run) on this version of their definition")
    ls.add_argument("--key", "--business-key", dest="key", metavar="BUSINESS_KEY",
                    help="only sagas with this business key (a transfer's is its transfer id)")
    ls.add_argument("--account", metavar="ACCOUNT",
                    help="only sagas whose start message names this account (in a field its "
                         "saga type declares: a transfer's source or destination)")
    ls.add_argument("--since", type=_point_in_time, metavar="TIME",
                    help="only sagas started at or after TIME: ISO 8601 (UTC unless an offset "
                         "is given) or an age such as 15m, 2h, 3d")
    ls.add_argument("--until", type=_point_in_time, metavar="TIME",
                    help="only sagas started before TIME (same spellings as --since)")
    ls.add_argument("--limit", type=_page_size, default=50,
                    help="at most this many (1 to 1000; default 50)")
    ls.add_argument("--offset", type=_non_negative_int, default=0,
                    help="skip this many first: the next page starts at offset + limit")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=cmd_list)

    st = sub.add_parser("stuck", help="in-flight sagas past their due time (exit 1 if any), "
                                      "and outbox rows set aside unpublished")
    st.add_argument("--grace", type=_non_negative_seconds, default=30.0,
                    help="seconds past the due time before a saga counts as stuck (0 or more)")
    st.add_argument("--limit", type=_positive_int, default=100,
                    help="at most this many sagas and this many outbox rows")
    st.add_argument("--json", action="store_true")
    st.set_defaults(run=cmd_stuck)

    ck = sub.add_parser("check", help="check the invariants I1-I7 (I8 with --against-topic); "
                                        "exit 1 on a violation")
    ck.add_argument("--quiescent", action="store_true",
                    help="also require every saga terminal and the outbox empty")
    ck.add_argument("--against-topic", action="store_true",
                    help="also read every saga type's start topic from its start and report "
                         "every request there with neither a saga nor a dead letter (I8)")
    ck.add_argument("--grace", type=_non_negative_seconds, default=10.0,
                    help="with --against-topic: records younger than this many seconds are not "
                         "judged yet (the orchestrator may not have read them)")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(run=cmd_check)

    actions = {
        "retry-now": ("start a waiting retry, or send the outstanding command again, now "
                      "(every member of a parallel stage that waits); a saga FAILED past its "
                      "pivot sends the step that failed again", cmd_retry_now),
        "cancel": ("turn a running saga back: compensate what it applied, as if its current "
                   "step had failed for good (refused after the pivot)", cmd_cancel),
        "retry-compensation": ("a saga that FAILED while compensating tries its remaining "
                               "compensations again", cmd_retry_compensation),
        "resolve": ("close a FAILED saga once its leftovers were set right (publishes its "
                    "'resolved' outcome)", cmd_resolve),
    }
    for name, (help_text, command) in actions.items():
        ac = sub.add_parser(name, help=help_text,
                            description=help_text + ". Recorded as an event of the saga with "
                            "the operating system user ($USER) as its actor and the reason.")
        ac.add_argument("id", help="saga id (or its first 8+ hex digits) or business key")
        ac.add_argument("--type", help="the saga type, when a business key names several")
        if name == "resolve":
            why = ac.add_mutually_exclusive_group(required=True)
            why.add_argument("--reason", help="what was done, for the record (an incident "
                                              "ticket, say)")
            why.add_argument("--note", help="the same as --reason (its older name)")
            ac.add_argument("--actor", metavar="NAME",
                            help="who resolves it, recorded as the event's actor "
                                 "(default: $USER)")
        else:
            ac.add_argument("--reason", required=True,
                            help="why, for the record (an incident ticket, say)")
        ac.add_argument("--action-id", type=uuid.UUID, metavar="UUID",
                        help="this action's id (default: a new one); the same id sent again "
                             "acts once and answers what the first did")
        ac.add_argument("--json", action="store_true")
        ac.set_defaults(run=command)

    ob = sub.add_parser("outbox", help="outbox rows set aside after the broker refused them")
    ob_commands = ob.add_subparsers(dest="outbox_command", required=True)
    retry = ob_commands.add_parser(
        "retry", help="give set-aside rows back to the relay, once their cause is fixed")
    retry.add_argument("ids", nargs="+", type=int, metavar="ID", help="outbox row ids")
    retry.add_argument("--json", action="store_true")
    retry.set_defaults(run=cmd_outbox_retry)

    mg = sub.add_parser("migrate", help="apply the schema migrations")
    mg.add_argument("--json", action="store_true")
    mg.set_defaults(run=cmd_migrate)

    _add_dlq_parser(sub)
    return parser


def _raise_interrupt(*_args: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `saga ... | head` closed the pipe: not an error. Point stdout at /dev/null so the
        # interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so `finally` blocks stop child processes and servers.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # JSON lines unless a person watches stderr (orchestrator/logs.py).
    configure_logging(
        logging.INFO if args.verbose or args.command == "worker" else logging.WARNING)
    run: Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]] = args.run
    try:
        settings = Settings()
        return asyncio.run(run(args, settings))
    except NotFound as error:
        print(f"saga: {error}", file=sys.stderr)
        return 3
    except (ConfigurationError, Conflict) as error:
        print(f"saga: {error}", file=sys.stderr)
        return 2
    except SagaError as error:
        print(f"saga: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
