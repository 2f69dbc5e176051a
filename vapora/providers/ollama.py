"""Ollama client: ``/api/generate`` for a prompt, ``/api/chat`` for messages (providers.md §3.4).

Streams are NDJSON; the final object (``"done": true``) carries ``done_reason`` and the counts,
which Ollama omits when zero: a missing count is estimated and the completion flagged. An
``{"error": …}`` line with status 200 is a failure. Ollama is free unless priced in the config,
and :meth:`OllamaClient.available` is a real health check (``GET /api/tags``), cached briefly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

import httpx
import msgspec

from vapora.providers.base import ProviderClient
from vapora.providers.values import ProviderRequest, Turn, content_text, count_sum
from vapora.providers.wire import Frame

__all__ = ["OllamaClient"]

_HEALTH_PATH = "/api/tags"
_ERROR = b'"error"'


class _Message(msgspec.Struct):
    content: str | None = None


class _Line(msgspec.Struct):
    """The fields of a streamed line we read before its last (``done``) one."""

    response: str | None = None
    message: _Message | None = None
    done: bool | None = None


_LINE = msgspec.json.Decoder(_Line)


class OllamaClient(ProviderClient):
    """A local (or remote) Ollama server."""

    kind: ClassVar[str] = "ollama"
    default_base_url: ClassVar[str] = "http://localhost:11434"
    paid: ClassVar[bool] = False
    framing: ClassVar[str] = "ndjson"

    def __init__(
        self,
        *,
        health_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        **kw: Any,
    ) -> None:
        super().__init__(clock=clock, **kw)
        self.health_ttl = health_ttl
        self._health: tuple[float, bool] | None = None

    async def available(self) -> bool:
        """Whether the server answers ``GET /api/tags`` (cached for ``health_ttl`` seconds)."""
        now = self._clock()
        if self._health is not None and now - self._health[0] < self.health_ttl:
            return self._health[1]
        healthy = await self._check_health()
        self._health = (self._clock(), healthy)
        return healthy

    async def _check_health(self) -> bool:
        try:
            response = await self._http.get(_HEALTH_PATH, timeout=min(self.timeout, 2.0))
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    @classmethod
    def _headers(cls, api_key: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"} if api_key else {}

    def _path(self, request: ProviderRequest, model: str, *, stream: bool) -> str:
        return "/api/generate" if request.messages is None else "/api/chat"

    def _body(self, request: ProviderRequest, model: str, stream: bool) -> dict[str, Any]:
        options: dict[str, Any] = {"num_predict": request.output_limit}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        body: dict[str, Any] = {"model": model, "stream": stream, "options": options}
        if request.messages is None:
            body["prompt"] = request.prompt or ""
            if request.system:
                body["system"] = request.system
        else:
            system = [{"role": "system", "content": request.system}] if request.system else []
            body["messages"] = system + [
                {"role": role, "content": content} for role, content in request.turns()
            ]
            body["tools"] = []  # as the official SDK sends it
        return body

    def _parse(self, data: Any, turn: Turn) -> None:
        if isinstance(data, dict) and "error" in data:
            raise self._http_error(500, {}, msgspec.json.encode(data))
        if data.get("done") is not True:  # a whole answer ends done (a line of a stream, not)
            raise ValueError("the answer is not `done`")
        text = _text(data)
        turn.parts = [text] if text else []
        _apply_final(data, turn)

    def _parse_usage(self, data: Any, turn: Turn) -> None:
        if "prompt_eval_count" in data:
            turn.input_tokens = count_sum(data["prompt_eval_count"])
        if "eval_count" in data:
            turn.output_tokens = count_sum(data["eval_count"])

    def _on_frame(self, frame: Frame, turn: Turn) -> str | None:
        if _ERROR not in frame.data:
            try:
                line = _LINE.decode(frame.data)
            except msgspec.ValidationError:
                pass  # an unexpected shape: read it field by field below
            else:
                if not line.done:  # the last line carries the counts: read it whole below
                    text = line.message.content if line.message is not None else line.response
                    return text or None
        try:
            chunk = msgspec.json.decode(frame.data)
        except msgspec.DecodeError as exc:
            raise self._malformed() from exc
        if "error" in chunk:
            raise self._http_error(500, {}, frame.data)
        if chunk.get("done"):
            _apply_final(chunk, turn)
        return _text(chunk) or None

    def _error_fields(self, payload: Any) -> tuple[str | None, str]:
        if isinstance(payload, dict) and "error" in payload:
            return None, str(payload["error"])
        return None, ""


def _text(data: dict[str, Any]) -> str:
    message = data.get("message")
    if isinstance(message, dict):
        return content_text(message.get("content"))
    return content_text(data.get("response"))


def _apply_final(data: dict[str, Any], turn: Turn) -> None:
    turn.model = data.get("model") or turn.model
    turn.finish_reason = data.get("done_reason") or ("stop" if data.get("done") else None)
    # A count that is null or not an integer is not one: estimated, as a missing one is.
    if "prompt_eval_count" in data:
        turn.input_tokens = count_sum(data["prompt_eval_count"])
    if "eval_count" in data:
        turn.output_tokens = count_sum(data["eval_count"])
    turn.done = bool(data.get("done"))
