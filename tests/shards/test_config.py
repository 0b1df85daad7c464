"""ModelConfig: both config layouts, the supported options, and clear refusals."""

from __future__ import annotations

from typing import Any

import pytest

from swarm.errors import ShardError
from swarm.shards import ModelConfig, RopeScaling


def _raw(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "max_position_embeddings": 1024,
    }
    raw.update(overrides)
    return raw


def test_defaults() -> None:
    cfg = ModelConfig.from_dict(_raw())
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 16 and cfg.kv_groups == 1
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert cfg.eos_token_id == () and cfg.bos_token_id is None and cfg.torch_dtype == "float32"
    assert not (cfg.attention_bias or cfg.qkv_bias or cfg.mlp_bias or cfg.tie_word_embeddings)


def test_classic_layout_llama3_rope_and_eos_list() -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = ModelConfig.from_dict(
        _raw(
            rope_theta=500000.0,
            rope_scaling=scaling,
            eos_token_id=[128001, 128009],
            torch_dtype="bfloat16",
            num_key_value_heads=2,
            head_dim=32,
        )
    )
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert cfg.eos_token_id == (128001, 128009) and cfg.torch_dtype == "bfloat16"
    assert cfg.head_dim == 32 and cfg.kv_groups == 2


def test_new_layout_and_old_type_key() -> None:
    cfg = ModelConfig.from_dict(
        _raw(rope_parameters={"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0})
    )
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == RopeScaling("linear", 2.0)
    old = ModelConfig.from_dict(_raw(rope_scaling={"type": "linear", "factor": 3.0}))
    assert old.rope_scaling == RopeScaling("linear", 3.0)
    default = ModelConfig.from_dict(_raw(rope_scaling={"rope_type": "default"}))
    assert default.rope_scaling is None


def test_qwen2_has_qkv_bias() -> None:
    cfg = ModelConfig.from_dict(
        _raw(architectures=["Qwen2ForCausalLM"], use_sliding_window=False, sliding_window=4096)
    )
    assert cfg.qkv_bias and not cfg.attention_bias


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"architectures": ["GPT2LMHeadModel"]},
            "architectures='GPT2LMHeadModel' is not supported",
        ),
        ({"architectures": None}, "architectures=None"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "rope_type='yarn' is not supported",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "missing the field 'low_freq_factor'",
        ),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 512}, "sliding_window=512"),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 64,
            },
            "sliding_window=64",
        ),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "'sliding_attention'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"hidden_size": "64"}, "hidden_size='64'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers=0"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ],
)
def test_refusals_name_field_and_value(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ShardError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_dict(_raw(**overrides))


def test_mistral_window_beyond_context_is_not_in_use() -> None:
    cfg = ModelConfig.from_dict(_raw(architectures=["MistralForCausalLM"], sliding_window=4096))
    assert cfg.architecture == "MistralForCausalLM"


def test_bad_config_file(tmp_path: Any) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"cannot read config\.json"):
        ModelConfig.from_pretrained(tmp_path)
