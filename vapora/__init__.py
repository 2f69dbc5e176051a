"""vapora: an event-sourced LLM router over NATS.

The library holds pure decisions (routing, budgets, cost), the provider HTTP clients, the error
tree and the Python client for other services. Actors live in the ``actors`` package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vapora.client import Client

__all__ = ["Client", "__version__"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``vapora.Client`` is imported on first use, so the pure modules do not pull in nats-py.
    if name == "Client":
        from vapora.client import Client

        return Client
    raise AttributeError(f"module 'vapora' has no attribute {name!r}")
