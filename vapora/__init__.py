"""vapora: an event-sourced LLM router over NATS.

The library holds pure decisions (routing, budgets, cost), the provider HTTP clients, the error
tree and the Python client for other services. Actors live in the ``actors`` package.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
