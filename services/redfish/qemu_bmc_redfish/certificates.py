"""CertificateService: the service's HTTPS certificate, shown at each Manager's NetworkProtocol
(``HTTPS/Certificates/1``: every Manager is reached through this one service, so they all show the
same certificate), listed by CertificateLocations, replaced with ReplaceCertificate, and GenerateCSR
for a certificate authority to sign (Redfish CertificateService, CertificateLocations, Certificate
and ActionInfo schemas; DSP0266 §13.2 "Certificates").

The certificate is the one the service serves: ``[redfish] cert_file`` and ``key_file``, or the
self-signed pair made in ``<runtime_dir>/redfish/`` (tls.py).

* GenerateCSR makes a new key pair (ECDSA P-256 by default) and a certificate signing request
  for it; the private key waits beside the served key (``<key>-csr.pem``, 0600) for its
  certificate, and never leaves the service.
* ReplaceCertificate takes a PEM certificate (or chain, leaf first) with its unencrypted private
  key, or without a key the certificate signed for the last CSR; checks that key and certificate
  belong together and that the certificate is valid now; and writes them over the served files
  (the key first; each file replaced whole).

Every replica serving from those files (the replicas of one host share the runtime directory)
serves the new pair from its next TLS handshake on (:func:`ssl_context`); replicas on other hosts
need the files copied there. Both actions need ConfigureManager on every machine on the bus: the
certificate is theirs in common.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi import FastAPI, Request, Response
from qemu_bmc_shared.config import Config

from .errors import RedfishError, message
from .resources import ENABLED, Redfish, collection, json_response, link
from .virtual_media import action_body

log = logging.getLogger(__name__)

SERVICE_PATH = "/redfish/v1/CertificateService"
REPLACE = "#CertificateService.ReplaceCertificate"
GENERATE_CSR = "#CertificateService.GenerateCSR"
CSR_ACTION_INFO = f"{SERVICE_PATH}/GenerateCSRActionInfo"
CERTIFICATE_TYPES = ["PEM", "PEMchain"]
CERTIFICATE_ID = "1"
PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)
#: Certificate Identifier properties (and GenerateCSR parameters) and the name attributes
#: (RFC 5280 §4.1.2.4) they are.
IDENTIFIER = (("CommonName", NameOID.COMMON_NAME), ("Organization", NameOID.ORGANIZATION_NAME),
              ("OrganizationalUnit", NameOID.ORGANIZATIONAL_UNIT_NAME), ("City", NameOID.LOCALITY_NAME),
              ("State", NameOID.STATE_OR_PROVINCE_NAME), ("Country", NameOID.COUNTRY_NAME),
              ("Email", NameOID.EMAIL_ADDRESS))
#: The key usage bits (RFC 5280 §4.2.1.3) as Certificate KeyUsage values.
KEY_USAGES = (("digital_signature", "DigitalSignature"), ("content_commitment", "NonRepudiation"),
              ("key_encipherment", "KeyEncipherment"), ("data_encipherment", "DataEncipherment"),
              ("key_agreement", "KeyAgreement"), ("key_cert_sign", "KeyCertSign"), ("crl_sign", "CRLSigning"))
#: Extended key usages (RFC 5280 §4.2.1.12) as Certificate KeyUsage values.
EXTENDED_KEY_USAGES = {ExtendedKeyUsageOID.SERVER_AUTH: "ServerAuthentication",
                       ExtendedKeyUsageOID.CLIENT_AUTH: "ClientAuthentication",
                       ExtendedKeyUsageOID.CODE_SIGNING: "CodeSigning",
                       ExtendedKeyUsageOID.EMAIL_PROTECTION: "EmailProtection",
                       ExtendedKeyUsageOID.TIME_STAMPING: "Timestamping",
                       ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning"}
#: GenerateCSR key pairs (TCG algorithm registry names): ECDSA on these curves, or RSA of these sizes.
CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {"TPM_ECC_NIST_P256": ec.SECP256R1,
                                                     "TPM_ECC_NIST_P384": ec.SECP384R1}
RSA_BITS = (2048, 3072, 4096)
KEY_ALGORITHMS = ["TPM_ALG_ECDSA", "TPM_ALG_RSA"]
#: GenerateCSR parameters of the schema this service does not take.
CSR_UNSUPPORTED = ("KeyUsage", "Surname", "GivenName", "Initials", "ChallengePassword", "UnstructuredName",
                   "ContactPerson")
SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def certificate_files(config: Config) -> tuple[Path, Path] | None:
    """The certificate and key files the service serves (as service.py chooses them), None without TLS."""
    settings = config.redfish
    if not settings.tls:
        return None
    if settings.cert_file and settings.key_file:
        return Path(settings.cert_file), Path(settings.key_file)
    directory = config.runtime_dir / "redfish"
    return directory / "cert.pem", directory / "key.pem"


def csr_key_file(key_file: Path) -> Path:
    """Where the key of the last CSR waits for its certificate."""
    return key_file.with_name(f"{key_file.stem}-csr.pem")


def collection_path(machine: str) -> str:
    return f"/redfish/v1/Managers/{machine}/NetworkProtocol/HTTPS/Certificates"


def certificate_path(machine: str) -> str:
    return f"{collection_path(machine)}/{CERTIFICATE_ID}"


def hex_pairs(data: bytes) -> str:
    """``AB:CD:…``, the form of the Certificate schema's SerialNumber and Fingerprint."""
    return ":".join(f"{byte:02X}" for byte in data)


def identifier(name: x509.Name, alternative_names: list[str] | None = None) -> dict[str, Any]:
    """A Certificate Identifier: the attributes the name has, and its RFC 4514 form."""
    body: dict[str, Any] = {"DisplayString": name.rfc4514_string()}
    for key, oid in IDENTIFIER:
        values = name.get_attributes_for_oid(oid)
        if values:
            body[key] = str(values[0].value)
    if alternative_names:
        body["AlternativeNames"] = alternative_names
    return body


def extension(certificate: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def key_usage(certificate: x509.Certificate) -> list[str]:
    usages: list[str] = []
    if (basic := extension(certificate, x509.KeyUsage)) is not None:
        usages += [value for attribute, value in KEY_USAGES if getattr(basic, attribute)]
        if basic.key_agreement:  # only defined with key agreement
            usages += [value for attribute, value in (("encipher_only", "EncipherOnly"),
                                                      ("decipher_only", "DecipherOnly")) if getattr(basic, attribute)]
    if (extended := extension(certificate, x509.ExtendedKeyUsage)) is not None:
        usages += [EXTENDED_KEY_USAGES[oid] for oid in extended if oid in EXTENDED_KEY_USAGES]
    return usages


def certificate(path: str, chain: list[x509.Certificate]) -> dict[str, Any]:
    """The Certificate resource of a certificate chain (leaf first), without any private key."""
    leaf = chain[0]
    names = extension(leaf, x509.SubjectAlternativeName)
    alternative = [str(name.value) for name in names] if names is not None else []
    serial = leaf.serial_number.to_bytes(max(1, (leaf.serial_number.bit_length() + 7) // 8), "big")
    return {
        "@odata.id": path, "@odata.type": "#Certificate.v1_11_0.Certificate", "Id": CERTIFICATE_ID,
        "Name": "HTTPS certificate", "Description": "The certificate the Redfish service serves over HTTPS",
        "CertificateString": "".join(cert.public_bytes(serialization.Encoding.PEM).decode() for cert in chain),
        "CertificateType": "PEM" if len(chain) == 1 else "PEMchain", "CertificateUsageTypes": ["Web"],
        "Subject": identifier(leaf.subject, alternative), "Issuer": identifier(leaf.issuer),
        "ValidNotBefore": leaf.not_valid_before_utc.isoformat(), "ValidNotAfter": leaf.not_valid_after_utc.isoformat(),
        "KeyUsage": key_usage(leaf), "SerialNumber": hex_pairs(serial),
        "Fingerprint": hex_pairs(leaf.fingerprint(hashes.SHA256())), "FingerprintHashAlgorithm": "TPM_ALG_SHA256",
        "SignatureAlgorithm": leaf.signature_algorithm_oid.dotted_string, "Status": ENABLED,
    }


def served_chain(config: Config) -> list[x509.Certificate]:
    """The certificates of the served certificate file (none without TLS)."""
    files = certificate_files(config)
    return x509.load_pem_x509_certificates(files[0].read_bytes()) if files else []


def invalid(parameter: str, action: str, reason: str) -> RedfishError:
    """400 for a parameter value that cannot be used, saying why."""
    return RedfishError(400, "ActionParameterValueError", parameter, action, extra=[message("GeneralError", reason)])


def read_key(pem: bytes) -> CertificateIssuerPrivateKeyTypes:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"a {type(key).__name__} cannot serve TLS here (RSA or ECDSA)")
    return key


def parse_replacement(text: str, certificate_type: str, csr_key: bytes | None
                      ) -> tuple[list[x509.Certificate], bytes, bytes]:
    """The chain, the PEM of its certificates and that of its key, from a ReplaceCertificate
    CertificateString (without a key: the key of the last CSR, ``csr_key``); 400 saying what is wrong."""
    blocks = [(match[1], match[0].encode()) for match in PEM_BLOCK.finditer(text)]
    certificates_pem = b"".join(block for kind, block in blocks if kind == "CERTIFICATE")
    keys = [block for kind, block in blocks if kind.endswith("PRIVATE KEY")] or ([csr_key] if csr_key else [])
    if not certificates_pem or len(keys) != 1:
        raise invalid("CertificateString", REPLACE, "CertificateString needs the PEM certificate and its unencrypted "
                      "private key (one), or the certificate signed for the last GenerateCSR")
    try:
        chain = x509.load_pem_x509_certificates(certificates_pem)
        key = read_key(keys[0])
    except (ValueError, TypeError) as exc:
        raise invalid("CertificateString", REPLACE, f"the certificate or key cannot be read: {exc}") from None
    if certificate_type == "PEM" and len(chain) != 1:
        raise invalid("CertificateType", REPLACE, f"PEM is one certificate, not {len(chain)} (PEMchain is a chain)")
    leaf = chain[0]
    if key.public_key().public_bytes(*SPKI) != leaf.public_key().public_bytes(*SPKI):
        raise invalid("CertificateString", REPLACE, "the private key (given, or the last CSR's) does not belong to "
                      "the (first) certificate")
    now = datetime.datetime.now(datetime.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise invalid("CertificateString", REPLACE, f"the certificate is valid from {leaf.not_valid_before_utc} to "
                      f"{leaf.not_valid_after_utc} only")
    return chain, certificates_pem, keys[0]


def csr_key(body: dict[str, Any]) -> CertificateIssuerPrivateKeyTypes:
    """The new key pair GenerateCSR's KeyPairAlgorithm, KeyCurveId and KeyBitLength ask for."""
    algorithm = body.get("KeyPairAlgorithm", "TPM_ALG_ECDSA")
    if algorithm not in KEY_ALGORITHMS:
        raise RedfishError(400, "ActionParameterValueNotInList", algorithm, "KeyPairAlgorithm", GENERATE_CSR)
    if algorithm == "TPM_ALG_RSA":
        bits = body.get("KeyBitLength", RSA_BITS[0])
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in RSA_BITS:
            raise RedfishError(400, "ActionParameterValueNotInList", bits, "KeyBitLength", GENERATE_CSR)
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    curve = body.get("KeyCurveId", "TPM_ECC_NIST_P256")
    if not isinstance(curve, str) or curve not in CURVES:
        raise RedfishError(400, "ActionParameterValueNotInList", curve, "KeyCurveId", GENERATE_CSR)
    return ec.generate_private_key(CURVES[curve]())


def csr_subject(body: dict[str, Any]) -> tuple[x509.Name, list[x509.GeneralName]]:
    """The subject name and alternative names GenerateCSR's parameters give."""
    attributes = []
    for key, oid in IDENTIFIER:
        if key in body:
            value = body[key]
            if not isinstance(value, str) or not value or (key == "Country" and len(value) != 2):
                raise invalid(key, GENERATE_CSR, "a non-empty string" + (" of two letters" if key == "Country" else ""))
            attributes.append(x509.NameAttribute(oid, value))
    names = body.get("AlternativeNames", [])
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise RedfishError(400, "ActionParameterValueTypeError", names, "AlternativeNames", GENERATE_CSR)
    alternative: list[x509.GeneralName] = []
    for name in names:
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative.append(x509.DNSName(name))
    return x509.Name(attributes), alternative


def csr_action_info() -> dict[str, Any]:
    """GenerateCSR's parameters as this service takes them."""
    strings = [{"Name": key, "Required": key == "CommonName", "DataType": "String"} for key, _ in IDENTIFIER]
    return {
        "@odata.id": CSR_ACTION_INFO, "@odata.type": "#ActionInfo.v1_5_0.ActionInfo", "Id": "GenerateCSRActionInfo",
        "Name": "GenerateCSR parameters",
        "Parameters": [
            {"Name": "CertificateCollection", "Required": True, "DataType": "Object",
             "ObjectDataType": "#CertificateCollection.CertificateCollection"},
            *strings, {"Name": "AlternativeNames", "Required": False, "DataType": "StringArray"},
            {"Name": "KeyPairAlgorithm", "Required": False, "DataType": "String", "AllowableValues": KEY_ALGORITHMS,
             "DefaultValue": KEY_ALGORITHMS[0]},
            {"Name": "KeyCurveId", "Required": False, "DataType": "String", "AllowableValues": list(CURVES),
             "DefaultValue": next(iter(CURVES))},
            {"Name": "KeyBitLength", "Required": False, "DataType": "Number",
             "AllowableNumbers": [str(bits) for bits in RSA_BITS], "DefaultValue": str(RSA_BITS[0])}]}


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole: a new file with ``mode`` beside it, renamed over it."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def action_parameters(body: dict[str, Any], action: str, known: tuple[str, ...], required: tuple[str, ...],
                      unsupported: tuple[str, ...] = ()) -> None:
    """400 for a parameter the action does not have or that is missing."""
    for key in body:
        if key in unsupported:
            raise RedfishError(400, "ActionParameterNotSupported", key, action)
        if key not in known:
            raise RedfishError(400, "ActionParameterUnknown", action, key)
    for key in required:
        if key not in body:
            raise RedfishError(400, "ActionParameterMissing", action, key)


class FollowedFiles:
    """The certificate files a TLS context serves, followed: at each handshake (OpenSSL's
    servername callback, which runs with or without SNI) the files are looked at (stat), and once
    they changed, a context made from them (``make``, as the server made its own) serves this
    and the following connections. A pair that does not load (half written) is tried again at
    the next handshake."""

    def __init__(self, files: tuple[Path, Path], make: Callable[[], ssl.SSLContext]) -> None:
        self.files, self.make = files, make
        self.loaded = self.stamp()
        self.current: ssl.SSLContext | None = None

    def stamp(self) -> tuple[int, ...]:
        try:
            return tuple(value for path in self.files for value in (path.stat().st_ino, path.stat().st_mtime_ns))
        except OSError:
            return ()

    def handshake(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                  context: ssl.SSLContext) -> None:
        stamp = self.stamp()
        if stamp and stamp != self.loaded:
            try:
                self.current = self.make()
                self.loaded = stamp
                log.info("serving the new HTTPS certificate of %s", self.files[0])
            except (OSError, ssl.SSLError) as exc:
                log.warning("HTTPS certificate %s not loaded (yet): %s", self.files[0], exc)
        if self.current is not None:
            connection.context = self.current


def ssl_context(config: uvicorn.Config, make: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's ``ssl_context_factory``: its own context, following replacements of its files."""
    context = make()
    files = (Path(config.ssl_certfile or ""), Path(config.ssl_keyfile or config.ssl_certfile or ""))
    context.sni_callback = FollowedFiles(files, make).handshake
    return context


def register(app: FastAPI, redfish: Redfish) -> None:
    async def administer_all(request: Request) -> list[str]:
        """The machines on the bus, once the caller has ConfigureManager on every one (403 else)."""
        machines = await redfish.machines.list()
        logins = await redfish.auth.login(request, machines)
        if set(logins) != set(machines):
            raise RedfishError(403, "InsufficientPrivilege")
        for login in logins.values():
            login.require("ConfigureManager")
        return machines

    @app.get(SERVICE_PATH)
    async def certificate_service(request: Request) -> Response:
        await redfish.login(request)
        return json_response({
            "@odata.id": SERVICE_PATH, "@odata.type": "#CertificateService.v1_2_1.CertificateService",
            "Id": "CertificateService", "Name": "Certificate service",
            "CertificateLocations": link(f"{SERVICE_PATH}/CertificateLocations"),
            "Actions": {REPLACE: {"target": f"{SERVICE_PATH}/Actions/CertificateService.ReplaceCertificate",
                                  "CertificateType@Redfish.AllowableValues": CERTIFICATE_TYPES},
                        GENERATE_CSR: {"target": f"{SERVICE_PATH}/Actions/CertificateService.GenerateCSR",
                                       "@Redfish.ActionInfo": CSR_ACTION_INFO}}})

    @app.get(CSR_ACTION_INFO)
    async def generate_csr_info(request: Request) -> Response:
        await redfish.login(request)
        return json_response(csr_action_info())

    @app.get(f"{SERVICE_PATH}/CertificateLocations")
    async def certificate_locations(request: Request) -> Response:
        machines = await redfish.visible_machines(request)
        served = certificate_files(redfish.config) is not None
        return json_response({
            "@odata.id": f"{SERVICE_PATH}/CertificateLocations",
            "@odata.type": "#CertificateLocations.v1_0_4.CertificateLocations", "Id": "CertificateLocations",
            "Name": "Certificate locations",
            "Links": {"Certificates": [link(certificate_path(machine)) for machine in machines if served]}})

    @app.get("/redfish/v1/Managers/{machine}/NetworkProtocol/HTTPS/Certificates")
    async def certificates(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        members = [certificate_path(machine)] if certificate_files(redfish.config) else []
        return json_response(collection(collection_path(machine), "CertificateCollection", "HTTPS certificates",
                                        members))

    @app.get("/redfish/v1/Managers/{machine}/NetworkProtocol/HTTPS/Certificates/{certificate_id}")
    async def certificate_of(request: Request, machine: str, certificate_id: str) -> Response:
        await redfish.login(request, machine)
        chain = served_chain(redfish.config)
        if certificate_id != CERTIFICATE_ID or not chain:
            raise RedfishError(404, "ResourceNotFound", "Certificate", certificate_id)
        return json_response(certificate(certificate_path(machine), chain))

    @app.post(f"{SERVICE_PATH}/Actions/CertificateService.GenerateCSR")
    async def generate_csr(request: Request) -> Response:
        """A new key pair and its CSR (the key kept for the certificate to come); 200 with the CSR."""
        machines = await administer_all(request)
        body = await action_body(request)
        known = ("CertificateCollection", "AlternativeNames", "KeyPairAlgorithm", "KeyCurveId", "KeyBitLength",
                 *(key for key, _ in IDENTIFIER))
        action_parameters(body, GENERATE_CSR, known, ("CommonName", "CertificateCollection"), CSR_UNSUPPORTED)
        target = body["CertificateCollection"]
        uri = target.get("@odata.id") if isinstance(target, dict) else None
        files = certificate_files(redfish.config)
        if files is None or uri not in [collection_path(machine) for machine in machines]:
            raise RedfishError(400, "ActionParameterValueNotInList", uri if uri is not None else target,
                               "CertificateCollection", GENERATE_CSR)
        subject, alternative = csr_subject(body)
        key = csr_key(body)
        builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
        if alternative:
            builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        request_pem = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        try:
            replace_file(csr_key_file(files[1]), key_pem, 0o600)
        except OSError as exc:
            raise RedfishError(500, "GeneralError", f"the CSR's key cannot be kept: {exc}") from None
        return json_response({"CertificateCollection": link(uri), "CSRString": request_pem})

    @app.post(f"{SERVICE_PATH}/Actions/CertificateService.ReplaceCertificate")
    async def replace_certificate(request: Request) -> Response:
        """ReplaceCertificate of the HTTPS certificate: 200 with the new Certificate (and its
        Location); 400 naming what is wrong with the parameters."""
        machines = await administer_all(request)
        body = await action_body(request)
        parameters = ("CertificateString", "CertificateType", "CertificateUri")
        action_parameters(body, REPLACE, parameters, parameters)
        text, certificate_type, target = body["CertificateString"], body["CertificateType"], body["CertificateUri"]
        if not isinstance(text, str):
            raise RedfishError(400, "ActionParameterValueTypeError", text, "CertificateString", REPLACE)
        if certificate_type not in CERTIFICATE_TYPES:
            raise RedfishError(400, "ActionParameterValueNotInList", certificate_type, "CertificateType", REPLACE)
        uri = target.get("@odata.id") if isinstance(target, dict) else None
        files = certificate_files(redfish.config)
        if files is None or uri not in [certificate_path(machine) for machine in machines]:
            raise RedfishError(400, "ActionParameterValueNotInList", uri if uri is not None else target,
                               "CertificateUri", REPLACE)
        cert_file, key_file = files
        pending = csr_key_file(key_file)
        chain, certificates_pem, key_pem = parse_replacement(
            text, certificate_type, pending.read_bytes() if pending.exists() else None)
        try:
            if cert_file.resolve() == key_file.resolve():  # one file with both
                replace_file(cert_file, certificates_pem + key_pem, 0o600)
            else:
                replace_file(key_file, key_pem, 0o600)
                replace_file(cert_file, certificates_pem, 0o644)
            if pending.exists() and pending.read_bytes() == key_pem:
                pending.unlink()
        except OSError as exc:
            raise RedfishError(500, "GeneralError", f"the certificate files cannot be written: {exc}") from None
        log.info("HTTPS certificate replaced: %s", chain[0].subject.rfc4514_string())
        return json_response(certificate(uri, chain), headers={"Location": uri})
