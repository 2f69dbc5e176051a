"""Local simulators of the Anthropic, OpenAI, Gemini and Ollama HTTP APIs (DESIGN §5).

One server speaks all four on their real paths with realistic bodies, streams, usage (cache tokens
included) and errors; behaviour is chosen by the model name (:mod:`vapora.simulator.behaviour`)
and the ``/_control`` endpoint (:mod:`vapora.simulator.server`). Run it in-process with
:class:`Simulator`, or as ``python -m vapora.simulator --port P`` / ``vapora simulate``.
"""

from __future__ import annotations

from vapora.simulator.behaviour import Behaviour, parse_behaviour
from vapora.simulator.runner import DEFAULT_PORT, Simulator, cli_main, serve
from vapora.simulator.server import PROVIDERS, RecordedRequest, SimulatorApp

__all__ = [
    "DEFAULT_PORT",
    "PROVIDERS",
    "Behaviour",
    "RecordedRequest",
    "Simulator",
    "SimulatorApp",
    "cli_main",
    "parse_behaviour",
    "serve",
]
