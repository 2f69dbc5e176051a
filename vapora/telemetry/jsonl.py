"""A span exporter writing one JSON object per finished span per line (local debugging, and
the trace tests that run actors in other processes).

Each line: ``name``, ``kind``, ``trace_id``, ``span_id``, ``parent_span_id`` (hex, or null),
``start_ns``, ``end_ns``, ``status``, ``attributes``, ``links`` (trace and span ids) and
``resource`` (``service.name``). Lines are appended and flushed per batch, under a lock, so
several processes may share one file (each line is one ``write``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

from vapora.errors import ConfigError

__all__ = ["JsonLinesSpanExporter", "span_record"]

log = logging.getLogger("vapora.telemetry")


# By identity: an enum member hashes in Python code, a few times slower than id().
_KIND = {id(kind): kind.name for kind in SpanKind}
_STATUS = {id(code): code.name for code in StatusCode}
_NO_LINKS: list[dict[str, str]] = []


def _hex(value: int, width: int) -> str:
    return value.to_bytes(width // 2).hex()  # the fastest of the ways to zero-padded hex


_last_resource: tuple[Resource | None, dict[str, Any]] = (None, {})


def _resource(resource: Resource) -> dict[str, Any]:
    # By identity: a process has one resource, and Resource hashes by serialising itself.
    global _last_resource
    if resource is not _last_resource[0]:
        _last_resource = (resource, {"service.name": resource.attributes.get("service.name")})
    return _last_resource[1]


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """The JSON-able record of one finished span."""
    context = span.context
    assert context is not None
    parent = span.parent
    # A plain dict (vapora's own spans) is encoded as it is; others are copied once.
    attributes = span._attributes
    return {
        "name": span.name,
        "kind": _KIND[id(span.kind)],
        "trace_id": context.trace_id.to_bytes(16).hex(),
        "span_id": context.span_id.to_bytes(8).hex(),
        "parent_span_id": parent.span_id.to_bytes(8).hex() if parent is not None else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": _STATUS[id(span.status.status_code)],
        "attributes": attributes if type(attributes) is dict else dict(attributes or {}),
        "links": [
            {"trace_id": _hex(link.context.trace_id, 32), "span_id": _hex(link.context.span_id, 16)}
            for link in span._links
        ]
        if span._links
        else _NO_LINKS,
        "resource": _resource(span.resource),
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends each exported span to ``path`` as one JSON line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        # Said at start, naming the path: found at the first export, every span was dropped
        # without a word (a directory), or the process died on a traceback (a parent a file).
        if self.path.is_dir():
            raise ConfigError(f"the spans' JSON-lines file {self.path} is a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot make the directory of the spans' JSON-lines file {self.path}: "
                f"{exc.strerror or exc}"
            ) from exc
        with contextlib.suppress(OSError):  # one made before it was 0600: not for everyone
            mode = os.stat(self.path).st_mode
            if stat.S_ISREG(mode) and mode & 0o007:
                os.chmod(self.path, stat.S_IMODE(mode) & ~0o007)
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = self._encoder.encode_lines([span_record(s) for s in spans])
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, lines)
                finally:
                    os.close(fd)
        except OSError as exc:
            if not self._failing:  # once, until a write succeeds again
                log.warning("telemetry: cannot write spans to %s: %s", self.path, exc)
            self._failing = True
            return SpanExportResult.FAILURE
        self._failing = False
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing is held open between batches."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True
