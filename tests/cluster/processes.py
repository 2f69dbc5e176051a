"""vapora actors as OS processes (``vapora actor ...``, the console command), for the cluster
tests and ``bench/bench_scale.py``: start one with its own NATS user, wait until it serves,
stop or SIGKILL it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[2]
VAPORA = str(Path(sys.executable).parent / "vapora")

KEYS = {
    "ANTHROPIC_API_KEY": "sk-ant-TEST-SECRET-0123456789",
    "OPENAI_API_KEY": "sk-openai-TEST-SECRET-0123456789",
    "GOOGLE_API_KEY": "google-TEST-SECRET-0123456789",
}


@dataclass
class ActorProcess:
    """One ``vapora actor`` process; its log (stderr) goes to ``log_path``."""

    kind: str
    process: subprocess.Popen[bytes]
    log_path: Path
    provider: str | None = None
    ready_line: str = field(default="")

    async def wait_ready(self, within_s: float = 60.0) -> None:
        """Until it prints ``vapora ready <url>``; fail with its log if it exits or stalls."""
        assert self.process.stdout is not None
        with anyio.move_on_after(within_s):
            line = await anyio.to_thread.run_sync(
                self.process.stdout.readline, abandon_on_cancel=True
            )
            self.ready_line = line.decode().strip()
        if not self.ready_line.startswith("vapora ready"):
            self.kill()
            raise AssertionError(f"{self.kind} did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    async def stop(self, grace_s: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace_s):
                await anyio.to_thread.run_sync(self.process.wait, abandon_on_cancel=True)
        self.kill()


def start_actor(
    kind: str,
    *,
    url: str,
    config_file: Path,
    data_dir: Path,
    log_dir: Path,
    provider: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ActorProcess:
    """``vapora actor KIND [--provider P] --nats-url URL --config F --data-dir D``."""
    command = [VAPORA, "actor", kind, "--nats-url", url, "--config", str(config_file)]
    command += ["--data-dir", str(data_dir)]
    if provider is not None:
        command += ["--provider", provider]
    name = f"{kind}-{provider}" if provider else kind
    log_path = log_dir / f"{name}-{len(list(log_dir.glob(name + '-*')))}.log"
    log_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **KEYS, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    return ActorProcess(kind, process, log_path, provider)


async def run_vapora(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run one ``vapora`` command to completion (bounded); its exit code and output."""
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [VAPORA, *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )
    )
    return result.returncode, result.stdout + result.stderr
