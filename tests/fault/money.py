"""Helpers for the money-side tests: a settable clock, runtimes on a real server, the events a
provider actor would append, and requests to the budget keeper and the cost ledger."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
from nats.errors import NoRespondersError

from actors.connection import Client, ConnectOptions, connect
from actors.eventlog import EventLog, LogEntry, StreamSettings
from actors.runner import Runtime
from events import subjects
from events.codec import decode, encode
from events.contract import (
    BudgetRelease,
    BudgetReserve,
    BudgetReserveReply,
    BudgetStatus,
    ErrorReply,
    Price,
    TaskType,
    Usage,
)
from events.log import Event, SpendRecorded
from vapora.config import BudgetConfig, Config, default_config
from vapora.pricing import cost as priced

T = TypeVar("T")

NOON = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)

PRICE = Price(
    input_per_mtok=Decimal("3"),
    output_per_mtok=Decimal("15"),
    cache_read_per_mtok=Decimal("0.30"),
    cache_write_per_mtok=Decimal("3.75"),
    source="test-prices",
    version="1",
)


class FakeClock:
    """The runtime clock, moved by the test."""

    def __init__(self, at: datetime = NOON) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def config(
    *,
    daily_cents: int | None = None,
    monthly_cents: int | None = None,
    per_task_cents: int | None = None,
    warn: float = 90.0,
) -> Config:
    base = default_config(at=NOON)
    limits = BudgetConfig(
        daily_limit_cents=None if daily_cents is None else Decimal(daily_cents),
        monthly_limit_cents=None if monthly_cents is None else Decimal(monthly_cents),
        per_task_limit_cents=None if per_task_cents is None else Decimal(per_task_cents),
        warn_threshold_percent=warn,
    )
    return msgspec.structs.replace(base, budget=limits)


def runtime(
    nc: Client,
    data_dir: Path,
    *,
    cfg: Config | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Runtime:
    return Runtime(
        nc=nc,
        config=cfg or config(),
        log=EventLog(nc, StreamSettings()),
        data_dir=data_dir,
        clock=clock or FakeClock(),
    )


async def client(url: str, name: str = "test") -> Client:
    return await connect(ConnectOptions.from_url(url, name=name, reconnect_wait=0.1))


@contextlib.asynccontextmanager
async def running(actor: Any) -> AsyncIterator[Any]:
    """Run ``actor`` (started, i.e. ready) for the block; stop it and wait for it after."""
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        try:
            yield actor
        finally:
            actor.stop()  # leaving the task group waits for run() to return


def usage_costing_at_most(amount: Decimal, rng: Any) -> Usage:
    """A random usage whose cost at :data:`PRICE` is at most ``amount``."""
    budget_units = int(amount * 1_000_000)  # micro-dollars; 3 per input token, 15 per output
    output = rng.randint(0, budget_units // 15 // 2)
    input_tokens = rng.randint(0, (budget_units - output * 15) // 3)
    return Usage(input_tokens=input_tokens, output_tokens=output)


def spend(
    *,
    task_id: str,
    usage: Usage,
    at: datetime,
    reservation_id: str | None = None,
    provider: str = "claude",
    cost_usd: Decimal | None = None,
) -> SpendRecorded:
    """The ``spend_recorded`` a provider actor appends after a call (cost = usage x prices)."""
    return SpendRecorded(
        id=uuid.uuid4().hex,
        at=at,
        task_id=task_id,
        task_type=TaskType.CODE_GENERATION,
        provider=provider,
        model="claude-test",
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cost_usd=priced(usage, PRICE) if cost_usd is None else cost_usd,
        price=PRICE,
        reservation_id=reservation_id,
    )


def exact_usage(cost_usd: Decimal) -> Usage:
    """A usage costing exactly ``cost_usd`` at :data:`PRICE` (a multiple of $0.000003)."""
    tokens = cost_usd * 1_000_000 / 3
    assert tokens == tokens.to_integral_value(), cost_usd
    return Usage(input_tokens=int(tokens), output_tokens=0)


@dataclass
class Answer:
    headers: dict[str, str]
    data: bytes

    @property
    def status(self) -> str | None:
        return self.headers.get("Nats-Service-Error-Code")

    def error(self) -> ErrorReply:
        return decode(self.data, ErrorReply)

    def as_(self, type_: type[T]) -> T:
        assert self.status is None, self.data
        return decode(self.data, type_)


async def ask(nc: Client, subject: str, body: bytes | msgspec.Struct, wait_s: float = 10) -> Answer:
    data = body if isinstance(body, bytes) else encode(body)
    reply = await nc.request(subject, data, timeout=wait_s)
    return Answer(dict(reply.headers or {}), reply.data)


async def reserve(
    nc: Client,
    amount: Decimal,
    *,
    task_id: str | None = None,
    ttl_s: float = 120.0,
    rid: str | None = None,
    wait_s: float = 10.0,
) -> BudgetReserveReply:
    request = BudgetReserve(
        reservation_id=rid or uuid.uuid4().hex,
        task_id=task_id or uuid.uuid4().hex,
        provider="claude",
        amount_usd=amount,
        ttl_s=ttl_s,
    )
    answer = await ask(nc, subjects.BUDGET_RESERVE, request, wait_s=wait_s)
    return answer.as_(BudgetReserveReply)


async def release(nc: Client, rid: str, reason: str = "failed", wait_s: float = 10.0) -> Answer:
    request = BudgetRelease(reservation_id=rid, reason=reason)
    return await ask(nc, subjects.BUDGET_RELEASE, request, wait_s=wait_s)


async def status(nc: Client) -> BudgetStatus:
    return (await ask(nc, subjects.BUDGET, b"{}")).as_(BudgetStatus)


async def serving(nc: Client) -> None:
    """Wait until a keeper answers on ``nc``: right after a flush on another connection,
    nats-server can still answer "no responders" (about 1 request in 300, measured)."""

    async def answers() -> bool:
        try:
            await status(nc)
        except NoRespondersError:
            return False
        return True

    await eventually(answers, within=5)


async def read_log(log: EventLog) -> list[LogEntry]:
    return [entry async for batch in log.replay(1) for entry in batch]


async def events_of(log: EventLog, kind: type[T]) -> list[tuple[T, int]]:
    return [(e.event, e.seq) for e in await read_log(log) if isinstance(e.event, kind)]


async def eventually(check: Callable[[], Any], *, within: float = 10.0, every: float = 0.05) -> Any:
    """Poll an async ``check`` until it returns something truthy."""
    with anyio.fail_after(within):
        while True:
            result = await check()
            if result:
                return result
            await anyio.sleep(every)


def total_spend(entries: list[LogEntry]) -> Decimal:
    seen: set[str] = set()
    total = Decimal(0)
    for entry in entries:
        event: Event = entry.event
        if isinstance(event, SpendRecorded) and event.id not in seen:
            seen.add(event.id)
            total += event.cost_usd
    return total
