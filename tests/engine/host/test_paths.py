"""Peer names and the syntax of jail-relative paths (paths.py): what a peer may name at all."""

from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st
import pytest

from custom_components.mynas.engine.errors import PathRefused
from custom_components.mynas.engine.host import paths
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.paths import check_path, validate_peer_name

from .jail_support import adversarial_paths

# --- peer names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "Bob's Pi 2", "é" * 64, "a" * 64, "日本"])
def test_peer_name_accepted(name: str) -> None:
    assert validate_peer_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "a" * 65, ".", "..", ".mynas", ".hidden", "a/b", "a\x00b", "a\nb", "a\u202eb", "😀" * 64],
)
def test_peer_name_refused(name: str) -> None:
    with pytest.raises(ValueError, match="peer name"):
        validate_peer_name(name)


# --- paths: syntax --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "why"),
    [
        (b"", "empty"),
        (b"/etc/passwd", "absolute"),
        (b"..", "'..'"),
        (b"a/../../b", "'..'"),
        (b".", "'.'"),
        (b"a/./b", "'.'"),
        (b"a//b", "empty component"),
        (b"a/", "ends with"),
        (b"a\x00b", "NUL"),
        (b"x" * 256, "longer than 255"),
        (b"a/" * 2048 + b"b", "longer than 4096"),
        (b"a/" * 256 + b"b", "levels deep"),
        (b".mynas", "reserved"),
        (b"a/.mynas/trash", "reserved"),
        (b".mynas-other", "reserved"),
    ],
)
def test_check_path_refuses(jail: Jail, rel: bytes, why: str) -> None:
    with pytest.raises(PathRefused, match=why):
        jail.check_path(rel)
    with pytest.raises(PathRefused, match=why):
        jail.resolve(rel)


@pytest.mark.parametrize(
    "rel",
    [b"a", b"a/b/c", b"x" * 255, b"...", b"..a", b"a..", b".hidden", b"a.mynas", b"mynas",
     "é/日本".encode(), b"new\nline", b"\xff\xfe", b"back\\slash", b"a/" * 255 + b"b"],
)  # fmt: skip
def test_check_path_accepts(jail: Jail, rel: bytes) -> None:
    assert jail.check_path(rel) == rel
    assert jail.resolve(rel) == os.fsencode(jail.root) + b"/" + rel


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_check_path_property(rel: bytes) -> None:
    try:
        check_path(rel)
    except PathRefused:
        return
    names = rel.split(b"/")
    assert b"\0" not in rel
    assert 0 < len(rel) <= paths.MAX_PATH
    assert len(names) <= paths.MAX_DEPTH
    for name in names:
        assert name not in (b"", b".", b"..")
        assert len(name) <= paths.MAX_NAME
        assert not name.startswith(b".mynas")


def acceptable(rel: bytes) -> bool:
    """The rules of ``check_path``, spelt out the slow way."""
    names = rel.split(b"/")
    return (
        0 < len(rel) <= paths.MAX_PATH
        and b"\0" not in rel
        and len(names) <= paths.MAX_DEPTH
        and all(
            name not in (b"", b".", b"..")
            and len(name) <= paths.MAX_NAME
            and not name.startswith(b".mynas")
            for name in names
        )
    )


@settings(max_examples=1000, deadline=None)
@given(rel=st.one_of(adversarial_paths, st.binary(max_size=300)))
def test_check_path_accepts_exactly_what_the_rules_allow(rel: bytes) -> None:
    """Its one-pass shortcut for common paths decides like the full check."""
    try:
        check_path(rel)
    except PathRefused:
        assert not acceptable(rel)
    else:
        assert acceptable(rel)
