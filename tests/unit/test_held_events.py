"""HeldEvents: a provider actor's held-back events mirrored on disk (actors/held.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors import held as held_module
from actors.held import HeldEvents
from events.codec import decode_event
from tests.samples import EVENTS

SPEND = EVENTS["spend_recorded"]
CALL = EVENTS["call_succeeded"]


def on_disk(path: Path) -> list[object]:
    return [decode_event(line) for line in path.read_bytes().splitlines()]


def _no_space(*args: object, **kw: object) -> Any:
    """A write the full disk refuses."""
    raise OSError(28, "No space left on device")


def _unlink_fails(
    monkeypatch: pytest.MonkeyPatch, which: Callable[[Path], bool], error: BaseException
) -> Callable[..., None]:
    """``Path.unlink`` raises ``error`` for the paths ``which`` picks (``SystemExit``: the
    process killed there); returns the real one, to put back."""
    unlink = Path.unlink

    def failing(path: Path, missing_ok: bool = False) -> None:
        if which(path):
            raise error
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", failing)
    return unlink


def _write_ahead(path: Path) -> bool:
    return path.name.startswith("inflight-")


def test_what_is_taken_leaves_the_file_and_the_rest_stays_locked(tmp_path: Path) -> None:
    held = HeldEvents(tmp_path, "provider-openai")
    assert held.hold([SPEND, CALL])
    assert on_disk(held.path) == [SPEND, CALL]
    held.taken(1)
    assert list(held) == [CALL] and on_disk(held.path) == [CALL]
    other = HeldEvents(tmp_path, "provider-openai")
    assert other.adopt() == 0 and not other  # the replaced file is locked as well
    held.taken(1)
    assert not held.path.exists()
    assert not list(tmp_path.iterdir())  # no staged file left either


def test_a_closed_instances_events_are_adopted_in_order(tmp_path: Path) -> None:
    first = HeldEvents(tmp_path, "provider-openai")
    first.hold([SPEND])
    first.hold([CALL])
    first.close()
    second = HeldEvents(tmp_path, "provider-openai")
    assert second.adopt() == 2
    assert list(second) == [SPEND, CALL]
    assert not first.path.exists() and on_disk(second.path) == [SPEND, CALL]
    second.close()


def test_a_directory_that_refuses_the_file_keeps_them_in_memory(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    held = HeldEvents(blocked, "provider-openai")
    assert not held.hold([SPEND])  # logged, not raised: the call's reply still goes out
    assert list(held) == [SPEND]
    held.taken(1)
    assert not held


class _FailingOnce:
    """The open file, whose next write fails (a full disk during the outage)."""

    def __init__(self, file: object) -> None:
        self.file = file
        self.failed = False

    def write(self, data: bytes) -> int:
        if not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        return self.file.write(data)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self.file, name)


def test_events_a_failed_write_missed_are_written_by_the_next_hold(tmp_path: Path) -> None:
    held = HeldEvents(tmp_path, "provider-openai")
    assert held.hold([SPEND])
    held._file = _FailingOnce(held._file)  # type: ignore[assignment]
    assert not held.hold([CALL])  # in memory only for now
    third = EVENTS["call_failed"]
    assert held.hold([third])  # the whole file written again
    assert on_disk(held.path) == [SPEND, CALL, third]
    held.close()


def test_events_a_failed_write_missed_are_written_at_the_stop(tmp_path: Path) -> None:
    """Kept on disk with one missing, the next start adopted less than was held."""
    held = HeldEvents(tmp_path, "provider-openai")
    assert held.hold([SPEND])
    held._file = _FailingOnce(held._file)  # type: ignore[assignment]
    assert not held.hold([CALL])
    held.close()
    successor = HeldEvents(tmp_path, "provider-openai")
    assert successor.adopt() == 2 and list(successor) == [SPEND, CALL]
    successor.close()


def _killed(held: HeldEvents) -> None:
    """What a SIGKILL leaves: the files as they are, their locks released."""
    for fd in (held._inflight,):
        if fd is not None:
            os.close(fd)
    held._inflight = None
    if held._file is not None:
        held._file.close()
        held._file = None


def test_events_on_their_way_when_the_process_died_are_adopted_and_done_ones_are_not(
    tmp_path: Path,
) -> None:
    first = HeldEvents(tmp_path, "provider-openai")
    first.begin([CALL])
    first.end([CALL])  # the log took it
    first.begin([SPEND])  # on its way when the process died
    live = HeldEvents(tmp_path, "provider-openai")
    assert live.adopt() == 0  # the first instance's file is locked while it lives
    _killed(first)
    second = HeldEvents(tmp_path, "provider-openai")
    assert second.adopt() == 1 and list(second) == [SPEND]
    assert not first.inflight_path.exists() and on_disk(second.path) == [SPEND]
    second.close()


def test_the_write_ahead_file_is_replaced_past_its_room_and_a_clean_stop_leaves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under steady load something is always on its way: a file emptied only when nothing is
    # would grow by every call's events for good.
    monkeypatch.setattr(held_module, "_INFLIGHT_ROOM", 100)
    held = HeldEvents(tmp_path, "provider-openai")
    held.begin([CALL])
    first = held.inflight_path
    held.begin([SPEND])  # past the room: the next begin starts a new file
    held.end([CALL])
    third = EVENTS["call_failed"]
    held.begin([third])
    assert held.inflight_path != first and not first.exists()
    assert on_disk(held.inflight_path) == [SPEND, third]  # only what is on its way
    held.end([SPEND])
    held.close()  # the third still on its way (a stop cut its append): the file stays
    other = HeldEvents(tmp_path, "provider-openai")
    assert other.adopt() == 1 and list(other) == [third]
    other.begin([CALL])
    other.end([CALL])
    other.close()
    assert not other.inflight_path.exists()


def test_events_the_log_took_are_not_appended_again_by_an_adopter(tmp_path: Path) -> None:
    # Their ids waited in memory for the next call's write: a kill first left them "on their
    # way", and an adopter a day later appended them again (the budget counted them twice).
    held = HeldEvents(tmp_path, "provider-openai")
    held.begin([CALL])
    held.end([CALL])  # nothing else on its way: said now
    held.begin([SPEND])
    held.end([SPEND])
    held.begin([EVENTS["call_failed"]])  # on its way when it died
    _killed(held)
    other = HeldEvents(tmp_path, "provider-openai")
    assert other.adopt() == 1 and list(other) == [EVENTS["call_failed"]]
    other.close()


@pytest.mark.parametrize("torn", [False, True])
def test_done_ids_survive_a_failed_write_and_a_torn_line_starts_a_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: bool
) -> None:
    held = HeldEvents(tmp_path, "provider-openai")
    later = EVENTS["call_failed"]
    held.begin([CALL])
    held.begin([SPEND])
    held.end([CALL])  # SPEND still on its way: CALL's id waits for the next write
    write = os.write
    calls: list[int] = []

    def full_disk(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1 and torn:
            return write(fd, data[:10])  # a line cut short, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    held.begin([later])  # fails: CALL's done id must not be forgotten
    monkeypatch.setattr(os, "write", write)
    held.end([SPEND])
    held.begin([EVENTS["budget_released"]])  # the torn file is replaced by a whole one
    _killed(held)
    other = HeldEvents(tmp_path, "provider-openai")
    adopted = other.adopt()
    assert [e.id for e in other] == [later.id, EVENTS["budget_released"].id], adopted
    other.close()


@pytest.mark.parametrize("then", ["flush", "close"])
def test_after_a_failed_write_what_is_on_its_way_is_in_a_whole_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    # A flush (every 2 s) or a stop after a failed write wrote to the file that lacked the
    # failed call's events, and cleared the mark that a new file was needed: a kill then lost
    # that call's spend.
    held = HeldEvents(tmp_path, "provider-openai")
    later = EVENTS["call_failed"]
    held.begin([CALL])
    held.begin([SPEND])
    held.end([CALL])
    write = os.write
    monkeypatch.setattr(os, "write", _no_space)
    held.begin([later])  # in no file
    monkeypatch.setattr(os, "write", write)
    held.end([SPEND])
    if then == "flush":
        held.flush()
        _killed(held)
    else:
        held.close()
    other = HeldEvents(tmp_path, "provider-openai")
    other.adopt()
    assert list(other) == [later]
    other.close()


def test_with_no_file_to_write_done_ids_are_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldEvents(tmp_path, "provider-openai")

    def refused(*args: object, **kw: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refused)
    for _ in range(1000):
        held.begin([SPEND])
        held.end([SPEND])
    assert not held._done and not held._pending


def test_an_event_begun_again_under_its_id_replaces_it_even_across_a_rotations_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call written ahead at its upper bound, then its own events under the same ids: the
    adopter takes the last line of each id. Killed between a rotation's rename and its unlink,
    both files are left: the call's spend was in one at its bound and in the other at its cost,
    under two ids, and the adopter appended both (counted twice). Under one id it is one event
    whichever files hold it."""

    bound = msgspec.structs.replace(SPEND, cost_usd=SPEND.cost_usd * 10)
    first = HeldEvents(tmp_path, "provider-openai")
    first.begin([bound])
    first.begin([SPEND])  # the call's own, same id: replaces it
    _killed(first)
    second = HeldEvents(tmp_path, "provider-openai")
    assert second.adopt() == 1 and list(second) == [SPEND]
    second.close()

    monkeypatch.setattr(held_module, "_INFLIGHT_ROOM", 0)  # every write rotates
    third = HeldEvents(tmp_path / "rotation", "provider-openai")
    third.begin([bound])
    # The process killed before it removes the old file: the old file stays.
    unlink = _unlink_fails(monkeypatch, _write_ahead, SystemExit("killed"))
    with pytest.raises(SystemExit):
        third.begin([SPEND])
    monkeypatch.setattr(Path, "unlink", unlink)
    old_and_new = sorted((tmp_path / "rotation").glob("inflight-*.jsonl"))
    assert len(old_and_new) == 2
    _killed(third)
    fourth = HeldEvents(tmp_path / "rotation", "provider-openai")
    fourth.adopt()
    assert {event.id for event in fourth} == {SPEND.id}  # one spend, whichever is appended
    assert [e for e in fourth if e != SPEND] == []  # and at its cost: the old file's last line
    fourth.close()


def test_a_rotation_after_a_failed_write_says_the_done_ids_in_the_old_file_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The call's spend written ahead at its bound, then ended (the call billed nothing) just
    # as a failed write had the next one rotate: the rotation left the old file without the
    # done ids, and a kill before its removal had the adopter append the bound.
    held = HeldEvents(tmp_path, "provider-openai")
    held.begin([SPEND])  # the bound, on its way
    write = os.write
    monkeypatch.setattr(os, "write", _no_space)
    held.begin([EVENTS["budget_released"]])  # another call's write fails: the file is behind
    monkeypatch.setattr(os, "write", write)
    held.end([SPEND])  # nothing billed: the bound is no longer due
    # The process killed before it removes the old file: the old file stays.
    unlink = _unlink_fails(monkeypatch, _write_ahead, SystemExit("killed"))
    with pytest.raises(SystemExit):
        held.begin([CALL])  # the call's own event: rotates
    monkeypatch.setattr(Path, "unlink", unlink)
    _killed(held)
    other = HeldEvents(tmp_path, "provider-openai")
    other.adopt()
    assert SPEND.id not in {event.id for event in other}
    other.close()


def test_a_replaced_file_that_cannot_be_removed_stays_locked_while_its_instance_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closed (its lock released) with its name still there, a sibling adopted the calls still
    # on their way in it: appended at their bound while the provider still had them.
    monkeypatch.setattr(held_module, "_INFLIGHT_ROOM", 0)  # every write rotates
    held = HeldEvents(tmp_path, "provider-openai")
    held.begin([SPEND])
    old = held.inflight_path
    unlink = _unlink_fails(monkeypatch, old.__eq__, OSError(5, "Input/output error"))
    held.begin([CALL])
    assert old.exists() and held.inflight_path != old
    assert old.read_bytes() == b""  # emptied: nothing stale in it for a later adopter
    sibling = HeldEvents(tmp_path, "provider-openai")
    assert sibling.adopt() == 0  # locked: its instance lives
    assert held.adopt() == 0  # nor by its own instance
    monkeypatch.setattr(Path, "unlink", unlink)
    held.end([SPEND, CALL])
    held.close()
    assert not old.exists()  # removed at the stop
    sibling.close()


def _with_torn_line(tmp_path: Path) -> Path:
    """A dead instance's write-ahead file: one event on its way, then a line cut short."""
    dead = HeldEvents(tmp_path, "provider-openai")
    dead.begin([SPEND])
    _killed(dead)
    with dead.inflight_path.open("ab") as file:
        file.write(b'{"type":"spend_recorded","id":"ev-cut')
    return dead.inflight_path


def test_an_orphan_whose_events_the_disk_refuses_is_left_whole_and_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Held into memory only, the orphan was left behind after its events were appended, and
    # the next start appended them again. And a look retried every 10 s said it all again.
    orphan = _with_torn_line(tmp_path)
    adopter = HeldEvents(tmp_path, "provider-openai")
    monkeypatch.setattr(adopter, "_rewrite", _no_space)
    for _ in range(3):
        assert adopter.adopt() == 0 and not adopter and orphan.exists()
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(said) == 2, said  # the torn line, the refusal: once each
    monkeypatch.undo()
    assert adopter.adopt() == 1 and list(adopter) == [SPEND] and not orphan.exists()
    aside = tmp_path / "held-provider-openai.unreadable"
    assert aside.read_bytes().count(b"ev-cut") == 1
    adopter.taken(1)
    adopter.close()
    assert HeldEvents(tmp_path, "provider-openai").adopt() == 0  # nothing to append again


def test_an_orphans_events_are_taken_though_its_unreadable_lines_cannot_be_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The side file failing after the events were held left the orphan behind (a later start
    # appended its events again); left whole instead, its billed spend was never appended.
    orphan = _with_torn_line(tmp_path)
    (tmp_path / "held-provider-openai.unreadable").mkdir()  # the side file cannot be written
    adopter = HeldEvents(tmp_path, "provider-openai")
    assert adopter.adopt() == 1 and list(adopter) == [SPEND] and not orphan.exists()
    assert any("dropped" in r.getMessage() for r in caplog.records)
    adopter.close()


def test_an_orphan_taken_but_not_removable_is_emptied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = HeldEvents(tmp_path, "provider-openai")
    dead.begin([SPEND])
    _killed(dead)
    _unlink_fails(monkeypatch, dead.inflight_path.__eq__, OSError(5, "Input/output error"))
    adopter = HeldEvents(tmp_path, "provider-openai")
    assert adopter.adopt() == 1
    assert dead.inflight_path.read_bytes() == b""  # no later start appends it again
    adopter.close()


def test_done_ids_said_in_a_file_that_cannot_be_replaced_are_not_said_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No new file could be made (descriptors or inodes exhausted) while the old one still took
    # appends: every write repeated every done id since, the file growing as the square.
    held = HeldEvents(tmp_path, "provider-openai")
    held.begin([CALL])
    monkeypatch.setattr(held_module, "_INFLIGHT_ROOM", 0)  # every write wants a new file

    def no_new_file(path: Path, data: bytes = b"") -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(held, "_open_inflight", no_new_file)
    for n in range(50):
        event = msgspec.structs.replace(SPEND, id=f"ev-{n}")
        held.begin([event])
        held.end([event])
    assert held._done == [] or len(held._done) == 1
    text = held.inflight_path.read_bytes()
    assert all(text.count(f'"ev-{n}"'.encode()) <= 3 for n in range(49))  # its line, done once
    held.end([CALL])
    monkeypatch.undo()
    held.close()


def test_an_orphan_this_user_cannot_write_is_adopted_all_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opened for writing (to empty it should its removal fail), a dead instance's file another
    # user had left (readable, not writable: a deployment that ran as root) was never adopted.
    dead = HeldEvents(tmp_path, "provider-openai")
    dead.begin([SPEND])
    _killed(dead)
    path_open = Path.open

    def read_only(path: Path, mode: str = "r", *args: object, **kw: object) -> object:
        if path == dead.inflight_path and "+" in mode:
            raise PermissionError(13, "Permission denied")
        return path_open(path, mode, *args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", read_only)
    adopter = HeldEvents(tmp_path, "provider-openai")
    assert adopter.adopt() == 1 and list(adopter) == [SPEND]
    assert not dead.inflight_path.exists()
    adopter.close()


def test_the_audit_finds_a_stopped_instances_events_and_not_a_live_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`orphaned` (what `vapora audit` names as spend on its way): a closed instance's held
    events, never a live one's; nor a live one's file replaced between the audit's open and its
    lock (a rotation: the old file's lock gone with it, its stale lines were read as a stopped
    actor's, a review)."""
    stopped = HeldEvents(tmp_path, "provider-gone")
    stopped.hold([SPEND])
    stopped.close()
    live = HeldEvents(tmp_path, "provider-openai")
    live.hold([CALL])
    found = held_module.orphaned(tmp_path)
    assert [(path.name, events) for path, events in found] == [(stopped.path.name, [SPEND])]
    flock = held_module.fcntl.flock

    def replaced_first(fd: int, operation: int) -> None:
        if operation & held_module.fcntl.LOCK_SH:  # the audit's: the live file replaced first
            live.hold([SPEND])
            live.taken(1)  # (replaced under its name: the file the audit opened, unlinked)
        flock(fd, operation)

    monkeypatch.setattr(held_module.fcntl, "flock", replaced_first)
    names = [path.name for path, _ in held_module.orphaned(tmp_path)]
    assert live.path.name not in names
    live.close()
