"""``bench/bench_pipeline.py`` in miniature, so that the figures BENCHMARKS.md quotes cannot rot.

It runs the real harness (simulator process, embedded nats-server, every actor, keeper and ledger
included) with a few dozen requests and checks that each phase produced a figure and that every
request's events were appended. Nothing here is about speed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pipeline_benchmark_reports_every_phase() -> None:
    args = ["--requests", "20", "--warmup", "5", "--concurrency", "4", "--keeper"]
    done = subprocess.run(
        [sys.executable, "bench/bench_pipeline.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    rows = {}
    for name in ("direct to simulator", "direct, httpx transport", "through vapora"):
        match = re.search(
            rf"^{re.escape(name)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", out, re.M
        )
        assert match, (name, out)
        rows[name] = [float(v) for v in match.groups()]
        assert all(v > 0 for v in rows[name]), (name, out)
    added = re.search(r"^added by vapora\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(-?\d+)$", out, re.M)
    assert added, out
    p50 = rows["through vapora"][0] - rows["direct to simulator"][0]
    assert float(added.group(1)) == pytest.approx(p50, abs=0.002)
    rates = re.search(
        r"vapora ([\d,]+), direct ([\d,]+) \(httpx transport ([\d,]+)\); vapora/direct ([\d.]+)",
        out,
    )
    assert rates, out
    assert all(float(v.replace(",", "")) > 0 for v in rates.groups())
    assert re.search(r"CPU µs per completion at concurrency 4: vapora [\d,]+, direct [\d,]+", out)
    # Every call through vapora appended its decision, its call and its spend (3 events), with
    # room for the budget keeper's and the providers' own (health, tier) events.
    through = 5 + 20 + 2 * 20  # warm-up, timed, throughput
    events = int(re.search(r"events in the log: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert events >= 3 * through, out
