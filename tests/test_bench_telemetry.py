"""The telemetry benchmark in miniature, so that it cannot rot unnoticed, and so that what it
switches is what it says: nothing is about speed here, only that every mode ran and that the
sample ratio is what decides how many spans a call leaves (8 at 100 %, the task's trace; none
at 0 %, with tracing on; none with tracing off or metrics only)."""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench import bench_telemetry
from bench.bench_telemetry import DEFAULT_MODES, parse_args, run
from vapora.eventloop import run as run_loop


@pytest.mark.slow
def test_every_mode_runs_and_the_sample_ratio_decides_the_spans_per_call() -> None:
    args = parse_args(["--quick", "--requests", "20", "--bursts", "2"])
    # In a thread of its own, as in its own process: the suite's session-wide event loop (the
    # shared nats-server fixture) counts as running in this one.
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(run_loop, run, args).result()
    modes = result["modes"]
    assert list(modes) == list(DEFAULT_MODES)
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


@pytest.mark.slow
def test_headers_only_carries_a_context_on_every_message_and_records_no_span() -> None:
    import nats.aio.client

    from actors import connection

    before = (connection.Client._send_publish, nats.aio.client.Client._send_publish)
    args = parse_args(["--quick", "--requests", "10", "--bursts", "2"])
    args.modes = ["off", "headers only"]
    carried = bench_telemetry._Carrier.carried
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(run_loop, run, args).result()
    modes = result["modes"]
    assert list(modes) == ["off", "headers only"]
    assert statistics.median(modes["headers only"]["spans"]) == 0
    # Each of its calls sent several messages with the header (the client's request, the
    # router's to the provider actor, the replies, the appends); the off calls none.
    calls = 50 + 10 + 2 * 64  # warm-up, sequential, bursts
    assert bench_telemetry._Carrier.carried - carried >= 4 * calls
    # The publishes are nats-py's and the actors' own again, and the switch is off.
    assert (connection.Client._send_publish, nats.aio.client.Client._send_publish) == before
    assert not bench_telemetry._Carrier.on


@pytest.mark.slow
def test_the_off_path_count_finds_every_switch_a_task_passes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import bench_telemetry_off

    written: dict[str, object] = {}
    monkeypatch.setattr(bench_telemetry_off, "write_result", lambda name, r: written.update(r))
    argv = ["--requests", "5", "--bursts", "1", "--burst", "8", "--iterations", "1000"]
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(bench_telemetry_off.main, argv).result() == 0
    rows = {r["entry point"]: r for r in written["entry_points"]}  # type: ignore[attr-defined]
    # Each completion: the client's request, the router's request to the provider actor, the
    # provider's one look at whether any telemetry is on, the switches of the appends and the
    # runtime (more than one each); the originals are back in place afterwards.
    assert rows["with request_span(...) (client)"]["per task"] == pytest.approx(1, abs=0.2)
    assert rows["with tracing.request_span(...)"]["per task"] >= 0.8
    assert rows["telemetry.active()"]["per task"] >= 0.8
    assert rows["tracing.enabled()"]["per task"] > 2
    assert all(r["us alone"] > 0 for r in rows.values())
    assert "all" in capsys.readouterr().out
    assert bench_telemetry_off.tracing.enabled.__name__ == "enabled"


@pytest.mark.slow
def test_the_export_process_is_charged_its_own_cpu() -> None:
    quick = ["--quick", "--requests", "10", "--bursts", "2"]
    args = parse_args([*quick, "--export", "process", "--modes", "off", "traces 100%"])
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(run_loop, run, args).result()
    modes = result["modes"]
    assert modes["traces 100%"]["child_us"][0] > 0  # what the child spent, per completion
    assert modes["off"]["child_us"][0] == 0
    assert 8 <= statistics.median(modes["traces 100%"]["spans"]) < 9
