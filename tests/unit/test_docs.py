"""The documentation names what the code has: every event type is in the catalogue, every CLI
command is in the README."""

from __future__ import annotations

from pathlib import Path

from events import EVENT_TYPES
from vapora.cli import _parser

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
