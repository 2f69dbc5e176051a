"""One JSON encoder and one typed decoder per message type, built once.

``decode`` raises :class:`DecodeError` whose message names the offending field in the words of the
contract (``$.max_tokens``), so actors can answer a bad message with a 400 that says what is wrong.
"""

from __future__ import annotations

import re
from decimal import Decimal
from functools import cache
from typing import Any, TypeVar

import msgspec

from events.log import Event

__all__ = [
    "MAX_MESSAGE_BYTES",
    "DecodeError",
    "decode",
    "decode_event",
    "decode_events",
    "decode_with",
    "encode",
    "event_tag",
    "plain_decimal",
]

T = TypeVar("T")

# Requests larger than this are refused before any parsing (a 10 MB blob of garbage costs nothing).
MAX_MESSAGE_BYTES = 1_048_576

_encoder = msgspec.json.Encoder(decimal_format="string")
_event_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)
_events_decoder: msgspec.json.Decoder[list[Event]] = msgspec.json.Decoder(list[Event])


class DecodeError(ValueError):
    """A message could not be decoded into its contract type; the text names the problem."""


def encode(message: Any) -> bytes:
    """Encode any contract message or event to JSON bytes, money as decimal strings in plain
    digits (``"0.000000225"``): Python's ``str`` of a decimal below a millionth, or of a zero
    with a long exponent, is in scientific notation (``"2.25E-7"``, ``"0E-7"``), which decimal
    parsers of other languages refuse (before 2026-11-27 it went out so)."""
    data = _encoder.encode(message)
    # (A one-byte find first: ``in`` of two bytes took 0.7 µs per event, every event.)
    if data.find(b"E") >= 0 and (b"E-" in data or b"E+" in data):  # such a decimal, perhaps
        plain = _plain_decimals(msgspec.to_builtins(message, builtin_types=(Decimal,)))
        return _encoder.encode(plain)
    return data


def plain_decimal(amount: Decimal) -> str:
    """``amount`` as the wire writes it: plain digits, never an exponent (:func:`encode`)."""
    text = str(amount)
    return format(amount, "f") if "E" in text else text


def _plain_decimals(value: Any) -> Any:
    if type(value) is Decimal:
        return plain_decimal(value)
    if isinstance(value, dict):
        return {key: _plain_decimals(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_decimals(item) for item in value]
    return value


@cache
def _decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type_)


def decode(data: bytes, type_: type[T], *, max_bytes: int = MAX_MESSAGE_BYTES) -> T:
    """Decode ``data`` as ``type_``; raise :class:`DecodeError` naming the field on any problem."""
    if len(data) > max_bytes:
        raise DecodeError(f"message is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        return _decoder(type_).decode(data)  # type: ignore[no-any-return, arg-type]
    except msgspec.ValidationError as exc:
        raise DecodeError(_describe(exc)) from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(_malformed(exc, data)) from exc
    except UnicodeDecodeError as exc:
        raise DecodeError(_not_utf8(exc)) from exc
    except RecursionError as exc:
        raise DecodeError("malformed JSON: nested too deeply") from exc


# A \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or a low one alone: no character.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<![0-9a-fA-F]{2})(?<!\\u[dD][89abAB])\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def _malformed(exc: msgspec.DecodeError, data: bytes) -> str:
    """msgspec's reason, or a plainer one where it misleads: a lone UTF-16 surrogate escape
    (``"\\ud800"``) is reported as "Input data was truncated"."""
    if "truncated" in str(exc):
        lone = _LONE_SURROGATE.search(data)
        # Said only when it is the reason: the body reads once each such escape is replaced
        # (a body cut short that merely holds the text "\\ud800" is still cut short).
        if lone is not None and _reads(_LONE_SURROGATE.sub(rb"\\ufffd", data)):
            escape = lone.group().decode()
            return f"malformed JSON: {escape} is half of a UTF-16 surrogate pair, not a character"
    return f"malformed JSON: {exc}"


def _reads(data: bytes) -> bool:
    try:
        msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def decode_event(data: bytes) -> Event:
    """Decode one event of the log (any type of the union)."""
    try:
        return _event_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError(_describe(exc)) from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError(_not_utf8(exc)) from exc


def decode_events(data: bytes) -> list[Event]:
    """Decode a JSON array of events (used to decode a replayed batch in one call)."""
    return decode_with(_events_decoder, data)


def decode_with(decoder: msgspec.json.Decoder[T], data: bytes) -> T:
    """Decode ``data`` with a prebuilt ``decoder`` (e.g. of a batch of partial event views),
    raising :class:`DecodeError` naming the field on any problem."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError(_describe(exc)) from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError(_not_utf8(exc)) from exc


def event_tag(event: msgspec.Struct) -> str:
    """The ``type`` tag of an event or tagged message (``"spend_recorded"`` …)."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str), f"{type(event).__name__} is not a tagged message"
    return tag


def _not_utf8(exc: UnicodeDecodeError) -> str:
    # msgspec's position is within the string it was reading, not the message.
    return f"malformed JSON: a string holds bytes that are not UTF-8 ({exc.reason})"


def _describe(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    # msgspec wraps errors raised in __post_init__ as "<message> - at `$`"; keep its path hint.
    return text or "invalid message"
