"""Ended spans to an exporter, in batches, from one background thread.

The SDK's ``BatchSpanProcessor`` does the same job with more on each span's path (a check per
span that the process has not forked, an event set, a lock, on every span once a batch is
waiting), and its worker, woken by a full batch, then sends whatever has arrived meanwhile: a
steady stream of spans went out in many small requests (111 where 24 do, in
``bench/bench_telemetry.py``). :class:`SpanBatcher` appends the span to a deque (atomic under the
GIL, any thread) and wakes the worker once per batch; woken by a full batch, the worker exports
full batches only; on the schedule delay, a flush or the shutdown it exports everything queued
then. A forked child starts a worker of its own with an empty queue.

It reads the SDK's ``OTEL_BSP_*`` variables (schedule delay, queue size, batch size, export
timeout) with the SDK's defaults. A full queue drops the *new* span, counts it
(:attr:`SpanBatcher.dropped`) and says so in the log once per minute at most; spans the exporter
took and spans in batches it could not send are counted too (``exported``, ``failed``).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from vapora.telemetry.spans import VaporaSpan

_SAMPLED = 0x01  # TraceFlags.SAMPLED

__all__ = ["SpanBatcher", "call_alive", "setting"]

log = logging.getLogger("vapora.telemetry")

_DEFAULTS = {
    "OTEL_BSP_SCHEDULE_DELAY": 5000,  # ms
    "OTEL_BSP_MAX_QUEUE_SIZE": 2048,
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512,
    "OTEL_BSP_EXPORT_TIMEOUT": 30000,  # ms
}


def setting(env: Mapping[str, str], name: str) -> int:
    """An ``OTEL_BSP_*`` setting from ``env`` (the SDK's default when unset or not a positive
    integer, said in the log)."""
    raw = env.get(name, "").strip()
    if not raw:
        return _DEFAULTS[name]
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0:
        log.warning(
            "telemetry: %s=%r is not a positive integer; using %d", name, raw, _DEFAULTS[name]
        )
        return _DEFAULTS[name]
    return value


def call_alive(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    """Call a weakly held method if its object is still alive (fork handlers)."""
    bound = method()
    if bound is not None:
        bound()


class SpanBatcher(SpanProcessor):
    """A batch span processor (see the module doc)."""

    def __init__(self, exporter: SpanExporter, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.exporter = exporter
        self.delay_s = setting(env, "OTEL_BSP_SCHEDULE_DELAY") / 1000
        self.max_queue = setting(env, "OTEL_BSP_MAX_QUEUE_SIZE")
        self.max_batch = min(setting(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), self.max_queue)
        self.timeout_s = setting(env, "OTEL_BSP_EXPORT_TIMEOUT") / 1000
        self.dropped = 0
        self.exported = 0  # spans the exporter took
        self.failed = 0  # spans in batches the exporter reported it could not send
        self._shutdown = False
        self._warned_at = -math.inf
        self._start()
        # A forked child has no worker thread (only the forking one survives a fork): it starts
        # its own, with an empty queue (the parent's spans are the parent's to export).
        if hasattr(os, "register_at_fork"):
            method = weakref.WeakMethod(self._start)
            os.register_at_fork(after_in_child=lambda: call_alive(method))

    def _start(self) -> None:
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._flush_requests = 0
        self._flushes_done = 0
        self._thread = threading.Thread(target=self._work, name="vapora-span-export", daemon=True)
        if not self._shutdown:
            self._thread.start()

    # --- the span's path -----------------------------------------------------------------------

    def on_end(self, span: ReadableSpan) -> None:
        if type(span) is VaporaSpan:  # its context tuple's flags, read directly
            if not span._context[3] & _SAMPLED:  # type: ignore[index]
                return
        else:
            context = span.context
            if context is None or not context.trace_flags.sampled:
                return
        if self._shutdown:
            return
        queue = self._queue
        waiting = len(queue)
        if waiting >= self.max_queue:
            self._drop()
            return
        queue.append(span)
        if waiting + 1 == self.max_batch:  # once per batch, not on every span after it
            self._wake.set()

    def _drop(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning(
                "telemetry: the span export queue is full (%d); %d spans dropped so far "
                "(OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_SCHEDULE_DELAY)",
                self.max_queue,
                self.dropped,
            )

    # --- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            woken = self._wake.wait(self.delay_s)
            self._wake.clear()
            stopping = self._shutdown  # read first: every span queued before it is exported
            with self._flushed:
                requested = self._flush_requests
                flushing = requested > self._flushes_done
            # A full batch woke it: export full batches only, so that a steady trickle of
            # spans is not sent in many small requests. A flush, the shutdown or the schedule
            # delay: export everything waiting.
            self._export_waiting(full_only=woken and not flushing and not stopping)
            if flushing:
                with self._flushed:
                    self._flushes_done = requested
                    self._flushed.notify_all()
            if stopping:
                return

    def _export_waiting(self, full_only: bool = False) -> None:
        queue = self._queue
        if full_only:  # full batches, as long as there are some
            while len(queue) >= self.max_batch:
                self._export([queue.popleft() for _ in range(self.max_batch)])
            return
        # Everything queued now (not what keeps arriving meanwhile: a flush would never end).
        waiting = len(queue)
        while waiting > 0:
            count = min(waiting, self.max_batch)
            self._export([queue.popleft() for _ in range(count)])
            waiting -= count

    def _export(self, batch: list[ReadableSpan]) -> None:
        try:
            result = self.exporter.export(batch)
        except Exception:  # an exporter must not stop the worker
            log.exception("telemetry: exporting %d spans failed", len(batch))
            return
        if result is SpanExportResult.SUCCESS:
            self.exported += len(batch)
        else:
            self.failed += len(batch)

    # --- flush and shutdown --------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export every span ended before this call; False if that took over the timeout."""
        if not self._thread.is_alive():
            self._export_waiting()
            return self._flush_exporter(timeout_millis)
        deadline = time.monotonic() + timeout_millis / 1000
        with self._flushed:
            self._flush_requests += 1
            wanted = self._flush_requests
        self._wake.set()
        with self._flushed:
            while self._flushes_done < wanted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._flushed.wait(remaining)
        # An exporter that sends on from elsewhere (a child process) is flushed too.
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
        return self._flush_exporter(remaining_ms)

    def _flush_exporter(self, timeout_millis: int) -> bool:
        # The SDK's base exporter's force_flush returns None: nothing to flush, not a failure.
        return self.exporter.force_flush(timeout_millis) is not False

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        self._wake.set()
        self._thread.join(self.timeout_s)
        self.exporter.shutdown()
