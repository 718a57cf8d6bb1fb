"""Signature statement v2, key loading, and the verification policy that
both the fetcher and the root installer apply (upparat.release,
upparat.signature, upparat.verify)."""

import base64
import datetime
import hashlib
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from upparat import signature, verify
from upparat.release import Release
from upparat.verify import Policy

SHA = hashlib.sha256(b"data").hexdigest()
RELEASE = Release(version="1.2.0", meta="slot=b", force=False, sha256=SHA, size=4, serial=7)


def pem(public_key):
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def signed(key, release=RELEASE):
    return Release(**{**release.__dict__, "signature": signature.sign(key, release)})


def test_statement_is_the_seven_lines_of_v2():
    meta_sha = hashlib.sha256(b"slot=b").hexdigest()
    assert RELEASE.statement() == (f"upparat-signature-v2\nversion=1.2.0\nsha256={SHA}\nsize=4\nforce=false\n"
                                   f"meta-sha256={meta_sha}\nserial=7\n").encode()
    bare = Release(version="1", sha256=SHA, size=0)
    assert bare.statement().endswith(f"meta-sha256={hashlib.sha256(b'').hexdigest()}\nserial=\n".encode())
    with pytest.raises(ValueError):
        Release(version="1\n2", sha256=SHA, size=1).statement()


@pytest.mark.parametrize("make", [ed25519.Ed25519PrivateKey.generate, lambda: ec.generate_private_key(ec.SECP256R1())])
def test_a_signature_verifies_with_any_configured_key_and_covers_every_field(make):
    signer, other = make(), make()
    keys = [signature.load_public_key(pem(other.public_key())), signature.load_public_key(pem(signer.public_key()))]
    good = signed(signer)
    assert signature.verifies(keys, good)
    assert not signature.verifies(keys[:1], good)
    for change in ({"meta": "slot=a"}, {"force": True}, {"serial": 6}, {"serial": None}, {"version": "1.2.1"},
                   {"size": 5}, {"sha256": "b" * 64}):
        assert not signature.verifies(keys, Release(**{**good.__dict__, **change})), change
    assert not signature.verifies(keys, Release(**{**good.__dict__, "signature": "bm90IGEgc2ln"}))


def test_a_certificate_is_accepted_as_a_key_and_rsa_is_refused():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "release")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    loaded = signature.load_public_key(cert.public_bytes(serialization.Encoding.PEM))
    assert signature.verifies([loaded], signed(key))
    with pytest.raises(signature.UnusableKey, match="Ed25519 and ECDSA P-256"):
        signature.load_public_key(pem(rsa.generate_private_key(65537, 2048).public_key()))
    with pytest.raises(signature.UnusableKey, match="not a PEM"):
        signature.load_public_key(b"-----BEGIN PUBLIC KEY-----\nbm9wZQ==\n-----END PUBLIC KEY-----\n")


def test_policy_refuses_unsigned_releases_by_default_and_names_the_fix():
    failure = verify.release_failure(RELEASE, [], Policy())
    assert failure.state == "verification_failed"
    assert "[verification] public_keys" in failure.message and "allow_unsigned" in failure.message
    key = ed25519.Ed25519PrivateKey.generate()
    keys = [signature.load_public_key(pem(key.public_key()))]
    assert "no signature" in verify.release_failure(RELEASE, keys, Policy()).message
    assert verify.release_failure(signed(key), keys, Policy()) is None


def test_allow_unsigned_accepts_a_sha256_but_a_present_signature_must_still_verify():
    policy = Policy(allow_unsigned=True)
    assert verify.release_failure(RELEASE, [], policy) is None
    stranger = ed25519.Ed25519PrivateKey.generate()
    assert verify.release_failure(signed(stranger), [], policy).state == "verification_failed"
    key = ed25519.Ed25519PrivateKey.generate()
    keys = [signature.load_public_key(pem(key.public_key()))]
    assert verify.release_failure(signed(stranger), keys, policy).state == "verification_failed"
    no_sha = Release(version="1")
    assert verify.release_failure(no_sha, [], policy).state == "invalid_job_document"
    assert verify.release_failure(no_sha, [], Policy(allow_unsigned=True, require_sha256=False)) is None


def test_bytes_failure_names_what_differs():
    assert verify.bytes_failure(RELEASE, SHA, 4) is None
    assert "size is 5" in verify.bytes_failure(RELEASE, SHA, 5)
    assert "sha256 is" in verify.bytes_failure(RELEASE, "b" * 64, 4)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_the_readmes_openssl_recipe_makes_signatures_the_installer_accepts(tmp_path, kind):
    """The README's signing recipe, run literally with the openssl command line."""
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    key_path = tmp_path / "release.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    firmware = tmp_path / "fw.raucb"
    firmware.write_bytes(b"firmware" * 1000)
    release = Release(version="3.1", meta="channel=beta", force=False,
                      sha256=hashlib.sha256(firmware.read_bytes()).hexdigest(), size=firmware.stat().st_size,
                      serial=42)
    script = (
        'printf \'upparat-signature-v2\\nversion=%s\\nsha256=%s\\nsize=%s\\nforce=%s\\nmeta-sha256=%s\\nserial=%s\\n\' '
        '"$VERSION" "$(sha256sum fw.raucb | cut -d\' \' -f1)" "$(stat -c %s fw.raucb)" false '
        '"$(printf %s "$META" | sha256sum | cut -d\' \' -f1)" "$SERIAL" > statement\n')
    if kind == "ed25519":
        script += "openssl pkeyutl -sign -inkey release.key -rawin -in statement | base64 -w0\n"
    else:
        script += "openssl dgst -sha256 -sign release.key statement | base64 -w0\n"
    out = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "VERSION": "3.1", "META": "channel=beta", "SERIAL": "42"})
    assert (tmp_path / "statement").read_bytes() == release.statement()
    base64.b64decode(out.stdout, validate=True)
    keys = [signature.load_public_key(pem(key.public_key()))]
    assert verify.release_failure(Release(**{**release.__dict__, "signature": out.stdout}), keys, Policy()) is None
