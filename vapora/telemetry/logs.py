"""Structured log lines: every line says which task and which trace it belongs to.

Actors set :data:`TASK_ID` when they start handling a task (each handler runs in its own task,
so the value never leaks to another); :class:`TaskContextFilter` adds ``task_id`` and
``trace_id`` (the current span's, ``-`` when none) to every record, and :data:`FORMAT` prints
them. Each routing decision (or refusal), each fallback and each budget tier change is one
INFO line.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

from vapora.telemetry.context import current_span

__all__ = [
    "FORMAT",
    "TASK_ID",
    "CleanFilter",
    "HeaderValueFilter",
    "TaskContextFilter",
    "clean",
    "install",
    "printable",
]

TASK_ID: ContextVar[str | None] = ContextVar("vapora_task_id", default=None)

_MAX_TASK_ID = 200  # the contract's longest task id

FORMAT = "%(asctime)s %(levelname)s %(name)s task=%(task_id)s trace=%(trace_id)s: %(message)s"


#: What must not reach a log line or a terminal as it is: control characters (a newline that
#: starts a line of its own, a carriage return, an escape sequence) and the Unicode line and
#: paragraph separators. A tab stays.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    return _NAMED.get(char) or f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): a provider's error
    message, an event's field, quoted in a log line or on a terminal, cannot write a line of
    its own (a forged log line) or move the cursor."""
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


#: A URL's query in a log line (``/v1/traces?api_key=...``: urllib3 quotes the URL it failed
#: to reach, an OTLP endpoint's token with it).
_QUERY = re.compile(r"(?<=[?&])([^\s#'\"<>()=?&]+)=[^\s&#'\"<>()]*")


def _masked_query(match: re.Match[str]) -> str:
    return match[1] + "=***"


def clean(record: logging.LogRecord) -> None:
    """``record``'s message with its control characters escaped (:func:`printable`: a
    provider's error message, logged with a fallback, wrote whole fake lines into the log, a
    review) and the values of any URL query in it masked (a collector's token in an OTLP
    endpoint's query, quoted by urllib3 on each failed export, a review)."""
    try:
        message = record.getMessage()
    except Exception:  # a bad logging call: the handler says so when it formats the record
        return
    cleaned = _QUERY.sub(_masked_query, message) if "?" in message else message
    if _CONTROL.search(cleaned):
        cleaned = printable(cleaned)
    if cleaned is not message:
        record.msg, record.args = cleaned, ()


class CleanFilter(logging.Filter):
    """:func:`clean` on each record of a handler; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        clean(record)
        return True


class TaskContextFilter(logging.Filter):
    """Adds ``task_id`` and ``trace_id`` to each record (``-`` when unknown), and cleans its
    message (:func:`clean`); never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        clean(record)
        task_id = TASK_ID.get() or "-"
        if len(task_id) > _MAX_TASK_ID or not task_id.isprintable():
            # A task id from an event anyone could append (requests refuse such ids): escaped,
            # so that a newline in it cannot write a line of its own, and cut short.
            task_id = repr(task_id[:_MAX_TASK_ID]) + ("..." if len(task_id) > _MAX_TASK_ID else "")
        record.task_id = task_id
        span_context = current_span().get_span_context()
        record.trace_id = f"{span_context.trace_id:032x}" if span_context.is_valid else "-"
        return True


class HeaderValueFilter(logging.Filter):
    """The OpenTelemetry SDK logs a malformed ``OTEL_EXPORTER_OTLP_*HEADERS`` entry whole, and
    such an entry is usually ``Authorization: Bearer <token>`` (a colon for the ``=``): its
    record keeps the message and loses the entry."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = str(record.msg).replace(": %s", "") + " (the entry is not shown)"
            record.args = ()
        return True


#: The SDK's logger that quotes header entries (``opentelemetry.util.re``).
_HEADER_LOGGER = "opentelemetry.util.re"


def install(root: logging.Logger | None = None) -> None:
    """Give every handler of ``root`` (default: the root logger) the filter and the format, and
    keep OTLP header values out of the SDK's log (:class:`HeaderValueFilter`)."""
    headers = logging.getLogger(_HEADER_LOGGER)
    if not any(isinstance(f, HeaderValueFilter) for f in headers.filters):
        headers.addFilter(HeaderValueFilter())
    root = root or logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, TaskContextFilter) for f in handler.filters):
            handler.addFilter(TaskContextFilter())
        handler.setFormatter(logging.Formatter(FORMAT))
