"""The processes ``bench_vs_litellm`` runs and measures: the simulator, vapora (``vapora up``, or
one ``vapora actor`` per process), the floor's NATS echo responder, the LiteLLM worker; and what
they cost, read from ``/proc`` (CPU seconds, resident memory) of each process and its children.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.server import EmbeddedNats

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VAPORA = str(Path(PYTHON).parent / "vapora")
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

# Fake keys: the simulator wants a credential, and vapora skips a provider without its key.
FAKE_KEYS = {"OPENAI_API_KEY": "sk-bench-fake", "ANTHROPIC_API_KEY": "sk-ant-bench-fake"}


# --- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd on (state, ppid, ...)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU seconds used so far by ``pids``."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of ``pids`` now, summed."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return total


class Meter:
    """CPU seconds and peak resident memory of some processes over one measurement::

    async with Meter(pids) as meter:
        ...
    meter.cpu_s, meter.peak_rss_mb
    """

    def __init__(self, pids: Sequence[int], interval: float = 0.05) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.cpu_s = 0.0
        self.peak_rss_mb = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak_rss_mb = max(self.peak_rss_mb, rss_bytes(self.pids) / 2**20)
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> Meter:
        self._cpu0 = cpu_seconds(self.pids)
        self._task = asyncio.ensure_future(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cpu_s = cpu_seconds(self.pids) - self._cpu0
        self.peak_rss_mb = max(self.peak_rss_mb, rss_bytes(self.pids) / 2**20)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# --- child processes --------------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAPORA_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(FAKE_KEYS)
    env.update(extra or {})
    return env


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float, what: str) -> str:
    """The first line of ``proc``'s stdout starting with ``prefix`` (raises after ``timeout``)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{what} exited (code {proc.wait()}) before {prefix!r}")
            if line.startswith(prefix):
                return line.strip()
    raise RuntimeError(f"{what} did not print {prefix!r} within {timeout} s")


@dataclass
class Child:
    """One started process; ``stop()`` sends SIGTERM, then SIGKILL after a grace period."""

    what: str
    proc: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(
    what: str, argv: list[str], log: Path, *, ready: str, timeout: float = 60.0, **kw: Any
) -> tuple[Child, str]:
    """Start ``argv`` (stderr to ``log``) and wait for its ready line."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        stdin=kw.pop("stdin", subprocess.DEVNULL),
        text=True,
        env=_env(kw.pop("env", None)),
        cwd=ROOT,
        **kw,
    )
    child = Child(what, proc)
    try:
        return child, wait_line(proc, ready, timeout, what)
    except BaseException as exc:
        child.stop(1)
        raise RuntimeError(f"{exc}; the end of {log}:\n{tail(log)}") from exc


def tail(log: Path, lines: int = 15) -> str:
    """The last lines of a log file (for an error message)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_simulator(log: Path) -> tuple[Child, str]:
    """The provider simulator on a free port; answers its base URL."""
    child, line = start(
        "simulator", [PYTHON, "-m", "vapora.simulator", "--port", "0"], log, ready="simulator ready"
    )
    return child, line.split()[-1]


@dataclass
class Deployment:
    """A running vapora: its NATS URL and the processes that serve (actors and nats-server)."""

    name: str
    url: str
    children: list[Child] = field(default_factory=list)
    nats: EmbeddedNats | None = None

    def pids(self) -> list[int]:
        roots = [c.pid for c in self.children]
        if self.nats is not None and self.nats.pid is not None:
            roots.append(self.nats.pid)
        return [pid for root in roots for pid in process_tree(root)]

    async def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.nats is not None:
            await self.nats.stop()


def vapora_up(config: Path, data_dir: Path, log: Path) -> Deployment:
    """``vapora up --port 0`` in one process (embedded nats-server as its child)."""
    argv = [VAPORA, "up", "--config", str(config), "--port", "0", "--data-dir", str(data_dir)]
    # `vapora up --port 0` refuses a data directory without a nats/ subdirectory (a check meant
    # for the offline commands, in cli._embedded); a fresh directory needs it made first.
    (data_dir / "nats").mkdir(parents=True, exist_ok=True)
    child, line = start("vapora up", argv, log, ready="vapora ready")
    return Deployment("vapora up", line.split()[-1], [child])


async def vapora_split(
    config: Path, data_dir: Path, log: Path, providers: Sequence[str]
) -> Deployment:
    """A nats-server and one ``vapora actor`` process per actor: ledger, budget keeper, each
    provider, router (the router last, as ``vapora up`` orders them)."""
    nats = EmbeddedNats(data_dir / "nats")
    await nats.start()
    deployment = Deployment("vapora split", nats.url, nats=nats)
    base = [VAPORA, "actor", "--config", str(config), "--nats-url", nats.url]
    data = ["--data-dir", str(data_dir)]
    waves = [
        [["ledger"], ["budget"]] + [["provider", "--provider", p] for p in providers],
        [["router"]],
    ]
    try:
        for wave in waves:
            procs = [
                subprocess.Popen(
                    base[:2] + args[:1] + base[2:] + args[1:] + data,
                    stdout=subprocess.PIPE,
                    stderr=log.open("ab"),
                    stdin=subprocess.DEVNULL,
                    text=True,
                    env=_env(),
                    cwd=ROOT,
                )
                for args in wave
            ]
            for args, proc in zip(wave, procs, strict=True):
                child = Child(f"vapora actor {' '.join(args)}", proc)
                deployment.children.append(child)
                wait_line(proc, "vapora ready", 60, child.what)
    except BaseException as exc:
        await deployment.stop()
        raise RuntimeError(f"{exc}; the end of {log}:\n{tail(log)}") from exc
    return deployment


def nats_echo(url: str, log: Path) -> Child:
    """The floor's responder: a bare nats-py subscriber that echoes, in its own process."""
    child, _ = start("echo", [PYTHON, "-m", "bench.vs_floor", "--serve", url], log, ready="ready")
    return child


class LiteLLMWorker:
    """``bench/vs_litellm_worker.py`` in LiteLLM's virtualenv, one JSON command per line."""

    def __init__(self, python: Path, log: Path) -> None:
        self.proc = subprocess.Popen(
            [str(python), "-m", "bench.vs_litellm_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        self.child = Child("litellm worker", self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ask(self, command: dict[str, Any], wait_s: float = 300.0) -> dict[str, Any]:
        """Send one command; wait (off the event loop) for its answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), wait_s)
        if not line:
            raise RuntimeError(f"the LiteLLM worker exited (code {self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"LiteLLM worker: {answer['error']}")
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.child.stop(2)


@contextlib.contextmanager
def stopping(children: list[Child]) -> Iterator[list[Child]]:
    """Stop every child on the way out, last started first."""
    try:
        yield children
    finally:
        for child in reversed(children):
            child.stop()
