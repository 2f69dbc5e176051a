"""OTLP span export from a child process: the actors' process only packs each batch.

Encoding a span to OTLP protobuf and POSTing it costs about 20 µs of CPU per span in a busy
actor process (``BENCHMARKS.md``, Telemetry), under the interpreter lock the event loop needs:
a batch of 512 spans holds it for milliseconds, which lands on the latency of every request in
flight. :class:`ChildSpanExporter` hands that work to a child process: the batcher's thread packs
each batch as msgpack tuples (about 2 µs a span) and writes it to the child's stdin; the child
(``python -m vapora.telemetry.childexport``) rebuilds the spans as the SDK's ``ReadableSpan`` and
exports them with :class:`~vapora.telemetry.otlp.OtlpSpanExporter`, which reads the same
``OTEL_EXPORTER_OTLP_*`` variables (the child inherits the environment; headers and credentials
never go on its command line).

The protocol, parent to child: frames of a 4-byte big-endian length and a msgpack array whose
first item names it: ``["hello", endpoint]`` first; ``["resource", id, attributes,
schema_url]`` and ``["scope", id, name, version, schema_url, attributes]`` before the first span
that uses them; ``["spans", [row, ...]]``; ``["flush", n]``. Child to parent, one line each:
``sent <count>`` or ``failed <count>`` per batch, ``flushed <n> <cpu ns>`` once everything
before flush ``n`` is exported (with the child's CPU time so far). The end of the child's stdin
is its shutdown: it exports what it has and exits.

The child is started at the first batch, not at start-up (a short command that exports nothing
never starts one). A child that dies is started again at the next batch (the batch being
written when it died is counted failed). If no child can be started, the spans are exported
from the process itself, as without this module, and the log says so once. The child runs in
its own session, so a Ctrl-C at a terminal reaches the parent only, which then flushes it; a
parent that dies closes the child's stdin, and the child exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import IO, Any

import msgspec
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from vapora.telemetry.export import call_alive
from vapora.telemetry.spans import VaporaSpan

__all__ = ["ChildSpanExporter", "main"]

log = logging.getLogger("vapora.telemetry")

_LENGTH = struct.Struct(">I")
#: Seconds a shutdown waits for the child to send what it has before it is killed.
SHUTDOWN_TIMEOUT_S = 10.0
#: Children that may stop before the spans are exported from the process itself instead.
MAX_DEATHS = 3


# --- the parent: spans to rows -------------------------------------------------------------------


def _state_header(state: Any) -> str | None:
    return state.to_header() if state else None


def _row(span: ReadableSpan, resource_id: int, scope_id: int) -> tuple[Any, ...]:
    """A span as a msgpack-ready tuple (:meth:`_Rebuilder.span` is the way back)."""
    events: Sequence[Any]
    links: Sequence[Any]
    if type(span) is VaporaSpan:  # its fields read directly; nothing is ever dropped
        context: Any = span._context
        parent: Any = span._parent
        status = span._status
        events, links, dropped = span._events, span._links, (0, 0, 0)
        attributes = span._attributes
        name, kind, start, end = span._name, span._kind, span._start_time, span._end_time
    else:
        context, parent, status = span.context, span.parent, span.status
        events, links = span.events, span.links
        dropped = (span.dropped_attributes, span.dropped_events, span.dropped_links)
        attributes = span.attributes
        name, kind, start, end = span.name, span.kind, span.start_time, span.end_time
    return (
        resource_id,
        scope_id,
        name,
        context[0].to_bytes(16),
        context[1],
        int(context[3]),
        _state_header(context[4]),
        None if parent is None else parent[1],
        parent is not None and bool(parent[2]),
        kind.value,
        start,
        end,
        dict(attributes) if attributes else None,
        [(e.name, e.timestamp, dict(e.attributes or {})) for e in events] if events else None,
        [
            (
                link.context.trace_id.to_bytes(16),
                link.context.span_id,
                int(link.context.trace_flags),
                _state_header(link.context.trace_state),
                link.context.is_remote,
                dict(link.attributes or {}),
            )
            for link in links
        ]
        if links
        else None,
        status.status_code.value,
        status.description,
        dropped,
    )


class _Child:
    """One running child: its process, the writer, and the reader thread of its answers."""

    def __init__(self, owner: ChildSpanExporter) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vapora.telemetry.childexport"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C goes to the parent, which flushes it
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin: IO[bytes] = self.process.stdin
        self.resources: dict[int, tuple[int, Any]] = {}  # id(resource) -> (id, the resource)
        self.scopes: dict[int, tuple[int, Any]] = {}
        self.reader = threading.Thread(
            target=owner._read_answers,
            args=(self.process.stdout,),
            name="vapora-span-export-answers",
            daemon=True,
        )
        self.reader.start()


class ChildSpanExporter(SpanExporter):
    """A span exporter that hands each batch to a child process exporting OTLP (module doc)."""

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint
        self.sent = 0  # spans the child reported sent
        self.failed = 0  # spans in batches the child (or a dead child) could not send
        self.child_cpu_ns = 0  # the running child's CPU time at its last flush (benchmarks)
        self._child: _Child | None = None
        # The exporter used when no child can be started; made now, so that what is wrong
        # with the OTLP settings (a malformed header, say) is said in this process's log.
        self._fallback = _otlp_exporter(endpoint)
        self._local: SpanExporter | None = None  # the fallback, once in use
        self._lock = threading.Lock()  # one writer at a time (the batcher, a flush)
        self._answers = threading.Condition()
        self._flushes = 0
        self._flushed = 0
        self._closed = False
        self._deaths = 0  # children that stopped while spans were written to them
        self._pack = msgspec.msgpack.Encoder().encode
        if hasattr(os, "register_at_fork"):  # a forked process starts a child of its own
            method = weakref.WeakMethod(self._forget_child)
            os.register_at_fork(after_in_child=lambda: call_alive(method))

    # --- the batcher's side ----------------------------------------------------------------------

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        with self._lock:
            if self._local is not None:
                return self._local.export(spans)
            for attempt in (1, 2):  # a dead child is replaced once, at once
                child = self._running_child()
                if child is None:
                    return self._local_exporter().export(spans)
                try:
                    frames = self._definitions(child, spans)
                    frames.append(self._frame(["spans", self._rows(child, spans)]))
                    child.stdin.write(b"".join(frames))
                    child.stdin.flush()
                    return SpanExportResult.SUCCESS
                except (BrokenPipeError, ValueError, OSError):
                    self._child = None
                    self._deaths += 1
                    log.warning(
                        "telemetry: the span export process stopped (exit %s); %s",
                        child.process.poll(),
                        "starting another" if attempt == 1 else "these spans are lost",
                    )
            with self._answers:
                self.failed += len(spans)
            return SpanExportResult.FAILURE

    def _running_child(self) -> _Child | None:
        child = self._child
        if child is not None and child.process.poll() is None:
            return child
        if self._deaths >= MAX_DEATHS:
            log.warning(
                "telemetry: the span export process stopped %d times; spans are exported "
                "from this process from now on",
                self._deaths,
            )
            return None
        try:
            child = _Child(self)
            child.stdin.write(self._frame(["hello", self.endpoint]))
        except OSError as error:
            log.warning(
                "telemetry: the span export process could not be started (%s); spans are "
                "exported from this process",
                error,
            )
            return None
        self._child = child
        return child

    def _local_exporter(self) -> SpanExporter:
        self._local = self._fallback
        return self._local

    def _frame(self, item: list[Any]) -> bytes:
        payload = self._pack(item)
        return _LENGTH.pack(len(payload)) + payload

    def _definitions(self, child: _Child, spans: Sequence[ReadableSpan]) -> list[bytes]:
        """Frames defining the resources and scopes of ``spans`` that the child lacks."""
        frames: list[bytes] = []
        for span in spans:
            resource, scope = span.resource, span.instrumentation_scope
            if id(resource) not in child.resources:
                number = len(child.resources)
                child.resources[id(resource)] = (number, resource)  # kept: its id stays its
                attributes = dict(resource.attributes)
                frames.append(self._frame(["resource", number, attributes, resource.schema_url]))
            if id(scope) not in child.scopes:
                number = len(child.scopes)
                child.scopes[id(scope)] = (number, scope)
                frames.append(self._frame(["scope", number, *_scope_fields(scope)]))
        return frames

    def _rows(self, child: _Child, spans: Sequence[ReadableSpan]) -> list[tuple[Any, ...]]:
        resources, scopes = child.resources, child.scopes
        return [
            _row(span, resources[id(span.resource)][0], scopes[id(span.instrumentation_scope)][0])
            for span in spans
        ]

    def _read_answers(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            word, _, number = line.decode("ascii", "replace").partition(" ")
            with self._answers:
                if word == "sent":
                    self.sent += int(number)
                elif word == "failed":
                    self.failed += int(number)
                elif word == "flushed":
                    flush, _, cpu_ns = number.partition(" ")
                    self._flushed = max(self._flushed, int(flush))
                    if cpu_ns.strip():
                        self.child_cpu_ns = int(cpu_ns)
                self._answers.notify_all()
        with self._answers:  # the child is gone: nobody waits on it any longer
            self._answers.notify_all()

    # --- flush and shutdown -----------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until the child has exported every batch written before this call."""
        with self._lock:
            if self._local is not None:
                return self._local.force_flush(timeout_millis)
            child = self._child
            if child is None or child.process.poll() is not None:
                return True
            self._flushes += 1
            wanted = self._flushes
            try:
                child.stdin.write(self._frame(["flush", wanted]))
                child.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                return False
        with self._answers:
            return (
                self._answers.wait_for(
                    lambda: self._flushed >= wanted or child.process.poll() is not None,
                    timeout_millis / 1000,
                )
                and self._flushed >= wanted
            )

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
            self._fallback.shutdown()
        if child is None:
            return
        with contextlib.suppress(OSError, ValueError):
            child.stdin.close()  # the child's shutdown: it sends what it has and exits
        try:
            child.process.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning(
                "telemetry: the span export process did not finish in %.0f s; stopped",
                SHUTDOWN_TIMEOUT_S,
            )
            child.process.kill()
            child.process.wait()
        child.reader.join(1.0)

    def _forget_child(self) -> None:
        # In a forked process: the child and its pipe are the parent's. They are kept
        # referenced, not closed (collecting them would close descriptors this process may
        # reuse), and this process starts a child of its own at its first batch.
        if self._child is not None:
            _FORKED_AWAY.append(self._child)
        self._child = None
        self._lock = threading.Lock()
        self._answers = threading.Condition()


#: A forked process's references to its parent's children (see ``_forget_child``).
_FORKED_AWAY: list[_Child] = []


def _scope_fields(scope: Any) -> list[Any]:
    if scope is None:
        return [None, None, None, None]
    attributes = getattr(scope, "attributes", None)
    return [scope.name, scope.version, scope.schema_url, dict(attributes) if attributes else None]


def _otlp_exporter(endpoint: str | None) -> SpanExporter:
    from vapora.telemetry.otlp import OtlpSpanExporter

    return OtlpSpanExporter(endpoint=endpoint) if endpoint else OtlpSpanExporter()


# --- the child: rows to spans, spans to the collector --------------------------------------------


class _Rebuilder:
    """Rows back to ``ReadableSpan`` objects, with the resources and scopes defined so far."""

    def __init__(self) -> None:
        self.resources: dict[int, Any] = {}
        self.scopes: dict[int, Any] = {}

    def define(self, item: list[Any]) -> None:
        if item[0] == "resource":
            self.resources[item[1]] = Resource(item[2] or {}, item[3])
        else:
            name, version, schema_url, attributes = item[2:6]
            self.scopes[item[1]] = (
                None
                if name is None
                else InstrumentationScope(name, version, schema_url, attributes)
            )

    def span(self, row: Sequence[Any]) -> ReadableSpan:
        (resource, scope, name, trace_bytes, span_id, flags, state, parent_id, parent_remote,
         kind, start, end, attributes, events, links, code, description, dropped) = row  # fmt: skip
        trace_id = int.from_bytes(trace_bytes)
        state_of = TraceState.from_header([state]) if state else DEFAULT_TRACE_STATE
        context = _new_tuple(SpanContext, (trace_id, span_id, False, _FLAGS[flags], state_of, True))
        parent = (
            None
            if parent_id is None
            else _new_tuple(
                SpanContext,
                (trace_id, parent_id, parent_remote, _FLAGS[0], DEFAULT_TRACE_STATE, True),
            )
        )
        status = _UNSET if code == 0 and not description else Status(StatusCode(code), description)
        span_events = [Event(n, a, t) for n, t, a in events] if events else ()
        span_links = [_link(*link) for link in links] if links else ()
        if not any(dropped):
            # A VaporaSpan's shell: the encoder's direct path reads these fields only.
            shell: Any = VaporaSpan.__new__(VaporaSpan)
            shell._name, shell._context, shell._parent = name, context, parent
            shell._kind, shell._attributes = _KINDS[kind], attributes or {}
            shell._events, shell._links, shell._status = span_events, span_links, status
            shell._resource, shell._instrumentation_scope = (
                self.resources[resource],
                self.scopes[scope],
            )
            shell._start_time, shell._end_time = start, end
            return shell  # type: ignore[no-any-return]
        values: Any = attributes or {}
        if dropped[0]:
            values = BoundedAttributes(attributes=values, immutable=False)
            values.dropped = dropped[0]
        span = ReadableSpan(
            name=name,
            context=context,
            parent=parent,
            resource=self.resources[resource],
            attributes=values,
            events=span_events,
            links=span_links,
            kind=_KINDS[kind],
            status=status,
            start_time=start,
            end_time=end,
            instrumentation_scope=self.scopes[scope],
        )
        span._dropped_events = dropped[1]  # type: ignore[attr-defined]  # not read by encoders
        span._dropped_links = dropped[2]  # type: ignore[attr-defined]
        return span


_new_tuple = tuple.__new__
_FLAGS = [TraceFlags(flags) for flags in range(256)]
_KINDS = {kind.value: kind for kind in SpanKind}
_UNSET = Status(StatusCode.UNSET)


def _link(
    trace_bytes: bytes, span_id: int, flags: int, state: str | None, remote: bool, attributes: Any
) -> Link:
    context = SpanContext(
        int.from_bytes(trace_bytes),
        span_id,
        remote,
        TraceFlags(flags),
        TraceState.from_header([state]) if state else None,
    )
    return Link(context, attributes)


def _frames(stream: IO[bytes]) -> Any:
    """The decoded frames of ``stream`` until its end (a torn last frame is dropped)."""
    decode = msgspec.msgpack.Decoder().decode
    while True:
        head = stream.read(4)
        if len(head) < 4:
            return
        (size,) = _LENGTH.unpack(head)
        payload = stream.read(size)
        if len(payload) < size:
            return
        yield decode(payload)


def main() -> int:
    """The child: frames from stdin, spans to the collector, answers to stdout."""
    logging.basicConfig(
        level=logging.WARNING, format="vapora span export: %(levelname)s %(message)s"
    )
    # The parent said what is wrong with the OTLP headers already (without their values).
    logging.getLogger("opentelemetry.util.re").setLevel(logging.CRITICAL)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    exporter: SpanExporter | None = None
    spans = _Rebuilder()

    def answer(line: str) -> None:
        stdout.write(line.encode() + b"\n")
        stdout.flush()

    for item in _frames(stdin):
        kind = item[0]
        if kind == "hello":
            exporter = _otlp_exporter(item[1])
        elif kind in ("resource", "scope"):
            spans.define(item)
        elif kind == "spans" and exporter is not None:
            batch = [spans.span(row) for row in item[1]]
            result = exporter.export(batch)
            answer(f"{'sent' if result is SpanExportResult.SUCCESS else 'failed'} {len(batch)}")
        elif kind == "flush":
            answer(f"flushed {item[1]} {time.process_time_ns()}")
    if exporter is not None:
        exporter.shutdown()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        sys.exit(main())
