"""The head-to-head benchmark in miniature, so that ``make bench`` cannot rot unnoticed.

It runs the real harness (simulator, ``vapora up``, the floor's NATS server and echo process) with a
few hundred requests in all. It checks that every leg and scenario produced figures, that the
fallback scenario does what it says (the floor sees the 20 % of failures, vapora none) and that
the report renders into BENCHMARKS.md without disturbing other sections. Nothing here is about
speed. The LiteLLM leg runs only where ``litellm`` is importable in this interpreter.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest

from bench.bench_vs_litellm import SMOKE, run, vapora_config
from bench.vs_load import closed_loop, open_loop, percentile, sustainable_rate
from bench.vs_report import BEGIN, END, HEADING, markdown, update_benchmarks_md
from vapora.simulator.behaviour import ProviderControl

HAS_LITELLM = importlib.util.find_spec("litellm") is not None


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    plan = replace(SMOKE, litellm=HAS_LITELLM)
    return asyncio.run(run(plan, install=False, workdir=tmp_path_factory.mktemp("vs")))


@pytest.mark.slow
def test_every_leg_answers_every_scenario(result: dict) -> None:
    (trial,) = result["trials"]
    expected = {"floor http", "floor raw http", "floor nats", "floor js", "vapora up"} | (
        {"litellm"} if HAS_LITELLM else set()
    )
    assert set(result["systems"]) == expected
    for name in ("c1", "c64", "c256"):
        assert set(trial[name]) == expected
    for name in ("rate", "flaky", "stream"):
        assert set(trial[name]) == expected - {"floor raw http", "floor nats", "floor js"}
    for name in ("c1", "c64", "stream"):
        vapora = trial[name]["vapora up"]
        assert vapora["ok"] > 0 and vapora["errors"] == 0, (name, vapora)
    assert trial["stream"]["vapora up"]["ttft_p50_ms"] > 0
    assert trial["c64"]["vapora up"]["cpu_ms_per_req"] > 0
    assert trial["c64"]["vapora up"]["peak_rss_mb"] > 10


@pytest.mark.slow
def test_fallback_hides_the_flaky_provider_the_floor_does_not(result: dict) -> None:
    flaky = result["trials"][0]["flaky"]
    assert flaky["vapora up"]["success_pct"] == 100.0
    assert flaky["floor http"]["success_pct"] < 90.0  # every fifth call fails without fallback


@pytest.mark.slow
def test_report_renders_into_its_own_section(result: dict, tmp_path: Path) -> None:
    table = markdown(result | {"machine": {"cpus": 2}})
    assert "**Concurrency 1**" in table and "| vapora up |" in table
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Runtime\n\nkeep me\n\n## Later\n\nand me\n")
    update_benchmarks_md(table, path)
    update_benchmarks_md(table, path)  # idempotent: replaced between the markers, not appended
    text = path.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and text.count(HEADING) == 1
    assert "keep me" in text and "and me" in text


def test_config_routes_each_scenario_through_its_own_provider() -> None:
    from datetime import UTC, datetime

    from events.contract import TaskType
    from vapora.config import parse_config

    config = parse_config(
        vapora_config("http://127.0.0.1:9"), source="bench.toml", at=datetime.now(UTC)
    )
    assert config.mapping(TaskType.CODE_REVIEW) == ("flaky", "backup")
    assert config.provider("slow").model.endswith("slow-50")
    assert config.budget.daily_limit_cents is not None


def test_flaky_token_fails_every_fifth_call() -> None:
    control = ProviderControl()
    failed = [control.effective("gpt-4o-mini-flaky-20", 0.0)[0].fails for _ in range(100)]
    assert sum(failed) == 20 and failed[4] and not any(failed[:4])


def test_load_generators_are_bounded_and_count_failures() -> None:
    calls = 0

    async def call() -> bool:
        nonlocal calls
        calls += 1
        if calls % 4 == 0:
            raise RuntimeError("boom")
        await asyncio.sleep(0.001)
        return True

    closed = asyncio.run(closed_loop(call, concurrency=4, requests=40, seconds=5))
    assert closed.sent == 40 and closed.ok == 30 and closed.errors == 10
    opened = asyncio.run(open_loop(call, rate=200, seconds=0.1))
    assert opened.sent == 20 and opened.ok + opened.errors == 20
    answered = 0

    async def tires() -> bool:  # answers 10 requests, then fails
        nonlocal answered
        answered += 1
        return answered <= 10

    steps = asyncio.run(
        sustainable_rate(
            tires,
            start=50,
            factor=2,
            step_seconds=0.05,
            p99_limit_ms=100,
            max_rate=1000,
            min_samples=1,
        )
    )
    # steps of 2, 5, 10 requests: the third sees the first failure, its retry ends the ladder
    assert steps["rate"] == steps["capacity"] == 100
    assert [(s["rate"], s["errors"] > 0) for s in steps["steps"]] == [
        (50, False),
        (100, False),
        (200, True),
        (200, True),
    ]
    assert percentile([1, 2, 3, 4], 50) == 2 and math.isnan(percentile([], 50))


def test_the_relaxed_ladder_goes_on_past_the_strict_limit() -> None:
    # steps of 1, 2 (and its retry), 4, 8 (and its retry) requests at 10, 20, 40, 80 per second
    waits = iter([0.0] + [0.03] * 2 * 2 + [0.03] * 4 + [0.2] * 8 * 2)

    async def slower() -> bool:
        await asyncio.sleep(next(waits))
        return True

    ladder = asyncio.run(
        sustainable_rate(
            slower,
            start=10,
            factor=2,
            step_seconds=0.1,
            p99_limit_ms=20,
            relaxed_p99_ms=100,
            max_rate=1000,
            min_samples=1,
        )
    )
    # 20/s fails the strict limit twice but holds the relaxed one, as 40/s does; 80/s fails both
    assert ladder["rate"] == 10 and ladder["capacity"] == 40
    assert [s["rate"] for s in ladder["steps"]] == [10, 20, 20, 40, 80, 80]


def test_the_fold_micro_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import micro_fold

    assert micro_fold.main(["--calls", "300", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "fold " in out and "views decoded " in out and "events/s" in out


def test_the_profile_breakdown_counts_each_stack_once_at_its_outermost_match(
    tmp_path: Path,
) -> None:
    from bench.pyspy_frames import report

    traced, off = tmp_path / "traced.txt", tmp_path / "off.txt"
    traced.write_text(
        "main (a.py:1);inject (actors/tracing.py:5);start (vapora/telemetry/spans.py:9) 30\n"
        "main (a.py:1);parse (actors/protocol.py:3) 60\n"
        "main (a.py:1);end (vapora/telemetry/genai.py:7) 10\n"
    )
    off.write_text("main (a.py:1);parse (actors/protocol.py:3) 80\n")
    text = report(traced, off, r"vapora/telemetry|actors/tracing", 5)
    assert "added 20 (25.0 % of it), of which in matching frames 40 (50.0 %)" in text
    assert "30  37.5 %  inject (actors/tracing.py)" in text  # its inner match not counted again
