"""Noise XX / XXpsk3 against the cacophony test vectors, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from swarm.errors import HandshakeError
from swarm.net.noise import CipherState, HandshakeState, KeyPair

VECTORS = Path(__file__).resolve().parent / "vectors"  # copied from cacophony; see README
VECTOR_FILE = VECTORS / "noise-25519-chachapoly-sha256.json"


def _load(name: str) -> dict[str, Any]:
    if not VECTOR_FILE.exists():
        pytest.skip(f"test vectors not found at {VECTOR_FILE}")
    data = json.loads(VECTOR_FILE.read_text())
    matches = [v for v in data["vectors"] if v["protocol_name"] == name]
    assert len(matches) == 1
    return matches[0]


def _side(vector: dict[str, Any], prefix: str, initiator: bool) -> HandshakeState:
    psks = vector.get(f"{prefix}_psks")
    return HandshakeState(
        initiator=initiator,
        static=KeyPair.from_private_bytes(bytes.fromhex(vector[f"{prefix}_static"])),
        ephemeral=KeyPair.from_private_bytes(bytes.fromhex(vector[f"{prefix}_ephemeral"])),
        prologue=bytes.fromhex(vector[f"{prefix}_prologue"]),
        psk=bytes.fromhex(psks[0]) if psks else None,
    )


@pytest.mark.parametrize(
    "name", ["Noise_XX_25519_ChaChaPoly_SHA256", "Noise_XXpsk3_25519_ChaChaPoly_SHA256"]
)
def test_vectors_replay_byte_for_byte(name: str) -> None:
    vector = _load(name)
    init = _side(vector, "init", initiator=True)
    resp = _side(vector, "resp", initiator=False)
    messages = vector["messages"]
    for i, msg in enumerate(messages[:3]):
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        payload = bytes.fromhex(msg["payload"])
        wire = writer.write_message(payload)
        assert wire.hex() == msg["ciphertext"], f"handshake message {i}"
        assert reader.read_message(wire) == payload
    assert init.finished and resp.finished
    assert init.handshake_hash.hex() == vector["handshake_hash"]
    assert resp.handshake_hash.hex() == vector["handshake_hash"]
    init_send, init_recv = init.split()
    resp_send, resp_recv = resp.split()
    for i, msg in enumerate(messages[3:], start=3):
        send, recv = (init_send, resp_recv) if i % 2 == 0 else (resp_send, init_recv)
        payload = bytes.fromhex(msg["payload"])
        wire = send.encrypt_with_ad(b"", payload)
        assert wire.hex() == msg["ciphertext"], f"transport message {i}"
        assert recv.decrypt_with_ad(b"", wire) == payload


def test_wrong_psk_fails_on_third_message() -> None:
    init = HandshakeState(initiator=True, static=KeyPair.generate(), psk=b"a" * 32)
    resp = HandshakeState(initiator=False, static=KeyPair.generate(), psk=b"b" * 32)
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    with pytest.raises(HandshakeError):
        resp.read_message(init.write_message())


def test_tampered_and_replayed_transport_messages_fail() -> None:
    send, recv = CipherState(b"k" * 32), CipherState(b"k" * 32)
    first = send.encrypt_with_ad(b"", b"hello")
    second = send.encrypt_with_ad(b"", b"world")
    with pytest.raises(HandshakeError):
        recv.decrypt_with_ad(b"", second)  # reordered
    assert recv.decrypt_with_ad(b"", first) == b"hello"
    with pytest.raises(HandshakeError):
        recv.decrypt_with_ad(b"", first)  # replayed
    tampered = bytearray(second)
    tampered[0] ^= 1
    with pytest.raises(HandshakeError):
        recv.decrypt_with_ad(b"", bytes(tampered))
    assert recv.decrypt_with_ad(b"", second) == b"world"


def test_low_order_public_key_is_refused() -> None:
    resp = HandshakeState(initiator=False, static=KeyPair.generate())
    resp.read_message(b"\0" * 32)
    with pytest.raises(HandshakeError):
        resp.write_message()
