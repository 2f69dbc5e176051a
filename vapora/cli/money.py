"""The money commands behind ``vapora report``, ``budget``, ``audit`` and ``events`` (DESIGN §5).

Plain async functions over a NATS connection and the event log; the CLI parses the flags and
prints what they return. ``report`` and ``budget`` ask the running actors over the public
subjects; ``audit`` replays the whole log itself, reads the ledger's SQLite file (read-only) and,
if a budget keeper answers, compares its status too; ``events`` prints the log one JSON object per
line.
"""

from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, TypeVar

import anyio
import msgspec
from nats.errors import NoRespondersError

from actors import tracing
from events import subjects
from events.codec import DecodeError, decode, encode, event_tag
from events.contract import BudgetStatus, BudgetStatusRequest, CostReport, ReportRequest
from events.log import EVENT_TYPES, Event, FallbackTriggered, SpendRecorded
from vapora.audit import Auditor, AuditResult, render_audit, render_report, usd
from vapora.budget import TIER_HYSTERESIS_PERCENT, BudgetLimits, as_utc
from vapora.errors import (
    InternalError,
    InvalidRequest,
    NoProviderAvailable,
    RequestTimeout,
    VaporaError,
    error_for_code,
)
from vapora.ledger import Ledger, LoggedEvent, PeriodSpend, SpendRow

if TYPE_CHECKING:
    from nats.aio.client import Client

    from actors.eventlog import EventLog, LogEntry

__all__ = [
    "LEDGER_FILE",
    "audit_command",
    "budget_command",
    "events_command",
    "keeper_status",
    "render_budget",
    "report_command",
]

T = TypeVar("T")

LEDGER_FILE = "ledger.sqlite3"  # the cost ledger actor's database under the data directory
_ASK_S = 10.0
_KEEPER_S = 1.0
_SETTLE_S = 3.0  # how long the audit waits for the ledger to reach the log's end
_CHUNK = 20_000  # events the audit holds at a time, with their ledger rows
_AUDIT_ATTEMPTS = 3  # a difference with the keeper alone is looked at this many times


# --- report and budget --------------------------------------------------------------------------


async def report_command(
    nc: Client, *, since: datetime | None, until: datetime | None, as_json: bool
) -> str:
    """The cost report from the ledger over ``vapora.report``: a table, or JSON."""
    request = ReportRequest(since=since, until=until)
    report = await _ask(nc, subjects.REPORT, request, CostReport, who="the cost ledger")
    return json_text(report) if as_json else render_report(report).rstrip("\n")


async def budget_command(nc: Client, *, as_json: bool) -> str:
    """The budget status from the keeper over ``vapora.budget``: a table, or JSON."""
    status = await _ask(
        nc, subjects.BUDGET, BudgetStatusRequest(), BudgetStatus, who="the budget keeper"
    )
    return json_text(status) if as_json else render_budget(status)


async def _ask(
    nc: Client,
    subject: str,
    message: msgspec.Struct,
    reply_type: type[T],
    *,
    who: str,
    wait_s: float = _ASK_S,
) -> T:
    try:
        reply = await nc.request(subject, encode(message), timeout=wait_s)
    except NoRespondersError as exc:
        raise NoProviderAvailable(f"{who} is not running (nothing serves {subject})") from exc
    except TimeoutError as exc:
        raise RequestTimeout(f"{who} did not answer on {subject} within {wait_s:g} s") from exc
    headers = reply.headers or {}
    if headers.get("Nats-Service-Error-Code"):
        raise _error_of(reply.data, headers)
    try:
        return decode(reply.data, reply_type)
    except DecodeError as exc:
        raise InternalError(f"unreadable answer from {who}: {exc}") from exc


def _error_of(data: bytes, headers: dict[str, str]) -> VaporaError:
    try:
        body = msgspec.json.decode(data)
        return error_for_code(body["error"]["code"], body["error"]["message"])
    except (msgspec.DecodeError, KeyError, TypeError):
        return InternalError(headers.get("Nats-Service-Error", "error"))


def json_text(message: msgspec.Struct) -> str:
    """``message`` as indented JSON for the terminal or a script, money as plain decimal
    strings: the contract's encoder (:func:`events.codec.encode`) writes Python's ``str`` of a
    decimal, an exponent for amounts below a millionth (``"7.5E-8"``, ``"0E-7"``), and that is
    the wire form every actor shares; only this output is changed (``"0.000000075"``)."""
    builtins = msgspec.to_builtins(message, builtin_types=(Decimal,))
    return msgspec.json.format(msgspec.json.encode(_plain_money(builtins)), indent=2).decode()


def _plain_money(value: object) -> object:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return {key: _plain_money(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_money(item) for item in value]
    return value


def render_budget(status: BudgetStatus) -> str:
    """The budget status as ``vapora budget`` prints it."""
    rows = [
        ("today (UTC)", status.spent_today_usd, status.daily_limit_usd, status.daily_percent),
        ("this month", status.spent_month_usd, status.monthly_limit_usd, status.monthly_percent),
    ]
    cells = [("", "spent", "limit", "used, holds counted")] + [
        (
            name,
            usd(spent),
            "unlimited" if cap is None else usd(cap),
            "-" if cap is None else f"{percent:.2f} %",
        )
        for name, spent, cap, percent in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    per_task = status.per_task_limit_usd
    lines = [
        f"Budget at {status.at:%Y-%m-%d %H:%M:%S} UTC   tier {status.tier}"
        f"   (NearThreshold from 50 %, Exceeded above {status.warn_threshold_percent:g} %;"
        f" back down {TIER_HYSTERESIS_PERCENT} points below either)",
        "",
        *(
            f"  {a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}"
            for a, b, c, d in cells
        ),
        "",
        f"  open reservations   {status.open_reservations}, holding {usd(status.reserved_usd)}",
        f"  router leases       {status.open_leases}, holding {usd(status.leased_usd)} unspent",
        f"  per-task limit      {'unlimited' if per_task is None else usd(per_task)}",
    ]
    return "\n".join(lines)


# --- audit --------------------------------------------------------------------------------------


async def audit_command(nc: Client, log: EventLog, data_dir: str | Path) -> tuple[int, str]:
    """Replay the whole log, compare it with the ledger at ``data_dir`` and (if one answers)
    the budget keeper; ``(1, the differences)`` on any, else ``(0, a one-line summary)``.

    The ledger is opened read-only and compared up to the last sequence the replay read, in one
    read transaction: what a live ledger applied after it is for the next audit. The keeper's
    spend today and this month is compared with the fold of the log and with the ledger's own
    sums for the same UTC day and month (read before and after the keeper answered: on a live
    system the keeper's figure lies between the two). The log and the keeper can still move
    between the reads, so a difference with the keeper alone is looked at again (twice, half a
    second apart) before it is reported; differences in costs or in the ledger are reported at
    once.
    """
    path = Path(data_dir) / LEDGER_FILE
    events = await log.last_sequence()
    if events == 0:
        return 2, (
            "audit: the event log is empty: nothing to audit (is this the deployment's NATS "
            "server, or its data directory?)"
        )
    if not await anyio.Path(path).exists():
        # Most often the wrong directory (the default is relative to where the command runs):
        # said as such, not as every spend of the log missing from a ledger.
        return 2, (
            f"audit: no ledger database at {path}: the cost ledger writes {LEDGER_FILE} in the "
            "deployment's data directory; pass it with --data-dir, or the deployment's config "
            f"with --config (the event log holds {events} events). A ledger whose file was "
            "lost is rebuilt from the log when the ledger actor starts again."
        )
    other = await another_logs(path, log)
    if other is not None:
        return 2, f"audit: {other}"
    fold = await keeper_status(nc) is not None  # the fold is for a keeper to compare with
    for attempt in range(_AUDIT_ATTEMPTS):
        notes, result = await _audit_once(nc, log, path, fold=fold)
        if not fold and await keeper_status(nc) is not None:
            fold = True  # a keeper came up meanwhile: once more, with it compared
            notes, result = await _audit_once(nc, log, path, fold=True)
        if result.ok or not _only_keeper(result) or attempt == _AUDIT_ATTEMPTS - 1:
            break
        await anyio.sleep(0.5)
    text = "\n".join([*notes, render_audit(result).rstrip("\n")])
    if not result.ok and _only_keeper(result) and _against_the_fold(result):
        text += "\n" + _KEEPER_ADVICE
    unlogged = await _unlogged(Path(data_dir), path)
    if unlogged:
        text += "\n" + unlogged
        return 1, text
    return (0 if result.ok else 1), text


def left_on_the_way(data_dir: Path) -> dict[str, tuple[SpendRecorded, Path]]:
    """The spend events in ``data_dir``'s files of provider actors that stopped with them on
    their way to the log, by id (an event in two files, a kill between a rotation's two steps,
    is one), with a file holding each (``actors.held.orphaned``)."""
    from actors.held import orphaned

    return {
        e.id: (e, path)
        for path, events in orphaned(data_dir)
        for e in events
        if isinstance(e, SpendRecorded)
    }


async def _unlogged(data_dir: Path, ledger_path: Path) -> str | None:
    """What spend lies in files of provider actors that stopped with it on its way to the log
    (killed mid-call, or during an outage), and is not in the ledger: the audit of the log
    alone said "no differences" while it waited there (a review: four calls' upper bounds).
    None when there is none."""
    spends = await anyio.to_thread.run_sync(left_on_the_way, data_dir)
    if not spends:
        return None
    try:
        async with await Ledger.open_read_only(ledger_path) as ledger:
            recorded = await ledger.recorded(spends)
    except VaporaError:  # the ledger gone or busy meanwhile: the files are named all the same
        recorded = set()
    missing = [(e, path) for event_id, (e, path) in spends.items() if event_id not in recorded]
    if not missing:
        return None
    total = sum((e.cost_usd for e, _ in missing), Decimal(0))
    named = sorted({path.name for _, path in missing})
    return (
        f"audit: {len(missing)} spend events ({usd(total)}) are not in the ledger: held in "
        f"{', '.join(named)} by provider actors that stopped with them on their way to the log "
        "(killed mid-call, or during an outage; the last seconds' may be in the log already, "
        "the ledger behind). A provider actor that starts on this data directory appends "
        "them; audit again then"
    )


#: What an operator can do when only the budget keeper's state differs from the fold of the
#: log (not when its spend differs from the ledger's rows: a fold of the log counts as the
#: keeper does, an event id stored again after a day twice, say).
_KEEPER_ADVICE = (
    "only the keeper's state differs from the fold of the log: it is rebuilt from the log when "
    "it starts without its snapshot (stop it, move budget.snapshot out of its data directory, "
    "start it again; reservations wait for it meanwhile)"
)


def _against_the_fold(result: AuditResult) -> bool:
    """Whether the keeper differs from the fold of the log (and not only from the ledger)."""
    return any(not d.where.endswith("vs the ledger's rows") for d in result.discrepancies)


#: How many of the ledger's first events are looked up in the log to tell whose ledger it is.
_SAME_LOG_PROBES = 10


async def another_logs(path: Path, log: EventLog) -> str | None:
    """Why the ledger at ``path`` was written from another event log (None: from this one, as
    far as its first events tell). A ledger file left in the directory by another deployment
    (`./.vapora`, the default) was audited against this log: its every row a difference, and
    the advice to wait for the ledger to catch up. Its first events are looked up in the log by
    sequence: the same log stored the same event (id) there."""
    async with _ledger_at(path) as ledger:
        if ledger is None:
            return None
        _, logged = await ledger.snapshot(through=_SAME_LOG_PROBES)
    for entry in logged:
        if entry.event_id.startswith("unreadable-"):  # what the ledger could not store
            continue
        stored = await log.stored(entry.seq)
        if stored is None:  # aged out of a stream with limits: nothing to tell by
            continue
        logged_id = (stored.headers or {}).get("Nats-Msg-Id")
        if logged_id is not None and logged_id != entry.event_id:
            return (
                f"the ledger database at {path} was written from another event log: its "
                f"event at sequence {entry.seq} is {entry.event_id}, the log's is {logged_id}. "
                "This is most often the wrong data directory (the default, ./.vapora, is "
                "relative to where the command runs): pass the deployment's with --data-dir"
            )
    return None


async def _audit_once(
    nc: Client, log: EventLog, path: Path, *, fold: bool
) -> tuple[list[str], AuditResult]:
    """One pass: the log up to its end as it is now, read chunk by chunk with the ledger's rows
    and index for the same sequences (so neither is held whole), then the keeper (``fold``:
    one was running at the start, so the log is folded to compare it; without, no fold)."""
    notes: list[str] = []
    end = await log.last_sequence()
    auditor = Auditor(fold=fold)
    async with _ledger_at(path) as ledger:
        if ledger is None:  # removed since the command looked
            notes.append(f"audit: no ledger database at {path}; every spend is missing from it")
        else:
            await _ledger_reached(ledger, end)  # a ledger that lags further: missing rows
            position = await ledger.last_sequence()
            if position < end:
                notes.append(
                    f"audit: the ledger's file stops at log sequence {position}, before the "
                    f"log's end ({end}): its actor is behind, or stopped before applying the "
                    "rest (a hard stop, a crash); the spend past it is reported missing below. "
                    "With the ledger running again (vapora up, or vapora actor ledger) and "
                    "caught up, audit again: what it then finds is real"
                )
        fed = _BEFORE_ANY  # (rows at sequence 0 or below, which no event has, are read too)
        async for chunk in _chunks(log, end):
            high = chunk[-1][1]
            rows, logged = await _ledger_between(ledger, fed, high)
            auditor.feed(chunk, rows, logged)
            fed = high
        status = await keeper_status(nc) if auditor.folds else None
        before = await ledger.period_spend(status.at, through=end) if ledger and status else None
        after = await _ledger_spend_after(ledger, log, status)
        beyond = await _ledger_beyond(ledger, log)
    if status is None:
        notes.append(
            "audit: no budget keeper is running (none answered on vapora.budget: offline, or "
            "not deployed); the comparison with its totals is skipped"
        )
    return notes, auditor.finish(
        keeper=status,
        limits=_limits_of(status) if status is not None else None,
        unreadable=log.unreadable,
        ledger_before=before,
        ledger_after=after,
        ledger_beyond=beyond,
    )


async def _chunks(log: EventLog, end: int) -> AsyncIterator[list[tuple[Event, int]]]:
    """The log's ``(event, seq)`` pairs up to sequence ``end``, about :data:`_CHUNK` at a time."""
    chunk: list[tuple[Event, int]] = []
    replay = log.replay(1)
    wildcard = log.settings.wildcard
    async with contextlib.aclosing(replay):  # its consumer deleted at once when left early
        async for batch in replay:
            # With telemetry on, a span per batch read, linking to its events' traces (a new
            # root: an audit adds no spans under months-old traces), as the ledger's replay.
            with tracing.processed(batch, group="audit", replay=True, destination=wildcard):
                for entry in batch:
                    if entry.seq > end:
                        break
                    chunk.append((entry.event, entry.seq))
            if len(chunk) >= _CHUNK or (chunk and chunk[-1][1] >= end) or batch[-1].seq >= end:
                if chunk:
                    yield chunk
                chunk = []
                if batch[-1].seq >= end:
                    return
    if chunk:
        yield chunk


async def _ledger_between(
    ledger: Ledger | None, after: int, through: int
) -> tuple[list[SpendRow], list[LoggedEvent]]:
    if ledger is None:
        return [], []
    return await ledger.snapshot(through=through, after=after)


def _only_keeper(result: AuditResult) -> bool:
    return all(d.where.startswith("budget keeper") for d in result.discrepancies)


@contextlib.asynccontextmanager
async def _ledger_at(path: Path) -> AsyncIterator[Ledger | None]:
    """The ledger's file opened read-only (the actor goes on writing it), or None if missing."""
    if not await anyio.Path(path).exists():
        yield None
        return
    async with await Ledger.open_read_only(path) as ledger:
        yield ledger


async def _ledger_spend_after(
    ledger: Ledger | None, log: EventLog, status: BudgetStatus | None
) -> PeriodSpend | None:
    """The ledger's spend in the keeper's UTC day and month, read after the keeper answered and
    once the ledger has reached the log's end as it was then (so it counts at least what the
    keeper had counted)."""
    if ledger is None or status is None:
        return None
    await _ledger_reached(ledger, await log.last_sequence())
    return await ledger.period_spend(status.at)


async def _ledger_beyond(
    ledger: Ledger | None, log: EventLog
) -> tuple[int, list[SpendRow], list[LoggedEvent]] | None:
    """What the ledger recorded past the log's end, read after the ledger's own position (so a
    live ledger that applied events the log gained meanwhile is not counted): ``(the log's last
    sequence, those spend rows, those events)``, or None when it holds nothing past the end.
    Something there is spend the reports count and the log no longer has: a log that lost its
    last writes (a crash within ``sync_interval``, a restored backup) or another log's ledger."""
    if ledger is None:
        return None
    # Whatever the ledger's own position says (a row added past it was not looked at): what
    # it holds past the log's end, then the end read again, so that what a live ledger
    # applied meanwhile, which the log has, is not counted.
    rows, logged = await ledger.snapshot(after=await log.last_sequence())
    if not rows and not logged:
        return None
    end = await log.last_sequence()
    rows = [row for row in rows if row.seq > end]
    logged = [entry for entry in logged if entry.seq > end]
    return (end, rows, logged) if rows or logged else None


#: Below every sequence a ledger row may be stored at (SQLite's least integer).
_BEFORE_ANY = -(2**63)


async def _ledger_reached(ledger: Ledger, last: int) -> None:
    # The ledger actor writes the file from another process; each read sees its last commit.
    # Polling a file: there is nothing to wait on.
    for _ in range(int(_SETTLE_S / 0.05)):
        if await ledger.last_sequence() >= last:
            return
        await anyio.sleep(0.05)


async def keeper_status(nc: Client) -> BudgetStatus | None:
    """The running budget keeper's status, or None when none answers."""
    with contextlib.suppress(VaporaError):
        return await _ask(
            nc,
            subjects.BUDGET,
            BudgetStatusRequest(),
            BudgetStatus,
            who="the budget keeper",
            wait_s=_KEEPER_S,
        )
    return None


def _limits_of(status: BudgetStatus) -> BudgetLimits:
    return BudgetLimits(
        daily_usd=status.daily_limit_usd,
        monthly_usd=status.monthly_limit_usd,
        per_task_usd=status.per_task_limit_usd,
        warn_threshold_percent=Decimal(str(status.warn_threshold_percent)),
    )


# --- events -------------------------------------------------------------------------------------


async def events_command(
    log: EventLog,
    *,
    follow: bool,
    type_: str | None,
    task_id: str | None,
    out: TextIO,
    provider: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    model: str | None = None,
    task_type: str | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the log's events (one JSON object per line), filtered by type tag, task id,
    provider, model, task type and time (``since <= at < until``, the report's window: the
    spends behind a report's figure are ``--type spend_recorded`` with the figure's window and
    its ``--provider``, ``--model`` or ``--task-type``); with ``follow``, keep printing new
    events until cancelled. An event stored again (the same id: a held event appended after
    the log's duplicate window) is printed once, as every reader counts it once, and the
    repeats are said on ``err``. Returns how many were printed."""
    if type_ is not None and type_ not in EVENT_TYPES:
        raise InvalidRequest(
            f"unknown event type {type_!r}; choose one of {', '.join(sorted(EVENT_TYPES))}"
        )
    wanted = _filter(type_, task_id, provider, since, until, model, task_type)
    printed = 0
    position = 0
    seen: OrderedDict[str, int] = OrderedDict()  # printed event ids, and their sequences
    repeats: list[tuple[int, int]] = []  # (repeat's sequence, the first's)

    async def show(batch: list[LogEntry[Event]]) -> None:
        nonlocal printed, position
        lines = []
        for entry in batch:
            if not wanted(entry.event):
                continue
            first = seen.get(entry.event.id)
            if first is not None:
                repeats.append((entry.seq, first))
                if follow:  # a follow never ends: said as it comes
                    print(
                        f"vapora events: sequence {entry.seq} stores event {entry.event.id} "
                        f"again (listed at {first}): not listed again",
                        file=err if err is not None else sys.stderr,
                    )
                continue
            seen[entry.event.id] = entry.seq
            if len(seen) > _IDS_REMEMBERED:
                seen.popitem(last=False)
            lines.append(encode(entry.event).decode())
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()
            printed += len(lines)
        position = batch[-1].seq

    if follow:  # through a nats-server restart too: the follower reopens its tail
        from actors.follow import LogFollower

        follower = LogFollower(log, name="vapora events", apply=show, position=lambda: position)
        await follower.run()
    async for batch in log.replay(1):
        await show(batch)
    if repeats and not follow:
        shown = ", ".join(f"{seq} (of {first})" for seq, first in repeats[:5])
        more = f" and {len(repeats) - 5} more" if len(repeats) > 5 else ""
        print(
            f"vapora events: {len(repeats)} events stored again under an id already listed, "
            f"not listed again (every reader counts each once): sequences {shown}{more}",
            file=err if err is not None else sys.stderr,
        )
    return printed


#: Event ids ``vapora events`` remembers to list each once (a follow runs for ever).
_IDS_REMEMBERED = 1_000_000


def _filter(
    type_: str | None,
    task_id: str | None,
    provider: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    model: str | None = None,
    task_type: str | None = None,
) -> Callable[[Event], bool]:
    def wanted(event: Event) -> bool:
        if type_ is not None and event_tag(event) != type_:
            return False
        if task_id is not None and getattr(event, "task_id", None) != task_id:
            return False
        if provider is not None and provider not in _providers_of(event):
            return False
        if model is not None and getattr(event, "model", None) != model:
            return False
        if task_type is not None and getattr(event, "task_type", None) != task_type:
            return False
        # An event's time without an offset is UTC, as every other reader takes it (compared
        # as it was, it stopped the command with a TypeError).
        at = as_utc(event.at)
        if since is not None and at < since:
            return False
        return until is None or at < until

    return wanted


def _providers_of(event: Event) -> tuple[object, ...]:
    """The providers an event is about: its ``provider``, a fallback's two."""
    if isinstance(event, FallbackTriggered):
        return (event.from_provider, event.to_provider)
    return (getattr(event, "provider", None),)
