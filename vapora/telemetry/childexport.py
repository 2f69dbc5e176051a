"""OTLP span export from a child process: the actors' process only packs each batch.

Encoding a span to OTLP protobuf and POSTing it costs about 20 µs of CPU per span in a busy
actor process (``BENCHMARKS.md``, Telemetry), under the interpreter lock the event loop needs:
a batch of 512 spans holds it for milliseconds, which lands on the latency of every request in
flight. :class:`ChildSpanExporter` hands that work to a child process: the batcher's thread packs
each batch as msgpack tuples (about 2 µs a span) and writes it to the child's stdin; the child
(``python -m vapora.telemetry.childexport``) rebuilds the spans (as shells of
:class:`~vapora.telemetry.spans.VaporaSpan`, or the SDK's ``ReadableSpan`` when limits dropped
something) and exports them with :class:`~vapora.telemetry.otlp.OtlpSpanExporter`: the same
bytes as from the process itself, reading the same ``OTEL_EXPORTER_OTLP_*`` variables (the child
inherits the environment; headers and credentials never go on its command line).

The protocol, parent to child: frames of a 4-byte big-endian length and a msgpack array whose
first item names it: ``["hello", endpoint]`` first; ``["resource", id, attributes,
schema_url]`` and ``["scope", id, name, version, schema_url, attributes]`` before the first span
that uses them; ``["spans", [row, ...]]``; ``["flush", n]``; ``["bye"]`` last. Child to parent,
one line each: ``sent <count>`` or ``failed <count>`` per batch, ``flushed <n> <cpu ns>`` once
everything before flush ``n`` is exported (with the child's CPU time so far). ``bye``, or the
end of the child's stdin (its parent died), is its shutdown: it exports what it has and exits.

The child is started at the first batch, not at start-up (a short command that exports nothing
never starts one). Each write to it has a deadline (``timeout_s``): a child that stops reading is
killed. A child that stops is said in the log with the spans written to it and not answered for
(counted in :attr:`ChildSpanExporter.failed`), and another is started at the next batch; after
:data:`MAX_DEATHS`, or when none can be started, the spans are exported from the process itself
and the log says so. A span with a value msgpack cannot carry is left out of its batch and said
(at most once a minute). A flush or the shutdown waits for the lock the writing thread holds at
most ``timeout_s``. The child runs in its own session, so a Ctrl-C at a terminal reaches the
parent only, which then flushes it; a parent that dies closes the child's stdin, and the child
exits; a forked process closes its copy of the pipe.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
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
from vapora.telemetry.logs import CleanFilter
from vapora.telemetry.spans import VaporaSpan

__all__ = ["ChildSpanExporter", "main"]

log = logging.getLogger("vapora.telemetry")

_LENGTH = struct.Struct(">I")
#: Seconds a shutdown waits for the child to send what it has before it is killed.
SHUTDOWN_TIMEOUT_S = 10.0
#: Seconds a shutdown waits for a writer blocked on the child before stopping the child.
SHUTDOWN_LOCK_S = 5.0
#: The child's interpreter arguments (after ``sys.executable``).
CHILD_ARGS: tuple[str, ...] = ("-m", "vapora.telemetry.childexport")
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
        [(e.name, e.timestamp, dict(e.attributes or {}), e.dropped_attributes) for e in events]
        if events
        else None,
        [
            (
                link.context.trace_id.to_bytes(16),
                link.context.span_id,
                int(link.context.trace_flags),
                _state_header(link.context.trace_state),
                link.context.is_remote,
                dict(link.attributes or {}),
                link.dropped_attributes,
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
    """One running child: its process, the write end of its stdin (a bare descriptor, written
    without blocking past a deadline), what it has been sent and what it has answered."""

    def __init__(self, owner: ChildSpanExporter) -> None:
        read, self.fd = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, *CHILD_ARGS],
                stdin=read,
                stdout=subprocess.PIPE,
                start_new_session=True,  # a terminal's Ctrl-C goes to the parent, which flushes
            )
        except BaseException:
            os.close(self.fd)
            raise
        finally:
            os.close(read)
        os.set_blocking(self.fd, False)
        assert self.process.stdout is not None
        self.resources: dict[int, tuple[int, Any]] = {}  # id(resource) -> (number, resource)
        self.scopes: dict[int, tuple[int, Any]] = {}
        self.written = 0  # spans written to it
        self.answered = 0  # spans it said it sent or could not send
        self.flushed = 0  # the last flush it answered
        self.reader = threading.Thread(
            target=owner._read_answers,
            args=(self, self.process.stdout),
            name="vapora-span-export-answers",
            daemon=True,
        )
        self.reader.start()

    def alive(self) -> bool:
        return self.process.poll() is None

    def write(self, data: bytes, deadline: float) -> None:
        """All of ``data``, or :class:`_Stopped` (the child exited, or did not read it all
        before ``deadline``, a ``time.monotonic()``: then it is killed)."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
                continue
            except BlockingIOError:
                pass
            except OSError as error:  # EPIPE: it exited; EBADF: closed by a shutdown
                raise _Stopped(f"it exited ({self.process.poll()})") from error
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([], [self.fd], [], remaining)[1]:
                self.kill()
                raise _Stopped("it did not read a batch in time (stopped)")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()


class _Stopped(Exception):
    """The child cannot take more: it exited, or stopped reading."""


class ChildSpanExporter(SpanExporter):
    """A span exporter that hands each batch to a child process exporting OTLP (module doc).

    ``timeout_s`` bounds each write to the child (a child that stops reading is killed and
    replaced) and a flush's or the shutdown's wait for the lock the writing thread holds."""

    def __init__(self, endpoint: str | None = None, timeout_s: float = 30.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.sent = 0  # spans the child reported sent
        self.failed = 0  # spans lost: not sent, not packable, or with a child that died
        self.child_cpu_ns = 0  # the running child's CPU time at its last flush (benchmarks)
        self._child: _Child | None = None
        # The exporter used when no child can be started; made now, so that what is wrong
        # with the OTLP settings (a malformed header, say) is said in this process's log.
        self._fallback = _otlp_exporter(endpoint)
        self._local: SpanExporter | None = None  # the fallback, once in use
        self._lock = threading.Lock()  # one writer at a time (the batcher, a flush)
        self._answers = threading.Condition()
        self._flushes = 0
        self._closed = False
        self._deaths = 0  # children that stopped
        self._unpackable_said_at = -math.inf
        self._pack = msgspec.msgpack.Encoder().encode
        if hasattr(os, "register_at_fork"):  # a forked process starts a child of its own
            method = weakref.WeakMethod(self._forget_child)
            os.register_at_fork(after_in_child=lambda: call_alive(method))

    # --- the batcher's side ----------------------------------------------------------------------

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self._lock.acquire(timeout=self.timeout_s):
            return self._lost(len(spans))
        try:
            return self._export(spans)
        finally:
            self._lock.release()

    def _export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        if self._local is not None:
            return self._local.export(spans)
        for attempt in (1, 2):  # a child that stopped is replaced once, at once
            child = self._running_child()
            if child is None:
                if self._closed:
                    break
                self._local = self._fallback
                return self._local.export(spans)
            data, resources, scopes, packed = self._packed(child, spans)
            if not packed:
                return self._lost(len(spans))
            try:
                child.write(data, time.monotonic() + self.timeout_s)
            except _Stopped as stopped:
                self._bury(child, str(stopped), again=attempt == 1)
                continue
            child.resources.update(resources)
            child.scopes.update(scopes)
            child.written += packed
            self._lost(len(spans) - packed)
            return SpanExportResult.SUCCESS
        return self._lost(len(spans))

    def _lost(self, count: int) -> SpanExportResult:
        with self._answers:
            self.failed += count
        return SpanExportResult.FAILURE

    def _running_child(self) -> _Child | None:
        """The live child, or a new one; None: export from this process (or closed)."""
        if self._closed:
            return None
        child = self._child
        if child is not None:
            if child.alive():
                return child
            self._bury(child, f"it exited ({child.process.poll()})", again=True)
        if self._deaths >= MAX_DEATHS:
            log.warning(
                "telemetry: the span export process stopped %d times; spans are exported "
                "from this process from now on",
                self._deaths,
            )
            return None
        try:
            child = _Child(self)
            child.write(self._frame(["hello", self.endpoint]), time.monotonic() + self.timeout_s)
        except (OSError, _Stopped) as error:
            log.warning(
                "telemetry: the span export process could not be started (%s); spans are "
                "exported from this process",
                error,
            )
            self._deaths = MAX_DEATHS
            return None
        self._child = child
        return child

    def _bury(self, child: _Child, why: str, *, again: bool) -> None:
        """A child that stopped: its unanswered spans are counted lost, and it is said."""
        if self._child is child:
            self._child = None
        self._deaths += 1
        child.kill()
        child.close()
        child.reader.join(1.0)  # its last answers counted before the rest is called lost
        with self._answers:
            lost = child.written - child.answered
            self.failed += lost
            child.answered = child.written
            self._answers.notify_all()
        log.warning(
            "telemetry: the span export process stopped: %s; %d spans lost with it%s",
            why,
            lost,
            "; starting another" if again and self._deaths < MAX_DEATHS else "",
        )

    def _frame(self, item: list[Any]) -> bytes:
        payload = self._pack(item)
        return _LENGTH.pack(len(payload)) + payload

    def _packed(
        self, child: _Child, spans: Sequence[ReadableSpan]
    ) -> tuple[bytes, dict[int, tuple[int, Any]], dict[int, tuple[int, Any]], int]:
        """The frames for ``spans`` (with the resources and scopes the child lacks, recorded
        as sent only once written), and how many spans they hold: a span with a value msgpack
        cannot carry (an attribute of another type, a string that is not Unicode) is left out
        and said, not the whole batch."""
        resources: dict[int, tuple[int, Any]] = {}
        scopes: dict[int, tuple[int, Any]] = {}
        frames: list[bytes] = []
        for span in spans:
            resource, scope = span.resource, span.instrumentation_scope
            if id(resource) not in child.resources and id(resource) not in resources:
                number = len(child.resources) + len(resources)
                resources[id(resource)] = (number, resource)  # kept: its id stays its
                item = ["resource", number, dict(resource.attributes), resource.schema_url]
                frames.append(self._frame(item))
            if id(scope) not in child.scopes and id(scope) not in scopes:
                number = len(child.scopes) + len(scopes)
                scopes[id(scope)] = (number, scope)
                frames.append(self._frame(["scope", number, *_scope_fields(scope)]))

        def number_of(table: dict[int, tuple[int, Any]], new: dict[int, Any], key: Any) -> int:
            known = table.get(id(key)) or new[id(key)]
            return int(known[0])

        rows = [
            _row(
                span,
                number_of(child.resources, resources, span.resource),
                number_of(child.scopes, scopes, span.instrumentation_scope),
            )
            for span in spans
        ]
        try:
            frames.append(self._frame(["spans", rows]))
            return b"".join(frames), resources, scopes, len(rows)
        except (TypeError, ValueError, OverflowError):  # one span's value: find which
            pass
        good = []
        for row in rows:
            try:
                self._pack(row)
            except (TypeError, ValueError, OverflowError) as error:
                self._say_unpackable(row[2], error)
            else:
                good.append(row)
        if good:
            frames.append(self._frame(["spans", good]))
        return b"".join(frames), resources, scopes, len(good)

    def _say_unpackable(self, name: str, error: Exception) -> None:
        now = time.monotonic()
        if now - self._unpackable_said_at >= 60:
            self._unpackable_said_at = now
            log.warning(
                "telemetry: span %r not exported: a value it holds cannot be sent (%s: %s)",
                name,
                type(error).__name__,
                error,
            )

    def _read_answers(self, child: _Child, stdout: IO[bytes]) -> None:
        for line in stdout:
            word, _, number = line.decode("ascii", "replace").partition(" ")
            with self._answers:
                if word == "sent":
                    self.sent += int(number)
                    child.answered += int(number)
                elif word == "failed":
                    self.failed += int(number)
                    child.answered += int(number)
                elif word == "flushed":
                    flush, _, cpu_ns = number.partition(" ")
                    child.flushed = max(child.flushed, int(flush))
                    if cpu_ns.strip():
                        self.child_cpu_ns = int(cpu_ns)
                self._answers.notify_all()
        with self._answers:  # the child is gone: nobody waits on it any longer
            self._answers.notify_all()

    # --- flush and shutdown ---------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until the child has exported every batch written before this call; False when
        that took longer than the timeout or spans were lost with a child that stopped."""
        deadline = time.monotonic() + timeout_millis / 1000
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            if self._local is not None:
                return self._local.force_flush(timeout_millis)
            child = self._child
            if child is None:
                return True
            if not child.alive():
                self._bury(child, f"it exited ({child.process.poll()})", again=False)
                return False
            self._flushes += 1
            wanted = self._flushes
            try:
                child.write(self._frame(["flush", wanted]), deadline)
            except _Stopped as stopped:
                self._bury(child, str(stopped), again=False)
                return False
        finally:
            self._lock.release()
        with self._answers:
            while child.flushed < wanted and child.alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # In steps: the child's exit is seen by polling, not by a notification.
                self._answers.wait(min(remaining, 0.1))
        return child.flushed >= wanted

    def shutdown(self) -> None:
        # A writer blocked on a child that reads nothing is not waited out: a few seconds,
        # then the child is stopped (and that writer's batch lost).
        got = self._lock.acquire(timeout=min(self.timeout_s, SHUTDOWN_LOCK_S))
        try:
            self._closed = True
            child, self._child = self._child, None
        finally:
            if got:
                self._lock.release()
        self._fallback.shutdown()
        if child is None:
            return
        if not got:
            # The writing thread is stuck on this child: stopped, its write fails, and that
            # thread counts the spans lost and closes the pipe (not closed here: it may be in
            # the middle of using the descriptor).
            log.warning("telemetry: the span export process stopped taking spans; stopped")
            child.kill()
            child.process.wait()
            return
        # Its shutdown: it sends what it has and exits. Said, not only closed: a forked copy
        # of this process may hold the pipe open, and the child would never see its end.
        with contextlib.suppress(_Stopped, OSError):
            child.write(self._frame(["bye"]), time.monotonic() + self.timeout_s)
        child.close()
        try:
            child.process.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning(
                "telemetry: the span export process did not finish in %.0f s; stopped",
                SHUTDOWN_TIMEOUT_S,
            )
            child.kill()
            child.process.wait()
        child.reader.join(1.0)
        with self._answers:
            self.failed += child.written - child.answered

    def _forget_child(self) -> None:
        # In a forked process: the child is the parent's. This process closes its copy of the
        # pipe (else the child would not see its input end when the parent closes it) and
        # starts a child of its own at its first batch. The process and its answers' pipe are
        # kept referenced, never collected: collecting them would close descriptors by number.
        child, self._child = self._child, None
        if child is not None:
            child.close()
            _FORKED_AWAY.append(child)
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
        span_events = [_event(*event) for event in events] if events else ()
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
        values = _dropping(attributes or {}, dropped[0])
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


def _dropping(attributes: dict[str, Any], dropped: int) -> Any:
    """``attributes`` as they were, with the count the span limits dropped from them."""
    if not dropped:
        return attributes
    bounded = BoundedAttributes(attributes=attributes, immutable=False)
    bounded.dropped = dropped
    return bounded


def _event(name: str, timestamp: int, attributes: dict[str, Any], dropped: int) -> Event:
    return Event(name, _dropping(attributes, dropped), timestamp)


def _link(
    trace_bytes: bytes,
    span_id: int,
    flags: int,
    state: str | None,
    remote: bool,
    attributes: dict[str, Any],
    dropped: int,
) -> Link:
    context = SpanContext(
        int.from_bytes(trace_bytes),
        span_id,
        remote,
        TraceFlags(flags),
        TraceState.from_header([state]) if state else None,
    )
    return Link(context, _dropping(attributes, dropped))


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
    for handler in logging.getLogger().handlers:  # (an endpoint's query, quoted by urllib3)
        handler.addFilter(CleanFilter())
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
        elif kind == "bye":
            break
    if exporter is not None:
        exporter.shutdown()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        sys.exit(main())
