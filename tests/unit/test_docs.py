"""The documentation names what the code has: every event type is in the catalogue, every CLI
command is in the README, every config key in the configuration page, every error code in the
contract."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import msgspec

from actors.service import Overloaded
from events import EVENT_TYPES
from vapora import errors
from vapora.cli import _parser
from vapora.config import _ConfigFile
from vapora.deploy import _ACTOR_SUBSCRIBE, _SERVES, permissions

ROOT = Path(__file__).parent.parent.parent


def test_every_event_type_is_in_the_catalogue() -> None:
    catalogue = (ROOT / "docs" / "events.md").read_text()
    for tag in EVENT_TYPES:
        assert f"| `{tag}` |" in catalogue, f"docs/events.md does not describe {tag}"


def test_every_cli_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"`vapora {name}" in readme, f"README does not show `vapora {name}`"


def _keys(struct: type[msgspec.Struct]) -> set[str]:
    """Every key a config file may hold under ``struct``, nested sections included."""
    keys = set()
    for field in msgspec.structs.fields(struct):
        keys.add(field.encode_name)
        kind = field.type
        for candidate in (kind, *typing.get_args(kind)):
            for inner in (candidate, *typing.get_args(candidate)):
                if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
                    keys |= _keys(inner)
    return keys


def test_every_config_key_is_in_the_configuration_page() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    sections = {field.encode_name for field in msgspec.structs.fields(_ConfigFile)}
    for section in sections:
        assert f"[{section}]" in page, f"docs/configuration.md has no [{section}] section"
    for key in sorted(_keys(_ConfigFile) - sections):
        assert f"`{key}`" in page, f"docs/configuration.md does not describe `{key}`"


def test_every_error_code_is_in_the_contract_page() -> None:
    contract = (ROOT / "docs" / "contract.md").read_text()
    codes = {
        c.code
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.VaporaError)
    }
    for code in sorted(codes | {Overloaded.code}):
        assert f"`{code}`" in contract, f"docs/contract.md does not name the error `{code}`"


def test_the_permission_table_is_what_the_generated_accounts_allow() -> None:
    # The table missed the subjects two later features added (a stream's cancel, the provider
    # actors' pending spend): an operator writing their own accounts from it broke both.
    text = (ROOT / "docs" / "operations-cluster.md").read_text()
    text = text[text.index("## 5. The permission model") :]
    text = text[: text.index("\n\n", text.index("| user |"))]  # the table
    rules = permissions()
    for user in ("client", "router", "provider", "budget", "ledger"):
        [row] = [line for line in text.splitlines() if line.startswith(f"| `{user}`")]
        cells = row.split("|")[2:4]
        published, subscribed = (set(re.findall(r"`([^`]+)`", cell)) for cell in cells)
        shared = ("$JS", "_INBOX", "$SRV")  # every actor's, in the paragraph under the table
        own = {subject for subject in rules[user].publish if not subject.startswith(shared)}
        if user == "client":
            receives = {"_INBOX.client.>", "_INBOX.NAME.>"}
        else:
            receives = {*_SERVES[user], f"_INBOX.{user}.>", *_ACTOR_SUBSCRIBE}
        assert published == own, (user, published ^ own)
        assert subscribed == receives, (user, subscribed ^ receives)
