"""A client whose local copy has other weights than the servers' (same name, same shape) is
told so, instead of "no usable server covers block 0"."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel
from swarm.errors import RoutingError
from swarm.shards import model_id
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange


async def test_other_weights_under_the_same_name_are_named(tmp_path: Path) -> None:
    theirs = write_random_llama(tmp_path / "a" / "tiny", num_layers=2, vocab=64, seed=1)
    ours = write_random_llama(tmp_path / "b" / "tiny", num_layers=2, vocab=64, seed=2)
    assert model_id(theirs) != model_id(ours)
    with trio.fail_after(60):
        async with open_local_swarm(theirs, [LayerRange(0, 2)]) as local:
            config = ClientConfig(initial_peers=(local.dht_address,), request_timeout=5.0)
            async with AsyncRemoteModel.open(ours, config) as model:
                with pytest.raises(RoutingError) as info:
                    await model.generate([1, 2, 3], 2)
    message = str(info.value)
    assert model_id(ours) in message and model_id(theirs) in message
    assert "differs" in message
