"""Job documents (the contract in docs/contracts.md): every field checked,
each refusal naming the field and the fix; never an exception other than
BadDocument, whatever the operator (or an attacker) put in."""

import pytest
from hypothesis import given, settings, strategies as st

from upparat.release import BadDocument, Release, parse_document

SHA = "b" * 64
URL = "https://bucket.s3.amazonaws.com/fw.bin?X-Amz-Signature=abc"


def doc(**fields):
    base = {"version": "1.2.0", "file": URL, "sha256": SHA, "size": 3}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def test_a_document_becomes_a_release_and_a_url():
    release, url = parse_document(doc(meta="m", force=True, serial=4, signature="AAAA"))
    assert release == Release(version="1.2.0", meta="m", force=True, sha256=SHA, size=3, serial=4, signature="AAAA")
    assert url == URL


def test_upparat_1x_documents_are_accepted():
    release, _ = parse_document({"version": "1", "file": URL, "force": "false", "meta": None, "sha256": SHA})
    assert release.force is False and release.meta == ""
    assert parse_document({"version": "1", "file": URL, "force": "true", "sha256": SHA})[0].force is True
    release, _ = parse_document({"version": "1", "file": URL}, require_sha256=False)
    assert release.sha256 is None


@pytest.mark.parametrize("document, words", [
    ([], "not a JSON object"),
    (doc(version=None), '"version" is missing'),
    (doc(version=""), '"version" must be a non-empty string'),
    (doc(version="1\n2"), "line breaks"),
    (doc(version="x" * 129), "longer than 128"),
    (doc(version=5), '"version" must be'),
    (doc(file=None), '"file"'),
    (doc(file="${aws:iot:s3-presigned-url:https://b/k}"), "presignedUrlConfig"),
    (doc(file="ftp://x"), "http(s)"),
    (doc(meta=5), '"meta" must be a string'),
    (doc(meta="x" * 4097), "4096"),
    (doc(meta="a\x00b"), "NUL"),
    (doc(force="yes"), '"force"'),
    (doc(force=1), '"force"'),
    (doc(sha256=SHA.upper()), "lowercase hex"),
    (doc(sha256="b" * 63), "lowercase hex"),
    (doc(sha256=None), "require_sha256 = false"),
    (doc(size=-1), '"size"'),
    (doc(size=True), '"size"'),
    (doc(size=2**63), '"size"'),
    (doc(serial=1.5), '"serial"'),
    (doc(signature="!!"), "base64"),
    (doc(signature="A" * 1025), "at most 1024"),
    (doc(signature="AAAA", size=None), '"size"'),
])
def test_bad_documents_say_what_to_fix(document, words):
    with pytest.raises(BadDocument) as err:
        parse_document(document)
    assert words in str(err.value)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=3), max_leaves=10)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["version", "file", "meta", "force", "sha256", "size", "serial",
                                        "signature", "other"]), JSON, max_size=9), st.booleans())
def test_any_document_is_a_release_or_badocument(document, require_sha256):
    try:
        release, url = parse_document(document, require_sha256)
    except BadDocument:
        return
    assert release.problem() is None
    assert url.startswith(("http://", "https://"))
