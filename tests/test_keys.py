"""Key validation: every hostile request target is refused before any file-system call."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest

from cosedge.keys import (
    INTERNAL_PREFIX,
    MAX_KEY_BYTES,
    MAX_SEGMENT_BYTES,
    BadKey,
    Target,
    encode_key,
    encode_query,
    parse_target,
)


def _code(uri: bytes) -> str:
    with pytest.raises(BadKey) as info:
        parse_target(uri)
    assert info.value.message == str(info.value)
    return info.value.code


@pytest.mark.parametrize(
    ("uri", "segments", "query"),
    [
        (b"/1.jpg", ("1.jpg",), None),
        (b"/images/2017/1.jpg", ("images", "2017", "1.jpg"), None),
        (b"/1.jpg?x=1&y", ("1.jpg",), b"x=1&y"),
        (b"/1.jpg?", ("1.jpg",), b""),
        (b"/a%20b.txt", ("a b.txt",), None),
        (b"/a+b.txt", ("a+b.txt",), None),
        (b"/%E4%B8%AD%E6%96%87.png", ("\u4e2d\u6587.png",), None),
        (b"/a%2fb", ("a", "b"), None),
        (b"/%25", ("%",), None),
        (b"/100%25.txt", ("100%.txt",), None),
        (b"/...", ("...",), None),
        (b"/..a", ("..a",), None),
        (b"/a.", ("a.",), None),
        (b"/cosedge", ("cosedge",), None),
        (b"/x.cosedge", ("x.cosedge",), None),
        (b"/", (), None),
        (b"/1.jpg#frag", ("1.jpg",), None),
    ],
)
def test_valid_keys(uri: bytes, segments: tuple[str, ...], query: bytes | None) -> None:
    """Ordinary keys, folders, UTF-8 names and queries are parsed into segments."""
    target = parse_target(uri)
    assert target == Target(None, segments, query)
    assert target.key == "/".join(segments)


@pytest.mark.parametrize(
    "uri",
    [
        b"/../etc/passwd",
        b"/a/../../etc/passwd",
        b"/..",
        b"/.",
        b"/a/./b",
        b"/%2e%2e/etc/passwd",
        b"/%2E%2E/etc/passwd",
        b"/.%2e/etc/passwd",
        b"/a/%2e",
        b"/..%2fetc%2fpasswd",
        b"/..%2Fetc/passwd",
        b"/a%2f..%2f..%2fetc",
        b"/..%5c..%5cetc%5cpasswd",
        b"/a%5cb",
        b"/a\\b",
        b"/%252e%252e/etc/passwd",
        b"/%252E%252E%252Fetc",
        b"//evil.example/x",
        b"/a//b",
        b"/a/",
    ],
)
def test_traversal_refused(uri: bytes) -> None:
    """Dot segments, encoded or double-encoded, backslashes and empty segments are InvalidURI."""
    assert _code(uri) == "InvalidURI"


def test_literal_percent_keys_allowed() -> None:
    """A key that merely contains '%' after decoding, and nothing forbidden after a second decoding, is fine."""
    assert parse_target(b"/a%25252e").segments == ("a%252e",)
    assert parse_target(b"/%2525").segments == ("%25",)
    assert parse_target(b"/50%25off").segments == ("50%off",)


@pytest.mark.parametrize(
    "uri",
    [
        b"/a%00b",
        b"/%00",
        b"/a%0d%0aSet-Cookie:x",
        b"/a%0a",
        b"/a%09b",
        b"/a%1fb",
        b"/a%7fb",
        b"/%2500",  # double-encoded NUL
        b"/a%250d%250a",  # double-encoded CR/LF
        b"/a%255c",  # double-encoded backslash
    ],
)
def test_nul_and_control_bytes_refused(uri: bytes) -> None:
    """NUL and control characters, also double-encoded, are InvalidURI."""
    assert _code(uri) == "InvalidURI"


def test_key_length_limit() -> None:
    """Keys up to 850 bytes are accepted (after decoding); longer ones are KeyTooLong."""
    segment = "a" * 200
    ok = "/".join([segment] * 4) + "/" + "b" * (MAX_KEY_BYTES - 4 * 201)
    assert len(ok.encode()) == MAX_KEY_BYTES
    assert parse_target(b"/" + ok.encode()).key == ok
    assert _code(b"/" + ok.encode() + b"c") == "KeyTooLong"


def test_key_length_counts_decoded_bytes() -> None:
    """The 850-byte limit is on the decoded key: encoding does not make a key too long."""
    encoded = b"/" + b"%41" * MAX_KEY_BYTES  # 850 'A's, 2550 bytes encoded
    with pytest.raises(BadKey):
        parse_target(encoded)  # a single 850-byte segment is over the segment limit
    folders = b"/" + b"/".join([b"%41" * 100] * 8) + b"/" + b"%41" * 42
    assert len(unquote_to_bytes(folders[1:])) == MAX_KEY_BYTES
    assert len(parse_target(folders).segments) == 9
    utf8 = "\u4e2d".encode() * 284  # 852 bytes of UTF-8
    assert _code(b"/" + utf8) == "KeyTooLong"


def test_segment_length_limit() -> None:
    """A path segment longer than 255 bytes (a file name) is KeyTooLong."""
    assert parse_target(b"/" + b"a" * MAX_SEGMENT_BYTES).segments == ("a" * MAX_SEGMENT_BYTES,)
    assert _code(b"/" + b"a" * (MAX_SEGMENT_BYTES + 1)) == "KeyTooLong"
    assert _code(b"/dir/" + b"a" * (MAX_SEGMENT_BYTES + 1) + b"/x") == "KeyTooLong"
    # 86 three-byte characters: 258 bytes in 86 characters.
    assert _code(b"/" + "\u4e2d".encode() * 86) == "KeyTooLong"


@pytest.mark.parametrize(
    "uri",
    [
        b"/.cosedge",
        b"/.cosedge/tmp/x.part",
        b"/a/.cosedge-meta",
        b"/.cosedgefoo",
        b"/%2ecosedge/tmp",
        b"/%252ecosedge",
    ],
)
def test_internal_names_unreachable(uri: bytes) -> None:
    """No segment may start with '.cosedge', cosedge's own names, however encoded."""
    assert INTERNAL_PREFIX == ".cosedge"
    assert _code(uri) == "InvalidURI"


@pytest.mark.parametrize("uri", [b"/a%", b"/a%2", b"/a%zz", b"/a%g0", b"/%%41", b"/a%2x"])
def test_malformed_percent_refused(uri: bytes) -> None:
    """A '%' not followed by two hex digits is InvalidURI."""
    assert _code(uri) == "InvalidURI"


@pytest.mark.parametrize("uri", [b"/%ff", b"/%c0%ae%c0%ae/etc", b"/a%e4%b8", b"/\xff", b"/%ed%a0%80"])
def test_non_utf8_refused(uri: bytes) -> None:
    """Keys that are not valid UTF-8 (overlong dots, surrogates, stray bytes) are InvalidURI."""
    assert _code(uri) == "InvalidURI"


def test_absolute_form_target() -> None:
    """An absolute-form target yields its authority separately from the key."""
    assert parse_target(b"http://evil.example/x?q") == Target(b"evil.example", ("x",), b"q")
    assert parse_target(b"HTTPS://Bucket-1.file.myqcloud.com/a/b") == Target(
        b"Bucket-1.file.myqcloud.com", ("a", "b"), None
    )
    assert parse_target(b"http://evil.example") == Target(b"evil.example", (), None)
    assert parse_target(b"http://evil.example?x") == Target(b"evil.example", (), b"x")
    # The key part is validated like any other.
    assert _code(b"http://h.example/../etc/passwd") == "InvalidURI"
    assert _code(b"http://h.example/%00") == "InvalidURI"


@pytest.mark.parametrize("uri", [b"*", b"a/b", b"ftp://h/x", b"evil.example/x", b"", b"file:///etc/passwd"])
def test_non_path_targets_refused(uri: bytes) -> None:
    """Asterisk-form, relative and other-scheme targets are InvalidURI."""
    assert _code(uri) == "InvalidURI"


@pytest.mark.parametrize(
    ("segments", "encoded"),
    [
        (("1.jpg",), b"1.jpg"),
        (("a b", "c"), b"a%20b/c"),
        (("line\r\nbreak",), b"line%0D%0Abreak"),
        (("q?x#y",), b"q%3Fx%23y"),
        (("100%",), b"100%25"),
        (("\u4e2d",), b"%E4%B8%AD"),
        (("a+b=c&d;e",), b"a+b=c&d;e"),
        (('"<>\\^`{|}',), b"%22%3C%3E%5C%5E%60%7B%7C%7D"),
    ],
)
def test_encode_key(segments: tuple[str, ...], encoded: bytes) -> None:
    """Segments are percent-encoded into one safe, single-line URL path."""
    assert encode_key(segments) == encoded


@pytest.mark.parametrize(
    "key",
    [
        "1.jpg",
        "images/2017/1.jpg",
        "a b/c d.txt",
        "100%/x",
        "\u4e2d\u6587/\u00e9t\u00e9.png",
        "q?x#y/z",
        "a+b=c&d;e:f@g!$'()*,~",
        "%41",
    ],
)
def test_encode_key_round_trips(key: str) -> None:
    """Parsing the encoded form of a key gives the same segments back."""
    segments = tuple(key.split("/"))
    encoded = encode_key(segments)
    assert all(32 < c < 127 for c in encoded)
    assert parse_target(b"/" + encoded).segments == segments


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        (b"x=1&y=2", b"x=1&y=2"),
        (b"a=%20b", b"a=%20b"),
        (b"a=%zz", b"a=%25zz"),
        (b"a=100%", b"a=100%25"),
        (b'a=<">', b"a=%3C%22%3E"),
        (b"a=\r\nLocation: x", b"a=%0D%0ALocation:%20x"),
        (b"a=\xff", b"a=%FF"),
        (b"p=/x?y", b"p=/x?y"),
        (b"a#b", b"a%23b"),
        (b"", b""),
    ],
)
def test_encode_query(raw: bytes, encoded: bytes) -> None:
    """Queries keep their escapes and become one valid line: CR/LF, spaces and stray '%' are encoded."""
    assert encode_query(raw) == encoded
    assert encode_query(encoded) == encoded  # idempotent
