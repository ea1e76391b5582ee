"""The journal: an append-only ``events`` table and an ``effects`` table of current records.

Both are written in one transaction per batch. The daemon opens a batch for everything it handles
in one turn of its loop and commits once (group commit), then answers: nothing is acknowledged
before its commit is durable (WAL + ``synchronous=FULL``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack

from effectd.ipc.errors import DiskFull

SCHEMA_VERSION = 1

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
CREATE TABLE IF NOT EXISTS request_keys (key TEXT PRIMARY KEY, ids BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    effect_id TEXT,
    type TEXT NOT NULL,
    time REAL NOT NULL,
    payload BLOB
);
CREATE INDEX IF NOT EXISTS events_effect ON events(effect_id);
"""


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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
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
            if version is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise JournalCorrupt(f"journal schema version {version}, this effectd knows {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise JournalCorrupt(str(exc)) from exc
        self.commit()

    # ---- batching -------------------------------------------------------------------------

    def _begin(self) -> None:
        if not self._in_batch:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_batch = True

    @property
    def dirty(self) -> bool:
        return self._in_batch

    def commit(self) -> None:
        """Make the current batch durable. On failure the batch is rolled back and DiskFull raised."""
        if not self._in_batch:
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self.rollback()
            raise DiskFull(f"journal commit failed: {exc}") from exc
        self._in_batch = False
        self.commits += 1

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

    def _write(self, sql: str, params: Iterable[Any] = ()) -> None:
        self._begin()
        try:
            self._db.execute(sql, tuple(params))
        except sqlite3.OperationalError as exc:
            raise DiskFull(f"journal write failed: {exc}") from exc

    # ---- writes ---------------------------------------------------------------------------

    def put_effect(self, record: Mapping[str, Any], event: str, payload: Any = None,
                   *, new: bool = False) -> None:
        """Store the effect's current record and append the event that produced it."""
        eid = record["id"]
        self._write(
            "INSERT OR REPLACE INTO effects (id, state, name, submitted_at, finished_at, record)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (eid, record["state"], record.get("name"), record["submitted_at"],
             record.get("finished_at"), _pack(dict(record))),
        )
        if new:
            for key, value in (record.get("labels") or {}).items():
                self._write("INSERT OR REPLACE INTO labels VALUES (?, ?, ?)", (eid, key, value))
        self._write(
            "INSERT INTO events (effect_id, type, time, payload) VALUES (?, ?, ?, ?)",
            (eid, event, time.time(), None if payload is None else _pack(payload)),
        )

    def put_request_key(self, key: str, ids: list[str]) -> None:
        self._write("INSERT INTO request_keys VALUES (?, ?)", (key, _pack(ids)))

    def append_event(self, effect_id: str | None, event: str, payload: Any = None) -> None:
        self._write(
            "INSERT INTO events (effect_id, type, time, payload) VALUES (?, ?, ?, ?)",
            (effect_id, event, time.time(), None if payload is None else _pack(payload)),
        )

    def set_meta(self, key: str, value: Any) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, _pack(value)))

    def delete_effects(self, ids: list[str], request_keys: Iterable[str] = ()) -> None:
        for key in request_keys:
            self._write("DELETE FROM request_keys WHERE key = ?", (key,))
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
