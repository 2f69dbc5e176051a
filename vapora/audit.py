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

import decimal
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal

import msgspec

from events.codec import event_tag
from events.contract import EXACT_SUMS, BudgetStatus, CostReport, Usage
from events.log import Event, SpendRecorded
from vapora import budget
from vapora.budget import BudgetLimits, BudgetState
from vapora.ledger import LoggedEvent, PeriodSpend, SpendRow, period_spend
from vapora.pricing import cost as priced

__all__ = [
    "AuditResult",
    "Auditor",
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
        cache_write_1h_tokens=event.cache_write_1h_tokens,
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
    running = _Running()
    with decimal.localcontext(budget.EXACT):
        for s in spends:
            running.add(s.cost_usd, (s.provider, s.model, str(s.task_type), _day(s.at)))
    return running.totals()


def ledger_totals(rows: Iterable[SpendRow]) -> Totals:
    """Totals summed from the ledger's rows."""
    running = _Running()
    with decimal.localcontext(budget.EXACT):
        for r in rows:
            running.add(r.cost_usd, (r.provider, r.model, r.task_type, _day(r.at)))
    return running.totals()


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


# --- checks -------------------------------------------------------------------------------------


def check_costs(log: Iterable[tuple[Event, int]]) -> list[Discrepancy]:
    """Spend events whose ``cost_usd`` differs from their usage at their recorded prices."""
    found = (_cost_difference(event, seq) for event, seq in _first_spends(log))
    return [d for d in found if d is not None]


def _cost_difference(event: SpendRecorded, seq: int) -> Discrepancy | None:
    expected = recompute_cost(event)
    if expected == event.cost_usd:
        return None
    return Discrepancy(
        where=f"spend_recorded seq {seq} (task {event.task_id}, {event.provider}"
        f"/{event.model}): cost_usd vs usage x prices {event.price.source}"
        f"@{event.price.version}",
        expected=_usd(expected),
        found=_usd(event.cost_usd),
        event_id=event.id,
    )


def check_ledger(
    log: Sequence[tuple[Event, int]],
    rows: Sequence[SpendRow],
    logged: Sequence[LoggedEvent] | None = None,
) -> list[Discrepancy]:
    """Compare the ledger's spend rows (and event index, if given) with the log, row by row and
    in totals."""
    auditor = Auditor(costs=False, index=logged is not None)
    auditor.feed(log, rows, logged or ())
    return auditor.ledger_differences()


def check_ledger_beyond(
    end: int, rows: Sequence[SpendRow], logged: Sequence[LoggedEvent]
) -> list[Discrepancy]:
    """Each event the ledger recorded past the log's last sequence ``end``: the log has lost it
    (or the ledger is another log's), and a spend among them is counted by every report."""
    cost = {row.seq: row.cost_usd for row in rows}
    found = []
    for entry in logged:
        spent = cost.pop(entry.seq, None)
        what = entry.type + (f" of {usd(spent)}" if spent is not None else "")
        found.append(
            Discrepancy(
                where=f"ledger at sequence {entry.seq}",
                expected=f"nothing past the log's last sequence {end}",
                found=what,
                event_id=entry.event_id,
            )
        )
    # A spend row with no entry in the ledger's index (written into the file by hand): counted
    # by every report all the same.
    for row in rows:
        if row.seq in cost:
            found.append(
                Discrepancy(
                    where=f"ledger at sequence {row.seq}",
                    expected=f"nothing past the log's last sequence {end}",
                    found=f"a spend row of {usd(row.cost_usd)}, not in the ledger's event index",
                    event_id=row.event_id,
                )
            )
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
    ("cache_write_1h_tokens", lambda e, seq: e.cache_write_1h_tokens or 0),
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
    (:func:`check_ledger_beyond`). The whole log in one chunk of an :class:`Auditor`."""
    keeper_last = keeper.last_sequence if isinstance(keeper, BudgetState) else None
    auditor = Auditor(index=logged is not None, keeper_last=keeper_last)
    auditor.feed(log, rows, logged or ())
    before = None
    if isinstance(keeper, BudgetStatus):
        before = period_spend(((row.at, row.cost_usd) for row in rows), keeper.at)
    return auditor.finish(
        keeper=keeper,
        limits=limits,
        unreadable=unreadable,
        ledger_before=before,
        ledger_after=ledger_after,
        ledger_beyond=ledger_beyond,
    )


class Auditor:
    """The audit of a log read chunk by chunk, so that no reader holds the whole log: feed it
    each chunk of ``(event, seq)`` pairs with the ledger's spend rows and event index for the
    same sequences (the ledger records an event at its first appearance's sequence, so a
    chunk's rows are its events' rows), then :meth:`finish`. What it keeps across chunks: the
    ids of the events seen (an id appearing again is a duplicate append, counted once, as the
    ledger counts it), running totals and the budget fold.

    ``costs``/``index``: whether to check each spend's cost and the ledger's event index;
    ``keeper_last``: fold only up to a keeper state's last sequence; ``fold``: whether to fold
    the log into a budget state at all (needed for a keeper to be compared)."""

    def __init__(
        self,
        *,
        costs: bool = True,
        index: bool = True,
        keeper_last: int | None = None,
        fold: bool = True,
    ) -> None:
        self._costs, self._index, self._keeper_last = costs, index, keeper_last
        self.folds = fold  # False: no keeper to compare with, so no budget fold
        self._seen: set[str] = set()
        self._found: list[Discrepancy] = []
        self._ledger_found: list[Discrepancy] = []
        self._expected = _Running()
        self._ledger = _Running()
        self._fold = budget.Fold()
        self.events = self.spends = self.rows = self.last_sequence = 0

    def feed(
        self,
        log: Iterable[tuple[Event, int]],
        rows: Iterable[SpendRow],
        logged: Iterable[LoggedEvent] = (),
    ) -> None:
        """One chunk: its events in log order, the ledger's rows and index entries for them."""
        with decimal.localcontext(budget.EXACT):  # the totals, exact as the fold's
            self._feed(log, rows, logged)

    def _feed(
        self,
        log: Iterable[tuple[Event, int]],
        rows: Iterable[SpendRow],
        logged: Iterable[LoggedEvent],
    ) -> None:
        seen, found = self._seen, self._ledger_found
        firsts: dict[str, tuple[Event, int]] = {}
        spends: list[tuple[SpendRecorded, int]] = []
        chunk = log if isinstance(log, list) else list(log)
        self.events += len(chunk)
        self.last_sequence = max(self.last_sequence, max((seq for _, seq in chunk), default=0))
        for pair in chunk:
            event = pair[0]
            event_id = event.id
            if event_id in seen:
                continue
            seen.add(event_id)
            firsts[event_id] = pair
            if type(event) is SpendRecorded:
                spends.append(pair)  # type: ignore[arg-type]
        self._fold_chunk(chunk)
        self.spends += len(spends)
        for event, seq in spends:
            if self._costs:
                difference = _cost_difference(event, seq)
                if difference is not None:
                    self._found.append(difference)
            self._expected.add(
                event.cost_usd,
                (event.provider, event.model, str(event.task_type), _day(event.at)),
            )
        by_id: defaultdict[str, list[SpendRow]] = defaultdict(list)
        for row in rows:
            by_id[row.event_id].append(row)
            self.rows += 1
            self._ledger.add(row.cost_usd, (row.provider, row.model, row.task_type, _day(row.at)))
        for event, seq in spends:
            matches = by_id.pop(event.id, [])
            if not matches:
                found.append(_missing_row(event, seq))
                continue
            found += _compare_row(event, seq, matches[0])
            found += [_extra_row(row, "a second row for the same event") for row in matches[1:]]
        for extra in by_id.values():
            found += [_extra_row(row, "no such spend_recorded in the log") for row in extra]
        if self._index:
            self._check_index(firsts, logged)

    def _fold_chunk(self, chunk: list[tuple[Event, int]]) -> None:
        if not self.folds:
            return
        last = self._keeper_last
        self._fold.apply(chunk if last is None else [(e, s) for e, s in chunk if s <= last])

    def _check_index(
        self, firsts: Mapping[str, tuple[Event, int]], logged: Iterable[LoggedEvent]
    ) -> None:
        found, entered = self._ledger_found, set()
        for entry in logged:
            if entry.event_id in entered or entry.event_id not in firsts:
                why = (
                    "a second entry for this event"
                    if entry.event_id in entered or entry.event_id in self._seen
                    else "not in the log"
                )
                found.append(
                    _index_entry(
                        f"seq {entry.seq}", f"no entry ({why})", entry.type, entry.event_id
                    )
                )
            entered.add(entry.event_id)
        for event_id, (event, seq) in firsts.items():
            if event_id not in entered:
                found.append(
                    _index_entry(f"{event_tag(event)} seq {seq}", "an entry", "none", event_id)
                )

    def ledger_differences(self) -> list[Discrepancy]:
        """The ledger's rows and index against the log so far, and the totals."""
        expected, ledger = self._expected.totals(), self._ledger.totals()
        return [*self._ledger_found, *_compare_totals(expected, ledger, "ledger")]

    def finish(
        self,
        *,
        keeper: BudgetState | BudgetStatus | None = None,
        limits: BudgetLimits | None = None,
        unreadable: Mapping[int, str] | None = None,
        ledger_before: PeriodSpend | None = None,
        ledger_after: PeriodSpend | None = None,
        ledger_beyond: tuple[int, Sequence[SpendRow], Sequence[LoggedEvent]] | None = None,
    ) -> AuditResult:
        """The result, with the keeper's state or status (and the ledger's spend in its day and
        month, ``ledger_before`` and ``ledger_after``: :func:`check_keeper_spend`)."""
        found = [
            Discrepancy(where=f"event log at sequence {seq}", expected="an event", found=problem)
            for seq, problem in sorted((unreadable or {}).items())
        ]
        found += self._found + self.ledger_differences()
        if ledger_beyond is not None:
            found += check_ledger_beyond(*ledger_beyond)
        if keeper is not None and not self.folds:
            raise ValueError("a keeper to compare with, and the log was not folded")
        if isinstance(keeper, BudgetState):
            found += _compare_state(self._fold.state(), keeper)
        elif isinstance(keeper, BudgetStatus):
            replayed = budget.status(self._fold.state(), limits or BudgetLimits(), keeper.at)
            found += _compare_status(replayed, keeper)
            if ledger_before is not None:
                found += check_keeper_spend(keeper, ledger_before, ledger_after)
        return AuditResult(
            discrepancies=found,
            events_checked=self.events,
            spends_checked=self.spends,
            rows_checked=self.rows,
            last_sequence=self.last_sequence,
        )


class _Running:
    """Totals summed as spends come: overall and by provider, model, task type and UTC day."""

    def __init__(self) -> None:
        self.total, self.calls = _ZERO, 0
        self.groups: list[defaultdict[str, Decimal]] = [defaultdict(Decimal) for _ in range(4)]

    def add(self, cost: Decimal, keys: tuple[str, str, str, str]) -> None:
        self.total += cost
        self.calls += 1
        for group, key in zip(self.groups, keys, strict=True):
            group[key] += cost

    def totals(self) -> Totals:
        provider, model, task_type, day = (dict(sorted(g.items())) for g in self.groups)
        return Totals(
            total_usd=self.total,
            calls=self.calls,
            by_provider=provider,
            by_model=model,
            by_task_type=task_type,
            by_day=day,
        )


def _day(at: datetime) -> str:
    return _utc(at).date().isoformat()


# --- rendering ----------------------------------------------------------------------------------


def usd(value: Decimal) -> str:
    """Exact, readable dollars: at least cents, never rounded, never an exponent
    (``$0.000000075``, ``$1.50``, ``$0.00``)."""
    text = format(value.normalize(EXACT_SUMS), "f") if value else "0"  # (28 digits rounded)
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
    # Where a figure comes from: its spend events, listed (each once) by the same window.
    window = "".join(
        f" --{name} {_utc(at).isoformat().replace('+00:00', 'Z')}"
        for name, at in (("since", report.since), ("until", report.until))
        if at is not None
    )
    lines += [
        "",
        f"The spend events behind a figure: vapora events --type spend_recorded{window}",
        "  with --provider P, --model M or --task-type T for a row (--since/--until its day or",
        "  hour for those rows)",
    ]
    return "\n".join(lines) + "\n"


def _when(at: datetime | None, default: str) -> str:
    """``at`` in UTC to the second, or to the microsecond when it has a fraction (a window's
    bound shown to the second could not be copied: it counted other events)."""
    if at is None:
        return default
    utc = _utc(at)
    return f"{utc:%Y-%m-%d %H:%M:%S}{f'.{utc:%f}' if utc.microsecond else ''} UTC"


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
