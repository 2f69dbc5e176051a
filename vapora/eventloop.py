"""The event loop every vapora process runs on (uvloop where installed, else asyncio's), and the
garbage collector's settings it runs with.

uvloop (libuv under asyncio's API, the loop uvicorn uses) makes socket reads and writes, timers
and task switches cheaper; an actor does little else, so each request through vapora costs less
CPU and less latency on it (measured in ``BENCHMARKS.md``). It changes nothing in behaviour:
anyio, nats-py, httpx and aiosqlite run unchanged on either loop. ``VAPORA_EVENT_LOOP=asyncio``
chooses asyncio's own loop; ``uvloop`` insists on uvloop (an error when it is missing).
"""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from vapora.errors import ConfigError

__all__ = ["ENV", "GC_THRESHOLDS", "loop_name", "run", "tune_gc"]

ENV = "VAPORA_EVENT_LOOP"
GC_THRESHOLDS = (10_000, 20, 50)  # CPython's defaults: (700, 10, 10)
T = TypeVar("T")


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: what :func:`run` uses, from ``VAPORA_EVENT_LOOP`` and what's
    installed. Raises :class:`ConfigError` naming the variable for any other value."""
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted not in ("", "uvloop", "asyncio"):
        raise ConfigError(f"{ENV} must be 'uvloop' or 'asyncio', not {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    installed = importlib.util.find_spec("uvloop") is not None
    if wanted == "uvloop" and not installed:
        raise ConfigError(f"{ENV}=uvloop, but uvloop is not installed")
    return "uvloop" if installed else "asyncio"


def tune_gc() -> None:
    """Make the cyclic garbage collector run less often, over fewer objects.

    An actor allocates a few hundred short-lived objects per request (messages, events, tasks)
    that reference counting frees at once; with CPython's default threshold (700 allocations) the
    collector still runs a young-generation pass every few requests and now and then walks every
    object of the process. ``gc.freeze()`` moves what exists at start (modules, config, the
    price tables) out of its reach, and the higher thresholds make the passes rarer; cycles are
    still collected. Measured in BENCHMARKS.md (throughput of ``bench/bench_pipeline.py``).
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run(func, *args)`` on the loop :func:`loop_name` names, after :func:`tune_gc`."""
    tune_gc()
    return anyio.run(func, *args, backend_options={"use_uvloop": loop_name() == "uvloop"})
