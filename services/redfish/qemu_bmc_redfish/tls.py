"""The service's TLS certificate: the operator's, or a self-signed one made at the first start
(with the cryptography package) and kept."""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(directory: Path, host_name: str | None = None) -> tuple[Path, Path]:
    """``cert.pem`` and ``key.pem`` in ``directory``, made once (ECDSA P-256, ten years, for
    ``host_name`` ([redfish] host_name, a DNS name or an IP address), the host's name, localhost
    and 127.0.0.1); the key is readable by its owner only. Replicas sharing the directory (compose:
    a volume) and starting together make one pair: a lock file orders them, and the certificate
    appears whole (renamed into place after the key), so one found is complete."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (directory / "tls.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cert.exists() and key.exists()):
            _make(cert, key, host_name)
    return cert, key


def _subject_names(host_name: str | None) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in dict.fromkeys(filter(None, (host_name, socket.gethostname() or "qemu-bmc", "localhost", "127.0.0.1"))):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def _make(cert: Path, key: Path, host_name: str | None) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    common_name = (host_name or socket.gethostname())[:64] or "qemu-bmc"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qemu-bmc")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(_subject_names(host_name)), critical=False)
        # its own issuer: clients that pin it (curl --cacert, requests verify=) take it as a trust anchor
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256()))
    key.touch(mode=0o600)
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    partial = cert.with_name(cert.name + ".new")
    partial.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    partial.rename(cert)
