"""Moves announced with a server's record (rebalancing) go through the one strict decoder."""

from __future__ import annotations

import pytest

from swarm.directory import decode_announcement
from swarm.errors import ProtocolError
from swarm.net.messages import RangeMove, ServerAnnouncement
from swarm.types import LayerRange, MoveReason, ServerState

L = LayerRange


def _announcement(**kw: object) -> ServerAnnouncement:
    fields: dict[str, object] = dict(
        host="127.0.0.1", port=4000, layer_range=L(2, 4), state=ServerState.ONLINE,
        dtype="float32", throughput=5.0, free_cache_tokens=100, active_sessions=0,
        version="0.1.0",
    )  # fmt: skip
    fields.update(kw)
    return ServerAnnouncement(**fields)  # type: ignore[arg-type]


def test_a_move_and_an_intent_round_trip() -> None:
    move = RangeMove(L(0, 2), L(2, 4), MoveReason.UNCOVERED, at=1.7e9, gain=0.0)
    ann = _announcement(moving_to=L(4, 6), last_move=move)
    back = decode_announcement(ann.to_wire(), 2, 6)
    assert back.moving_to == L(4, 6) and back.last_move == move


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("moving_to", [4, 9]),
        (
            "last_move",
            {
                "from_range": [0, 2],
                "to_range": [2, 9],
                "reason": "uncovered",
                "at": 1.0,
                "gain": 1.0,
            },
        ),
        (
            "last_move",
            {"from_range": [0, 2], "to_range": [2, 4], "reason": "boredom", "at": 1.0, "gain": 1.0},
        ),
        (
            "last_move",
            {
                "from_range": [0, 2],
                "to_range": [2, 4],
                "reason": "uncovered",
                "at": -1.0,
                "gain": 1.0,
            },
        ),
    ],
)
def test_bad_moves_are_refused_naming_the_field(field: str, value: object) -> None:
    wire = _announcement().to_wire()
    if isinstance(value, dict):
        value = {"t": "range_move", "v": wire["v"], **value}
    wire[field] = value
    with pytest.raises(ProtocolError, match=field.split(".")[0]):
        decode_announcement(wire, 2, 6)
