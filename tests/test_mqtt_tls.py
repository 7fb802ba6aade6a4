"""agent.mqtt.tls: our certificate's expiry read without private ssl calls, against cryptography's reading."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.config import MqttSettings, TlsSettings
from agent.errors import ConfigError
from agent.mqtt.tls import certificate_expiry, der_not_after, tls_context

from tls import CertificateAuthority


def make_certificate(not_after: dt.datetime, *, rsa_key: bool = False, long_name: bool = False) -> x509.Certificate:
    key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw"),
                      *([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "x" * 60)] * 8 if long_name else [])])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC)).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))


@pytest.mark.parametrize(
    "not_after",
    [
        dt.datetime(2031, 5, 17, 8, 30, 15, tzinfo=dt.UTC),  # UTCTime (before 2050)
        dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(2050, 1, 1, 0, 0, 0, tzinfo=dt.UTC),  # GeneralizedTime from 2050 on (RFC 5280)
        dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),  # "no well-defined expiration date"
        dt.datetime(2021, 2, 3, 4, 5, 6, tzinfo=dt.UTC),  # long expired
    ],
)
@pytest.mark.parametrize("rsa_key", [False, True])
def test_expiry_is_what_cryptography_reads(tmp_path: Path, not_after: dt.datetime, rsa_key: bool) -> None:
    cert = make_certificate(not_after, rsa_key=rsa_key, long_name=rsa_key)  # long names: long-form lengths
    path = tmp_path / "gw.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert certificate_expiry(path) == cert.not_valid_after_utc.timestamp()
    assert der_not_after(cert.public_bytes(serialization.Encoding.DER)) == not_after.timestamp()


def test_a_chain_file_gives_the_first_certificates_expiry(tmp_path: Path) -> None:
    leaf = make_certificate(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    issuer = make_certificate(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
    path = tmp_path / "chain.crt"
    path.write_bytes(b"subject=CN = gw\n" + leaf.public_bytes(serialization.Encoding.PEM)
                     + issuer.public_bytes(serialization.Encoding.PEM))
    assert certificate_expiry(path) == dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\nbm90IERFUg==\n-----END CERTIFICATE-----\n",  # base64 of "not DER"
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",  # an empty SEQUENCE
        b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",  # truncated
    ],
)
def test_an_unreadable_file_skips_the_check(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "odd.crt"
    path.write_bytes(content)
    assert certificate_expiry(path) is None
    assert certificate_expiry(tmp_path / "missing.crt") is None


def test_an_expired_client_certificate_stops_start_up(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    old = ca.issue("old-gateway", expired=True)
    settings = MqttSettings(tls=TlsSettings(ca_file=ca.ca_file, cert_file=old.cert, key_file=old.key))
    with pytest.raises(ConfigError, match="the certificate expired on"):
        tls_context(settings)
    fresh = ca.issue("gateway")
    tls_context(MqttSettings(tls=TlsSettings(ca_file=ca.ca_file, cert_file=fresh.cert, key_file=fresh.key)))
