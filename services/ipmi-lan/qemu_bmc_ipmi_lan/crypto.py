"""RMCP+ and IPMI 1.5 cryptography (IPMI v2.0 §13.28-13.33, §22.17), with the cryptography package.

Cipher suites (IPMI v2.0 §22.15.2, table 22-20) offered: 1, 2, 3 (RAKP-HMAC-SHA1, HMAC-SHA1-96,
AES-CBC-128) and 15, 16, 17 (RAKP-HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128); 0 (no
authentication) only when the operator enables it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from hmac import compare_digest

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

AUTH_RAKP_NONE = 0x00
AUTH_RAKP_HMAC_SHA1 = 0x01
AUTH_RAKP_HMAC_SHA256 = 0x03
INTEGRITY_NONE = 0x00
INTEGRITY_HMAC_SHA1_96 = 0x01
INTEGRITY_HMAC_SHA256_128 = 0x04
CONFIDENTIALITY_NONE = 0x00
CONFIDENTIALITY_AES_CBC_128 = 0x01


_HASHES = {AUTH_RAKP_HMAC_SHA1: hashes.SHA1, AUTH_RAKP_HMAC_SHA256: hashes.SHA256}
#: the RAKP 4 integrity check value length per authentication algorithm (§13.28.4)
_ICV_LENGTH = {AUTH_RAKP_NONE: 0, AUTH_RAKP_HMAC_SHA1: 12, AUTH_RAKP_HMAC_SHA256: 16}
#: integrity algorithm -> (hash, code length)
_INTEGRITY = {INTEGRITY_HMAC_SHA1_96: (hashes.SHA1, 12), INTEGRITY_HMAC_SHA256_128: (hashes.SHA256, 16)}


def hmac_digest(algorithm: type[hashes.HashAlgorithm], key: bytes, *parts: bytes) -> bytes:
    mac = hmac.HMAC(key, algorithm())
    for part in parts:
        mac.update(part)
    return mac.finalize()


def hmac_compare(a: bytes, b: bytes) -> bool:
    """Constant-time comparison."""
    return compare_digest(a, b)


@dataclass
class SessionKeys:
    """The keys of one RMCP+ session, derived from RAKP (IPMI v2.0 §13.31, §13.32)."""

    authentication: int
    integrity: int
    confidentiality: int
    sik: bytes = b""
    k1: bytes = b""
    k2: bytes = b""

    @property
    def hash(self) -> type[hashes.HashAlgorithm]:
        return _HASHES[self.authentication]

    # -------------------------------------------------------------- RAKP

    def rakp2_code(self, kuid: bytes, console_id: bytes, bmc_id: bytes, console_random: bytes,
                   bmc_random: bytes, guid: bytes, role: int, name: bytes) -> bytes:
        """RAKP 2 key exchange authentication code (§13.31): HMAC_Kuid(SIDm, SIDc, Rm, Rc, GUIDc,
        ROLEm, ULENGTHm, UNAMEm)."""
        if self.authentication == AUTH_RAKP_NONE:
            return b""
        return hmac_digest(self.hash, kuid, console_id, bmc_id, console_random, bmc_random, guid,
                           bytes([role, len(name)]), name)

    def rakp3_valid(self, code: bytes, kuid: bytes, console_id: bytes, bmc_random: bytes, role: int,
                    name: bytes) -> bool:
        """RAKP 3 (§13.31): HMAC_Kuid(Rc, SIDm, ROLEm, ULENGTHm, UNAMEm)."""
        if self.authentication == AUTH_RAKP_NONE:
            return True
        expected = hmac_digest(self.hash, kuid, bmc_random, console_id, bytes([role, len(name)]), name)
        return hmac_compare(expected, code)

    def derive(self, kg: bytes, console_random: bytes, bmc_random: bytes, role: int, name: bytes) -> None:
        """SIK = HMAC_KG(Rm, Rc, ROLEm, ULENGTHm, UNAMEm); K1, K2 = HMAC_SIK(20 × 0x01 / 0x02) (§13.32)."""
        if self.authentication == AUTH_RAKP_NONE:
            return
        self.sik = hmac_digest(self.hash, kg, console_random, bmc_random, bytes([role, len(name)]), name)
        # The constants are 20 bytes for every algorithm, SHA-256 included.
        self.k1 = hmac_digest(self.hash, self.sik, b"\x01" * 20)
        self.k2 = hmac_digest(self.hash, self.sik, b"\x02" * 20)

    def rakp4_code(self, console_random: bytes, bmc_id: bytes, guid: bytes) -> bytes:
        """RAKP 4 integrity check value (§13.31): HMAC_SIK(Rm, SIDc, GUIDc), truncated."""
        if self.authentication == AUTH_RAKP_NONE:
            return b""
        return hmac_digest(self.hash, self.sik, console_random, bmc_id, guid)[:_ICV_LENGTH[self.authentication]]

    # -------------------------------------------------------------- per packet

    @property
    def integrity_length(self) -> int:
        return _INTEGRITY[self.integrity][1] if self.integrity in _INTEGRITY else 0

    def sign(self, data: bytes) -> bytes:
        """The integrity code of an outgoing packet (§13.28.4): HMAC_K1 truncated."""
        algorithm, length = _INTEGRITY[self.integrity]
        return hmac_digest(algorithm, self.k1, data)[:length]

    def verify(self, data: bytes, code: bytes) -> bool:
        if self.integrity not in _INTEGRITY:
            return False
        return hmac_compare(self.sign(data), code)

    def encrypt(self, payload: bytes) -> bytes:
        """AES-CBC-128 with K2 (§13.29): IV, then payload + pad 1, 2, … + pad length."""
        if self.confidentiality == CONFIDENTIALITY_NONE:
            return payload
        pad = (16 - (len(payload) + 1) % 16) % 16
        plain = payload + bytes(range(1, pad + 1)) + bytes([pad])
        iv = os.urandom(16)
        encryptor = Cipher(algorithms.AES(self.k2[:16]), modes.CBC(iv)).encryptor()
        return iv + encryptor.update(plain) + encryptor.finalize()

    def decrypt(self, payload: bytes) -> bytes | None:
        """The plain payload, or None when it is not a valid AES-CBC-128 payload."""
        if self.confidentiality == CONFIDENTIALITY_NONE:
            return payload
        if len(payload) < 32 or len(payload) % 16:
            return None
        decryptor = Cipher(algorithms.AES(self.k2[:16]), modes.CBC(payload[:16])).decryptor()
        plain = decryptor.update(payload[16:]) + decryptor.finalize()
        pad = plain[-1]
        if pad >= 16 or plain[-1 - pad:-1] != bytes(range(1, pad + 1)):
            return None
        return plain[:-1 - pad]


def v15_auth_code(auth_type: int, password: bytes, session_id: bytes, message: bytes, sequence: bytes) -> bytes:
    """IPMI 1.5 per-message authentication code (§22.17.1): straight password, or
    MD5(password, session id, message, sequence, password) with the password padded to 16 bytes."""
    key = password.ljust(16, b"\0")[:16]
    if auth_type == 0x04:
        return key
    digest = hashes.Hash(hashes.MD5())
    for part in (key, session_id, message, sequence, key):
        digest.update(part)
    return digest.finalize()
