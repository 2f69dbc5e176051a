"""Every routing decision, and every refusal, is one INFO log line naming its task and its trace
(what `vapora up` writes: INFO and up). Real nats-server, the simulator over HTTP."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest

from tests.integration.telemetry_harness import Recorded, guide, separate_deployment
from vapora.errors import VaporaError
from vapora.telemetry import logs

pytestmark = pytest.mark.anyio


async def test_each_routing_decision_is_one_info_line_with_its_task_and_trace(
    tmp_path: Path, recorded: Recorded
) -> None:
    # What `vapora up` writes: INFO and up, through a handler given the task and trace format.
    out = io.StringIO()
    router_log = logging.getLogger("vapora.router")
    handler = logging.StreamHandler(out)
    router_log.addHandler(handler)
    level = router_log.level
    router_log.setLevel(logging.INFO)
    try:
        logs.install(router_log)
        async with separate_deployment(tmp_path, guide()) as dep:
            recorded.spans.clear()
            await dep.client.complete(prompt="hello", task_type="GeneralQuery", task_id="seen-1")
            with pytest.raises(VaporaError):
                await dep.client.complete(
                    prompt="hello", task_id="seen-2", budget_cents=0.000001, provider="claude"
                )
    finally:
        router_log.removeHandler(handler)
        router_log.setLevel(level)
    traces = {
        s.attributes["vapora.task.id"]: f"{s.context.trace_id:032x}"
        for s in recorded.named("process vapora.complete")
    }
    lines = out.getvalue().splitlines()
    [routed] = [line for line in lines if "task=seen-1" in line]
    assert re.fullmatch(
        rf"\S+ \S+ INFO vapora\.router task=seen-1 trace={traces['seen-1']}: "
        r"route gemini -> \S.*",
        routed,
    )
    [refused] = [line for line in lines if "task=seen-2" in line]
    assert re.fullmatch(
        rf"\S+ \S+ INFO vapora\.router task=seen-2 trace={traces['seen-2']}: no route: .+",
        refused,
    )
