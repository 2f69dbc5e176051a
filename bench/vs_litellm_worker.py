"""The LiteLLM leg of ``bench_vs_litellm``: a ``litellm.Router`` and its load generator, in one
process of LiteLLM's own virtualenv (``bench/.venv-litellm``), driven by the harness.

LiteLLM's Router is a library: an application awaits ``router.acompletion`` in its own event
loop, so the load generator runs in this process, as a user's code would. The harness measures this
process's CPU time and memory from outside (``/proc``), as it does for vapora's processes.

Protocol: one JSON command per line on stdin, one JSON answer per line on the original stdout
(LiteLLM's own prints go to stderr). Commands: ``setup``, ``closed``, ``sustainable``,
``stream``, ``quit``. Imports nothing of vapora's: only the standard library, LiteLLM and
``bench.vs_load`` (standard library only).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price map
os.environ.setdefault("LITELLM_TELEMETRY", "False")

from bench.vs_load import closed_loop, percentile, run_main, sustainable_rate

INPUT_COST = 0.15e-6  # USD per token, the same prices vapora's config gives
OUTPUT_COST = 0.60e-6


def model_list(base_url: str, models: dict[str, str]) -> list[dict[str, Any]]:
    """One OpenAI-compatible deployment per model group, all on the simulator."""
    return [
        {
            "model_name": group,
            "litellm_params": {
                "model": f"openai/{model}",
                "api_base": base_url,
                "api_key": "sk-bench-fake",
                "input_cost_per_token": INPUT_COST,
                "output_cost_per_token": OUTPUT_COST,
                "timeout": 10,
            },
        }
        for group, model in models.items()
    ]


def build_router(base_url: str, models: dict[str, str], fallbacks: dict[str, list[str]]) -> Any:
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm.Router(
        model_list=model_list(base_url, models),
        fallbacks=[{group: chain} for group, chain in fallbacks.items()],
        # One attempt per deployment, then the fallback: the same policy as vapora's chain
        # (LiteLLM's default would retry the same deployment twice first).
        num_retries=0,
        provider_budget_config={"openai": {"budget_limit": 1_000_000.0, "time_period": "1d"}},
    )


class Leg:
    def __init__(self, router: Any, prompt: str, max_tokens: int) -> None:
        self.router = router
        self.messages = [{"role": "user", "content": prompt}]
        self.max_tokens = max_tokens

    def call(self, model: str) -> Any:
        async def one() -> bool:
            reply = await self.router.acompletion(
                model=model, messages=self.messages, max_tokens=self.max_tokens
            )
            return bool(reply.choices[0].message.content)

        return one

    def stream_call(self, model: str, ttfts: list[float]) -> Any:
        async def one() -> bool:
            start = time.perf_counter()
            first = False
            stream = await self.router.acompletion(
                model=model, messages=self.messages, max_tokens=self.max_tokens, stream=True
            )
            async for chunk in stream:
                if not first and chunk.choices and chunk.choices[0].delta.content:
                    ttfts.append((time.perf_counter() - start) * 1000)
                    first = True
            return first

        return one


async def handle(leg: Leg | None, command: dict[str, Any]) -> tuple[Leg | None, dict[str, Any]]:
    op = command["op"]
    if op == "setup":
        from importlib.metadata import version

        router = build_router(command["base_url"], command["models"], command["fallbacks"])
        leg = Leg(router, command["prompt"], command["max_tokens"])
        for _ in range(20):  # warm the connection pool and LiteLLM's caches
            await leg.call("primary")()
        return leg, {"ready": True, "litellm": version("litellm"), "pid": os.getpid()}
    assert leg is not None, "setup first"
    if op == "closed":
        run = await closed_loop(
            leg.call(command["model"]),
            concurrency=command["concurrency"],
            requests=command["requests"],
            seconds=command["seconds"],
        )
        return leg, run.to_dict()
    if op == "sustainable":
        args = {k: v for k, v in command.items() if k not in ("op", "model")}
        return leg, await sustainable_rate(leg.call(command["model"]), **args)
    if op == "stream":
        ttfts: list[float] = []
        run = await closed_loop(
            leg.stream_call(command["model"], ttfts),
            concurrency=command["concurrency"],
            requests=command["requests"],
            seconds=command["seconds"],
        )
        answer = run.to_dict()
        answer["ttft_ms"] = ttfts
        answer["ttft_p50_ms"] = percentile(ttfts, 50)
        return leg, answer
    raise ValueError(f"unknown op {op!r}")


async def main() -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything LiteLLM prints stays out of the answers
    loop = asyncio.get_running_loop()
    leg: Leg | None = None
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == '{"op": "quit"}':
            return
        command = json.loads(line)
        try:
            leg, answer = await handle(leg, command)
        except Exception as exc:  # report, keep serving: the harness decides what to do
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    # LiteLLM runs on asyncio's own loop, its default as a library, unless
    # LITELLM_EVENT_LOOP=uvloop: in interleaved quick runs its completions/s at concurrency 64
    # were 13 % higher on asyncio (137 against 121/s), so this is the fairer default for it.
    os.environ.setdefault("LITELLM_EVENT_LOOP", "asyncio")
    run_main(main(), "LITELLM_EVENT_LOOP")
