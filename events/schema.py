"""JSON Schema export of every public message, for services written in other languages.

``python -m events.schema`` (or ``vapora schema``) writes ``events/schemas/vapora.schema.json``;
``--check`` exits 1 when the checked-in file is stale. The file is one JSON Schema 2020-12
document whose ``$defs`` hold every request, reply, stream message and event.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from events import contract, log

__all__ = ["PUBLIC_MESSAGES", "SCHEMA_PATH", "export_schema", "main", "render_schema"]

SCHEMA_PATH = Path(__file__).parent / "schemas" / "vapora.schema.json"

PUBLIC_MESSAGES: tuple[Any, ...] = (
    contract.CompletionRequest,
    contract.CompletionResult,
    contract.StreamChunk,
    contract.StreamEnd,
    contract.StreamError,
    contract.StreamCancel,
    contract.ErrorReply,
    contract.ReportRequest,
    contract.CostReport,
    contract.BudgetStatusRequest,
    contract.BudgetStatus,
    contract.ProviderCall,
    contract.ProviderCallResult,
    contract.BudgetReserve,
    contract.BudgetReserveReply,
    contract.BudgetRelease,
    contract.BudgetLeaseRequest,
    contract.BudgetLeaseReply,
    contract.BudgetLeaseReturn,
    contract.BudgetCapsRequest,
    contract.BudgetCaps,
    contract.BudgetPending,
    contract.AttemptsUnbilled,
    log.Event,
)


#: A decimal string, as msgspec describes a ``Decimal`` field.
_DECIMAL_STRING = {"type": "string", "format": "decimal"}
#: A decimal string's digits, plain or scientific, not negative (a negative zero is zero).
_DIGITS = "([0-9]+(\\.[0-9]*)?|\\.[0-9]+)([eE][+-]?[0-9]+)?"
_AMOUNT_PATTERN = f"^(\\+?{_DIGITS}|-(0+(\\.0*)?|\\.0+)([eE][+-]?[0-9]+)?)$"
#: "Holds a character that is not whitespace", whitespace as Python's ``str.strip`` takes it
#: (what vapora checks), spelt out: ``\\S`` differs between regex dialects (JavaScript's
#: takes U+001C-U+001F and U+0085 as text, U+FEFF as space).
_TEXT = "[^" + "".join(f"\\u{ord(c):04x}" for c in map(chr, range(0x10000)) if c.isspace()) + "]"
#: What a request's amount in cents (``budget_cents``) may be: a decimal string or a JSON number
#: (the decoder takes both, a number read from its text, never through a float; contract.md:
#: ``"2.5"`` or ``2.5``). Amounts in USD are described as strings (DESIGN: never a float).
_AMOUNT_IN = {
    "anyOf": [
        # Plain or scientific decimal digits, not negative (vapora's decoder also takes
        # Python's laxer forms, `1_000` or ` 5 `; a portable client should not send them).
        {**_DECIMAL_STRING, "pattern": _AMOUNT_PATTERN},
        {"type": "number", "minimum": 0, "maximum": int(contract.MAX_AMOUNT)},
    ]
}
#: A task id a request may name (``contract.check_task_id``): 1 to 200 characters, none of them
#: a control character (C0, C1, DEL, U+2028, U+2029).
_TASK_ID_IN = {
    "type": "string",
    "minLength": 1,
    "maxLength": contract.MAX_ID_LENGTH,
    "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*$",
}


def _requests_as_decoded(components: dict[str, Any]) -> None:
    """Tighten or widen the requests' schemas to what their decoding takes, where msgspec's
    schema cannot say it (its checks in ``__post_init__``; a ``Decimal`` read from a number)."""
    for message in PUBLIC_MESSAGES:
        if not (isinstance(message, type) and issubclass(message, contract._Message)):
            continue
        properties = components[message.__name__]["properties"]
        for name, field in properties.items():
            amounts: list[Any] = _AMOUNT_IN["anyOf"]
            if field == _DECIMAL_STRING:
                properties[name] = {"anyOf": list(amounts)}
            elif field.get("anyOf") and _DECIMAL_STRING in field["anyOf"]:  # optional: | null
                field["anyOf"] = [
                    choice
                    for f in field["anyOf"]
                    for choice in (amounts if f == _DECIMAL_STRING else [f])
                ]
    request = components["CompletionRequest"]
    fields = request["properties"]
    fields["task_id"] = {"anyOf": [_TASK_ID_IN, {"type": "null"}], "default": None}
    for choice in fields["messages"]["anyOf"]:
        if choice.get("type") == "array":
            choice["minItems"] = 1
            # Some text in one of them (all blank: nothing to answer, a 400).
            choice["contains"] = {"properties": {"content": {"pattern": _TEXT}}}
    for choice in fields["prompt"]["anyOf"]:
        if choice.get("type") == "string":
            choice["pattern"] = _TEXT  # some text, not only whitespace
    # Exactly one of `prompt` or `messages` (a null one is none).
    request["oneOf"] = [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]


def export_schema() -> dict[str, Any]:
    """Build the schema document (pure: no I/O)."""
    refs, components = msgspec.json.schema_components(
        PUBLIC_MESSAGES, ref_template="#/$defs/{name}"
    )
    _requests_as_decoded(components)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://vapora.dev/schemas/vapora.schema.json",
        "title": "vapora wire contract",
        "description": "Requests, replies, stream messages and log events of vapora (DESIGN §3).",
        "$defs": components,
        "properties": {"event": refs[-1]},
    }


def render_schema() -> str:
    """The schema as the exact text that is checked in."""
    return json.dumps(export_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vapora schema", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=_file, default=SCHEMA_PATH, help="file to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render_schema()
    if args.check:
        if not args.out.exists():  # said "is stale" as if it were there
            print(f"{args.out} is missing: run `python -m events.schema`", file=sys.stderr)
            return 1
        try:
            current = args.out.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"vapora schema: cannot read {args.out}: {_why(exc)}", file=sys.stderr)
            return 1
        if current != text:
            print(f"{args.out} is stale: run `python -m events.schema`", file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"vapora schema: cannot write {args.out}: {_why(exc)}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({len(export_schema()['$defs'])} definitions)")
    return 0


def _file(text: str) -> Path:
    """``--out``: a file's path (an empty one named the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


def _why(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


if __name__ == "__main__":
    raise SystemExit(main())
