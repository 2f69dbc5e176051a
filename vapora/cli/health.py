"""``vapora health``: is a vapora service answering on NATS? (the container health check)

Sends a NATS Services API ``$SRV.PING`` (``$SRV.PING.<name>`` with ``--service``) with the same
connection settings as every other command (``VAPORA_NATS_URL``, ``VAPORA_CONFIG``,
``VAPORA_NATS_USER``/``VAPORA_NATS_PASSWORD``, TLS from the config) and exits 0 when a service
answers within ``--timeout`` seconds, 1 otherwise, printing one line either way. When services
run on this machine (container), each of them is asked by its own id
(``$SRV.PING.<name>.<id>``, from the notes their processes keep in
``actors.instances.instance_dir()``) and must answer, so that a sibling instance elsewhere cannot
answer for a wedged one. It also runs as
``python -m vapora.cli.health``, which is what ``docker/Dockerfile``'s HEALTHCHECK calls.

Services are named ``router``, ``provider-<name>``, ``vapora-budget`` and ``vapora-ledger``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from vapora.cli.args import given
from vapora.eventloop import run as run_loop
from vapora.telemetry.logs import printable

__all__ = ["add_parser", "cmd_health", "local_instances", "main", "ping_subject"]

PING = "$SRV.PING"


_SERVICE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _service(text: str) -> str:
    """``--service``: a NATS service's name (letters, digits, ``-`` and ``_``, as the Services
    API has them): ``a b`` was pinged as an invalid subject and said "no answer", ``*`` and
    ``>`` were wildcard pings."""
    given(text)
    if not _SERVICE_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{printable(text[:64])!r} is not a service name (letters, digits, '-' and '_'; "
            "vapora's are router, vapora-budget, vapora-ledger, provider-<name>)"
        )
    return text


def ping_subject(service: str | None) -> str:
    """``$SRV.PING`` (every service) or ``$SRV.PING.<service>`` (every instance of one)."""
    return f"{PING}.{service}" if service else PING


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``health`` to the ``vapora`` command's subparsers."""
    what = "is a vapora service answering on NATS? (exit 0 if one answers, 1 if not)"
    health = commands.add_parser("health", help=what, description=what[0].upper() + what[1:])
    _arguments(health)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", type=given, help="config file (default: $VAPORA_CONFIG)"
    )
    parser.add_argument("--nats-url", metavar="URL", type=given, help="default: $VAPORA_NATS_URL")
    parser.add_argument(
        "--service", metavar="NAME", type=_service, help="ping only services called NAME"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=3.0,
        metavar="SECONDS",
        help="how long to wait (default 3; more than 0, at most 3600)",
    )


def _seconds(text: str) -> float:
    """A wait: a number more than 0 and at most an hour (``--timeout -1`` reported a healthy
    server as unreachable "within -1.0 s"; ``nan`` failed inside the event loop)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600, got {text}")
    return value


async def cmd_health(args: argparse.Namespace) -> int:
    """Ping; 0 when a service answered in time, 1 otherwise."""
    from nats.errors import NoRespondersError

    from actors.connection import ConnectionFailed, connect
    from vapora.cli import _connect_options
    from vapora.config import load
    from vapora.errors import ConfigError

    config = load(args.config, env=os.environ, at=datetime.now(UTC), nats_url=args.nats_url)
    options = dataclasses.replace(
        _connect_options(
            config, ",".join(config.nats.urls) or "nats://127.0.0.1:4222", "vapora-health"
        ),
        initial_deadline=args.timeout,
        max_reconnect_attempts=0,
    )
    from actors.instances import server_identity

    try:
        nc = await connect(options)
    except (ConnectionFailed, ConfigError) as exc:  # a missing TLS or credentials file too:
        print(f"unhealthy: {exc}")  # unhealthy (1), as the image's check answers any failure
        return 1
    # The instances this machine (container) runs on this NATS deployment, each asked by id: a
    # sibling elsewhere answering for a wedged one made it look healthy. None noted: any one.
    server = server_identity(getattr(nc, "_server_info", None) or {})
    local = local_instances(args.service, server)
    targets = [f"{PING}.{name}.{id_}" for name, id_ in local] or [ping_subject(args.service)]
    try:
        answered = []
        for subject in targets:
            try:
                reply = await nc.request(subject, b"", timeout=args.timeout)
            except Exception as exc:
                why = "no service answers it" if isinstance(exc, NoRespondersError) else exc
                print(f"unhealthy: no answer to {subject} within {args.timeout:g} s ({why})")
                return 1
            answer = json.loads(reply.data)
            answered.append(f"{answer.get('name')} {answer.get('id')} answered {subject}")
    finally:
        await nc.close()
    print("healthy: " + "; ".join(answered))
    return 0


def local_instances(service: str | None, server: str | None) -> list[tuple[str, str]]:
    """(name, id) of the services running on this machine (container) on the NATS deployment
    ``server`` (:func:`actors.instances.server_identity`), as their processes noted them
    (:func:`actors.instances.register`), those of ``service`` only if given. A note
    whose process is gone, or whose pid another process now has (a restarted container's), is
    removed."""
    from actors.instances import instance_dir, process_start

    found = []
    try:
        notes = sorted(instance_dir().glob("*.json"))
    except OSError:
        return []
    for note in notes:
        try:
            data = json.loads(note.read_text())
            name, id_, pid = str(data["name"]), str(data["id"]), int(data["pid"])
            started, noted_server = data.get("started"), data.get("server")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if started is None or process_start(pid) != started:
            note.unlink(missing_ok=True)  # its process is gone
        elif (service is None or name == service) and noted_server == server:
            found.append((name, id_))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vapora.cli.health [--service NAME] [--timeout S]``."""
    parser = argparse.ArgumentParser(prog="vapora health", description=__doc__)
    _arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run_loop(cmd_health, args))
    except Exception as exc:  # a bad config file, ...: unhealthy, with the reason
        print(f"unhealthy: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
