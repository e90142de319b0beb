"""Recovery after a worker is SIGKILLed and restarted at once, per worker kind.

    python bench/recovery.py [--runs 3] [--transfers 1000] [--concurrency 50] [--kill-after 300]
                             [--kinds orchestrator participant:ledger ...]
                             [--no-compare-standby] [--no-compare-group] [--json]

A closed-loop driver keeps C transfers in flight until K have ended (as bench/saga_throughput.py
does: it learns of a saga's end from its outcome event, through `SagaClient`, with a database
sweep for an outcome that does not arrive in time). In a killed run, once `--kill-after`
transfers have ended, the worker of one kind is SIGKILLed and started again at once
(`WorkerProcesses.restart`). Recovery is
the time from the SIGKILL until every saga that was in flight at that moment is terminal (the
commit of its terminal event, read from the event store). The same load without a kill gives the
clean wall time; the killed run's extra wall time is measured against it.

Every measured run gets a fresh embedded stack, because the embedded broker's fetch cost grows
with its logs (ADR 0003) and a restarted consumer starts again from the 1 ms fetch wait. For each
killed run the restarted worker's start is broken into moments (see STAGES): its first PostgreSQL
connection (interpreter and imports done), its lease connection (migrations, topics, partition
metadata done), the log line saying it owns its partitions, its readiness row, its first write,
and the first message it sent handled downstream. Setups: `lease` (default settings, every kind);
`lease+standby` (`--compare-standby`, on by default: the orchestrator and the ledger each run a
second instance, which takes the killed one's partitions on its next lease pass); `group`
(`--compare-group`, on by default: `partition_ownership=group`, the orchestrator). Figures are
medians of `--runs`; the invariants are checked after every run. The machine's load average and
any other embedded broker running are reported: the figures only compare within one invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import Producer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.client import SagaClient
from orchestrator.dev.embedded import EmbeddedStack, settings_for
from orchestrator.dev.processes import WorkerProcesses
from orchestrator.ops.checker import check
from orchestrator.postgres.store import create_engine, migrate
from orchestrator.settings import Settings
from schemas import TOPIC_TRANSFER_COMMANDS
from steps import APPLICATION
from steps.saga import TRANSFER_TYPE

ACCOUNTS = 200
WARM_UP = 100
BAR_S = 2.0
TERMINAL = ("COMPLETED", "COMPENSATED", "REJECTED", "FAILED")
Mode = Literal["lease", "group"]

# Offsets from the SIGKILL, in the order they happen; None when a kind has no such moment (the
# relay and recovery workers have no partitions; group mode has no lease connection).
STAGES = (
    ("spawned", "restart() returned: the old process reaped, the new one forked"),
    ("db_connected", "first PostgreSQL connection: interpreter up, imports done"),
    ("lease_connected", "lease connection: migrations, topics, partition metadata done"),
    ("owns", "log line: owns its partitions (lease pass done)"),
    ("ready", "readiness row written (partitions assigned)"),
    ("standby_owns", "with a standby instance: log line, the standby owns the partitions freed"),
    ("first_write", "first write by the new process (offset fetch, fetch, one batch)"),
    ("first_hop", "first message the new process sent, handled downstream (its producer's id)"),
    ("recovered", "every saga in flight at the kill is terminal"),
)


@dataclass
class Drive:
    elapsed_s: float
    ended: int
    stuck: int
    in_flight_at_kill: list[str] = field(default_factory=list)
    kill_at: float | None = None


@dataclass(frozen=True)
class Setup:
    """How the workers run: who owns partitions, and whether each of `kinds` runs a second
    instance beside the first (which takes a killed one's partitions on its next lease pass)."""

    name: str
    mode: Mode
    standby: bool
    kinds: tuple[str, ...]


@dataclass
class Run:
    setup: str
    kind: str | None  # None: the clean run
    elapsed_s: float
    in_flight_at_kill: int = 0
    recovery_s: float | None = None
    stages: dict[str, float | None] = field(default_factory=dict)
    unrecovered: int = 0
    stuck: int = 0
    invariants_ok: bool = True
    violations: list[str] = field(default_factory=list)


async def drive(settings: Settings, engine: AsyncEngine, producer: Producer,
                accounts: list[str], transfers: int, concurrency: int,
                kill_after: int | None = None, kill: Callable[[], None] | None = None) -> Drive:
    """A closed loop of `transfers` transfers, `concurrency` in flight; `kill` is called once,
    when `kill_after` have ended."""
    topic = settings.topic(TOPIC_TRANSFER_COMMANDS)
    sent: set[str] = set()
    ended: set[str] = set()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    result = Drive(0.0, 0, 0)

    def publish_next() -> None:
        i = len(sent)
        if i >= transfers:
            return
        transfer_id = str(uuid.uuid4())
        body = {"transfer_id": transfer_id, "source_account": accounts[i % len(accounts)],
                "destination_account": accounts[(i * 7 + 1) % len(accounts)], "amount": "1.00",
                "currency": "EUR", "reference": "bench", "requested_by": "bench"}
        sent.add(transfer_id)
        # Its waiter before its publish: the outcome cannot slip past.
        client.expect(TRANSFER_TYPE, transfer_id).add_done_callback(
            lambda outcome: finished(transfer_id) if not outcome.cancelled() else None)
        producer.produce(topic, value=json.dumps(body).encode(), key=transfer_id.encode())
        producer.poll(0)

    def finished(transfer_id: str) -> None:
        if transfer_id not in sent or transfer_id in ended:
            return
        ended.add(transfer_id)
        if len(ended) == transfers:
            loop.call_soon(done.set)
        else:
            publish_next()

    async def sweep_missed() -> None:
        """Sagas that ended without their outcome event reaching us."""
        waiting = list(sent - ended)
        if not waiting:
            return
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT business_key FROM sagas WHERE saga_type = 'transfer'"
                " AND business_key = ANY(:ids)"
                " AND status = ANY(:terminal) AND updated_at < now() - interval '1 second'"),
                {"ids": waiting, "terminal": list(TERMINAL)})).scalars().all()
        for transfer_id in rows:
            finished(str(transfer_id))

    async with SagaClient(settings, [TRANSFER_TYPE], client_id="bench-recovery") as client:
        started = time.perf_counter()
        for _ in range(concurrency):
            publish_next()
        producer.flush(5)
        last_progress, last_count, last_sweep = time.perf_counter(), 0, time.perf_counter()
        while not done.is_set():
            producer.poll(0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.005)
            if kill is not None and result.kill_at is None and len(ended) >= (kill_after or 0):
                result.in_flight_at_kill = sorted(sent - ended)
                result.kill_at = time.time()  # wall clock: compared with the database's
                kill()
            if time.perf_counter() - last_sweep > 1.0:
                await sweep_missed()
                last_sweep = time.perf_counter()
            if len(ended) != last_count:
                last_progress, last_count = time.perf_counter(), len(ended)
            elif time.perf_counter() - last_progress > 30:
                print(f"  no progress for 30 s: {len(sent - ended)} sagas stuck", file=sys.stderr)
                break
        result.elapsed_s = time.perf_counter() - started
    producer.flush(5)
    result.ended, result.stuck = len(ended), transfers - len(ended)
    return result


async def _scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


def _socket_ports(pid: int) -> set[int]:
    """Local TCP ports of a process's sockets (to find its connections in pg_stat_activity)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                if parts[9] in inodes:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def other_brokers() -> int:
    """Embedded brokers running that are not ours (other stacks on the machine share its two
    cores: the figures are only worth comparing when this is 0)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if argv and b"tansu" in argv[0] and b"broker" in argv[1:2]:
                    count += 1
    return count


def _first_log_line_after(path: Path, after: float, needle: str) -> float | None:
    """When the worker logged a line containing `needle`, first after `after` (epoch s)."""
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if needle not in line:
                continue
            if line.startswith("{"):
                # A worker's log file holds JSON lines (orchestrator/logs.py), time in UTC.
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    record = json.loads(line)
                    if needle in record["message"]:
                        at = datetime.fromisoformat(record["time"]).timestamp()
                        if at >= after:
                            return at
                continue
            match = _LOG_TIME.match(line)
            if match is None:
                continue
            # Plain text (a terminal): local time with milliseconds.
            at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= after:
                return at
    return None


async def restart_stages(engine: AsyncEngine, workers: WorkerProcesses, label: str,
                         kill_at: float, spawned_at: float, in_flight: list[str],
                         standby: str | None = None) -> tuple[dict[str, float | None], int]:
    """Moments of the restarted worker's start (and of a standby's take-over), as seconds after
    the kill, and how many of the sagas in flight at the kill are still not terminal."""
    # Pollers (relay, recovery) are not waited on by any saga: the run may end before they are
    # back, and their start is still worth timing.
    with contextlib.suppress(Exception):
        await workers.wait_ready(engine, timeout_s=60, labels=[label])
    name = workers.names[label]
    pid = workers.processes[label].pid
    at: dict[str, float | None] = dict.fromkeys(name for name, _ in STAGES)
    at["spawned"] = spawned_at
    ports = sorted(_socket_ports(pid))
    if ports:
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT extract(epoch FROM backend_start) AS started, application_name"
                " FROM pg_stat_activity WHERE client_port = ANY(:ports)"
                " AND backend_start > to_timestamp(:kill)"),
                {"ports": ports, "kill": kill_at})).all()
        if rows:
            at["db_connected"] = min(float(r.started) for r in rows)
            leases = [float(r.started) for r in rows
                      if (r.application_name or "").startswith("saga-leases")]
            at["lease_connected"] = min(leases) if leases else None
    at["owns"] = _first_log_line_after(workers.log_path(label), kill_at, " owns ")
    if standby is not None:
        at["standby_owns"] = _first_log_line_after(workers.log_path(standby), kill_at, " owns ")
    at["ready"] = await _scalar(engine, "SELECT extract(epoch FROM ready_at) FROM workers"
                                        " WHERE worker = :w", w=name)
    if label == "orchestrator":
        at["first_write"] = await _scalar(
            engine, "SELECT extract(epoch FROM min(recorded_at)) FROM saga_events"
                    " WHERE actor = :w", w=name)
    elif label.startswith("participant:") and standby is None:  # a standby writes too
        at["first_write"] = await _scalar(
            engine, "SELECT extract(epoch FROM min(recorded_at)) FROM participant_replies"
                    " WHERE participant = :p AND recorded_at > to_timestamp(:kill)",
            p=label.split(":", 1)[1], kill=kill_at)
    if label == "orchestrator":
        # A step command the new process started, answered by a participant (its publish waits
        # for the new producer's id).
        at["first_hop"] = await _scalar(
            engine, "SELECT extract(epoch FROM min(r.recorded_at)) FROM participant_replies r"
                    " JOIN saga_events e ON e.saga_id = r.saga_id AND e.step = r.step"
                    " AND e.type = 'StepStarted' AND e.actor = :w", w=name)
    elif at["first_write"] is not None:
        # A reply the new process stored (so sent), folded by the orchestrator.
        at["first_hop"] = await _scalar(
            engine, "SELECT extract(epoch FROM min(e.recorded_at)) FROM participant_replies r"
                    " JOIN saga_events e ON e.saga_id = r.saga_id AND e.step = r.step"
                    " AND e.type IN ('StepSucceeded', 'StepFailed')"
                    " WHERE r.participant = :p AND r.recorded_at > to_timestamp(:kill)",
            p=label.split(":", 1)[1], kill=kill_at)
    async with engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT count(*) AS n, extract(epoch FROM max(e.recorded_at)) AS last FROM sagas s"
            " JOIN saga_events e ON e.saga_id = s.saga_id AND e.seq = s.version"
            " WHERE s.saga_type = 'transfer' AND s.business_key = ANY(:ids)"
            " AND s.status = ANY(:terminal)"),
            {"ids": in_flight, "terminal": list(TERMINAL)})).one()
    at["recovered"] = float(row.last) if row.last is not None else None
    offsets = {k: (round(float(v) - kill_at, 3) if v is not None else None)
               for k, v in at.items()}
    return offsets, len(in_flight) - int(row.n)


async def one_run(setup: Setup, kind: str | None, args: argparse.Namespace, index: int) -> Run:
    """One measured run on a fresh stack: warm-up, then the load, with a kill of `kind` (with a
    standby setup, every kind of `setup.kinds` runs a second instance, killed run or clean)."""
    with EmbeddedStack() as stack:
        settings = settings_for(stack, Settings(topic_prefix="recovery.",
                                                partition_ownership=setup.mode))
        engine = create_engine(stack.postgres.url)
        await migrate(engine, APPLICATION.migrations)
        workers = WorkerProcesses(settings, stack.root / "logs")
        workers.start()
        if setup.standby:
            for standby_kind in setup.kinds:
                workers.start(f"{standby_kind}#2")
        try:
            from steps.ledger import open_account

            await workers.wait_ready(engine)
            accounts = [f"r{index}-{i}" for i in range(ACCOUNTS)]
            async with engine.begin() as conn:
                for account in accounts:
                    await open_account(conn, account, "EUR", Decimal("1000000.00"))
            # The driver's producer is shared with the warm-up, so the measured run does not wait
            # for a fresh idempotent producer's id (librdkafka: ~0.5 s).
            producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0,
                                 "enable.idempotence": True})
            # Unmeasured: connection pools, plan caches, the consumers' first fetches.
            await drive(settings, engine, producer, accounts, WARM_UP, args.concurrency)
            spawned_at = 0.0

            def kill() -> None:
                nonlocal spawned_at
                assert kind is not None
                workers.restart(kind)
                spawned_at = time.time()

            result = await drive(settings, engine, producer, accounts, args.transfers,
                                 args.concurrency, args.kill_after, kill if kind else None)
            run = Run(setup.name, kind, result.elapsed_s, stuck=result.stuck)
            if kind is not None and result.kill_at is not None:
                run.in_flight_at_kill = len(result.in_flight_at_kill)
                run.stages, run.unrecovered = await restart_stages(
                    engine, workers, kind, result.kill_at, spawned_at, result.in_flight_at_kill,
                    f"{kind}#2" if setup.standby else None)
                if not run.unrecovered:
                    run.recovery_s = run.stages["recovered"]
            # The background publish marks (0.2 s) settle before a quiescent check.
            await asyncio.sleep(1.0)
            report = await check(engine, APPLICATION, expect_quiescent=result.stuck == 0)
            run.invariants_ok = report.ok
            run.violations = [f"{f.invariant} {f.name}: {f.detail}" for f in report.failures()]
        finally:
            workers.stop()
            await engine.dispose()
    return run


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def summarise(setup: Setup, kind: str, runs: list[Run], clean: list[Run]) -> dict[str, Any]:
    # Extra wall time against the clean run of the same index (measured in the same stretch).
    extra = [k.elapsed_s - c.elapsed_s for k, c in zip(runs, clean, strict=False)]
    return {
        "setup": setup.name, "partition_ownership": setup.mode, "standby": setup.standby,
        "kind": kind,
        "recovery_s": _median([r.recovery_s for r in runs]),
        "recovery_s_per_run": [r.recovery_s for r in runs],
        "extra_wall_s": _median(list(extra)),
        "extra_wall_s_per_run": [round(e, 3) for e in extra],
        "in_flight_at_kill": _median([float(r.in_flight_at_kill) for r in runs]),
        "stages_s": {name: _median([r.stages.get(name) for r in runs]) for name, _ in STAGES},
        "stages_s_per_run": [r.stages for r in runs],
        "unrecovered": sum(r.unrecovered for r in runs),
        "stuck": sum(r.stuck for r in runs),
        "invariants_ok": all(r.invariants_ok for r in runs),
        # The median against the bar; an unrecovered run counts as missing it.
        "meets_bar": not any(r.recovery_s is None for r in runs)
        and statistics.median(r.recovery_s or 0.0 for r in runs) < BAR_S,
    }


def _log_run(run: Run) -> None:
    what = f"kill {run.kind}" if run.kind else "clean"
    line = f"  [{run.setup}] {what}: wall {run.elapsed_s:.2f} s"
    if run.kind:
        line += (f", {run.in_flight_at_kill} in flight at the kill, recovered in "
                 f"{_fmt(run.recovery_s)} s (" + ", ".join(
                     f"{name} {_fmt(run.stages.get(name))}" for name, _ in STAGES) + ")")
        if run.unrecovered:
            line += f", {run.unrecovered} NOT TERMINAL"
    line += f", invariants {'ok' if run.invariants_ok else 'VIOLATED'}, stuck {run.stuck}"
    print(line, file=sys.stderr)
    for violation in run.violations:
        print(f"    VIOLATION {violation}", file=sys.stderr)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--transfers", type=int, default=1000, help="transfers per run")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--kill-after", type=int, default=300,
                        help="kill once this many transfers of the run have ended")
    parser.add_argument("--kinds", nargs="+", default=list(APPLICATION.worker_kinds),
                        choices=list(APPLICATION.worker_kinds),
                        help="worker kinds to kill (lease mode)")
    parser.add_argument("--compare-group", action=argparse.BooleanOptionalAction, default=True,
                        help="also kill the orchestrator with partition_ownership=group")
    parser.add_argument("--compare-standby", action=argparse.BooleanOptionalAction,
                        default=True, help="also kill the orchestrator and the ledger while a "
                        "second instance of each runs (lease mode)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    setups = [Setup("lease", "lease", False, tuple(args.kinds))]
    if args.compare_standby:
        setups.append(Setup("lease+standby", "lease", True,
                            ("orchestrator", "participant:ledger")))
    if args.compare_group:
        setups.append(Setup("group", "group", False, ("orchestrator",)))
    load_before, foreign = os.getloadavg(), other_brokers()
    if foreign:
        print(f"  warning: {foreign} other embedded brokers are running: the machine is shared",
              file=sys.stderr)
    rows: list[dict[str, Any]] = []
    clean_rows: dict[str, dict[str, Any]] = {}
    for setup in setups:
        clean: list[Run] = []
        killed: dict[str, list[Run]] = {kind: [] for kind in setup.kinds}
        # Interleaved by run, so a slow stretch of the shared host hits every kind alike.
        for index in range(args.runs):
            clean.append(await one_run(setup, None, args, index))
            _log_run(clean[-1])
            for kind in setup.kinds:
                killed[kind].append(await one_run(setup, kind, args, index))
                _log_run(killed[kind][-1])
        clean_rows[setup.name] = {
            "wall_s": _median([r.elapsed_s for r in clean]),
            "wall_s_per_run": [round(r.elapsed_s, 3) for r in clean],
            "invariants_ok": all(r.invariants_ok for r in clean),
            "stuck": sum(r.stuck for r in clean),
        }
        rows += [summarise(setup, kind, killed[kind], clean) for kind in setup.kinds]

    out = {"runs": args.runs, "transfers": args.transfers, "concurrency": args.concurrency,
           "kill_after": args.kill_after, "bar_s": BAR_S,
           "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
           "other_brokers": [foreign, other_brokers()],
           "clean": clean_rows, "kills": rows}
    if args.json:
        print(json.dumps(out))
        return
    print(f"\n{args.transfers} transfers per run, {args.concurrency} in flight, kill after "
          f"{args.kill_after} ended; medians of {args.runs} runs; 1-minute load average "
          f"{out['load_average_1m'][0]} at the start, {out['load_average_1m'][1]} at the end; "
          f"other embedded brokers running: {foreign} at the start, {out['other_brokers'][1]} "
          "at the end")
    for name, clean_row in clean_rows.items():
        print(f"clean run ({name}): {clean_row['wall_s']} s wall (per run "
              f"{clean_row['wall_s_per_run']}), invariants "
              f"{'ok' if clean_row['invariants_ok'] else 'VIOLATED'}")
    print(f"\n{'setup':<14} {'killed worker':<20} {'in flight':>9} {'recovery s':>10} "
          f"{'extra wall s':>12}  {'per run':<16} {'invariants':<10}  < {BAR_S:g} s")
    for row in rows:
        per_run = " ".join(_fmt(v) for v in row["recovery_s_per_run"])
        print(f"{row['setup']:<14} {row['kind']:<20} {_fmt(row['in_flight_at_kill'], 0):>9} "
              f"{_fmt(row['recovery_s']):>10} {_fmt(row['extra_wall_s']):>12}  {per_run:<16} "
              f"{'ok' if row['invariants_ok'] else 'VIOLATED':<10}  "
              f"{'met' if row['meets_bar'] else 'NOT met'}")
    print("\nwhere the time goes (s after the SIGKILL, medians):")
    print(f"{'setup':<14} {'killed worker':<20} " + " ".join(f"{n[:12]:>12}" for n, _ in STAGES))
    for row in rows:
        print(f"{row['setup']:<14} {row['kind']:<20} "
              + " ".join(f"{_fmt(row['stages_s'][n]):>12}" for n, _ in STAGES))
    for name, meaning in STAGES:
        print(f"  {name}: {meaning}")


def _interrupt(*_args: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the stacks and workers stop.
    signal.signal(signal.SIGTERM, _interrupt)
    asyncio.run(main())
