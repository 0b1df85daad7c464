"""Going online fast: the first throughput estimate kept between starts, the full measurement
announced as soon as it is done (issue 21, the latency budget)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from swarm.directory import block_keys, servers_from_records
from swarm.server import capacity
from swarm.server.capacity import SpanTimings, estimate_span
from swarm.server.timings_store import TimingsKey, TimingsStore
from swarm.shards.span import Span, load_span
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import LocalServer, open_local_swarm
from swarm.types import LayerRange

WHOLE = LayerRange(0, 4)
# far from anything a tiny span measures, so the test can tell them apart
KEPT = SpanTimings(((1, 0.25), (2, 0.3)), ((16, 0.5),), 1e6, 64.0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("startup") / "tiny"
    write_random_llama(path, num_layers=4, hidden=64, seed=5, std=0.1)
    return path


def key(layers: LayerRange = WHOLE) -> TimingsKey:
    return TimingsKey("llama-x-0123", layers, "float32", "none", "cpu test", 1)


def test_the_store_gives_back_what_it_kept_for_that_key_only(tmp_path: Path) -> None:
    store = TimingsStore(tmp_path / "timings")
    assert store.load(key()) is None
    store.save(key(), KEPT)
    assert store.load(key()) == KEPT
    assert store.load(key(LayerRange(0, 3))) is None  # another range: measured anew
    assert TimingsStore(tmp_path / "timings").load(key()) == KEPT  # a later process


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.update(decode=[[1, -0.1]]),
        lambda r: r.update(decode=[[2, 0.1], [1, 0.2]]),
        lambda r: r.update(decode=[[1, float("nan")]]),
        lambda r: r.update(decode=[[1, "0.1"]]),
        lambda r: r.update(chunks=[]),
        lambda r: r.update(flops_per_token=0),
        lambda r: r["key"].update(torch_version="0.0"),
        lambda r: r.update(format=99),
        lambda r: r.update(padding="x" * 70_000),
    ],
)
def test_a_stored_record_out_of_range_is_ignored(tmp_path: Path, change: object) -> None:
    store = TimingsStore(tmp_path)
    store.save(key(), KEPT)
    path = tmp_path / key().file_name()
    record = json.loads(path.read_text())
    change(record)  # type: ignore[operator]
    path.write_text(json.dumps(record))
    assert store.load(key()) is None


def test_an_unreadable_file_is_a_miss(tmp_path: Path) -> None:
    (tmp_path / key().file_name()).write_bytes(b"\xff{not json")
    assert TimingsStore(tmp_path).load(key()) is None


async def announced_throughput(local: object, server: LocalServer) -> float:
    model = server.ready.model_id
    found = await local.dht.get_many(block_keys(model, 4))  # type: ignore[attr-defined]
    views = {v.peer_id: v for v in servers_from_records(found, model, 4)}
    return views[server.ready.peer_id].throughput


async def test_a_restart_goes_online_with_the_kept_timings_and_keeps_the_new_ones(
    model_path: Path, tmp_path: Path
) -> None:
    """The first start keeps its online measurement; the next start of the same span goes
    online announcing it (no timed steps before), measures again online and announces that."""
    async with open_local_swarm(model_path) as local:
        await local.add_server(WHOLE, timings_dir=tmp_path)
        with trio.fail_after(30):
            while not (kept := list(tmp_path.glob("*.json"))):  # kept once measured online
                await trio.sleep(0.01)
        assert len(kept) == 1
        # the file a restart finds: what the first start measured, replaced by KEPT here so
        # that the test can tell it from anything measured
        record = json.loads(kept[0].read_text())
        record.update(decode=[list(p) for p in KEPT.decode], chunks=[list(p) for p in KEPT.chunks])
        kept[0].write_text(json.dumps(record))
    # a swarm of its own: a DHT that still lists the stopped server waits out its timeouts
    async with open_local_swarm(model_path) as local:
        second = await local.add_server(WHOLE, timings_dir=tmp_path, announce_ttl=600.0)
        assert second.ready.throughput == pytest.approx(KEPT.throughput(1))
        assert await announced_throughput(local, second) == pytest.approx(KEPT.throughput(1))
        handlers = second.server.handlers
        assert handlers is not None
        store, stored_key = TimingsStore(tmp_path), _only_key(tmp_path, second)
        with trio.fail_after(30):
            # replaced once measured online again
            while (stored := store.load(stored_key)) is None or stored.decode == KEPT.decode:
                await trio.sleep(0.01)
        assert handlers.state.timings_final
        assert stored is not None and stored.throughput(1) == pytest.approx(
            handlers.state.throughput
        )
        assert handlers.state.throughput != pytest.approx(KEPT.throughput(1))


def _only_key(folder: Path, server: LocalServer) -> TimingsKey:
    record = json.loads(next(folder.glob("*.json")).read_text())["key"]
    layers = LayerRange(*record.pop("layers"))
    assert layers == server.ready.layers
    return TimingsKey(layers=layers, **record)


async def test_the_full_measurement_is_announced_as_soon_as_it_is_done(model_path: Path) -> None:
    """The server is online (and answers) on its first estimate; the full measurement once
    online is announced at once, not at the next re-announcement (here 300 s away)."""
    async with open_local_swarm(model_path) as local:
        server = await local.add_server(WHOLE, announce_ttl=600.0)
        handlers = server.server.handlers
        assert handlers is not None
        with trio.fail_after(30):
            while not handlers.state.timings_final:
                await trio.sleep(0.01)
            final = handlers.state.throughput
            assert final != pytest.approx(server.ready.throughput)  # the first estimate
            while await announced_throughput(local, server) != pytest.approx(final):
                await trio.sleep(0.05)


def test_the_first_estimate_times_one_layer_and_scales_it_slow(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without kept timings a server goes online on one layer's timings, scaled to its span
    and by the margin (erring slow: an overestimate would draw routes to it); the other
    layers are not run."""
    span = load_span(model_path, WHOLE)
    ran = [0] * len(span.blocks)
    for i, block in enumerate(span.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.__setitem__(i, ran[i] + 1))
    estimate = estimate_span(span)
    assert ran[0] > 0 and ran[1:] == [0] * (len(span.blocks) - 1)
    assert estimate.flops_per_token == 2.0 * sum(p.numel() for p in span.blocks.parameters())
    # the scaling, exactly: one layer's timings as `measure_span` would give them
    one = SpanTimings(((1, 0.01),), ((16, 0.02),), 1000.0, 8.0)
    timed: list[LayerRange] = []

    def fake(narrow: Span, **_: object) -> SpanTimings:
        timed.append(narrow.layers)
        return one

    monkeypatch.setattr(capacity, "measure_span", fake)
    scaled = estimate_span(span.narrow(LayerRange(1, 4)), margin=2.0)
    assert timed == [LayerRange(1, 2)]
    assert scaled == SpanTimings(((1, 0.06),), ((16, 0.12),), 3000.0, 24.0)
    assert scaled.throughput(1) == pytest.approx(one.throughput(1) / 6)
    with pytest.raises(ValueError):
        estimate_span(span, margin=0.5)  # never announces faster than the layer scales to
