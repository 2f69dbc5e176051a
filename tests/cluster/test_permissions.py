"""Per-actor NATS users on a real server running the generated accounts (``vapora.deploy``)
with TLS, verification on: who may write which events, that nobody but admin removes history,
and that refusals are clear errors, never hangs."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import msgspec
import pytest
from nats.aio.msg import Msg
from nats.js.errors import APIError

from actors.connection import ConnectionFailed, PermissionDenied
from actors.eventlog import EventLog
from actors.server import EmbeddedNats
from events import Tier
from events.codec import encode
from events.contract import BudgetStatus
from events.log import Event
from tests.cluster.certs import TlsFiles
from tests.cluster.conftest import PASSWORDS, connect_as, options_for
from tests.cluster.processes import run_vapora
from tests.fault.provider_harness import config_text
from tests.samples import EVENTS
from vapora.client import Client

pytestmark = pytest.mark.anyio

ACTORS = ("router", "provider", "budget", "ledger")


def fresh(tag: str, suffix: str) -> Event:
    """A sample event of type ``tag`` with a new id (so no append is a duplicate)."""
    return msgspec.structs.replace(EVENTS[tag], id=f"{tag}-{suffix}")


@pytest.fixture(scope="module")
async def admin_log(secured_server: EmbeddedNats, tls_files: TlsFiles) -> AsyncIterator[EventLog]:
    """The event stream, created by admin as a deployment's first start would."""
    nc = await connect_as(secured_server.url, "admin", tls_files)
    log = EventLog(nc)
    await log.ensure_stream()
    yield log
    await nc.close()


async def stored(admin_log: EventLog) -> int:
    return await admin_log.last_sequence()


async def test_a_client_forging_a_spend_event_is_refused_and_nothing_is_stored(
    secured_server: EmbeddedNats,
    tls_files: TlsFiles,
    admin_log: EventLog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = await stored(admin_log)
    nc = await connect_as(secured_server.url, "client", tls_files)
    try:
        with caplog.at_level(logging.ERROR, logger="vapora.nats"):
            with pytest.raises(PermissionDenied, match=r"vapora\.events\.spend\.claude"):
                await EventLog(nc).append(fresh("spend_recorded", "forged"))
            with pytest.raises(PermissionDenied, match="permissions violation"):
                await nc.jetstream().publish("vapora.events.spend.x", b"{}")
    finally:
        await nc.close()
    assert await stored(admin_log) == before
    assert any("permissions violation" in r.getMessage() for r in caplog.records)


WRITERS = {
    "route_decided": "router",
    "fallback_triggered": "router",
    "call_succeeded": "provider",
    "call_failed": "provider",
    "spend_recorded": "provider",
    "provider_health_changed": "provider",
    "budget_reserved": "budget",
    "budget_released": "budget",
    "budget_tier_changed": "budget",
    "budget_leased": "budget",
    "budget_lease_returned": "budget",
}


@pytest.mark.parametrize("user", [*ACTORS, "client"])
async def test_each_event_type_is_written_only_by_its_owner(
    user: str, secured_server: EmbeddedNats, tls_files: TlsFiles, admin_log: EventLog
) -> None:
    nc = await connect_as(secured_server.url, user, tls_files)
    log = EventLog(nc)
    try:
        for tag, owner in WRITERS.items():
            event = fresh(tag, f"by-{user}")
            if owner == user:
                assert (await log.append(event)).seq > 0
            else:
                with pytest.raises(PermissionDenied):
                    await log.append(event)
    finally:
        await nc.close()


@pytest.mark.parametrize("user", [*ACTORS, "client"])
async def test_nobody_but_admin_may_purge_delete_or_rewrite_the_stream(
    user: str, secured_server: EmbeddedNats, tls_files: TlsFiles, admin_log: EventLog
) -> None:
    await admin_log.append(fresh("budget_released", f"keep-{user}"))
    before = await stored(admin_log)
    nc = await connect_as(secured_server.url, user, tls_files)
    js, name = nc.jetstream(), admin_log.settings.name
    config = (await admin_log.js.stream_info(name)).config
    try:
        with pytest.raises(PermissionDenied):
            await js.purge_stream(name)
        with pytest.raises(PermissionDenied):
            await js.delete_stream(name)
        with pytest.raises(PermissionDenied):
            await js.delete_msg(name, 1)
        with pytest.raises(PermissionDenied):
            await js.update_stream(dataclasses.replace(config, max_msgs=1))
    finally:
        await nc.close()
    info = await admin_log.js.stream_info(name)
    assert info.state.last_seq == before and info.state.first_seq == 1


async def test_even_admin_cannot_purge_the_stream_it_refuses_deletes(
    admin_log: EventLog,
) -> None:
    await admin_log.append(fresh("budget_released", "admin"))
    with pytest.raises(APIError, match="purge"):
        await admin_log.js.purge_stream(admin_log.settings.name)


@pytest.mark.parametrize("user", ACTORS)
async def test_an_actor_starts_against_the_existing_stream_without_updating_it(
    user: str, secured_server: EmbeddedNats, tls_files: TlsFiles, admin_log: EventLog
) -> None:
    nc = await connect_as(secured_server.url, user, tls_files)
    try:
        info = await EventLog(nc).ensure_stream()
    finally:
        await nc.close()
    assert info.config.deny_purge and info.config.deny_delete


async def test_an_actor_works_with_settings_an_admin_changed(
    secured_server: EmbeddedNats, tls_files: TlsFiles, admin_log: EventLog
) -> None:
    """An admin set a limit this config does not know (here a 90-day max age): an actor's start
    tried to put the stream back to its own settings, was denied the update, and exited."""
    name = admin_log.settings.name
    config = (await admin_log.js.stream_info(name)).config
    await admin_log.js.update_stream(dataclasses.replace(config, max_age=90 * 86400.0))
    nc = await connect_as(secured_server.url, "ledger", tls_files)
    try:
        info = await EventLog(nc).ensure_stream()
    finally:
        await nc.close()
        await admin_log.js.update_stream(config)  # as the other tests expect it
    assert info.config.max_age == 90 * 86400.0  # the admin's settings, used as they are


async def test_a_strict_update_by_a_user_that_may_not_is_an_error(
    secured_server: EmbeddedNats, tls_files: TlsFiles, admin_log: EventLog
) -> None:
    """`vapora stream` (strict) run as an actor's user printed the unchanged stream and exited
    0; the update it exists for is denied, and it says so."""
    name = admin_log.settings.name
    config = (await admin_log.js.stream_info(name)).config
    await admin_log.js.update_stream(dataclasses.replace(config, max_age=90 * 86400.0))
    nc = await connect_as(secured_server.url, "ledger", tls_files)
    try:
        with pytest.raises(PermissionDenied):
            await EventLog(nc).ensure_stream(strict=True)
    finally:
        await nc.close()
        await admin_log.js.update_stream(config)


@pytest.mark.parametrize(
    "subject",
    [
        "vapora.budget.reserve",
        "vapora.budget.lease",
        "vapora.budget.caps",
        "vapora.provider.claude.call",
        "vapora.events.route",
    ],
)
async def test_a_client_may_not_publish_to_internal_subjects(
    subject: str, secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    nc = await connect_as(secured_server.url, "client", tls_files)
    try:
        with pytest.raises(PermissionDenied, match=subject.replace(".", r"\.")):
            await nc.request(subject, b"{}", timeout=30)
    finally:
        await nc.close()


async def test_a_router_may_ask_the_keeper_for_its_task_caps(
    secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    """Denied, a router would take no lease at all (it reads the caps before its first)."""
    keeper = await connect_as(secured_server.url, "budget", tls_files)
    router = await connect_as(secured_server.url, "router", tls_files)
    try:

        async def answer(msg: Msg) -> None:
            await msg.respond(b'{"caps": []}')

        await keeper.subscribe("vapora.budget.caps", queue="budget", cb=answer)
        await keeper.flush()
        reply = await router.request("vapora.budget.caps", b"{}", timeout=10)
        assert reply.data == b'{"caps": []}'
    finally:
        await router.close()
        await keeper.close()


async def test_a_client_may_not_take_requests_meant_for_the_router(
    secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    nc = await connect_as(secured_server.url, "client", tls_files)
    try:
        refused = anyio.Event()
        with nc.denial_watch("vapora.complete", refused), anyio.fail_after(10):
            await nc.subscribe("vapora.complete")
            await refused.wait()
        assert nc.permission_violation("vapora.complete", "subscription") is not None
    finally:
        await nc.close()


SERVED = {
    "router": "vapora.complete",
    "provider": "vapora.provider.claude.call",
    "budget": "vapora.budget.reserve",
    "ledger": "vapora.report",
}


@pytest.mark.parametrize(
    ("user", "subject"), [(u, SERVED[v]) for u in ACTORS for v in ACTORS if u != v]
)
async def test_an_actor_may_not_take_another_roles_requests(
    user: str, subject: str, secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    """Every actor user could subscribe to all of `vapora.>`: the ledger's user joined the
    keeper's queue group on `vapora.budget.reserve` and answered admissions itself."""
    nc = await connect_as(secured_server.url, user, tls_files)
    try:
        refused = anyio.Event()
        with nc.denial_watch(subject, refused), anyio.fail_after(10):
            await nc.subscribe(subject, queue="budget")
            await refused.wait()
        assert nc.permission_violation(subject, "subscription") is not None
    finally:
        await nc.close()


@pytest.mark.parametrize("user", ACTORS)
async def test_an_actor_may_make_no_other_stream(
    user: str, secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    """With all of `$JS.API.>`, an actor user made a stream on `vapora.complete`, which then
    answered the clients' requests itself (`{"stream": "TRAP", "seq": 1}`)."""
    nc = await connect_as(secured_server.url, user, tls_files)
    try:
        with pytest.raises(PermissionDenied):
            await nc.jetstream().add_stream(name="TRAP", subjects=["vapora.complete"])
    finally:
        await nc.close()


async def test_the_request_flow_works_over_tls_for_the_right_users(
    secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    router = await connect_as(secured_server.url, "router", tls_files)
    client = await connect_as(secured_server.url, "client", tls_files)
    try:

        async def answer(msg: object) -> None:
            await msg.respond(b'{"ok": true}')  # type: ignore[attr-defined]

        await router.subscribe("vapora.complete", queue="router", cb=answer)
        await router.flush()
        reply = await client.request("vapora.complete", b"{}", timeout=10)
        assert reply.data == b'{"ok": true}'
        assert client._server_info.get("tls_required") or client._server_info.get("tls_verify")
    finally:
        await client.close()
        await router.close()


async def test_a_wrong_password_is_a_clear_error_not_a_hang(
    secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    with pytest.raises(ConnectionFailed, match="refused the connection: authentication failed"):
        await connect_as(
            secured_server.url, "router", tls_files, password="wrong", initial_deadline=60
        )


async def test_an_untrusted_server_certificate_is_a_clear_error(
    secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    with pytest.raises(ConnectionFailed, match="server's certificate is not trusted"):
        await connect_as(
            secured_server.url, "client", tls_files, ca=tls_files.other_ca, initial_deadline=60
        )


async def test_a_client_certificate_from_another_ca_is_refused_clearly(
    secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    with pytest.raises(ConnectionFailed, match="client certificate trusted"):
        await connect_as(
            secured_server.url,
            "client",
            tls_files,
            cert=tls_files.other_client_cert,
            key=tls_files.other_client_key,
            initial_deadline=60,
        )


async def test_the_vapora_client_gets_permission_denied_not_a_timeout(
    secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    # The budget keeper's user may not ask vapora.complete: over vapora's connection the
    # client's exception says so as soon as the server refuses (its timeout is 120 s).
    nc = await connect_as(secured_server.url, "budget", tls_files)
    try:
        with anyio.fail_after(30), pytest.raises(PermissionDenied, match=r"vapora\.complete"):
            await Client(nc).complete(prompt="hello")
    finally:
        await nc.close()


async def test_an_actor_with_a_wrong_password_exits_naming_the_reason(
    secured_server: EmbeddedNats, tls_files: TlsFiles, tmp_path: Path
) -> None:
    config = tmp_path / "vapora.toml"
    tls = (
        f'[nats]\ntls = {{ ca = "{tls_files.ca}", cert = "{tls_files.client_cert}", '
        f'key = "{tls_files.client_key}" }}\n'
    )
    config.write_text(config_text("http://127.0.0.1:9", extra=tls))
    env = {"VAPORA_NATS_USER": "router", "VAPORA_NATS_PASSWORD": "not-the-password"}
    code, output = await run_vapora(
        "actor", "router", "--nats-url", secured_server.url, "--config", str(config), env=env
    )
    assert code == 1, output
    assert "refused the connection: authentication failed" in output
    assert "not-the-password" not in output


@pytest.mark.parametrize(
    ("user", "inbox"),
    [
        ("client", "_INBOX.>"),
        ("client", "_INBOX.router.>"),
        ("billing", "_INBOX.client.>"),
        ("router", "_INBOX.>"),
        ("ledger", "_INBOX.budget.*"),
    ],
)
async def test_no_user_may_listen_to_another_users_replies(
    user: str, inbox: str, secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    """Every user could subscribe to all of `_INBOX.>`: a calling service read the completions
    vapora sent other services, and the keeper's admissions to the router."""
    nc = await connect_as(secured_server.url, user, tls_files)
    try:
        refused = anyio.Event()
        with nc.denial_watch(inbox, refused), anyio.fail_after(10):
            await nc.subscribe(inbox)
            await refused.wait()
        assert nc.permission_violation(inbox, "subscription") is not None
    finally:
        await nc.close()


async def test_a_second_client_user_asks_through_the_vapora_client_and_gets_its_reply(
    secured_server: EmbeddedNats, tls_files: TlsFiles
) -> None:
    """The public client connects as its own user (`vapora.deploy --client billing`) and its
    replies come back under `_INBOX.billing`, the only inbox that user may receive on."""
    keeper = await connect_as(secured_server.url, "budget", tls_files)
    status = BudgetStatus(
        at=datetime(2026, 1, 1, tzinfo=UTC),
        tier=Tier.NORMAL,
        daily_limit_usd=None,
        monthly_limit_usd=None,
        per_task_limit_usd=None,
        spent_today_usd=Decimal("1.25"),
        spent_month_usd=Decimal("1.25"),
        reserved_usd=Decimal(0),
        open_reservations=0,
        daily_percent=0.0,
        monthly_percent=0.0,
        warn_threshold_percent=80.0,
    )
    try:
        asked_on: list[str] = []

        async def answer(msg: Msg) -> None:
            asked_on.append(msg.reply)
            await msg.respond(encode(status))

        await keeper.subscribe("vapora.budget", queue="budget", cb=answer)
        await keeper.flush()
        tls = options_for(secured_server.url, "billing", tls_files).tls_context()
        async with Client.connect(
            secured_server.url, user="billing", password=PASSWORDS["billing"], tls=tls
        ) as client:
            with anyio.fail_after(10):
                assert await client.budget() == status
        assert asked_on and asked_on[0].startswith("_INBOX.billing.")
    finally:
        await keeper.close()
