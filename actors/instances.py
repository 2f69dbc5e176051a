"""Which vapora services run on this machine (container), for a health check run beside them.

Each running :class:`actors.service.ActorService` notes its NATS micro service instance id in
:func:`instance_dir`, with its process (pid and start time) and its NATS deployment, and removes
the note when it stops. ``vapora health`` asks each instance noted here by id
(``$SRV.PING.<name>.<id>``), so a sibling instance elsewhere cannot answer for a wedged one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["instance_dir", "process_start", "register", "server_identity"]

log = logging.getLogger("vapora.actors")


def instance_dir() -> Path:
    """Where this machine's (container's) running services note their instance ids, so that a
    health check run beside them asks its own instance (``$SRV.PING.<name>.<id>``), not any
    sibling on the NATS server (``$VAPORA_INSTANCE_DIR``, else a directory under the system
    temporary directory)."""
    chosen = os.environ.get("VAPORA_INSTANCE_DIR")
    return Path(chosen) if chosen else Path(tempfile.gettempdir()) / f"vapora-{os.getuid()}"


def register(name: str, instance_id: str, server: str | None) -> Path | None:
    """Note that this process serves ``name`` as ``instance_id`` on the NATS server (or cluster)
    ``server`` (removed when it stops). The note names the process by its pid and its start
    time, so a note a killed process left is known for stale even when a restarted container
    gives its pid to the new process. None when it cannot be written: a health check then asks
    any instance, as before."""
    path = instance_dir() / f"{name}.{instance_id}.json"
    note = {
        "name": name,
        "id": instance_id,
        "pid": os.getpid(),
        "started": process_start(os.getpid()),
        "server": server,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(note))
    except OSError as exc:
        # Said aloud when an operator chose the directory: its health check then asks any
        # instance of the service, not this one.
        level = logging.WARNING if os.environ.get("VAPORA_INSTANCE_DIR") else logging.DEBUG
        log.log(level, "%s: instance not noted in %s (%s)", name, path, exc)
        return None
    return path


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (the boot's id and its start in clock ticks, from
    ``/proc``), or None where there is no ``/proc`` or no such process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its ")" are plain.
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def server_identity(server_info: Mapping[str, Any]) -> str | None:
    """What a health check compares to know it talks to the same NATS deployment: the
    cluster's name, else the server's id."""
    value = server_info.get("cluster") or server_info.get("server_id")
    return str(value) if value else None
