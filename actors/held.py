"""A provider actor's events the event log did not take, kept on disk until it does.

A call's events say what it cost; when the log does not take them (a JetStream outage past the
acknowledgement timeout) the provider actor holds them back and appends them again until it
does. :class:`HeldEvents` keeps them on disk from the moment they are held, so that a crash
during the outage loses none:

* each actor instance has a file of its own in the data directory,
  ``held-<actor>-<instance>.jsonl`` (one JSON event per line), created on the first hold (written
  and locked under another name, then renamed: no other instance ever sees it unlocked) and
  locked (``flock``) for as long as the instance lives;
* every event held is written and ``fsync``'d before :meth:`HeldEvents.hold` returns;
* when some are appended, the file is replaced by one holding the rest (written, synced and
  locked before it takes the name), and removed when none are left;
* at start an instance *adopts* the files no live instance holds (the file of an instance that
  crashed or stopped with events held, and ``held-<actor>.jsonl`` from earlier versions): their
  events are written to its own file first, then the orphan is removed. A line that is not an
  event (cut short by a crash, edited) is named in the log and kept in
  ``held-<actor>.unreadable``.

Events on their way to the log are on disk too (:meth:`HeldEvents.begin` before the append,
:meth:`HeldEvents.end` once it is answered): each instance writes them ahead to
``inflight-<actor>-<instance>.jsonl`` (locked like the held file), one write per call that also
carries a line ``{"done": [ids]}`` for the events the log took, or that were held, since the
last write; done ids are also written every 2 s (:meth:`HeldEvents.flush`), so a process
killed leaves at most the last 2 s of them unsaid: an
adopter appends those once more, which the stream's duplicate window (2 minutes), the ledger
and the budget fold (an id for a day) count once. A write that fails has the next one start a
new file holding everything on its way.
A process killed while the log had not yet answered (the HTTP answer in, the spend not yet
acknowledged: up to the log's acknowledgement timeout) leaves them there, and the instance that
adopts its files appends them. The provider actor also begins, before the provider has a call,
what the call is recorded as should it never end there (at its upper bound); the call's own
events, under the same ids, replace it: an adopter takes the last line of each id, and an
event found in two files (a kill between a rotation's two steps) is one event, appended once
by every reader's count. These writes are not ``fsync``'d: they survive the process, not
the machine (as a call's events in memory would not either; the held file, for an outage, is
synced). The file is replaced, once it has grown past a megabyte, by a new one holding only
what is on its way.

With tracing on, each event is held with the trace context it was first appended in (the
call's), written into its line as an extra ``held_trace`` key that event decoders ignore, so that
appended again, even by another instance after a crash, it continues its task's trace instead of
starting one of its own.

Appending an event twice is harmless: the stream drops a repeat within its duplicate window
(2 minutes), the cost ledger and the audit count an event id once, and the budget fold counts
it once while it remembers it (its settled reservations and ids for a day). The one case that
counts twice: an append the log stored but never acknowledged (held as not taken), appended
again by a start more than a day later: the budget keeper then counts that spend twice in its
month (on the safe side: it refuses sooner), while the ledger's totals count it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

from events.codec import DecodeError, decode_event, encode
from events.log import Event

__all__ = ["HeldEvents", "orphaned"]

log = logging.getLogger("vapora.actors")


class _HeldTrace(msgspec.Struct):
    """The trace context a held event's line carries beside the event's own fields."""

    held_trace: dict[str, str] = {}


_held_trace = msgspec.json.Decoder(_HeldTrace)

#: How large the write-ahead file may grow before a new one replaces it (holding only what is
#: on its way: under steady load something always is).
_INFLIGHT_ROOM = 1 << 20


class _Done(msgspec.Struct):
    """A write-ahead line: these events are in the log, or held."""

    done: list[str]


class _Id(msgspec.Struct):
    id: str = ""


_done_decoder = msgspec.json.Decoder(_Done)
_id_decoder = msgspec.json.Decoder(_Id)


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data``, or an OSError (a full disk may take part of it, then refuse)."""
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def _done_line(ids: list[str]) -> bytes:
    return msgspec.json.encode(_Done(done=ids)) + b"\n"


def _done(line: bytes) -> list[str]:
    try:
        return _done_decoder.decode(line).done
    except msgspec.DecodeError:
        return []


def _event_id(line: bytes) -> str:
    try:
        return _id_decoder.decode(line).id
    except msgspec.DecodeError:
        return ""  # not an event: adopted as such, and set aside as unreadable


def _trace_in(line: bytes) -> dict[str, str]:
    """The trace context written into a held event's line (none if it has none, or a bad one:
    the event itself is what matters)."""
    try:
        return _held_trace.decode(line).held_trace
    except msgspec.DecodeError:
        return {}


def _on_their_way(name: str, data: bytes) -> list[bytes]:
    """The lines of a held (``held-*``) or write-ahead (``inflight-*``) file whose events are
    still to be appended: all of a held file's; of a write-ahead file's, the last line of each
    event id none of its ``{"done": ...}`` lines names."""
    lines = [line for line in data.splitlines() if line.strip()]
    if not name.startswith("inflight-"):
        return lines
    done = {i for line in lines if line.startswith(b'{"done"') for i in _done(line)}
    last: dict[str, bytes] = {}  # an id begun again: its last line replaces it
    for number, line in enumerate(lines):
        if not line.startswith(b'{"done"'):
            # (A line that is no event is kept as it is, each on its own.)
            last[_event_id(line) or f"line {number}"] = line
    return [line for event_id, line in last.items() if event_id not in done]


_ORPHAN_NAME = re.compile(r"(held|inflight)-.+\.jsonl")


def orphaned(directory: Path) -> list[tuple[Path, list[Event]]]:
    """The events in ``directory``'s held and write-ahead files that no live provider actor
    holds (its process stopped or was killed with them on their way to the log), per file,
    read only: a provider actor that starts on the directory adopts and appends them. A file
    a live instance locks is its own, passed by; an unreadable line is left out."""
    found: list[tuple[Path, list[Event]]] = []
    try:
        paths = sorted(directory.iterdir())
    except OSError:  # no directory (or none readable): nothing to tell
        return found
    for path in paths:
        if not _ORPHAN_NAME.fullmatch(path.name):
            continue
        try:
            with path.open("rb") as file:
                try:  # shared and at once: never waits for, nor keeps out, a live one's
                    fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live instance's
                if not _still_named(file, path):
                    continue  # replaced (a rotation) or removed since it was opened: unlocked
                lines = _on_their_way(path.name, file.read())
        except OSError:
            continue
        events = []
        for line in lines:
            with contextlib.suppress(DecodeError):
                events.append(decode_event(line))
        if events:
            found.append((path, events))
    return found


def _lock(file: BinaryIO) -> bool:
    """Whether this process now holds ``file``'s exclusive lock (False: another instance has it)."""
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _still_named(file: BinaryIO, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``file`` (not replaced or removed since)."""
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


def _sync_directory(directory: Path) -> None:
    """A rename or removal in ``directory`` made durable (best effort: not every filesystem
    lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class HeldEvents:
    """The events one actor instance holds back, in order, mirrored in its file (module doc)."""

    def __init__(self, directory: Path, actor: str, kin: str | None = None) -> None:
        """``kin``: a name prefix of other actors (``provider-``) whose dead instances' files
        this one adopts too (an instance of any provider appends what a dead instance of
        another held: a provider whose only instance died may have no other instance, and
        its spend then waited for its next start, while the keeper expired its holds)."""
        self.directory = directory
        self.actor = actor
        self.path = directory / f"held-{actor}-{uuid.uuid4().hex[:12]}.jsonl"
        self.events: list[Event] = []
        self.traces: dict[str, dict[str, str]] = {}  # event id -> its trace context headers
        self._file: BinaryIO | None = None  # open and locked while the file exists
        self._dirty = False  # a write failed: the file lacks some of the events
        self._own = re.compile(rf"held-{re.escape(actor)}(-[0-9a-f]{{12}})?\.jsonl")
        self.inflight_path = directory / f"inflight-{self.path.name[len('held-') :]}"
        self._inflight: int | None = None  # its descriptor, open and locked once written
        self._pending: dict[str, bytes] = {}  # id -> line of the events begun and not ended
        self._inflight_size = 0
        self._done: list[str] = []  # ids ended since the last write, written with the next
        self._behind = False  # a write failed: the file lacks lines, or has one cut short
        self._failing = False  # a write failed (said once) and none has succeeded since
        self._adopted: set[tuple[str, int]] = set()  # orphans taken (name, inode): once
        # Replaced write-ahead files that could not be removed: kept open (locked) till the stop.
        self._superseded: list[tuple[int, Path]] = []
        # Orphans whose trouble is said already (a look retried every 10 s says it once).
        self._said: set[Path] = set()
        self._own_inflight = re.compile(rf"inflight-{re.escape(actor)}-[0-9a-f]{{12}}\.jsonl")
        if kin is not None:
            self._own = re.compile(rf"held-{re.escape(kin)}.+\.jsonl")
            self._own_inflight = re.compile(rf"inflight-{re.escape(kin)}.+-[0-9a-f]{{12}}\.jsonl")

    def __len__(self) -> int:
        return len(self.events)

    def __bool__(self) -> bool:
        return bool(self.events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    # --- holding and appending ----------------------------------------------------------------

    def hold(
        self,
        events: Iterable[Event],
        traces: dict[str, dict[str, str]] | None = None,
        *,
        adopted_from: Path | None = None,
    ) -> bool:
        """Hold ``events`` back: in memory, and on disk before this returns (False: the disk
        refused them, logged; they are held in memory only, and the next hold, append or stop
        writes the whole file again). ``traces``: event id -> the trace context to append it
        in (headers), for those that have one."""
        events = list(events)
        self.events.extend(events)
        if traces:
            self.traces.update(traces)
        try:
            if self._file is None or self._dirty:
                self._rewrite()  # the file appears under its name already locked
            else:
                self._file.write(b"".join(self._line(event) for event in events))
                self._file.flush()
                os.fsync(self._file.fileno())
        except OSError as exc:
            self._dirty = True
            if adopted_from is None:
                log.error(
                    "%s: could not write %d held events to %s (%s); they are held in memory "
                    "only until a write succeeds, and a crash meanwhile would lose them",
                    self.actor,
                    len(events),
                    self.path,
                    exc,
                )
            elif adopted_from not in self._said:  # said once per orphan, not every look
                self._said.add(adopted_from)
                log.error(
                    "%s: could not write %d events adopted from %s to %s (%s); %s stays for a "
                    "later look to take",
                    self.actor,
                    len(events),
                    adopted_from,
                    self.path,
                    exc,
                    adopted_from.name,
                )
            return False
        return True

    # --- on the way to the log (write-ahead) ---------------------------------------------------

    def begin(self, events: list[Event]) -> list[bytes]:
        """``events`` go to the log now: written ahead (module doc), so that a process killed
        before the log answers leaves them for another instance to append (without their
        trace context). A failed write is logged (once until one succeeds): the append goes
        ahead regardless, and what the file lacks is written with the next rotation. Returns
        the events encoded, for the append to send as they are."""
        encoded = [encode(event) for event in events]
        lines = [payload + b"\n" for payload in encoded]
        # An event begun again under an id on its way replaces it (an adopter takes the last
        # line of each id).
        self._pending.update(zip((event.id for event in events), lines, strict=True))
        try:
            if self._inflight is not None and not self._behind:
                # In the file in use first, also when it is past its room: a kill between the
                # rotation's two steps leaves both files, each with the last line of each id.
                self._write(b"".join(lines))
            if self._needs_new_file():
                self._rotate()  # a new file, holding everything on its way
        except OSError as exc:
            self._behind = True  # these lines are in no file: the next write starts one
            self._write_failed(exc)
        return encoded

    def _needs_new_file(self) -> bool:
        """None yet; one that lacks lines (a failed write); or one past its room (under
        steady load something is always on its way, so it is never empty to truncate)."""
        return self._inflight is None or self._behind or self._inflight_size > _INFLIGHT_ROOM

    def end(self, events: list[Event]) -> None:
        """The log took ``events``, or they are held: no longer on their way. Said in the
        file with the next :meth:`begin`'s write or at the next :meth:`flush` (a process
        killed first leaves them to be appended once more, module doc)."""
        for event in events:
            if self._pending.pop(event.id, None) is not None and self._inflight is not None:
                self._done.append(event.id)  # (with no file, nothing to say it in)

    def flush(self) -> None:
        """Say in the file which events are done (the provider actor calls it every 2 s); a
        file that lacks lines is replaced first."""
        if not self._done or self._inflight is None:
            return
        try:
            if self._behind:
                self._rotate()  # holds what is on its way, and so says all the rest is done
            else:
                self._write(b"")
        except OSError as exc:
            self._write_failed(exc)

    def _write(self, data: bytes) -> None:
        """``data``, after the done ids not yet said, all of it or an OSError; the done ids are
        forgotten only once written."""
        assert self._inflight is not None
        if self._done:
            data = _done_line(self._done) + data
        try:
            _write_all(self._inflight, data)
        except OSError:
            # The file lacks these lines (or has one cut short): the next write starts a new
            # file, holding everything on its way.
            self._behind = True
            raise
        self._done = []
        self._inflight_size += len(data)
        self._wrote()

    def _wrote(self) -> None:
        if self._failing:
            log.info("%s: %s written again", self.actor, self.inflight_path)
        self._failing = self._behind = False

    def _write_failed(self, exc: OSError) -> None:
        if not self._failing:  # once until a write succeeds (it is tried at every call)
            log.error(
                "%s: could not write %s (%s); a crash before the log takes a call's events "
                "would lose them",
                self.actor,
                self.inflight_path,
                exc,
            )
        self._failing = True

    def _rotate(self) -> None:
        """A new write-ahead file holding only what is on its way, in place of the old one
        (which is removed once the new one is there: an adopter sees one or both, locked).
        Raises OSError when the new file cannot be written: the old one stays in use."""
        old_fd, old_path = self._inflight, self.inflight_path
        if old_fd is not None and self._done:
            # Said in the old file too, as far as it takes it (it lacks lines, or has one cut
            # short, the newline ends): a kill before it is removed leaves it done. Said, they
            # are not said again (the old file stays the one in use if no new one can be made).
            with contextlib.suppress(OSError):
                _write_all(old_fd, b"\n" + _done_line(self._done))
                self._done = []
        path = self.directory / f"inflight-{self.actor}-{uuid.uuid4().hex[:12]}.jsonl"
        data = b"".join(self._pending.values())
        self._inflight = self._open_inflight(path, data)
        self.inflight_path, self._inflight_size, self._done = path, len(data), []
        self._wrote()
        if old_fd is not None:
            # If it stays: emptied (the new file holds all it had that is still on its way, and
            # says nothing of what ends from now on) and kept open, so locked: no adopter takes
            # stale lines from it. Removed again at the stop.
            if self._remove_or_empty(old_path, old_fd):
                os.close(old_fd)
            else:
                self._superseded.append((old_fd, old_path))

    def _remove_or_empty(self, path: Path, fd: int) -> bool:
        """Remove ``path`` (True), or else empty it through ``fd`` (said in the log)."""
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            try:
                os.ftruncate(fd, 0)
                left = "emptied"
            except OSError:
                left = "left as it is: a later start may append its events again"
            log.error("%s: could not remove %s (%s); %s", self.actor, path, exc, left)
            return False
        return True

    def _open_inflight(self, path: Path, data: bytes = b"") -> int:
        """A write-ahead file holding ``data``, created locked under another name and then
        renamed (no other instance ever sees it unlocked)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(".staged")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, data)
            os.replace(staged, path)
        except BaseException:
            os.close(fd)
            staged.unlink(missing_ok=True)
            raise
        return fd

    def trace_of(self, event: Event) -> dict[str, str] | None:
        """The trace context ``event`` was held with, if any."""
        return self.traces.get(event.id)

    def _line(self, event: Event) -> bytes:
        line = encode(event)
        trace = self.traces.get(event.id)
        if trace:  # the event's JSON object, one key more
            line = line[:-1] + b',"held_trace":' + msgspec.json.encode(trace) + b"}"
        return line + b"\n"

    def taken(self, count: int) -> None:
        """The first ``count`` events held are in the log now: the file keeps only the rest."""
        for event in self.events[:count]:
            self.traces.pop(event.id, None)
        del self.events[:count]
        try:
            self._rewrite()
        except OSError as exc:
            self._dirty = True
            log.error("%s: could not update %s (%s)", self.actor, self.path, exc)

    def close(self) -> None:
        """At a stop: the file (if any events are still held) stays for a later start to adopt;
        the lock is released."""
        if self.events and (self._dirty or self._file is None):
            try:
                self._rewrite()  # a write had failed: one more try
            except OSError as exc:
                log.error(
                    "%s: %d held events could not be kept in %s (%s); they are lost, unless "
                    "on their way still (cut calls) and the write-ahead file %s has them: %s",
                    self.actor,
                    len(self.events),
                    self.path,
                    exc,
                    self.inflight_path,
                    ", ".join(event.id for event in self.events),
                )
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._inflight is not None:
            if not self._pending:  # all of it done: nothing for a later start
                self.inflight_path.unlink(missing_ok=True)
            else:  # what is done said, so a later start appends only the rest
                with contextlib.suppress(OSError):
                    if self._behind:
                        self._rotate()  # a whole file of what is on its way, no more
                    elif self._done:
                        os.write(self._inflight, _done_line(self._done))
            os.close(self._inflight)
            self._inflight = None
        for fd, path in self._superseded:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.error("%s: could not remove %s (%s); left empty", self.actor, path, exc)
            os.close(fd)
        self._superseded = []

    def _rewrite(self) -> None:
        """Replace the file by one holding :attr:`events` (removed when there are none). The new
        file is locked before it takes the name, so an instance adopting orphans never sees an
        unlocked file of a live instance; one that opened the old file finds it renamed away."""
        old = self._file
        if not self.events:
            if old is not None:
                self.path.unlink(missing_ok=True)
                old.close()
                self._file = None
            self._dirty = False
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_suffix(".staged")
        file = staged.open("wb")
        try:
            _lock(file)
            file.write(b"".join(self._line(event) for event in self.events))
            file.flush()
            os.fsync(file.fileno())
            os.replace(staged, self.path)
        except BaseException:
            file.close()
            staged.unlink(missing_ok=True)
            raise
        _sync_directory(self.directory)
        self._file = file
        self._dirty = False
        if old is not None:
            old.close()

    # --- adopting what earlier instances left -------------------------------------------------

    def adopt(self) -> int:
        """Take over the held-events files no live instance of this actor (or of its kin) holds;
        returns how many events they had (now :attr:`events`' first, in the files' order)."""
        if not self.directory.is_dir():
            return 0
        adopted = 0
        for path in sorted(self.directory.iterdir()):
            if path in (self.path, self.inflight_path):
                continue
            if not (self._own.fullmatch(path.name) or self._own_inflight.fullmatch(path.name)):
                continue
            try:
                adopted += self._adopt(path)
            except OSError as exc:
                log.error("%s: could not read held events in %s (%s)", self.actor, path, exc)
        return adopted

    def _adopt(self, path: Path) -> int:
        opened: BinaryIO
        try:
            opened = path.open("r+b")  # (writable: emptied if it cannot be removed)
        except PermissionError:
            opened = path.open("rb")  # another user's, say: taken all the same
        with opened as file:
            if not _lock(file) or not _still_named(file, path):
                return 0  # a live instance's, or replaced meanwhile
            taken = (path.name, os.fstat(file.fileno()).st_ino)
            if taken in self._adopted:
                return 0  # taken already (its removal failed: emptied)
            lines = _on_their_way(path.name, file.read())
            events: list[Event] = []
            traces: dict[str, dict[str, str]] = {}
            unreadable: list[bytes] = []
            said = path in self._said  # a look retried: its unreadable lines said already
            held = {event.id for event in self.events}  # (a rotation's old and new file)
            for number, line in enumerate(lines, 1):
                try:
                    event = decode_event(line)
                except DecodeError as exc:
                    unreadable.append(line)
                    if not said:
                        log.error(
                            "%s: %s line %d is not an event (%s)", self.actor, path, number, exc
                        )
                    continue
                if event.id in held:
                    continue
                events.append(event)
                trace = _trace_in(line)
                if trace:
                    traces[event.id] = trace
            if events:
                before = len(self.events)
                if not self.hold(events, traces, adopted_from=path):
                    # Not taken (the disk refused this instance's file, said once): held in
                    # memory only, they would be appended with the orphan left behind, and
                    # appended again by the next start. The orphan stays, for a later look.
                    del self.events[before:]
                    for event in events:
                        self.traces.pop(event.id, None)
                    return 0
            if unreadable:
                aside = self.directory / f"held-{self.actor}.unreadable"
                try:
                    with aside.open("ab") as out:
                        out.write(b"".join(line + b"\n" for line in unreadable))
                        out.flush()
                        os.fsync(out.fileno())
                except OSError as exc:
                    # The events are held: the orphan goes all the same (kept, it would have
                    # them appended again), and with it these lines, which are no events.
                    log.error(
                        "%s: could not set aside %d unreadable lines of %s in %s (%s); dropped",
                        self.actor,
                        len(unreadable),
                        path.name,
                        aside,
                        exc,
                    )
                else:
                    log.error(
                        "%s: %d unreadable lines kept in %s", self.actor, len(unreadable), aside
                    )
            self._adopted.add(taken)
            # Its events are held here now: if it stays, emptied, so that no later look or
            # start appends them again.
            self._remove_or_empty(path, file.fileno())
        _sync_directory(self.directory)
        if events:
            log.info("%s: %d held events left in %s, adopted", self.actor, len(events), path)
        return len(events)
