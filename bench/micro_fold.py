"""Micro-benchmark of the budget fold and the replay views' decoding, in process (not a test).

200,000 events (100,000 reservations, each settled by a spend, 7.7 s apart, 5,000 tasks) are
encoded once and decoded into the keeper's replay views (``vapora.budget_view``); then
``budget.Fold.apply`` folds them from an empty state, and the views are decoded again, seven
times each, timed with the thread's CPU time (so time spent descheduled by other work does not
count). Prints the medians in events/s.

Run: ``python -m bench.micro_fold``; ``--root DIR`` imports vapora from another checkout (a git
worktree of an earlier commit), for alternating A/B runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", default=None, help="import vapora from this checkout")
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    if args.root:
        sys.path.insert(0, args.root)
    from events.codec import encode
    from events.contract import TaskType
    from events.log import BudgetReserved, SpendRecorded
    from tests.samples import PRICE
    from vapora import budget
    from vapora.budget_view import decode_views

    start = datetime(2026, 1, 1, tzinfo=UTC)
    events: list[Any] = []
    for i in range(args.calls):
        at = start + timedelta(seconds=i * 7.7)
        rid, task = f"r{i:031d}", f"t{i % 5000}"
        events.append(
            BudgetReserved(
                id=f"a{i:031d}",
                at=at,
                task_id=task,
                reservation_id=rid,
                provider="claude",
                amount_usd=Decimal("0.05"),
                expires_at=at + timedelta(minutes=2),
            )
        )
        events.append(
            SpendRecorded(
                id=f"b{i:031d}",
                at=at,
                task_id=task,
                task_type=TaskType.GENERAL_QUERY,
                provider="claude",
                model="bench",
                input_tokens=100,
                output_tokens=50,
                cost_usd=Decimal("0.00105"),
                price=PRICE,
                reservation_id=rid,
            )
        )
    data = b"[" + b",".join(encode(event) for event in events) + b"]"
    pairs = [(view, n) for n, view in enumerate(decode_views(data), 1)]
    fold, decode = [], []
    for _ in range(args.repeat):
        began = time.thread_time()
        budget.Fold(budget.EMPTY).apply(pairs)
        fold.append(time.thread_time() - began)
        began = time.thread_time()
        decode_views(data)
        decode.append(time.thread_time() - began)
    n = len(pairs)
    print(
        f"{args.root or 'this checkout'}: fold {n / statistics.median(fold):,.0f} events/s, "
        f"views decoded {n / statistics.median(decode):,.0f} events/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
