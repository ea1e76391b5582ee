"""The journal: an append-only ``events`` table and an ``effects`` table of current records.

Both are written in one transaction per batch. The daemon opens a batch for everything it handles
in one turn of its loop and commits once (group commit), then answers: nothing is acknowledged
before its commit is durable (WAL + ``synchronous=FULL``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack

from effectd.ipc.errors import DiskFull, JournalLost

log = logging.getLogger("effectd.journal")

SCHEMA_VERSION = 2
JOURNAL_SUFFIXES = ("", "-wal", "-shm")
"""The database file and the WAL and shared-memory files SQLite keeps beside it."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS effects (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    name TEXT,
    submitted_at REAL NOT NULL,
    finished_at REAL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS effects_state ON effects(state);
CREATE TABLE IF NOT EXISTS labels (
    effect_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (effect_id, key)
);
CREATE INDEX IF NOT EXISTS labels_kv ON labels(key, value);
CREATE TABLE IF NOT EXISTS request_keys (key TEXT PRIMARY KEY, ids BLOB NOT NULL, created REAL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    effect_id TEXT,
    type TEXT NOT NULL,
    time REAL NOT NULL,
    payload BLOB
);
CREATE INDEX IF NOT EXISTS events_effect ON events(effect_id);
"""


RESERVE_BYTES = 1024 * 1024
"""Space the journal keeps allocated in ``journal.sqlite3.reserve`` beside it (at most 1/16 of the
filesystem), so that when the filesystem fills up (other programs; effects' output stops short of
it, ``daemon.output.STATE_HEADROOM_BYTES``) the daemon can still commit the conclusions of the
running effects (a few dozen KiB of WAL each): the file is given back once free space runs low, or
a commit fails, and taken again once there is room."""
RESERVE_LOW_WATER = 64 * 1024
RESERVE_RETRY = 10.0
"""Seconds between attempts to take the reserve back once it was used."""


def reserve_size(total: int) -> int:
    """The reserve for a filesystem of ``total`` bytes."""
    return min(RESERVE_BYTES, total // 16)


class SpaceReserve:
    """A preallocated file the journal gives up when the filesystem runs out of space."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False
        self._last_try = float("-inf")
        self.take()

    def _space(self) -> tuple[int, int]:
        """(free, total) bytes of the filesystem."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 0, 0
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def take(self) -> None:
        """(Re)allocate the reserve, only while there is ample room (never what fills a disk)."""
        self._last_try = time.monotonic()
        if self.held:
            return
        free, total = self._space()
        size = reserve_size(total)
        with contextlib.suppress(OSError):
            if size and os.stat(self.path).st_blocks * 512 >= size:  # kept from an earlier run
                self.held = True
                return
        if not size or free < 2 * size:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
            self.held = True
        except OSError:
            self.release()

    def release(self) -> None:
        """Give the space back."""
        self.held = False
        with contextlib.suppress(OSError):
            self.path.unlink()

    def before_commit(self) -> None:
        if self.held and self._space()[0] < RESERVE_LOW_WATER:
            self.release()

    def after_commit(self) -> None:
        if not self.held and time.monotonic() - self._last_try >= RESERVE_RETRY:
            self.take()


class JournalCorrupt(Exception):
    """The journal failed its integrity check or cannot be read; the daemon must not start over it."""


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Journal:
    """The daemon's only connection to ``journal.sqlite3`` (single writer, single thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._in_batch = False
        self.commits = 0
        existed = path.exists()
        # Kept open for the connection's whole life (closing any descriptor of the database
        # would drop SQLite's POSIX locks): its fstat is the file we really write, compared
        # with what is at ``path`` before and after every commit (check_intact).
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._identity: dict[str, tuple[int, int]] = {}
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=OFF")
            if existed:
                row = self._db.execute("PRAGMA quick_check").fetchone()
                if row is None or row[0] != "ok":
                    raise JournalCorrupt(f"quick_check reported: {row[0] if row else 'nothing'}")
            self._db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
            if version == 1:
                self._migrate_from_1()
            elif version is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise JournalCorrupt(f"journal schema version {version}, this effectd knows {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            os.close(self._fd)
            raise JournalCorrupt(str(exc)) from exc
        st = os.fstat(self._fd)
        self._identity[""] = (st.st_dev, st.st_ino)
        self.reserve = SpaceReserve(path.with_name(path.name + ".reserve"))
        self.commit()
        self.check_intact()  # also records the WAL and shared-memory files SQLite opened

    def _migrate_from_1(self) -> None:
        """Version 2 keeps request keys past gc (with their creation time, for the key window)
        and no longer stores the key inside ``record.spec`` (a record's spec is resubmittable)."""
        self._write("ALTER TABLE request_keys ADD COLUMN created REAL")
        # Unknown age: keep every existing key a full window from now.
        self._write("UPDATE request_keys SET created = ?", (time.time(),))
        rows = self._db.execute("SELECT id, record FROM effects").fetchall()
        for eid, blob in rows:
            rec = _unpack(blob)
            spec = rec.get("spec")
            if isinstance(spec, dict) and "request_key" in spec:
                del spec["request_key"]
                self._write("UPDATE effects SET record = ? WHERE id = ?", (_pack(rec), eid))
        self.set_meta("schema_version", SCHEMA_VERSION)

    # ---- batching -------------------------------------------------------------------------

    def _begin(self) -> None:
        if not self._in_batch:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_batch = True

    @property
    def dirty(self) -> bool:
        return self._in_batch

    def commit(self) -> None:
        """Make the current batch durable. On failure the batch is rolled back and DiskFull raised;
        JournalLost if the journal's files were deleted or replaced (checked before the commit,
        so nothing is written to a file nobody will read, and after it, for a race with it)."""
        if not self._in_batch:
            return
        self.reserve.before_commit()
        try:
            self.check_intact()
        except JournalLost:
            self.rollback()
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self.rollback()
            # A failed COMMIT is rolled back whole. Make room for the batch, redone (workers
            # re-send their reports): free the reserve, and fold the WAL into the database and
            # truncate it (it only shrinks at such a checkpoint, and may be megabytes).
            self.reserve.release()
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            raise DiskFull(f"journal commit failed: {exc}") from exc
        self._in_batch = False
        self.commits += 1
        self.reserve.after_commit()
        self.check_intact()

    def check_intact(self) -> None:
        """Raise JournalLost unless the database, WAL and shared-memory files at the journal's
        path are still the ones this connection writes. A deleted (or renamed-over) journal
        keeps accepting commits into an unlinked inode that no restart will ever read."""
        if os.fstat(self._fd).st_nlink == 0:
            raise JournalLost(f"the journal {self.path} was deleted while the daemon ran")
        for suffix in JOURNAL_SUFFIXES:
            name = f"{self.path}{suffix}"
            try:
                st = os.stat(name)
            except FileNotFoundError:
                if suffix in self._identity:
                    raise JournalLost(f"the journal file {name} was deleted while the daemon ran") from None
                continue  # SQLite has not created it yet
            known = self._identity.setdefault(suffix, (st.st_dev, st.st_ino))
            if known != (st.st_dev, st.st_ino):
                raise JournalLost(f"the journal file {name} was replaced while the daemon ran")

    def savepoint(self) -> None:
        """Mark the start of one request's writes inside the batch."""
        self._begin()
        self._db.execute("SAVEPOINT request")

    def release_savepoint(self) -> None:
        self._db.execute("RELEASE SAVEPOINT request")

    def rollback_to_savepoint(self) -> None:
        """Undo only the current request's writes; the rest of the batch stays."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK TO SAVEPOINT request")
            self._db.execute("RELEASE SAVEPOINT request")

    def rollback(self) -> None:
        if self._in_batch:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            self._in_batch = False

    def _write(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        self._begin()
        try:
            return self._db.execute(sql, tuple(params))
        except sqlite3.OperationalError as exc:
            raise DiskFull(f"journal write failed: {exc}") from exc

    # ---- writes ---------------------------------------------------------------------------

    def put_effect(self, record: Mapping[str, Any], event: str, payload: Any = None,
                   *, new: bool = False) -> bool:
        """Store the effect's current (non-final) record and append the event that produced it.
        A stored final record is never overwritten (nothing is written; returns False): a
        final state never changes, whoever holds an older copy of the record."""
        eid = record["id"]
        cur = self._write(
            "INSERT INTO effects (id, state, name, submitted_at, finished_at, record)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET state = excluded.state,"
            " name = excluded.name, submitted_at = excluded.submitted_at,"
            " finished_at = excluded.finished_at, record = excluded.record"
            " WHERE effects.state IN ('queued', 'running')",
            (eid, record["state"], record.get("name"), record["submitted_at"],
             record.get("finished_at"), _pack(dict(record))),
        )
        if cur.rowcount != 1:
            log.error("refused to overwrite the final record of effect %s (event %s)", eid, event)
            return False
        if new:
            for key, value in (record.get("labels") or {}).items():
                self._write("INSERT OR REPLACE INTO labels VALUES (?, ?, ?)", (eid, key, value))
        self._write(
            "INSERT INTO events (effect_id, type, time, payload) VALUES (?, ?, ?, ?)",
            (eid, event, time.time(), None if payload is None else _pack(payload)),
        )
        return True

    def put_final(self, record: Mapping[str, Any], payload: Any = None) -> bool:
        """Store an effect's final record and its one ``finished`` event - unless the stored record
        is not ``queued``/``running`` any more: a final state never changes, so a second final
        write is refused here, in the statement itself. Returns whether it was written."""
        eid = record["id"]
        cur = self._write(
            "UPDATE effects SET state = ?, name = ?, submitted_at = ?, finished_at = ?, record = ?"
            " WHERE id = ? AND state IN ('queued', 'running')",
            (record["state"], record.get("name"), record["submitted_at"], record.get("finished_at"),
             _pack(dict(record)), eid),
        )
        if cur.rowcount != 1:
            return False
        self.append_event(eid, "finished", payload)
        return True

    def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self._begin()
        try:
            self._db.executemany(sql, rows)
        except sqlite3.OperationalError as exc:
            raise DiskFull(f"journal write failed: {exc}") from exc

    @staticmethod
    def new_effect_rows(records: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """Rows for :meth:`put_new_effects`, packed ahead (packing is most of the cost)."""
        return [(r["id"], r["state"], r.get("name"), r["submitted_at"], r.get("finished_at"), _pack(dict(r)))
                for r in records]

    def put_new_effects(self, rows: list[tuple[Any, ...]]) -> None:
        """Many new effects at once (a batch): their rows and 'submitted' events, but not their
        labels, which :meth:`put_labels` wrote in earlier slices."""
        now = time.time()
        self._write_many("INSERT INTO effects (id, state, name, submitted_at, finished_at, record)"
                         " VALUES (?, ?, ?, ?, ?, ?)", rows)
        self._write_many("INSERT INTO events (effect_id, type, time, payload) VALUES (?, ?, ?, ?)",
                         [(row[0], "submitted", now, None) for row in rows])

    def put_labels(self, records: Iterable[Mapping[str, Any]]) -> None:
        """The label rows of new effects (rows without an effect are invisible to every query)."""
        self._write_many("INSERT OR REPLACE INTO labels VALUES (?, ?, ?)",
                         [(r["id"], k, v) for r in records for k, v in (r.get("labels") or {}).items()])

    def delete_orphan_labels(self, low: str, high: str) -> int:
        """Label rows with ids in [low, high] whose effect was never written (an interrupted batch)."""
        self._begin()
        cur = self._db.execute("DELETE FROM labels WHERE effect_id BETWEEN ? AND ?"
                               " AND effect_id NOT IN (SELECT id FROM effects WHERE id BETWEEN ? AND ?)",
                               (low, high, low, high))
        return cur.rowcount

    def put_request_key(self, key: str, ids: list[str], created: float | None = None) -> None:
        self._write("INSERT INTO request_keys (key, ids, created) VALUES (?, ?, ?)",
                    (key, _pack(ids), time.time() if created is None else created))

    def prune_request_keys(self, older_than: float) -> int:
        """Forget request keys created before ``older_than`` (wall time); returns how many."""
        self._begin()
        try:
            cur = self._db.execute("DELETE FROM request_keys WHERE created < ?", (older_than,))
        except sqlite3.OperationalError as exc:
            raise DiskFull(f"journal write failed: {exc}") from exc
        return cur.rowcount

    def append_event(self, effect_id: str | None, event: str, payload: Any = None) -> None:
        self._write(
            "INSERT INTO events (effect_id, type, time, payload) VALUES (?, ?, ?, ?)",
            (effect_id, event, time.time(), None if payload is None else _pack(payload)),
        )

    def set_meta(self, key: str, value: Any) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, _pack(value)))

    def delete_effects(self, ids: list[str]) -> None:
        """Delete final effects; their request keys stay (see ``prune_request_keys``)."""
        for eid in ids:
            self._write("DELETE FROM effects WHERE id = ?", (eid,))
            self._write("DELETE FROM labels WHERE effect_id = ?", (eid,))
            self._write("DELETE FROM events WHERE effect_id = ?", (eid,))

    # ---- reads ----------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else _unpack(row[0])

    def get(self, effect_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT record FROM effects WHERE id = ?", (effect_id,)).fetchone()
        return None if row is None else dict(_unpack(row[0]))

    def get_packed(self, effect_id: str) -> tuple[str, bytes] | None:
        """``(state, encoded record)``: the stored bytes are the record's msgpack encoding."""
        row = self._db.execute("SELECT state, record FROM effects WHERE id = ?", (effect_id,)).fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def state(self, effect_id: str) -> str | None:
        """The stored state alone (no record decoded)."""
        row = self._db.execute("SELECT state FROM effects WHERE id = ?", (effect_id,)).fetchone()
        return None if row is None else str(row[0])

    def ids_for_request_key(self, key: str) -> list[str] | None:
        row = self._db.execute("SELECT ids FROM request_keys WHERE key = ?", (key,)).fetchone()
        return None if row is None else list(_unpack(row[0]))

    def unfinished(self) -> list[dict[str, Any]]:
        """Records in ``queued`` or ``running``, oldest first (for recovery)."""
        rows = self._db.execute(
            "SELECT record FROM effects WHERE state IN ('queued', 'running') ORDER BY id"
        ).fetchall()
        return [dict(_unpack(r[0])) for r in rows]

    def list_packed(self, *, states: list[str] | None = None, labels: Mapping[str, str] | None = None,
                    name: str | None = None, limit: int = 100,
                    before: str | None = None) -> Iterator[tuple[str, bytes]]:
        """``(id, encoded record)`` of matching effects, newest first, one row at a time (the
        caller may stop early; records are not decoded)."""
        sql = "SELECT id, record FROM effects e WHERE 1=1"
        params: list[Any] = []
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            params.extend(states)
        if name is not None:
            sql += " AND name = ?"
            params.append(name)
        if before is not None:
            sql += " AND id < ?"
            params.append(before)
        for key, value in (labels or {}).items():
            sql += " AND EXISTS (SELECT 1 FROM labels l WHERE l.effect_id = e.id AND l.key = ? AND l.value = ?)"
            params.extend((key, value))
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        for eid, blob in self._db.execute(sql, params):
            yield eid, bytes(blob)

    def iter_final_newest_first(self) -> Iterator[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT record FROM effects WHERE state NOT IN ('queued', 'running') ORDER BY id DESC")
        for (blob,) in rows:
            yield dict(_unpack(blob))

    def counts(self) -> dict[str, int]:
        return {state: n for state, n in self._db.execute(
            "SELECT state, COUNT(*) FROM effects GROUP BY state").fetchall()}

    def close(self) -> None:
        self.rollback()
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
        os.close(self._fd)
