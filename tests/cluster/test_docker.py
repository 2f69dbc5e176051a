"""docker/: Docker cannot run here, so the image, the compose file and the NATS configs are
checked as files: valid YAML, real `vapora` commands, files that exist, no secret in them, the
topology the operations doc promises, generated configs that are current and that nats-server
itself accepts."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from actors.connection import ConnectOptions, connect
from actors.server import EmbeddedNats, find_nats_server
from tests.cluster.certs import TlsFiles
from vapora import deploy
from vapora.cli import _parser
from vapora.cli import health as health_cli
from vapora.config import load_config
from vapora.deploy import ServerTls, render_tls

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY", re.IGNORECASE)
INTERPOLATION = re.compile(r"^\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def vapora_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") == "vapora:local"
    }


def test_every_vapora_service_runs_a_real_vapora_command(compose: dict[str, Any]) -> None:
    services = vapora_services(compose)
    assert services
    for name, service in services.items():
        args = _parser().parse_args(service["command"])  # SystemExit on anything unknown
        assert args.command == "actor", name


def test_every_health_check_is_a_real_health_command(compose: dict[str, Any]) -> None:
    parser = argparse.ArgumentParser()
    health_cli._arguments(parser)
    for name, service in vapora_services(compose).items():
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "vapora.cli.health"], name
        assert parser.parse_args(test[4:]).service, name


def test_every_provider_actor_names_a_configured_provider(compose: dict[str, Any]) -> None:
    config = load_config(DOCKER / "vapora.toml", at=datetime.now(UTC))
    served = {
        service["command"][-1]
        for service in vapora_services(compose).values()
        if service["command"][1] == "provider"
    }
    assert served == {p.name for p in config.providers}


def test_the_topology_is_three_nodes_two_routers_and_several_actors_per_provider(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    nodes = [name for name, s in services.items() if str(s.get("image", "")).startswith("nats:")]
    assert nodes == ["nats-1", "nats-2", "nats-3"]
    replicas = {
        name: s.get("deploy", {}).get("replicas", 1) for name, s in vapora_services(compose).items()
    }
    assert replicas["router"] == 2
    assert all(n >= 2 for name, n in replicas.items() if name.startswith("provider-"))
    assert replicas["budget"] == 1 and replicas["ledger"] == 1
    assert any(v.endswith(":/data") for v in services["ledger"]["volumes"])
    assert "ledger-data" in compose["volumes"]
    # A provider actor's held events (spend the log has not taken yet) live in its data
    # directory: on a volume, not in a container's layer that a recreate throws away.
    for name in (n for n in services if n.startswith("provider-")):
        [data] = [v for v in services[name]["volumes"] if v.endswith(":/data")]
        assert data.split(":")[0] in compose["volumes"], name
    profiles = {p for s in services.values() for p in s.get("profiles", [])}
    assert {"otel", "prometheus"} <= profiles
    assert {"otel-collector", "jaeger"} <= {
        n for n, s in services.items() if "otel" in s.get("profiles", [])
    }
    assert "prometheus" in services


def test_every_node_fsyncs_always_and_routes_to_the_others() -> None:
    for n in (1, 2, 3):
        text = (DOCKER / "nats" / f"nats-{n}.conf").read_text()
        assert "sync_interval: always" in text
        assert f'server_name: "nats-{n}"' in text
        for other in (1, 2, 3):
            assert f"nats-route://nats-{other}:6222" in text
        assert "verify: true" in text and 'include "accounts.conf"' in text


def _host_paths(compose: dict[str, Any]) -> list[str]:
    paths = []
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                paths.append(source)
    return paths


def test_every_referenced_file_exists(compose: dict[str, Any]) -> None:
    for source in _host_paths(compose):
        assert (DOCKER / source).exists(), source
    for service in vapora_services(compose).values():
        context = (DOCKER / service["build"]["context"]).resolve()
        assert context == ROOT
        assert (context / service["build"]["dockerfile"]).is_file()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore or f"!{source}/" in ignore, source


def test_the_image_is_small_non_root_with_vapora_as_entry_point_and_a_health_check() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "-slim" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["vapora"\]', text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n?.*vapora\.cli\.health", text, re.MULTILINE)


def _environment_values(compose: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for service in compose["services"].values():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        pairs += [(key, str(value)) for key, value in environment.items()]
    return pairs


def test_no_secret_is_written_in_the_compose_file_the_image_or_the_configs(
    compose: dict[str, Any],
) -> None:
    for key, value in _environment_values(compose):
        if SECRET_NAME.search(key):
            assert INTERPOLATION.match(value), f"{key} must come from the environment"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert not re.search(r"^(ENV|ARG)\b.*" + SECRET_NAME.pattern, dockerfile, re.MULTILINE)
    nats = tomllib.loads((DOCKER / "vapora.toml").read_text())["nats"]
    assert not {"password", "token", "user", "url"} & set(nats), "these come from the environment"
    for password in re.findall(r"password: (\S+)", (DOCKER / "nats" / "accounts.conf").read_text()):
        assert re.fullmatch(r"\$VAPORA_[A-Z]+_PASSWORD", password)
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_the_env_example_names_every_variable_the_compose_file_requires(
    compose: dict[str, Any],
) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = set(re.findall(r"^([A-Z0-9_]+)=", (DOCKER / "env.example").read_text(), re.MULTILINE))
    assert required <= example
    passwords = {deploy.password_variable(user) for user in deploy.USERS}
    assert passwords <= required


def test_the_checked_in_nats_configs_are_what_the_generator_renders() -> None:
    assert deploy.main(["--check", "--out", str(DOCKER / "nats")]) == 0


def test_the_generator_check_notices_a_stale_file(tmp_path: Path) -> None:
    assert deploy.main(["--out", str(tmp_path)]) == 0
    (tmp_path / "accounts.conf").write_text("# edited by hand\n")
    assert deploy.main(["--check", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("node", [1, 2, 3])
def test_nats_server_accepts_each_node_config(
    node: int, tmp_path: Path, tls_files: TlsFiles
) -> None:
    for name in ("accounts.conf", f"nats-{node}.conf"):
        text = (DOCKER / "nats" / name).read_text()
        text = text.replace("/etc/nats/certs/", f"{tls_files.ca.parent}/")
        text = text.replace("/data/jetstream", str(tmp_path / "jetstream"))
        (tmp_path / name).write_text(text)
    env = {**os.environ, **{deploy.password_variable(u): "x" for u in deploy.USERS}}
    check = [find_nats_server(), "-t", "-c", str(tmp_path / f"nats-{node}.conf")]
    result = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    # Without the passwords in its environment, the server refuses to start.
    env.pop("VAPORA_ROUTER_PASSWORD")
    result = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "VAPORA_ROUTER_PASSWORD" in result.stdout + result.stderr


def test_telemetry_reaches_the_collector_and_prometheus_scrapes_every_actor(
    compose: dict[str, Any],
) -> None:
    config = load_config(DOCKER / "vapora.toml", at=datetime.now(UTC))
    collector = yaml.safe_load((DOCKER / "otel" / "collector.yaml").read_text())
    http_port = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1]
    environments = dict(_environment_values(compose))
    # vapora's OTLP exporter speaks OTLP over HTTP: the collector's http receiver.
    assert environments["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{http_port}"
    assert "otel" in compose["services"]["otel-collector"]["profiles"]
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    [vapora_job] = [j for j in prometheus["scrape_configs"] if j["job_name"] == "vapora"]
    [sd] = vapora_job["dns_sd_configs"]
    assert set(sd["names"]) == set(vapora_services(compose))
    assert sd["port"] == config.telemetry.prometheus_port
    assert config.telemetry.enabled


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.anyio
async def test_the_documented_certificate_recipe_makes_files_nats_and_vapora_accept(
    tmp_path: Path,
) -> None:
    readme = (DOCKER / "certs" / "README.md").read_text()
    recipe = readme.split("```sh\n", 1)[1].split("```", 1)[0].replace("cd docker/certs\n", "")
    (tmp_path / "recipe.sh").write_text(recipe)
    subprocess.run(
        ["bash", "-e", "recipe.sh"], cwd=tmp_path, check=True, capture_output=True, timeout=60
    )
    tls = ServerTls(
        cert_file=str(tmp_path / "server.pem"),
        key_file=str(tmp_path / "server-key.pem"),
        ca_file=str(tmp_path / "ca.pem"),
    )
    async with EmbeddedNats(tmp_path / "nats", extra_config=render_tls(tls)) as server:
        options = ConnectOptions.from_url(
            server.url,
            tls_ca_file=str(tmp_path / "ca.pem"),
            tls_cert_file=str(tmp_path / "client.pem"),
            tls_key_file=str(tmp_path / "client-key.pem"),
        )
        nc = await connect(options)
        assert nc.is_connected
        await nc.close()
