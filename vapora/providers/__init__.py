"""Provider HTTP clients for Anthropic, OpenAI, Gemini and Ollama (httpx only; DESIGN §2, §4).

Build one with :func:`make_client`; call :meth:`ProviderClient.complete`, or iterate
:meth:`ProviderClient.stream` inside ``async with``. See :mod:`vapora.providers.base` for the
contract, :mod:`vapora.providers.values` for the request and result values.
"""

from __future__ import annotations

from vapora.providers.anthropic import AnthropicClient
from vapora.providers.base import ProviderClient
from vapora.providers.factory import CLIENT_CLASSES, DEFAULT_BASE_URLS, make_client
from vapora.providers.gemini import GeminiClient
from vapora.providers.ollama import OllamaClient
from vapora.providers.openai import OpenAIClient
from vapora.providers.stream import CompletionStream
from vapora.providers.transport import KeepAliveTransport
from vapora.providers.values import (
    DEFAULT_MAX_TOKENS,
    Completion,
    ProviderRequest,
    StreamBroken,
    input_token_bound,
    may_reason,
    output_ceiling,
    upper_bound_usage,
)
from vapora.providers.wire import retry_after_from_headers

__all__ = [
    "CLIENT_CLASSES",
    "DEFAULT_BASE_URLS",
    "DEFAULT_MAX_TOKENS",
    "AnthropicClient",
    "Completion",
    "CompletionStream",
    "GeminiClient",
    "KeepAliveTransport",
    "OllamaClient",
    "OpenAIClient",
    "ProviderClient",
    "ProviderRequest",
    "StreamBroken",
    "input_token_bound",
    "make_client",
    "may_reason",
    "output_ceiling",
    "retry_after_from_headers",
    "upper_bound_usage",
]
