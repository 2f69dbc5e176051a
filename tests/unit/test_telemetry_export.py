"""The span batcher (vapora.telemetry.export): every span ended before a flush or a shutdown is
exported once, in order, in batches of at most the batch size; a full queue drops new spans and
counts them; the ``OTEL_BSP_*`` variables are read, and bad values named."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from vapora.telemetry.export import SpanBatcher
from vapora.telemetry.state import STATE, use_tracer_provider


class Recording(SpanExporter):
    def __init__(self, gate: threading.Event | None = None, seconds: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.gate = gate
        self.seconds = seconds  # how long each export takes
        self.shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.gate is not None:
            self.gate.wait(5)
        threading.Event().wait(self.seconds)
        self.batches.append([s.name for s in spans])
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shut = True


def _traced(batcher: SpanBatcher) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(batcher)
    use_tracer_provider(provider)
    return provider


def _spans(n: int, prefix: str = "s") -> None:
    for i in range(n):
        STATE.start_span(f"{prefix}{i}", SpanKind.INTERNAL, {}, None, ()).end()


def test_a_flush_exports_every_ended_span_once_in_order_in_batches() -> None:
    exporter = Recording()
    batcher = SpanBatcher(exporter, env={"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4"})
    try:
        _traced(batcher)
        _spans(10)
        assert batcher.force_flush(5000)
    finally:
        use_tracer_provider(None)
        batcher.shutdown()
    names = [name for batch in exporter.batches for name in batch]
    assert names == [f"s{i}" for i in range(10)]
    assert all(len(batch) <= 4 for batch in exporter.batches)
    assert batcher.exported == 10 and batcher.dropped == 0 and exporter.shut


def test_a_full_batch_wakes_the_worker_before_the_schedule_delay() -> None:
    exporter = Recording()
    # A day's delay: only a full batch can wake the worker.
    env = {"OTEL_BSP_SCHEDULE_DELAY": "86400000", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "3"}
    batcher = SpanBatcher(exporter, env=env)
    try:
        _traced(batcher)
        _spans(3)
        for _ in range(500):
            if exporter.batches:
                break
            threading.Event().wait(0.01)
        assert exporter.batches == [["s0", "s1", "s2"]]
    finally:
        use_tracer_provider(None)
        batcher.shutdown()


def test_shutdown_exports_what_is_queued_and_takes_nothing_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = Recording()
    batcher = SpanBatcher(exporter, env={"OTEL_BSP_SCHEDULE_DELAY": "86400000"})
    _traced(batcher)
    try:
        _spans(5)
        batcher.shutdown()
        _spans(2, prefix="late")
    finally:
        use_tracer_provider(None)
    assert [name for batch in exporter.batches for name in batch] == [f"s{i}" for i in range(5)]


def test_a_full_queue_drops_new_spans_counts_them_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = threading.Event()  # the exporter is stuck until the gate opens
    exporter = Recording(gate)
    env = {"OTEL_BSP_MAX_QUEUE_SIZE": "4", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2"}
    batcher = SpanBatcher(exporter, env=env)
    try:
        _traced(batcher)
        with caplog.at_level(logging.WARNING, logger="vapora.telemetry"):
            _spans(2, prefix="first")  # a full batch: the worker takes it and blocks
            for _ in range(500):
                if not batcher._queue:
                    break
                threading.Event().wait(0.01)
            _spans(6)  # four fit in the queue, two are dropped
        assert batcher.dropped == 2
        assert "span export queue is full" in caplog.text
        gate.set()
        assert batcher.force_flush(5000)
    finally:
        use_tracer_provider(None)
        gate.set()
        batcher.shutdown()
    names = [name for batch in exporter.batches for name in batch]
    assert names == ["first0", "first1", "s0", "s1", "s2", "s3"]


def test_the_otel_bsp_variables_are_read_and_bad_values_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {
        "OTEL_BSP_SCHEDULE_DELAY": "250",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "500",  # above the queue: capped by it
        "OTEL_BSP_EXPORT_TIMEOUT": "soon",
    }
    with caplog.at_level(logging.WARNING, logger="vapora.telemetry"):
        batcher = SpanBatcher(Recording(), env=env)
    batcher.shutdown()
    assert (batcher.delay_s, batcher.max_queue, batcher.max_batch) == (0.25, 100, 100)
    assert batcher.timeout_s == 30.0
    assert "OTEL_BSP_EXPORT_TIMEOUT='soon'" in caplog.text


def test_processors_added_while_tracing_get_the_spans_after_and_on_start_when_they_use_it() -> None:
    from opentelemetry.sdk.trace import SpanProcessor

    class Starts(SpanProcessor):
        def __init__(self) -> None:
            self.started: list[str] = []
            self.ended: list[str] = []

        def on_start(self, span: object, parent_context: object = None) -> None:
            self.started.append(span.name)  # type: ignore[attr-defined]

        def on_end(self, span: ReadableSpan) -> None:
            self.ended.append(span.name)

    first = Starts()
    provider = TracerProvider()
    provider.add_span_processor(first)
    use_tracer_provider(provider)
    try:
        _spans(1, prefix="a")
        second = Starts()
        provider.add_span_processor(second)
        _spans(1, prefix="b")
    finally:
        use_tracer_provider(None)
    assert (first.started, first.ended) == (["a0", "b0"], ["a0", "b0"])
    assert (second.started, second.ended) == (["b0"], ["b0"])


def test_a_steady_trickle_is_exported_in_full_batches_and_the_rest_on_flush() -> None:
    exporter = Recording(seconds=0.02)  # spans keep arriving while a batch is exported
    env = {"OTEL_BSP_SCHEDULE_DELAY": "86400000", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4"}
    batcher = SpanBatcher(exporter, env=env)
    try:
        _traced(batcher)
        for i in range(10):  # one at a time, letting the worker run in between
            _spans(1, prefix=f"t{i}-")
            threading.Event().wait(0.005)
        for _ in range(500):
            if len(exporter.batches) >= 2:
                break
            threading.Event().wait(0.01)
        threading.Event().wait(0.05)
        assert [len(batch) for batch in exporter.batches] == [4, 4]
        assert batcher.force_flush(5000)
        assert [len(batch) for batch in exporter.batches] == [4, 4, 2]
    finally:
        use_tracer_provider(None)
        batcher.shutdown()


def test_batches_the_exporter_could_not_send_are_counted_apart() -> None:
    class Refusing(Recording):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            super().export(spans)
            return SpanExportResult.FAILURE

    exporter = Refusing()
    batcher = SpanBatcher(exporter, env={})
    try:
        _traced(batcher)
        _spans(3)
        assert batcher.force_flush(5000)
    finally:
        use_tracer_provider(None)
        batcher.shutdown()
    assert (batcher.exported, batcher.failed) == (0, 3)


def test_a_forked_child_exports_its_own_spans_with_a_worker_of_its_own() -> None:
    import os

    exporter = Recording()
    batcher = SpanBatcher(exporter, env={"OTEL_BSP_SCHEDULE_DELAY": "86400000"})
    try:
        _traced(batcher)
        _spans(2, prefix="parent")  # queued in the parent, not yet exported
        pid = os.fork()
        if pid == 0:  # the child: only the forking thread survives
            code = 1
            try:
                _spans(1, prefix="child")
                flushed = batcher.force_flush(5000)
                names = [name for batch in exporter.batches for name in batch]
                code = 0 if flushed and names == ["child0"] else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert batcher.force_flush(5000)  # the parent's worker is untouched
    finally:
        use_tracer_provider(None)
        batcher.shutdown()
    assert [name for batch in exporter.batches for name in batch] == ["parent0", "parent1"]


def test_a_span_recorded_but_not_sampled_is_not_exported() -> None:
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class RecordOnly(Sampler):
        def should_sample(self, *args: object, **kwargs: object) -> SamplingResult:
            return SamplingResult(Decision.RECORD_ONLY)

        def get_description(self) -> str:
            return "record only"

    exporter = Recording()
    batcher = SpanBatcher(exporter, env={})
    provider = TracerProvider(sampler=RecordOnly())
    provider.add_span_processor(batcher)
    use_tracer_provider(provider)
    try:
        span = STATE.start_span("recorded", SpanKind.INTERNAL, {}, None, ())
        assert span.is_recording() and not span.get_span_context().trace_flags.sampled
        span.end()
        assert batcher.force_flush(5000)
    finally:
        use_tracer_provider(None)
        batcher.shutdown()
    assert exporter.batches == []


def test_a_jsonl_path_that_cannot_be_written_is_named_at_start(tmp_path: Path) -> None:
    # A directory dropped every span without a word; a parent that is a file was a traceback.
    from vapora.errors import ConfigError
    from vapora.telemetry.jsonl import JsonLinesSpanExporter

    with pytest.raises(ConfigError, match="is a directory"):
        JsonLinesSpanExporter(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="cannot make the directory"):
        JsonLinesSpanExporter(tmp_path / "afile" / "spans.jsonl")


def test_the_jsonl_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    # It holds prompts and completions when capture_content is on.
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from vapora.telemetry.jsonl import JsonLinesSpanExporter

    path = tmp_path / "spans.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    provider.get_tracer("t").start_span("s").end()
    provider.shutdown()
    assert path.stat().st_mode & 0o777 == 0o600
