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
    contract.BudgetPending,
    log.Event,
)


def export_schema() -> dict[str, Any]:
    """Build the schema document (pure: no I/O)."""
    refs, components = msgspec.json.schema_components(
        PUBLIC_MESSAGES, ref_template="#/$defs/{name}"
    )
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
    parser.add_argument("--out", type=Path, default=SCHEMA_PATH, help="file to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render_schema()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run `python -m events.schema`", file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(export_schema()['$defs'])} definitions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
