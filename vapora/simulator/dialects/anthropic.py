"""Anthropic Messages API (``POST /v1/messages``) as the simulator speaks it.

Usage semantics: ``input_tokens`` excludes the cache; ``cache_read_input_tokens`` and
``cache_creation_input_tokens`` are reported beside it. ``message_delta`` usage is cumulative.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from vapora.simulator.behaviour import Behaviour
from vapora.simulator.dialects.base import (
    BadRequest,
    Dialect,
    ErrorAnswer,
    StreamPlan,
    ceil_seconds,
    encode,
    retry_seconds,
    sse,
    text_of,
)
from vapora.simulator.http import Request
from vapora.simulator.reply import Reply, Turn

__all__ = ["AnthropicDialect"]

_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_PING = sse({"type": "ping"}, "ping")


class AnthropicDialect(Dialect):
    name = "anthropic"

    def authorized(self, request: Request) -> bool:
        return bool(request.headers.get("x-api-key") or request.headers.get("authorization"))

    def turn(self, body: Any, request: Request) -> Turn:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise BadRequest("model: Field required")
        if not isinstance(body.get("max_tokens"), int):
            raise BadRequest("max_tokens: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: at least one message is required")
        texts = [text_of(m.get("content")) for m in messages if isinstance(m, dict)]
        users = [text_of(m.get("content")) for m in messages if m.get("role") == "user"]
        system = text_of(body.get("system") or "")
        return Turn(
            model=body["model"],
            stream=bool(body.get("stream")),
            input_chars=len(system) + sum(map(len, texts)),
            last_user=users[-1] if users else "",
            max_tokens=body["max_tokens"],
        )

    def completion(self, reply: Reply, turn: Turn, behaviour: Behaviour) -> bytes:
        return encode(
            {
                "id": reply.id,
                "type": "message",
                "role": "assistant",
                "model": reply.model,
                "content": [*_thinking(reply), {"type": "text", "text": reply.text}],
                "stop_reason": _stop(reply),
                "stop_sequence": None,
                "usage": _usage(reply, reply.words + reply.thoughts),
            }
        )

    def stream(self, reply: Reply, turn: Turn, behaviour: Behaviour) -> StreamPlan:
        start = {
            "type": "message_start",
            "message": {
                "id": reply.id,
                "type": "message",
                "role": "assistant",
                "model": reply.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": _usage(reply, 1),
            },
        }
        head = [sse(start, "message_start")]
        text = 0
        for block in _thinking(reply):  # a thinking block first, as the API streams it
            summary, signature = block["thinking"], block["signature"]
            head += [
                _block_start(text, {"type": "thinking", "thinking": ""}),
                _block_delta(text, {"type": "thinking_delta", "thinking": summary}),
                _block_delta(text, {"type": "signature_delta", "signature": signature}),
                sse({"type": "content_block_stop", "index": text}, "content_block_stop"),
            ]
            text += 1
        head += [_block_start(text, {"type": "text", "text": ""}), _PING]
        chunks = [
            _block_delta(text, {"type": "text_delta", "text": chunk}) for chunk in reply.chunks
        ]
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": _stop(reply), "stop_sequence": None},
            "usage": _usage(reply, reply.words + reply.thoughts, delta=True),
        }
        tail = [
            sse({"type": "content_block_stop", "index": text}, "content_block_stop"),
            sse(delta, "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ]
        return StreamPlan(head, chunks, tail)

    def stream_error(self) -> bytes:
        return sse(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            "error",
        )

    def error(self, status: int, behaviour: Behaviour, message: str | None = None) -> ErrorAnswer:
        headers = [("content-type", "application/json"), ("request-id", "req_sim_error")]
        error: dict[str, Any]
        if status == 0:  # the tier's monthly spend cap: a 429 with no retry-after
            status = 429
            error = {
                "type": "rate_limit_error",
                "message": "You have reached your specified API usage limits.",
                "details": {"error_code": "enforced_spend_limit_reached"},
            }
        else:
            kind = _ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
            error = {"type": kind, "message": message or f"simulated {kind}"}
        if status == 429 and "details" not in error:
            headers += _rate_limit_headers(behaviour)
        body = {"type": "error", "error": error, "request_id": "req_sim_error"}
        return status, headers, encode(body)

    def overflow(self, tokens: int, window: int) -> ErrorAnswer:
        return self.error(
            400, Behaviour(), f"prompt is too long: {tokens} tokens > {window} maximum"
        )


def _thinking(reply: Reply) -> list[dict[str, Any]]:
    """The answer's thinking block (``thoughts-<n>``), summarised as Claude 4 models return it:
    billed for all ``n`` tokens in ``output_tokens``, shown in a few words."""
    if not reply.thoughts:
        return []
    summary = f"Thought about it for {reply.thoughts} tokens."
    return [{"type": "thinking", "thinking": summary, "signature": "c2ltdWxhdGVk"}]


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    event = {"type": "content_block_start", "index": index, "content_block": block}
    return sse(event, "content_block_start")


def _block_delta(index: int, delta: dict[str, Any]) -> bytes:
    event = {"type": "content_block_delta", "index": index, "delta": delta}
    return sse(event, "content_block_delta")


def _stop(reply: Reply) -> str:
    return "max_tokens" if reply.truncated else "end_turn"


def _usage(reply: Reply, output: int, *, delta: bool = False) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": reply.prompt_tokens,
        "cache_creation_input_tokens": reply.cache_write,
        "cache_read_input_tokens": reply.cache_read,
        "output_tokens": output,
    }
    if not delta:
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": reply.cache_write - reply.cache_write_1h,
            "ephemeral_1h_input_tokens": reply.cache_write_1h,
        }
        usage["service_tier"] = "standard"
    return usage


def _rate_limit_headers(behaviour: Behaviour) -> list[tuple[str, str]]:
    reset = datetime.now(UTC) + timedelta(seconds=retry_seconds(behaviour))
    return [
        ("retry-after", str(ceil_seconds(behaviour))),
        ("anthropic-ratelimit-requests-limit", "50"),
        ("anthropic-ratelimit-requests-remaining", "0"),
        ("anthropic-ratelimit-requests-reset", reset.strftime("%Y-%m-%dT%H:%M:%SZ")),
    ]
