"""Hub names resolve through a (fake, local) huggingface_hub cache; offline mode is honoured;
a download asks only for the files serving needs. Never touches the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.errors import ShardError
from swarm.shards import ModelConfig, load_span
from swarm.shards.hub import CHECKPOINT_FILES, is_hub_name, resolve_checkpoint
from swarm.testing.checkpoints import write_random_llama
from swarm.types import LayerRange

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root: Path, repo: str = "acme/tiny-llama") -> Path:
    """A hub cache holding ``repo`` at ``main``, laid out as huggingface_hub lays it out."""
    storage = root / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    write_random_llama(storage / "snapshots" / COMMIT, num_layers=2, vocab=64)
    return root


def test_hub_name_resolves_from_the_cache(tmp_path: Path) -> None:
    cache = fake_cache(tmp_path / "hub")
    path = resolve_checkpoint("acme/tiny-llama", cache_dir=cache, offline=True)
    assert path == cache / "models--acme--tiny-llama" / "snapshots" / COMMIT
    assert ModelConfig.from_pretrained(path).num_hidden_layers == 2
    load_span(path, LayerRange(0, 1))


def test_local_paths_pass_through(tmp_path: Path) -> None:
    folder = write_random_llama(tmp_path / "acme" / "tiny", num_layers=1, vocab=64)
    assert resolve_checkpoint(folder) == folder
    assert not is_hub_name(folder) and is_hub_name("Qwen/Qwen2.5-0.5B")
    with pytest.raises(ShardError, match=r"does not exist \(and is no hub name"):
        resolve_checkpoint(tmp_path / "no" / "such" / "model")


def test_offline_mode_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[bool] = []
    real = huggingface_hub.snapshot_download

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(bool(kwargs.get("local_files_only")))
        return real(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShardError, match=r"not in the Hugging Face cache and offline mode is on"):
        resolve_checkpoint("acme/missing", cache_dir=tmp_path / "empty")
    assert calls == [True]  # the cache was asked; the hub was not


def test_download_asks_only_for_serving_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    folder = write_random_llama(tmp_path / "downloaded", num_layers=1, vocab=64)
    asked: list[dict[str, object]] = []

    def fake(repo_id: str, **kwargs: object) -> str:
        asked.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_checkpoint("acme/tiny", offline=False) == folder
    assert [bool(a.get("local_files_only")) for a in asked] == [True, False]
    patterns = asked[1]["allow_patterns"]
    assert isinstance(patterns, list) and set(patterns) == set(CHECKPOINT_FILES)
    assert not any(p.endswith((".bin", ".pt", ".gguf", ".h5")) for p in patterns)
