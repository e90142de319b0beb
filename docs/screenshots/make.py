"""Take the console's screenshots in this folder again, from a real stack.

    .venv/bin/python docs/screenshots/make.py

It starts the embedded PostgreSQL and broker, runs the workers as processes (with a screening
provider that answers in 40 ms and fails 30% of its calls, so retries show), publishes a
few transfers (most complete; some exceed their source's daily limit and are compensated after
the credit; one names a denied party and is turned back in the parallel stage; one has no valid
amount; one is not JSON), serves the console in dev mode, and photographs it with headless
Chromium (the system's `chromium`, or SAGA_CHROMIUM) at 1366x768. Everything it started is
stopped at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from playwright.async_api import Page, async_playwright
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.console import ConsoleServer, Role
from orchestrator.dev import EmbeddedStack, WorkerProcesses, settings_for
from orchestrator.settings import Settings
from orchestrator.workers.runner import prepare
from schemas import TOPIC_TRANSFER_COMMANDS
from steps import APPLICATION
from steps.ledger import open_account

HERE = Path(__file__).resolve().parent
VIEWPORT = {"width": 1366, "height": 768}
DENIED = "acct-9051-7734"
TERMINAL = ("COMPLETED", "COMPENSATED", "REJECTED", "FAILED")


async def open_accounts(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        for account, balance, limit in (
                ("acct-4410-2290", "25000.00", None), ("acct-7781-0456", "800.00", None),
                ("acct-3302-1187", "12000.00", "500.00"), ("acct-6620-9943", "0.00", None),
                (DENIED, "100.00", None)):
            await open_account(conn, account, "EUR", Decimal(balance),
                               Decimal(limit) if limit else None)


def requests() -> list[dict[str, Any]]:
    def transfer(source: str, destination: str, amount: str, reference: str) -> dict[str, Any]:
        return {"transfer_id": str(uuid.uuid4()), "source_account": source,
                "destination_account": destination, "amount": amount, "currency": "EUR",
                "reference": reference, "requested_by": "payments-api"}

    return [
        transfer("acct-4410-2290", "acct-6620-9943", "120.00", "invoice 2026-118"),
        transfer("acct-7781-0456", "acct-4410-2290", "42.50", "dinner split"),
        transfer("acct-3302-1187", "acct-6620-9943", "1250.00", "supplier run, batch 7"),
        transfer("acct-4410-2290", "acct-7781-0456", "310.00", "rent share"),
        transfer("acct-3302-1187", "acct-7781-0456", "980.00", "payroll advance"),
        transfer("acct-3302-1187", "acct-4410-2290", "640.00", "refund, order 5521"),
        transfer("acct-3302-1187", "acct-6620-9943", "720.00", "equipment lease"),
        transfer("acct-4410-2290", DENIED, "75.00", "marketplace payout"),
        transfer("acct-7781-0456", "acct-6620-9943", "19.99", "subscription"),
        transfer("acct-4410-2290", "acct-3302-1187", "2200.00", "intercompany"),
        {**transfer("acct-4410-2290", "acct-6620-9943", "12,50", "typo in amount")},
    ]


async def wait_terminal(engine: AsyncEngine, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with engine.connect() as conn:
            done = (await conn.execute(text(
                "SELECT count(*) FROM sagas WHERE status = ANY(:s)"),
                {"s": list(TERMINAL)})).scalar_one()
        if done >= count:
            return
        await asyncio.sleep(0.2)
    raise SystemExit(f"only {done} of {count} sagas ended in {timeout_s} s")


async def saga_with_most_events(engine: AsyncEngine, status: str, amount: str) -> str:
    async with engine.connect() as conn:
        return str((await conn.execute(text(
            "SELECT saga_id FROM sagas WHERE status = :s AND state->'input'->>'amount' LIKE :a"
            " ORDER BY version DESC LIMIT 1"), {"s": status, "a": amount})).scalar_one())


async def shoot(page: Page, name: str) -> None:
    await page.wait_for_load_state("networkidle")
    path = HERE / name
    await page.screenshot(path=str(path))
    print(f"wrote {path.relative_to(HERE.parents[1])}")


async def main() -> None:
    chromium = (os.environ.get("SAGA_CHROMIUM") or shutil.which("chromium")
                or shutil.which("chromium-browser"))
    if chromium is None:
        raise SystemExit("no Chromium: apt-get install chromium (or set SAGA_CHROMIUM)")
    with EmbeddedStack() as stack, tempfile.TemporaryDirectory() as logs:
        settings = settings_for(stack, Settings(
            topic_prefix="shots.", risk_latency_ms=40, risk_failure_rate=0.3,
            risk_denied_accounts=[DENIED]))
        engine = await prepare(settings, APPLICATION)
        workers = WorkerProcesses(settings, Path(logs))
        try:
            workers.start()
            await workers.wait_ready(engine)
            await open_accounts(engine)
            producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
            topic = settings.topic(TOPIC_TRANSFER_COMMANDS)
            sent = requests()
            for request in sent:
                producer.produce(topic, json.dumps(request).encode(),
                                 key=request["transfer_id"].encode())
                await asyncio.sleep(0.15)  # spread over time, as traffic is
            producer.produce(topic, b'{"transfer_id": "8c1f", "amount": 12', key=b"8c1f")
            producer.produce(topic, b"\xff\xfe not even text", key=b"0042")
            producer.produce(topic, b"", key=b"0043")
            producer.flush(10)
            await wait_terminal(engine, len(sent))
            # Of the transfers over their daily limit, the one with most events (retries).
            compensated = await saga_with_most_events(engine, "COMPENSATED", "%0.00")
            denied = await saga_with_most_events(engine, "COMPENSATED", "75.00")
            # Caught while they run: the list shows them as such.
            for request in requests()[:3]:
                producer.produce(topic, json.dumps(request).encode(),
                                 key=request["transfer_id"].encode())
            producer.flush(10)
            async with engine.connect() as conn:
                letter = (await conn.execute(text(
                    "SELECT dead_letter_id FROM dead_letters ORDER BY last_failed_at DESC"
                    " LIMIT 1"))).scalar_one()

            async with ConsoleServer(settings, engine, APPLICATION.saga_types, port=0,
                                     dev=True) as console, async_playwright() as driver:
                assert console.dev is not None
                browser = await driver.chromium.launch(executable_path=chromium)
                page = await browser.new_page(viewport=VIEWPORT)
                await page.goto(console.dev.login_url(Role.OPERATOR))
                await shoot(page, "saga-list.png")
                await page.goto(f"{console.url}/sagas/{compensated}")
                await shoot(page, "saga-timeline-compensated.png")
                await page.goto(f"{console.url}/sagas/{denied}")
                await shoot(page, "saga-timeline-parallel-denied.png")
                await page.goto(f"{console.url}/dead-letters")
                await shoot(page, "dead-letters.png")
                await page.goto(f"{console.url}/dead-letters/{letter}")
                await shoot(page, "dead-letter.png")
                viewer = await browser.new_page(viewport=VIEWPORT)
                await viewer.goto(console.dev.login_url(Role.VIEWER))
                await viewer.goto(f"{console.url}/sagas/{compensated}")
                await shoot(viewer, "saga-timeline-viewer.png")
                await browser.close()
        finally:
            workers.stop()
            await engine.dispose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
