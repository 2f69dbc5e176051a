"""The ``vapora`` command line: the composition root (DESIGN §5, "Running it").

Every command reads ``VAPORA_NATS_URL`` and ``VAPORA_CONFIG``; flags win over the environment.
Exit codes: 0 success, 1 a failure at run time (no server, an audit difference …), 2 bad usage or
a bad config file (the message names the file, the key and the problem).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from events.contract import Quality, TaskType
from events.log import EVENT_TYPES
from vapora import __version__
from vapora.cli.args import given, port, whole_number
from vapora.config import redact_url
from vapora.errors import ConfigError, VaporaError
from vapora.eventloop import run as run_loop

if TYPE_CHECKING:
    from actors.connection import Client, ConnectOptions
    from actors.eventlog import EventLog
    from events.log import SpendRecorded
    from vapora.config import Config
    from vapora.telemetry import Telemetry

__all__ = ["main"]

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_EMBEDDED_PORT = 4222
log = logging.getLogger("vapora")


class UsageError(Exception):
    """A flag or argument is wrong (exit 2)."""


# --- shared plumbing ------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _config(args: argparse.Namespace) -> Config:
    """The config: ``--config``, else ``$VAPORA_CONFIG``, else the ``config.toml`` a data
    directory holds (``vapora demo`` leaves one), else the built-in default."""
    from vapora.config import ENV_CONFIG, load

    flag = getattr(args, "config", None)
    data_dir = getattr(args, "data_dir", None)
    if flag is None and not os.environ.get(ENV_CONFIG) and data_dir:  # (empty: unset)
        kept = Path(data_dir) / "config.toml"
        flag = str(kept) if kept.is_file() else None
    return load(flag, env=os.environ, at=_now(), nats_url=args.nats_url)


def _connect_options(config: Config, url: str, name: str) -> ConnectOptions:
    from actors.connection import ConnectOptions

    tls = config.nats.tls
    return ConnectOptions.from_url(
        url,
        name=name,
        user=config.nats.user,
        password=config.nats.password,
        token=config.nats.token,
        creds_file=config.nats.creds,
        tls_ca_file=tls.ca if tls else None,
        tls_cert_file=tls.cert if tls else None,
        tls_key_file=tls.key if tls else None,
        tls_required=tls is not None,
        inbox_prefix=config.nats.inbox_prefix,
    )


_COMMAND_CONNECT_S = 5.0  # how long a command tries to reach NATS before it says it cannot
_COMMAND_TRY_S = 2.0  # one server's connect timeout, for a command


def _url(config: Config) -> str:
    return ",".join(config.nats.urls) or DEFAULT_URL


@contextlib.asynccontextmanager
async def _connected(args: argparse.Namespace, name: str) -> AsyncIterator[tuple[Config, Client]]:
    """Connect to the configured NATS; with ``--data-dir`` and no URL anywhere, open that
    directory's log offline through a private embedded server (``vapora demo`` leaves one),
    or, when a running ``vapora up`` serves that directory, through its server (two servers on
    one store would corrupt it)."""
    from actors.connection import connect
    from actors.server import DataDirInUse

    config = _config(args)
    async with contextlib.AsyncExitStack() as stack:
        url = _url(config)
        if _offline(args, config):
            data_dir = _data_dir(args, config)
            if not await anyio.Path(data_dir / "nats").is_dir():
                raise ConfigError(f"{data_dir} holds no vapora data (no {data_dir / 'nats'})")
            try:
                url = await _embedded(stack, data_dir, 0, _embedded_sync(config))
            except DataDirInUse as exc:
                if exc.url is None or not exc.serving:  # starting, or another command's own
                    raise
                url = exc.url
                log.info("%s is served by a running vapora: reading it through %s", data_dir, url)
        options = _connect_options(config, url, name)
        # A command (not a service): a server that refuses the connection is said after a few
        # seconds of retries, not the services' 15; each server of a cluster gets its own try
        # (one whose host is down holds a try for its whole connect timeout).
        deadline = max(_COMMAND_CONNECT_S, _COMMAND_TRY_S * len(options.servers) + 1.0)
        options = dataclasses.replace(
            options, connect_timeout=_COMMAND_TRY_S, initial_deadline=deadline
        )
        nc = await connect(options)
        stack.push_async_callback(_close_quietly, nc)
        yield config, nc


async def _close_quietly(nc: Client) -> None:
    with contextlib.suppress(Exception):
        await nc.close()


def _offline(args: argparse.Namespace, config: Config) -> bool:
    return bool(getattr(args, "data_dir", None)) and not config.nats.urls


async def _reading(nc: Client) -> EventLog:
    """The event log for a command that only reads it: the stream must exist, and is left as
    it is (no stream is made on a server nothing has run against, no replica count changed)."""
    from actors.eventlog import EventLog

    log = EventLog(nc)
    await log.existing_stream()
    return log


def _configured_log(nc: Client, config: Config) -> EventLog:
    """The event log with the config's stream settings (``[storage] replicas``)."""
    from actors.eventlog import EventLog, StreamSettings

    return EventLog(nc, StreamSettings(replicas=config.storage.replicas))


async def _event_log(nc: Client, config: Config) -> EventLog:
    """The event log, its stream made or brought up to date."""
    log = _configured_log(nc, config)
    await log.ensure_stream()
    return log


def _telemetry(config: Config, service_name: str, *, metrics: bool = True) -> Telemetry:
    """Traces, metrics (unless not ``metrics``) and log lines as ``[telemetry]`` and the
    ``OTEL_*`` variables say."""
    import msgspec

    from vapora.telemetry import setup

    settings = config.telemetry
    if not metrics:
        settings = msgspec.structs.replace(settings, metrics=False)
    return setup(settings, env=os.environ, service_name=service_name)


def _data_dir(args: argparse.Namespace, config: Config) -> Path:
    given = getattr(args, "data_dir", None)
    path = Path(given or config.storage.data_dir)
    if path.exists() and not path.is_dir():  # else a traceback from the first mkdir under it
        where = "--data-dir" if given else "storage.data_dir"
        raise ConfigError(f"{where} {path} is not a directory")
    return path


# --- commands -------------------------------------------------------------------------------


async def cmd_up(args: argparse.Namespace) -> int:
    """Every actor in this process; the embedded nats-server unless a URL is configured."""

    config = _config(args)
    data_dir = _data_dir(args, config)
    if config.nats.urls and args.port is not None:
        raise ConfigError(
            "--port is the embedded nats-server's port, and a NATS URL is configured "
            "(--nats-url, $VAPORA_NATS_URL or [nats] url), so no server is started: "
            "drop one of them"
        )
    port = DEFAULT_EMBEDDED_PORT if args.port is None else args.port
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(_telemetry(config, "vapora").shutdown)
        url = (
            _url(config)
            if config.nats.urls
            else await _embedded(stack, data_dir, port, _embedded_sync(config), serving=True)
        )
        await _serve(await _all_actors(stack, config, url, data_dir), url)
    return 0


async def _embedded(
    stack: contextlib.AsyncExitStack,
    data_dir: Path,
    port: int,
    sync_interval: str,
    *,
    serving: bool = False,
) -> str:
    """Start the embedded server on ``data_dir`` for this command; ``serving``: a deployment's
    (``vapora up``), which other commands may read the directory through. A server left by a
    killed command is stopped and replaced: another command's private one, and for ``up`` a
    killed ``up``'s too (SIGKILL, the OOM killer: a supervisor's restart was refused for good
    by a server nobody runs). Any other holder is :class:`~actors.server.DataDirInUse`."""
    from actors.server import DataDirInUse, EmbeddedNats, orphan_of, stop_orphan

    def server() -> EmbeddedNats:
        return EmbeddedNats(
            data_dir / "nats", port=port or None, sync_interval=sync_interval, serving=serving
        )

    try:
        started = await stack.enter_async_context(server())
    except DataDirInUse as exc:
        orphan = orphan_of(data_dir / "nats", exc, serving=serving)
        if orphan is None:
            raise
        log.warning(
            "the vapora (pid %s) that started nats-server %d on %s is gone: stopping its "
            "server and starting again",
            exc.pid,
            orphan,
            data_dir,
        )
        await stop_orphan(data_dir / "nats", orphan)
        started = await stack.enter_async_context(server())
    log.info("embedded nats-server on %s (data in %s)", started.url, started.data_dir)
    return started.url


def _embedded_sync(config: Config) -> str:
    """The embedded server's ``sync_interval``, for a config that may use that server: one
    asking for TLS is refused (the embedded server has none, and the client's refusal of it
    was said as the server's)."""
    if config.nats.tls is not None:
        raise ConfigError(
            "[nats.tls] is set but no NATS URL is (--nats-url, VAPORA_NATS_URL or [nats] "
            "url): the embedded nats-server runs without TLS; name the server it is for, or "
            "drop [nats.tls]"
        )
    return config.storage.sync_interval


async def _all_actors(
    stack: contextlib.AsyncExitStack, config: Config, url: str, data_dir: Path
) -> list[Any]:
    from actors.connection import connect
    from actors.runner import Runtime, all_actors

    options = _connect_options(config, url, "vapora-up")
    if config.nats.urls:  # (not the embedded server, just started)
        _say_connecting("vapora up", options, config)
    nc = await connect(options)
    stack.push_async_callback(nc.close)
    await anyio.Path(data_dir).mkdir(parents=True, exist_ok=True)
    log = await _event_log(nc, config)
    runtime = Runtime(nc=nc, config=config, log=log, data_dir=data_dir, env=dict(os.environ))
    return list(all_actors(runtime))


def _say_connecting(who: str, options: Any, config: Config) -> None:
    """Said before a service's wait for its server (it gives one longer than a command does:
    it may be started with its server): it waited up to 15 s without a word."""
    log.info(
        "%s: connecting to NATS at %s%s (up to %g s)",
        who,
        ", ".join(redact_url(u) for u in options.servers),
        "" if config.nats.urls else " (the default: no --nats-url, VAPORA_NATS_URL or [nats] url)",
        options.initial_deadline,
    )


async def _serve(actors: Sequence[Any], url: str) -> None:
    from actors.runner import run_until_signalled

    await run_until_signalled(
        actors, on_ready=lambda: print(f"vapora ready {redact_url(url)}", flush=True)
    )


async def cmd_actor(args: argparse.Namespace) -> int:
    """One actor in this process, against an existing NATS server or cluster."""
    from actors.connection import connect
    from actors.runner import Runtime, build

    if args.provider is not None and args.kind != "provider":
        raise ConfigError(
            f"--provider names the provider of a provider actor, not of a {args.kind}"
        )
    config = _config(args)
    if args.kind == "provider":  # said before connecting: no wait for a server to say it
        if args.provider is None:
            raise ConfigError("`vapora actor provider` needs --provider NAME")
        if config.provider(args.provider) is None:
            names = ", ".join(p.name for p in config.providers)
            raise ConfigError(f"unknown provider {args.provider!r}; configured: {names}")
    data_dir = _data_dir(args, config)
    await anyio.Path(data_dir).mkdir(parents=True, exist_ok=True)
    url = _url(config)
    telemetry = _telemetry(config, f"vapora-{args.kind}")
    options = _connect_options(config, url, f"vapora-{args.kind}")
    _say_connecting(args.kind, options, config)
    nc = await connect(options)
    try:
        events = await _event_log(nc, config)
        runtime = Runtime(nc=nc, config=config, log=events, data_dir=data_dir, env=dict(os.environ))
        await _serve([build(args.kind, runtime, provider=args.provider)], url)
    finally:
        await nc.close()
        telemetry.shutdown()
    return 0


async def cmd_ask(args: argparse.Namespace) -> int:
    from vapora.cli.ask import ask_command, invalid_request
    from vapora.client import Client as VaporaClient

    problem = invalid_request(
        args.prompt,
        task_type=args.task_type,
        quality=args.quality,
        provider=args.provider,
        budget_cents=args.budget_cents,
    )
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    async with _connected(args, "vapora-ask") as (_, nc):
        client = VaporaClient(nc)
        return int(
            await ask_command(
                client,
                args.prompt,
                task_type=args.task_type,
                quality=args.quality,
                provider=args.provider,
                budget_cents=args.budget_cents,
                stream=args.stream,
                as_json=args.json,
                out=sys.stdout,
            )
        )


async def cmd_report(args: argparse.Namespace) -> int:
    from vapora.cli.money import report_command

    config = _config(args)
    if args.since is not None and args.since > _now():  # a mistyped year read as no spend
        print(
            f"vapora report: --since {args.since.isoformat()} is in the future: no spend is in "
            "the window yet",
            file=sys.stderr,
        )
    if args.html:
        return await _html_report(args)
    if _offline(args, config):
        print(await _offline_report(args, config))
        return 0
    async with _connected(args, "vapora-report") as (_, nc):
        print(await report_command(nc, since=args.since, until=args.until, as_json=args.json))
    return 0


async def _offline_report(args: argparse.Namespace, config: Config) -> str:
    """The report straight from a data directory's ledger file (read only), no actor running."""
    from vapora.audit import render_report
    from vapora.cli.money import json_text
    from vapora.ledger import Ledger

    data_dir = _data_dir(args, config)
    path = data_dir / "ledger.sqlite3"
    async with await Ledger.open_read_only(path) as ledger:
        position = await ledger.last_sequence()
        tail = await _spend_after(args, data_dir, position)
        report = await ledger.report(args.since, args.until, now=_now(), tail=tail)
    from vapora.cli.money import left_on_the_way

    left = left_on_the_way(data_dir)
    if left:
        print(
            f"vapora report: {len(left)} spend events lie in files of provider actors that "
            "stopped with them on their way to the log (run `vapora audit` for which are not "
            "in it yet; a provider actor started on this directory appends them)",
            file=sys.stderr,
        )
    if tail:
        print(
            f"vapora report: the ledger's file stops at log sequence {position} (its actor "
            f"stopped before applying the rest); the {len(tail)} spend events after it, to "
            f"sequence {report.last_sequence}, are read from the log and counted",
            file=sys.stderr,
        )
    if args.json:
        return json_text(report)
    return render_report(report).rstrip("\n")


async def _spend_after(
    args: argparse.Namespace, data_dir: Path, position: int
) -> list[tuple[SpendRecorded, int]]:
    """The log's spend events past ``position`` (the ledger file's), with their sequences;
    none when the directory holds the ledger's file alone."""
    from events.log import SpendRecorded
    from vapora.cli.money import another_logs

    if not await anyio.Path(data_dir / "nats").is_dir():
        return []
    async with _connected(args, "vapora-report") as (_, nc):
        log = await _reading(nc)
        # A ledger file of another deployment's: its rows and this log's spend were added up
        # into one report (the audit refused it).
        other = await another_logs(data_dir / "ledger.sqlite3", log)
        if other is not None:
            raise ConfigError(other)
        if await log.last_sequence() <= position:
            return []
        return [
            (entry.event, entry.seq)
            async for batch in log.replay(position + 1)
            for entry in batch
            if isinstance(entry.event, SpendRecorded)
        ]


async def _html_report(args: argparse.Namespace) -> int:
    from vapora.report_html import Page

    target = _html_target(args.html)  # before reading the whole log
    page, read = Page(since=args.since, until=args.until), 0
    async with _connected(args, "vapora-report") as (_, nc):
        log = await _reading(nc)
        async for batch in log.replay(1):  # batch by batch: the log is never held whole
            page.add(entry.event for entry in batch)
            read += len(batch)
    try:
        await anyio.Path(target).write_text(page.render(now=_now()))
    except OSError as exc:
        raise ConfigError(f"--html: cannot write {target}: {exc.strerror or exc}") from exc
    print(f"wrote {target} ({read} events)")
    return 0


def _html_target(name: str) -> Path:
    """``--html``'s file, checked before the log is read: its directory must exist and be
    writable, and the name must not be a directory."""
    target = Path(name)
    folder = target.parent
    if target.is_dir():
        raise ConfigError(f"--html: {target} is a directory; name the page's file")
    if not folder.is_dir():
        raise ConfigError(f"--html: cannot write {target}: no directory {folder}")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"--html: cannot write {target}: permission denied")
    return target


async def cmd_budget(args: argparse.Namespace) -> int:
    from vapora.cli.money import budget_command

    config = _config(args)
    if _offline(args, config):
        print(await _offline_budget(args, config))
        return 0
    async with _connected(args, "vapora-budget") as (_, nc):
        print(await budget_command(nc, as_json=args.json))
    return 0


async def _offline_budget(args: argparse.Namespace, config: Config) -> str:
    """The budget status of a data directory. When a running ``vapora up`` serves it, its
    budget keeper answers (with the deployment's own limits); else the directory's log is
    folded, no keeper running, and the limits, which are not in the log, come from the config
    (named on stderr when it is the built-in one)."""
    from vapora import budget
    from vapora.cli.money import json_text, keeper_status, render_budget
    from vapora.config import ENV_CONFIG

    data_dir = _data_dir(args, config)
    fold = budget.Fold()  # batch by batch: the log is never held whole
    async with _connected(args, "vapora-budget") as (_, nc):
        live = await keeper_status(nc)
        if live is None:
            log = await _reading(nc)
            async for batch in log.replay(1):
                fold.apply((entry.event, entry.seq) for entry in batch)
    if live is not None:
        print(
            f"vapora budget: {data_dir} is served by a running vapora: its budget keeper "
            "answered (the deployment's own limits)",
            file=sys.stderr,
        )
        return json_text(live) if args.json else render_budget(live)
    named = args.config is not None or bool(os.environ.get(ENV_CONFIG))
    if not named and not (data_dir / "config.toml").is_file():
        print(
            f"vapora budget: {data_dir} holds no config.toml and no --config was given: "
            "the limits shown are the built-in defaults, not necessarily the deployment's",
            file=sys.stderr,
        )
    limits = budget.BudgetLimits.from_cents(
        daily_cents=config.budget.daily_limit_cents,
        monthly_cents=config.budget.monthly_limit_cents,
        per_task_cents=config.budget.per_task_limit_cents,
        warn_threshold_percent=config.budget.warn_threshold_percent,
    )
    now = _now()
    state = budget.without_expired(fold.state(), now)
    status = budget.status(state, limits, now)
    if args.json:
        return json_text(status)
    return render_budget(status)


async def cmd_audit(args: argparse.Namespace) -> int:
    from vapora.cli.money import audit_command

    async with _connected(args, "vapora-audit") as (config, nc):
        # Its replay's spans (docs/observability.md), no metrics: the deployment's /metrics port,
        # served by its own actors, would refuse a second server, and the audit has none to give.
        telemetry = _telemetry(config, "vapora-audit", metrics=False)
        try:
            code, text = await audit_command(nc, await _reading(nc), _data_dir(args, config))
            print(text, flush=True)  # before the spans' export, which may wait on a collector
        finally:
            telemetry.shutdown()
    return code


async def cmd_events(args: argparse.Namespace) -> int:
    from vapora.cli.money import events_command

    async with _connected(args, "vapora-events") as (_, nc):
        await events_command(
            await _reading(nc),
            follow=args.follow,
            type_=args.type,
            task_id=args.task_id,
            provider=args.provider,
            since=args.since,
            until=args.until,
            model=args.model,
            task_type=args.task_type,
            out=sys.stdout,
        )
    return 0


async def cmd_stream(args: argparse.Namespace) -> int:
    """Make the event stream, or bring its settings (``[storage] replicas``) up to date, and
    print them: an admin's job once actors' users may not change the stream."""
    from actors.eventlog import NoEventStream, stream_differences

    async with _connected(args, "vapora-stream") as (config, nc):
        log = _configured_log(nc, config)
        try:
            before = (await log.existing_stream()).config
        except NoEventStream:
            before = None
        changes = [] if before is None else stream_differences(before, log.wanted_config())
        await log.ensure_stream(strict=True)  # a user that may not change it: an error, exit 1
        info = await log.js.stream_info(log.settings.name)
    if before is None:
        print(f"made stream {info.config.name}")
    for key, was, now in changes:
        print(f"changed {key}: {was!r} -> {now!r}")
    c = info.config
    age = f"{c.max_age:g} s" if c.max_age else "none"
    storage = getattr(c.storage, "value", c.storage)  # an enum, or its value as decoded
    print(
        f"stream {c.name}: subjects {', '.join(c.subjects or [])}; {c.num_replicas} replica(s); "
        f"storage {storage}; max age {age}; "
        f"deny delete {c.deny_delete}, deny purge {c.deny_purge}; "
        f"{info.state.messages} events, last sequence {info.state.last_seq}"
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from vapora.config import config_command

    code, text = config_command(args.file, as_json=args.json, env=os.environ)
    (sys.stdout if code == 0 else sys.stderr).write(text if text.endswith("\n") else text + "\n")
    return code


def cmd_simulate(args: argparse.Namespace, rest: list[str]) -> int:
    from vapora.simulator import cli_main

    return int(cli_main(rest))


def cmd_schema(args: argparse.Namespace, rest: list[str]) -> int:
    from events.schema import main as schema_main

    return schema_main(rest)


async def cmd_health(args: argparse.Namespace) -> int:
    from vapora.cli.health import cmd_health as health

    return await health(args)


async def cmd_demo(args: argparse.Namespace) -> int:
    from vapora.cli.demo import run_demo

    return int(await run_demo(args))


# --- argument parsing -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vapora",
        description="Event-sourced LLM router over NATS: exact costs, hard budgets, fallbacks.",
    )
    parser.add_argument("--version", action="version", version=f"vapora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help_: str, *, nats: bool = True, config: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        if config:
            sub.add_argument(
                "--config",
                metavar="FILE",
                type=given,
                help="config file (default: $VAPORA_CONFIG or built in)",
            )
        if nats:
            sub.add_argument(
                "--nats-url",
                metavar="URL",
                type=given,
                help="NATS server URL(s), comma-separated (default: $VAPORA_NATS_URL)",
            )
        return sub

    up = command("up", "run every actor (and the embedded nats-server unless a URL is given)")
    up.add_argument(
        "--data-dir",
        metavar="DIR",
        type=given,
        help="where the server, ledger and snapshots keep files",
    )
    up.add_argument(
        "--port",
        type=port,
        default=None,
        help=f"embedded server port (default {DEFAULT_EMBEDDED_PORT}; 0: any free port)",
    )

    actor = command("actor", "run one actor in this process")
    actor.add_argument("kind", choices=["router", "provider", "budget", "ledger"])
    actor.add_argument(
        "--provider", metavar="NAME", type=given, help="which provider (for `provider`)"
    )
    actor.add_argument("--data-dir", metavar="DIR", type=given)

    ask = command("ask", "send one request through vapora.complete / vapora.stream")
    ask.add_argument("prompt")
    ask.add_argument(
        "--task-type", default="GeneralQuery", choices=[t.value for t in TaskType], metavar="TYPE"
    )
    ask.add_argument("--quality", default="Medium", choices=[q.value for q in Quality])
    ask.add_argument("--provider", type=given, help="manual override")
    ask.add_argument("--budget-cents", type=_non_negative_decimal)
    ask.add_argument("--stream", action="store_true")
    ask.add_argument("--json", action="store_true")

    report = command("report", "the cost report")
    report.add_argument(
        "--since", type=_timestamp, help="ISO 8601 time, e.g. 2026-11-01 or 2026-11-27T09:00Z"
    )
    report.add_argument("--until", type=_timestamp, help="ISO 8601 time, the end excluded")
    shown = report.add_mutually_exclusive_group()  # --json was dropped without a word
    shown.add_argument("--json", action="store_true")
    shown.add_argument(
        "--html",
        metavar="FILE",
        type=given,
        help="write a page with charts, from the log (--since/--until apply)",
    )
    report.add_argument("--data-dir", metavar="DIR", type=given, help=_OFFLINE_HELP)

    budget = command("budget", "the budget status and tier")
    budget.add_argument("--json", action="store_true")
    budget.add_argument("--data-dir", metavar="DIR", type=given, help=_OFFLINE_HELP)

    audit = command("audit", "replay the log, compare with the ledger; exit 1 on any difference")
    audit.add_argument("--data-dir", metavar="DIR", type=given, help=_OFFLINE_HELP)

    events = command("events", "print the event log")
    events.add_argument("--data-dir", metavar="DIR", type=given, help=_OFFLINE_HELP)
    events.add_argument("--follow", action="store_true")
    events.add_argument("--type", choices=sorted(EVENT_TYPES), metavar="TYPE")
    events.add_argument("--task-id", type=given)
    events.add_argument(
        "--provider", type=given, help="only events of this provider (a fallback's from or to)"
    )
    events.add_argument("--model", type=given, help="only events of this model")
    events.add_argument(
        "--task-type", choices=[t.value for t in TaskType], metavar="TYPE", help="only this type"
    )
    events.add_argument("--since", type=_timestamp, help="ISO 8601 time: events at or after it")
    events.add_argument("--until", type=_timestamp, help="ISO 8601 time, the end excluded")

    stream = command(
        "stream", "make the event stream or bring its settings up to date, and print them"
    )
    stream.add_argument("--data-dir", metavar="DIR", type=given, help=_OFFLINE_HELP)

    config = command(
        "config", "validate a config file and print what it resolves to", nats=False, config=False
    )
    config.add_argument(
        "file", nargs="?", type=given, help="default: $VAPORA_CONFIG or the built-in config"
    )
    config.add_argument("--json", action="store_true")

    commands.add_parser("simulate", help="run the provider simulators", add_help=False)
    commands.add_parser(
        "schema", help="write or check the JSON Schema of the contract", add_help=False
    )

    from vapora.cli.health import add_parser as add_health

    add_health(commands)

    demo = command(
        "demo",
        "the main job: server, actors, simulators, a realistic workload, the report",
        nats=False,  # the demo runs its own embedded server
        config=False,
    )
    demo.add_argument(
        "--config",
        metavar="FILE",
        type=given,
        help="with --real: the providers to call (default: $VAPORA_CONFIG or built in); "
        "the simulated demo runs its own config",
    )
    demo.add_argument("--data-dir", metavar="DIR", type=given, default="vapora-demo")
    demo.add_argument(
        "--requests",
        type=_demo_requests,
        default=400,
        help=f"how many requests (default 400, at most {MAX_DEMO_REQUESTS:,})",
    )
    demo.add_argument("--real", action="store_true", help="send a small workload to real providers")
    return parser


#: The most requests ``vapora demo --requests`` sends: its workload is made up front, and 10^11
#: of them ran out of memory before the first went out.
MAX_DEMO_REQUESTS = 1_000_000


def _demo_requests(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_DEMO_REQUESTS:
        raise argparse.ArgumentTypeError(f"at most {MAX_DEMO_REQUESTS:,}, got {value:,}")
    return value


_OFFLINE_HELP = "a data directory (e.g. the demo's); without a NATS URL its log is opened offline"


def _timestamp(text: str) -> datetime:
    try:
        # RFC 3339 allows a lower-case `t` and `z` (as the report's request accepts them)
        value = datetime.fromisoformat(text.upper())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text!r}") from None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is outside the years 1 to 9999 once in UTC"
        ) from None


def _positive_int(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_decimal(text: str) -> Any:
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


_ASYNC: dict[str, Callable[[argparse.Namespace], Any]] = {
    "up": cmd_up,
    "actor": cmd_actor,
    "ask": cmd_ask,
    "report": cmd_report,
    "budget": cmd_budget,
    "audit": cmd_audit,
    "events": cmd_events,
    "stream": cmd_stream,
    "demo": cmd_demo,
    "health": cmd_health,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vapora`` console command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("simulate", "schema"):
        return (cmd_simulate if argv[0] == "simulate" else cmd_schema)(
            argparse.Namespace(), argv[1:]
        )
    parser = _parser()
    args = parser.parse_args(argv)
    since, until = getattr(args, "since", None), getattr(args, "until", None)
    if since is not None and until is not None and since > until:
        # Online the ledger refused it (exit 1), offline it was an empty report (exit 0).
        parser.exit(2, f"vapora {args.command}: --since must not be after --until\n")
    quiet = args.command not in ("up", "actor", "demo")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO: one line per provider call is noise, not information.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # asyncio warns on every TLS connection nats-py closes (its stream reader's protocol says
    # it keeps the connection half open, which TLS cannot): said by every command on a TLS
    # cluster, and nothing an operator can act on.
    logging.getLogger("asyncio").addFilter(_NotTlsEofNoise())
    code = _run(args)
    # What is still buffered is written now, where an error can be said (at exit it was a
    # traceback and status 120: `vapora config > /dev/full`).
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"vapora {args.command}: cannot write the output: {exc}", file=sys.stderr)
        return max(code, 1)
    return code


class _NotTlsEofNoise(logging.Filter):
    """Drops asyncio's "returning true from eof_received() has no effect when using ssl"."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "config":
            return cmd_config(args)
        if args.command in ("up", "actor"):  # they stop in order on SIGTERM themselves
            return int(run_loop(_ASYNC[args.command], args))
        return int(run_loop(_until_terminated, _ASYNC[args.command], args))
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        # An actor that fails at start fails inside the task group that runs them all (and a
        # command inside the one that hears SIGTERM): its error comes wrapped in an exception
        # group, and is said the same way as a bare one.
        everything = _leaves(exc)
        # A reader that went away, or Ctrl-C, ends the command quietly when it is all there
        # is; beside another error, that error is said (a bug's traceback among them).
        leaves = [e for e in everything if not isinstance(e, BrokenPipeError | KeyboardInterrupt)]
        if everything and not leaves:
            if any(isinstance(leaf, BrokenPipeError) for leaf in everything):
                # The reader went away (`vapora events | head`): quiet, as a pipeline's writer
                # is. The output still buffered must not be flushed again at exit.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 141  # a shell's code for a writer ended by SIGPIPE (128 + 13)
            return 130
        codes = [_exit_code(leaf) for leaf in leaves]
        if not leaves or None in codes:
            raise  # not one of ours: a bug, with its traceback
        from vapora.telemetry.logs import printable

        for leaf in leaves:
            # Line by line (a server's log quoted in it): each line's control characters
            # escaped, its line breaks kept (they were printed as `\n`).
            text = "\n".join(printable(line) for line in str(leaf).strip().split("\n"))
            print(f"vapora {args.command}: {text}", file=sys.stderr)
        _drop_unwritable_stdout()
        return max(code for code in codes if code is not None)


#: The exit status of a command stopped by SIGTERM (128 + 15, as a shell reports it).
_TERMINATED = 143


async def _until_terminated(
    command: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """``command(args)``, cancelled by SIGTERM as Ctrl-C cancels it: what it started (the
    embedded nats-server of ``demo`` or of an offline ``events --follow``) is stopped on the
    way out. SIGTERM killed the process at once, and the server it had started ran on, holding
    the data directory's lock."""
    outcome: list[int] = []
    async with anyio.create_task_group() as tg:

        async def on_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as received:
                async for _ in received:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(on_sigterm)
        outcome.append(int(await command(args)))
        tg.cancel_scope.cancel()
    return outcome[0] if outcome else _TERMINATED


def _drop_unwritable_stdout() -> None:
    """After an error writing the output (a full disk: ``vapora report > /dev/full``), the
    buffered rest must not be flushed again at exit, a second error with a traceback."""
    try:
        sys.stdout.flush()
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _exit_code(exc: BaseException) -> int | None:
    """The exit status for an error the user can act on (None: a bug)."""
    from actors.connection import ConnectionFailed
    from actors.server import NatsServerError

    if isinstance(exc, ConfigError | NatsServerError):  # a bad config, a port in use, ...
        return 2
    if isinstance(exc, ConnectionFailed | VaporaError):
        return 1
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, OSError):  # the machine's: a full disk or output, a directory not made
        return 1
    return None


if __name__ == "__main__":
    raise SystemExit(main())
