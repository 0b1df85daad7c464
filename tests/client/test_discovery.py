"""Decoding DHT announcements into ServerViews; bans; pings; the CLI's input errors."""

from __future__ import annotations

import time

from swarm_cli.main import app
from typer.testing import CliRunner

from swarm.client.bans import BanList
from swarm.client.discovery import PingTable
from swarm.dht.records import Record, make_record
from swarm.directory import block_keys, delivered_by_peers, servers_from_records
from swarm.identity import Identity
from swarm.net.messages import PingEntry, ServerAnnouncement
from swarm.types import LayerRange, PeerId

MODEL = "tiny-0123456789ab"


def _record(ident: Identity, block: int, value: dict[str, object] | None, seq: int = 1) -> Record:
    key = block_keys(MODEL, 8)[block]
    return make_record(ident, key, value, time.time() + 60, seq, 1200)


def _ann(start: int, stop: int, **kw: object) -> dict[str, object]:
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
    fields.update(kw)
    return ServerAnnouncement(**fields).to_wire()  # type: ignore[arg-type]


def test_records_merge_per_peer_and_bad_ones_are_dropped() -> None:
    a, b, c, d = (Identity.from_seed(s) for s in (b"a", b"b", b"c", b"d"))
    nxt = PingEntry(b.peer_id, 0.01)
    records: dict[str, dict[PeerId, Record]] = {key: {} for key in block_keys(MODEL, 8)}
    for block in range(0, 4):  # a serves [0,4) and announces on each block
        records[block_keys(MODEL, 8)[block]][a.peer_id] = _record(
            a, block, _ann(0, 4, next_pings=(nxt,)), seq=block
        )
    records[block_keys(MODEL, 8)[4]][b.peer_id] = _record(b, 4, _ann(4, 8, port=4001))
    records[block_keys(MODEL, 8)[5]][c.peer_id] = _record(c, 5, {"t": "junk", "v": 1})
    records[block_keys(MODEL, 8)[6]][d.peer_id] = _record(d, 6, _ann(0, 2))  # wrong block
    views = {v.peer_id: v for v in servers_from_records(records, MODEL, 8)}
    assert set(views) == {a.peer_id, b.peer_id}
    assert views[a.peer_id].layers == LayerRange(0, 4)
    assert views[a.peer_id].next_pings == {b.peer_id: 0.01}
    assert views[b.peer_id].address == "127.0.0.1:4001"
    assert views[b.peer_id].throughput == 50.0


def test_range_past_the_model_is_dropped() -> None:
    a = Identity.from_seed(b"a")
    records = {block_keys(MODEL, 8)[7]: {a.peer_id: _record(a, 7, _ann(4, 12))}}
    assert servers_from_records(records, MODEL, 8) == []


def test_bans_back_off_and_expire() -> None:
    now = [0.0]
    bans = BanList(5.0, 2.0, 12.0, clock=lambda: now[0])
    peer = Identity.from_seed(b"x").peer_id
    assert [bans.ban(peer) for _ in range(3)] == [5.0, 10.0, 12.0]
    assert bans.is_banned(peer) and bans.banned() == {peer}
    now[0] = 12.5
    assert not bans.is_banned(peer) and bans.banned() == set()


def test_ping_table_is_an_ema() -> None:
    table = PingTable(0.5)
    peer = Identity.from_seed(b"x").peer_id
    table.update(peer, 0.2)
    table.update(peer, 0.1)
    assert abs(table.rtts[peer] - 0.15) < 1e-12


def test_cli_generate_input_errors(tmp_path: object) -> None:
    runner = CliRunner()
    no_peers = runner.invoke(app, ["generate", "/nonexistent", "hi"])
    assert no_peers.exit_code != 0
    both = runner.invoke(app, ["generate", "/x", "hi", "--ids", "1,2", "--initial-peers", "h:1"])
    assert both.exit_code != 0
    bad_ids = runner.invoke(app, ["generate", "/x", "--ids", "1,a", "--initial-peers", "h:1"])
    assert bad_ids.exit_code != 0
    missing = runner.invoke(app, ["generate", "/nonexistent", "hi", "--initial-peers", "h:1"])
    assert missing.exit_code != 0


def test_probed_speeds_decode_and_peers_figures_take_the_lower_median() -> None:
    a, b, c, d = (Identity.from_seed(s) for s in (b"a", b"b", b"c", b"d"))
    records: dict[str, dict[PeerId, Record]] = {key: {} for key in block_keys(MODEL, 8)}
    pings = (PingEntry(d.peer_id, 0.01, 5.0), PingEntry(c.peer_id, 0.02))  # c: not probed
    records[block_keys(MODEL, 8)[0]][a.peer_id] = _record(a, 0, _ann(0, 4, next_pings=pings))
    pings_b = (PingEntry(d.peer_id, 0.01, 9.0),)
    records[block_keys(MODEL, 8)[1]][b.peer_id] = _record(b, 1, _ann(0, 4, next_pings=pings_b))
    selfish = (PingEntry(d.peer_id, 0.01, 1e6),)  # d about itself: ignored
    records[block_keys(MODEL, 8)[4]][d.peer_id] = _record(d, 4, _ann(4, 8, next_pings=selfish))
    views = servers_from_records(records, MODEL, 8)
    by_id = {v.peer_id: v for v in views}
    assert by_id[a.peer_id].next_delivered == {d.peer_id: 5.0}
    assert by_id[a.peer_id].next_pings == {d.peer_id: 0.01, c.peer_id: 0.02}
    assert delivered_by_peers(views) == {d.peer_id: 5.0}  # of 5 and 9, the lower
