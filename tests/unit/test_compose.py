"""The Docker Compose stack agrees with the code it runs.

No Docker engine is needed for most of this: the compose file is read with PyYAML and checked
against `Settings` (every `SAGA_*` variable is a real setting and parses), the CLI parser (every
worker command is a valid `saga worker ...`), and itself (the URLs the workers get point at the
services and ports that exist). Only `test_docker_compose_config` needs a running engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from orchestrator.cli import build_parser, cmd_worker
from orchestrator.kafka.consumer import PARTICIPANTS
from orchestrator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"

WORKERS = {
    "orchestrator": ["orchestrator"],
    "relay": ["relay"],
    "recovery": ["recovery"],
    "participant-risk": ["participant", "risk"],
    "participant-ledger": ["participant", "ledger"],
    "participant-notify": ["participant", "notify"],
}
INFRASTRUCTURE = ("kafka", "postgres", "otel-collector", "prometheus", "grafana", "jaeger")
PREFIX = Settings.model_config.get("env_prefix", "")

# Compose's interpolation: `$$` is a literal dollar; `${VAR}`, `${VAR:-default}`, `${VAR-default}`
# and `$VAR` are substituted (the `?` forms, which demand a value, are not used here).
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, env: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        current = env.get(name)
        if match["op"] == ":-" and not current:
            return match["default"]
        if match["op"] == "-" and current is None:
            return match["default"]
        return current or ""

    return _VARIABLE.sub(substitute, value)


def variables_in(value: str) -> list[tuple[str, bool]]:
    """(name, has a default) of every variable `value` refers to."""
    return [(m["braced"] or m["bare"], m["op"] is not None)
            for m in _VARIABLE.finditer(value) if not m["escaped"]]


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


def environment(service: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment with the variables interpolated (defaults only, by default)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):  # the `- NAME=value` form
        raw = dict(item.partition("=")[::2] for item in raw)
    return {name: interpolate(str(value), env or {}) for name, value in raw.items()}


def listeners(spec: str) -> dict[str, tuple[str, int]]:
    """`NAME://host:port,...` as {NAME: (host, port)}; an empty host means every interface."""
    parsed = {}
    for item in spec.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        parsed[name] = (host, int(port))
    return parsed


def container_ports(service: dict[str, Any]) -> set[int]:
    """The container side of each `ports` mapping (`[ip:]host:container[/proto]`)."""
    ports = set()
    for mapping in service.get("ports") or []:
        container = str(mapping).rsplit(":", 1)[-1].split("/")[0]
        ports.add(int(container))
    return ports


def test_every_service_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (*INFRASTRUCTURE, *WORKERS):
        assert name in services, f"service {name!r} missing from {COMPOSE_FILE}"


def test_every_saga_variable_is_a_setting(compose: dict[str, Any]) -> None:
    fields = {f"{PREFIX}{name}".upper() for name in Settings.model_fields}
    for name in WORKERS:
        used = {key for key in environment(compose["services"][name])
                if key.upper().startswith(PREFIX.upper())}
        unknown = {key for key in used if key.upper() not in fields}
        assert not unknown, f"{name} sets {sorted(unknown)}, which Settings does not read"


def test_worker_environment_parses_as_settings(compose: dict[str, Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for name in WORKERS:
        for key in list(os.environ):
            if key.upper().startswith(PREFIX.upper()):
                monkeypatch.delenv(key)
        env = environment(compose["services"][name])
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.database_url == env["SAGA_DATABASE_URL"], name
        assert settings.kafka_bootstrap == env["SAGA_KAFKA_BOOTSTRAP"], name
        assert not settings.embedded, f"{name} would start an embedded stack"


def test_database_url_points_at_the_postgres_service(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    pg_env = environment(postgres)
    for name in WORKERS:
        url = urlsplit(environment(compose["services"][name])["SAGA_DATABASE_URL"])
        assert url.scheme == "postgresql+asyncpg", name
        assert url.hostname == "postgres", name
        # The container side of the published port is where postgres listens (PGPORT unset).
        assert url.port in container_ports(postgres), f"{name}: postgres does not listen there"
        assert "PGPORT" not in pg_env and url.port == 5432, name
        assert url.path == "/" + pg_env["POSTGRES_DB"], name
        assert url.username == pg_env["POSTGRES_USER"], name
        assert url.password == pg_env["POSTGRES_PASSWORD"], name


def test_database_credentials_follow_the_env_file(compose: dict[str, Any]) -> None:
    env = {"POSTGRES_USER": "alice", "POSTGRES_PASSWORD": "correct-horse"}
    pg_env = environment(compose["services"]["postgres"], env)
    for name in WORKERS:
        url = urlsplit(environment(compose["services"][name], env)["SAGA_DATABASE_URL"])
        assert (url.username, url.password) == ("alice", "correct-horse"), name
        assert (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"]) == (url.username,
                                                                          url.password)


def test_kafka_bootstrap_is_an_internal_listener(compose: dict[str, Any]) -> None:
    kafka_env = environment(compose["services"]["kafka"])
    bound = listeners(kafka_env["KAFKA_LISTENERS"])
    advertised = listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    controllers = set(kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(","))
    for name in WORKERS:
        for address in environment(compose["services"][name])["SAGA_KAFKA_BOOTSTRAP"].split(","):
            host, _, port = address.rpartition(":")
            assert host == "kafka", f"{name}: bootstrap {address} is not the kafka service"
            matching = [listener for listener, (adv_host, adv_port) in advertised.items()
                        if adv_host == "kafka" and adv_port == int(port)]
            assert matching, f"{name}: kafka advertises no listener at {address}"
            for listener in matching:
                assert listener not in controllers, f"{name}: {address} is the controller"
                assert bound.get(listener, ("", -1))[1] == int(port), (
                    f"{name}: listener {listener} is not bound on port {port}")


def test_every_worker_sets_the_stack(compose: dict[str, Any]) -> None:
    for name in WORKERS:
        env = environment(compose["services"][name])
        assert env.get("SAGA_DATABASE_URL"), name
        assert env.get("SAGA_KAFKA_BOOTSTRAP"), name


def test_worker_commands_are_valid_cli_invocations(compose: dict[str, Any]) -> None:
    parser = build_parser()
    for name, expected in WORKERS.items():
        command = compose["services"][name]["command"]
        argv = command.split() if isinstance(command, str) else [str(a) for a in command]
        assert argv[0] == "saga", f"{name}: {argv}"
        args = parser.parse_args(argv[1:])
        assert args.command == "worker", name
        assert args.run is cmd_worker, name
        assert [args.kind, *([args.name] if args.name else [])] == expected, name
        if args.kind == "participant":
            assert args.name in PARTICIPANTS, f"{name}: no participant {args.name!r}"


def test_workers_build_the_project_dockerfile(compose: dict[str, Any]) -> None:
    for name in WORKERS:
        build = compose["services"][name]["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context} is not the repository root"
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        text = dockerfile.read_text()
        assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
        assert "pip install ." in text


def test_otel_collector_config_is_mounted_and_logs_traces(compose: dict[str, Any]) -> None:
    collector = compose["services"]["otel-collector"]
    mounts = [str(volume).split(":") for volume in collector["volumes"]]
    sources = [(COMPOSE_DIR / source).resolve() for source, *_ in mounts]
    config_path = COMPOSE_DIR / "otel-collector.yaml"
    assert config_path.resolve() in sources
    config = yaml.safe_load(config_path.read_text())
    traces = config["service"]["pipelines"]["traces"]
    assert set(traces["receivers"]) <= set(config["receivers"])
    assert set(traces["exporters"]) <= set(config["exporters"])
    assert "debug" in traces["exporters"]


def test_traces_go_from_every_worker_through_the_collector_to_jaeger(
        compose: dict[str, Any]) -> None:
    """How a saga's trace is seen with the stack (README): workers export spans over OTLP/HTTP
    to the collector, which forwards them to Jaeger, whose UI is published on the host."""
    for name in WORKERS:
        env = environment(compose["services"][name])
        assert env["OTEL_TRACES_EXPORTER"] == "otlp", name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318", name
    assert 4318 in container_ports(compose["services"]["otel-collector"])
    config = yaml.safe_load((COMPOSE_DIR / "otel-collector.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    forwards = [config["exporters"][name]
                for name in config["service"]["pipelines"]["traces"]["exporters"]
                if name.split("/")[0] == "otlp"]
    assert [exporter["endpoint"] for exporter in forwards] == ["jaeger:4317"]
    assert forwards[0]["tls"]["insecure"] is True  # inside the compose network
    jaeger = compose["services"]["jaeger"]
    assert environment(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"
    assert 16686 in container_ports(jaeger)
    assert "jaeger" in compose["services"]["otel-collector"]["depends_on"]


def strings_in(node: Any) -> list[str]:
    """Every string value of a YAML document (what compose interpolates; not the comments)."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings_in(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings_in(value)]
    return [node] if isinstance(node, str) else []


def test_variables_have_defaults_and_are_documented(compose: dict[str, Any]) -> None:
    documented = env_example()
    used = [variable for value in strings_in(compose) for variable in variables_in(value)]
    assert used, "the compose file was expected to take its credentials from variables"
    for name, has_default in used:
        assert has_default, f"${{{name}}} has no default: `up` without an env file would fail"
        assert name in documented, f"{name} is used by the compose file but not in .env.example"


def test_no_service_names_a_credential_literally(compose: dict[str, Any]) -> None:
    raw = compose  # as written, before interpolation
    password = raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${POSTGRES_PASSWORD"), "the password must come from the env file"
    for name in WORKERS:
        url = raw["services"][name]["environment"]["SAGA_DATABASE_URL"]
        assert "${POSTGRES_PASSWORD" in url and "${POSTGRES_USER" in url, name


def _docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.docker
def test_docker_compose_config() -> None:
    if not _docker_engine_answers():
        pytest.skip("no Docker engine answers `docker info`")
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20,
                             check=False)
    if version.returncode != 0:
        pytest.skip("the Docker engine answers but the compose plugin is not installed")
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--format", "yaml"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(rendered["services"]) == {*INFRASTRUCTURE, *WORKERS}
    for name in WORKERS:
        assert rendered["services"][name]["environment"]["SAGA_KAFKA_BOOTSTRAP"] == "kafka:9092"
