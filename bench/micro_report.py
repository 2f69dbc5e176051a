"""Micro-benchmark of the ledger's cost report on a large file, in process (not a test).

Writes a ledger of ``--rows`` spends (through ``Ledger.apply_many``, as the ledger actor writes
them; 30 days, four providers, seven task types), then asks it for the report of the whole file
(what ``vapora.report`` answers with no window) ``--repeat`` times, and prints the median wall
time and the process's peak RSS before and after (``ru_maxrss``). The file is kept between runs
(``--file``), so a second run times only the report.

Run: ``python -m bench.micro_report --rows 1000000 --file /tmp/report-bench.sqlite3``;
``--root DIR`` imports vapora from another checkout (a git worktree of an earlier commit), for
alternating A/B runs on the same file.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _write(path: Path, rows: int) -> None:
    from events.contract import TaskType
    from events.log import SpendRecorded
    from tests.samples import PRICE
    from vapora.ledger import Ledger

    types = list(TaskType)
    providers = ("claude", "openai", "gemini", "ollama")
    start = datetime(2026, 3, 1, tzinfo=UTC)
    step = timedelta(days=30) / rows
    async with await Ledger.open(path) as ledger:
        batch: list[tuple[Any, int]] = []
        for i in range(rows):
            batch.append(
                (
                    SpendRecorded(
                        id=f"s{i:031d}",
                        at=start + step * i,
                        task_id=f"t{i % 5000}",
                        task_type=types[i % len(types)],
                        provider=providers[i % 4],
                        model=f"model-{i % 9}",
                        input_tokens=100,
                        output_tokens=50,
                        cost_usd=Decimal("0.00105") + Decimal(i % 7) / 10**6,
                        price=PRICE,
                        reservation_id=f"r{i}",
                    ),
                    i + 1,
                )
            )
            if len(batch) == 20_000:
                await ledger.apply_many(batch)
                batch = []
        await ledger.apply_many(batch)


async def _report(path: Path, repeat: int) -> list[float]:
    from vapora.ledger import Ledger

    now = datetime(2026, 3, 31, 12, tzinfo=UTC)
    times = []
    async with await Ledger.open_read_only(path) as ledger:
        for _ in range(repeat):
            began = time.perf_counter()
            report = await ledger.report(now=now)
            times.append(time.perf_counter() - began)
    print(f"  {report.calls:,} calls, total ${report.total_usd}, {len(report.by_hour)} hours")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", default=None, help="import vapora from this checkout")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--file", default="/tmp/vapora-report-bench.sqlite3")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.root:
        sys.path.insert(0, args.root)
    path = Path(args.file)
    if not path.exists():
        began = time.perf_counter()
        asyncio.run(_write(path, args.rows))
        print(f"wrote {args.rows:,} spends to {path} in {time.perf_counter() - began:.1f} s")
    before = _rss_mb()
    times = asyncio.run(_report(path, args.repeat))
    print(
        f"{args.root or 'this checkout'}: report {statistics.median(times):.2f} s (median of "
        f"{len(times)}), peak RSS {before:.0f} MB before the report, {_rss_mb():.0f} MB after"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
