"""generation_config.json: the checkpoint's sampling defaults, applied as transformers
applies them, options winning; its eos ids end generation too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarm.errors import ShardError
from swarm.shards import ModelConfig
from swarm.shards.bundled import demo_model_path
from swarm.shards.generation import GenerationDefaults, Sampling
from swarm.testing.checkpoints import write_random_gguf, write_random_llama


def _with_generation_config(tmp_path: Path, **fields: object) -> Path:
    folder = write_random_llama(tmp_path / "m", num_layers=1, vocab=64)
    (folder / "generation_config.json").write_text(json.dumps(fields))
    return folder


def test_bundled_model_defaults_and_overrides() -> None:
    defaults = GenerationDefaults.from_pretrained(demo_model_path())
    assert defaults.resolve() == Sampling(0.8, 40, 1.0)
    assert defaults.resolve(temperature=0.0) == Sampling(0.0, 40, 1.0)
    assert defaults.resolve(top_k=0, top_p=0.9) == Sampling(0.8, 0, 0.9)


def test_greedy_unless_do_sample(tmp_path: Path) -> None:
    assert GenerationDefaults.from_pretrained(tmp_path).resolve() == Sampling(0.0, 0, 1.0)
    folder = _with_generation_config(tmp_path, do_sample=False, temperature=0.7, top_k=20)
    assert GenerationDefaults.from_pretrained(folder).resolve() == Sampling(0.0, 0, 1.0)
    gguf = write_random_gguf(tmp_path / "x.gguf", num_layers=1)
    assert GenerationDefaults.from_pretrained(gguf) == GenerationDefaults()


def test_sampling_fills_in_transformers_defaults() -> None:
    from transformers import GenerationConfig

    hf = GenerationConfig._get_default_generation_params()  # what generate() fills in
    ours = GenerationDefaults(do_sample=True).resolve()
    assert ours == Sampling(hf["temperature"], hf["top_k"], hf["top_p"])


def test_generation_eos_ids_end_generation(tmp_path: Path) -> None:
    folder = _with_generation_config(tmp_path, eos_token_id=[2, 7], do_sample=True, top_p=0.95)
    assert ModelConfig.from_pretrained(folder).eos_token_id == (2, 7)
    assert GenerationDefaults.from_pretrained(folder).resolve() == Sampling(1.0, 50, 0.95)


def test_bad_values_are_named(tmp_path: Path) -> None:
    folder = _with_generation_config(tmp_path, temperature="hot")
    with pytest.raises(ShardError, match=r"temperature='hot' is not a number"):
        GenerationDefaults.from_pretrained(folder)
