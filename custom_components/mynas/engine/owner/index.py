"""The index: what each peer holds of each folder, in one SQLite database per node.

It is the source of truth for "what changed since the last run": the scanner diffs the
local walk against it, so a run with nothing changed never lists the peer. A push records
a file only once the host has acknowledged it, so the index never claims more than the peer
holds.

A row is keyed by ``(replica, key)`` where ``key`` is the entry's ``tree.sort_key``, so
``ORDER BY key`` is the canonical order of every other stream. The path and the kind are
not stored: a directory's key is its path plus ``b"/"`` and no file name can end with
``b"/"``, so the key alone gives both back (rows stay small at 100,000+ files).

Format 2 added what verify compares with (issue 15) and encrypted replicas: per file the
SHA-256 of the bytes the host stores (``stored``; NULL for a plain replica, whose stored
bytes are the file's own: ``hash`` then says it), and per replica whether it is sealed.
A format 1 file is migrated in place when opened: its replicas are plain, as they were.

Threads: each thread gets its own connection, and each ``entries()`` stream its own, so a
scan can stream a consistent snapshot (WAL mode: readers never wait for the writer) while
another thread commits acknowledged files. Everything here blocks: call it from worker
threads, never from an event loop.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
import contextlib
from dataclasses import dataclass
import os
import sqlite3
import threading
from typing import Any, Self

from .. import tree
from ..errors import MyNasError

SCHEMA_VERSION = 2
_FETCH_ROWS = 1024  # rows per fetchmany: bounded memory, few round trips into C
_BUSY_TIMEOUT = 30.0  # seconds a writer waits for another writer's transaction

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta( name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    # One row per (folder, peer): a small integer id instead of two strings in every file row.
    "CREATE TABLE IF NOT EXISTS replicas("
    " id INTEGER PRIMARY KEY, folder TEXT NOT NULL, peer TEXT NOT NULL,"
    " sealed INTEGER NOT NULL DEFAULT 0, UNIQUE(folder, peer))",
    "CREATE TABLE IF NOT EXISTS files("
    " replica INTEGER NOT NULL, key BLOB NOT NULL, size INTEGER NOT NULL,"
    " mtime_ns INTEGER NOT NULL, mode INTEGER NOT NULL, hash BLOB, stored BLOB,"
    " PRIMARY KEY(replica, key)) WITHOUT ROWID",
    # The mtime the peer's copy of the folder itself got (the root is no entry of its own).
    # Added after format 1 was out: older versions ignore it, and a missing row only costs
    # a connection to set that mtime again.
    "CREATE TABLE IF NOT EXISTS roots( replica INTEGER PRIMARY KEY, mtime_ns INTEGER NOT NULL)",
)
# From format 1: the same tables, two columns more (existing replicas are plain).
_MIGRATE_1 = (
    "ALTER TABLE replicas ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE files ADD COLUMN stored BLOB",
)


class IndexVersionError(MyNasError):
    """The index file was written by another, incompatible version of MyNAS."""

    def __init__(self, path: str, found: int) -> None:
        self.path = path
        self.found = found
        super().__init__(
            f"the index {path} has format {found}, this MyNAS reads format {SCHEMA_VERSION}: "
            "update MyNAS, or move the file away to rebuild it from the peers"
        )


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One file or directory as the peer holds it, with its content hash if known.

    ``stored`` is the hash of the bytes the host stores when they are not the file's own
    (a sealed replica); None for a plain replica, or when unknown (adopted from a listing).
    """

    path: bytes
    kind: tree.Kind
    size: int
    mtime_ns: int
    mode: int
    hash: bytes | None
    stored: bytes | None = None

    @property
    def key(self) -> bytes:
        """Return the entry's canonical sort key."""
        return tree.sort_key(self.path, self.kind)

    @classmethod
    def from_entry(
        cls, entry: tree.Entry, hash: bytes | None = None, stored: bytes | None = None
    ) -> Self:
        """Return the index entry of a walked entry, as sent with content ``hash``."""
        return cls(entry.path, entry.kind, entry.size, entry.mtime_ns, entry.mode, hash, stored)

    @classmethod
    def from_row(
        cls, key: bytes, size: int, mtime_ns: int, mode: int, digest: bytes | None
    ) -> Self:
        """Return the entry of one ``IndexRow``."""
        if key[-1] == 0x2F:  # b"/": only a directory's key ends so
            return cls(key[:-1], tree.Kind.DIR, size, mtime_ns, mode, digest)
        return cls(key, tree.Kind.FILE, size, mtime_ns, mode, digest)


type IndexRow = tuple[bytes, int, int, int, bytes | None]
"""One row as stored: ``(sort_key, size, mtime_ns, mode, hash)`` (see ``Index.rows``).

Its first four items line up with a ``tree.Row`` of the same entry.
"""

type StoredRow = tuple[bytes, int, int, int, bytes | None, bytes | None]
"""An ``IndexRow`` with the stored bytes' hash last (``Index.stored_rows``, for verify)."""


class Index:
    """The SQLite index of one node: for each (folder, peer), the entries the peer holds."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: set[sqlite3.Connection] = set()
        self._closed = False
        try:
            self._create_schema()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection this index opened, in any thread.

        Call it once no other thread uses the index any more; later calls raise
        ``sqlite3.ProgrammingError``.
        """
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, set()
        for conn in connections:
            conn.close()

    def entries(self, folder: str, peer: str) -> Iterator[IndexEntry]:
        """Yield what ``peer`` holds of ``folder`` in ascending key order, streamed.

        The stream reads one snapshot, taken at its first item, whatever other threads
        commit meanwhile. It has a connection of its own (closed when the stream ends or is
        closed), so it may be advanced from any thread, one at a time.
        """
        with contextlib.closing(self.rows(folder, peer)) as rows:
            for row in rows:
                yield IndexEntry.from_row(*row)

    def rows(self, folder: str, peer: str) -> Generator[IndexRow]:
        """``entries`` as raw ``IndexRow`` tuples: no object per entry (for scans)."""
        return self._rows("key, size, mtime_ns, mode, hash", folder, peer)

    def stored_rows(self, folder: str, peer: str) -> Generator[StoredRow]:
        """``rows`` with the hash of the stored bytes last (what verify compares with)."""
        return self._rows("key, size, mtime_ns, mode, hash, stored", folder, peer)

    def _rows(self, columns: str, folder: str, peer: str) -> Generator[Any]:
        conn = self._connect()
        try:
            # ``columns`` is one of this class's constants, never data.
            cursor = conn.execute(
                f"SELECT {columns} FROM files"  # noqa: S608
                " WHERE replica = (SELECT id FROM replicas WHERE folder = ? AND peer = ?)"
                " ORDER BY key",
                (folder, peer),
            )
            while rows := cursor.fetchmany(_FETCH_ROWS):
                yield from rows
        finally:
            self._release(conn)

    def record(self, folder: str, peer: str, entries: Iterable[IndexEntry]) -> None:
        """Insert or replace ``entries`` for (folder, peer), in one transaction."""
        with self._transaction() as conn:
            replica = self._replica(conn, folder, peer)
            conn.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((replica, e.key, e.size, e.mtime_ns, e.mode, e.hash, e.stored) for e in entries),
            )

    def sealed(self, folder: str, peer: str) -> bool | None:
        """Return whether the replica of (folder, peer) is sealed; None for an unknown pair."""
        row = (
            self._conn()
            .execute("SELECT sealed FROM replicas WHERE folder = ? AND peer = ?", (folder, peer))
            .fetchone()
        )
        return None if row is None else bool(row[0])

    def register(self, folder: str, peer: str, *, sealed: bool) -> None:
        """Make (folder, peer) known, its replica plain or ``sealed``, even while empty."""
        with self._transaction() as conn:
            replica = self._replica(conn, folder, peer)
            conn.execute("UPDATE replicas SET sealed = ? WHERE id = ?", (int(sealed), replica))

    def forget(self, folder: str, peer: str, paths: Iterable[tuple[bytes, tree.Kind]]) -> None:
        """Delete the rows of ``paths`` (path, kind) for (folder, peer), in one transaction."""
        with self._transaction() as conn:
            conn.executemany(
                "DELETE FROM files"
                " WHERE replica = (SELECT id FROM replicas WHERE folder = ? AND peer = ?)"
                " AND key = ?",
                ((folder, peer, tree.sort_key(path, kind)) for path, kind in paths),
            )

    def forget_tree(self, folder: str, peer: str, dir_path: bytes) -> None:
        """Delete the row of directory ``dir_path`` and every row below it."""
        if not dir_path:
            raise ValueError("forget_tree needs a directory path; clear() forgets a folder")
        # Keys from dir_path + b"/" (the directory itself) up to, not including,
        # dir_path + b"0" ("/" + 1) are exactly the subtree, siblings like b"a.txt" or b"ab"
        # fall outside. A range, not LIKE: LIKE treats keys as text and "_" / "%" as wildcards.
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM files"
                " WHERE replica = (SELECT id FROM replicas WHERE folder = ? AND peer = ?)"
                " AND key >= ? AND key < ?",
                (folder, peer, dir_path + b"/", dir_path + b"0"),
            )

    def clear(self, folder: str, peer: str) -> None:
        """Forget everything about (folder, peer), which then leaves ``folders()``."""
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM files"
                " WHERE replica = (SELECT id FROM replicas WHERE folder = ? AND peer = ?)",
                (folder, peer),
            )
            conn.execute(
                "DELETE FROM roots"
                " WHERE replica = (SELECT id FROM replicas WHERE folder = ? AND peer = ?)",
                (folder, peer),
            )
            conn.execute("DELETE FROM replicas WHERE folder = ? AND peer = ?", (folder, peer))

    def root_mtime(self, folder: str, peer: str) -> int | None:
        """Return the mtime the peer's copy of the folder itself has, None if unknown."""
        row = (
            self._conn()
            .execute(
                "SELECT mtime_ns FROM roots"
                " WHERE replica = (SELECT id FROM replicas WHERE folder = ? AND peer = ?)",
                (folder, peer),
            )
            .fetchone()
        )
        return None if row is None else int(row[0])

    def record_root(self, folder: str, peer: str, mtime_ns: int) -> None:
        """Remember the mtime the peer's copy of the folder itself now has."""
        with self._transaction() as conn:
            replica = self._replica(conn, folder, peer)
            conn.execute("INSERT OR REPLACE INTO roots VALUES (?, ?)", (replica, mtime_ns))

    def stats(self, folder: str, peer: str) -> tuple[int, int]:
        """Return how many files (directories not counted) and bytes ``peer`` holds."""
        files, size = (
            self._conn()
            .execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM files"
                " WHERE replica = (SELECT id FROM replicas WHERE folder = ? AND peer = ?)"
                " AND substr(key, -1) <> x'2f'",  # x'2f' is b"/": directories are not files
                (folder, peer),
            )
            .fetchone()
        )
        return files, size

    def folders(self) -> list[tuple[str, str]]:
        """Return every (folder, peer) recorded since it was last cleared, sorted.

        A pair stays listed when all its rows were forgotten: "the peer holds nothing" is
        then known, unlike for a pair the index has never seen.
        """
        rows = self._conn().execute("SELECT folder, peer FROM replicas ORDER BY folder, peer")
        return [(folder, peer) for folder, peer in rows]

    @staticmethod
    def _replica(conn: sqlite3.Connection, folder: str, peer: str) -> int:
        """Return the id of (folder, peer), adding the pair (inside a write transaction)."""
        conn.execute(
            "INSERT INTO replicas(folder, peer) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (folder, peer),
        )
        (replica,) = conn.execute(
            "SELECT id FROM replicas WHERE folder = ? AND peer = ?", (folder, peer)
        ).fetchone()
        return int(replica)

    def _create_schema(self) -> None:
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")  # stored in the file: once is enough
        with self._transaction():
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] == 1:
                for statement in _MIGRATE_1:
                    conn.execute(statement)
                conn.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise IndexVersionError(self._path, row[0])

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False lets close() close every thread's connection and lets a
        # stream move between threads; each connection is still used by one thread at a time.
        conn = sqlite3.connect(
            self._path, timeout=_BUSY_TIMEOUT, autocommit=True, check_same_thread=False
        )
        # In WAL mode NORMAL syncs at checkpoints only: a power cut may lose the last acks
        # (those files are sent again), never corrupt the database.
        conn.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            if not self._closed:
                self._connections.add(conn)
                return conn
        conn.close()
        raise sqlite3.ProgrammingError("the index is closed")

    def _release(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
        conn.close()

    def _conn(self) -> sqlite3.Connection:
        """Return this thread's connection, opening it on first use."""
        if self._closed:
            raise sqlite3.ProgrammingError("the index is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block as one write transaction on this thread's connection."""
        conn = self._conn()
        # IMMEDIATE takes the write lock up front: two writers queue on the busy timeout
        # instead of one failing to upgrade a read lock ("database is locked").
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
