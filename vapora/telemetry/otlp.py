"""OTLP/HTTP span export with a direct protobuf encoder.

The SDK's OTLP exporter builds a tree of protobuf message objects for every batch and groups the
spans by ``Resource``, which hashes by serialising its attributes to JSON, once per span. That
costs about 26 µs per span, in the exporter's thread but under the GIL, more than making the
span. :func:`encode_spans` writes the same ``ExportTraceServiceRequest`` bytes directly (the
protobuf wire format of ``opentelemetry/proto/trace/v1/trace.proto``), grouping by identity and
reusing the encoding of attributes that repeat from span to span (the subject, the consumer
group, the provider ...). The tests decode its output with the official protobuf classes and
compare it with the SDK's encoder, field by field.

:class:`OtlpSpanExporter` is the SDK's ``OTLPSpanExporter`` (its HTTP session, retries,
compression, headers, timeouts and ``OTEL_EXPORTER_OTLP_*`` variables) with only the encoding
replaced. If the SDK's exporter ever lacks the internals it uses, it exports as the SDK does.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

from vapora.telemetry.spans import VaporaSpan

__all__ = ["OtlpSpanExporter", "encode_spans"]

log = logging.getLogger("vapora.telemetry")

_LEN, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5
_double = struct.Struct("<d").pack
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
# Span.flags: the context's is-remote bit is known (0x100), and set when remote (0x200).
_FLAGS_LOCAL = b"\x85\x01" + _fixed32(0x100)
_FLAGS_REMOTE = b"\x85\x01" + _fixed32(0x300)


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 in two's complement: ten bytes
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


_LEN_TAGS = [_tag(field, _LEN) for field in range(16)]
_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _field(field: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes or an embedded message), field number < 16."""
    size = len(payload)
    return _LEN_TAGS[field] + (_ONE_BYTE[size] if size < 0x80 else _varint(size)) + payload


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message's bytes (as the SDK encodes it: bool before int)."""
    if isinstance(value, bool):
        return _tag(2, _VARINT) + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _field(1, value.encode())
    if isinstance(value, int):
        return _tag(3, _VARINT) + _varint(value)
    if isinstance(value, float):
        return _tag(4, _FIXED64) + _double(value)
    if isinstance(value, bytes):
        return _field(7, value)
    if isinstance(value, Sequence):
        return _field(5, b"".join(_field(1, _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(6, b"".join(_field(1, _key_value(str(k), v)) for k, v in value.items()))
    if value is None:
        return b""
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _key_value(key: str, value: Any) -> bytes:
    return _field(1, key.encode()) + _field(2, _any_value(value))


def _string_array(values: Sequence[str]) -> bytes:
    """``AnyValue.array_value`` of strings (event ids, event types), each element written out
    here: ``ArrayValue.values`` (field 1) holding ``AnyValue.string_value`` (field 1)."""
    parts = []
    for value in values:
        text: bytes = value.encode()
        size = len(text)
        if size < 0x7E:
            parts.append(b"\x0a" + _ONE_BYTE[size + 2] + b"\x0a" + _ONE_BYTE[size] + text)
        else:
            parts.append(_field(1, _field(1, text)))
    return _field(5, b"".join(parts))


class _Key:
    """One attribute key's encodings: the key's own bytes, and its values' encodings until the
    key proves to have many (then ``values`` is None and each value is encoded when seen)."""

    __slots__ = ("field", "key", "tag", "values")

    def __init__(self, field: int, key: str) -> None:
        self.field = field
        self.tag = _LEN_TAGS[field]
        self.key = _field(1, key.encode())
        self.values: dict[Any, bytes] | None = {}

    def remembered(self, value: Any) -> bytes:
        """``value``'s ``KeyValue``, remembered until the key has had
        :attr:`_Attributes.VALUES_PER_KEY` different values. A string is its own cache key;
        other values go with their type (True == 1 == 1.0, but they encode differently), a list
        or tuple with its items' (a string never equals such a tuple, nor a value's a list's)."""
        values = self.values
        if values is None:
            return self.encode(value)
        kind = type(value)
        if kind is str:
            cached: Any = value
        elif kind is list or kind is tuple:
            cached = tuple((type(v), v) for v in value)
        else:
            cached = (kind, value)
        try:
            encoded = values.get(cached)
        except TypeError:  # unhashable (a dict): not an OpenTelemetry attribute value
            return self.encode(value)
        if encoded is None:
            encoded = self.encode(value)
            if len(values) >= _Attributes.VALUES_PER_KEY:
                self.values = None
            else:
                values[cached] = encoded
        return encoded

    def encode(self, value: Any) -> bytes:
        kind = type(value)
        if kind is str:  # the usual many-valued one (ids): the fields written out here
            text: bytes = value.encode()
            size = len(text)
            if size < 0x7E:  # every length below fits one byte
                inner = b"\x0a" + _ONE_BYTE[size] + text  # AnyValue.string_value
                pair = self.key + b"\x12" + _ONE_BYTE[size + 2] + inner
                return self.tag + _varint(len(pair)) + pair
        elif (kind is list or kind is tuple) and all(type(v) is str for v in value):
            return _field(self.field, self.key + _field(2, _string_array(value)))
        elif kind is int:
            inner = b"\x18" + _varint(value)  # AnyValue.int_value
            pair = self.key + b"\x12" + _ONE_BYTE[len(inner)] + inner
            return self.tag + _varint(len(pair)) + pair
        return _field(self.field, self.key + _field(2, _any_value(value)))


class _Attributes:
    """Encodes ``KeyValue`` fields, remembering the encoding of each key's values until the key
    proves to have many (ids, timestamps, amounts: those are encoded each time)."""

    VALUES_PER_KEY = 256

    def __init__(self) -> None:
        self.fields: dict[int, dict[str, _Key]] = {}

    def encode(self, field: int, attributes: Mapping[str, Any] | None) -> bytes:
        if not attributes:
            return b""
        keys = self.fields.get(field)
        if keys is None:
            keys = self.fields[field] = {}
        parts = []
        for key, value in attributes.items():
            known = keys.get(key)
            if known is None:
                known = keys[key] = _Key(field, key)
            values = known.values
            if values is not None and type(value) is str:  # the usual hit, without a call
                encoded = values.get(value)
                if encoded is not None:
                    parts.append(encoded)
                    continue
            parts.append(known.remembered(value))
        return b"".join(parts)


def _trace_state(context: SpanContext) -> str | None:
    state = context.trace_state
    if state is None:
        return None
    return ",".join(f"{key}={value}" for key, value in state.items())


# Span.kind and Status.code fields by the API enum member (by identity: an enum member hashes in
# Python code); OTLP's span kinds start at 1, its status codes are the API's.
_KIND = {id(kind): b"\x30" + _varint(kind.value + 1) for kind in SpanKind}
_STATUS_CODE = {
    id(code): b"\x18" + _varint(code.value) if code.value else b"" for code in StatusCode
}
_UNSET_STATUS = b"\x7a\x00"  # field 15, an empty Status: the SDK always sends one


class _Encoder:
    NAMES = 1024

    def __init__(self) -> None:
        self.attributes = _Attributes()
        self.names: dict[str, bytes] = {}

    def _name(self, name: str) -> bytes:
        encoded = self.names.get(name)
        if encoded is None:
            encoded = _field(5, name.encode()) if name else b""
            if len(self.names) < self.NAMES:
                self.names[name] = encoded
        return encoded

    def span(self, span: ReadableSpan) -> bytes:
        if type(span) is VaporaSpan:
            return self.vapora_span(span)
        context = span.context
        assert context is not None
        parent = span.parent
        parts = [
            b"\x0a\x10",  # field 1, 16 bytes
            context.trace_id.to_bytes(16),
            b"\x12\x08",  # field 2, 8 bytes
            context.span_id.to_bytes(8),
        ]
        if context.trace_state:
            parts.append(_field(3, (_trace_state(context) or "").encode()))
        if parent is not None:
            parts.append(b"\x22\x08" + parent.span_id.to_bytes(8))  # field 4
        parts.append(self._name(span.name))
        parts.append(_KIND[id(span.kind)])
        if span.start_time:
            parts.append(b"\x39" + _fixed64(span.start_time))
        if span.end_time:
            parts.append(b"\x41" + _fixed64(span.end_time))
        parts.append(self.attributes.encode(9, span._attributes))
        if span.dropped_attributes:
            parts.append(b"\x50" + _varint(span.dropped_attributes))
        if span._events:
            parts.extend(_field(11, self.event(event)) for event in span._events)
            if span.dropped_events:
                parts.append(b"\x60" + _varint(span.dropped_events))
        if span._links:
            parts.extend(_field(13, self.link(link)) for link in span._links)
            if span.dropped_links:
                parts.append(b"\x70" + _varint(span.dropped_links))
        status = span.status
        if status.description or status.status_code is not StatusCode.UNSET:
            parts.append(_field(15, self.status(status)))
        else:
            parts.append(_UNSET_STATUS)
        parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
        return b"".join(parts)

    def vapora_span(self, span: VaporaSpan) -> bytes:
        """:meth:`span` for vapora's own spans: their fields read directly (nothing is ever
        dropped from them, their attributes are a plain dict)."""
        context: Any = span._context
        parent = span._parent
        trace_state = context[4]
        head = b"\x0a\x10" + context[0].to_bytes(16) + b"\x12\x08" + context[1].to_bytes(8)
        if trace_state:
            head += _field(3, (_trace_state(context) or "").encode())
        if parent is not None:
            head += b"\x22\x08" + parent[1].to_bytes(8)  # field 4: the parent's span id
        name = self.names.get(span._name) or self._name(span._name)
        parts = [head, name, _KIND[id(span._kind)]]
        if span._start_time:
            parts.append(b"\x39" + _fixed64(span._start_time))
        if span._end_time:
            parts.append(b"\x41" + _fixed64(span._end_time))
        parts.append(self.attributes.encode(9, span._attributes))
        if span._events:
            parts.extend(_field(11, self.event(event)) for event in span._events)
        if span._links:
            parts.extend(_field(13, self.link(link)) for link in span._links)
        status = span._status
        if status.description or status.status_code is not StatusCode.UNSET:
            parts.append(_field(15, self.status(status)))
        else:
            parts.append(_UNSET_STATUS)
        parts.append(_FLAGS_REMOTE if parent is not None and parent[2] else _FLAGS_LOCAL)
        return b"".join(parts)

    def event(self, event: Any) -> bytes:
        parts = []
        if event.timestamp:
            parts.append(b"\x09" + _fixed64(event.timestamp))
        if event.name:
            parts.append(_field(2, event.name.encode()))
        parts.append(self.attributes.encode(3, event.attributes))
        if event.dropped_attributes:
            parts.append(b"\x20" + _varint(event.dropped_attributes))
        return b"".join(parts)

    def link(self, link: Any) -> bytes:
        context = link.context
        parts = [
            b"\x0a\x10" + context.trace_id.to_bytes(16),
            b"\x12\x08" + context.span_id.to_bytes(8),
        ]
        parts.append(self.attributes.encode(4, link.attributes))
        if link.dropped_attributes:
            parts.append(b"\x28" + _varint(link.dropped_attributes))
        parts.append(b"\x35" + _fixed32(0x300 if context.is_remote else 0x100))
        return b"".join(parts)

    @staticmethod
    def status(status: Status) -> bytes:
        message = _field(2, status.description.encode()) if status.description else b""
        return message + _STATUS_CODE[id(status.status_code)]

    def scope(self, scope: Any) -> bytes:
        if scope is None:
            return b""
        parts = []
        if scope.name:
            parts.append(_field(1, scope.name.encode()))
        if scope.version:
            parts.append(_field(2, scope.version.encode()))
        parts.append(self.attributes.encode(3, scope.attributes))
        return b"".join(parts)

    def request(self, spans: Sequence[ReadableSpan]) -> bytes:
        # Resource -> scope -> spans, grouped by identity (a process has one of each).
        groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
        for span in spans:
            resource, scope = span.resource, span.instrumentation_scope or None
            scopes = groups.setdefault(id(resource), (resource, {}))[1]
            scopes.setdefault(id(scope), (scope, []))[1].append(self.span(span))
        out = []
        for resource, scopes in groups.values():
            body = [_field(1, self.attributes.encode(1, resource.attributes))]
            for scope, encoded in scopes.values():
                scope_spans = [_field(1, self.scope(scope))]
                scope_spans.extend(_field(2, s) for s in encoded)
                if scope is not None and scope.schema_url:
                    scope_spans.append(_field(3, scope.schema_url.encode()))
                body.append(_field(2, b"".join(scope_spans)))
            if resource.schema_url:
                body.append(_field(3, resource.schema_url.encode()))
            out.append(_field(1, b"".join(body)))
        return b"".join(out)


def encode_spans(spans: Sequence[ReadableSpan], encoder: _Encoder | None = None) -> bytes:
    """The serialised ``ExportTraceServiceRequest`` of ``spans`` (see the module doc)."""
    return (encoder or _Encoder()).request(spans)


# A credential provider gives the SDK an authenticated ``requests`` session; a proxy set in the
# environment is honoured by ``requests`` and not by urllib3's pool. (CA bundles matter for HTTPS
# only, which keeps ``requests`` anyway.)
_KEEP_REQUESTS = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


def _endpoint(kwargs: Mapping[str, Any]) -> str:
    """The traces endpoint the SDK's exporter will use (argument, then the environment)."""
    endpoint = kwargs.get("endpoint") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if endpoint:
        return str(endpoint)
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    return f"{base.rstrip('/')}/v1/traces"


def _urllib3_transport(kwargs: Mapping[str, Any]) -> Any:
    """The exporter package's urllib3 transport for a plain-HTTP collector (an agent or a
    collector next to the process): a POST costs half the CPU of one through ``requests``
    (0.36 ms against 0.76 ms for a batch of 512 spans here). None, and the SDK's ``requests``
    transport, for HTTPS (its certificate handling stays the SDK's), when a credential provider
    or a proxy is set in the environment, or when the transport is not installed."""
    if any(os.environ.get(name) for name in _KEEP_REQUESTS):
        return None
    if not _endpoint(kwargs).lower().startswith("http://"):
        return None
    try:
        from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
    except ImportError:
        return None
    try:
        return Urllib3HTTPTransport()
    except Exception:  # an exporter package whose transport changed: the SDK's default
        log.debug("telemetry: the urllib3 transport could not be made; using requests")
        return None


class OtlpSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter with :func:`encode_spans` as its encoder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not args and not kwargs.keys() & {"_transport", "session"}:
            transport = _urllib3_transport(kwargs)
            if transport is not None:
                kwargs["_transport"] = transport
        super().__init__(*args, **kwargs)
        self._encoder = _Encoder()
        internals = ("_client", "_metrics", "_max_request_size", "_shutdown")
        self._direct = all(hasattr(self, name) for name in internals)
        if not self._direct:
            log.debug("telemetry: the SDK's OTLP exporter changed shape; it encodes the spans")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self._direct:
            return super().export(spans)
        if self._shutdown:
            return super().export(spans)  # warns and fails as the SDK does
        with self._metrics.export_operation(len(spans)) as result:
            try:
                data = self._encoder.request(spans)
            except Exception as error:
                log.error("Failed to encode span batch: %s", error)
                result.error = error
                return SpanExportResult.FAILURE
            if 0 < self._max_request_size < len(data):
                log.warning(
                    "Dropping span batch: serialized size %d bytes exceeds max_request_size %d",
                    len(data),
                    self._max_request_size,
                )
                return SpanExportResult.FAILURE
            sent = self._client.export(data)
            if not sent.success:
                result.error = sent.error
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
