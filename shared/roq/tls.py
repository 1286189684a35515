"""TLS identity for the QUIC senders: a self-signed certificate made at start, pinned by viewers.

QUIC always runs TLS 1.3 (RFC 9001).  A broadcast on a LAN or loopback has no CA-signed name,
so by default each stream makes a fresh ECDSA P-256 certificate and hands viewers its SHA-256
fingerprint inside the stream URL; a viewer accepts exactly that certificate (the pinning the
WebRTC stack does with DTLS fingerprints in SDP, RFC 8122 §5).  A configured certificate and
key replace the generated pair.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.errors import ConfigError

__all__ = ["TlsIdentity", "certificate_fingerprint", "generate_self_signed", "load_identity"]


class TlsIdentity(msgspec.Struct, frozen=True):
    certificate_pem: bytes
    private_key_pem: bytes
    #: ``sha256:`` followed by the lower-case hex digest of the DER certificate.
    fingerprint: str


def certificate_fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def generate_self_signed(
    host: str = "localhost", *, now: datetime.datetime | None = None
) -> TlsIdentity:
    """A certificate valid for ``host`` (name or IP) and localhost, for 7 days from ``now``."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kizuna-stream {host}")])
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        alt_names.append(x509.DNSName(host))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return TlsIdentity(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        fingerprint=certificate_fingerprint(certificate.public_bytes(serialization.Encoding.DER)),
    )


def load_identity(cert_path: str | Path, key_path: str | Path) -> TlsIdentity:
    try:
        cert_pem = Path(cert_path).read_bytes()
        key_pem = Path(key_path).read_bytes()
        certificate = x509.load_pem_x509_certificate(cert_pem)
        serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load certificate {cert_path} / key {key_path}: {exc}") from exc
    der = certificate.public_bytes(serialization.Encoding.DER)
    return TlsIdentity(cert_pem, key_pem, certificate_fingerprint(der))
