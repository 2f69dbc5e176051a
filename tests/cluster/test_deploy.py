"""vapora.deploy's rendering (pure) and the config hooks a deployment relies on: passwords from
the environment, the stream's replica count."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from events import subjects
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
    # Its requests, and the cancel of a stream it stops reading (which the provider actors hear).
    assert rules["client"].publish == (*deploy.PUBLIC_REQUESTS, "vapora.stream.cancel")
    assert rules["client"].subscribe == ("_INBOX.client.>",)
    assert "vapora.stream.cancel" in rules["provider"].subscribe
    assert rules["admin"].publish == (">",) and not rules["admin"].publish_deny


def test_each_user_receives_replies_under_its_own_inbox_only() -> None:
    """Every user could subscribe to all of `_INBOX.>`, and so read the replies to every other
    user's requests: completions, spend, admissions."""
    rules = deploy.permissions(clients=("billing",))
    for user, rule in rules.items():
        inboxes = [s for s in rule.subscribe if s.startswith("_INBOX")]
        assert inboxes == ([] if user == "admin" else [f"_INBOX.{user}.>"]), user
    assert rules["billing"].publish == deploy.PUBLIC_PUBLISH
    text = deploy.render_accounts(clients=("billing",))
    assert "password: $VAPORA_BILLING_PASSWORD\n" in text


@pytest.mark.parametrize(
    "name", ["bad.name", "with space", "", "router", "client", "a>", "my-svc", "Admin", "ROUTER"]
)
def test_a_client_user_name_that_cannot_be_an_inbox_or_is_taken_is_refused(name: str) -> None:
    """``Admin`` would have had admin's password (``$VAPORA_ADMIN_PASSWORD``); ``my-svc`` a
    variable no shell can export."""
    with pytest.raises(ValueError, match="client user"):
        deploy.check_clients([name])
    for twice in (["billing", "billing"], ["billing", "BILLING"]):
        with pytest.raises(ValueError, match="already a user"):
            deploy.check_clients(twice)


def test_the_deploy_command_names_a_bad_client_user(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        deploy.main(["--out", str(tmp_path), "--client", "bad.name"])
    assert exited.value.code == 2
    assert "client user 'bad.name'" in capsys.readouterr().err


def test_connections_listen_for_replies_under_their_users_inbox() -> None:
    assert subjects.inbox_prefix("router") == "_INBOX.router"
    assert subjects.inbox_prefix(None, ["nats://billing:pw@host:4222"]) == "_INBOX.billing"
    # A URL's user-info without a password is a token: never put in a subject.
    assert subjects.inbox_prefix(None, ["nats://s3cretToken@host:4222"]) == "_INBOX"
    assert subjects.inbox_prefix("explicit", ["nats://other:pw@host"]) == "_INBOX.explicit"
    for plain in (None, "a.b", "a b", "x>", "*"):
        assert subjects.inbox_prefix(plain, ["nats://host"]) == "_INBOX"


def _with_nats(line: str) -> str:
    return f"[[providers]]\nname = 'ollama'\nmodel = 'llama2'\n[nats]\n{line}\n"


def test_an_inbox_prefix_in_the_config_must_be_a_plain_subject() -> None:
    config = parse_config(_with_nats('inbox_prefix = "_INBOX.svc"'), source="t.toml", at=NOW)
    assert config.nats.inbox_prefix == "_INBOX.svc"
    for bad in ("_INBOX.>", "a..b", "has space", ""):
        with pytest.raises(ConfigError, match=r"nats\.inbox_prefix: .* is not a NATS subject"):
            parse_config(_with_nats(f'inbox_prefix = "{bad}"'), source="t.toml", at=NOW)


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
    # Routes and monitoring are not authenticated as generated: the file says so (a server that
    # reached :6222 joined and wrote the event log in a review), and where to read how to.
    header = text.split("server_name")[0]
    assert "no authentication" in header and "docs/operations-cluster.md" in header


def test_asyncios_tls_eof_warning_is_not_said_and_other_lines_are() -> None:
    import logging

    from vapora.cli import _NotTlsEofNoise

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.WARNING, "x", 1, message, None, None)

    noise = "returning true from eof_received() has no effect when using ssl"
    assert not _NotTlsEofNoise().filter(record(noise))
    assert _NotTlsEofNoise().filter(record("Task exception was never retrieved"))


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


def test_a_token_never_becomes_a_connections_inbox_prefix() -> None:
    """`nats://<token>@host` has the token where a user goes: it was sent in every reply
    subject, seen by every responder and listed by the server's monitoring."""
    from actors.connection import ConnectOptions, _inbox_prefix

    assert _inbox_prefix(ConnectOptions.from_url("nats://s3cretToken@host")) == "_INBOX"
    assert _inbox_prefix(ConnectOptions.from_url("nats://u:p@host", token="t")) == "_INBOX"
    assert _inbox_prefix(ConnectOptions.from_url("nats://u:p@host", creds_file="c")) == "_INBOX"
    assert _inbox_prefix(ConnectOptions.from_url("nats://u:p@host")) == "_INBOX.u"
    named = ConnectOptions.from_url("nats://host", user="router", password="x")
    assert _inbox_prefix(named) == "_INBOX.router"


@pytest.mark.parametrize("prefix", ["vapora.events.replies", "$JS.x", "$SRV", "vapora"])
def test_an_inbox_prefix_under_subjects_no_answer_goes_to_is_refused(prefix: str) -> None:
    """Accepted, such a prefix had every request wait out its timeout: the actors drop a
    request whose reply subject is under the event log's subjects or the system's."""
    with pytest.raises(ConfigError, match=r"nats\.inbox_prefix: .* no answer is sent to"):
        parse_config(_with_nats(f'inbox_prefix = "{prefix}"'), source="t.toml", at=NOW)


def test_vapora_config_says_where_replies_come_back() -> None:
    from vapora.config import render_text

    text = render_text(parse_config(_with_nats('user = "billing"'), source="t", at=NOW), env={})
    assert "replies under _INBOX.billing" in text
