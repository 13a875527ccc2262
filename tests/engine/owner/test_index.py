"""Tests of the SQLite index: order, odd paths, subtrees, threads, persistence."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import os
from pathlib import Path
import sqlite3
import threading
import tracemalloc

import pytest

from custom_components.mynas.engine import tree
from custom_components.mynas.engine.owner.index import Index, IndexEntry, IndexVersionError

FILE, DIR = tree.Kind.FILE, tree.Kind.DIR
F, P = "Photos", "bob"


def file(path: bytes, size: int = 1, digest: bytes | None = b"h" * 32) -> IndexEntry:
    return IndexEntry(path, FILE, size, 1_700_000_000_123_456_789, 0o644, digest)


def directory(path: bytes) -> IndexEntry:
    return IndexEntry(path, DIR, 0, 1_700_000_000_000_000_000, 0o755, None)


def paths(index: Index, folder: str = F, peer: str = P) -> list[bytes]:
    return [e.key for e in index.entries(folder, peer)]


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    with Index(tmp_path / "index.db") as opened:
        yield opened


ODD = [
    file(b"with space"),
    file(b"new\nline"),
    file(b"\xff\xfe not utf-8", digest=None),
    file("été/日本".encode(), size=0),
    directory("été".encode()),
    directory(b"a"),
    file(b"a/b", size=5 << 32),  # over 4 GiB
    file(b"a.txt"),
    file(b"a-b"),
    directory(b"a/c"),
    file(b"ab"),
    file(b"a0"),
    file(b"%_*?[x]"),
]


def test_round_trip_in_key_order(index: Index) -> None:
    index.record(F, P, ODD)
    assert list(index.entries(F, P)) == sorted(ODD, key=lambda e: e.key)
    # A directory sorts as its path plus "/": after "a-b" and "a.txt", before "a/b".
    assert [e.path for e in index.entries(F, P)][:5] == [b"%_*?[x]", b"a-b", b"a.txt", b"a", b"a/b"]


def test_order_is_the_walk_order(tmp_path: Path, index: Index) -> None:
    root = tmp_path / "tree"
    for name in ("a", "a b", "a.txt", "a-b", "ab", "a0", "é", "z"):
        (root / "x" / name).mkdir(parents=True)
        (root / "x" / name / "f").write_bytes(b"1")
        (root / (name + ".f")).write_bytes(b"22")
    (root / os.fsdecode(b"\xff")).write_bytes(b"")
    walked = list(tree.walk(str(root)))
    index.record(F, P, reversed([IndexEntry.from_entry(e, None) for e in walked]))
    assert [(e.path, e.kind, e.size, e.mtime_ns, e.mode) for e in index.entries(F, P)] == [
        (e.path, e.kind, e.size, e.mtime_ns, e.mode) for e in walked
    ]


def test_from_entry_and_key() -> None:
    entry = tree.Entry(b"d", DIR, 0, 7, 0o700)
    indexed = IndexEntry.from_entry(entry)
    assert indexed == IndexEntry(b"d", DIR, 0, 7, 0o700, None)
    assert indexed.key == b"d/"
    assert IndexEntry.from_entry(tree.Entry(b"f", FILE, 3, 8), b"x").key == b"f"


def test_record_replaces_and_pairs_are_separate(index: Index) -> None:
    index.record(F, P, [file(b"x", size=1), file(b"y")])
    index.record(F, P, [file(b"x", size=2, digest=None)])
    index.record(F, "carol", [file(b"z")])
    index.record("Music", P, [])
    assert [(e.path, e.size, e.hash) for e in index.entries(F, P)] == [
        (b"x", 2, None),
        (b"y", 1, b"h" * 32),
    ]
    assert paths(index, F, "carol") == [b"z"]
    assert paths(index, "Music", P) == []
    assert paths(index, "never", P) == []
    assert index.folders() == [("Music", P), (F, P), (F, "carol")]


def test_a_failed_record_records_nothing(index: Index) -> None:
    def entries() -> Iterator[IndexEntry]:
        yield file(b"one")
        raise OSError("the disk went away")

    index.record(F, P, [file(b"zero")])
    with pytest.raises(OSError, match="went away"):
        index.record(F, P, entries())
    assert paths(index) == [b"zero"]


def test_forget(index: Index) -> None:
    index.record(F, P, ODD)
    index.forget(F, P, [(b"a", DIR), (b"a.txt", FILE), (b"ab", DIR), (b"missing", FILE)])
    index.forget("unknown", P, [(b"a0", FILE)])
    keys = paths(index)
    assert b"a/" not in keys
    assert b"a.txt" not in keys
    assert {b"a/b", b"a/c/", b"ab", b"a0"} <= set(keys)


def test_forget_tree_keeps_siblings_sharing_the_prefix(index: Index) -> None:
    entries = [
        directory(b"a"),
        file(b"a/b"),
        directory(b"a/c"),
        file(b"a/c/d"),
        file(b"a/\xff"),
        file(b"a"),  # a file "a" may be indexed next to a directory "a" during a kind change
        file(b"a.txt"),
        directory(b"a b"),
        file(b"a b/c"),
        file(b"ab"),
        file(b"a0"),
        directory(b"b"),
        file(b"b/a"),
    ]
    index.record(F, P, entries)
    index.record(F, "carol", entries)
    index.forget_tree(F, P, b"a")
    assert paths(index) == [b"a", b"a b/", b"a b/c", b"a.txt", b"a0", b"ab", b"b/", b"b/a"]
    assert len(paths(index, F, "carol")) == len(entries)
    index.forget_tree(F, P, b"a b")
    assert paths(index) == [b"a", b"a.txt", b"a0", b"ab", b"b/", b"b/a"]
    with pytest.raises(ValueError, match="clear"):
        index.forget_tree(F, P, b"")


def test_clear_stats_and_folders(index: Index) -> None:
    index.record(F, P, [directory(b"d"), file(b"d/x", size=10), file(b"y", size=5)])
    index.record(F, "carol", [file(b"z", size=7)])
    assert index.stats(F, P) == (2, 15)
    assert index.stats(F, "carol") == (1, 7)
    assert index.stats("never", P) == (0, 0)
    index.forget(F, P, [(b"d/x", FILE), (b"y", FILE), (b"d", DIR)])
    assert index.stats(F, P) == (0, 0)
    # Known to hold nothing is not the same as never seen.
    assert index.folders() == [(F, P), (F, "carol")]
    index.clear(F, P)
    assert index.folders() == [(F, "carol")]
    assert paths(index, F, "carol") == [b"z"]


def test_the_root_mtime_of_a_pair(index: Index) -> None:
    """Unknown until recorded, per pair, replaced by the next record, gone with clear()."""
    assert index.root_mtime(F, P) is None
    index.record_root(F, P, 5)
    index.record_root(F, "carol", 7)
    index.record_root(F, P, 6)
    assert (index.root_mtime(F, P), index.root_mtime(F, "carol")) == (6, 7)
    assert index.folders() == [(F, P), (F, "carol")]  # recording the root makes a pair known
    index.clear(F, P)
    assert index.root_mtime(F, P) is None
    assert index.root_mtime(F, "carol") == 7


def test_rows_are_the_entries_as_stored(index: Index) -> None:
    index.record(F, P, [directory(b"d"), file(b"d/x", size=10)])
    assert list(index.rows(F, P)) == [
        (e.key, e.size, e.mtime_ns, e.mode, e.hash) for e in index.entries(F, P)
    ]


def test_persists_across_reopen(tmp_path: Path) -> None:
    with Index(tmp_path / "index.db") as first:
        first.record(F, P, ODD)
    with Index(tmp_path / "index.db") as second:
        assert list(second.entries(F, P)) == sorted(ODD, key=lambda e: e.key)
        assert second.folders() == [(F, P)]


def test_refuses_another_schema_version(tmp_path: Path) -> None:
    with Index(tmp_path / "index.db"):
        pass
    with sqlite3.connect(tmp_path / "index.db") as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE name = 'schema'")
    conn.close()
    with pytest.raises(IndexVersionError, match="format 99"):
        Index(tmp_path / "index.db")
    assert not (tmp_path / "index.db-wal").exists()  # the failed open closed its connection


def test_close_closes_every_connection(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.db")
    index.record(F, P, ODD)
    stream = index.entries(F, P)
    next(stream)
    worker = threading.Thread(target=index.stats, args=(F, P))
    worker.start()
    worker.join()
    assert (tmp_path / "index.db-wal").exists()
    index.close()
    # SQLite removes the WAL when the last connection to the database closes.
    assert not (tmp_path / "index.db-wal").exists()
    with pytest.raises(sqlite3.ProgrammingError):
        list(stream)  # past the rows it had already fetched
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        index.folders()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        next(index.entries(F, P))
    index.close()  # closing twice is harmless


def test_a_finished_or_abandoned_stream_closes_its_connection(index: Index) -> None:
    index.record(F, P, ODD)
    before = len(index._connections)
    assert len(list(index.entries(F, P))) == len(ODD)
    stream = index.entries(F, P)
    next(stream)
    assert len(index._connections) == before + 1
    stream.close()
    assert len(index._connections) == before


def test_a_stream_reads_one_snapshot_while_another_thread_commits(index: Index) -> None:
    original = [file(b"f%06d" % i, size=i) for i in range(0, 20_000, 2)]
    index.record(F, P, original)
    stream = index.entries(F, P)
    seen = [next(stream) for _ in range(10)]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for start in range(1, 20_000, 1000):  # many commits, interleaved keys
                index.record(F, P, [file(b"f%06d" % i) for i in range(start, start + 1000, 2)])
            index.forget(F, P, [(e.path, FILE) for e in original[5000:]])
            index.record(F, P, [file(b"f000100", size=999)])
        except BaseException as err:  # reported to the main thread
            errors.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()  # every commit lands while the stream is open, before its later chunks
    seen += list(stream)
    assert not errors
    assert seen == original
    now = list(index.entries(F, P))
    assert len(now) == 5000 + 10_000
    assert next(e for e in now if e.path == b"f000100").size == 999


def test_two_writer_threads_do_not_lock_each_other_out(index: Index) -> None:
    errors: list[BaseException] = []

    def writer(peer: str) -> None:
        try:
            for batch in range(40):
                index.record(
                    F, peer, [file(b"%s-%03d-%03d" % (peer.encode(), batch, i)) for i in range(50)]
                )
        except BaseException as err:  # reported to the main thread
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(peer,)) for peer in ("bob", "carol", "dan")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert [index.stats(F, peer)[0] for peer in ("bob", "carol", "dan")] == [2000] * 3


def test_a_stream_may_move_between_threads(index: Index) -> None:
    index.record(F, P, [file(b"x%d" % i) for i in range(5)])
    stream = index.entries(F, P)
    first = next(stream)
    rest: list[IndexEntry] = []
    thread = threading.Thread(target=lambda: rest.extend(stream))
    thread.start()
    thread.join()
    assert [first.path, *(e.path for e in rest)] == [b"x0", b"x1", b"x2", b"x3", b"x4"]


def test_streaming_does_not_load_all_rows(index: Index) -> None:
    count = 50_000
    for start in range(0, count, 5000):
        index.record(F, P, [file(b"dir/%08d" % i) for i in range(start, start + 5000)])
    tracemalloc.start()
    try:
        streamed = sum(1 for _ in index.entries(F, P))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert streamed == count
    assert peak < 2_000_000  # all rows at once would take about 15 MB


_FORMAT_1 = (
    "CREATE TABLE meta( name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE replicas("
    " id INTEGER PRIMARY KEY, folder TEXT NOT NULL, peer TEXT NOT NULL, UNIQUE(folder, peer))",
    "CREATE TABLE files("
    " replica INTEGER NOT NULL, key BLOB NOT NULL, size INTEGER NOT NULL,"
    " mtime_ns INTEGER NOT NULL, mode INTEGER NOT NULL, hash BLOB,"
    " PRIMARY KEY(replica, key)) WITHOUT ROWID",
    "CREATE TABLE roots( replica INTEGER PRIMARY KEY, mtime_ns INTEGER NOT NULL)",
    "INSERT INTO meta VALUES ('schema', 1)",
    "INSERT INTO replicas VALUES (1, 'Docs', 'bob')",
    "INSERT INTO files VALUES (1, x'61', 3, 7, 420, x'abcd')",
    "INSERT INTO files VALUES (1, x'642f', 0, 8, 493, NULL)",
)


def test_a_format_1_index_is_migrated_and_its_replicas_stay_plain(tmp_path: Path) -> None:
    """An index written before encryption opens as it was: every replica plain."""
    path = tmp_path / "index.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for statement in _FORMAT_1:
            conn.execute(statement)
        conn.commit()
    with Index(path) as index:
        assert index.folders() == [("Docs", "bob")]
        assert index.sealed("Docs", "bob") is False
        assert index.sealed("Docs", "carol") is None
        assert list(index.entries("Docs", "bob")) == [
            IndexEntry(b"a", tree.Kind.FILE, 3, 7, 420, b"\xab\xcd"),
            IndexEntry(b"d", tree.Kind.DIR, 0, 8, 493, None),
        ]
        assert next(iter(index.stored_rows("Docs", "bob"))) == (b"a", 3, 7, 420, b"\xab\xcd", None)
        index.record("Docs", "bob", [IndexEntry(b"b", tree.Kind.FILE, 1, 1, 420, b"h", b"s")])
        index.register("Sealed", "bob", sealed=True)
        assert index.sealed("Sealed", "bob") is True
    with Index(path) as index:  # format 2 now: opened as it is
        assert [row[5] for row in index.stored_rows("Docs", "bob")] == [None, b"s", None]
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT value FROM meta").fetchone() == (2,)
