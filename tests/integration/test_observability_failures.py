"""What a failed task leaves in its trace: the client's and the router's spans fail with the
error's contract code (``error.type``, status ERROR), as the error reply says. Real nats-server,
the simulator over HTTP, each actor on its own connection."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from tests.integration.telemetry_harness import Recorded, guide, separate_deployment
from vapora.errors import BudgetExceeded, NoProviderAvailable

pytestmark = pytest.mark.anyio


def _failed_with(span: ReadableSpan, code: str) -> bool:
    return span.status.status_code is StatusCode.ERROR and span.attributes["error.type"] == code


# Over budget: no provider fits the task's budget (402); unavailable: every provider answers 503.
REFUSALS = {
    "budget_exceeded": (BudgetExceeded, {}, {"budget_cents": 0.000001, "provider": "claude"}),
    "no_provider_available": (
        NoProviderAvailable,
        {
            "models": {
                "gemini": "gemini-2.0-flash-error-503",
                "ollama": "llama2-error-503",
                "openai": "gpt-4-error-503",
            }
        },
        {"task_type": "GeneralQuery"},
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("code", list(REFUSALS))
async def test_a_failed_task_fails_the_clients_and_the_routers_spans_with_its_code(
    tmp_path: Path, recorded: Recorded, code: str, stream: bool
) -> None:
    error, config, fields = REFUSALS[code]
    async with separate_deployment(tmp_path, guide(**config)) as dep:
        recorded.spans.clear()
        with pytest.raises(error):
            if stream:
                async with dep.client.stream(prompt="hello", task_id="failed-1", **fields) as s:
                    async for _ in s:
                        pass
            else:
                await dep.client.complete(prompt="hello", task_id="failed-1", **fields)
    subject = "vapora.stream" if stream else "vapora.complete"
    [client] = recorded.named(f"publish {subject}")
    [router] = [
        s
        for s in recorded.named(f"process {subject}")
        if s.parent and s.parent.span_id == client.context.span_id
    ]
    assert _failed_with(client, code), (client.status, client.attributes)
    assert _failed_with(router, code), (router.status, router.attributes)


async def test_a_succeeded_task_leaves_the_clients_and_the_routers_spans_unset(
    tmp_path: Path, recorded: Recorded
) -> None:
    async with separate_deployment(tmp_path, guide()) as dep:
        recorded.spans.clear()
        await dep.client.complete(prompt="hello", task_type="GeneralQuery")
    [client] = recorded.named("publish vapora.complete")
    [router] = recorded.named("process vapora.complete")
    for span in (client, router):
        assert span.status.status_code is StatusCode.UNSET and "error.type" not in span.attributes
