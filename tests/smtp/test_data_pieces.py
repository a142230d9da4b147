"""DATA is read in pieces (SubmissionSMTP._receive_data): dot-unstuffing and the line-ending check
are done per piece as it arrives. Whatever the split, they must answer exactly what the whole
message would: Hypothesis splits random data (dots, lone CRs and LFs, CRLFs) at random points."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from poweremail.smtp.message import LineEndings, has_message_id, normalize_line_endings, stamp
from poweremail.smtp.protocol import _LineLengths, _unstuffed
from poweremail.store.message_parts import split

# Few octets, so that dots, CRs and LFs meet each other and the piece boundaries often.
octets = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"a"]), max_size=40).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _unstuffed_whole(data: bytes) -> bytes:
    # RFC 5321 4.5.2 over the whole message: the first line's dot, then every dot after a CRLF.
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


@settings(max_examples=3000)
@given(octets, st.lists(st.integers(min_value=0, max_value=60), max_size=6))
def test_unstuffing_piece_by_piece_equals_unstuffing_the_whole(data: bytes, cuts: list[int]) -> None:
    tail, out = b"\r\n", []
    for piece in _split(data, cuts):
        out.append(_unstuffed(piece, tail))
        tail = (tail + piece[-2:])[-2:]
    assert b"".join(out) == _unstuffed_whole(data)


@settings(max_examples=3000)
@given(octets, st.lists(st.integers(min_value=0, max_value=60), max_size=6))
def test_line_endings_piece_by_piece_answer_as_the_whole_would(data: bytes, cuts: list[int]) -> None:
    endings = LineEndings()
    for piece in _split(data, cuts):
        endings.feed(piece)
    assert endings.crlf_only == (normalize_line_endings(data) == data)


@settings(max_examples=3000)
@given(octets, st.lists(st.integers(min_value=0, max_value=60), max_size=6))
def test_line_endings_say_after_every_piece_whether_a_lone_cr_or_lf_came_yet(
    data: bytes, cuts: list[int]
) -> None:
    endings, read = LineEndings(), b""
    for piece in _split(data, cuts):
        read += piece
        settled = read.removesuffix(b"\r")  # a CR at the end may still get its LF
        assert endings.feed(piece) == (normalize_line_endings(settled) == settled)


# Long lines, CRLFs and dots, with no lone CR or LF: the data the quick line-length check is for.
crlf_lines = st.lists(st.sampled_from([b"x", b"xxxxx", b"\r\n", b"."]), max_size=60).map(b"".join)


@settings(max_examples=3000)
@given(crlf_lines, st.lists(st.integers(min_value=0, max_value=200), max_size=6), st.integers(3, 12))
def test_line_lengths_of_crlf_only_data_are_judged_alike_by_both_checks(
    data: bytes, cuts: list[int], limit: int
) -> None:
    """_LineLengths.fit with crlf_only (one search per line's length) answers, piece by piece,
    what the general check (every piece split into lines) does, and what it does for the whole."""
    general, quick = _LineLengths(limit), _LineLengths(limit)
    fits = True
    for piece in _split(data, cuts):
        fits = general.fit(piece)
        assert quick.fit(piece, crlf_only=True) == fits
        if not fits:
            break
        # The same state, so that a message can go on the general way after a lone CR or LF.
        assert (quick._run, quick._after_cr) == (general._run, general._after_cr)
    assert fits == _LineLengths(limit).fit(data)


def test_line_endings_examples() -> None:
    def crlf_only(*pieces: bytes) -> bool:
        endings = LineEndings()
        for piece in pieces:
            endings.feed(piece)
        return endings.crlf_only

    assert crlf_only(b"a\r", b"\nb\r\n")  # a CRLF split between two pieces
    assert not crlf_only(b"a\r", b"b\r\n")  # a lone CR at a piece's end
    assert not crlf_only(b"a\r\n", b"\nb\r\n")  # a lone LF at a piece's start
    assert not crlf_only(b"a\r\nb\r")  # ends with a lone CR
    assert crlf_only()


# Headers and a body whose blank line, Message-ID and CRLFs land anywhere among the pieces.
heads = st.lists(
    st.sampled_from([b"Subject: x\r\n", b"Message-ID: <a@b>\r\n", b"\r\n", b"body\r\n", b"\r", b"\n"]),
    max_size=12,
).map(b"".join)


@settings(max_examples=3000)
@given(heads, st.lists(st.integers(min_value=0, max_value=80), max_size=6), st.booleans())
def test_stamping_the_pieces_equals_stamping_the_whole_message(
    data: bytes, cuts: list[int], crlf_only: bool
) -> None:
    """stamp takes the message in the pieces it was read in and never joins a large one; its answer
    (a Message-ID added or not, line endings) is what the whole message would get."""
    crlf_only = crlf_only and _crlf_only(data)
    whole = data if crlf_only else normalize_line_endings(data)
    expected = b"Received: r\r\n"
    if not has_message_id(whole):
        expected += b"Message-ID: <q1@h>\r\n"
    pieces = _split(data, cuts)
    stamped = stamp(pieces, received=b"Received: r\r\n", hostname="h", queue_id="Q1", crlf_only=crlf_only)
    assert b"".join(stamped) == expected + whole


def _crlf_only(data: bytes) -> bool:
    endings = LineEndings()
    endings.feed(data)
    return endings.crlf_only


@settings(max_examples=2000)
@given(
    st.lists(st.binary(max_size=40), max_size=8),
    st.integers(min_value=1, max_value=50),
    st.booleans(),
)
def test_parts_are_the_message_cut_at_every_part_size(
    pieces: list[bytes], part_size: int, whole: bool
) -> None:
    """message_parts.split, from the message whole or in pieces: the parts joined are the message,
    every part but the last is exactly part_size, and none is empty."""
    data = b"".join(pieces)
    parts = list(split(data if whole else pieces, part_size))
    assert b"".join(parts) == data
    assert all(len(part) == part_size for part in parts[:-1])
    assert all(0 < len(part) <= part_size for part in parts)
