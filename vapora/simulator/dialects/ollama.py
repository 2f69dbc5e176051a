"""Ollama ``/api/chat`` and ``/api/generate`` as the simulator speaks them.

Streaming is on unless ``"stream": false``; frames are NDJSON; the final object has
``"done": true``, ``done_reason`` and the counts (``prompt_eval_count``, ``eval_count``, both
omitted by ``nocounts``, as Ollama omits zero counts). A failure after 200 is an
``{"error": …}`` line. Ollama reports no cache tokens.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from vapora.simulator.behaviour import Behaviour
from vapora.simulator.dialects.base import (
    BadRequest,
    Dialect,
    ErrorAnswer,
    StreamPlan,
    ceil_seconds,
    encode,
    text_of,
)
from vapora.simulator.http import Request
from vapora.simulator.reply import Reply, Turn

__all__ = ["OllamaDialect", "tags_body"]


def tags_body() -> bytes:
    """The ``GET /api/tags`` answer: one local model."""
    model = {
        "name": "llama3.2:latest",
        "model": "llama3.2:latest",
        "modified_at": "2026-01-01T00:00:00Z",
        "size": 2019393189,
        "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
        "details": {
            "format": "gguf",
            "family": "llama",
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        },
    }
    return encode({"models": [model]})


class OllamaDialect(Dialect):
    name = "ollama"
    stream_content_type = "application/x-ndjson"

    def authorized(self, request: Request) -> bool:
        return True

    def turn(self, body: Any, request: Request) -> Turn:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise BadRequest("model is required")
        endpoint = request.path.rsplit("/", 1)[-1]
        system = str(body.get("system") or "")
        if endpoint == "chat":
            messages = body.get("messages") or []
            texts = [text_of(m.get("content")) for m in messages if isinstance(m, dict)]
            users = [text_of(m.get("content")) for m in messages if m.get("role") == "user"]
            last_user = users[-1] if users else ""
        else:
            texts = [str(body.get("prompt") or "")]
            last_user = texts[0]
        limit = (body.get("options") or {}).get("num_predict")
        return Turn(
            model=body["model"],
            stream=body.get("stream", True) is not False,
            input_chars=len(system) + sum(map(len, texts)),
            last_user=last_user,
            max_tokens=limit if isinstance(limit, int) and limit > 0 else None,
            endpoint=endpoint,
        )

    def completion(self, reply: Reply, turn: Turn, behaviour: Behaviour) -> bytes:
        return encode(_final(reply, turn, reply.text, behaviour))

    def stream(self, reply: Reply, turn: Turn, behaviour: Behaviour) -> StreamPlan:
        chunks = [encode(_partial(reply, turn, text)) + b"\n" for text in reply.chunks]
        tail = [encode(_final(reply, turn, "", behaviour)) + b"\n"]
        return StreamPlan([], chunks, tail)

    def stream_error(self) -> bytes:
        return b'{"error":"an error was encountered while running the model: unexpected EOF"}\n'

    def malformed_frame(self) -> bytes:
        return b'{"model":"broken","message":{"content":"unterminated\n'

    def error(self, status: int, behaviour: Behaviour, message: str | None = None) -> ErrorAnswer:
        headers = [("content-type", "application/json; charset=utf-8")]
        if status == 0:
            status, message = 402, "you have reached your usage limit, upgrade for higher limits"
        elif status == 404 and message is None:
            message = 'model "simulated" not found, try pulling it first'
        if status == 429:
            headers.append(("retry-after", str(ceil_seconds(behaviour))))
        return status, headers, encode({"error": message or f"simulated error {status}"})

    def overflow(self, tokens: int, window: int) -> ErrorAnswer:
        return self.error(400, Behaviour(), "the input length exceeds the context length")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _partial(reply: Reply, turn: Turn, text: str) -> dict[str, Any]:
    if turn.endpoint == "chat":
        return {
            "model": reply.model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": text},
            "done": False,
        }
    return {"model": reply.model, "created_at": _now(), "response": text, "done": False}


def _final(reply: Reply, turn: Turn, text: str, behaviour: Behaviour) -> dict[str, Any]:
    body = _partial(reply, turn, text)
    body["done"] = True
    body["done_reason"] = "length" if reply.truncated else "stop"
    body["total_duration"] = 5_000_000 + 1_000_000 * reply.words
    body["load_duration"] = 1_000_000
    if not behaviour.no_counts:
        body["prompt_eval_count"] = reply.prompt_tokens
        body["eval_count"] = reply.words
    body["prompt_eval_duration"] = 2_000_000
    body["eval_duration"] = 1_000_000 * reply.words
    return body
