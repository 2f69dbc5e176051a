"""vapora's NATS actors and their runtime: connect, serve, reply, trace, append and replay events.

Actors are thin shells over the pure decisions in ``vapora``: receive, decode, decide, append,
reply. This package imports ``vapora`` and ``events``; nothing imports it but the CLI.
"""

from __future__ import annotations

__all__: list[str] = []
