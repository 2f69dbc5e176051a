"""Running the simulator: in-process for tests (:class:`Simulator`), or as a command."""

from __future__ import annotations

import argparse
import signal
import sys
from types import TracebackType
from typing import Any

import anyio

from vapora.cli.args import port, whole_number
from vapora.errors import ConfigError
from vapora.eventloop import run as run_loop
from vapora.simulator.http import HTTPServer
from vapora.simulator.server import RecordedRequest, SimulatorApp

__all__ = ["DEFAULT_PORT", "Simulator", "cli_main", "serve"]

DEFAULT_PORT = 8089


class Simulator:
    """The provider simulator on ``host:port`` (port 0: a free one), as an async context manager.

    ::

        async with Simulator() as sim:
            client = make_client(..., base_url=sim.base_url_for("openai"), ...)
            sim.control({"provider": "openai", "fail_next": 2, "fail_with": "error-529"})

    Runs on the asyncio event loop (anyio's asyncio backend).
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, latency_ms: int | None = None
    ) -> None:
        self.host = host
        self.app = SimulatorApp(latency_ms=latency_ms)
        self._server = HTTPServer(self.app, host, port)

    async def __aenter__(self) -> Simulator:
        await self._server.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._server.stop()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def base_url(self) -> str:
        """``http://host:port``: the base URL of Anthropic, Gemini and Ollama clients."""
        return f"http://{self.host}:{self.port}"

    def base_url_for(self, kind: str) -> str:
        """The base URL as each official SDK expects it (OpenAI's includes ``/v1``)."""
        return self.base_url + "/v1" if kind == "openai" else self.base_url

    @property
    def open_connections(self) -> int:
        """Client connections currently open (keep-alive reuse shows here)."""
        return len(self._server.connections)

    @property
    def pending_answers(self) -> int:
        """Answers still being written or waited for (delays, paced streams, hangs)."""
        return len(self._server.tasks)

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received so far (the last 1000)."""
        return list(self.app.requests)

    def control(self, command: dict[str, Any]) -> dict[str, Any]:
        """Same as ``POST /_control`` with ``command`` as its body."""
        return self.app.control(command)

    def stats(self) -> dict[str, Any]:
        """Same as ``GET /_stats``."""
        return self.app.stats_snapshot()


async def serve(
    host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, latency_ms: int | None = None
) -> None:
    """Serve until cancelled; prints ``simulator ready http://HOST:PORT`` once listening."""
    async with Simulator(host, port, latency_ms=latency_ms) as sim:
        print(f"simulator ready {sim.base_url}", flush=True)
        await anyio.sleep_forever()


def _host(text: str) -> str:
    """A host to serve on (``""`` served on every interface and printed ``http://:PORT``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (0.0.0.0 serves every interface)")
    return text


def _latency(text: str) -> int:
    value = whole_number(text)
    if not 0 <= value <= 3_600_000:  # -10 was taken without a word
        raise argparse.ArgumentTypeError(f"must be 0 to 3600000 ms, got {value}")
    return value


def cli_main(argv: list[str]) -> int:
    """``vapora simulate [--host H] [--port P] [--latency-ms N]``; SIGTERM/Ctrl-C stop it."""
    parser = argparse.ArgumentParser(
        prog="vapora simulate", description="Run the Anthropic/OpenAI/Gemini/Ollama simulator."
    )
    parser.add_argument("--host", type=_host, default="127.0.0.1")
    parser.add_argument("--port", type=port, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=_latency, default=None, help="default latency")
    args = parser.parse_args(argv)
    try:
        run_loop(_serve_until_signalled, args.host, args.port, args.latency_ms)
    except ConfigError as exc:  # VAPORA_EVENT_LOOP: refused as every vapora command does
        print(f"vapora simulate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 1
    except ExceptionGroup as group:  # from the task group serving: a bad host, a port in use
        failed = group.subgroup(OSError)
        if failed is None:
            raise
        error = failed.exceptions[0]
        while isinstance(error, ExceptionGroup):
            error = error.exceptions[0]
        print(f"simulator: cannot serve on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


async def _serve_until_signalled(host: str, port: int, latency_ms: int | None) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: serve(host, port, latency_ms=latency_ms))
            async for _ in signals:
                tasks.cancel_scope.cancel()
                break
