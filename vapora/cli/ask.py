"""``vapora ask``: one request through ``vapora.complete`` (or ``vapora.stream``), printed.

The CLI's argument parsing lives elsewhere; :func:`ask_command` takes the parsed values. It prints
the text, then provider, model, tokens, cost and latency; ``stream`` prints the text as it
arrives; ``as_json`` prints the whole result as JSON instead (for a stream: the ``end`` message
with the text added). Errors go to ``err`` as ``vapora: <code>: <message>`` and exit 1; a stream
that broke after its first chunk also says what was billed for it (the tokens and cost of the
``error`` message, and the task id), under the text or, with ``as_json``, as the ``error``
message with the text added.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, TextIO

import msgspec

from events.codec import encode
from events.contract import (
    Attempt,
    CompletionRequest,
    CompletionResult,
    ErrorBody,
    StreamEnd,
    StreamError,
    Usage,
)
from vapora.client import Client, TextStream
from vapora.errors import VaporaError
from vapora.telemetry.logs import printable

__all__ = ["ask_command", "invalid_request", "summary_lines"]


def _request(
    prompt: str,
    *,
    task_type: str | None,
    quality: str | None,
    provider: str | None,
    budget_cents: Decimal | int | str | None,
) -> CompletionRequest:
    fields: dict[str, Any] = {"prompt": prompt}
    if task_type:
        fields["task_type"] = task_type
    if quality:
        fields["quality"] = quality
    if provider:
        fields["provider"] = provider
    if budget_cents is not None:
        fields["budget_cents"] = str(budget_cents)
    return msgspec.convert(fields, CompletionRequest, strict=False)


def invalid_request(
    prompt: str,
    *,
    task_type: str | None,
    quality: str | None,
    provider: str | None,
    budget_cents: Decimal | int | str | None,
) -> str | None:
    """Why the request these flags make is not one vapora takes (the line ``ask_command``
    prints), or None: checked before connecting (an empty prompt waited for NATS first)."""
    try:
        _request(
            prompt,
            task_type=task_type,
            quality=quality,
            provider=provider,
            budget_cents=budget_cents,
        )
    except msgspec.ValidationError as exc:
        return f"vapora: invalid_request: {printable(str(exc))}"
    return None


def summary_lines(
    provider: str,
    model: str,
    usage: Usage,
    cost_usd: Decimal,
    latency_ms: float,
    attempts: Sequence[Attempt] = (),
) -> list[str]:
    """The lines printed under the text; with a line for the whole task when an earlier
    attempt was billed too (the answer's cost alone hid it)."""
    tokens = f"tokens:   {usage.input_tokens} in, {usage.output_tokens} out"
    if usage.cache_read_tokens or usage.cache_write_tokens:
        hour = f", {usage.cache_write_1h_tokens} for 1 h" if usage.cache_write_1h_tokens else ""
        tokens += f" (cache read {usage.cache_read_tokens}, write {usage.cache_write_tokens}{hour})"
    lines = [
        f"provider: {provider}",
        f"model:    {model}",
        tokens,
        f"cost:     ${cost_usd:f}",
    ]
    earlier = [a for a in attempts[:-1] if a.cost_usd > 0]  # (the last one answered)
    if earlier:
        total = sum((a.cost_usd for a in attempts), Decimal(0))
        billed = ", ".join(f"{a.provider} ${a.cost_usd:f} ({a.outcome.value})" for a in earlier)
        lines.append(f"task:     ${total:f} in all, with {billed}")
    lines.append(f"latency:  {latency_ms:.1f} ms")
    return lines


async def ask_command(
    client: Client,
    prompt: str,
    *,
    task_type: str | None = None,
    quality: str | None = None,
    provider: str | None = None,
    budget_cents: Decimal | int | str | None = None,
    stream: bool = False,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO | None = None,
) -> int:
    """Ask vapora once and print the answer; the exit status (0 ok, 1 error)."""
    errors = err if err is not None else sys.stderr
    try:
        request = _request(
            prompt,
            task_type=task_type,
            quality=quality,
            provider=provider,
            budget_cents=budget_cents,
        )
        if stream:
            await _ask_streaming(client, request, as_json=as_json, out=out, err=errors)
        else:
            _print_result(await client.complete(request), as_json=as_json, out=out)
    except msgspec.ValidationError as exc:
        print(f"vapora: invalid_request: {printable(str(exc))}", file=errors)
        return 1
    except VaporaError as exc:
        # (a provider's words, through the router: no control character reaches the terminal)
        print(f"vapora: {printable(exc.code)}: {printable(exc.message)}", file=errors)
        return 1
    return 0


def _print_result(result: CompletionResult, *, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(encode(result).decode(), file=out)
        return
    print(result.text, file=out)
    print(file=out)
    lines = summary_lines(
        result.provider,
        result.model,
        result.usage,
        result.cost_usd,
        result.latency_ms,
        result.attempts,
    )
    print("\n".join(lines), file=out)


async def _ask_streaming(
    client: Client, request: CompletionRequest, *, as_json: bool, out: TextIO, err: TextIO
) -> None:
    async with client.stream(request) as chunks:
        try:
            async for text in chunks:
                if not as_json:
                    out.write(text)
                    out.flush()
        except VaporaError as exc:
            if chunks.usage is not None or chunks.cost_usd is not None:
                _print_partial(chunks, exc, as_json=as_json, out=out, err=err)
            raise
    end: StreamEnd | None = chunks.result
    assert end is not None  # a stream either ends with ``end`` or raises
    if as_json:
        document = msgspec.json.decode(encode(end))
        document["text"] = chunks.text
        print(encode(document).decode(), file=out)
        return
    print("\n", file=out)
    lines = summary_lines(
        end.provider, end.model, end.usage, end.cost_usd, end.latency_ms, end.attempts
    )
    print("\n".join(lines), file=out)


def _print_partial(
    chunks: TextStream, error: VaporaError, *, as_json: bool, out: TextIO, err: TextIO
) -> None:
    """What a stream that broke after its first chunk billed (the ``error`` message's usage)."""
    if as_json:
        document = msgspec.json.decode(
            encode(
                StreamError(
                    error=ErrorBody(code=error.code, message=error.message),
                    task_id=chunks.task_id,
                    usage=chunks.usage,
                    cost_usd=chunks.cost_usd,
                )
            )
        )
        document["text"] = chunks.text
        print(encode(document).decode(), file=out)
        return
    print(file=out)
    usage, cost = chunks.usage, chunks.cost_usd
    billed = f"{usage.input_tokens} in, {usage.output_tokens} out" if usage else "tokens unknown"
    price = f"${cost:f}" if cost is not None else "cost unknown"
    print(
        f"vapora: the stream broke after {len(chunks.text)} characters; billed {billed}, "
        f"{price} (task {printable(str(chunks.task_id))})",
        file=err,
    )
