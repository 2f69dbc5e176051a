"""Which event loop vapora's processes run on, and how an operator chooses it."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from vapora.errors import ConfigError
from vapora.eventloop import ENV, GC_THRESHOLDS, loop_name, run

T = TypeVar("T")
UVLOOP = importlib.util.find_spec("uvloop") is not None


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def in_own_thread(func: Callable[[], T]) -> T:
    """Run ``func`` in a fresh thread: the anyio test runner may own this thread's loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(func).result(timeout=60)


@pytest.mark.skipif(not UVLOOP, reason="uvloop is not installed on this platform")
def test_uvloop_is_the_default_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert loop_name() == "uvloop"
    assert in_own_thread(lambda: run(_loop_module)).startswith("uvloop")


def test_asyncio_is_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "asyncio")
    assert loop_name() == "asyncio"
    assert in_own_thread(lambda: run(_loop_module)).startswith("asyncio")


def test_an_unknown_loop_name_is_an_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, "trio")
    with pytest.raises(ConfigError, match=f"{ENV} must be 'uvloop' or 'asyncio', not 'trio'"):
        loop_name()


@pytest.mark.parametrize(
    "command", [["budget", "--nats-url", "nats://127.0.0.1:9"], ["simulate", "--port", "0"]]
)
def test_the_cli_refuses_an_unknown_loop_with_exit_2(command: list[str]) -> None:
    env = {**os.environ, ENV: "trio"}
    done = subprocess.run(
        [sys.executable, "-m", "vapora.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"{ENV} must be 'uvloop' or 'asyncio'" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_tunes_the_garbage_collector() -> None:
    before = gc.get_threshold()
    try:
        in_own_thread(lambda: run(_loop_module))
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # what existed at start is out of the collector's way
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
