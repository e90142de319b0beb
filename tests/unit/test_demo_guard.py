"""`saga demo` pointed at an external stack refuses before it connects to anything, unless
`--allow-external-stack` asks for it: settings left in a shell must not turn a demo into
accounts and transfers in someone's real ledger.

"External" here is a socket of the test's own, named as both the database and the broker: it
counts every connection made to it, so "refused before any connection" is measured, not
assumed."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator

import pytest

from orchestrator import cli

PASSWORD = "do-not-print-me"


class Listener:
    """Accepts and at once closes every connection, counting them."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.port = self._socket.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _keep_sigterm() -> Iterator[None]:
    """`cli.main` makes SIGTERM raise KeyboardInterrupt; give pytest its own handler back."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _point_at(monkeypatch: pytest.MonkeyPatch, listener: Listener, database: bool,
              broker: bool) -> None:
    for name in ("SAGA_DATABASE_URL", "SAGA_KAFKA_BOOTSTRAP", "SAGA_TOPIC_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    if database:
        monkeypatch.setenv("SAGA_DATABASE_URL", f"postgresql+asyncpg://ledger:{PASSWORD}"
                                                f"@127.0.0.1:{listener.port}/payments")
    if broker:
        monkeypatch.setenv("SAGA_KAFKA_BOOTSTRAP", f"127.0.0.1:{listener.port}")


@pytest.mark.parametrize(("database", "broker"), [(True, True), (True, False), (False, True)])
def test_demo_refuses_an_external_stack_before_connecting(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], listener: Listener,
        database: bool, broker: bool) -> None:
    _point_at(monkeypatch, listener, database, broker)

    code = cli.main(["demo", "-n", "25"])

    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == ""
    assert err.startswith("saga: refusing to run the demo against an external stack")
    assert "publish 25 transfer requests" in err
    assert "open 53 demo accounts" in err
    assert "pass --allow-external-stack" in err and "unset both variables" in err
    if database:
        assert f"127.0.0.1:{listener.port}/payments" in err
    if broker:
        assert f"the Kafka at 127.0.0.1:{listener.port}" in err
    assert PASSWORD not in err
    assert "Traceback" not in err and "starting" not in err
    assert listener.connections == 0


def test_allowed_but_half_configured_is_a_usage_error_before_connecting(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        listener: Listener) -> None:
    _point_at(monkeypatch, listener, database=False, broker=True)

    code = cli.main(["demo", "-n", "5", "--allow-external-stack"])

    _, err = capsys.readouterr()
    assert code == 2
    assert "needs both SAGA_DATABASE_URL and SAGA_KAFKA_BOOTSTRAP" in err
    assert listener.connections == 0


@pytest.mark.timeout(60)
def test_allowed_the_demo_does_go_to_the_external_stack(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        listener: Listener) -> None:
    """The flag is what stands between the demo and the stack: given it, the demo connects
    (here to a socket that hangs up, so it fails right there)."""
    _point_at(monkeypatch, listener, database=True, broker=True)

    with pytest.raises(OSError):  # the driver's "connection lost"
        cli.main(["demo", "-n", "5", "--allow-external-stack"])

    assert listener.connections >= 1
    assert "refusing" not in capsys.readouterr().err
