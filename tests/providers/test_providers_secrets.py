"""No API key appears in any exception text, repr, traceback or log line (DESIGN §5)."""

from __future__ import annotations

import logging
import traceback

import httpx
import pytest

from tests.providers.conftest import SECRET, ClientFactory
from vapora.errors import ProviderError
from vapora.providers import ProviderRequest
from vapora.simulator import Simulator

pytestmark = pytest.mark.anyio

KINDS = ["anthropic", "openai", "gemini", "ollama"]
FAILURES = [
    "error-401",  # the simulator quotes the key it was given, as OpenAI does
    "error-400",
    "error-403",
    "error-404",
    "error-429",
    "error-500",
    "error-529",
    "quota",
    "malformed",
    "cut-2",
    "error-after-200",
    "stall-1",
    "hang",
]

STREAM_ONLY = {"error-after-200", "stall-1"}


def _everything_said_about(error: BaseException) -> str:
    """str, repr, message and the full formatted traceback of the error and its causes."""
    parts = ["".join(traceback.format_exception(error))]
    seen: BaseException | None = error
    while seen is not None:
        parts += [str(seen), repr(seen), str(getattr(seen, "message", ""))]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


async def test_the_simulator_really_echoes_the_key(sim: Simulator) -> None:
    """Otherwise the scrubbing test below could not fail."""
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        response = await http.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {SECRET}"},
            json={"model": "gpt-4o-error-401", "messages": [{"role": "user", "content": "x"}]},
        )
    assert SECRET in response.text


@pytest.mark.parametrize("kind", KINDS)
async def test_no_error_or_log_line_contains_the_key(
    kind: str, client_for: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    said: list[str] = []

    for suffix in FAILURES:
        client = client_for(kind, suffix, api_key=SECRET, timeout=0.3)
        said.append(repr(client))
        for streaming in (True,) if suffix in STREAM_ONLY else (False, True):
            try:
                if streaming:
                    async with client.stream(ProviderRequest(prompt="a b c d")) as stream:
                        async for _ in stream:
                            pass
                else:
                    await client.complete(ProviderRequest(prompt="a b c d"))
            except ProviderError as error:
                said.append(_everything_said_about(error))
            else:
                pytest.fail(f"{kind} {suffix} did not fail")

    logged = [caplog.text] + [record.getMessage() for record in caplog.records]
    assert len(said) == 3 * len(FAILURES) - len(STREAM_ONLY)
    assert any("Incorrect API key" in text or "API key not valid" in text for text in said)
    assert not [text for text in said + logged if SECRET in text]
    assert any("[redacted]" in text for text in said)
