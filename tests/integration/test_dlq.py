"""`saga dlq list|show|redrive` against the real stack: a redrive republishes a dead letter
through the outbox exactly once, and the orchestrator processes the copy exactly once.

Tests that redrive through the session's database redrive only dead letters they made. Tests of
`--all` (which takes every pending dead letter) and of exact listings run against a database of
their own on the same PostgreSQL server, so they neither touch nor see other tests' dead letters.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.consuming.handling import REDRIVE_HEADER, message_id_of
from orchestrator.kafka.consumer import Consumed, decode_headers, encode_headers
from orchestrator.postgres.store import json_value
from orchestrator.workers.saga_worker import CONSUMER
from schemas import TOPIC_TRANSFER_COMMANDS
from tests.integration.conftest import DeadLetterTap, Harness, Isolated
from tests.integration.test_cli import saga_cli

pytestmark = pytest.mark.integration


def _json_ok(result: Any) -> Any:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


async def eventually(probe: Callable[[], Awaitable[Any]], what: str,
                     timeout_s: float = 30) -> Any:
    """Poll until `probe` returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} after {timeout_s}s")


def redriven_message_id(payload: bytes, dead_letter_id: uuid.UUID) -> str:
    """The orchestrator's inbox id of the redriven copy of an intake record."""
    headers = ((REDRIVE_HEADER, str(dead_letter_id).encode()),)
    return message_id_of(Consumed("any", 0, 0, None, payload, headers, None))


async def inbox_rows(engine: AsyncEngine, message_id: str) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(
            "SELECT verdict, saga_id FROM inbox WHERE consumer = :c AND message_id = :m"),
            {"c": CONSUMER, "m": message_id})).all())


async def redrive_outbox_rows(engine: AsyncEngine, dead_letter_id: uuid.UUID,
                              topic: str) -> list[Any]:
    """Outbox rows for `topic` that carry `saga-redrive-id: <dead_letter_id>` (header values
    are stored base64). The topic matters: a redriven copy that fails again goes to the
    dead-letter topic with its headers, this one included."""
    wanted = json.dumps([[REDRIVE_HEADER, base64.b64encode(str(dead_letter_id).encode())
                          .decode()]])
    async with engine.connect() as conn:
        return list((await conn.execute(text(
            "SELECT id, topic, key, value, headers, saga_id, published_at FROM outbox"
            " WHERE topic = :t AND headers @> CAST(:h AS jsonb) ORDER BY id"),
            {"t": topic, "h": wanted})).all())


def documented_sql() -> str:
    """The one SQL example of docs/operations/dlq.md, so the page cannot drift from the data."""
    page = Path(__file__).resolve().parents[2] / "docs" / "operations" / "dlq.md"
    [sql] = re.findall(r"```sql\n(.*?)```", page.read_text(), re.DOTALL)
    return str(sql).strip().rstrip(";")


@dataclass(frozen=True)
class Letter:
    """A dead letter as a test writes it into `dead_letters` itself."""

    payload: bytes
    reason_code: str = "PROCESSING_FAILED"
    stage: str = "orchestrator"
    topic: str = "transfers.commands.v1"
    key: str | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    failed_at: datetime | None = None
    redriven_at: datetime | None = None
    business_key: str | None = None
    dead_letter_id: uuid.UUID | None = None


async def insert_letter(engine: AsyncEngine, letter: Letter) -> uuid.UUID:
    dead_letter_id = letter.dead_letter_id or uuid.uuid4()
    at = letter.failed_at or datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO dead_letters (dead_letter_id, stage, reason_code, reason, error_class,"
            " original_topic, original_partition, original_offset, original_key, payload,"
            " headers, first_failed_at, last_failed_at, saga_type, business_key, redriven_at)"
            " VALUES (:id, :stage, :code, :reason, :error_class, :topic, 0, :offset, :key,"
            " :payload, CAST(:headers AS jsonb), :at, :at, :saga_type, :business_key,"
            " :redriven_at)"),
            {"id": dead_letter_id, "stage": letter.stage, "code": letter.reason_code,
             "reason": f"test: {letter.reason_code.lower()}",
             "error_class": f"{letter.stage}.{letter.reason_code}", "topic": letter.topic,
             "offset": 10**9 + uuid.uuid4().int % 10**6, "key": letter.key,
             "payload": letter.payload, "headers": json.dumps(encode_headers(letter.headers)),
             "at": at, "saga_type": "transfer" if letter.business_key else None,
             "business_key": letter.business_key, "redriven_at": letter.redriven_at})
    return dead_letter_id


async def test_a_bad_request_is_listed_shown_and_redriven_once(
        harness: Harness, dlq_tap: DeadLetterTap) -> None:
    raw = f'{{"transfer_id": "{uuid.uuid4()}", "amount": '.encode()  # malformed, and unique
    key = f"dlq-key-{harness.run_id}"
    topic = harness.settings.topic(TOPIC_TRANSFER_COMMANDS)
    harness.producer.produce(topic, value=raw, key=key.encode(),
                             headers=[("traceparent", b"00-dlq-it-01")])
    assert harness.producer.flush(10) == 0

    row = await harness.wait_dead_letter(raw)
    dead_letter_id = uuid.UUID(str(row.dead_letter_id))
    assert (row.reason_code, row.stage, row.redriven_at) == ("MALFORMED_JSON", "intake", None)

    async def tapped_record() -> Any:
        return dlq_tap.find(raw)

    tapped = await eventually(tapped_record, "the dead letter never reached the DLQ topic")
    assert tapped["headers"]["dlq-dead-letter-id"] == str(dead_letter_id)

    # list: pending, with its reason and where it came from.
    listed = _json_ok(await saga_cli(harness, "dlq", "list", "--reason", "malformed_json",
                                     "--limit", "1000", "--json"))
    assert {item["reason_code"] for item in listed} == {"MALFORMED_JSON"}
    [item] = [i for i in listed if i["dead_letter_id"] == str(dead_letter_id)]
    assert (item["stage"], item["original_topic"], item["original_partition"],
            item["original_offset"], item["attempts"], item["redriven_at"]) == (
        "intake", topic, row.original_partition, row.original_offset, 1, None)
    # malformed: no business key to name, but the saga type of the topic it arrived on
    assert (item["saga_type"], item["business_key"]) == ("transfer", None)

    # show, by the short id the table prints: everything, payload and headers readable.
    shown = _json_ok(await saga_cli(harness, "dlq", "show", str(dead_letter_id)[:8], "--json"))
    assert (shown["dead_letter_id"], shown["original_topic"], shown["original_partition"],
            shown["original_offset"], shown["original_key"]) == (
        str(dead_letter_id), topic, row.original_partition, row.original_offset, key)
    assert shown["reason"].startswith("not valid JSON")
    assert shown["payload"] == {"value": raw.decode(), "encoding": "utf-8",
                                "size_bytes": len(raw), "truncated": False}
    assert shown["headers"] == [{"name": "traceparent", "value": "00-dlq-it-01",
                                 "encoding": "utf-8", "size_bytes": 12, "truncated": False}]
    as_text = await saga_cli(harness, "dlq", "show", str(dead_letter_id))
    assert as_text.returncode == 0, as_text.stderr
    assert f"offset          {row.original_offset}" in as_text.stdout
    assert "(not yet: pending)" in as_text.stdout
    assert as_text.stdout.endswith("shown as utf-8\n" + raw.decode() + "\n")

    # redrive: one outbox row republishing the original bytes, key and headers.
    result = _json_ok(await saga_cli(harness, "dlq", "redrive", str(dead_letter_id), "--json",
                                     "--actor", "it-operator"))
    assert (result["redriven"], result["already_redriven"], result["not_found"],
            result["actor"]) == ([str(dead_letter_id)], [], [], "it-operator")
    [outbox] = await redrive_outbox_rows(harness.engine, dead_letter_id, topic)
    assert outbox.id == result["outbox_ids"][0]
    assert (outbox.topic, bytes(outbox.value), bytes(outbox.key)) == (topic, raw, key.encode())
    assert decode_headers(json_value(outbox.headers)) == (
        ("traceparent", b"00-dlq-it-01"), (REDRIVE_HEADER, str(dead_letter_id).encode()),
        ("saga-redriven-by", b"it-operator"))

    # The operations page's query for who redrove a dead letter finds this row.
    async with harness.engine.connect() as conn:
        documented = (await conn.execute(text(
            documented_sql().replace("<dead_letter_id>", str(dead_letter_id))))).one()
    assert documented.id == outbox.id
    assert ["saga-redriven-by", base64.b64encode(b"it-operator").decode()] in json_value(
        documented.headers)

    # The relay publishes it; the orchestrator takes the copy as one new message (it is still
    # malformed, so it is dead-lettered again, under a new id).
    message_id = redriven_message_id(raw, dead_letter_id)
    [consumed] = await eventually(lambda: inbox_rows(harness.engine, message_id),
                                  "the redriven copy never reached the orchestrator")
    assert consumed.verdict == "rejected"
    async with harness.engine.connect() as conn:
        letters = (await conn.execute(text(
            "SELECT dead_letter_id, redriven_at FROM dead_letters WHERE payload = :p"),
            {"p": raw})).all()
    assert len(letters) == 2
    assert {uuid.UUID(str(d.dead_letter_id)) for d in letters if d.redriven_at} == {
        dead_letter_id}

    # A second redrive of the same id does nothing at all.
    again = await saga_cli(harness, "dlq", "redrive", str(dead_letter_id))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == (
        "redriven 0, already redriven 1 (nothing done), not found 0")
    assert len(await redrive_outbox_rows(harness.engine, dead_letter_id, topic)) == 1
    await eventually(lambda: _published(harness.engine, outbox.id),
                     "the relay never marked the redrive's outbox row published")
    assert len(await inbox_rows(harness.engine, message_id)) == 1

    # Once redriven, it leaves the default listing and stays in `--all`.
    pending = _json_ok(await saga_cli(harness, "dlq", "list", "--reason", "MALFORMED_JSON",
                                      "--limit", "1000", "--json"))
    assert str(dead_letter_id) not in {i["dead_letter_id"] for i in pending}
    everything = _json_ok(await saga_cli(harness, "dlq", "list", "--all", "--reason",
                                         "MALFORMED_JSON", "--limit", "1000", "--json"))
    [redriven] = [i for i in everything if i["dead_letter_id"] == str(dead_letter_id)]
    assert redriven["redriven_at"] is not None

    # The copy's own dead letter keeps the headers it arrived with, this redrive's included;
    # redriving it replaces them, so its copy is a new message again, not a duplicate of ours.
    [refailed] = [uuid.UUID(str(d.dead_letter_id)) for d in letters if not d.redriven_at]
    refailed_shown = _json_ok(await saga_cli(harness, "dlq", "show", str(refailed), "--json"))
    assert [(h["name"], h["value"]) for h in refailed_shown["headers"]] == [
        ("traceparent", "00-dlq-it-01"), (REDRIVE_HEADER, str(dead_letter_id)),
        ("saga-redriven-by", "it-operator")]
    _json_ok(await saga_cli(harness, "dlq", "redrive", str(refailed), "--json"))
    [consumed_again] = await eventually(
        lambda: inbox_rows(harness.engine, redriven_message_id(raw, refailed)),
        "the copy of the re-failed dead letter never reached the orchestrator")
    assert consumed_again.verdict == "rejected"
    await harness.assert_invariants()


async def _published(engine: AsyncEngine, outbox_id: int) -> bool:
    async with engine.connect() as conn:
        return bool((await conn.execute(text(
            "SELECT published_at IS NOT NULL FROM outbox WHERE id = :id"),
            {"id": outbox_id})).scalar_one())


async def test_a_valid_transfer_redriven_twice_at_once_applies_exactly_once(
        harness: Harness) -> None:
    source = await harness.open("src", "100.00")
    destination = await harness.open("dst", "0.00")
    request = harness.request(source, destination, "25.00")
    payload = json.dumps(request).encode()
    topic = harness.settings.topic(TOPIC_TRANSFER_COMMANDS)
    # As if the orchestrator had set it aside after repeated failures (a database refusal, say)
    # of a copy that an earlier redrive had republished.
    dead_letter_id = await insert_letter(harness.engine, Letter(
        payload=payload, topic=topic, key=request["transfer_id"],
        business_key=request["transfer_id"],
        headers=(("traceparent", b"00-valid-01"), ("dlq-reason-code", b"PROCESSING_FAILED"),
                 (REDRIVE_HEADER, str(uuid.uuid4()).encode()))))

    # Two operators redrive it at the same moment: one wins, the other is told it is done.
    first, second = await asyncio.gather(*(
        saga_cli(harness, "dlq", "redrive", str(dead_letter_id), "--json", "--actor", actor)
        for actor in ("operator-1", "operator-2")))
    results = [_json_ok(first), _json_ok(second)]
    assert sorted(len(r["redriven"]) for r in results) == [0, 1]
    assert sorted(len(r["already_redriven"]) for r in results) == [0, 1]
    [outbox] = await redrive_outbox_rows(harness.engine, dead_letter_id, topic)
    assert [name for name, _ in decode_headers(json_value(outbox.headers))] == [
        "traceparent", REDRIVE_HEADER, "saga-redriven-by"]

    saga = await harness.wait_terminal(request["transfer_id"])

    assert saga.status == "COMPLETED"
    async with harness.engine.connect() as conn:
        sagas = (await conn.execute(text(
            "SELECT count(*) FROM sagas WHERE saga_type = 'transfer' AND business_key = :t"),
            {"t": request["transfer_id"]})).scalar_one()
    assert sagas == 1
    events = await harness.events(saga.saga_id)
    assert [e.seq for e in events] == list(range(1, saga.version + 1))
    assert [e.type for e in events].count("SagaStarted") == 1
    [consumed] = await inbox_rows(harness.engine, redriven_message_id(payload, dead_letter_id))
    assert (consumed.verdict, consumed.saga_id) == ("started", saga.saga_id)
    assert await harness.balances(source, destination) == {
        source: (Decimal("75.00"), Decimal("0")), destination: (Decimal("25.00"), Decimal("0"))}
    entries = await harness.entries(saga.saga_id)
    assert len({(e.step, e.direction) for e in entries}) == len(entries) > 0
    await harness.assert_invariants()


async def test_show_or_redrive_of_an_unknown_id_exits_3(harness: Harness) -> None:
    unknown = str(uuid.uuid4())

    shown = await saga_cli(harness, "dlq", "show", unknown)
    redriven = await saga_cli(harness, "dlq", "redrive", unknown, "--json")

    assert (shown.returncode, shown.stdout) == (3, "")
    assert shown.stderr == f"saga: no dead letter with id {unknown}\n"
    assert redriven.returncode == 3, (redriven.stdout, redriven.stderr)
    assert json.loads(redriven.stdout)["not_found"] == [unknown]
    assert f"no dead letter with id {unknown}" in redriven.stderr
    assert await redrive_outbox_rows(
        harness.engine, uuid.UUID(unknown), harness.settings.topic(TOPIC_TRANSFER_COMMANDS)) == []


@pytest.mark.parametrize("args", [("dlq", "redrive"), ("dlq", "redrive", "--all", "abcd1234")])
async def test_redrive_needs_ids_or_all_but_not_both(args: tuple[str, ...]) -> None:
    result = await saga_cli(None, *args)

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("saga: usage: saga dlq redrive (ID... | --all)")


async def _redriven_at(engine: AsyncEngine) -> dict[uuid.UUID, datetime | None]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT dead_letter_id, redriven_at FROM dead_letters"))).all()
    return {uuid.UUID(str(r.dead_letter_id)): r.redriven_at for r in rows}


async def test_redrive_all_takes_only_the_pending_ones(isolated: Isolated) -> None:
    earlier = datetime.now(UTC) - timedelta(hours=1)
    older = await insert_letter(isolated.engine, Letter(b'{"a": 1}', failed_at=earlier))
    newer = await insert_letter(isolated.engine, Letter(b'{"b": 2}', key="k-b"))
    done = await insert_letter(isolated.engine, Letter(b'{"c": 3}', redriven_at=earlier))

    result = _json_ok(await saga_cli(isolated.harness, "dlq", "redrive", "--all", "--json",
                                     "--actor", "it-operator"))

    # Republished oldest failure first, so the relay sends them in their original order.
    assert result["redriven"] == [str(older), str(newer)]
    assert (result["already_redriven"], result["not_found"]) == ([], [])
    async with isolated.engine.connect() as conn:
        outbox = (await conn.execute(text(
            "SELECT id, value, key FROM outbox ORDER BY id"))).all()
    assert [(bytes(o.value), o.key and bytes(o.key)) for o in outbox] == [
        (b'{"a": 1}', None), (b'{"b": 2}', b"k-b")]
    assert [o.id for o in outbox] == result["outbox_ids"]
    marks = await _redriven_at(isolated.engine)
    assert marks[done] == earlier
    # One transaction marked both, at one time.
    marked_at = marks[newer]
    assert marks[older] == marked_at
    assert marked_at is not None and marked_at > earlier

    again = await saga_cli(isolated.harness, "dlq", "redrive", "--all", "--actor", "x")

    assert (again.returncode, again.stdout) == (
        0, "redriven 0, already redriven 0 (nothing done), not found 0\n")
    assert await _redriven_at(isolated.engine) == marks
    async with isolated.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one() == 2


async def test_redrive_of_known_and_unknown_ids_does_the_known_and_exits_3(
        isolated: Isolated) -> None:
    pending = await insert_letter(isolated.engine, Letter(b'{"p": 1}'))
    done = await insert_letter(isolated.engine, Letter(b'{"d": 1}',
                                                       redriven_at=datetime.now(UTC)))
    unknown = str(uuid.uuid4())

    result = await saga_cli(isolated.harness, "dlq", "redrive", unknown, str(pending)[:13],
                            str(done), "--actor", "it-operator")

    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stdout.splitlines() == [
        "redriven 1, already redriven 1 (nothing done), not found 1",
        f"  redriven          {pending}", f"  already redriven  {done}",
        f"  not found         {unknown}"]
    assert result.stderr == f"saga: no dead letter with id {unknown}\n"
    assert (await _redriven_at(isolated.engine))[pending] is not None


async def test_an_ambiguous_prefix_is_refused_and_nothing_is_redriven(
        isolated: Isolated) -> None:
    shared = uuid.uuid4().hex[:20]
    ids = [uuid.UUID(shared + uuid.uuid4().hex[20:]) for _ in range(2)]
    for dead_letter_id in ids:
        await insert_letter(isolated.engine, Letter(b"{}", dead_letter_id=dead_letter_id))

    shown = await saga_cli(isolated.harness, "dlq", "show", shared[:8])
    redriven = await saga_cli(isolated.harness, "dlq", "redrive", shared[:8])

    for result in (shown, redriven):
        assert (result.returncode, result.stdout) == (3, ""), result.stderr
        assert f"dead letter id prefix '{shared[:8]}' is ambiguous" in result.stderr
        assert all(str(i) in result.stderr for i in ids)
    assert set((await _redriven_at(isolated.engine)).values()) == {None}


async def test_list_is_newest_first_filtered_and_limited(isolated: Isolated) -> None:
    now = datetime.now(UTC)
    oldest = await insert_letter(isolated.engine, Letter(b"1", "UNKNOWN_CURRENCY",
                                                         failed_at=now - timedelta(minutes=3)))
    middle = await insert_letter(isolated.engine, Letter(b"2", "MALFORMED_JSON",
                                                         failed_at=now - timedelta(minutes=2)))
    redriven = await insert_letter(isolated.engine, Letter(
        b"3", "UNKNOWN_CURRENCY", failed_at=now - timedelta(minutes=1), redriven_at=now))

    def ids(result: Any) -> list[str]:
        return [item["dead_letter_id"] for item in _json_ok(result)]

    cli = isolated.harness
    assert ids(await saga_cli(cli, "dlq", "list", "--json")) == [str(middle), str(oldest)]
    assert ids(await saga_cli(cli, "dlq", "list", "--all", "--json")) == [
        str(redriven), str(middle), str(oldest)]
    assert ids(await saga_cli(cli, "dlq", "list", "--all", "--reason", "UNKNOWN_CURRENCY",
                              "--json")) == [str(redriven), str(oldest)]
    assert ids(await saga_cli(cli, "dlq", "list", "--all", "--limit", "1", "--json")) == [
        str(redriven)]

    table = await saga_cli(cli, "dlq", "list", "--all")

    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["id", "last", "failed", "(UTC)", "stage", "reason", "att",
                              "original", "record", "saga", "saga", "type", "business", "key",
                              "redriven", "(UTC)"]
    assert [line[:8] for line in lines] == [str(i)[:8] for i in (redriven, middle, oldest)]
    assert "MALFORMED_JSON" in lines[1] and "transfers.commands.v1[0]@" in lines[1]
    assert lines[0].endswith(now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"))


async def test_show_prints_binary_payloads_and_headers_as_base64(isolated: Isolated) -> None:
    dead_letter_id = await insert_letter(isolated.engine, Letter(
        b"\x00\xffbinary", headers=(("blob", b"\xfe\x01"), ("trace", b"t-1"))))

    shown = _json_ok(await saga_cli(isolated.harness, "dlq", "show", str(dead_letter_id),
                                    "--json"))
    as_text = await saga_cli(isolated.harness, "dlq", "show", str(dead_letter_id))

    assert shown["payload"] == {"value": base64.b64encode(b"\x00\xffbinary").decode(),
                                "encoding": "base64", "size_bytes": 8, "truncated": False}
    assert [(h["name"], h["value"], h["encoding"]) for h in shown["headers"]] == [
        ("blob", "/gE=", "base64"), ("trace", "t-1", "utf-8")]
    assert as_text.returncode == 0, as_text.stderr
    assert "  blob: /gE=  (base64)" in as_text.stdout
    assert "payload         8 bytes, shown as base64" in as_text.stdout


async def test_list_refuses_an_unknown_reason_code_and_takes_any_case(
        isolated: Isolated) -> None:
    """`--reason nope` said "no dead letters", as if the code existed and nothing had it."""
    letter = await insert_letter(isolated.engine, Letter(b"x", "UNKNOWN_CURRENCY"))

    refused = await saga_cli(isolated.harness, "dlq", "list", "--reason", "nope")
    listed = _json_ok(await saga_cli(isolated.harness, "dlq", "list", "--reason",
                                     "unknown_currency", "--json"))

    assert (refused.returncode, refused.stdout) == (2, ""), refused.stderr
    assert "argument --reason: no reason code 'nope'; the codes: MALFORMED_JSON," in (
        refused.stderr)
    assert "Traceback" not in refused.stderr
    assert [item["dead_letter_id"] for item in listed] == [str(letter)]


async def test_show_truncates_a_large_payload_unless_asked_and_writes_it_whole(
        isolated: Isolated, tmp_path: Path) -> None:
    """A 2 MB payload wrote 2 MB to the terminal. Shown: the first 4096 bytes and how to get
    the rest; `--full` prints it all, `--out FILE` writes the original bytes, never over a file
    that exists."""
    payload = b'{"blob":"' + b"\xc3\xa9" * 1_000_000 + b'"}'  # 2 MB of UTF-8, "é"s
    dead_letter_id = await insert_letter(isolated.engine, Letter(payload))
    short = str(dead_letter_id)[:8]
    cli = isolated.harness

    as_text = await saga_cli(cli, "dlq", "show", short)
    as_json = _json_ok(await saga_cli(cli, "dlq", "show", short, "--json"))
    full = _json_ok(await saga_cli(cli, "dlq", "show", short, "--json", "--full"))
    out = tmp_path / "payload.bin"
    written = await saga_cli(cli, "dlq", "show", short, "--out", str(out))
    again = await saga_cli(cli, "dlq", "show", short, "--out", str(out))

    assert as_text.returncode == 0, as_text.stderr
    assert len(as_text.stdout) < 10_000
    assert f"payload         {len(payload)} bytes, shown as utf-8" in as_text.stdout
    assert (f"... truncated: only the first 4096 bytes of the payload and of each header are"
            f" shown; `saga dlq show {short} --full` prints all, `saga dlq show {short} --out"
            " FILE` writes the original payload to FILE") in as_text.stdout
    # cut inside a two-byte character: the half character is left out, nothing else
    assert as_json["payload"] == {"value": payload[:4095].decode(), "encoding": "utf-8",
                                  "size_bytes": len(payload), "truncated": True}
    assert full["payload"] == {"value": payload.decode(), "encoding": "utf-8",
                               "size_bytes": len(payload), "truncated": False}
    assert written.returncode == 0, written.stderr
    assert out.read_bytes() == payload
    assert f"payload written to {out} ({len(payload)} bytes)" in written.stdout
    assert again.returncode == 2, again.stderr
    assert again.stderr.startswith(f"saga: --out {out}: File exists (it must name a new file)")
    assert out.read_bytes() == payload
