"""vapora.deploy's rendering (pure) and the config hooks a deployment relies on: passwords from
the environment, the stream's replica count."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vapora import deploy
from vapora.config import apply_env, default_config, parse_config
from vapora.errors import ConfigError

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_passwords_are_environment_variables_unless_given() -> None:
    text = deploy.render_accounts()
    for user in deploy.USERS:
        assert f"password: ${deploy.password_variable(user)}\n" in text
    given = deploy.render_accounts({user: f'p"{user}' for user in deploy.USERS})
    assert 'password: "p\\"router"' in given and "$VAPORA_" not in given


def test_only_admin_may_remove_history_and_clients_only_ask() -> None:
    rules = deploy.permissions()
    for user in ("router", "provider", "budget", "ledger"):
        assert set(deploy.DENIED_TO_ACTORS) <= set(rules[user].publish_deny)
    assert rules["client"].publish == deploy.PUBLIC_REQUESTS
    assert rules["client"].subscribe == ("_INBOX.>",)
    assert rules["admin"].publish == (">",) and not rules["admin"].publish_deny


def test_each_event_family_has_exactly_one_writer_role() -> None:
    rules = deploy.permissions()
    families = {
        "vapora.events.route": "router",
        "vapora.events.call.>": "provider",
        "vapora.events.spend.>": "provider",
        "vapora.events.health.>": "provider",
        "vapora.events.budget": "budget",
    }
    for subject, owner in families.items():
        writers = [u for u in deploy.USERS if subject in rules[u].publish]
        assert writers == [owner], subject


def test_a_node_routes_to_every_node_and_fsyncs_always() -> None:
    text = deploy.render_node(1, nodes=3)
    assert 'server_name: "nats-2"' in text and "sync_interval: always" in text
    assert text.count("nats-route://") == 3 and "tls {" not in text


def test_nats_credentials_come_from_the_environment() -> None:
    config = default_config(at=NOW)
    env = {"VAPORA_NATS_USER": "router", "VAPORA_NATS_PASSWORD": "s3cret"}
    applied = apply_env(config, env)
    assert (applied.nats.user, applied.nats.password) == ("router", "s3cret")
    assert "s3cret" not in repr(applied.nats)
    assert apply_env(config, {}) is config
    with pytest.raises(ConfigError, match="VAPORA_NATS_PASSWORD: needs a user"):
        apply_env(config, {"VAPORA_NATS_PASSWORD": "s3cret"})


@pytest.mark.parametrize("replicas", [0, 6])
def test_storage_replicas_must_be_a_jetstream_replica_count(replicas: int) -> None:
    text = f"[[providers]]\nname = 'ollama'\nmodel = 'llama2'\n[storage]\nreplicas = {replicas}\n"
    with pytest.raises(ConfigError, match=r"storage\.replicas: must be in 1\.\.5"):
        parse_config(text, source="t.toml", at=NOW)
    ok = text.replace(f"replicas = {replicas}", "replicas = 3")
    assert parse_config(ok, source="t.toml", at=NOW).storage.replicas == 3
