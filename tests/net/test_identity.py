"""Identity key files and PeerId text forms (swarm.net.identity, swarm.net.swarm_key)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from swarm.errors import IdentityError
from swarm.identity import Identity
from swarm.net import create_swarm_key, load_swarm_key
from swarm.types import PeerId


def test_identity_created_with_mode_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "identity.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).peer_id == first.peer_id


def test_identity_readable_by_others_is_refused_with_fix(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    Identity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load_or_create(path)


def test_peer_id_text_forms() -> None:
    peer = Identity.from_seed(b"x").peer_id
    assert PeerId.from_string(str(peer)) == peer
    assert PeerId.from_string(peer.hex()) == peer
    assert str(peer).startswith(peer.short())


def test_swarm_key_file(tmp_path: Path) -> None:
    key = create_swarm_key(tmp_path / "swarm.key")
    assert load_swarm_key(tmp_path / "swarm.key") == key
    os.chmod(tmp_path / "swarm.key", 0o640)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_swarm_key(tmp_path / "swarm.key")
