"""A self-contained HTML page of what happened: spend over time by provider, the budget tier over
time, and the routing decisions, drawn from the events themselves (``vapora report --html``).

Pure: it takes the events and returns the page. No JavaScript and no external files: the charts
are inline SVG, so the page opens anywhere, including in a mail attachment or a CI artefact.
Every figure on it is a sum of ``spend_recorded`` events, so it can be traced to them, and it
agrees with the text report and the ledger: an event id the log holds twice (a duplicate append)
counts once, only events in the window ``[since, until)`` are shown, and amounts are exact plain
decimals (:func:`vapora.audit.usd`, as the text report prints them).
"""

from __future__ import annotations

import decimal
import html
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from events.contract import EXACT_SUMS, Tier
from events.log import (
    BudgetTierChanged,
    CallSucceeded,
    Event,
    FallbackTriggered,
    RouteDecided,
    SpendRecorded,
)
from vapora.audit import usd

__all__ = ["Page", "render_html"]

_WIDTH, _HEIGHT, _PAD = 860, 280, 72
_COLOURS = ("#d97706", "#2563eb", "#059669", "#7c3aed", "#dc2626", "#0891b2", "#4b5563")
_TIER_COLOURS = {Tier.NORMAL: "#bbf7d0", Tier.NEAR_THRESHOLD: "#fde68a", Tier.EXCEEDED: "#fecaca"}


@dataclass(frozen=True)
class _Decision:
    event: RouteDecided
    fallbacks: list[str]
    served_by: str | None


def render_html(
    events: Iterable[Event],
    *,
    title: str = "vapora report",
    now: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
) -> str:
    """The page for ``events`` (in log order): each event id once (its first appearance), and
    only the events with ``since <= at < until`` (a missing bound is open; a naive time is UTC).
    One :class:`Page` fed all of them."""
    page = Page(since=since, until=until)
    page.add(events)
    return page.render(title=title, now=now)


class Page:
    """The page built as the log is read, so that no reader holds the log: feed it the events
    in log order (:meth:`add`, as often as needed), then :meth:`render`. It keeps the ids seen
    (a duplicate append counts once), the window's sums, its tier changes, at most
    2 x :data:`_POINTS` points of each provider's spend curve (neighbours merged past that: the
    curve's shape, its total exact) and the last :data:`_DECISIONS` routing decisions with
    their fallbacks."""

    def __init__(self, *, since: datetime | None = None, until: datetime | None = None) -> None:
        self.since, self.until = since, until
        self._seen: set[str] = set()
        self._tier_before = Tier.NORMAL
        self._tiers: list[BudgetTierChanged] = []
        self._first: datetime | None = None
        self._last: datetime | None = None
        self._total = Decimal(0)
        self._calls = 0
        self._providers: dict[str, _ProviderSums] = {}
        self._decisions: deque[RouteDecided] = deque(maxlen=_DECISIONS)
        self._decided = 0
        self._tasks = _Tasks()

    def add(self, events: Iterable[Event]) -> None:
        """More events, in log order (their amounts summed exactly: ``EXACT_SUMS``)."""
        with decimal.localcontext(EXACT_SUMS):
            self._add(events)

    def _add(self, events: Iterable[Event]) -> None:
        seen, since, until = self._seen, self.since, self.until
        for event in events:
            if event.id in seen:
                continue
            seen.add(event.id)
            at = _utc(event.at)
            if since is not None and at < _utc(since):
                if isinstance(event, BudgetTierChanged):
                    self._tier_before = event.to_tier  # in force when the window opens
                continue
            if until is not None and at >= _utc(until):
                continue
            self._first = at if self._first is None else min(self._first, at)
            self._last = at if self._last is None else max(self._last, at)
            self._take(event, at)

    def _take(self, event: Event, at: datetime) -> None:
        if isinstance(event, SpendRecorded):
            self._total += event.cost_usd
            self._calls += 1
            sums = self._providers.get(event.provider)
            if sums is None:
                sums = self._providers[event.provider] = _ProviderSums()
            sums.add(event, at)
        elif isinstance(event, BudgetTierChanged):
            self._tiers.append(event)
        elif isinstance(event, RouteDecided):
            if len(self._decisions) == self._decisions.maxlen:
                self._tasks.unlist(self._decisions[0].task_id)
            self._decisions.append(event)
            self._tasks.list(event.task_id)
            self._decided += 1
        elif isinstance(event, FallbackTriggered):
            said = f"{event.from_provider} → {event.to_provider}: {event.reason}"
            self._tasks.of(event.task_id).fallbacks.append(said)
        elif isinstance(event, CallSucceeded):
            self._tasks.of(event.task_id).served_by = event.provider

    def render(self, *, title: str = "vapora report", now: datetime) -> str:
        """The page as it stands."""
        decisions = []
        for e in self._decisions:
            task = self._tasks.of(e.task_id)
            decisions.append(_Decision(e, task.fallbacks, task.served_by))
        body = [
            f"<h1>{html.escape(title)}</h1>",
            f"<p class=muted>{_window(self.since, self.until)}: {self._calls} calls billed, "
            f"total <b>{usd(self._total)}</b> (exact sum of <code>spend_recorded</code> events), "
            f"generated {now:%Y-%m-%d %H:%M:%S} UTC.</p>",
            "<h2>Spend over time, by provider</h2>",
            _spend_chart(self._providers),
            "<h2>Budget tier over time</h2>",
            _tier_chart(self._tiers, self._first, self._last, self._tier_before),
            _tier_table(self._tiers),
            "<h2>Spend by provider</h2>",
            _provider_table(self._providers, self._calls, self._total),
            "<h2>Routing decisions</h2>",
            _decision_table(decisions, self._decided),
        ]
        return _PAGE.format(title=html.escape(title), body="\n".join(body))


#: Spend curve points kept per provider (merged in pairs past twice this), decisions listed,
#: and the tasks whose fallbacks and serving provider are remembered for them.
_POINTS = 1000
_DECISIONS = 500
_TASKS_REMEMBERED = 10_000


@dataclass
class _Task:
    fallbacks: list[str]
    served_by: str | None = None


class _Tasks:
    """What each task's fallbacks were and which provider served it: kept for every task with
    a decision listed (however long ago its events came), and for the
    :data:`_TASKS_REMEMBERED` tasks heard of most recently besides (their events may come
    before their decision, or a later decision of theirs be listed)."""

    def __init__(self) -> None:
        self._listed: dict[str, _Task] = {}
        self._counts: dict[str, int] = {}  # decisions listed per task
        self._recent: OrderedDict[str, _Task] = OrderedDict()

    def of(self, task_id: str) -> _Task:
        task = self._listed.get(task_id)
        if task is not None:
            return task
        task = self._recent.pop(task_id) if task_id in self._recent else _Task([])
        self._recent[task_id] = task  # the most recent last
        while len(self._recent) > _TASKS_REMEMBERED:
            self._recent.popitem(last=False)
        return task

    def list(self, task_id: str) -> None:
        count = self._counts.get(task_id, 0)
        if not count:
            self._listed[task_id] = (
                self._recent.pop(task_id) if task_id in self._recent else _Task([])
            )
        self._counts[task_id] = count + 1

    def unlist(self, task_id: str) -> None:
        count = self._counts.pop(task_id, 1) - 1
        if count:
            self._counts[task_id] = count
            return
        task = self._listed.pop(task_id, None)
        if task is not None:  # back among the recent, should a later decision of it come
            self._recent[task_id] = task
            while len(self._recent) > _TASKS_REMEMBERED:
                self._recent.popitem(last=False)


class _ProviderSums:
    """One provider's calls, tokens and cost in the window, and its spend curve's points."""

    __slots__ = ("calls", "cost", "first", "input_tokens", "output_tokens", "points")

    def __init__(self) -> None:
        self.calls = self.input_tokens = self.output_tokens = 0
        self.cost = Decimal(0)
        self.first: datetime | None = None  # the first spend's time (points may be merged)
        self.points: list[tuple[datetime, Decimal]] = []

    def add(self, spend: SpendRecorded, at: datetime) -> None:
        self.first = at if self.first is None else min(self.first, at)
        self.calls += 1
        self.input_tokens += spend.input_tokens
        self.output_tokens += spend.output_tokens
        self.cost += spend.cost_usd
        self.points.append((at, spend.cost_usd))
        if len(self.points) > 2 * _POINTS:
            self.points = _merged(self.points)

    def curve(self) -> list[tuple[datetime, Decimal]]:
        """The running total at each point, in time order."""
        running, out = Decimal(0), []
        with decimal.localcontext(EXACT_SUMS):
            for at, cost in sorted(self.points, key=lambda p: p[0]):
                running += cost
                out.append((at, running))
        return out


def _merged(points: list[tuple[datetime, Decimal]]) -> list[tuple[datetime, Decimal]]:
    """Neighbours in time merged in pairs (the later time, the two costs): half the points, the
    same total, the curve's shape."""
    ordered = sorted(points, key=lambda p: p[0])
    pairs = [(b[0], a[1] + b[1]) for a, b in zip(ordered[::2], ordered[1::2], strict=False)]
    return pairs + ordered[len(pairs) * 2 :]


# --- what is shown --------------------------------------------------------------------------


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _window(since: datetime | None, until: datetime | None) -> str:
    start = "the first event" if since is None else f"{_utc(since):%Y-%m-%d %H:%M:%S} UTC"
    end = "now" if until is None else f"{_utc(until):%Y-%m-%d %H:%M:%S} UTC"
    return f"{start} .. {end}"


# --- charts ---------------------------------------------------------------------------------


def _x(at: datetime, start: datetime, end: datetime) -> float:
    seconds = max((end - start).total_seconds(), 1e-9)
    return _PAD + (at - start).total_seconds() / seconds * (_WIDTH - 2 * _PAD)


def _spend_chart(providers: Mapping[str, _ProviderSums]) -> str:
    curves = {name: sums.curve() for name, sums in providers.items()}
    if not any(curves.values()):
        return "<p class=muted>No spend recorded.</p>"
    start = min(sums.first for sums in providers.values() if sums.first is not None)
    end = max(curve[-1][0] for curve in curves.values() if curve)
    top = max(sums.cost for sums in providers.values()) or Decimal(1)
    lines, legend = [], []
    for index, (provider, points) in enumerate(sorted(curves.items())):
        colour = _COLOURS[index % len(_COLOURS)]
        path = " ".join(
            f"{_x(at, start, end):.1f},{_y(value, top):.1f}"
            for at, value in [(start, Decimal(0)), *points]
        )
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        legend.append(
            f'<span class=key style="background:{colour}"></span>{html.escape(provider)} '
            f"{usd(providers[provider].cost)}"
        )
    axis = _axes(start, end, usd(top))
    svg = f'<svg viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="spend over time">'
    return f"{svg}{axis}{''.join(lines)}</svg><p>{' &nbsp; '.join(legend)}</p>"


def _y(value: Decimal, top: Decimal) -> float:
    return _HEIGHT - _PAD - float(value / top) * (_HEIGHT - 2 * _PAD)


def _axes(start: datetime, end: datetime, top_label: str) -> str:
    bottom, right = _HEIGHT - _PAD, _WIDTH - _PAD
    return (
        f'<line x1="{_PAD}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>'
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{bottom}" stroke="#999"/>'
        f'<text x="{_PAD}" y="{bottom + 18}" class=axis>{start:%H:%M:%S}</text>'
        f'<text x="{right}" y="{bottom + 18}" class=axis text-anchor="end">{end:%H:%M:%S}</text>'
        f'<text x="{_PAD - 6}" y="{_PAD + 4}" class=axis text-anchor="end">'
        f"{html.escape(top_label)}</text>"
        f'<text x="{_PAD - 6}" y="{bottom}" class=axis text-anchor="end">0</text>'
    )


def _tier_chart(
    tiers: Sequence[BudgetTierChanged],
    start: datetime | None,
    end: datetime | None,
    first: Tier,
) -> str:
    """Bands of the tier from ``start`` to ``end`` (the window's first and last events),
    ``first`` in force at the start."""
    if start is None or end is None:
        return "<p class=muted>No events.</p>"
    bands, current, since = [], first, start
    for change in sorted(tiers, key=lambda t: _utc(t.at)):
        bands.append((since, _utc(change.at), current))
        current, since = change.to_tier, _utc(change.at)
    bands.append((since, end, current))
    rects = "".join(
        f'<rect x="{_x(a, start, end):.1f}" y="10" '
        f'width="{max(_x(b, start, end) - _x(a, start, end), 0.5):.1f}" height="40" '
        f'fill="{_TIER_COLOURS[tier]}"><title>{tier.value}</title></rect>'
        for a, b, tier in bands
    )
    legend = " &nbsp; ".join(
        f'<span class=key style="background:{colour}"></span>{tier.value}'
        for tier, colour in _TIER_COLOURS.items()
    )
    svg = f'<svg viewBox="0 0 {_WIDTH} 60" role="img" aria-label="tier over time">'
    return f"{svg}{rects}</svg><p>{legend}</p>"


# --- tables ---------------------------------------------------------------------------------


def _tier_table(tiers: Sequence[BudgetTierChanged]) -> str:
    if not tiers:
        return "<p class=muted>The tier never changed.</p>"
    rows = "".join(
        f"<tr><td>{t.at:%H:%M:%S.%f}</td><td>{t.from_tier.value} → {t.to_tier.value}</td>"
        f"<td>{t.daily_percent:.1f} %</td><td>{t.monthly_percent:.1f} %</td>"
        f"<td><code>{html.escape(t.causation_id or '')}</code></td></tr>"
        for t in tiers
    )
    return _table(("at", "change", "daily", "monthly", "caused by event"), rows)


def _provider_table(providers: Mapping[str, _ProviderSums], calls: int, total: Decimal) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(p)}</td><td>{sums.calls}</td>"
        f"<td>{sums.input_tokens:,}</td>"
        f"<td>{sums.output_tokens:,}</td>"
        f"<td>{usd(sums.cost)}</td></tr>"
        for p, sums in sorted(providers.items())
    )
    rows += f"<tr class=total><td>total</td><td>{calls}</td><td></td><td></td>"
    rows += f"<td>{usd(total)}</td></tr>"
    return _table(("provider", "calls", "input tokens", "output tokens", "cost (USD)"), rows)


def _decision_table(decisions: Sequence[_Decision], made: int) -> str:
    """The last decisions (``made`` in all)."""
    if not decisions:
        return "<p class=muted>No routing decisions.</p>"
    rows = "".join(_decision_row(d) for d in decisions)
    note = (
        f"<p class=muted>The last {len(decisions)} of {made}.</p>" if made > len(decisions) else ""
    )
    return note + _table(
        ("at", "task", "type", "quality", "tier", "chain", "served by", "why", "fallbacks"), rows
    )


def _decision_row(decision: _Decision) -> str:
    e = decision.event
    return (
        f"<tr><td>{e.at:%H:%M:%S}</td><td><code>{html.escape(e.task_id[:12])}</code></td>"
        f"<td>{e.task_type.value}</td><td>{e.quality.value}</td><td>{e.decision.tier.value}</td>"
        f"<td>{html.escape(' → '.join(e.decision.chain))}</td>"
        f"<td>{html.escape(decision.served_by or '—')}</td>"
        f"<td>{html.escape(e.decision.reason)}</td>"
        f"<td>{html.escape('; '.join(decision.fallbacks))}</td></tr>"
    )


def _table(headers: Sequence[str], rows: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 960px; color: #111; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.15em; margin-top: 2em; }}
svg {{ width: 100%; height: auto; background: #fafafa; border: 1px solid #eee; }}
.axis {{ font-size: 11px; fill: #555; }} .muted {{ color: #666; }}
.key {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; }}
table {{ border-collapse: collapse; width: 100%; font-size: 12.5px; }}
th, td {{ text-align: left; padding: 3px 6px; border-bottom: 1px solid #eee; vertical-align: top; }}
tr.total td {{ font-weight: 600; border-top: 2px solid #ccc; }}
</style></head><body>
{body}
</body></html>
"""
