"""``--dtype auto``: what a server runs a checkpoint in, by device and CPU features."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from swarm.server import capacity, device
from swarm.server.device import resolve_dtype
from swarm.shards import ModelConfig
from swarm.testing.checkpoints import write_random_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    path = write_random_llama(tmp_path_factory.mktemp("dtype") / "m", num_layers=1, vocab=64)
    return ModelConfig.from_pretrained(path)


def _flags(tmp_path: Path, flags: str) -> str:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    return str(cpuinfo)


def test_cpu_bfloat16_instructions_are_read_from_cpuinfo(tmp_path: Path) -> None:
    detect = capacity.cpu_has_native_bfloat16.__wrapped__
    assert detect(_flags(tmp_path, "avx512f avx512_bf16 avx512_vnni"))
    assert detect(_flags(tmp_path, "amx_tile amx_bf16"))
    assert not detect(_flags(tmp_path, "avx2 avx512f avx512bw"))
    assert not detect(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("stored", "native", "want"),
    [
        ("bfloat16", True, torch.bfloat16),
        ("bfloat16", False, torch.float32),  # emulated bfloat16 is slower than float32
        ("float16", True, torch.float32),
        ("float32", True, torch.float32),
    ],
)
def test_auto_on_the_cpu(
    config: ModelConfig,
    monkeypatch: pytest.MonkeyPatch,
    stored: str,
    native: bool,
    want: torch.dtype,
) -> None:
    monkeypatch.setattr(device, "cpu_has_native_bfloat16", lambda: native)
    assert resolve_dtype("auto", replace(config, torch_dtype=stored), CPU) == want


def test_an_explicit_dtype_is_kept(config: ModelConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cpu_has_native_bfloat16", lambda: True)
    assert resolve_dtype("float32", replace(config, torch_dtype="bfloat16"), CPU) == torch.float32
    assert resolve_dtype("bfloat16", config, CPU) == torch.bfloat16
