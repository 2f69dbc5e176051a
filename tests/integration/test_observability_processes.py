"""One trace per task across OS processes: every actor is its own ``vapora actor`` process writing
spans as JSON lines to one shared file (``[telemetry] exporter = "jsonl"``); the client is this
test process. Real nats-server and the simulator over HTTP (issue 6)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors.server import EmbeddedNats
from tests.cluster.processes import KEYS, start_actor
from vapora.client import Client
from vapora.config import TelemetryConfig
from vapora.simulator import Simulator
from vapora.telemetry import setup

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def config_file(path: Path, base_url: str, spans: Path) -> Path:
    path.write_text(
        f"""
[[providers]]
name = "claude"
kind = "anthropic"
model = "claude-opus-4-5-error-529"
base_url = "{base_url}"
api_key_env = "ANTHROPIC_API_KEY"
cost_per_1k_tokens = 0.015

[[providers]]
name = "openai"
kind = "openai"
model = "gpt-4"
base_url = "{base_url}/v1"
api_key_env = "OPENAI_API_KEY"
cost_per_1k_tokens = 0.030

[[routing_rules]]
task_type = "CodeGeneration"
primary_provider = "claude"
fallback_chain = ["openai"]

[budget]
daily_limit_cents = 1000
lease_cents = 0  # a reservation per attempt, so the keeper's process is in the trace

[telemetry]
enabled = true
exporter = "jsonl"
jsonl_path = "{spans}"
"""
    )
    return path


async def test_a_fallback_task_is_one_trace_across_actor_processes(tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    async with EmbeddedNats(tmp_path / "nats") as server, Simulator() as sim:
        config = config_file(tmp_path / "vapora.toml", sim.base_url, spans_file)
        kinds = [("ledger", None), ("budget", None), ("provider", "claude")]
        kinds += [("provider", "openai"), ("router", None)]
        processes = [
            start_actor(
                kind,
                url=server.url,
                config_file=config,
                data_dir=tmp_path / "data",
                log_dir=tmp_path / "logs",
                provider=provider,
            )
            for kind, provider in kinds
        ]
        try:
            for process in processes:
                await process.wait_ready()
            telemetry = setup(
                TelemetryConfig(enabled=True, exporter="jsonl", jsonl_path=str(spans_file)),
                env={},
                service_name="test-client",
            )
            async with Client.connect(server.url) as client:
                result = await client.complete(
                    prompt="sort", task_type="CodeGeneration", task_id="proc-1"
                )
                assert [a.provider for a in result.attempts] == ["claude", "openai"]
                with anyio.fail_after(20):  # until the ledger process applied the whole log
                    while (await client.report()).calls < 1:  # noqa: ASYNC110 - another process
                        await anyio.sleep(0.1)
            telemetry.shutdown()
        finally:
            for process in reversed(processes):
                await process.stop()  # SIGTERM: each flushes its spans on the way out
        logs = "".join(p.log() for p in processes)
    records = [json.loads(line) for line in spans_file.read_text().splitlines()]
    [root] = [r for r in records if r["name"] == "publish vapora.complete"]
    trace = [r for r in records if r["trace_id"] == root["trace_id"]]
    by_id = {r["span_id"]: r for r in trace}

    def parent(record: dict[str, Any]) -> dict[str, Any]:
        return by_id[record["parent_span_id"]]

    for record in trace:  # every span's parent is in the trace, written by whichever process
        if record is not root:
            assert record["parent_span_id"] in by_id, record["name"]
    services = {r["resource"]["service.name"] for r in trace}
    assert services == {
        "test-client",
        "vapora-router",
        "vapora-budget",
        "vapora-provider",
        "vapora-ledger",
    }, services
    [router] = [r for r in trace if r["name"] == "process vapora.complete"]
    assert parent(router) is root and router["resource"]["service.name"] == "vapora-router"
    [failed] = [r for r in trace if r["name"] == "chat claude-opus-4-5-error-529"]
    [succeeded] = [r for r in trace if r["name"] == "chat gpt-4"]
    # Anthropic's 529 is its overloaded_error: the type its error body names.
    assert failed["status"] == "ERROR" and failed["attributes"]["error.type"] == "overloaded_error"
    assert succeeded["attributes"]["gen_ai.usage.output_tokens"] > 0
    assert parent(parent(parent(failed))) is router  # process <- publish <- router
    kept = [r for r in trace if r["name"] == "process vapora.budget.reserve"]
    assert {r["resource"]["service.name"] for r in kept} == {"vapora-budget"}
    ledger = [r for r in trace if r["resource"]["service.name"] == "vapora-ledger"]

    def types(record: dict[str, Any]) -> list[str]:  # one event's, or a batch's in order
        attributes = record["attributes"]
        return attributes.get("vapora.event.types") or [attributes["vapora.event.type"]]

    def ids(record: dict[str, Any]) -> list[str]:
        attributes = record["attributes"]
        return attributes.get("vapora.event.ids") or [attributes["messaging.message.id"]]

    assert {t for r in ledger for t in types(r)} >= {
        "route_decided",
        "call_failed",
        "call_succeeded",
        "spend_recorded",
        "budget_reserved",
    }
    event_publishes = [
        r
        for r in trace
        if r["kind"] == "PRODUCER"
        and ("vapora.event.type" in r["attributes"] or "vapora.event.types" in r["attributes"])
    ]
    appended = {i: r for r in event_publishes for i in ids(r)}
    for record in ledger:  # under the span that appended its first event, linked to the others
        producer = parent(record)
        assert producer["kind"] == "PRODUCER"
        assert appended[ids(record)[0]] is producer
        linked = {link["span_id"] for link in record.get("links", [])}
        assert linked == {appended[i]["span_id"] for i in ids(record)} - {producer["span_id"]}
    for secret in KEYS.values():
        assert secret not in spans_file.read_text() and secret not in logs
    # Every line every process wrote says its task and its trace ("-" outside one); the task's
    # lines (the router's fallback line among them) carry the task's trace.
    lines = [line for line in logs.splitlines() if line.strip()]
    line_format = re.compile(r"\S+ \S+ [A-Z]+ \S+ task=(\S+) trace=(-|[0-9a-f]{32}): .*")
    for line in lines:
        assert line_format.fullmatch(line), line
    task_lines = [line for line in lines if " task=proc-1 " in line]
    assert any("fallback claude -> openai" in line for line in task_lines), task_lines
    for line in task_lines:
        assert f" trace={root['trace_id']}: " in line, line
