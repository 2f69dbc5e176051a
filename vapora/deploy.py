"""NATS server configuration for a deployment: accounts, per-actor users and permissions, TLS,
and the three cluster nodes of ``docker/compose.yaml``.

Everything here is pure: functions take passwords (or leave them to the environment) and TLS
file paths and return configuration text. ``python -m vapora.deploy`` writes ``docker/nats/``
(``--check`` fails when the checked-in files are not what this module renders).

The permission model (``docs/operations-cluster.md``): one account, ``VAPORA``, with JetStream;
one user per actor role. Writers own their event subjects (``events.subjects``): only ``budget``
publishes ``vapora.events.budget``, only ``provider`` publishes call, spend and health events,
only ``router`` publishes route events. ``client`` may publish only the four public request
subjects. Each user receives replies only under its own ``_INBOX.<user>.>``, where vapora's
connections put them (``events.subjects.inbox_prefix``): no user reads another's replies. More
client users (one per calling service) are added with ``--client NAME``. No user but
``admin`` may delete or purge the stream or delete a message from it (the stream also has
``deny_delete``/``deny_purge``).

Passwords are never written into a file: by default each user's password is the nats-server
config variable ``$VAPORA_<USER>_PASSWORD``, which nats-server resolves from its environment.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from events import subjects

__all__ = [
    "DENIED_TO_ACTORS",
    "PUBLIC_REQUESTS",
    "USERS",
    "Permissions",
    "check_clients",
    "ServerTls",
    "main",
    "password_variable",
    "permissions",
    "render_accounts",
    "render_docker_files",
    "render_node",
    "render_tls",
]

USERS: Final = ("router", "provider", "budget", "ledger", "client", "admin")

PUBLIC_REQUESTS: Final = (subjects.COMPLETE, subjects.STREAM, subjects.REPORT, subjects.BUDGET)
#: What a calling service may publish: its requests, and the cancel of a stream it stops reading.
PUBLIC_PUBLISH: Final = (*PUBLIC_REQUESTS, subjects.STREAM_CANCEL)

DENIED_TO_ACTORS: Final = (
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.UPDATE.>",
)
"""Removing history: denied to every user but ``admin``. Updating the stream is denied too, since
new limits (``max_msgs: 1``) would discard history as surely as a purge; actors only create the
stream when it is missing, and ``admin`` changes its settings."""

_EVENTS = subjects.EVENTS_PREFIX
_STREAM = subjects.EVENT_STREAM
# What every actor needs: JetStream's API on the event stream only (its info, creating it when
# it is missing, reading a message, its consumers: no other stream may be made, no leader moved),
# acks and flow control, answering requests (reply subjects are inboxes) and the Services API.
_JS_API: Final = (
    "$JS.API.INFO",
    f"$JS.API.STREAM.INFO.{_STREAM}",
    f"$JS.API.STREAM.CREATE.{_STREAM}",
    f"$JS.API.STREAM.MSG.GET.{_STREAM}",
    f"$JS.API.DIRECT.GET.{_STREAM}",
    f"$JS.API.DIRECT.GET.{_STREAM}.>",
    f"$JS.API.CONSUMER.CREATE.{_STREAM}",
    f"$JS.API.CONSUMER.CREATE.{_STREAM}.>",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{_STREAM}.>",
    f"$JS.API.CONSUMER.INFO.{_STREAM}.>",
    f"$JS.API.CONSUMER.DELETE.{_STREAM}.>",
    f"$JS.API.CONSUMER.MSG.NEXT.{_STREAM}.>",
)
_ACTOR_PUBLISH: Final = (*_JS_API, "$JS.ACK.>", "$JS.FC.>", "_INBOX.>", "$SRV.>")
# Each role receives only its own requests (a queue group is joined by subscribing: a user that
# may subscribe to another role's subject could take its requests), its own replies (under
# _INBOX.<user>, where vapora's connections put them: events.subjects.inbox_prefix) and $SRV.
_ACTOR_SUBSCRIBE: Final = ("$SRV.>",)
_CLIENT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_SERVES: Final = {
    # (and the word of attempts that ended unbilled, which only routers read)
    "router": (subjects.COMPLETE, subjects.STREAM, subjects.BUDGET_UNBILLED),
    "provider": ("vapora.provider.*.call", subjects.STREAM_CANCEL),
    "budget": (subjects.BUDGET, f"{subjects.BUDGET}.>"),
    "ledger": (subjects.REPORT,),
}


@dataclass(frozen=True, kw_only=True)
class Permissions:
    """One user's subject permissions (deny wins over allow, as in nats-server)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()


def _replies(user: str) -> str:
    """The reply subjects only ``user`` may receive."""
    return f"{subjects.inbox_prefix(user)}.>"


def check_clients(clients: Sequence[str]) -> tuple[str, ...]:
    """``clients`` as extra client user names; a name that is not a plain subject token (it
    names the user's inbox), is one of :data:`USERS` or comes twice is a ``ValueError``."""
    seen: list[str] = []
    # Users whose password variables would be one (VAPORA_ADMIN_PASSWORD for "Admin").
    taken = {password_variable(user) for user in USERS}
    for name in clients:
        if _CLIENT_NAME.fullmatch(name) is None:
            raise ValueError(
                f"client user {name!r}: use letters, digits or '_' (64 at most): it names the "
                "user's inbox and its password variable"
            )
        variable = password_variable(name)
        if variable in taken:
            raise ValueError(
                f"client user {name!r} is already a user (or shares its password variable "
                f"{variable})"
            )
        taken.add(variable)
        seen.append(name)
    return tuple(seen)


def permissions(clients: Sequence[str] = ()) -> dict[str, Permissions]:
    """Each user's permissions, by user name (see the module docstring); ``clients`` are more
    users with the ``client`` role, one per calling service, each receiving its own replies."""
    actor = {
        "router": (
            f"{_EVENTS}.route",
            "vapora.provider.*.call",
            subjects.BUDGET_RESERVE,
            subjects.BUDGET_RELEASE,
            subjects.BUDGET_LEASE,
            subjects.BUDGET_LEASE_RETURN,
            subjects.BUDGET_CAPS,  # the task caps the keeper enforces, before its first lease
            subjects.BUDGET_PENDING,  # silent attempts' holds (their spend may come late)
            subjects.STREAM_CANCEL,  # a stream it ended because its provider actor went silent
            subjects.BUDGET,
        ),
        "provider": (
            f"{_EVENTS}.call.>",
            f"{_EVENTS}.spend.>",
            f"{_EVENTS}.health.>",
            subjects.BUDGET_PENDING,
            subjects.BUDGET_RELEASE,  # a call it ended unbilled after its router gave up
            subjects.BUDGET_UNBILLED,  # and which of its router's attempts that was
        ),
        "budget": (f"{_EVENTS}.budget",),
        "ledger": (),
    }
    users = {
        name: Permissions(
            publish=(*own, *_ACTOR_PUBLISH),
            subscribe=(*_SERVES[name], _replies(name), *_ACTOR_SUBSCRIBE),
            publish_deny=DENIED_TO_ACTORS,
        )
        for name, own in actor.items()
    }
    for client in ("client", *check_clients(clients)):
        users[client] = Permissions(publish=PUBLIC_PUBLISH, subscribe=(_replies(client),))
    users["admin"] = Permissions(publish=(">",), subscribe=(">",))
    return users


def password_variable(user: str) -> str:
    """The environment variable holding ``user``'s password, e.g. ``VAPORA_ROUTER_PASSWORD``."""
    return f"VAPORA_{user.upper()}_PASSWORD"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_quote(item) for item in items) + "]"


def _user_block(user: str, password: str | None, perms: Permissions) -> str:
    secret = f"${password_variable(user)}" if password is None else _quote(password)
    publish = f"allow: {_list(perms.publish)}"
    if perms.publish_deny:
        publish += f", deny: {_list(perms.publish_deny)}"
    return (
        f"      {{\n"
        f"        user: {_quote(user)}\n"
        f"        password: {secret}\n"
        f"        permissions: {{\n"
        f"          publish: {{ {publish} }}\n"
        f"          subscribe: {{ allow: {_list(perms.subscribe)} }}\n"
        f"        }}\n"
        f"      }}\n"
    )


def render_accounts(passwords: Mapping[str, str] | None = None, clients: Sequence[str] = ()) -> str:
    """The ``accounts`` block: every user of :data:`USERS` with its permissions.

    ``passwords`` maps user names to literal passwords (tests); without it each password is the
    config variable ``$VAPORA_<USER>_PASSWORD``, read by nats-server from its environment.
    """
    rules = permissions(clients)
    users = "".join(
        _user_block(user, None if passwords is None else passwords[user], rules[user])
        for user in (*USERS, *clients)
    )
    return (
        "# Users and subject permissions (generated by `python -m vapora.deploy`; do not edit).\n"
        "accounts {\n"
        "  VAPORA {\n"
        "    jetstream: enabled\n"
        "    users: [\n"
        f"{users}"
        "    ]\n"
        "  }\n"
        "}\n"
    )


@dataclass(frozen=True, kw_only=True)
class ServerTls:
    """TLS for client connections: the server's certificate and key, and the CA clients' (and,
    with ``verify``, the client certificates') chains are checked against."""

    cert_file: str
    key_file: str
    ca_file: str
    verify: bool = True
    timeout_s: float = 5.0


def render_tls(tls: ServerTls) -> str:
    """The ``tls`` block for client connections (``verify``: clients must present a certificate
    signed by ``ca_file``)."""
    return (
        "tls {\n"
        f"  cert_file: {_quote(tls.cert_file)}\n"
        f"  key_file: {_quote(tls.key_file)}\n"
        f"  ca_file: {_quote(tls.ca_file)}\n"
        f"  verify: {'true' if tls.verify else 'false'}\n"
        f"  timeout: {tls.timeout_s:g}\n"
        "}\n"
    )


def render_node(
    index: int,
    *,
    nodes: int = 3,
    host_pattern: str = "nats-{n}",
    store_dir: str = "/data/jetstream",
    sync_interval: str = "always",
    tls: ServerTls | None = None,
    include: str = "accounts.conf",
) -> str:
    """The config of cluster node ``index`` (0-based) of ``nodes``, as in ``docker/compose.yaml``.

    ``sync_interval: always`` fsyncs each message before it is acknowledged: with R3 this is what
    keeps acknowledged spend through a simultaneous power loss (see the operations doc).
    """
    name = host_pattern.format(n=index + 1)
    routes = ", ".join(
        _quote(f"nats-route://{host_pattern.format(n=j + 1)}:6222") for j in range(nodes)
    )
    return (
        f"# NATS node {name} of the vapora cluster "
        "(generated by `python -m vapora.deploy`; do not edit).\n"
        "# The routes (:6222) and the monitoring port (:8222) have no authentication: a server\n"
        "# that can reach :6222 joins the cluster and can write the event log. Keep both on a\n"
        "# private network (the compose network); across machines, give the cluster block a\n"
        "# TLS block (verify: true) and an authorization block, and bind http to 127.0.0.1, as\n"
        "# docs/operations-cluster.md says (`--check` then reports these files changed).\n"
        f"server_name: {_quote(name)}\n"
        'listen: "0.0.0.0:4222"\n'
        'http: "0.0.0.0:8222"\n'
        "max_payload: 16MB\n"
        "jetstream {\n"
        f"  store_dir: {_quote(store_dir)}\n"
        f"  sync_interval: {sync_interval}\n"
        "}\n"
        "cluster {\n"
        '  name: "vapora"\n'
        '  listen: "0.0.0.0:6222"\n'
        f"  routes: [{routes}]\n"
        "}\n" + (render_tls(tls) if tls is not None else "") + f"include {_quote(include)}\n"
    )


DOCKER_TLS: Final = ServerTls(
    cert_file="/etc/nats/certs/server.pem",
    key_file="/etc/nats/certs/server-key.pem",
    ca_file="/etc/nats/certs/ca.pem",
)


def render_docker_files(nodes: int = 3, clients: Sequence[str] = ()) -> dict[str, str]:
    """``docker/nats/``: file name to text (the accounts and one config per node)."""
    files = {"accounts.conf": render_accounts(clients=clients)}
    for i in range(nodes):
        files[f"nats-{i + 1}.conf"] = render_node(i, nodes=nodes, tls=DOCKER_TLS)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with ``--check`` verify) the NATS configs under ``docker/nats``."""
    parser = argparse.ArgumentParser(prog="python -m vapora.deploy", description=main.__doc__)
    parser.add_argument("--out", default="docker/nats", help="directory (default: docker/nats)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is not current")
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="another client user (one per calling service; repeatable): it may ask what "
        "`client` may and receives only its own replies; its password is $VAPORA_<NAME>_PASSWORD",
    )
    args = parser.parse_args(argv)
    try:
        clients = check_clients(args.client)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is not a directory")
    stale = []
    for name, text in render_docker_files(clients=clients).items():
        path = out / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        try:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            print(
                f"python -m vapora.deploy: cannot write {path}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
        print(f"wrote {path}")
    if stale:
        print(f"not current (run `python -m vapora.deploy`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
