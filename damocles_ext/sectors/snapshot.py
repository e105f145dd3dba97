"""The locator's cache kept across restarts: a snapshot file of the locations it remembers, so
that a process started again while its source node is down still has their last known
locations (docs/SECTORS.md, "Kept across restarts").

- The file: a magic line, then msgpack (msgspec) of a versioned `_Snapshot`: when it was
  written (unix seconds), a table of strings (directories, store names, providers: a deadline's
  thousands of sectors share a few) and one row per entry, least recently used first, each with
  the wall-clock time it was learned. At most `max_entries` entries (the most recently used) and
  `max_bytes` bytes.
- Written in a worker thread (`trio.to_thread`), atomically: a new file beside it (0600,
  O_EXCL), written, fsync'd, renamed over it, the directory fsync'd; a crash leaves the old
  snapshot or the new one, never half of one. Every `every` seconds when the cache changed, and
  when the locator closes (a clean stop); each write at most `SAVE_TIMEOUT`.
- Read once, at start (`load`): the learned times go back onto the loop's clock, so an entry's
  age is its real age, the time the process was down included (`SectorCache.restore` keeps the
  rules). A read that takes more than `READ_TIMEOUT` (a storage that hangs) is given up: said,
  the waiters go on without it, and the file, not read, is not written over; should it end after
  all, its entries are taken in then and the saves go on. A file that is not there is a first
  start; one that is not ours, not a regular file, too big, of another format version or
  damaged is said in a warning and ignored (the next save replaces it): never fatal. One that
  could not be read (an I/O error, no file descriptor, no memory, no thread:
  `SnapshotUnreadable` or anything else) is said and ignored too, but left as it is: what it
  holds is not known to be bad, so no save of this process replaces it.
- Never written over what is not a snapshot (`not_a_snapshot`: a device, a FIFO, a symlink, a
  directory, a file without the magic line; `--sector-cache /dev/null` or a mistyped path of
  someone's file): refused at start (the commands), and checked again before each rename; such
  a file is said and left as it is.

The cache's rules stay sans-IO (cache.py); the files are here, and the locator calls this.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Final

import msgspec
import trio

from ..errors import describe, passes_through
from ..jobs.paths import sector_path
from ..regular_file import file_kind
from .cache import CacheEntry, SectorCache, restorable
from .model import SectorLocation, SectorRef

log = logging.getLogger("damocles_ext.sectors")

#: The file's first bytes: what it is, before any msgpack.
MAGIC: Final = b"damocles-ext sector locations\n"
#: The format this version writes and reads; another is ignored (said in a warning).
VERSION: Final = 1
#: The default file's name in a state directory.
FILE_NAME: Final = "sector-locations.snapshot"
#: Seconds between saves (when the cache changed), and the bound of one save.
SAVE_EVERY: Final = 300.0
SAVE_TIMEOUT: Final = 10.0
#: Seconds the read at start is waited for (a million entries take some 10 s on a loaded machine).
READ_TIMEOUT: Final = 60.0
#: Entries kept at most (the most recently used) and the file's size at most: about 60 bytes an
#: entry in damocles' layout, so a million is some 60 MB.
MAX_ENTRIES: Final = 1_000_000
MAX_BYTES: Final = 256 * 1024 * 1024

# One write at a time, in the order the threads started: a save cut by its bound and abandoned
# is done before the next one renames its file (an older snapshot never lands last).
_writing = threading.Lock()


class _Row(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One entry. Paths are split after their last "/": a directory (an index in `strings`)
    and a name; a store name or the provider is an index in `strings`, -1 for None. Not
    tracked by the garbage collector (scalars only): a million of them start no collection."""

    miner: int
    number: int
    upgrade: bool
    sealed_dir: int
    sealed_name: str
    cache_dir: int
    cache_name: str
    sealed_store: int
    cache_store: int
    provider: int
    learned_at: float  # unix seconds


class _Header(msgspec.Struct):
    version: int


class _Snapshot(msgspec.Struct):
    version: int
    written_at: float  # unix seconds
    strings: list[str]
    rows: list[_Row]


class SnapshotUnusable(Exception):
    """The file cannot be taken in (the message says why and what to do)."""


class NotASnapshot(SnapshotUnusable):
    """What is at the path is not a snapshot: it is neither taken in nor ever written over."""


class SnapshotUnreadable(Exception):
    """The file could not be read (an I/O error, no file descriptor left): what it holds is not
    known, so it is not written over either (the next start reads it again)."""


def not_a_snapshot(path: str, *, raising: bool = False) -> str | None:
    """What is at `path` when it is not a sector-location snapshot, which a snapshot must then
    never replace ("a character device, not a sector-location snapshot", ...); None when
    nothing is there, or a file that starts as a snapshot does (damaged or not, it is one).
    `raising`: one that cannot be looked at or read is SnapshotUnreadable, not "maybe not one"."""
    not_one = "not a sector-location snapshot"

    def unreadable(exc: OSError, cannot: str, what: str) -> str:
        if raising:
            raise SnapshotUnreadable(f"it cannot be {cannot}: {describe(exc)}") from None
        return f"{what} ({describe(exc)}), so maybe {not_one}"

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return unreadable(exc, "looked at", "something that cannot be looked at")
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"a symlink (to {target}), {not_one}: a snapshot is a file of its own"
    if not stat.S_ISREG(st.st_mode):
        return f"{file_kind(st.st_mode)}, {not_one}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return unreadable(exc, "opened", "a file that cannot be read")
    try:
        head = os.read(fd, len(MAGIC))
    except OSError as exc:
        return unreadable(exc, "read", "a file that cannot be read")
    finally:
        os.close(fd)
    if not head:
        return f"an empty file, {not_one}"
    if head != MAGIC:
        first = MAGIC.decode().strip()
        return f"a file that is {not_one} (its first line is not {first!r})"
    return None


def encode(
    entries: Iterable[tuple[SectorRef, CacheEntry]], mono_now: float, wall_now: float
) -> bytes:
    """The snapshot of these entries (least recently used first), their learned times on the
    wall clock: `wall_now` is the same moment as `mono_now` on the loop's clock."""
    index: dict[str, int] = {}
    strings: list[str] = []

    def ref(text: str | None) -> int:
        if text is None:
            return -1
        found = index.get(text)
        if found is None:
            found = index[text] = len(strings)
            strings.append(text)
        return found

    def split(path: str) -> tuple[int, str]:
        cut = path.rfind("/") + 1
        return ref(path[:cut]), path[cut:]

    rows = []
    for sector, entry in entries:
        where = entry.location
        sealed_dir, sealed_name = split(where.sealed_file)
        cache_dir, cache_name = split(where.cache_dir)
        rows.append(
            _Row(
                sector.miner, sector.number, sector.upgrade, sealed_dir, sealed_name,
                cache_dir, cache_name, ref(where.sealed_store), ref(where.cache_store),
                ref(entry.provider), wall_now - (mono_now - entry.learned_at),
            )
        )  # fmt: skip
    body = msgspec.msgpack.encode(_Snapshot(VERSION, wall_now, strings, rows))
    return MAGIC + body


def decode(data: bytes, mono_now: float, wall_now: float) -> tuple[float, list[tuple[SectorRef, CacheEntry]]]:  # fmt: skip
    """(when it was written, unix seconds; its entries, learned at their times on the loop's
    clock: `mono_now` is the same moment as `wall_now`). A wall clock behind the time it was
    written (set back since) cannot say how long ago that was: each entry is then taken as old
    as it was when written, at least. SnapshotUnusable saying why."""
    if not data.startswith(MAGIC):
        raise SnapshotUnusable("it is not a sector-location snapshot (its first bytes are not)")
    body = memoryview(data)[len(MAGIC) :]
    try:
        version = msgspec.msgpack.decode(body, type=_Header).version
    except (msgspec.DecodeError, RecursionError) as exc:  # (nested deeper than msgspec goes)
        raise SnapshotUnusable(f"it is damaged (cut short, or overwritten): {exc}") from None
    if version != VERSION:
        raise SnapshotUnusable(
            f"it is in format version {version}, and this damocles-ext reads version {VERSION}"
            " (written by another version of damocles-ext)"
        )
    try:
        snapshot = msgspec.msgpack.decode(body, type=_Snapshot)
        strings, written_at = snapshot.strings, snapshot.written_at
        if not math.isfinite(written_at):
            raise ValueError("its time of writing is not a time")

        def text(i: int) -> str | None:
            if i == -1:
                return None
            if i < 0:
                raise IndexError(i)
            return strings[i]

        entries = []
        for row in snapshot.rows:
            provider = text(row.provider)
            if provider is None or not math.isfinite(row.learned_at):
                raise ValueError(f"an entry of {row.miner}:{row.number} has no provider or time")
            location = SectorLocation(
                (text(row.sealed_dir) or "") + row.sealed_name,
                (text(row.cache_dir) or "") + row.cache_name,
                text(row.sealed_store),
                text(row.cache_store),
            )
            learned_at = mono_now - (max(wall_now, written_at) - row.learned_at)
            sector = SectorRef(row.miner, row.number, row.upgrade)
            entries.append((sector, CacheEntry(location, provider, learned_at)))
    except (msgspec.DecodeError, ValueError, IndexError, RecursionError) as exc:
        raise SnapshotUnusable(f"it is damaged (cut short, or overwritten): {exc}") from None
    return snapshot.written_at, entries


def rerooted(
    entries: list[tuple[SectorRef, CacheEntry]],
    stores: Mapping[str, str],
    providers: frozenset[str],
) -> list[tuple[SectorRef, CacheEntry]]:
    """`entries` with each path in a named store, in damocles' layout, rebuilt under that
    store's directory in `stores`, and those whose store is not there dropped: a location
    saved before the operator changed where a store is attached is not given as fresh. Only
    the entries of `providers` (those whose paths are made from `stores`: a source node's, the
    scan's); a plugin's, which may mount a store elsewhere, are kept as saved."""
    out = []
    for sector, entry in entries:
        if entry.provider not in providers:  # a plugin's: its own mounts
            out.append((sector, entry))
            continue
        location, paths = entry.location, {}
        for kind, saved, name in (
            ("sealed", location.sealed_file, location.sealed_store),
            ("cache", location.cache_dir, location.cache_store),
        ):
            tail = sector_path("/", kind, sector.miner, sector.number, sector.upgrade)
            paths[kind] = saved
            if name is not None and saved.endswith(tail):  # (a plugin's own layout: as saved)
                if (root := stores.get(name)) is None:
                    break  # its store is not attached here now: asked anew
                paths[kind] = sector_path(root, kind, sector.miner, sector.number, sector.upgrade)
        else:
            kept = entry
            if (paths["sealed"], paths["cache"]) != (location.sealed_file, location.cache_dir):
                moved = replace(location, sealed_file=paths["sealed"], cache_dir=paths["cache"])
                kept = replace(entry, location=moved)
            out.append((sector, kept))
    return out


def read_file(path: str, max_bytes: int) -> bytes | None:
    """The file's bytes (None: there is none); SnapshotUnusable when it is not ours to trust
    (another user's, a symlink, not a regular file) or too big; SnapshotUnreadable when it
    cannot be opened or read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SnapshotUnusable("it is a symlink; a snapshot is a file of its own") from None
        raise SnapshotUnreadable(f"it cannot be opened: {describe(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotUnusable("it is not a regular file")
        if st.st_uid != os.geteuid():
            raise SnapshotUnusable(
                f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}), who"
                " writes it: what another user put there is not taken"
            )
        chunks = []
        size = 0
        while size <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise SnapshotUnreadable(f"it cannot be read: {describe(exc)}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise SnapshotUnusable(f"it is larger than a snapshot may be ({max_bytes} bytes)")
    return data


def _new_files(name: str) -> str:
    """How the names of the new files written beside the file `name` begin: ".NAME.", NAME cut
    to 200 bytes, so that with the process's id and a random part after it a name fits in
    NAME_MAX (255 bytes) whenever the file's own does."""
    return f".{os.fsdecode(os.fsencode(name)[:200])}."


def write_file(path: str, data: bytes) -> None:
    """Replace the file with `data` atomically and durably (OSError when it cannot be)."""
    directory, name = os.path.split(os.path.abspath(path))
    with _writing:
        new = f"{_new_files(name)}{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp = os.path.join(directory, new)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            what = not_a_snapshot(path)  # put there since it started, or since the last save
            if what is not None:
                raise NotASnapshot(
                    f"{path} is {what}, and a snapshot never replaces that: move it away, or"
                    " give another --sector-cache"
                )
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _remove_leftovers(path: str) -> None:
    """The new files of writes a killed process left half done (ours only). One whose process
    (the id in its name) is alive is another process's save in progress, on the same file: left
    to it; this process's own are not being written while `_writing` is held."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(directory)
    except OSError:
        return
    prefix = _new_files(name)
    with _writing:
        for entry in names:
            if not (entry.startswith(prefix) and entry.endswith(".tmp")):
                continue
            pid = entry[len(prefix) :].partition(".")[0]
            if pid.isdigit() and int(pid) not in (0, os.getpid()) and _alive(int(pid)):
                continue
            full = os.path.join(directory, entry)
            try:
                if os.lstat(full).st_uid == os.geteuid():
                    os.unlink(full)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs (as anyone)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return True


class CacheSnapshot:
    """The snapshot file of one locator's cache: `load` at start, `save` now and then and at
    the end (SectorLocator does both when given one)."""

    def __init__(
        self,
        path: str,
        *,
        every: float = SAVE_EVERY,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
        wall: Callable[[], float] = time.time,
        reroot: tuple[Mapping[str, str], frozenset[str]] | None = None,
    ) -> None:
        self.path = path
        #: The stores attached here now (name -> directory) and the providers whose paths are
        #: made from them, when known: a restored location of theirs in a store is rebuilt under
        #: its directory now, and dropped if the store is gone (`rerooted`: the operator may
        #: have fixed an --attached path since the save).
        self.reroot = reroot
        self._directory = os.path.dirname(os.path.abspath(path))
        self.every = every
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.wall = wall
        self._lock = trio.Lock()
        #: Its own thread for its reads and writes, not trio's default limiter's: a storage that
        #: hangs holds this one (a thread outlives its bound there), never the threads the rest
        #: of the process needs (the coordinator parses its requests in those).
        self._threads = trio.CapacityLimiter(1)
        self._saved_changes: int | None = None
        self.restored = 0
        #: When the file was last written (the loop's clock), by this process or the one before.
        self.saved_at: float | None = None
        self.error: str | None = None  # the last save's, or the load's, until a save works
        self._failing = False  # the last save failed: its end is said
        #: The file is not written over: its read was given up (until it ends after all), or
        #: failed for a reason other than what it holds.
        self._keep_file = False

    async def load(
        self, cache: SectorCache, *, gave_up: Callable[[], object] = lambda: None
    ) -> int:
        """Take the file's entries into the cache; how many were taken. A file that cannot be
        used is said in a warning and ignored. Past `READ_TIMEOUT` the read is given up (said,
        `gave_up` called: its waiters go on, and no save writes over the file) and still
        awaited: its entries are taken in if it ends."""
        mono_now, wall_now = trio.current_time(), self.wall()
        rules = cache.rules
        cache.begin_restore()  # a sector forgotten meanwhile is not taken back
        changes = cache.changes  # moved by the time they are taken in: not all in the file

        def read() -> tuple[float, int, dict[SectorRef, CacheEntry]] | None:
            """(written_at, entries in the file, those the cache takes): all of the O(entries)
            work here, in the thread; the loop only merges the dict."""
            _remove_leftovers(self.path)
            what = not_a_snapshot(self.path, raising=True)
            if what is not None:
                raise NotASnapshot(f"it is {what}")
            data = read_file(self.path, self.max_bytes)
            if data is None:
                return None
            written_at, entries = decode(data, mono_now, wall_now)
            if self.reroot is not None:
                entries = rerooted(entries, *self.reroot)
            not_fresh = wall_now < written_at
            return (
                written_at,
                len(entries),
                restorable(entries, mono_now, rules, not_fresh=not_fresh),
            )

        async def bound() -> None:
            await trio.sleep(READ_TIMEOUT)
            self._keep_file = True
            self.error = (
                f"the sector-location snapshot {self.path}: reading it took more than"
                f" {READ_TIMEOUT:g} s (a storage that hangs?); given up: not written over"
                " until the read ends"
            )
            log.warning(
                "%s. Locations are learned anew meanwhile; those of the file are taken in if the"
                " read ends after all",
                self.error,
            )
            gave_up()

        failed: BaseException | None = None
        got = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bound)
            try:
                got = await trio.to_thread.run_sync(
                    read, abandon_on_cancel=True, limiter=self._threads
                )
            except BaseException as error:  # SnapshotUnusable, or anything else: never fatal
                if passes_through(error):
                    raise
                failed = error
            nursery.cancel_scope.cancel()
        if failed is not None or got is None:
            cache.take_restored({})  # nothing: the sectors forgotten are no longer noted
        late, self._keep_file = self._keep_file, False
        if late:
            log.info("the read of the sector-location snapshot %s ended after all", self.path)
            self.error = None
        if failed is not None:
            if isinstance(failed, SnapshotUnusable):  # what it holds is bad: replaced
                why = str(failed)
                self.error = f"{self.path} was not taken: {why}"
                then = "the file replaced at the next save"
                if isinstance(failed, NotASnapshot):
                    then = "no snapshot is written: what is there is never written over"
            else:  # not read (an I/O error, no memory, no thread, a bug): maybe a good one
                why = str(failed)
                if not isinstance(failed, SnapshotUnreadable):
                    why = f"it could not be read: {describe(failed)}"
                self.error = f"{self.path} was not read: {why}; not written over until a restart"
                then = (
                    "the file is left as it is, not written over by this process: what it holds"
                    " is not known to be bad, and the next start reads it again"
                )
                self._keep_file = True
            log.warning(
                "the sector-location snapshot %s is ignored: %s. Locations are learned anew (%s)",
                self.path, why, then,
            )  # fmt: skip
            return 0
        if got is None:
            log.info("no sector-location snapshot at %s yet: locations are learned anew", self.path)
            return 0
        written_at, in_file, taken = got
        self.saved_at = mono_now - max(0.0, wall_now - written_at)
        set_back = wall_now < written_at
        if set_back:
            log.warning(
                "the sector-location snapshot %s was written %.0f s after now by the wall clock"
                " (the clock set back since?): its locations are taken as not fresh (asked again"
                " first), and as old as they were when written at least",
                self.path, written_at - wall_now,
            )  # fmt: skip
        unsaved = cache.changes != changes  # learned or forgotten meanwhile: the next save's
        self.restored = cache.take_restored(taken)
        if not unsaved:
            self._saved_changes = cache.changes
        log.info(
            "%d sector locations taken from %s (saved %.0f s ago; %d left out: past keep_for,"
            " or learned since)",
            self.restored, self.path, max(0.0, wall_now - written_at), in_file - self.restored,
        )  # fmt: skip
        return self.restored

    @property
    def writing(self) -> bool:
        """A write is in flight: under way, or its thread still stuck past its bound."""
        return self._lock.locked() or self._threads.borrowed_tokens > 0

    async def save(self, cache: SectorCache, *, final: bool = False) -> bool:
        """Write the cache's entries (the most recently used `max_entries`) to the file, in a
        thread, at most `SAVE_TIMEOUT` (shielded: a stop waits for it that long); True when
        done. `final` (the stop's): skipped while a write is in flight, said, so that a storage
        that hangs costs a stop one bound at most, not one more behind the one in flight.
        Never while the file is kept as it is (its read given up): False."""
        if self._keep_file:
            return False
        if final and self.writing:
            log.warning(
                "the sector-location snapshot %s is not written at this stop: a write is still in"
                " flight (a storage that hangs?); the file keeps what it held before that write,"
                " or what that write puts there",
                self.path,
            )
            return False
        timeout = SAVE_TIMEOUT
        with trio.CancelScope(shield=True), trio.move_on_after(timeout) as bound:
            async with self._lock:
                if self._threads.borrowed_tokens:  # stuck past its bound: a new one would wait
                    self._failed(
                        f"a write has been stuck for more than {timeout:g} s (a storage that"
                        " hangs?), and no new one starts until it ends"
                    )
                    return False
                changes = cache.changes
                mono_now, wall_now = trio.current_time(), self.wall()
                keep_for = cache.rules.keep_for
                # A copy, in the loop: one dict, no object per entry (those would start the
                # garbage collector's full collections, which hold the loop too).
                entries = dict(cache.entries())

                def to_keep() -> Iterator[tuple[SectorRef, CacheEntry]]:
                    """The most recently used `max_entries`, less those past keep_for."""
                    items = iter(entries.items())
                    if len(entries) > self.max_entries:
                        items = itertools.islice(items, len(entries) - self.max_entries, None)
                    return ((s, e) for s, e in items if mono_now - e.learned_at < keep_for)

                def write() -> tuple[int, int]:
                    counted = [0]

                    def counting() -> Iterator[tuple[SectorRef, CacheEntry]]:
                        for item in to_keep():
                            counted[0] += 1
                            yield item

                    data = encode(counting(), mono_now, wall_now)
                    written = counted[0]
                    if len(data) > self.max_bytes:  # the least recently used halves go
                        fitting = list(to_keep())
                        while len(data) > self.max_bytes and fitting:
                            fitting = fitting[len(fitting) // 2 :] if len(fitting) > 1 else []
                            data = encode(fitting, mono_now, wall_now)
                        written = len(fitting)
                    write_file(self.path, data)
                    return written, counted[0]

                try:
                    written, kept = await trio.to_thread.run_sync(
                        write, abandon_on_cancel=True, limiter=self._threads
                    )
                except BaseException as exc:  # said alike each time: the new file's name left out
                    if passes_through(exc):
                        raise
                    if isinstance(exc, NotASnapshot):
                        self._failed(f"not written: {exc}")
                        return False
                    why = (isinstance(exc, OSError) and exc.strerror) or describe(exc)
                    self._failed(f"it could not be written in {self._directory}: {why}")
                    return False
                if written < kept:
                    log.warning(
                        "the sector-location snapshot %s holds the %d most recently used of %d"
                        " locations: all of them take more than its %d bytes",
                        self.path, written, kept, self.max_bytes,
                    )  # fmt: skip
                self._saved_changes = changes
                self.saved_at = trio.current_time()
                if self._failing:
                    log.info("the sector-location snapshot %s is written again", self.path)
                self.error, self._failing = None, False
                return True
        if bound.cancelled_caught:
            self._failed(f"writing it took more than {timeout:g} s (a storage that hangs?)")
        return False

    def _failed(self, why: str) -> None:
        message = f"the sector-location snapshot {self.path}: {why}"
        if message != self.error:  # said once while it fails alike
            log.warning(
                "%s; the last known locations are kept in memory only until it can be", message
            )
        self.error, self._failing = message, True

    async def save_forever(self, cache: SectorCache) -> None:
        """Save every `every` seconds when the cache changed since the last save."""
        while True:
            await trio.sleep(self.every)
            if cache.changes != self._saved_changes:
                await self.save(cache)

    def status(self, now: float) -> dict[str, Any]:
        return {
            "path": self.path,
            "restored": self.restored,
            "saved_age": None if self.saved_at is None else round(now - self.saved_at, 3),
            "error": self.error,
        }
