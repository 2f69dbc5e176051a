"""The four providers' wire formats as the simulator speaks them."""

from __future__ import annotations

from vapora.simulator.dialects.anthropic import AnthropicDialect
from vapora.simulator.dialects.base import BadRequest, Dialect, StreamPlan
from vapora.simulator.dialects.gemini import GeminiDialect, gemini_route
from vapora.simulator.dialects.ollama import OllamaDialect, tags_body
from vapora.simulator.dialects.openai import OpenAIDialect

__all__ = [
    "AnthropicDialect",
    "BadRequest",
    "Dialect",
    "GeminiDialect",
    "OllamaDialect",
    "OpenAIDialect",
    "StreamPlan",
    "gemini_route",
    "tags_body",
]
