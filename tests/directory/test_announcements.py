"""One strict announcement decoder for clients and servers: bad signed records are dropped
on both sides, so none can steer `--layers auto` or a client's routes."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

import pytest

from swarm.dht.records import Record, make_record
from swarm.directory import block_key, block_keys, servers_from_records
from swarm.identity import Identity
from swarm.net.messages import ServerAnnouncement
from swarm.server.announcer import choose_layers
from swarm.types import LayerRange, PeerId

MODEL = "tiny-0123456789ab"
LAYERS = 6


def _value(start: int, stop: int, **kw: object) -> dict[str, object]:
    fields: dict[str, object] = dict(
        host="127.0.0.1",
        port=4000,
        layer_range=LayerRange(start, stop),
        state="online",
        dtype="float32",
        throughput=50.0,
        free_cache_tokens=1000,
        active_sessions=1,
        version="0.1.0",
    )
    raw = {k.removeprefix("raw_"): v for k, v in kw.items() if k.startswith("raw_")}
    fields.update({k: v for k, v in kw.items() if not k.startswith("raw_")})
    wire = ServerAnnouncement(**fields).to_wire()  # type: ignore[arg-type]
    wire.update(raw)  # values a correct peer would never send, e.g. a negative cache
    return wire


class _FakeDHT:
    """What `choose_layers` reads: ``get_many`` over signed records."""

    def __init__(self, records: Mapping[str, Mapping[PeerId, Record]]) -> None:
        self.records = records

    async def get_many(self, keys: Iterable[str]) -> dict[str, dict[PeerId, Record]]:
        return {k: dict(self.records.get(k, {})) for k in keys}


Announced = tuple[Identity, int, dict[str, object]]


def _records(*announced: Announced) -> dict[str, dict[PeerId, Record]]:
    out: dict[str, dict[PeerId, Record]] = {key: {} for key in block_keys(MODEL, LAYERS)}
    for ident, block, value in announced:
        key = block_key(MODEL, block)
        out[key][ident.peer_id] = make_record(ident, key, value, time.time() + 60, 1, 1200)
    return out


BAD = {
    "infinite throughput": dict(throughput=math.inf),
    "NaN throughput": dict(throughput=math.nan),
    "huge throughput": dict(throughput=1e300),
    "negative cache": dict(raw_free_cache_tokens=-5, free_cache_tokens=0),
    "negative sessions": dict(raw_active_sessions=-1, active_sessions=0),
}


@pytest.mark.parametrize("why", list(BAD))
async def test_bad_numbers_are_dropped_on_both_sides(why: str) -> None:
    honest, liar = Identity.from_seed(b"honest"), Identity.from_seed(b"liar")
    # the honest server serves blocks 0..2 with a high throughput; the liar claims 3..5
    announced = [(honest, b, _value(0, 3, throughput=1000.0)) for b in range(3)]
    announced += [(liar, b, _value(3, 6, **BAD[why])) for b in range(3, 6)]  # type: ignore[arg-type]
    records = _records(*announced)
    views = servers_from_records(records, MODEL, LAYERS)  # the client's view
    assert [v.peer_id for v in views] == [honest.peer_id]
    # the server's view: blocks 3..5 are unserved, so a new server takes them
    chosen = await choose_layers(_FakeDHT(records), MODEL, LAYERS, 3)  # type: ignore[arg-type]
    assert chosen == LayerRange(3, 6)


async def test_a_range_that_misses_its_key_is_dropped_on_both_sides() -> None:
    honest, liar = Identity.from_seed(b"honest"), Identity.from_seed(b"liar")
    announced = [(honest, b, _value(0, 3, throughput=1.0)) for b in range(3)]
    # the liar announces "[0, 3) at 1e6 tokens/s" under the keys of blocks 3..5 (unserved)
    announced += [(liar, b, _value(0, 3, throughput=1e6)) for b in range(3, 6)]
    records = _records(*announced)
    assert [v.peer_id for v in servers_from_records(records, MODEL, LAYERS)] == [honest.peer_id]
    chosen = await choose_layers(_FakeDHT(records), MODEL, LAYERS, 3)  # type: ignore[arg-type]
    assert chosen == LayerRange(3, 6)  # not steered away from the blocks nobody serves


def test_block_keys_parse_back_and_nothing_else_does() -> None:
    from swarm.directory.keys import block_key, evidence_key, parse_block_key

    assert parse_block_key(block_key("llama-1m-abc", 7)) == ("llama-1m-abc", 7)
    for key in (evidence_key("m"), "m/block/", "m/block/07", "m/block/-1", "/block/3"):
        assert parse_block_key(key) is None, key
