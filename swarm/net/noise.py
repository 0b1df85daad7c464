"""The Noise protocol framework (revision 34), for the two patterns swarm uses.

``Noise_XX_25519_ChaChaPoly_SHA256`` for open swarms and
``Noise_XXpsk3_25519_ChaChaPoly_SHA256`` for private swarms (the swarm key is the PSK), built
on `cryptography`'s X25519, ChaCha20-Poly1305 and SHA-256/HMAC. The objects here follow the
specification's names (`CipherState`, `SymmetricState`, `HandshakeState`) so the code can be
read beside it; they know nothing about sockets. `swarm.net.handshake` drives them over a stream.

Every method raises `HandshakeError` for anything a peer can cause (a message too short, a
failed authentication tag, a low-order public key) and `ValueError` for local misuse.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from swarm.errors import HandshakeError

__all__ = [
    "DHLEN",
    "HASHLEN",
    "TAGLEN",
    "CipherState",
    "HandshakeState",
    "KeyPair",
    "SymmetricState",
    "protocol_name",
]

DHLEN = 32
HASHLEN = 32
TAGLEN = 16
_MAX_NONCE = 2**64 - 1  # reserved by the spec; reaching it means the key is used up

# Message patterns, per direction, for the two handshakes we speak.
_XX: tuple[tuple[str, ...], ...] = (("e",), ("e", "ee", "s", "es"), ("s", "se"))
_XXPSK3: tuple[tuple[str, ...], ...] = (("e",), ("e", "ee", "s", "es"), ("s", "se", "psk"))


def protocol_name(psk: bool) -> bytes:
    """The full Noise protocol name for XX, or XXpsk3 when a pre-shared key is used."""
    pattern = "XXpsk3" if psk else "XX"
    return f"Noise_{pattern}_25519_ChaChaPoly_SHA256".encode()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def _hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
    """The spec's HKDF (§4.3): two or three HASHLEN outputs."""
    temp_key = _hmac(chaining_key, ikm)
    out1 = _hmac(temp_key, b"\x01")
    out2 = _hmac(temp_key, out1 + b"\x02")
    if outputs == 2:
        return out1, out2
    return out1, out2, _hmac(temp_key, out2 + b"\x03")


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair: the private key object and its raw 32-byte public key."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        return cls.from_private_bytes(X25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """Load a raw 32-byte private key (test vectors fix the keys this way)."""
        private = X25519PrivateKey.from_private_bytes(raw)
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(private, public)

    def dh(self, remote_public: bytes) -> bytes:
        """X25519 with a peer's raw public key. Raises `HandshakeError` on a bad key."""
        try:
            return self.private.exchange(X25519PublicKey.from_public_bytes(remote_public))
        except ValueError as exc:  # wrong length, or a low-order point (all-zero output)
            raise HandshakeError("peer sent an invalid X25519 public key") from exc


class CipherState:
    """A ChaCha20-Poly1305 key and its 64-bit nonce counter (spec §5.1)."""

    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    def initialize_key(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.n = 0

    def has_key(self) -> bool:
        return self._aead is not None

    def _nonce(self) -> bytes:
        if self.n >= _MAX_NONCE:
            raise HandshakeError("nonce space exhausted; the channel must be re-established")
        return struct.pack("<4xQ", self.n)

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes | memoryview) -> bytes:
        """Encrypt and advance the nonce; the identity function before a key is set."""
        if self._aead is None:
            return bytes(plaintext)
        out = self._aead.encrypt(self._nonce(), plaintext, ad)
        self.n += 1
        return out

    def encrypt_into(self, ad: bytes, plaintext: bytes | memoryview, out: memoryview) -> None:
        """Like `encrypt_with_ad` (a key must be set) but writes ciphertext + tag into
        ``out``, which is exactly ``len(plaintext) + TAGLEN`` bytes: no extra copy."""
        if self._aead is None:
            raise ValueError("encrypt_into needs a key")
        self._aead.encrypt_into(self._nonce(), plaintext, ad, out)
        self.n += 1

    def decrypt_with_ad(
        self, ad: bytes | bytearray, ciphertext: bytes | bytearray | memoryview
    ) -> bytes:
        """Decrypt and advance the nonce. Raises `HandshakeError` if authentication fails
        (the nonce does not advance then, as the spec requires)."""
        if self._aead is None:
            return bytes(ciphertext)
        try:
            out = self._aead.decrypt(self._nonce(), ciphertext, ad)
        except InvalidTag as exc:
            raise HandshakeError("message failed authentication") from exc
        self.n += 1
        return out


class SymmetricState:
    """Chaining key, handshake hash and the current cipher (spec §5.2)."""

    def __init__(self, name: bytes) -> None:
        self.h = name.ljust(HASHLEN, b"\0") if len(name) <= HASHLEN else _sha256(name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf(self.ck, ikm, 2)
        self.cipher.initialize_key(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = _sha256(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher.initialize_key(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return CipherState(k1), CipherState(k2)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class HandshakeState:
    """One side of an XX or XXpsk3 handshake (spec §5.3).

    Call `write_message` / `read_message` in turn (initiator writes first); after the third
    message `finished` is true and `split()` gives the (send, receive) cipher states for this
    side, `handshake_hash` the channel binding value, `remote_static` the peer's static key.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static: KeyPair,
        prologue: bytes = b"",
        psk: bytes | None = None,
        ephemeral: KeyPair | None = None,
    ) -> None:
        if psk is not None and len(psk) != 32:
            raise ValueError("a Noise PSK is 32 bytes")
        self.initiator = initiator
        self.symmetric = SymmetricState(protocol_name(psk is not None))
        self.symmetric.mix_hash(prologue)
        self.s = static
        self.e = ephemeral  # fixed only by test vectors; otherwise generated on first use
        self.rs: bytes | None = None
        self.re: bytes | None = None
        self.psk = psk
        self._patterns: Sequence[tuple[str, ...]] = _XXPSK3 if psk is not None else _XX
        self._index = 0

    @property
    def finished(self) -> bool:
        return self._index == len(self._patterns)

    @property
    def handshake_hash(self) -> bytes:
        return self.symmetric.h

    @property
    def remote_static(self) -> bytes | None:
        return self.rs

    def _my_turn(self) -> bool:
        return (self._index % 2 == 0) == self.initiator

    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message, carrying `payload` (encrypted once a key exists)."""
        if self.finished or not self._my_turn():
            raise ValueError("not this side's turn to write a handshake message")
        out = bytearray()
        for token in self._patterns[self._index]:
            if token == "e":
                if self.e is None:
                    self.e = KeyPair.generate()
                out += self.e.public
                self._mix_ephemeral(self.e.public)
            elif token == "s":
                out += self.symmetric.encrypt_and_hash(self.s.public)
            elif token == "psk":
                self._mix_psk()
            else:
                self.symmetric.mix_key(self._dh(token))
        out += self.symmetric.encrypt_and_hash(payload)
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process a peer's handshake message and return its payload.

        Raises `HandshakeError` if the message is malformed or fails authentication.
        """
        if self.finished or self._my_turn():
            raise ValueError("not this side's turn to read a handshake message")
        view = memoryview(message)
        for token in self._patterns[self._index]:
            if token == "e":
                self.re, view = _take(view, DHLEN, "ephemeral key")
                self._mix_ephemeral(self.re)
            elif token == "s":
                size = DHLEN + (TAGLEN if self.symmetric.cipher.has_key() else 0)
                sealed, view = _take(view, size, "static key")
                self.rs = self.symmetric.decrypt_and_hash(sealed)
            elif token == "psk":
                self._mix_psk()
            else:
                self.symmetric.mix_key(self._dh(token))
        if self.symmetric.cipher.has_key() and len(view) < TAGLEN:
            raise HandshakeError("handshake message too short for its payload tag")
        payload = self.symmetric.decrypt_and_hash(bytes(view))
        self._index += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """(send, receive) cipher states for this side, once the handshake is finished."""
        if not self.finished:
            raise ValueError("the handshake is not finished")
        c1, c2 = self.symmetric.split()
        return (c1, c2) if self.initiator else (c2, c1)

    def _mix_ephemeral(self, public: bytes) -> None:
        self.symmetric.mix_hash(public)
        if self.psk is not None:
            self.symmetric.mix_key(public)  # spec §9.2: "e" also calls MixKey in psk mode

    def _mix_psk(self) -> None:
        assert self.psk is not None  # local invariant: psk tokens only exist in psk mode
        self.symmetric.mix_key_and_hash(self.psk)

    def _dh(self, token: str) -> bytes:
        """The DH for "ee", "es" or "se", seen from this side."""
        if self.e is None or self.re is None:
            raise HandshakeError("handshake out of order: ephemeral keys missing")
        if token == "ee":
            return self.e.dh(self.re)
        # "es": initiator's ephemeral with responder's static; "se" the other way round.
        local_ephemeral = (token == "es") == self.initiator
        if local_ephemeral:
            if self.rs is None:
                raise HandshakeError("handshake out of order: remote static key missing")
            return self.e.dh(self.rs)
        return self.s.dh(self.re)


def _take(view: memoryview, size: int, what: str) -> tuple[bytes, memoryview]:
    if len(view) < size:
        raise HandshakeError(f"handshake message too short for its {what}")
    return bytes(view[:size]), view[size:]
