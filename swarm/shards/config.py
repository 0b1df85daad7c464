"""`ModelConfig`: the parts of a Hugging Face ``config.json`` our blocks need, checked.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` with
grouped-query attention, an explicit ``head_dim``, RoPE (``default``, ``linear`` and
``llama3`` scaling), RMSNorm, SwiGLU, tied or untied embeddings, and the bias variants
(Llama's ``attention_bias``/``mlp_bias``, Qwen2's always-on q/k/v bias).

Both config layouts are read: the classic one (``rope_theta`` + ``rope_scaling``) and the one
``transformers`` 5 writes (``rope_parameters`` holding ``rope_theta`` and ``rope_type``).
A GGUF file's ``llama.*`` metadata is translated into the same fields by
:mod:`swarm.shards.gguf` (and its Llama 3.1 ``rope_freqs`` checked here); a folder's
``generation_config.json`` adds end-of-turn ids (:mod:`swarm.shards.generation`).
Anything we cannot compute exactly is refused with a :class:`~swarm.errors.ShardError` that
names the field and its value, rather than silently computing something else.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm.errors import ShardError
from swarm.shards.generation import GenerationDefaults
from swarm.shards.gguf import gguf_config_fields, gguf_rope_factors
from swarm.shards.gguf_header import is_gguf

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "RopeScaling"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``rope_type`` is ``"linear"``, ``"llama3"`` or ``"factors"``.

    ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings`` are
    used by ``llama3`` only (0 otherwise). ``"factors"`` divides each inverse frequency by
    its own entry of ``frequency_factors`` (``head_dim // 2`` of them): the form GGUF files
    store Llama 3.1 scaling in (the ``rope_freqs.weight`` tensor); ``factor`` is 1 there.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    original_max_position_embeddings: int = 0
    frequency_factors: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """A checked model configuration (see the module docstring for what is supported).

    ``eos_token_id`` is normalized to a tuple (configs may hold one id or a list).
    ``torch_dtype`` is the checkpoint's stored dtype name, e.g. ``"bfloat16"``.
    q/k/v projections carry a bias when ``attention_bias or qkv_bias``; the output projection
    when ``attention_bias``; the MLP projections when ``mlp_bias``.
    """

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool
    qkv_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    torch_dtype: str

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``<path>/config.json``, or the metadata of ``path`` when it is a GGUF file
        (see :func:`swarm.shards.gguf.gguf_config_fields`). The end-of-sequence ids of a folder's
        ``generation_config.json`` (Llama 3 Instruct ends a turn with ``<|eot_id|>``, which
        only that file names) are added to ``eos_token_id``, as ``transformers`` stops on them.

        Raises:
            ShardError: the file is missing or not JSON, or the config is unsupported.
        """
        if is_gguf(path):
            return _from_gguf(path)
        file = Path(path) / "config.json"
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            ggufs = sorted(Path(path).glob("*.gguf")) if Path(path).is_dir() else []
            hint = f"; to serve a GGUF file, give its path ({ggufs[0]})" if ggufs else ""
            raise ShardError(f"{file}: no config.json in the model folder{hint}") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"{file}: cannot read config.json: {exc}") from exc
        if not isinstance(raw, dict):
            raise ShardError(f"{file}: config.json is not a JSON object")
        config = cls.from_dict(raw)
        extra = GenerationDefaults.from_pretrained(path).eos_token_id
        eos = tuple(dict.fromkeys((*config.eos_token_id, *extra)))
        return (
            dataclasses.replace(config, eos_token_id=eos) if eos != config.eos_token_id else config
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Build from a parsed ``config.json``.

        Raises:
            ShardError: naming the field and value that is missing or unsupported.
        """
        architecture = _architecture(raw)
        _check_unsupported(raw, architecture)
        hidden = _int(raw, "hidden_size")
        heads = _int(raw, "num_attention_heads")
        kv_heads = _int(raw, "num_key_value_heads", default=heads)
        if heads % kv_heads != 0:
            raise ShardError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        head_dim = raw.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = _rope(raw)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=architecture,
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size"),
            num_hidden_layers=_int(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=_positive(int(head_dim), "head_dim"),
            vocab_size=_int(raw, "vocab_size"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            max_position_embeddings=_int(raw, "max_position_embeddings", default=2048),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=tuple(int(i) for i in eos_ids),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        )

    @property
    def kv_groups(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads


def _architecture(raw: Mapping[str, Any]) -> str:
    archs = raw.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise ShardError(f"architectures={archs!r}: expected exactly one architecture")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ShardError(
            f"architectures={arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return str(arch)


def _check_unsupported(raw: Mapping[str, Any], architecture: str) -> None:
    """Refuse the options our blocks do not compute."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ShardError(f"hidden_act={act!r} is not supported (only 'silu')")
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
        bad = next(t for t in layer_types if t != "full_attention")
        raise ShardError(f"layer_types contains {bad!r}: only full attention is supported")
    window = raw.get("sliding_window")
    in_use = window is not None and (
        architecture == "MistralForCausalLM" or bool(raw.get("use_sliding_window", False))
    )
    max_pos = raw.get("max_position_embeddings", 2048)
    if in_use and isinstance(window, int) and window < max_pos:
        raise ShardError(
            f"sliding_window={window} (< max_position_embeddings={max_pos}): "
            "sliding-window attention is not supported"
        )


def _from_gguf(path: str | Path) -> ModelConfig:
    """The config of a GGUF file: its metadata's fields, with Llama 3.1 RoPE scaling stored
    as the ``rope_freqs.weight`` tensor becoming a ``"factors"`` :class:`RopeScaling`."""
    config = ModelConfig.from_dict(gguf_config_fields(path))
    factors = gguf_rope_factors(path)
    if factors is None:
        return config
    if config.rope_scaling is not None:
        raise ShardError(
            f"{Path(path).name}: rope_freqs.weight together with llama.rope.scaling.type "
            f"{config.rope_scaling.rope_type!r} is not supported"
        )
    if len(factors) != config.head_dim // 2 or not all(f > 0 for f in factors):
        raise ShardError(
            f"{Path(path).name}: rope_freqs.weight has {len(factors)} entries (expected "
            f"head_dim/2 = {config.head_dim // 2} positive factors)"
        )
    scaling = RopeScaling("factors", 1.0, frequency_factors=factors)
    return dataclasses.replace(config, rope_scaling=scaling)


def _rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Return ``(rope_theta, scaling)`` from either config layout."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise ShardError(f"rope_parameters={params!r}: expected a JSON object")
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ShardError(f"rope_type={rope_type!r} is not supported (supported: {_ROPE_TYPES})")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ShardError(f"partial_rotary_factor={partial!r} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None
    try:
        factor = float(params["factor"])
        if rope_type == "linear":
            return theta, RopeScaling("linear", factor)
        return theta, RopeScaling(
            "llama3",
            factor,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise ShardError(
            f"rope scaling {rope_type!r} is missing the field {exc.args[0]!r}"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise ShardError(f"rope scaling {rope_type!r} has a bad value: {params!r}") from exc


def _int(raw: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = raw.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShardError(f"{name}={value!r}: expected a positive integer")
    return _positive(value, name)


def _positive(value: int, name: str) -> int:
    if value <= 0:
        raise ShardError(f"{name}={value!r}: expected a positive integer")
    return value
