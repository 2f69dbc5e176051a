"""The audit: replay the log, recompute every cost and total, compare with the ledger and keeper.

Pure functions over values the CLI (``vapora audit``) gathers: the log as ``(event, stream_seq)``
pairs from the first event, the ledger's rows (:meth:`vapora.ledger.Ledger.spend_rows` and
:meth:`~vapora.ledger.Ledger.logged_events`) and, optionally, the budget keeper's state or status.
Each difference is a :class:`Discrepancy` naming where it is (the event id, the ledger row's
sequence) with what the log says and what was found. An empty list means the audit passed.

What is checked
    * every ``spend_recorded``'s ``cost_usd`` against its usage at its recorded prices
      (:func:`vapora.pricing.cost`), exactly, to the last decimal;
    * every spend event has exactly one ledger row with the same figures, and no row lacks its
      event; every event of the log is in the ledger's event index once (when given);
    * totals by provider, model, task type and UTC day, recomputed from the log, equal the
      ledger's sums;
    * the keeper's state equals the fold of the log up to the keeper's last sequence (a
      :class:`~vapora.budget.BudgetState`), or its status equals the status of that fold at the
      status's own time (a :class:`~events.contract.BudgetStatus`);
    * a keeper's status also against the ledger's own rows: its spend today and this month equal
      the ledger's sums for the status's UTC day and month (:func:`check_keeper_spend`). The fold
      forgets the spend ids it counted a day (of event time) after them, so a duplicate appended
      later is counted twice by the keeper *and* by the replay; the ledger counts it once.

An event id appearing twice in the log (a duplicate append) counts once, as in the ledger.

:func:`render_report` and :func:`render_audit` format the results as readable tables.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal

import msgspec

from events.codec import event_tag
from events.contract import BudgetStatus, CostReport, Usage
from events.log import Event, SpendRecorded
from vapora import budget
from vapora.budget import BudgetLimits, BudgetState
from vapora.ledger import LoggedEvent, PeriodSpend, SpendRow, period_spend
from vapora.pricing import cost as priced

__all__ = [
    "AuditResult",
    "Discrepancy",
    "Totals",
    "audit",
    "check_budget",
    "check_costs",
    "check_keeper_spend",
    "check_ledger",
    "ledger_totals",
    "recompute_cost",
    "render_audit",
    "render_report",
    "replay_totals",
    "usd",
]

_ZERO = Decimal(0)


class Discrepancy(msgspec.Struct, frozen=True, kw_only=True):
    """One difference: ``where`` it is, what the log implies, what was found, and the event."""

    where: str
    expected: str
    found: str
    event_id: str | None = None

    def __str__(self) -> str:
        ref = f" [event {self.event_id}]" if self.event_id else ""
        return f"{self.where}: expected {self.expected}, found {self.found}{ref}"


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """Spend summed from one source: overall and by provider, model, task type and UTC day."""

    total_usd: Decimal = _ZERO
    calls: int = 0
    by_provider: dict[str, Decimal] = {}
    by_model: dict[str, Decimal] = {}
    by_task_type: dict[str, Decimal] = {}
    by_day: dict[str, Decimal] = {}


class AuditResult(msgspec.Struct, frozen=True, kw_only=True):
    """The audit's findings and how much it looked at; ``ok`` when nothing differs."""

    discrepancies: list[Discrepancy]
    events_checked: int
    spends_checked: int
    rows_checked: int
    last_sequence: int

    @property
    def ok(self) -> bool:
        return not self.discrepancies


# --- recomputation ------------------------------------------------------------------------------


def recompute_cost(event: SpendRecorded) -> Decimal:
    """The cost of the event's usage at the event's own recorded prices."""
    usage = Usage(
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        cache_read_tokens=event.cache_read_tokens,
        cache_write_tokens=event.cache_write_tokens,
    )
    return priced(usage, event.price)


def _first_spends(log: Iterable[tuple[Event, int]]) -> list[tuple[SpendRecorded, int]]:
    """Each spend event once (its first appearance), with its sequence."""
    seen: set[str] = set()
    spends = []
    for event, seq in log:
        if isinstance(event, SpendRecorded) and event.id not in seen:
            seen.add(event.id)
            spends.append((event, seq))
    return spends


def replay_totals(spends: Iterable[SpendRecorded]) -> Totals:
    """Totals recomputed from spend events (pass each event once)."""
    return _totals(
        (s.cost_usd, s.provider, s.model, str(s.task_type), _utc(s.at).date().isoformat())
        for s in spends
    )


def ledger_totals(rows: Iterable[SpendRow]) -> Totals:
    """Totals summed from the ledger's rows."""
    return _totals(
        (r.cost_usd, r.provider, r.model, r.task_type, r.at.date().isoformat()) for r in rows
    )


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _totals(items: Iterable[tuple[Decimal, str, str, str, str]]) -> Totals:
    groups: list[defaultdict[str, Decimal]] = [defaultdict(Decimal) for _ in range(4)]
    total, calls = _ZERO, 0
    for cost, *keys in items:
        total += cost
        calls += 1
        for group, key in zip(groups, keys, strict=True):
            group[key] += cost
    provider, model, task_type, day = (dict(sorted(g.items())) for g in groups)
    return Totals(
        total_usd=total,
        calls=calls,
        by_provider=provider,
        by_model=model,
        by_task_type=task_type,
        by_day=day,
    )


# --- checks -------------------------------------------------------------------------------------


def check_costs(log: Iterable[tuple[Event, int]]) -> list[Discrepancy]:
    """Spend events whose ``cost_usd`` differs from their usage at their recorded prices."""
    found = []
    for event, seq in _first_spends(log):
        expected = recompute_cost(event)
        if expected != event.cost_usd:
            found.append(
                Discrepancy(
                    where=f"spend_recorded seq {seq} (task {event.task_id}, {event.provider}"
                    f"/{event.model}): cost_usd vs usage x prices {event.price.source}"
                    f"@{event.price.version}",
                    expected=_usd(expected),
                    found=_usd(event.cost_usd),
                    event_id=event.id,
                )
            )
    return found


def check_ledger(
    log: Sequence[tuple[Event, int]],
    rows: Sequence[SpendRow],
    logged: Sequence[LoggedEvent] | None = None,
) -> list[Discrepancy]:
    """Compare the ledger's spend rows (and event index, if given) with the log, row by row and
    in totals."""
    spends = _first_spends(log)
    found = _compare_rows(spends, rows)
    expected_totals, ledger = replay_totals(e for e, _ in spends), ledger_totals(rows)
    found += _compare_totals(expected_totals, ledger, "ledger")
    if logged is not None:
        found += _compare_index(log, logged)
    return found


def check_ledger_beyond(
    end: int, rows: Sequence[SpendRow], logged: Sequence[LoggedEvent]
) -> list[Discrepancy]:
    """Each event the ledger recorded past the log's last sequence ``end``: the log has lost it
    (or the ledger is another log's), and a spend among them is counted by every report."""
    cost = {row.seq: row.cost_usd for row in rows}
    found = []
    for entry in logged:
        spent = cost.get(entry.seq)
        what = entry.type + (f" of {usd(spent)}" if spent is not None else "")
        found.append(
            Discrepancy(
                where=f"ledger at sequence {entry.seq}",
                expected=f"nothing past the log's last sequence {end}",
                found=what,
                event_id=entry.event_id,
            )
        )
    return found


def _compare_rows(
    spends: Sequence[tuple[SpendRecorded, int]], rows: Sequence[SpendRow]
) -> list[Discrepancy]:
    by_id: defaultdict[str, list[SpendRow]] = defaultdict(list)
    for row in rows:
        by_id[row.event_id].append(row)
    found = []
    for event, seq in spends:
        matches = by_id.pop(event.id, [])
        if not matches:
            found.append(_missing_row(event, seq))
            continue
        found += _compare_row(event, seq, matches[0])
        found += [_extra_row(row, "a second row for the same event") for row in matches[1:]]
    for extra in by_id.values():
        found += [_extra_row(row, "no such spend_recorded in the log") for row in extra]
    return found


def _missing_row(event: SpendRecorded, seq: int) -> Discrepancy:
    return Discrepancy(
        where=f"ledger: spend_recorded seq {seq}",
        expected=f"a row costing {_usd(event.cost_usd)}",
        found="no row",
        event_id=event.id,
    )


def _extra_row(row: SpendRow, why: str) -> Discrepancy:
    return Discrepancy(
        where=f"ledger row seq {row.seq}",
        expected=f"no row ({why})",
        found=f"a row costing {_usd(row.cost_usd)}",
        event_id=row.event_id,
    )


_ROW_FIELDS: tuple[tuple[str, Callable[[SpendRecorded, int], object]], ...] = (
    ("seq", lambda e, seq: seq),
    ("cost_usd", lambda e, seq: e.cost_usd),
    ("at", lambda e, seq: _utc(e.at)),
    ("task_id", lambda e, seq: e.task_id),
    ("task_type", lambda e, seq: str(e.task_type)),
    ("provider", lambda e, seq: e.provider),
    ("model", lambda e, seq: e.model),
    ("reservation_id", lambda e, seq: e.reservation_id),
    ("attempt", lambda e, seq: e.attempt),
    ("input_tokens", lambda e, seq: e.input_tokens),
    ("output_tokens", lambda e, seq: e.output_tokens),
    ("cache_read_tokens", lambda e, seq: e.cache_read_tokens),
    ("cache_write_tokens", lambda e, seq: e.cache_write_tokens),
    ("price", lambda e, seq: e.price),
)


def _compare_row(event: SpendRecorded, seq: int, row: SpendRow) -> list[Discrepancy]:
    found = []
    for name, expected_of in _ROW_FIELDS:
        expected, actual = expected_of(event, seq), getattr(row, name)
        if expected != actual:
            found.append(
                Discrepancy(
                    where=f"ledger row seq {row.seq}: {name}",
                    expected=_show(expected),
                    found=_show(actual),
                    event_id=event.id,
                )
            )
    return found


def _compare_totals(expected: Totals, found: Totals, source: str) -> list[Discrepancy]:
    out = []
    if expected.total_usd != found.total_usd:
        out.append(_total(f"{source} total", expected.total_usd, found.total_usd))
    if expected.calls != found.calls:
        out += _differences(source, [("calls", expected.calls, found.calls)])
    for name in ("by_provider", "by_model", "by_task_type", "by_day"):
        mine, theirs = getattr(expected, name), getattr(found, name)
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key, _ZERO) != theirs.get(key, _ZERO):
                label = f"{source} total {name.replace('_', ' ')} {key}"
                out.append(_total(label, mine.get(key, _ZERO), theirs.get(key, _ZERO)))
    return out


def _total(where: str, expected: Decimal, found: Decimal) -> Discrepancy:
    return Discrepancy(where=where, expected=_usd(expected), found=_usd(found))


def _compare_index(
    log: Sequence[tuple[Event, int]], logged: Sequence[LoggedEvent]
) -> list[Discrepancy]:
    first: dict[str, tuple[Event, int]] = {}
    for event, seq in log:
        first.setdefault(event.id, (event, seq))
    found, seen = [], set()
    for entry in logged:
        if entry.event_id in seen or entry.event_id not in first:
            why = "a second entry for this event" if entry.event_id in seen else "not in the log"
            found.append(
                _index_entry(f"seq {entry.seq}", f"no entry ({why})", entry.type, entry.event_id)
            )
        seen.add(entry.event_id)
    for event_id, (event, seq) in first.items():
        if event_id not in seen:
            found.append(
                _index_entry(f"{event_tag(event)} seq {seq}", "an entry", "none", event_id)
            )
    return found


def _index_entry(where: str, expected: str, found: str, event_id: str | None = None) -> Discrepancy:
    return Discrepancy(
        where=f"ledger event index: {where}", expected=expected, found=found, event_id=event_id
    )


def check_budget(
    log: Sequence[tuple[Event, int]],
    keeper: BudgetState | BudgetStatus,
    limits: BudgetLimits | None = None,
) -> list[Discrepancy]:
    """Compare the keeper's state (or status, with ``limits``) with the fold of the log."""
    if isinstance(keeper, BudgetState):
        upto = [(e, s) for e, s in log if s <= keeper.last_sequence]
        return _compare_state(budget.catch_up(budget.EMPTY, upto), keeper)
    replayed = budget.status(
        budget.catch_up(budget.EMPTY, log), limits or BudgetLimits(), keeper.at
    )
    return _compare_status(replayed, keeper)


def _compare_state(expected: BudgetState, found: BudgetState) -> list[Discrepancy]:
    checks: list[tuple[str, object, object]] = [
        ("total spent", expected.total_spent_usd, found.total_spent_usd),
        ("spend events", expected.spend_events, found.spend_events),
        ("reserved", expected.reserved_usd, found.reserved_usd),
        ("open reservations", _ids(expected), _ids(found)),
        ("leased", expected.leased_usd, found.leased_usd),
        ("open leases", ", ".join(sorted(expected.leases)), ", ".join(sorted(found.leases))),
    ]
    for day in sorted(set(expected.days) | set(found.days)):
        checks.append((f"spent on {day}", expected.spent_on(day), found.spent_on(day)))
    for month in sorted(set(expected.months) | set(found.months)):
        label = f"spent in {month:%Y-%m}"
        checks.append((label, expected.spent_in_month(month), found.spent_in_month(month)))
    return _differences("budget keeper", checks)


def check_keeper_spend(
    status: BudgetStatus, before: PeriodSpend, after: PeriodSpend | None = None
) -> list[Discrepancy]:
    """The keeper's spend today and this month against the ledger's sums for the status's UTC
    day and month: ``before`` read before the keeper answered, ``after`` (if given) once the
    ledger had reached the log's end as it was after the answer. Spend only grows, so a keeper
    that counted each spend once shows a figure from ``before`` to ``after``; equal to it on a
    quiet system."""
    after = after or before
    checks = (
        ("today", status.spent_today_usd, before.day, after.day),
        ("this month", status.spent_month_usd, before.month, after.month),
    )
    return [
        Discrepancy(
            where=f"budget keeper spent {name} vs the ledger's rows",
            expected=_usd(low) if low == high else f"{_usd(low)} to {_usd(high)}",
            found=_usd(keeper),
        )
        for name, keeper, low, high in checks
        if not min(low, high) <= keeper <= max(low, high)
    ]


def _ids(state: BudgetState) -> str:
    return ", ".join(sorted(state.open_reservations())) or "none"


def _compare_status(expected: BudgetStatus, found: BudgetStatus) -> list[Discrepancy]:
    checks: list[tuple[str, object, object]] = [
        ("spent today", expected.spent_today_usd, found.spent_today_usd),
        ("spent this month", expected.spent_month_usd, found.spent_month_usd),
        ("reserved", expected.reserved_usd, found.reserved_usd),
        ("open reservations", expected.open_reservations, found.open_reservations),
        ("leased", expected.leased_usd, found.leased_usd),
        ("open leases", expected.open_leases, found.open_leases),
        ("tier", expected.tier, found.tier),
    ]
    return _differences("budget keeper", checks)


def _differences(source: str, checks: Iterable[tuple[str, object, object]]) -> list[Discrepancy]:
    return [
        Discrepancy(where=f"{source} {name}", expected=_show(mine), found=_show(theirs))
        for name, mine, theirs in checks
        if mine != theirs
    ]


def audit(
    log: Sequence[tuple[Event, int]],
    rows: Sequence[SpendRow],
    logged: Sequence[LoggedEvent] | None = None,
    keeper: BudgetState | BudgetStatus | None = None,
    limits: BudgetLimits | None = None,
    unreadable: Mapping[int, str] | None = None,
    ledger_after: PeriodSpend | None = None,
    ledger_beyond: tuple[int, Sequence[SpendRow], Sequence[LoggedEvent]] | None = None,
) -> AuditResult:
    """Every check at once: costs, ledger rows and totals, event index, and the keeper.
    ``unreadable``: messages stored in the log that are not events (sequence -> what is wrong),
    which every reader skips: each is a difference (a spend among them would be money no total
    counts). A keeper's status is also checked against ``rows`` (and ``ledger_after``, the
    ledger's spend in the status's day and month read after it: :func:`check_keeper_spend`).
    ``ledger_beyond``: the log's last sequence and what the ledger recorded past it
    (:func:`check_ledger_beyond`)."""
    found = [
        Discrepancy(where=f"event log at sequence {seq}", expected="an event", found=problem)
        for seq, problem in sorted((unreadable or {}).items())
    ]
    found += check_costs(log) + check_ledger(log, rows, logged)
    if ledger_beyond is not None:
        found += check_ledger_beyond(*ledger_beyond)
    if keeper is not None:
        found += check_budget(log, keeper, limits)
    if isinstance(keeper, BudgetStatus):
        before = period_spend(((row.at, row.cost_usd) for row in rows), keeper.at)
        found += check_keeper_spend(keeper, before, ledger_after)
    return AuditResult(
        discrepancies=found,
        events_checked=len(log),
        spends_checked=len(_first_spends(log)),
        rows_checked=len(rows),
        last_sequence=max((seq for _, seq in log), default=0),
    )


# --- rendering ----------------------------------------------------------------------------------


def usd(value: Decimal) -> str:
    """Exact, readable dollars: at least cents, never rounded, never an exponent
    (``$0.000000075``, ``$1.50``, ``$0.00``)."""
    text = format(value.normalize(), "f") if value else "0"
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


_usd = usd


def _show(value: object) -> str:
    if isinstance(value, Decimal):
        return _usd(value)
    if value is None:
        return "none"
    return str(value)


def render_report(report: CostReport) -> str:
    """The cost report as the readable table ``vapora report`` prints."""
    window = f"{_when(report.since, 'the first event')} .. {_when(report.until, 'now')}"
    lines = [
        f"Cost report   {window}   (log sequence {report.last_sequence})",
        "",
        f"  Total               {_usd(report.total_usd)}   {report.calls} calls",
        f"  Daily average       {_usd(report.daily_average_usd)}"
        f"   over {report.days_observed} day(s) observed",
        f"  Monthly projection  {_usd(report.monthly_projection_usd)}   (this month's run rate)",
    ]
    for title, groups in (
        ("provider", report.by_provider),
        ("model", report.by_model),
        ("task type", report.by_task_type),
        ("day (UTC)", report.by_day),
        ("hour (UTC)", report.by_hour),
    ):
        lines += ["", *_table(f"By {title}", groups, report.total_usd)]
    return "\n".join(lines) + "\n"


def _when(at: datetime | None, default: str) -> str:
    return default if at is None else f"{_utc(at):%Y-%m-%d %H:%M:%S} UTC"


def _table(title: str, groups: dict[str, Decimal], total: Decimal) -> list[str]:
    if not groups:
        return [title, "  (none)"]
    width = max(len(key) for key in groups)
    amounts = {key: _usd(value) for key, value in groups.items()}
    money = max(len(text) for text in amounts.values())
    rows = [title]
    for key, value in groups.items():
        share = f"{value * 100 / total:5.1f} %" if total else "    - "
        rows.append(f"  {key:<{width}}  {amounts[key]:>{money}}  {share}")
    return rows


def render_audit(result: AuditResult) -> str:
    """The audit's outcome as ``vapora audit`` prints it: one line if clean, else a table."""
    head = (
        f"audit: {result.events_checked} events up to sequence {result.last_sequence}, "
        f"{result.spends_checked} spend events, {result.rows_checked} ledger rows checked"
    )
    if result.ok:
        return f"{head}: no differences\n"
    lines = [f"{head}: {len(result.discrepancies)} difference(s)", ""]
    cols = [("where", "expected", "found", "event")] + [
        (d.where, d.expected, d.found, d.event_id or "") for d in result.discrepancies
    ]
    widths = [max(len(row[i]) for row in cols) for i in range(3)]
    for where, expected, found, event in cols:
        line = f"  {where:<{widths[0]}}  {expected:<{widths[1]}}  {found:<{widths[2]}}  {event}"
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"
