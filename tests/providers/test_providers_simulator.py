"""The simulator itself: behaviours by model name, the control endpoint, stats, HTTP details."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import anyio
import httpx
import pytest

from tests.providers.conftest import ClientFactory
from vapora.errors import ProviderRateLimited, ProviderUnavailable
from vapora.providers import ProviderRequest
from vapora.simulator import Behaviour, Simulator, parse_behaviour

pytestmark = pytest.mark.anyio


# --- behaviours from model names (pure) ---------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "claude-opus-4-5",
        "claude-sonnet-4-6",
        "gpt-4o-mini",
        "gemini-2.0-flash",
        "llama3.2",
        "gpt-4",
    ],
)
def test_real_model_names_mean_normal_behaviour(model: str) -> None:
    assert parse_behaviour(model) == Behaviour()


def test_tokens_combine_anywhere_in_the_name() -> None:
    behaviour = parse_behaviour("claude-sonnet-4-6-slow-20-ttft-50-tps-100-cut-3-cached-7-quota")

    assert behaviour == Behaviour(
        latency_ms=20, ttft_ms=50, tps=100, cut_after=3, cache_read=7, quota=True
    )


def test_error_after_200_is_not_an_error_status() -> None:
    behaviour = parse_behaviour("gpt-4o-error-after-200")
    assert behaviour.error_after_200 and behaviour.error_status is None and not behaviour.fails


def test_model_name_wins_over_control_defaults() -> None:
    merged = parse_behaviour("m-slow-5").over(parse_behaviour("slow-50-cached-3"))
    assert (merged.latency_ms, merged.cache_read) == (5, 3)


def test_flaky_fails_its_share_of_calls_evenly() -> None:
    from vapora.simulator.behaviour import ProviderControl

    control = ProviderControl()
    outcomes = [control.effective("gpt-4o-flaky-20", now=0.0)[0].fails for _ in range(20)]

    assert outcomes == [False, False, False, False, True] * 4


# --- the control endpoint -----------------------------------------------------------------------


async def _post(sim: Simulator, path: str, body: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        return await http.post(path, json=body)


async def test_fail_next_n_calls_then_recover(sim: Simulator, client_for: ClientFactory) -> None:
    client = client_for("openai")
    answer = await _post(
        sim, "/_control", {"provider": "openai", "fail_next": 2, "fail_with": "error-429"}
    )
    assert answer.status_code == 200 and answer.json()["providers"]["openai"]["fail_next"] == 2

    for _ in range(2):
        with pytest.raises(ProviderRateLimited):
            await client.complete(ProviderRequest(prompt="hi"))
    done = await client.complete(ProviderRequest(prompt="hi"))

    assert done.text == "hi"
    assert sim.stats()["providers"]["openai"]["forced"] == 2


async def test_an_outage_for_a_while_only_hits_its_provider(
    sim: Simulator, client_for: ClientFactory
) -> None:
    await _post(sim, "/_control", {"provider": "gemini", "fail_for_s": 60})

    with pytest.raises(ProviderUnavailable):
        await client_for("gemini").complete(ProviderRequest(prompt="hi"))
    assert (await client_for("anthropic").complete(ProviderRequest(prompt="hi"))).text == "hi"

    await _post(sim, "/_control", {"provider": "gemini", "reset": True})
    assert (await client_for("gemini").complete(ProviderRequest(prompt="hi"))).text == "hi"


async def test_default_behaviour_applies_under_every_model_name(
    sim: Simulator, client_for: ClientFactory
) -> None:
    sim.control({"behaviour": "cached-9"})  # all providers

    done = await client_for("anthropic").complete(ProviderRequest(prompt="hi"))

    assert done.usage.cache_read_tokens == 9


@pytest.mark.parametrize("body", [[1, 2], {"provider": "mistral"}, {"fail_next": "many"}])
async def test_a_bad_control_command_is_a_400(body: object, sim: Simulator) -> None:
    assert (await _post(sim, "/_control", body)).status_code == 400


async def test_stats_and_recorded_requests(sim: Simulator, client_for: ClientFactory) -> None:
    await client_for("ollama").complete(ProviderRequest(prompt="hi"))
    with pytest.raises(ProviderUnavailable):
        await client_for("ollama", "error-500").complete(ProviderRequest(prompt="hi"))

    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        stats = (await http.get("/_stats")).json()
        recorded = (await http.get("/_requests")).json()

    assert stats["total"] == 2
    assert stats["providers"]["ollama"] == {
        "requests": 2,
        "streams": 0,
        "errors": 1,
        "forced": 0,
        "by_status": {"200": 1, "500": 1},
    }
    assert [r["path"] for r in recorded] == ["/api/generate", "/api/generate"]
    assert recorded[0]["body"]["prompt"] == "hi"


async def test_health_endpoints(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        health = await http.get("/health")
        ollama_root = await http.get("/")
        tags = await http.get("/api/tags")
        missing = await http.get("/nowhere")

    assert health.json() == {"status": "ok"}
    assert ollama_root.text == "Ollama is running"
    assert tags.json()["models"][0]["name"] == "llama3.2:latest"
    assert missing.status_code == 404


async def test_gemini_is_served_under_v1_as_well(client_for: ClientFactory, sim: Simulator) -> None:
    client = client_for("gemini", base_url=sim.base_url + "/v1")

    done = await client.complete(ProviderRequest(prompt="both paths"))

    assert done.text == "both paths"
    assert sim.requests[-1].path.startswith("/v1/models/")


async def test_answers_are_deterministic(client_for: ClientFactory) -> None:
    client = client_for("openai", "len-7")
    first = await client.complete(ProviderRequest(prompt="red green"))
    second = await client.complete(ProviderRequest(prompt="red green"))

    assert first.text == second.text == "red green red green red green red"


# --- HTTP/1.1 details ---------------------------------------------------------------------------


async def _raw(sim: Simulator, data: bytes, until: int) -> bytes:
    """Send raw bytes; read until ``until`` complete responses (counted by status lines)."""
    async with await anyio.connect_tcp("127.0.0.1", sim.port) as stream:
        await stream.send(data)
        received = b""
        with anyio.fail_after(5):
            while received.count(b"HTTP/1.1 ") < until or not received.endswith(b"}"):
                received += await stream.receive()
        return received


async def test_keep_alive_and_pipelined_requests(sim: Simulator) -> None:
    one = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"

    received = await _raw(sim, one * 3, until=3)

    assert received.count(b"HTTP/1.1 200 OK") == 3


async def test_a_chunked_request_body_is_read(sim: Simulator) -> None:
    body = b'{"model":"llama3.2","prompt":"chunked body","stream":false}'
    half = len(body) // 2
    chunked = b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (
        half,
        body[:half],
        len(body) - half,
        body[half:],
    )
    request = (
        b"POST /api/generate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + chunked
    )

    received = await _raw(sim, request, until=1)

    assert b'"response":"chunked body"' in received


async def test_a_garbage_request_line_is_a_400(sim: Simulator) -> None:
    async with await anyio.connect_tcp("127.0.0.1", sim.port) as stream:
        await stream.send(b"NONSENSE\r\n\r\n")
        with anyio.fail_after(5):
            received = await stream.receive()
    assert received.startswith(b"HTTP/1.1 400")


async def test_a_client_that_goes_away_during_a_hang_frees_the_server(
    sim: Simulator, client_for: ClientFactory
) -> None:
    client = client_for("anthropic", "hang", timeout=0.2)
    with pytest.raises(ProviderUnavailable):
        await client.complete(ProviderRequest(prompt="hi"))
    await client.aclose()
    with anyio.fail_after(5):
        while sim.pending_answers:  # noqa: ASYNC110 - polling the server's own bookkeeping
            await anyio.sleep(0.01)


# --- as its own process -------------------------------------------------------------------------


def test_runs_as_a_process_and_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "vapora.simulator", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("simulator ready http://127.0.0.1:")
        url = line.removeprefix("simulator ready ")
        answer = httpx.post(
            url + "/api/chat",
            json={
                "model": "llama3.2",
                "messages": [{"role": "user", "content": "ok"}],
                "stream": False,
            },
        )
        assert answer.json()["message"]["content"] == "ok"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_default_latency_from_the_command_line_option() -> None:
    async with Simulator(latency_ms=40) as slow, httpx.AsyncClient(base_url=slow.base_url) as http:
        started = anyio.current_time()
        answer = await http.post(
            "/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": False}
        )
        waited = anyio.current_time() - started

    assert answer.json()["response"] == "hi"
    assert waited >= 0.04  # a lower bound the simulator guarantees, not a speed


async def test_tokens_per_second_paces_the_stream(client_for: ClientFactory) -> None:
    client = client_for("ollama", "tps-50")

    async with client.stream(ProviderRequest(prompt="a b c d e f")) as stream:
        _ = [text async for text in stream]

    assert stream.completion is not None
    # five gaps of 1/50 s between six chunks: at least 100 ms after the first chunk
    first = stream.completion.first_token_ms or 0.0
    assert stream.completion.latency_ms - first >= 100
