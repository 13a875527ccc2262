"""Invite codes: round trips, and no damaged code ever read as a (wrong) peer."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import string

from hypothesis import given, settings, strategies as st
from hypothesis.provisional import domains
import pytest

from custom_components.mynas.engine import identity, invite
from custom_components.mynas.engine.errors import InvalidInvite
from custom_components.mynas.engine.invite import Invite

# Fixed keys keep codes reproducible; any 32 bytes are a well-formed Ed25519 public key.
KEY = identity.public_key_line(identity.public_key_from_raw(bytes(range(32))))
OTHER_KEY = identity.public_key_line(identity.public_key_from_raw(bytes(range(1, 33))))

NOT_AN_INVITE = "This is not a MyNAS invite code"
NEWER = "made by a newer version of MyNAS: please update MyNAS"
DAMAGED = "damaged or incomplete: copy the whole code again"
NOT_VALID = "This invite code is not valid"


def seal(data: bytes) -> str:
    """Write a code the way the format describes, so content errors can be tested."""
    return seal_text("mynas1:" + base64.b32encode(data).decode().rstrip("=").lower())


def seal_text(text: str) -> str:
    """Append the check: the first 50 bits of SHA-256 of the text, in lowercase base32."""
    check = base64.b32encode(hashlib.sha256(text.encode()).digest()[:7]).decode()[:10]
    return text + check.lower()


def payload(name: str, *addresses: str, raw_key: bytes = bytes(range(32))) -> bytes:
    return raw_key + "\n".join((name, *addresses)).encode()


def test_known_code() -> None:
    """The format is a promise to other nodes: this code must stay readable as it is."""
    alice = Invite("Alice", ("alice.example.org:8022",), KEY)
    code = invite.encode(alice)
    assert code == seal(payload("Alice", "alice.example.org:8022"))
    assert code == (
        "mynas1:aaaqeayeaudaocajbifqydiob4ibceqtcqkrmfyydenbwha5dypuc3djmnsquylmnfrwkltfpbqw24dm"
        "muxg64thhi4damrs4gd3h5pcmc"
    )
    assert invite.decode(code) == alice
    assert len(code) < 150


@pytest.mark.parametrize(
    ("name", "addresses"),
    [
        ("Alice", ("203.0.113.7:8022",)),
        ("Grand-mère « Zoé » 🏠", ("[2001:db8::1]:8022",)),
        ('Bob "the builder" O\'Neill', ("nas.bob-family.example:443",)),
        ("東京の家", ("localhost:1", "[::1]:65535", "10.0.0.2:8022")),
        ("x" * 64, tuple(f"node{i}.example.net:{8000 + i}" for i in range(8))),
        ("👨‍👩‍👧 family", ("xn--bcher-kva.example:8022",)),
    ],
)
def test_round_trip(name: str, addresses: tuple[str, ...]) -> None:
    original = Invite(name, addresses, KEY)
    code = invite.encode(original)
    assert code.startswith("mynas1:")
    assert code.isascii()
    assert code.isprintable()
    assert " " not in code
    decoded = invite.decode(code)
    assert decoded == original
    assert decoded.fingerprint == identity.fingerprint(KEY)


def test_fields_are_canonical() -> None:
    given_forms = Invite(
        "  Alice \t",
        ("NAS.Example.ORG:08022", "[2001:DB8:0:0::1]:8022 ", " 192.0.2.1:22"),
        KEY + " alice@pi",
    )
    assert given_forms == Invite(
        "Alice", ("nas.example.org:8022", "[2001:db8::1]:8022", "192.0.2.1:22"), KEY
    )
    assert invite.decode(invite.encode(given_forms)) == given_forms


NAMES = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=64
).filter(lambda name: name.strip() and not set(name) & invite._FORBIDDEN_IN_NAME)
HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
    domains(max_length=200),
)
ADDRESSES = st.builds(lambda host, port: f"{host}:{port}", HOSTS, st.integers(1, 65535))


@settings(max_examples=200, deadline=None)
@given(
    name=NAMES,
    addresses=st.lists(ADDRESSES, min_size=1, max_size=8, unique_by=str.lower),
    raw_key=st.binary(min_size=32, max_size=32),
)
def test_round_trip_property(name: str, addresses: list[str], raw_key: bytes) -> None:
    key = identity.public_key_line(identity.public_key_from_raw(raw_key))
    original = Invite(name, tuple(addresses), key)
    assert invite.decode(invite.encode(original)) == original


# --- damaged codes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_code() -> str:
    return invite.encode(
        Invite("Zoé's Pi", ("zoe.example.org:8022", "[2001:db8::7]:8022"), OTHER_KEY)
    )


def test_every_single_character_change_is_rejected(real_code: str) -> None:
    """Substitute, delete or insert one character anywhere: never an Invite back."""
    alphabet = sorted(
        set(string.ascii_lowercase + "234567")
        | set(real_code)
        | set(string.ascii_uppercase + "0189:=-_+/.,;!?'\"é€\x00")
    )
    variants = set()
    for position in range(len(real_code)):
        variants.add(real_code[:position] + real_code[position + 1 :])
        for char in alphabet:
            variants.add(real_code[:position] + char + real_code[position + 1 :])
            variants.add(real_code[:position] + char + real_code[position:])
    for char in alphabet:
        variants.add(real_code + char)
    # Blanks are the one harmless change (see test_wrapped_code), so none is tried here.
    variants.discard(real_code)
    assert len(variants) > 10_000

    for variant in variants:
        with pytest.raises(InvalidInvite):
            invite.decode(variant)


def test_every_truncation_is_rejected(real_code: str) -> None:
    for cut in range(len(real_code)):
        with pytest.raises(InvalidInvite):
            invite.decode(real_code[:cut])
        with pytest.raises(InvalidInvite):
            invite.decode(real_code[cut + 1 :])


def test_damaged_code_message(real_code: str) -> None:
    for damaged in (
        real_code[:-1],
        real_code[:40],
        "mynas1:",
        "mynas1:abc",
        real_code[:20] + "x" + real_code[21:],
        real_code.upper(),
        "Mynas1:" + real_code[7:],
        real_code + "a",
    ):
        with pytest.raises(InvalidInvite, match=DAMAGED):
            invite.decode(damaged)


def test_wrapped_code_decodes(real_code: str) -> None:
    expected = invite.decode(real_code)
    chunks = [real_code[i : i + 30] for i in range(0, len(real_code), 30)]
    for wrapped in (
        "\n".join(chunks),
        "  " + "\r\n".join(chunks) + "\n\n",
        " ".join(chunks),
        "\u200b".join(chunks),  # zero-width spaces that some apps insert to wrap words
        "\t" + real_code + " \u00a0",
    ):
        assert invite.decode(wrapped) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "hello",
        "mynas:abc",
        "mynas0:abc",
        "mynas01:abc",
        "nas1:abcdefgh",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f",
        "https://example.org/mynas1:abc",
    ],
)
def test_not_an_invite(text: str) -> None:
    with pytest.raises(InvalidInvite, match=NOT_AN_INVITE) as caught:
        invite.decode(text)
    assert "mynas1:" in str(caught.value)


@pytest.mark.parametrize("text", ["mynas2:abcdefghijklmnop", "mynas10:x", "MYNAS3:whatever"])
def test_newer_version(text: str) -> None:
    with pytest.raises(InvalidInvite, match=NEWER):
        invite.decode(text)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (payload("", "a.example:1"), "node name must be 1 to 64 characters"),
        (payload("   ", "a.example:1"), "node name must be 1 to 64 characters"),
        (payload("x" * 65, "a.example:1"), "node name must be 1 to 64 characters"),
        (payload("al\x07ice", "a.example:1"), r"control character \(0x0007\)"),
        (payload("al\u202eice", "a.example:1"), r"control character \(0x202e\)"),
        (payload("Alice"), "at least one address"),
        (payload("Alice", *(f"h{i}.example:1" for i in range(9))), "at most 8 addresses"),
        (payload("Alice", "a.example:1", "A.example:1"), "listed twice"),
        (payload("Alice", "a.example:0"), "invalid address 'a.example:0': the port"),
        (payload("Alice", "a.example:65536"), "the port must be a number from 1 to 65535"),
        (payload("Alice", "a.example"), "no port"),
        (payload("Alice", "a_b.example:1"), "not a valid host name"),
        (payload("Alice", "2001:db8::1:8022"), "put an IPv6 address in brackets"),
        (payload("Alice", "[2001:db8::x]:1"), "not an IPv6 address"),
        (payload("Alice", "[fe80::1%eth0]:1"), "IPv6 zone"),
        (payload("Alice", "[::1]8022"), r"as \[addr\]:port"),
        (payload("Alice", "1.2.3:1"), "not a valid host name or IP address"),
        (payload("Alice", "300.1.1.1:1"), "not a valid host name or IP address"),
        (bytes(range(31)), "too short to hold a key"),
        (bytes(range(32)) + b"\xffAlice\na.example:1", "its text is not UTF-8"),
        (payload(" Alice", "a.example:1"), "not written canonically"),
        (payload("Alice", "A.example:1"), "not written canonically"),
    ],
)
def test_bad_content(content: bytes, message: str) -> None:
    with pytest.raises(InvalidInvite, match=message) as caught:
        invite.decode(seal(content))
    assert str(caught.value).startswith(NOT_VALID)


def test_non_canonical_base32_is_rejected() -> None:
    """The unused low bits of the last character must be zero: one spelling per invite."""
    code = invite.encode(Invite("Al", ("a.example:1",), KEY))
    text = code[:-10]  # 46 bytes of payload: 74 characters, the last one with 2 unused bits
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    changed = text[:-1] + alphabet[alphabet.index(text[-1]) | 1]
    assert changed != text
    assert _b32(changed) == _b32(text)
    with pytest.raises(InvalidInvite, match="not written canonically"):
        invite.decode(seal_text(changed))


def _b32(text: str) -> bytes:
    payload = text.removeprefix("mynas1:").upper()
    return base64.b32decode(payload + "=" * (-len(payload) % 8))


def test_malformed_base32_length() -> None:
    # 8k+1 base32 characters can encode no whole number of bytes.
    with pytest.raises(InvalidInvite, match="payload is malformed"):
        invite.decode(seal_text("mynas1:" + "a" * 57))


# --- building invites and addresses ---------------------------------------------------------


def test_invite_refuses_bad_fields() -> None:
    with pytest.raises(ValueError, match="invalid public key: not an Ed25519 public key"):
        Invite("Alice", ("a.example:1",), "ssh-rsa AAAAB3NzaC1yc2E")
    with pytest.raises(ValueError, match="node name"):
        Invite("", ("a.example:1",), KEY)
    with pytest.raises(ValueError, match="at least one address"):
        Invite("Alice", (), KEY)
    with pytest.raises(ValueError, match="control character"):
        Invite("Al\nice", ("a.example:1",), KEY)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("nas.example.org:8022", "nas.example.org", 8022),
        ("NAS.Example.org:8022", "nas.example.org", 8022),
        ("localhost:1", "localhost", 1),
        ("192.0.2.1:65535", "192.0.2.1", 65535),
        ("[2001:DB8::0:1]:8022", "2001:db8::1", 8022),
        ("[::FFFF:c000:0201]:22", "::ffff:192.0.2.1", 22),
        (" host-1.example:080 ", "host-1.example", 80),
    ],
)
def test_parse_address(text: str, host: str, port: int) -> None:
    assert invite.parse_address(text) == (host, port)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":8022",
        "host:",
        "host:+1",
        "host:١٢",  # Arabic-Indic digits that int() would accept
        "host:123456",
        "-host.example:1",
        "host-.example:1",
        "host..example:1",
        "host.example.:1",
        "hôst.example:1",
        "host example:1",
        "[]:1",
        "[2001:db8::1]",
        "[1.2.3.4]:1",
        "01.2.3.4:1",
        "123:1",
        "a" * 64 + ".example:1",
        ".".join(["a" * 63] * 4) + ":1",
    ],
)
def test_parse_address_refusals(text: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        invite.parse_address(text)


def test_format_address() -> None:
    assert invite.format_address("nas.example.org", 8022) == "nas.example.org:8022"
    assert invite.format_address("192.0.2.1", 22) == "192.0.2.1:22"
    assert invite.format_address("2001:db8::1", 8022) == "[2001:db8::1]:8022"
    for address in ("[2001:db8::1]:8022", "192.0.2.1:22", "nas.example.org:8022"):
        assert invite.format_address(*invite.parse_address(address)) == address


@settings(max_examples=200, deadline=None)
@given(address=st.ip_addresses(), port=st.integers(1, 65535))
def test_ip_address_property(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    assert invite.parse_address(invite.format_address(str(address), port)) == (str(address), port)
