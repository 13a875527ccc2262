"""Attack suite for the jail on disk (jailfs.py; docs/architecture.md, invariant 2).

Links the host made, special files, a jail root that is not a plain directory, paths too
long for this host, other jails and the trash: every path-taking operation refuses them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import os
from pathlib import Path
import stat
from typing import Any

from hypothesis import HealthCheck, given, settings
import pytest

from custom_components.mynas.engine.errors import PathRefused
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.paths import check_path
from custom_components.mynas.engine.host.space import HostedSpace

from .jail_support import MIB, MTIME, adversarial_paths, push, put, snapshot


@pytest.fixture(scope="module")
def trap(tmp_path_factory: pytest.TempPathFactory) -> tuple[Jail, Path]:
    """A jail full of host-made traps: links pointing out, a dangling link, a loop, a FIFO."""
    base = tmp_path_factory.mktemp("trap")
    (base / "outside").mkdir()
    (base / "outside" / "secret").write_bytes(b"secret")
    root = base / "storage"
    root.mkdir()
    jail = HostedSpace(root).jail("alice", 64 * MIB)
    (jail.root / "d" / "e").mkdir(parents=True)
    (jail.root / "d" / "g").write_bytes(b"g")
    (jail.root / "f").write_bytes(b"f")
    os.symlink(base / "outside", jail.root / "abs")
    os.symlink("../../outside", jail.root / "rel")
    os.symlink("../../../outside", jail.root / "d" / "up")
    os.symlink(base / "nowhere", jail.root / "dangling")
    os.symlink("loop", jail.root / "loop")
    os.mkfifo(jail.root / "fifo")
    return jail, base


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rel=adversarial_paths)
def test_resolve_property(trap: tuple[Jail, Path], rel: bytes) -> None:
    jail, _ = trap
    try:
        resolved = jail.resolve(rel)
    except PathRefused:
        return
    root = os.fsencode(jail.root)
    assert resolved == root + b"/" + rel
    # Strictly inside: no link on the way (realpath changes nothing) and no '..'.
    assert os.path.realpath(resolved) == os.path.realpath(root) + b"/" + rel
    path = root
    for name in rel.split(b"/"):
        path += b"/" + name
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            break
        assert not stat.S_ISLNK(info.st_mode)


@pytest.mark.parametrize(
    ("rel", "why"),
    [
        (b"abs", "symbolic link"),
        (b"abs/secret", "symbolic link"),
        (b"rel/secret", "symbolic link"),
        (b"d/up/secret", "symbolic link"),
        (b"dangling/x", "symbolic link"),
        (b"loop/x", "symbolic link"),
        (b"f/x", "not a directory"),
        (b"fifo", "neither a regular file nor a directory"),
    ],
)
def test_resolve_refuses_what_is_on_disk(trap: tuple[Jail, Path], rel: bytes, why: str) -> None:
    with pytest.raises(PathRefused, match=why):
        trap[0].resolve(rel)


@pytest.fixture
def links(jail: Jail, outside: Path, tmp_path: Path) -> list[bytes]:
    """Links the host made inside the jail, pointing out of it (or nowhere)."""
    os.symlink(outside, jail.root / "abs")
    os.symlink("../../outside", jail.root / "rel")
    os.symlink(outside / "secret.txt", jail.root / "file_link")
    os.symlink(tmp_path / "nowhere", jail.root / "dangling")
    (jail.root / "sub").mkdir()
    os.symlink("../../../outside", jail.root / "sub" / "up")
    return [b"abs", b"rel", b"file_link", b"dangling", b"sub/up"]


def every_operation(jail: Jail, rel: bytes) -> Iterator[Callable[[], object]]:
    """Each path-taking operation of a jail, applied to ``rel``."""
    yield lambda: jail.resolve(rel)
    yield lambda: jail.begin_upload(rel, 10, MTIME, 0o644)
    yield lambda: jail.delete(rel)
    yield lambda: jail.make_dir(rel, MTIME)
    yield lambda: jail.set_mtime(rel, MTIME)
    yield lambda: list(jail.list(rel))
    yield lambda: jail.open_read(rel)
    yield lambda: jail.hash_file(rel)
    yield lambda: jail.stat(rel)


def test_links_in_the_jail_lead_nowhere(
    jail: Jail, links: list[bytes], outside: Path, tmp_path: Path
) -> None:
    before = snapshot(outside)
    in_jail = snapshot(jail.root)
    used = jail.quota.used
    for link in links:
        for rel in (link, link + b"/secret.txt", link + b"/new/x", link + b"/dir/y"):
            assert isinstance(push(jail, {rel: b"evil"})[0], PathRefused)
            for operation in every_operation(jail, rel):
                with pytest.raises(PathRefused, match="symbolic link"):
                    operation()
    assert snapshot(outside) == before
    assert snapshot(jail.root) == in_jail
    assert not (tmp_path / "nowhere").exists()  # the dangling link made nothing appear
    assert jail.quota.used == used
    assert jail.quota.reserved == 0
    assert os.listdir(jail.tmp_dir) == []
    assert {e.path for e in jail.list()} == {b"sub"}  # links are never listed


def test_link_swapped_in_after_the_check_is_not_followed(
    jail: Jail, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: even if the lstat check were fooled, O_NOFOLLOW refuses the link."""
    link = os.fsencode(jail.root / "late")
    os.symlink(outside / "secret.txt", link)
    real_lstat = os.lstat

    def fooled(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        return real_lstat(outside / "secret.txt" if path == link else path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", fooled)
    with pytest.raises(PathRefused, match="late"):
        jail.open_read(b"late")


def test_special_file_is_never_opened(jail: Jail) -> None:
    os.mkfifo(jail.root / "fifo")  # opening a FIFO would block the thread
    for operation in every_operation(jail, b"fifo"):
        with pytest.raises(PathRefused, match="neither"):
            operation()
    assert list(jail.list()) == []


def test_directory_opened_for_reading_is_refused(jail: Jail) -> None:
    jail.make_dir(b"d")
    with pytest.raises(PathRefused, match="not a regular file"):
        jail.open_read(b"d")


def test_jail_root_that_is_a_link_is_refused(
    space: HostedSpace, outside: Path, tmp_path: Path
) -> None:
    os.symlink(outside, space.root / "bob")
    bob = space.jail("bob", 64 * MIB)
    before = snapshot(outside)
    for rel in (b"secret.txt", b"dir", b"new"):
        assert isinstance(push(bob, {rel: b"evil"})[0], PathRefused)
        for operation in every_operation(bob, rel):
            with pytest.raises(PathRefused, match="not a plain directory"):
                operation()
    for operation in (lambda: list(bob.list()), lambda: space.rescan("bob")):
        with pytest.raises(PathRefused, match="not a plain directory"):
            operation()
    assert snapshot(outside) == before
    space.remove_peer_data("bob")  # removes the link, not what it points to
    assert not os.path.lexists(space.root / "bob")
    assert snapshot(outside) == before


def test_missing_jail_root_is_refused(space: HostedSpace) -> None:
    bob = space.jail("bob", MIB)
    bob.root.rmdir()
    with pytest.raises(PathRefused, match="missing"):
        bob.resolve(b"x")


def test_paths_too_long_for_this_host_are_refused(jail: Jail) -> None:
    # Each accepted path must also fit as a trash path under PATH_MAX.
    rel = b"/".join([b"n" * 200] * 20)
    assert check_path(rel) == rel
    with pytest.raises(PathRefused, match="longer than this host can store"):
        jail.resolve(rel)


def test_peer_cannot_reach_trash_or_other_jails(space: HostedSpace, jail: Jail) -> None:
    bob = space.jail("bob", MIB)
    put(bob, b"private", b"bob's")
    put(jail, b"x", b"1")
    jail.delete(b"x")
    for rel in (b".mynas/trash/alice", b"../bob/private", b"../.mynas/trash/alice/x",
                b".mynas", b"/" + os.fsencode(bob.root / "private")):  # fmt: skip
        assert isinstance(push(jail, {rel: b"evil"})[0], PathRefused)
        for operation in every_operation(jail, rel):
            with pytest.raises(PathRefused):
                operation()
    assert (bob.root / "private").read_bytes() == b"bob's"
