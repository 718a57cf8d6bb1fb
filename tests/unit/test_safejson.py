"""The one decoder for peer JSON: limits on size, depth, numbers, strings
and items; no lone surrogates, duplicate keys or NaN; only BadJson escapes."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from upparat import safejson
from upparat.safejson import BadJson


@pytest.mark.parametrize("data, reason", [
    (b"[" * 60000, "nested deeper"),
    (b"[" * 17 + b"]" * 17, "nested deeper than 16"),
    (b'{"a":' + b"9" * 21 + b"}", "digits"),
    (b'{"a":' + b"1" * 50 + b".5}", "longer than 40"),
    (b'"\\ud800"', "surrogate"),
    (b'{"\\udfff": 1}', "surrogate"),
    (b'{"a":1,"a":2}', "twice"),
    (b"NaN", "NaN"),
    (b"Infinity", "Infinity"),
    (b"\xff", "UTF-8"),
    (b"\xed\xa0\x80", "UTF-8"),  # a surrogate encoded in UTF-8 is not UTF-8
    (b"{} {}", "extra data"),
    (b"", "not JSON"),
    (b"x" * 101, "exceed"),
])
def test_each_violation_has_its_reason(data, reason):
    with pytest.raises(BadJson, match=reason):
        safejson.loads(data, max_bytes=100 if reason == "exceed" else 1 << 20)


def test_limits_on_strings_and_items():
    with pytest.raises(BadJson, match="longer than 10"):
        safejson.loads(b'["' + b"x" * 11 + b'"]', max_bytes=100, max_string=10)
    with pytest.raises(BadJson, match="more than 5 values"):
        safejson.loads(b"[1,2,3,4,5]", max_bytes=100, max_items=5)


def test_good_json_round_trips():
    value = {"a": [1, -2, 3.5, True, None, "ü\u2028"], "b": {"c": ""}}
    assert safejson.loads(safejson.dumps(value), max_bytes=1000) == value


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_give_a_value_or_badjson(data):
    try:
        safejson.loads(data, max_bytes=1024)
    except BadJson:
        pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**62, 2**62) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=30))
def test_whatever_json_can_write_is_read_back_or_refused_cleanly(value):
    data = json.dumps(value).encode()
    try:
        assert safejson.loads(data, max_bytes=1 << 20) == value
    except BadJson as exc:
        assert "surrogate" in str(exc) or "nested" in str(exc)
