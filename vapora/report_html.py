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

import html
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from events.contract import Tier
from events.log import (
    BudgetTierChanged,
    CallSucceeded,
    Event,
    FallbackTriggered,
    RouteDecided,
    SpendRecorded,
)
from vapora.audit import usd

__all__ = ["render_html"]

_WIDTH, _HEIGHT, _PAD = 860, 280, 72
_COLOURS = ("#d97706", "#2563eb", "#059669", "#7c3aed", "#dc2626", "#0891b2", "#4b5563")
_TIER_COLOURS = {Tier.NORMAL: "#bbf7d0", Tier.NEAR_THRESHOLD: "#fde68a", Tier.EXCEEDED: "#fecaca"}


@dataclass(frozen=True)
class _Decision:
    event: RouteDecided
    fallbacks: list[str]
    served_by: str | None


def render_html(
    events: Sequence[Event],
    *,
    title: str = "vapora report",
    now: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
) -> str:
    """The page for ``events`` (in log order): each event id once (its first appearance), and
    only the events with ``since <= at < until`` (a missing bound is open; a naive time is UTC)."""
    unique = _first_of_each(events)
    shown = [e for e in unique if _within(e.at, since, until)]
    spends = [e for e in shown if isinstance(e, SpendRecorded)]
    tiers = [e for e in shown if isinstance(e, BudgetTierChanged)]
    total = sum((s.cost_usd for s in spends), Decimal(0))
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=muted>{_window(since, until)}: {len(spends)} calls billed, "
        f"total <b>{usd(total)}</b> (exact sum of <code>spend_recorded</code> events), "
        f"generated {now:%Y-%m-%d %H:%M:%S} UTC.</p>",
        "<h2>Spend over time, by provider</h2>",
        _spend_chart(spends),
        "<h2>Budget tier over time</h2>",
        _tier_chart(tiers, shown, _tier_before(unique, since)),
        _tier_table(tiers),
        "<h2>Spend by provider</h2>",
        _provider_table(spends, total),
        "<h2>Routing decisions</h2>",
        _decision_table(_decisions(shown)),
    ]
    return _PAGE.format(title=html.escape(title), body="\n".join(body))


# --- what is shown --------------------------------------------------------------------------


def _first_of_each(events: Sequence[Event]) -> list[Event]:
    """Each event id once, at its first appearance (as the ledger and the audit count it)."""
    seen: set[str] = set()
    unique = []
    for event in events:
        if event.id not in seen:
            seen.add(event.id)
            unique.append(event)
    return unique


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _within(at: datetime, since: datetime | None, until: datetime | None) -> bool:
    """``since <= at < until``: the text report's window."""
    at = _utc(at)
    return (since is None or at >= _utc(since)) and (until is None or at < _utc(until))


def _window(since: datetime | None, until: datetime | None) -> str:
    start = "the first event" if since is None else f"{_utc(since):%Y-%m-%d %H:%M:%S} UTC"
    end = "now" if until is None else f"{_utc(until):%Y-%m-%d %H:%M:%S} UTC"
    return f"{start} .. {end}"


def _tier_before(events: Sequence[Event], since: datetime | None) -> Tier:
    """The tier in force when the window opens: the last change before it, else Normal."""
    tier = Tier.NORMAL
    if since is not None:
        for event in events:
            if isinstance(event, BudgetTierChanged) and _utc(event.at) < _utc(since):
                tier = event.to_tier
    return tier


# --- charts ---------------------------------------------------------------------------------


def _x(at: datetime, start: datetime, end: datetime) -> float:
    seconds = max((end - start).total_seconds(), 1e-9)
    return _PAD + (at - start).total_seconds() / seconds * (_WIDTH - 2 * _PAD)


def _spend_chart(spends: Sequence[SpendRecorded]) -> str:
    if not spends:
        return "<p class=muted>No spend recorded.</p>"
    # A naive time is UTC (the contract's reading): compared as such with the others.
    start, end = min(_utc(s.at) for s in spends), max(_utc(s.at) for s in spends)
    series: dict[str, list[tuple[datetime, Decimal]]] = defaultdict(list)
    running: dict[str, Decimal] = defaultdict(Decimal)
    for spend in sorted(spends, key=lambda s: _utc(s.at)):
        running[spend.provider] += spend.cost_usd
        series[spend.provider].append((_utc(spend.at), running[spend.provider]))
    top = max(running.values()) or Decimal(1)
    lines, legend = [], []
    for index, (provider, points) in enumerate(sorted(series.items())):
        colour = _COLOURS[index % len(_COLOURS)]
        path = " ".join(
            f"{_x(at, start, end):.1f},{_y(value, top):.1f}"
            for at, value in [(start, Decimal(0)), *points]
        )
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        legend.append(
            f'<span class=key style="background:{colour}"></span>{html.escape(provider)} '
            f"{usd(running[provider])}"
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


def _tier_chart(tiers: Sequence[BudgetTierChanged], events: Sequence[Event], first: Tier) -> str:
    if not events:
        return "<p class=muted>No events.</p>"
    start, end = min(_utc(e.at) for e in events), max(_utc(e.at) for e in events)
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


def _provider_table(spends: Sequence[SpendRecorded], total: Decimal) -> str:
    by: dict[str, list[SpendRecorded]] = defaultdict(list)
    for spend in spends:
        by[spend.provider].append(spend)
    rows = "".join(
        f"<tr><td>{html.escape(p)}</td><td>{len(items)}</td>"
        f"<td>{sum(s.input_tokens for s in items):,}</td>"
        f"<td>{sum(s.output_tokens for s in items):,}</td>"
        f"<td>{usd(sum((s.cost_usd for s in items), Decimal(0)))}</td></tr>"
        for p, items in sorted(by.items())
    )
    rows += f"<tr class=total><td>total</td><td>{len(spends)}</td><td></td><td></td>"
    rows += f"<td>{usd(total)}</td></tr>"
    return _table(("provider", "calls", "input tokens", "output tokens", "cost (USD)"), rows)


def _decisions(events: Sequence[Event]) -> list[_Decision]:
    fallbacks: dict[str, list[str]] = defaultdict(list)
    served: dict[str, str] = {}
    for event in events:
        if isinstance(event, FallbackTriggered):
            fallbacks[event.task_id].append(
                f"{event.from_provider} → {event.to_provider}: {event.reason}"
            )
        elif isinstance(event, CallSucceeded):
            served[event.task_id] = event.provider
    return [
        _Decision(e, fallbacks.get(e.task_id, []), served.get(e.task_id))
        for e in events
        if isinstance(e, RouteDecided)
    ]


def _decision_table(decisions: Sequence[_Decision], limit: int = 500) -> str:
    if not decisions:
        return "<p class=muted>No routing decisions.</p>"
    rows = "".join(_decision_row(d) for d in decisions[-limit:])
    note = (
        f"<p class=muted>The last {limit} of {len(decisions)}.</p>"
        if len(decisions) > limit
        else ""
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
