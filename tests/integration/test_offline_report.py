"""``vapora report --data-dir`` after a crash: the ledger's file stopped before the log's end
(the actor killed between the log's acknowledgement and the ledger's commit). The report read
the file alone and showed less spend than ``vapora budget --data-dir`` and ``report --html``
for the same directory, without a word."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from actors.connection import ConnectOptions, connect
from actors.cost_ledger import CostLedger
from actors.server import EmbeddedNats
from events import subjects
from events.codec import encode
from tests.fault.money import exact_usage, running, runtime, spend

pytestmark = pytest.mark.anyio

VAPORA = [sys.executable, "-m", "vapora.cli"]


async def test_the_offline_report_counts_the_spend_the_ledger_file_had_not_applied(
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    first = spend(task_id="t1", usage=exact_usage(Decimal("0.03")), at=now - timedelta(seconds=3))
    second = spend(task_id="t2", usage=exact_usage(Decimal("0.06")), at=now - timedelta(seconds=2))
    async with EmbeddedNats(tmp_path / "nats") as server:
        nc = await connect(ConnectOptions.from_url(server.url, name="test"))
        try:
            rt = runtime(nc, tmp_path)
            await rt.log.ensure_stream()
            await rt.log.append(first)
            async with running(CostLedger(rt)) as ledger:
                while ledger.position < 1:  # noqa: ASYNC110 - its own progress
                    await anyio.sleep(0.02)
            await rt.log.append(second)  # the ledger stopped: never applied
            # The first event stored again (no message id, so no deduplication): counted once.
            await rt.log.js.publish(
                subjects.event_subject("spend_recorded", "claude"), encode(first)
            )
        finally:
            await nc.close()

    def report(*more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*VAPORA, "report", "--data-dir", str(tmp_path), *more],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = report("--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert Decimal(data["total_usd"]) == Decimal("0.09")
    assert data["calls"] == 2 and data["last_sequence"] == 3
    assert "stops at log sequence 1" in done.stderr
    windowed = json.loads(report("--json", "--since", second.at.isoformat()).stdout)
    assert Decimal(windowed["total_usd"]) == Decimal("0.06")
    # The offline budget (the log folded batch by batch) says the same.
    budget = subprocess.run(
        [*VAPORA, "budget", "--data-dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert budget.returncode == 0, budget.stderr
    assert Decimal(json.loads(budget.stdout)["spent_month_usd"]) == Decimal("0.09")
    # The offline audit finds the ledger behind the log (a real difference: exit 1) and says
    # why, and what to do, instead of only listing the spend as missing.
    audit = subprocess.run(
        [*VAPORA, "audit", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert audit.returncode == 1, audit.stdout + audit.stderr
    assert "the ledger's file stops at log sequence 1, before the log's end (3)" in audit.stdout
    assert "no budget keeper is running" in audit.stdout
