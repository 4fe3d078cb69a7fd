"""Encryption of secrets at rest (user passwords, K_G) with a key file.

IPMI needs each cleartext password (it keys RAKP and the IPMI 1.5 auth codes), so passwords are
stored encrypted, not hashed: AES-256-GCM with a random nonce, the KV key as associated data
(a ciphertext moved to another slot does not decrypt). The key file is made at first start,
mode 0600.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12


class SecretError(Exception):
    pass


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretError(f"a secret key has {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def from_key_file(cls, path: Path) -> SecretBox:
        """Read the key file, creating it (0600, in a 0700 folder) if it does not exist."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(AESGCM.generate_key(bit_length=256))
        try:
            return cls(path.read_bytes())
        except SecretError as exc:
            raise SecretError(f"{path}: {exc}") from None

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, plaintext, context.encode())).decode()

    def open(self, sealed: str, context: str) -> bytes:
        raw = base64.b64decode(sealed)
        try:
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
        except InvalidTag:
            raise SecretError(f"stored secret {context} does not decrypt with this key file") from None
