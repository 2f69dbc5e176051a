"""The telemetry benchmark in miniature, so that it cannot rot unnoticed, and so that what it
switches is what it says: nothing is about speed here, only that every mode ran and that the
sample ratio is what decides how many spans a call leaves (8 at 100 %, the task's trace; none
at 0 %, with tracing on; none with tracing off or metrics only)."""

from __future__ import annotations

import statistics

import pytest

from bench.bench_telemetry import MODES, parse_args, run
from vapora.eventloop import run as run_loop


@pytest.mark.slow
def test_every_mode_runs_and_the_sample_ratio_decides_the_spans_per_call() -> None:
    args = parse_args(["--quick", "--requests", "20", "--bursts", "2"])
    result = run_loop(run, args)
    modes = result["modes"]
    assert list(modes) == list(MODES)
    for mode, figures in modes.items():
        assert figures["rate"][0] > 0 and figures["cpu_us"][0] > 0, mode
        assert len(figures["p50"]) == 1 and figures["p99"][0] >= figures["p50"][0] > 0, mode

    def per_call(mode: str) -> float:
        return statistics.median(modes[mode]["spans"])

    # 8 per call, and a few more: the ledger processes a task's events in one span per fetch,
    # and a task's events now and then come in two fetches; the router's budget lease renews.
    assert 8 <= per_call("traces 100%") < 9
    assert 0 < per_call("traces 10%") < 8
    assert per_call("traces 0%") == per_call("metrics only") == per_call("off") == 0
    assert result["spans_exported"] >= 8 * 2 * 64
