"""The one way to build a provider client from plain configuration values."""

from __future__ import annotations

from typing import Any, Final

import httpx

from events.contract import Price
from vapora.errors import ConfigError
from vapora.providers.anthropic import AnthropicClient
from vapora.providers.base import ProviderClient
from vapora.providers.gemini import GeminiClient
from vapora.providers.ollama import OllamaClient
from vapora.providers.openai import OpenAIClient

__all__ = ["CLIENT_CLASSES", "DEFAULT_BASE_URLS", "make_client"]

CLIENT_CLASSES: Final[dict[str, type[ProviderClient]]] = {
    "anthropic": AnthropicClient,
    "openai": OpenAIClient,
    "gemini": GeminiClient,
    "ollama": OllamaClient,
}

#: What each official SDK calls its base URL (DESIGN §5).
DEFAULT_BASE_URLS: Final = {kind: cls.default_base_url for kind, cls in CLIENT_CLASSES.items()}


def make_client(
    *,
    name: str,
    kind: str,
    model: str,
    price: Price,
    api_key: str | None = None,
    base_url: str | None = None,
    timeout: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
    **options: Any,
) -> ProviderClient:
    """A client for provider ``name`` of ``kind`` (anthropic|openai|gemini|ollama).

    ``base_url`` None means the provider's public URL; ``timeout`` is in seconds (a whole call);
    ``transport`` replaces the network (tests); ``options`` go to the client class (e.g.
    ``max_connections``, and for Ollama ``health_ttl``). Raises ``ConfigError`` for an unknown
    kind.
    """
    cls = CLIENT_CLASSES.get(kind)
    if cls is None:
        raise ConfigError(
            f"provider {name!r}: unknown kind {kind!r} (expected one of {sorted(CLIENT_CLASSES)})"
        )
    return cls(
        name=name,
        model=model,
        api_key=api_key,
        price=price,
        base_url=base_url,
        timeout=timeout,
        transport=transport,
        **options,
    )
