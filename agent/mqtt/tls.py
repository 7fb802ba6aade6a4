"""TLS and credentials for the broker connection: the context, our certificate's expiry, errors in words.

The expiry of our own certificate is read from the PEM file with a minimal DER reader over public standard
library calls. The alternatives: ``ssl.SSLSocket.getpeercert()`` reports the *broker's* certificate, after a
handshake, never the one we present; the ``ssl`` module's decoder of a certificate file is private
(``ssl._ssl._test_decode_cert``); and the ``cryptography`` package would add a compiled dependency of several
megabytes to every gateway for one date. The path to notAfter in X.509 (RFC 5280 §4.1) has been fixed since
1988, and a file this reader cannot read only skips the early check: the handshake still refuses an expired
certificate.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import socket
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError

if TYPE_CHECKING:
    import paho.mqtt.client as paho

    from agent.config import BrokerNode, MqttSettings

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


def authenticate(client: paho.Client, settings: MqttSettings) -> None:
    """How a client proves itself to the broker: user name and password, and TLS with our certificate."""
    if settings.username:
        password = settings.password.get_secret_value() if settings.password else None
        client.username_pw_set(settings.username, password)
    if settings.tls.enabled:
        client.tls_set_context(tls_context(settings))


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """Build the TLS context now, so a bad CA, key or certificate stops start-up with a clear message."""
    tls = settings.tls
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("EDGE_AGENT_MQTT__TLS__CA_FILE", f"not a usable CA bundle: {exc}") from exc
    if tls.cert_file and tls.key_file:
        expiry = certificate_expiry(tls.cert_file)
        if expiry is not None and expiry < time.time():
            raise ConfigError("EDGE_AGENT_MQTT__TLS__CERT_FILE",
                              f"the certificate expired on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expiry))}")
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                "EDGE_AGENT_MQTT__TLS__CERT_FILE", f"certificate and key do not load as a pair: {exc}"
            ) from exc
    return context


def certificate_expiry(path: Path) -> float | None:
    """notAfter of the first certificate in a PEM file as a Unix time; None when it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    begin = data.find(_PEM_BEGIN)
    end = data.find(_PEM_END, begin + 1)
    if begin < 0 or end < 0:
        return None
    try:
        der = base64.b64decode(b"".join(data[begin + len(_PEM_BEGIN):end].split()), validate=True)
        return der_not_after(der)
    except (binascii.Error, ValueError, IndexError):
        return None


def der_not_after(der: bytes) -> float:
    """notAfter of a DER certificate: Certificate → tbsCertificate → [version], serial, signature, issuer,
    validity → notAfter (RFC 5280 §4.1). Raises ValueError (or IndexError) on anything else."""
    _, start, _ = _tlv(der, 0, 0x30)  # Certificate
    _, pos, _ = _tlv(der, start, 0x30)  # tbsCertificate
    if der[pos] == 0xA0:  # [0] EXPLICIT version, absent in v1 certificates
        pos = _tlv(der, pos, 0xA0)[2]
    for tag in (0x02, 0x30, 0x30):  # serialNumber, signature, issuer
        pos = _tlv(der, pos, tag)[2]
    _, pos, _ = _tlv(der, pos, 0x30)  # validity
    pos = _tlv(der, pos, der[pos])[2]  # notBefore
    tag, value_start, value_end = _tlv(der, pos, der[pos])
    text = der[value_start:value_end].decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ: years 1950-2049 (RFC 5280 §4.1.2.5.1)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError(f"notAfter has tag {tag:#x}, not a time")
    if len(text) != 15 or not text.endswith("Z") or not text[:14].isdigit():
        raise ValueError(f"notAfter {text!r} is not in the form RFC 5280 requires")
    fields = time.strptime(text, "%Y%m%d%H%M%SZ")
    return float(calendar.timegm(fields))


def _tlv(der: bytes, pos: int, tag: int) -> tuple[int, int, int]:
    """The element at ``pos``, which must carry ``tag``: (tag, start of its value, end of its value)."""
    if der[pos] != tag:
        raise ValueError(f"expected tag {tag:#x} at {pos}, found {der[pos]:#x}")
    length = der[pos + 1]
    pos += 2
    if length & 0x80:  # long form: the next (length & 0x7F) bytes are the length
        count = length & 0x7F
        if not 0 < count <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[pos:pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def explain_connect_error(exc: BaseException, settings: MqttSettings, node: BrokerNode | None = None) -> str:
    """A failed connection attempt to ``node`` (default: the first broker) in words an operator can act on.

    With TLS each broker is verified against its own name: paho sends the host it connects to as SNI and the
    context checks the certificate against it, so every entry of HOSTS must be a name its node's certificate
    carries."""
    node = node or settings.nodes[0]
    where = str(node)
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == 10:
            return f"the broker's certificate at {where} has expired"
        if code in (2, 18, 19, 20, 21):
            return (f"the broker's certificate at {where} is not signed by the CA in "
                    f"EDGE_AGENT_MQTT__TLS__CA_FILE ({exc.verify_message})")
        if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return f"the broker's certificate at {where} does not name {node.host!r} ({exc.verify_message})"
        return f"the broker's certificate at {where} was refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
            return f"{where} does not speak TLS (a plain MQTT port?)"
        if "ALERT" in reason:
            return f"the broker refused this agent's certificate (EDGE_AGENT_MQTT__TLS__CERT_FILE): {reason}"
        return f"TLS with {where} failed: {reason}"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing accepts connections on {where} (is the broker running?)"
    if isinstance(exc, socket.gaierror):
        return f"the broker host {node.host!r} cannot be resolved ({exc.strerror})"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer from {where} (timed out)"
    return f"{type(exc).__name__}: {exc}"
