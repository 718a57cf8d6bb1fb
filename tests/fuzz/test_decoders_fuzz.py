"""Property-based fuzzing of every decoder of untrusted (or less trusted) bytes (hypothesis).

Targets, each with the property it must keep for any input:

- ``release.parse_document`` (job documents from AWS, through the broker's
  ``jobs_api.load_payload`` as on the device): a Release and URL that meet
  DESIGN.md 4.3 field by field, or ``BadDocument`` — nothing else;
- the ZeroMQ catalogues of both protocols (``installer_protocol`` and
  ``fetcher_protocol``, requests and replies): a message of the catalogue
  that passes its own ``check`` and survives encode -> decode unchanged, or
  ``ProtocolError`` — nothing else;
- the child -> supervisor status lines (``ipc.status.decode`` and the
  ``LineBuffer`` that cuts a pipe into lines);
- the supervisor -> child settings envelope (``ChildSettings.decode``):
  settings whose every field has its declared type, or ``ValueError``.

Inputs: raw bytes, JSON with hostile leaves (lone surrogates, huge numbers,
wrong types, deep nesting), and valid messages/documents with one or more
fields replaced by hostile values, removed, or added.

Short run (CI): ``UPPARAT_FUZZ_EXAMPLES`` (default 300) examples per test.
Long run and its figures: docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upparat import release as rel
from upparat.broker_proc import jobs_api
from upparat.ipc import fetcher_protocol as fp
from upparat.ipc import installer_protocol as ip
from upparat.ipc import settings as ipc_settings
from upparat.ipc import status as ipc_status
from upparat.ipc import wire

EXAMPLES = int(os.environ.get("UPPARAT_FUZZ_EXAMPLES", "300"))
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 10))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
COUNTS: dict[str, dict[str, int]] = {}


def count(target: str, outcome: str) -> None:
    bucket = COUNTS.setdefault(target, {})
    bucket[outcome] = bucket.get(outcome, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield
    print("\nfuzz figures: " + json.dumps({t: dict(sorted(c.items())) for t, c in sorted(COUNTS.items())}))


# ---- hostile values ---------------------------------------------------------------------

SURROGATES = st.sampled_from(["\ud800", "a\udfff", "\udbff\udc00x"])
hostile_leaf = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=2**63 - 2, max_value=2**63 + 2), st.integers(-(10**19), -1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40), st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=10),
    st.text(min_size=4000, max_size=9000, alphabet="ab\n"),
    SURROGATES,
    st.sampled_from(["", " ", "../../etc/passwd", "/etc/shadow", "${aws:iot:s3-presigned-url:https://b/k}",
                     "true", "false", "TRUE", "1.0\n2.0", "a" * 64, "A" * 64, "g" * 64, "http://", "ftp://x/y",
                     "https://x/" + "a" * 9000, "https://x/\x00", "job-1", "job 1", "j\n", "0", "-1", "1e999"]),
)
hostile_value = st.recursive(hostile_leaf, lambda kids: st.lists(kids, max_size=4)
                             | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


def json_bytes(value) -> bytes:
    """JSON as a hostile peer might write it: lone surrogates as escapes included."""
    return json.dumps(value, ensure_ascii=True, allow_nan=False).encode()


def mutate(base: dict, draw_ops) -> dict:
    body = dict(base)
    for op, key, value in draw_ops:
        if op == "set":
            body[key] = value
        elif op == "drop":
            body.pop(key, None)
        elif op == "nest" and isinstance(body.get(key), dict):
            inner = dict(body[key])
            inner[next(iter(inner), "x")] = value
            body[key] = inner
    return body


def mutations(keys: list[str]):
    return st.lists(st.tuples(st.sampled_from(["set", "drop", "nest"]),
                              st.sampled_from(keys + ["extra", "v", "type"]), hostile_value), min_size=1, max_size=4)


# ---- job documents ----------------------------------------------------------------------

DOC = {"version": "1.2.0", "file": "https://bucket.s3.amazonaws.com/fw.raucb?X-Amz-Signature=abc", "meta": "m",
       "force": False, "sha256": "a" * 64, "size": 1048576, "serial": 7, "signature": "QUJD" * 22}
DOC_KEYS = list(DOC)


def check_release(release: rel.Release, url: str) -> None:
    """DESIGN.md 4.3, field by field."""
    assert isinstance(release.version, str) and 1 <= len(release.version) <= rel.MAX_VERSION
    assert release.version.isprintable() and "\n" not in release.version and "\r" not in release.version
    assert isinstance(release.meta, str) and len(release.meta) <= rel.MAX_META
    assert type(release.force) is bool
    assert release.sha256 is None or rel.is_sha256(release.sha256)
    for count_ in (release.size, release.serial):
        assert count_ is None or (type(count_) is int and 0 <= count_ < 2**63)
    assert release.signature is None or (isinstance(release.signature, str) and release.signature)
    assert release.problem() is None, release.problem()
    assert isinstance(url, str) and url.startswith(("https://", "http://")) and len(url) <= rel.MAX_URL
    assert url.isprintable() and rel.PLACEHOLDER not in url
    for text in (release.version, release.meta, url):
        text.encode("utf-8")  # no lone surrogate survives


def parse_bytes(payload: bytes, require_sha256: bool) -> None:
    """The device's path: MQTT payload -> load_payload -> the execution's document -> parse_document."""
    try:
        body = jobs_api.load_payload(payload)
    except jobs_api.BadPayload:
        count("job_document", "payload refused")
        return
    doc = body.get("execution", {}).get("jobDocument") if isinstance(body.get("execution"), dict) else body
    try:
        release, url = rel.parse_document(doc, require_sha256)
    except rel.BadDocument as exc:
        assert str(exc)
        count("job_document", "refused")
        return
    check_release(release, url)
    count("job_document", "accepted")


@FUZZ
@given(st.one_of(
    st.builds(mutate, st.just(DOC), mutations(DOC_KEYS)).map(json_bytes),
    hostile_value.map(json_bytes),
    st.dictionaries(st.sampled_from(DOC_KEYS), hostile_value).map(json_bytes),
    st.binary(max_size=2000),
    st.builds(mutate, st.just(DOC), mutations(DOC_KEYS)).map(lambda d: json_bytes({"execution": {"jobDocument": d}})),
    st.integers(1, 70000).map(lambda n: b'{"version":' + b"[" * n),
    st.integers(1, 9000).map(lambda n: b'{"version":"1","file":"https://x/y","size":' + b"9" * n + b"}"),
), st.booleans())
def test_job_documents_are_a_checked_release_or_bad_document(payload, require_sha256):
    parse_bytes(payload, require_sha256)


# ---- the ZeroMQ catalogues --------------------------------------------------------------

SHA = "b" * 64
RELEASE = rel.Release(version="1.0", meta="m", force=False, sha256=SHA, size=10, serial=3, signature=None)
HOOK_RUN = ip.HookRun("install", 0, ip.RUNNING, None, 0, "50%", "running")
VALID = {
    "installer requests": (ip.REQUESTS, [
        wire.Ping(seq=1), ip.OpenJob(seq=2, job_id="j", execution=1, release=RELEASE),
        ip.QueryJob(seq=3, job_id="j", execution=1), ip.Stage(seq=4, job_id="j", execution=1),
        ip.RunHook(seq=5, job_id="j", execution=1, hook="version", round=3), ip.Discard(seq=6, job_id="j", execution=1)]),
    "installer replies": (ip.REPLIES, [
        ip.Pong(seq=1, pid=10, job_id="j", execution=1, phase=ip.STAGED),
        ip.JobState(seq=0, job_id="j", execution=1, phase=ip.INSTALLING, failure=None, message="", hook=HOOK_RUN),
        ip.JobState(seq=7, job_id="j", execution=1, phase=ip.FAILED, failure="installation_hook_failed",
                    message="exit 1", hook=None),
        wire.Refused(seq=3, code=wire.BUSY, reason="a hook runs")]),
    "fetcher requests": (fp.REQUESTS, [
        wire.Ping(seq=1), fp.Fetch(seq=1, job_id="j", execution=1, url="https://x/y", release=RELEASE),
        fp.QueryFetch(seq=2, job_id="j", execution=1), fp.CancelFetch(seq=3, job_id="j", execution=1)]),
    "fetcher replies": (fp.REPLIES, [
        fp.FetcherPong(seq=1, pid=3, job_id=None, execution=None),
        fp.FetchStatus(seq=0, job_id="j", execution=1, state=fp.RUNNING, bytes_done=5, bytes_total=10, rate=3,
                       failure=None, message=""),
        wire.Refused(seq=3, code=wire.MALFORMED, reason="no")]),
}


def body_of(message: wire.Message) -> dict:
    return json.loads(message.encode())


def check_message(catalogue: wire.Catalogue, message: wire.Message) -> None:
    assert message.TYPE in catalogue.types
    message.check()
    assert 0 <= message.seq < 2**63
    for f in dataclasses.fields(message):
        assert _typed(getattr(message, f.name), typing.get_type_hints(type(message))[f.name]), f.name
    again = catalogue.decode(message.encode())
    assert again == message


def _typed(value, annotation) -> bool:
    """``value`` is of the declared type; a nested dataclass field holds that dataclass, typed in turn."""
    nested = wire._nested_type(annotation)
    if nested is not None and dataclasses.is_dataclass(value):
        return isinstance(value, nested) and all(
            _typed(getattr(value, f.name), typing.get_type_hints(nested)[f.name]) for f in dataclasses.fields(value))
    return not dataclasses.is_dataclass(value) and wire._type_ok(value, annotation) and not isinstance(value, dict)


@pytest.mark.parametrize("family", sorted(VALID))
@FUZZ
@given(data=st.data())
def test_every_catalogue_decodes_to_a_checked_message_or_protocolerror(family, data):
    catalogue, valid = VALID[family]
    base = body_of(data.draw(st.sampled_from(valid)))
    payload = data.draw(st.one_of(
        st.builds(mutate, st.just(base), mutations(list(base))).map(json_bytes),
        st.just(base).map(json_bytes),
        hostile_value.map(json_bytes),
        st.binary(max_size=600),
        st.binary(max_size=100).map(lambda b: json_bytes(base)[:-1] + b),
        st.integers(1, wire.MAX_MESSAGE_BYTES + 10).map(lambda n: b"[" * n),
        st.integers(1, 5000).map(lambda n: json_bytes(base)[:-1] + b',"seq":' + b"1" * n + b"}"),
    ))
    try:
        message = catalogue.decode(payload)
    except wire.ProtocolError as exc:
        assert str(exc)
        count(family, "refused")
        return
    check_message(catalogue, message)
    count(family, "decoded")


# ---- child -> supervisor status lines ---------------------------------------------------

BEAT = json.loads(ipc_status.encode_beat(ipc_status.Status(phase="idle", busy=False)))
PROBLEM = json.loads(ipc_status.encode_problem(ipc_status.Problem.fitted("ERROR", "upparat.x", "boom", "tb")))


@FUZZ
@given(st.one_of(
    st.builds(mutate, st.just(BEAT), mutations(list(BEAT))).map(json_bytes),
    st.builds(lambda ops: mutate(BEAT, [("nest", "status", v) for _, _, v in ops]), mutations(["status"]))
    .map(json_bytes),
    st.builds(mutate, st.just(PROBLEM), mutations(list(PROBLEM))).map(json_bytes),
    hostile_value.map(json_bytes), st.binary(max_size=5000),
))
def test_status_lines_are_a_checked_status_or_statuserror(line):
    try:
        decoded = ipc_status.decode(line)
    except ipc_status.StatusError as exc:
        assert str(exc)
        count("status line", "refused")
        return
    if isinstance(decoded, ipc_status.Status):
        assert ipc_status.status_problem(decoded.fields()) is None
        assert ipc_status.decode(ipc_status.encode_beat(decoded).rstrip(b"\n")) == decoded
    else:
        assert isinstance(decoded, ipc_status.Problem)
        assert decoded.level in ipc_status.PROBLEM_LEVELS and decoded.message.isprintable()
        assert len(decoded.message) <= ipc_status.MAX_MESSAGE
    count("status line", "decoded")


@FUZZ
@given(st.lists(st.binary(max_size=6000), max_size=6), st.integers(16, 4096))
def test_the_line_buffer_never_yields_an_overlong_line_and_loses_no_short_one(chunks, max_line):
    buffer = ipc_status.LineBuffer(max_line)
    out = []
    for chunk in chunks:
        out += buffer.feed(chunk)
    lines = [item for item in out if isinstance(item, bytes)]
    assert all(len(line) < max_line and b"\n" not in line for line in lines)
    # every complete short line that did not follow an overlong tail arrives in order
    whole = b"".join(chunks)
    complete = whole[:whole.rfind(b"\n") + 1].split(b"\n")[:-1] if b"\n" in whole else []
    short = [line for line in complete if len(line) < max_line]
    assert len(lines) <= len(complete)
    assert set(lines) <= set(short)
    count("line buffer", "fed")


# ---- supervisor -> child settings envelope ----------------------------------------------

def envelope() -> dict:
    layout = ipc_settings.Layout(runtime_dir=Path("/run/u"), download_dir=Path("/tmp/u"), staging_dir=Path("/s"),
                                 broker_state_dir=Path("/b"), fetcher_state_dir=Path("/f"))
    ids = ipc_settings.Identities(True, "upparat", 990, 990, "upparat-fetch", 991, 991)
    good = ipc_settings.ChildSettings(role="broker", config_text="[broker]\n", config_path="/etc/u.conf",
                                      verbose=False, thing_name="t", layout=layout, ids=ids,
                                      tls={"cafile": "PEM"}, public_keys_pem=("PEM",))
    return json.loads(good.encode())


ENVELOPE = envelope()


def check_settings(s: ipc_settings.ChildSettings) -> None:
    assert s.role in ipc_settings.ROLES
    assert isinstance(s.config_text, str) and isinstance(s.config_path, str)
    assert type(s.verbose) is bool
    assert s.thing_name is None or isinstance(s.thing_name, str)
    assert all(isinstance(getattr(s.layout, f.name), Path) for f in dataclasses.fields(s.layout))
    ids = s.ids
    assert type(ids.separated) is bool
    for name in ("broker_user", "fetcher_user"):
        assert isinstance(getattr(ids, name), str), name
    for name in ("broker_uid", "broker_gid", "fetcher_uid", "fetcher_gid"):
        assert type(getattr(ids, name)) is int and getattr(ids, name) >= 0, name
    assert isinstance(s.tls, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in s.tls.items())
    assert isinstance(s.public_keys_pem, tuple) and all(isinstance(p, str) for p in s.public_keys_pem)


@FUZZ
@given(st.one_of(
    st.builds(mutate, st.just(ENVELOPE), mutations(list(ENVELOPE))).map(json_bytes),
    st.builds(lambda ops: mutate(ENVELOPE, [("nest", k, v) for _, k, v in ops]),
              mutations(["layout", "ids", "tls"])).map(json_bytes),
    hostile_value.map(json_bytes), st.binary(max_size=2000),
))
def test_the_settings_envelope_is_fully_typed_settings_or_valueerror(data):
    try:
        decoded = ipc_settings.ChildSettings.decode(data)
    except ValueError as exc:
        assert str(exc)
        count("settings envelope", "refused")
        return
    check_settings(decoded)
    count("settings envelope", "decoded")
