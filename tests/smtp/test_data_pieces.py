"""DATA is read in pieces (SubmissionSMTP._receive_data): dot-unstuffing and the line-ending check
are done per piece as it arrives. Whatever the split, they must answer exactly what the whole
message would: Hypothesis splits random data (dots, lone CRs and LFs, CRLFs) at random points."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from poweremail.smtp.message import LineEndings, normalize_line_endings
from poweremail.smtp.protocol import _unstuffed

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
