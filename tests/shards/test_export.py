"""`write_folder`: a GGUF file written out as a Hugging Face folder gives the same logits,
in our shards and in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.errors import ShardError
from swarm.shards import ModelConfig, load_head, load_span
from swarm.shards.export import write_folder
from swarm.testing.checkpoints import write_random_gguf
from swarm.types import LayerRange


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    layers = ModelConfig.from_pretrained(path).num_hidden_layers
    head, span = load_head(path), load_span(path, LayerRange(0, layers))
    with torch.no_grad():
        positions = torch.arange(ids.shape[1])[None]  # (1, seq)
        return head.logits(span(head.embed(ids), positions))  # (1, seq, vocab)


@pytest.mark.parametrize("tied", [False, True])
def test_folder_equals_the_gguf(tmp_path: Path, tied: bool) -> None:
    import transformers

    gguf = write_random_gguf(tmp_path / "m.gguf", qtype="Q8_0", tie_word_embeddings=tied)
    folder = write_folder(gguf, tmp_path / "folder")
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    want = _logits(gguf, ids)
    torch.testing.assert_close(_logits(folder, ids), want)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        theirs = model.eval()(ids).logits
    torch.testing.assert_close(theirs, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ShardError, match="already holds"):
        write_folder(gguf, folder)
