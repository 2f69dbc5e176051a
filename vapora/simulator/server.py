"""The simulator: one HTTP server speaking Anthropic, OpenAI, Gemini and Ollama on their real paths.

Routes::

    POST /v1/messages                                   Anthropic Messages
    POST /v1/chat/completions                           OpenAI Chat Completions
    POST /v1beta/models/{model}:generateContent         Gemini (also :streamGenerateContent?alt=sse,
    POST /v1/models/{model}:generateContent             and both again under /v1/)
    POST /api/chat, POST /api/generate                  Ollama
    GET  /, /api/tags, /api/version                     Ollama health and model list
    GET  /health                                        the simulator's own health
    POST /_control                                      defaults and injected failures (below)
    GET  /_stats                                        request counts per provider and status
    GET  /_requests                                     the last 1000 requests as received

Behaviour comes from the model name (see :mod:`vapora.simulator.behaviour`) layered over the
control defaults. ``POST /_control`` takes a JSON object, every key optional::

    {"provider": "openai" | "anthropic" | "gemini" | "ollama" | "*",   (default "*": all four)
     "behaviour": "slow-20-cached-10",   default behaviour tokens under every model name
     "latency_ms": 20,                   shorthand for "slow-20" in the defaults
     "fail_next": 3,                     the next 3 calls fail ...
     "fail_for_s": 5.0,                  ... or every call for the next 5 seconds ...
     "fail_with": "error-529",           ... with this behaviour (default "error-503")
     "reset": true,                      clear this provider's control state first
     "reset_stats": true,                zero the counters of ``GET /_stats``
     "clear_requests": true}             forget the recorded requests

and answers the resulting control state. Paid providers answer 401 without credentials.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from vapora.simulator.behaviour import Behaviour, ProviderControl, parse_behaviour
from vapora.simulator.dialects import (
    AnthropicDialect,
    BadRequest,
    Dialect,
    GeminiDialect,
    OllamaDialect,
    OpenAIDialect,
    StreamPlan,
    gemini_route,
    tags_body,
)
from vapora.simulator.http import Answer, Connection, Cut, Request, response_bytes
from vapora.simulator.reply import Reply, Turn, make_reply, prompt_tokens

__all__ = ["PROVIDERS", "RecordedRequest", "SimulatorApp"]

PROVIDERS = ("anthropic", "openai", "gemini", "ollama")
_JSON = [("content-type", "application/json")]
_HANG_S = 3600.0


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as the simulator received it (header names lower-case)."""

    provider: str | None
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON."""
        return msgspec.json.decode(self.body)

    def to_dict(self) -> dict[str, Any]:
        try:
            body: Any = self.json()
        except msgspec.DecodeError:
            body = self.body.decode("utf-8", "replace")
        return {
            "provider": self.provider,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": body,
        }


class SimulatorApp:
    """Routes requests to the provider dialects; holds control state, stats and recordings."""

    def __init__(
        self, *, latency_ms: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.dialects: dict[str, Dialect] = {
            "anthropic": AnthropicDialect(),
            "openai": OpenAIDialect(),
            "gemini": GeminiDialect(),
            "ollama": OllamaDialect(),
        }
        self.controls = {name: ProviderControl() for name in PROVIDERS}
        self.requests: deque[RecordedRequest] = deque(maxlen=1000)
        self.stats: dict[str, dict[str, Any]] = {name: _new_stats() for name in PROVIDERS}
        self._clock = clock
        self._ids = itertools.count(1)
        if latency_ms:
            self.control({"latency_ms": latency_ms})

    # --- routing ----------------------------------------------------------------------------

    def __call__(self, request: Request, connection: Connection) -> Answer:
        if request.method == "POST":
            provider = self._provider_of(request.path)
            if provider is not None:
                return self._call(self.dialects[provider], request, connection)
            if request.path == "/_control":
                return self._control_answer(request)
        elif request.method == "GET":
            return self._get(request)
        return response_bytes(404, _JSON, b'{"error":"not found"}')

    @staticmethod
    def _provider_of(path: str) -> str | None:
        if path == "/v1/messages":
            return "anthropic"
        if path == "/v1/chat/completions":
            return "openai"
        if path in ("/api/chat", "/api/generate"):
            return "ollama"
        if gemini_route(path) is not None:
            return "gemini"
        return None

    def _get(self, request: Request) -> bytes:
        path = request.path
        if path == "/health":
            return response_bytes(200, _JSON, b'{"status":"ok"}')
        if path == "/_stats":
            return response_bytes(200, _JSON, msgspec.json.encode(self.stats_snapshot()))
        if path == "/_requests":
            body = msgspec.json.encode([r.to_dict() for r in self.requests])
            return response_bytes(200, _JSON, body)
        if path in ("/", "/api/tags", "/api/version"):
            return self._ollama_health(path)
        return response_bytes(404, _JSON, b'{"error":"not found"}')

    def _ollama_health(self, path: str) -> bytes:
        if self._clock() < self.controls["ollama"].fail_until:
            return response_bytes(503, _JSON, b'{"error":"server unavailable"}')
        if path == "/":
            return response_bytes(200, [("content-type", "text/plain")], b"Ollama is running")
        if path == "/api/version":
            return response_bytes(200, _JSON, b'{"version":"0.6.0"}')
        return response_bytes(200, _JSON, tags_body())

    # --- provider calls ---------------------------------------------------------------------

    def _call(self, dialect: Dialect, request: Request, connection: Connection) -> Answer:
        self.requests.append(
            RecordedRequest(
                dialect.name,
                request.method,
                request.path,
                request.query,
                request.headers,
                request.body,
            )
        )
        stats = self.stats[dialect.name]
        stats["requests"] += 1
        if not dialect.authorized(request):
            return self._error(dialect, 401, Behaviour(), "missing API key")
        try:
            turn = dialect.turn(msgspec.json.decode(request.body), request)
        except (msgspec.DecodeError, BadRequest) as exc:
            return self._error(dialect, 400, Behaviour(), f"invalid request: {exc}")
        behaviour, forced = self.controls[dialect.name].effective(turn.model, self._clock())
        stats["forced"] += forced
        stats["streams"] += turn.stream
        if behaviour.hang:
            return _hang()
        if behaviour.drop:
            return Cut(b"")
        if behaviour.fails:
            status = 0 if behaviour.quota else behaviour.error_status or 500
            # Like OpenAI, a 401 quotes the key it was given: clients must scrub it.
            message = (
                f"Incorrect API key provided: {_credential(request)}" if status == 401 else None
            )
            answer = self._error(dialect, status, behaviour, message)
            return self._delayed(answer, behaviour.latency_ms, connection)
        window = behaviour.context_window
        if window is not None and prompt_tokens(turn) > window:
            code, headers, body = dialect.overflow(prompt_tokens(turn), window)
            self.stats[dialect.name]["errors"] += 1
            by_status = self.stats[dialect.name]["by_status"]
            by_status[str(code)] = by_status.get(str(code), 0) + 1
            return self._delayed(
                response_bytes(code, headers, body), behaviour.latency_ms, connection
            )
        reply = make_reply(turn, behaviour, self._next_id(dialect.name))
        stats["by_status"]["200"] = stats["by_status"].get("200", 0) + 1
        if turn.stream:
            return self._stream(dialect, turn, reply, behaviour, connection)
        return self._complete(dialect, turn, reply, behaviour, connection)

    def _complete(
        self,
        dialect: Dialect,
        turn: Turn,
        reply: Reply,
        behaviour: Behaviour,
        connection: Connection,
    ) -> Answer:
        if behaviour.malformed:
            return response_bytes(200, _JSON, dialect.malformed_body())
        full = response_bytes(200, _JSON, dialect.completion(reply, turn, behaviour))
        if behaviour.cut_after is not None:
            return Cut(full[: len(full) - len(full) // 3])
        wait = (behaviour.latency_ms or 0) + (behaviour.ttft_ms or 0)
        if behaviour.tps:
            wait += 1000 * reply.words // behaviour.tps
        return self._delayed(full, wait, connection)

    def _stream(
        self,
        dialect: Dialect,
        turn: Turn,
        reply: Reply,
        behaviour: Behaviour,
        connection: Connection,
    ) -> Answer:
        frames, first_text, ending = _sequence(
            dialect, dialect.stream(reply, turn, behaviour), behaviour
        )
        headers = [("content-type", dialect.stream_content_type), ("cache-control", "no-cache")]
        if not behaviour.paced and not behaviour.latency_ms:
            return _chunked_at_once(headers, frames, ending)
        return _paced(connection, headers, frames, first_text, ending, behaviour)

    def _error(
        self, dialect: Dialect, status: int, behaviour: Behaviour, message: str | None = None
    ) -> bytes:
        code, headers, body = dialect.error(status, behaviour, message)
        stats = self.stats[dialect.name]
        stats["errors"] += 1
        stats["by_status"][str(code)] = stats["by_status"].get(str(code), 0) + 1
        return response_bytes(code, headers, body)

    @staticmethod
    def _delayed(answer: bytes, wait_ms: int | None, connection: Connection) -> Answer:
        if not wait_ms:
            return answer
        return _write_after(connection, answer, wait_ms)

    def _next_id(self, provider: str) -> str:
        n = next(self._ids)
        if provider == "anthropic":
            return f"msg_01SIM{n:019d}"
        if provider == "openai":
            return f"chatcmpl-SIM{n:026d}"
        return f"sim-{n:012d}"

    # --- control ----------------------------------------------------------------------------

    def control(self, command: dict[str, Any]) -> dict[str, Any]:
        """Apply a control command (the ``POST /_control`` body); answer the control state."""
        target = command.get("provider") or "*"
        names = PROVIDERS if target == "*" else (target,)
        if any(name not in self.controls for name in names):
            raise ValueError(f"unknown provider {target!r}")
        if command.get("clear_requests"):
            self.requests.clear()
        if command.get("reset_stats"):
            self.reset_stats()
        for name in names:
            if command.get("reset"):
                self.controls[name] = ProviderControl()
            self._apply(self.controls[name], command)
        now = self._clock()
        return {"providers": {name: self.controls[name].describe(now) for name in PROVIDERS}}

    def _apply(self, control: ProviderControl, command: dict[str, Any]) -> None:
        defaults = str(command.get("behaviour") or "")
        if command.get("latency_ms"):
            defaults += f"-slow-{int(command['latency_ms'])}"
        if defaults or "behaviour" in command:
            control.defaults = parse_behaviour(defaults)
        if "fail_with" in command:
            control.fail_with = parse_behaviour(str(command["fail_with"]))
        if "fail_next" in command:
            control.fail_next = int(command["fail_next"])
        if "fail_for_s" in command:
            control.fail_until = self._clock() + float(command["fail_for_s"])

    def _control_answer(self, request: Request) -> bytes:
        try:
            command = msgspec.json.decode(request.body or b"{}")
            if not isinstance(command, dict):
                raise ValueError("the control body must be a JSON object")
            state = self.control(command)
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            return response_bytes(400, _JSON, msgspec.json.encode({"error": str(exc)}))
        return response_bytes(200, _JSON, msgspec.json.encode(state))

    def stats_snapshot(self) -> dict[str, Any]:
        """Request counts: total and per provider (requests, streams, errors, forced, by status)."""
        total = sum(s["requests"] for s in self.stats.values())
        return {"total": total, "providers": self.stats}

    def reset_stats(self) -> None:
        self.stats = {name: _new_stats() for name in PROVIDERS}


def _credential(request: Request) -> str:
    headers = request.headers
    bearer = headers.get("authorization", "").removeprefix("Bearer ")
    return headers.get("x-api-key") or headers.get("x-goog-api-key") or bearer or "(none)"


def _new_stats() -> dict[str, Any]:
    return {"requests": 0, "streams": 0, "errors": 0, "forced": 0, "by_status": {}}


def _sequence(
    dialect: Dialect, plan: StreamPlan, behaviour: Behaviour
) -> tuple[list[bytes], int, str]:
    """The frames to send, the index of the first text frame, and how the stream ends."""
    first = len(plan.head)
    if behaviour.malformed:
        return [dialect.malformed_frame()], 0, "end"
    if behaviour.error_after_200:
        n = behaviour.cut_after if behaviour.cut_after is not None else 2
        return plan.head + plan.chunks[:n] + [dialect.stream_error()], first, "end"
    if behaviour.cut_after is not None:
        return plan.head + plan.chunks[: behaviour.cut_after], first, "cut"
    if behaviour.stall_after is not None:
        return plan.head + plan.chunks[: behaviour.stall_after], first, "stall"
    return plan.head + plan.chunks + plan.tail, first, "end"


def _chunk(frame: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(frame), frame)


def _chunked_at_once(headers: list[tuple[str, str]], frames: list[bytes], ending: str) -> Answer:
    head = ["HTTP/1.1 200 OK", "transfer-encoding: chunked"] + [f"{k}: {v}" for k, v in headers]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + b"".join(map(_chunk, frames))
    if ending == "cut":
        return Cut(data)
    return data + b"0\r\n\r\n"


async def _paced(
    connection: Connection,
    headers: list[tuple[str, str]],
    frames: list[bytes],
    first_text: int,
    ending: str,
    behaviour: Behaviour,
) -> None:
    """Write a stream over time: latency, time to first token, tokens per second, the ending."""
    if behaviour.latency_ms:
        await asyncio.sleep(behaviour.latency_ms / 1000)
    connection.start_chunked(200, headers)
    gap = 1 / behaviour.tps if behaviour.tps else 0.0
    for index, frame in enumerate(frames):
        if index == first_text and behaviour.ttft_ms:
            await asyncio.sleep(behaviour.ttft_ms / 1000)
        elif index > first_text and gap:
            await asyncio.sleep(gap)
        await connection.send_chunk(frame)
    if ending == "cut":
        connection.close()
    elif ending == "stall":
        await asyncio.sleep(_HANG_S)
    else:
        connection.end_chunked()


async def _hang() -> None:
    await asyncio.sleep(_HANG_S)


async def _write_after(connection: Connection, answer: bytes, wait_ms: int) -> None:
    await asyncio.sleep(wait_ms / 1000)
    connection.write(answer)
