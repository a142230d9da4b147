"""The OpenAPI document's request schemas say exactly what the API accepts: for any parameters, the
document's JSON Schema and the API's own validation agree (schemathesis trusts the document to
generate valid and invalid requests, so a difference is either a false alarm or a blind spot).

Found by tests/api/test_schemathesis.py: the document allowed ``null`` for editSmtp's optional
parameters, any string of digits ("0", "99999999999") for the limits and paging, and only "Enable"
and "Disable" written so for ``status`` — none of which is what the API does.
"""

from __future__ import annotations

import re
from typing import Any, cast

import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from poweremail.api.app import create_app
from poweremail.api.models import (
    AddSmtpRequest,
    DeleteSmtpRequest,
    EditSmtpRequest,
    ListMessagesRequest,
    ListSmtpRequest,
    ResetSmtpPasswordRequest,
    digits_pattern,
    validate_params,
)
from poweremail.domain.limits import parse_whole_number
from poweremail.errors import ValidationError
from poweremail.services import Services

MODELS: dict[str, type[BaseModel]] = {
    "addSmtp": AddSmtpRequest,
    "editSmtp": EditSmtpRequest,
    "resetSmtpPassword": ResetSmtpPasswordRequest,
    "listSmtp": ListSmtpRequest,
    "deleteSmtp": DeleteSmtpRequest,
    "listMessages": ListMessagesRequest,
}
PARAMETERS = [  # and one that no call takes
    "owner_id", "token", "smtp_user_name", "total_limit", "hourly_limit", "status", "limit", "offset", "x",
]  # fmt: skip
DOCUMENT = create_app(cast(Services, None)).openapi()


def _validator(call: str, media_type: str) -> jsonschema_rs.Validator:
    body = DOCUMENT["paths"][f"/settings/{call}"]["post"]["requestBody"]["content"][media_type]
    return jsonschema_rs.validator_for(body["schema"])


NUMBERS = st.one_of(
    st.integers(min_value=-3, max_value=102),
    st.sampled_from([2147483646, 2147483647, 2147483648, 2**63]),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
)
DIGITS = st.one_of(
    NUMBERS.filter(lambda n: isinstance(n, int) and n >= 0).map(str),
    st.from_regex(r"\A0{0,5}[0-9]{1,12}\Z"),
    st.sampled_from(["0" * 5000 + "7", "0" * 5000, "²", "٣", "+5", " 5", "5 ", "1e3", "5.0"]),
)
STATUSES = st.one_of(
    st.sampled_from(["Enable", "Disable", "enable", "DISABLE", "eNaBlE", "Enabled", "on", ""]),
    st.sampled_from(["enable", "disable"]).flatmap(
        lambda word: st.tuples(*(st.sampled_from([c, c.upper()]) for c in word)).map("".join)
    ),
)
TEXT = st.one_of(
    st.text(max_size=3),
    st.text(min_size=255, max_size=258),
    st.sampled_from(["a\x00b", "\x00", "smtp1", "x" * 256, "x" * 257]),
)
VALUES = st.one_of(
    st.none(), st.booleans(), NUMBERS, DIGITS, STATUSES, TEXT, st.lists(st.integers(), max_size=1),
    st.just({"n": 5}),
)  # fmt: skip


def _accepted(model: type[BaseModel], params: dict[str, Any]) -> bool:
    try:
        validate_params(model, params)
    except ValidationError:
        return False
    return True


def _written_as_float(params: dict[str, Any]) -> bool:
    return any(isinstance(value, float) for value in params.values())


@pytest.mark.parametrize("call", list(MODELS))
@settings(max_examples=300, deadline=None, database=None)
@given(params=st.dictionaries(st.sampled_from(PARAMETERS), VALUES))
def test_the_json_schema_and_the_api_agree(call: str, params: dict[str, Any]) -> None:
    by_document = _validator(call, "application/json").is_valid(params)
    if _written_as_float(params) and by_document:
        # JSON Schema counts 5.0 as the integer 5; the API takes an integer only as written.
        assert not _accepted(MODELS[call], params)
        return
    assert _accepted(MODELS[call], params) == by_document, params


@pytest.mark.parametrize("call", list(MODELS))
def test_the_form_schema_is_the_json_one(call: str) -> None:
    """A form carries strings; the same schema takes a number's digits as the string branch."""
    assert _validator(call, "application/x-www-form-urlencoded") is not None
    content = DOCUMENT["paths"][f"/settings/{call}"]["post"]["requestBody"]["content"]
    assert content["application/x-www-form-urlencoded"]["schema"] == content["application/json"]["schema"]


@pytest.mark.parametrize(
    ("minimum", "maximum"), [(1, 2147483647), (1, 100), (0, 2147483647), (0, 0), (7, 1234)]
)
@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_the_digits_pattern_is_exactly_the_parsers_strings(
    minimum: int, maximum: int, data: st.DataObject
) -> None:
    pattern = re.compile(digits_pattern(minimum, maximum).replace("$", r"\Z"))
    number = data.draw(
        st.one_of(
            st.integers(min_value=0, max_value=3 * 10**9),
            st.sampled_from([minimum - 1, minimum, maximum, maximum + 1]).filter(lambda n: n >= 0),
            st.integers(min_value=0, max_value=10**12),
        )
    )
    text = "0" * data.draw(st.integers(min_value=0, max_value=3)) + str(number)
    try:
        parse_whole_number(text, minimum=minimum, maximum=maximum)
    except ValueError:
        parsed = False
    else:
        parsed = True
    assert bool(pattern.match(text)) == parsed == (minimum <= number <= maximum), text
