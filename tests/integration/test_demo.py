"""`vapora demo`, short: a real server, real actors and the simulators, end to end; its report
agrees with the events it produced, the audit passes, and the data stays usable offline."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from vapora.cli.demo import MARKER, plan_workload

VAPORA = [sys.executable, "-m", "vapora.cli"]


def run(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VAPORA, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    data_dir = tmp_path_factory.mktemp("demo") / "data"
    return data_dir, run("demo", "--data-dir", str(data_dir), "--requests", "120")


def test_the_demo_finishes_and_prints_the_report_and_a_clean_audit(
    demo: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    data_dir, done = demo
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for heading in (
        "Cost report",
        "By provider",
        "By task type",
        "By hour",
        "Budget tier changes",
        "Fallbacks",
    ):
        assert heading in out
    assert "no differences" in out
    assert "Anthropic outage" in out
    assert (data_dir / "report.html").is_file()


def test_the_budget_runs_down_and_routing_shifts_to_the_free_provider(
    demo: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    data_dir, _ = demo
    tiers = [
        json.loads(line)
        for line in run(
            "events", "--data-dir", str(data_dir), "--type", "budget_tier_changed"
        ).stdout.splitlines()
    ]
    reached = {t["to_tier"] for t in tiers}
    assert {"NearThreshold", "Exceeded"} <= reached
    assert all(t["causation_id"] for t in tiers)
    decisions = [
        json.loads(line)
        for line in run(
            "events", "--data-dir", str(data_dir), "--type", "route_decided"
        ).stdout.splitlines()
    ]
    exceeded = [d for d in decisions if d["decision"]["tier"] == "Exceeded"]
    # In Exceeded only the free provider is in any chain; an empty chain is a 402 refusal.
    assert exceeded and all(d["decision"]["chain"] in (["ollama"], []) for d in exceeded)
    assert any(d["decision"]["chain"] == ["ollama"] for d in exceeded)


def test_the_report_agrees_with_the_events_it_produced(
    demo: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    data_dir, _ = demo
    spends = [
        json.loads(line)
        for line in run(
            "events", "--data-dir", str(data_dir), "--type", "spend_recorded"
        ).stdout.splitlines()
    ]
    offline = run("report", "--data-dir", str(data_dir), "--json").stdout
    assert "E-" not in offline  # money as plain decimals, as online (not "7.5E-8")
    report = json.loads(offline)
    assert Decimal(report["total_usd"]) == sum(Decimal(s["cost_usd"]) for s in spends)
    assert report["calls"] == len(spends)
    by_provider: dict[str, Decimal] = {}
    for s in spends:
        by_provider[s["provider"]] = by_provider.get(s["provider"], Decimal(0)) + Decimal(
            s["cost_usd"]
        )
    assert {k: Decimal(v) for k, v in report["by_provider"].items()} == by_provider


def test_the_outage_shows_as_fallbacks_and_an_open_breaker(
    demo: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    data_dir, done = demo
    fallbacks = run(
        "events", "--data-dir", str(data_dir), "--type", "fallback_triggered"
    ).stdout.splitlines()
    # The report's section lists changes only: the breaker opening, not each provider's first
    # "available, breaker closed" nor an instance's stop.
    section = done.stdout.split("Provider health changes:", 1)[1].split("\n\n", 1)[0]
    lines = [line for line in section.splitlines() if line.strip()]
    assert any("claude: unavailable, breaker open" in line for line in lines), lines
    assert not any("breaker closed (available)" in line for line in lines), lines
    assert not any("instance stopped" in line for line in lines), lines
    assert any(json.loads(f)["from_provider"] == "claude" for f in fallbacks)
    health = [
        json.loads(h)
        for h in run(
            "events", "--data-dir", str(data_dir), "--type", "provider_health_changed"
        ).stdout.splitlines()
    ]
    assert any(h["provider"] == "claude" and h["breaker"] == "open" for h in health)


def test_audit_passes_offline_after_the_demo(
    demo: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    data_dir, _ = demo
    audit = run("audit", "--data-dir", str(data_dir))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "no differences" in audit.stdout


def test_the_workload_is_deterministic_and_covers_every_task_type() -> None:
    tasks = plan_workload(200)
    assert tasks == plan_workload(200)
    assert len({t.fields["task_type"] for t in tasks}) == 7
    assert any(t.stream for t in tasks) and any("provider" in t.fields for t in tasks)


def test_a_directory_that_is_not_a_demo_is_never_deleted(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    done = run("demo", "--data-dir", str(precious), "--requests", "5")
    assert done.returncode == 2
    assert "not a vapora demo directory" in done.stderr
    assert (precious / "keep.txt").read_text() == "mine"


def test_a_demo_directory_a_running_vapora_serves_is_not_emptied(tmp_path: Path) -> None:
    """The demo empties its data directory first: with `vapora up` serving it, it removed the
    running server's store (a review: the log went from 121 events to 71 under it)."""
    data_dir = tmp_path / "demo"
    data_dir.mkdir()
    (data_dir / MARKER).write_text("made by `vapora demo`\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    up = subprocess.Popen(
        [*VAPORA, "up", "--data-dir", str(data_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert up.stdout is not None
        assert up.stdout.readline().startswith("vapora ready ")
        store = sorted(p.name for p in (data_dir / "nats").iterdir())
        done = run("demo", "--data-dir", str(data_dir), "--requests", "5")
        assert done.returncode == 2, done.stderr
        assert "in use by a running vapora" in done.stderr
        assert "choose another --data-dir" in done.stderr
        assert sorted(p.name for p in (data_dir / "nats").iterdir()) == store
        assert up.poll() is None
    finally:
        up.terminate()
        up.wait(timeout=30)
    # Stopped, the directory is the demo's again to empty.
    assert run("demo", "--data-dir", str(data_dir), "--requests", "5").returncode == 0


def test_real_mode_refuses_without_any_provider_key(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    done = subprocess.run(
        [*VAPORA, "demo", "--real", "--data-dir", str(tmp_path / "real")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert "ANTHROPIC_API_KEY, GOOGLE_API_KEY, OPENAI_API_KEY" in done.stderr


def test_real_mode_sends_a_small_workload_to_the_configured_providers(tmp_path: Path) -> None:
    """--real with a config whose base URLs are a simulator process: the same code path as with
    the real services (real HTTP, keys from the environment, no injected outage)."""
    import os

    from vapora.cli.demo import REAL_REQUESTS, demo_config_text

    sim = subprocess.Popen(
        [sys.executable, "-m", "vapora.simulator", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert sim.stdout is not None
        url = sim.stdout.readline().split()[-1]
        config = tmp_path / "real.toml"
        config.write_text(demo_config_text(url, 100_000))
        env = {
            **os.environ,
            "ANTHROPIC_API_KEY": "k1",
            "OPENAI_API_KEY": "k2",
            "GOOGLE_API_KEY": "k3",
        }
        done = subprocess.run(
            [*VAPORA, "demo", "--real", "--config", str(config), "--data-dir", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
    finally:
        sim.terminate()
        sim.wait()
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{REAL_REQUESTS} requests in" in done.stdout
    assert "outage" not in done.stdout and "no differences" in done.stdout


def test_offline_budget_uses_the_demo_config_and_says_when_it_has_none(
    demo: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    data_dir, _ = demo
    done = run("budget", "--data-dir", str(data_dir), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["per_task_limit_usd"] == "1"  # demo.toml's 100 cents
    assert "built-in defaults" not in done.stderr
    # An empty VAPORA_CONFIG (`VAPORA_CONFIG=$CFG`, CFG unset) is unset: it ran on the
    # built-in limits, unsaid (a review).
    emptied = {**os.environ, "VAPORA_CONFIG": ""}
    done = run("budget", "--data-dir", str(data_dir), "--json", env=emptied)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["per_task_limit_usd"] == "1"
    bare = tmp_path / "bare"
    shutil.copytree(data_dir, bare)
    (bare / "config.toml").unlink()
    done = run("budget", "--data-dir", str(bare), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["per_task_limit_usd"] == "10"  # the built-in $10
    assert "holds no config.toml and no --config was given" in done.stderr
