"""The wire contract: events round-trip, golden payloads hold, requests are validated, and the
checked-in JSON Schema is current."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from events import (
    EVENT_TYPES,
    CompletionRequest,
    CompletionResult,
    DecodeError,
    ErrorBody,
    ErrorReply,
    ProviderHealthChanged,
    SpendRecorded,
    StreamChunk,
    StreamEnd,
    StreamError,
    StreamMessage,
    TaskType,
    Usage,
    decode,
    decode_event,
    decode_events,
    encode,
    event_tag,
    subjects,
)
from events.schema import SCHEMA_PATH, render_schema
from tests.samples import EVENTS

GOLDEN = Path(__file__).parent.parent / "golden" / "events"


def test_every_event_type_has_a_sample_and_a_golden_payload() -> None:
    assert set(EVENTS) == set(EVENT_TYPES)
    assert {p.stem for p in GOLDEN.glob("*.json")} == set(EVENT_TYPES)


@pytest.mark.parametrize("tag", sorted(EVENT_TYPES))
def test_event_round_trips(tag: str) -> None:
    event = EVENTS[tag]
    decoded = decode_event(encode(event))
    assert decoded == event
    assert type(decoded) is EVENT_TYPES[tag]
    assert event_tag(decoded) == tag


@pytest.mark.parametrize("tag", sorted(EVENT_TYPES))
def test_golden_payload_decodes_and_encodes_byte_for_byte(tag: str) -> None:
    golden = (GOLDEN / f"{tag}.json").read_bytes().rstrip(b"\n")
    event = decode_event(golden)
    assert event == EVENTS[tag]
    assert encode(event) == golden


def test_a_health_event_written_before_instances_were_named_still_decodes() -> None:
    """``provider_health_changed`` gained ``instance`` (an extension): the payload as it was
    written before decodes, with no instance."""
    before = (
        b'{"type":"provider_health_changed","id":"ev-health-1","at":"2026-03-31T23:59:58.123456Z",'
        b'"causation_id":null,"provider":"claude","available":false,"reason":"rate limited: '
        b'retry-after 30 s","breaker":"closed","rate_limited_until":"2026-04-01T00:00:28Z",'
        b'"latency_estimate_ms":780.0}'
    )
    event = decode_event(before)
    assert isinstance(event, ProviderHealthChanged) and event.instance is None
    assert event == msgspec.structs.replace(EVENTS["provider_health_changed"], instance=None)


def test_money_is_a_decimal_string_on_the_wire() -> None:
    payload = json.loads(encode(EVENTS["spend_recorded"]))
    assert payload["cost_usd"] == "0.006150"
    assert payload["price"]["cache_write_per_mtok"] == "3.75"
    assert isinstance(decode_event(encode(EVENTS["spend_recorded"])).cost_usd, Decimal)


def test_a_newer_event_with_an_unknown_field_still_decodes() -> None:
    payload = json.loads(encode(EVENTS["budget_released"]))
    payload["added_in_a_later_version"] = 1
    assert decode_event(json.dumps(payload).encode()) == EVENTS["budget_released"]


@pytest.mark.parametrize(
    ("tag", "path"),
    [
        ("spend_recorded", ("price",)),
        ("spend_recorded", ("price", "tiers", 0)),
        ("call_succeeded", ("usage",)),
        ("route_decided", ("decision",)),
        ("route_decided", ("decision", "candidates", 0)),
        ("route_decided", ("decision", "candidates", 0, "verdicts", 0)),
    ],
)
def test_a_newer_event_with_an_unknown_field_inside_it_still_decodes(
    tag: str, path: tuple[str | int, ...]
) -> None:
    # An older ledger read a newer writer's spend with a field added to its price as
    # unreadable, so its report and the audit missed money the keeper counted.
    payload = json.loads((GOLDEN / f"{tag}.json").read_bytes())
    if tag == "spend_recorded" and "tiers" in path:
        payload["price"]["tiers"] = [
            {
                "above_input_tokens": 200000,
                "input_per_mtok": "6",
                "output_per_mtok": "22.5",
                "cache_read_per_mtok": "0.6",
                "cache_write_per_mtok": "7.5",
            }
        ]
    expected = decode_event(json.dumps(payload).encode())
    part = payload
    for key in path:
        part = part[key]
    part["added_in_a_later_version"] = {"any": ["shape"]}
    assert decode_event(json.dumps(payload).encode()) == expected


@pytest.mark.parametrize(
    ("reply", "payload"),
    [
        (
            CompletionResult,
            {
                "task_id": "t",
                "provider": "claude",
                "model": "m",
                "text": "hi",
                "finish_reason": "stop",
                "usage": {"input_tokens": 3, "added_later": 1},
                "cost_usd": "0.1",
                "latency_ms": 1.0,
                "attempts": [],
                "route": {"reason": "score", "added_later": True},
                "added_later": "x",
            },
        ),
        (ErrorReply, {"error": {"code": "timeout", "message": "m", "added_later": 1}}),
        (StreamChunk, {"type": "chunk", "task_id": "t", "seq": 0, "text": "a", "added": 1}),
    ],
)
def test_a_reply_with_a_field_a_newer_vapora_added_still_decodes(
    reply: type, payload: dict[str, object]
) -> None:
    # A caller's client older than the router it asks reads what it knows of the reply.
    decoded = decode(json.dumps(payload).encode(), reply)
    assert isinstance(decoded, reply)


def test_a_request_with_an_unknown_field_inside_it_is_still_refused() -> None:
    body = b'{"messages": [{"role": "user", "content": "hi", "nmae": "x"}]}'
    with pytest.raises(DecodeError, match="nmae"):
        decode(body, CompletionRequest)


def test_an_unknown_event_type_is_a_clear_error() -> None:
    with pytest.raises(DecodeError, match="Invalid value 'budget_exploded'"):
        decode_event(b'{"type": "budget_exploded", "id": "x", "at": "2026-01-01T00:00:00Z"}')


def test_a_batch_of_events_decodes_in_order() -> None:
    batch = b"[" + b",".join(encode(e) for e in EVENTS.values()) + b"]"
    assert decode_events(batch) == list(EVENTS.values())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b'{"prompt": "hi", "temprature": 0.5}', "unknown field `temprature`"),
        (b'{"prompt": 42}', "at `$.prompt`"),
        (b'{"prompt": "hi", "max_tokens": 0}', "at `$.max_tokens`"),
        (b'{"prompt": "hi", "task_type": "Poetry"}', "at `$.task_type`"),
        (b'{"prompt": "hi", "quality": "Superb"}', "at `$.quality`"),
        (b'{"prompt": "hi", "complexity": 101}', "at `$.complexity`"),
        (b'{"prompt": "hi", "budget_cents": "-5"}', "`budget_cents` must be"),
        (b'{"prompt": "hi", "budget_cents": "1.' + b"1" * 60 + b'"}', "at most 50 significant"),
        (b'{"messages": [{"role": "user"}]}', "missing required field `content`"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "at `$.messages[0].role`"),
        (b'{"messages": []}', "`messages` must not be empty"),
        (b'{"prompt": ""}', "`prompt` must hold some text"),
        (b'{"prompt": " \\n\\t "}', "`prompt` must hold some text"),
        (b'{"messages": [{"role": "user", "content": " "}]}', "`messages` must hold some text"),
        (b'{"prompt": "hi \\ud800"}', "\\ud800 is half of a UTF-16 surrogate pair"),
        # a body cut short that holds the text \ud800 (an escaped backslash) is cut short
        (b'{"prompt": "const s = \\"\\\\ud800', "Input data was truncated"),
        (b"[" * 5000 + b"]" * 5000, "Expected `object`"),
        (b'{"prompt": "x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "messages[0]"),
        (b"{}", "exactly one of `prompt` or `messages`"),
        (b"[]", "Expected `object`"),
    ],
)
def test_invalid_requests_are_refused_naming_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as excinfo:
        decode(body, CompletionRequest)
    assert message in str(excinfo.value)


def test_an_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="limit is 1024 bytes"):
        decode(b" " * 2048, CompletionRequest, max_bytes=1024)


def test_request_defaults_follow_the_contract() -> None:
    request = decode(b'{"prompt": "hello"}', CompletionRequest)
    assert request.task_type == "GeneralQuery"
    assert request.quality == "Medium"
    assert request.task_id is None


def test_stream_messages_are_one_tagged_union() -> None:
    usage = Usage(input_tokens=3, output_tokens=4)
    chunk = StreamChunk(task_id="t", seq=0, text="he")
    error = StreamError(error=ErrorBody(code="timeout", message="slow"), usage=usage)
    for message in (chunk, error):
        assert decode(encode(message), StreamMessage) == message  # type: ignore[arg-type]
    assert json.loads(encode(chunk))["type"] == "chunk"
    assert "text" not in StreamEnd.__struct_fields__


@given(
    input_tokens=st.integers(0, 10**9),
    output_tokens=st.integers(0, 10**9),
    cost=st.decimals(min_value=0, max_value=10**6, allow_nan=False, places=12),
)
def test_spend_events_round_trip_exactly(
    input_tokens: int, output_tokens: int, cost: Decimal
) -> None:
    event = msgspec.structs.replace(
        EVENTS["spend_recorded"],
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost,
    )
    decoded = decode_event(encode(event))
    assert isinstance(decoded, SpendRecorded)
    assert decoded.cost_usd == cost
    assert str(decoded.cost_usd) == str(cost)


def test_event_subjects_separate_writers() -> None:
    assert subjects.event_subject("budget_reserved") == "vapora.events.budget"
    assert subjects.event_subject("spend_recorded", "claude") == "vapora.events.spend.claude"
    assert subjects.event_subject("call_failed", "openai") == "vapora.events.call.openai"
    assert subjects.event_subject("route_decided") == "vapora.events.route"
    assert subjects.provider_call("gemini") == "vapora.provider.gemini.call"


def test_checked_in_json_schema_is_current() -> None:
    assert SCHEMA_PATH.read_text() == render_schema(), "run `python -m events.schema`"


def test_json_schema_describes_every_event_and_request() -> None:
    defs = json.loads(SCHEMA_PATH.read_text())["$defs"]
    for cls in EVENT_TYPES.values():
        assert cls.__name__ in defs
    assert defs["CompletionRequest"]["additionalProperties"] is False
    assert set(defs["TaskType"]["enum"]) == {t.value for t in TaskType}


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi"},
        {"prompt": "hi", "budget_cents": 500},  # the README's example: a number
        {"prompt": "hi", "budget_cents": 2.5},
        {"prompt": "hi", "budget_cents": "2.5"},
        {"messages": [{"role": "user", "content": "hi"}], "task_id": "t-1"},
        {"prompt": "hi", "messages": None, "task_id": "x" * 200},
        {},  # neither prompt nor messages
        {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},  # both
        {"prompt": None, "messages": None},
        {"messages": []},
        {"prompt": "   \n "},  # only whitespace: nothing to answer
        {"prompt": "hi", "task_id": ""},
        {"prompt": "hi", "task_id": "x" * 201},
        {"prompt": "hi", "task_id": "a\nb"},
        {"prompt": "hi", "task_id": "a\u2028b"},
        {"prompt": "hi", "colour": "blue"},
        {"prompt": "hi", "max_tokens": 0},
        {"prompt": "hi", "budget_cents": True},
        {"messages": [{"role": "user", "content": "  "}, {"role": "system", "content": ""}]},
        {"messages": [{"role": "user", "content": " "}, {"role": "user", "content": "hi"}]},
        {"prompt": "hi", "budget_cents": -1},
        {"prompt": "hi", "budget_cents": "-1"},
        {"prompt": "hi", "budget_cents": "abc"},
        {"prompt": "hi", "budget_cents": "NaN"},
        {"prompt": "hi", "budget_cents": 1e16},
        {"prompt": "hi", "budget_cents": "1.5e3"},
        {"prompt": "hi", "budget_cents": "-0"},  # vapora.Client sends Decimal("-0") so
        {"prompt": "\u001c\u0085"},  # whitespace to Python (and vapora), not to JavaScript
        {"prompt": "\ufeff"},  # text to Python (and vapora), whitespace to JavaScript
        {"messages": [{"role": "user", "content": "\u001f"}]},
    ],
)
def test_the_json_schema_agrees_with_vapora_on_each_of_these_completion_requests(
    body: dict[str, object],
) -> None:
    """Services in other languages validate with the exported schema: it refused a number for
    ``budget_cents`` (the README's example) and took ``{}``, ``messages: []``, blank messages,
    a negative or non-numeric amount and a task id of any length or with a newline, all of which
    vapora answers with a 400. (A schema cannot say all vapora checks: an amount string's
    digits past 50 or its size past 10^15, and Python's lax decimal forms, are vapora's.)"""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(
        {"$defs": schema["$defs"], "$ref": "#/$defs/CompletionRequest"}
    )
    try:
        decode(json.dumps(body).encode(), CompletionRequest)
        taken = True
    except DecodeError:
        taken = False
    assert validator.is_valid(body) == taken, list(validator.iter_errors(body))


def test_json_nested_too_deeply_is_a_decode_error_not_a_recursion_error() -> None:
    """msgspec raises RecursionError for JSON nested past its limit where a type reads anything
    (events' free-form parts): an actor's handler took it for a bug of its own (500)."""
    from typing import Any

    with pytest.raises(DecodeError, match="nested too deeply"):
        decode(b"[" * 5000 + b"]" * 5000, Any)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("attempt", 10**30, "$.attempt"),
        ("attempt", 0, "$.attempt"),
        ("max_tokens", 2**70, "$.max_tokens"),
        ("max_tokens", 0, "$.max_tokens"),
        ("temperature", -3, "$.temperature"),
        ("temperature", 1e308, "$.temperature"),
        ("task_id", "", "task_id"),
        ("task_id", "x" * 300, "task_id"),
        ("task_id", "x\n2026-11-27 ERROR vapora.budget: forged", "control character"),
    ],
)
def test_a_provider_call_is_bounded_as_a_request_is(field: str, value: object, named: str) -> None:
    """Any sender on the embedded server may publish a provider call: ``attempt`` of 10**30 was
    written into the log and stopped the ledger for good, ``max_tokens`` of 2**70 was a 500,
    a negative temperature and a 300 KB task id went to the provider."""
    from events.contract import ProviderCall

    call = {"task_id": "t", "task_type": "GeneralQuery", "attempt": 1, "model": "m", "prompt": "p"}
    with pytest.raises(DecodeError, match=re.escape(named)):
        decode(json.dumps({**call, field: value}).encode(), ProviderCall)


@pytest.mark.parametrize("task_id", ["a\nb", "a\rb", "a\x00b", "a\x1b[31mb", "a\u2028b"])
def test_a_task_id_with_a_control_character_is_refused(task_id: str) -> None:
    """A task id is written into every log line of its task: a newline in it wrote a forged
    line of its own."""
    with pytest.raises(DecodeError, match="control character"):
        decode(json.dumps({"prompt": "p", "task_id": task_id}).encode(), CompletionRequest)


def test_an_event_with_a_count_past_a_stored_integer_does_not_decode() -> None:
    """``input_tokens`` of 2**64 decoded, and the ledger could not store it (see the ledger's
    test): such an event is unreadable, as any message that is no event."""
    payload = json.loads(encode(EVENTS["spend_recorded"]))
    payload["input_tokens"] = 2**63
    with pytest.raises(DecodeError, match="input_tokens"):
        decode_event(json.dumps(payload).encode())
    # An older version stored counts unbounded: one a SQLite integer holds is still read (its
    # spend would be dropped from the budget and the ledger on every replay).
    payload["input_tokens"] = 2**60
    assert decode_event(json.dumps(payload).encode()).input_tokens == 2**60  # type: ignore[union-attr]


@pytest.mark.parametrize("package", ["events", "actors", "vapora"])
def test_every_name_a_module_exports_is_there(package: str) -> None:
    """``from events import *`` failed on a name in ``__all__`` that was never imported
    (``BudgetPending``): every module's ``__all__`` names what it has."""
    import importlib
    import pkgutil

    root = importlib.import_module(package)
    found = [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")
        if not info.name.endswith("__main__")
    ]
    missing = [
        f"{module.__name__}.{name}"
        for module in [root, *found]
        for name in getattr(module, "__all__", ())
        if not hasattr(module, name)
    ]
    assert len(found) > 3 and not missing, missing


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("budget_reserved", "at"),
        ("budget_reserved", "expires_at"),
        ("budget_leased", "expires_at"),
        ("spend_recorded", "at"),
    ],
)
@pytest.mark.parametrize("when", ["9999-12-31T23:30:00-01:00", "0001-01-01T00:30:00+01:00"])
def test_an_event_time_outside_the_utc_years_is_refused_naming_it(
    name: str, field: str, when: str
) -> None:
    """Valid ISO 8601 past the year 9999 (or before the year 1) once in UTC: every reader that
    put it in UTC failed (the keeper's tail retried it for good). The event and the budget
    fold's view of it are unreadable, naming the field."""
    from vapora.budget_view import decode_view

    stored = json.loads(
        (Path(__file__).parents[1] / "golden" / "events" / f"{name}.json").read_text()
    )
    assert field in stored
    stored[field] = when
    data = json.dumps(stored).encode()
    with pytest.raises(DecodeError, match=f"`{field}` {re.escape(when)} is outside the years"):
        decode_event(data)
    with pytest.raises(DecodeError, match=f"`{field}` .* is outside the years"):
        decode_view(data)
    stored[field] = "9999-12-31T22:30:00-01:00"  # the last hour of the range: read
    decode_event(json.dumps(stored).encode())
