import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
import datetime

from upparat import verify
from upparat.verify import Expected


def pem(public_key):
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_signed_bytes_are_the_four_lines():
    assert verify.signed_bytes("1.2", "ab", 7) == b"upparat-signature-v1\nversion=1.2\nsha256=ab\nsize=7\n"
    with pytest.raises(ValueError):
        verify.signed_bytes("1\n2", "ab", 7)


@pytest.mark.parametrize("make", [ed25519.Ed25519PrivateKey.generate, lambda: ec.generate_private_key(ec.SECP256R1())])
def test_signature_verifies_with_any_configured_key(make):
    signer, other = make(), make()
    sha = hashlib.sha256(b"data").hexdigest()
    sig = verify.sign(signer, "1.0", sha, 4)
    keys = [verify.load_public_key(pem(other.public_key())), verify.load_public_key(pem(signer.public_key()))]
    assert verify.signature_ok(keys, "1.0", sha, 4, sig)
    assert not verify.signature_ok(keys, "1.1", sha, 4, sig)
    assert not verify.signature_ok(keys[:1], "1.0", sha, 4, sig)
    assert not verify.signature_ok(keys, "1.0", sha, 4, "not base64!")


def test_certificate_is_accepted_as_key_and_rsa_is_refused():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "release")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    assert verify.load_public_key(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(verify.UnusableKey):
        verify.load_public_key(pem(rsa.generate_private_key(65537, 2048).public_key()))


def test_check_reports_what_differs():
    sha = "c" * 64
    assert verify.check(Expected("1", sha, 5, None), sha, 5, [], False) is None
    assert "size" in verify.check(Expected("1", sha, 6, None), sha, 5, [], False)
    assert "sha256" in verify.check(Expected("1", "d" * 64, 5, None), sha, 5, [], False)
    assert "require_signature" in verify.check(Expected("1", sha, 5, None), sha, 5, [], True)
