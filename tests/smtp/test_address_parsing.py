"""The submission server's fast reading of MAIL/RCPT paths answers exactly as aiosmtpd's parser.

SubmissionSMTP._getaddr reads the common path (<dot-atom@domain> and parameters) itself, because
aiosmtpd's parser took a fifth of the server's time; every answer must still be aiosmtpd's.
"""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from poweremail.smtp.protocol import _SIMPLE_PATH, SubmissionSMTP

_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
_NEAR_MISSES = _ATEXT + ' .@<>()[]":\\\t\x00é'


def _parsers(local_part_limit: int = 0) -> tuple[SubmissionSMTP, SMTP]:
    ours = SubmissionSMTP.__new__(SubmissionSMTP)
    theirs = SMTP.__new__(SMTP)
    ours.local_part_limit = theirs.local_part_limit = local_part_limit
    return ours, theirs


def _agree(arg: str, local_part_limit: int = 0) -> None:
    ours, theirs = _parsers(local_part_limit)
    try:
        expected: object = theirs._getaddr(arg)
    except Exception:  # aiosmtpd's bugs ("a@", "0@[", "0@[ "): SubmissionSMTP says unparseable
        expected = (None, None)
    assert ours._getaddr(arg) == expected, arg


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.c>",
        "<a@b.c> SIZE=100",
        "<a@b.c>  SIZE=100 BODY=8BITMIME",
        "<a@b.c> SIZE=100  ",
        "<a@b.c>   ",
        "<a.b+c@d-e.f>",
        "<A@B>",
        "<a@-b>",
        "<a@b.c> (comment) SIZE=1",
        "<a@b.c> SIZE=1 (comment)",
        "<a@b.c>x",
        "<a@b.c>\tSIZE=1",
        "<a..b@c>",
        "<.a@b>",
        "<a.@b>",
        "<a@b..c>",
        "<a@b.>",
        "<a@[1.2.3.4]>",
        '<"q"@b>',
        "<@r:a@b>",
        "<>",
        "a@b.c",
        " <a@b.c>",
        "<é@b.c>",
        "<a@b.c> SMTPUTF8 X=é",
        "a@",
        "0@[",
        "0@[ ",
    ],
)
def test_known_paths_are_read_as_aiosmtpd_reads_them(arg: str) -> None:
    _agree(arg)


def test_the_common_path_takes_the_fast_way() -> None:
    # If this stops matching, the server still answers rightly but loses the speed it was built for.
    assert _SIMPLE_PATH.fullmatch("<sender.name+tag@mail.example.com> SIZE=1024 BODY=8BITMIME")


def test_the_local_part_limit_applies_on_the_fast_way() -> None:
    _agree("<abcdef@b.c>", local_part_limit=5)
    _agree("<abcde@b.c>", local_part_limit=5)


@settings(max_examples=3000, deadline=None)
@given(
    local=st.text(_ATEXT + ".", min_size=0, max_size=12),
    domain=st.text("abz09-.", min_size=0, max_size=12),
    tail=st.text(_NEAR_MISSES + "=", max_size=16),
)
def test_generated_paths_agree(local: str, domain: str, tail: str) -> None:
    _agree(f"<{local}@{domain}>{tail}")


@settings(max_examples=3000, deadline=None)
@given(st.text(_NEAR_MISSES, max_size=24))
def test_generated_near_misses_agree(arg: str) -> None:
    _agree(arg)
