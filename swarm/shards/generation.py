"""`GenerationDefaults`: the sampling a checkpoint asks for, from ``generation_config.json``.

A model's authors put the sampling it works best with in ``generation_config.json``
(``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``max_new_tokens``).
:meth:`GenerationDefaults.resolve` applies them the way ``transformers.generate`` does, with
what the user gave on the command line taking precedence: without ``do_sample`` the model
decodes greedily; with it, ``temperature`` 1.0, ``top_k`` 50 and ``top_p`` 1.0 stand for what
the file leaves out. A GGUF file has no generation config: its end-of-turn ids come from the
tokenizer metadata (:class:`~swarm.shards.config.ModelConfig.eos_token_id`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm.errors import ShardError
from swarm.shards.gguf_header import is_gguf

__all__ = ["GenerationDefaults", "Sampling"]

# transformers.GenerationConfig's own defaults, used when sampling is on and a field is absent
_HF_TEMPERATURE, _HF_TOP_K, _HF_TOP_P = 1.0, 50, 1.0


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings: temperature 0 is greedy; top_k 0 and top_p 1.0 cut nothing."""

    temperature: float
    top_k: int
    top_p: float


@dataclass(frozen=True)
class GenerationDefaults:
    """What ``generation_config.json`` says (None where it says nothing)."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: tuple[int, ...] = ()
    max_new_tokens: int | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GenerationDefaults:
        """The folder's ``generation_config.json``; empty defaults when there is none (or for
        a GGUF file).

        Raises:
            ShardError: the file exists but is not a JSON object with sensible values.
        """
        file = Path(path) / "generation_config.json"
        if is_gguf(path) or not file.is_file():
            return cls()
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"cannot read {file}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ShardError(f"{file}: not a JSON object")
        return cls.from_dict(raw, str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "generation_config") -> GenerationDefaults:
        """Build from a parsed ``generation_config.json``.

        Raises `ShardError` naming a bad field."""
        eos = raw.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        try:
            return cls(
                do_sample=None if raw.get("do_sample") is None else bool(raw["do_sample"]),
                temperature=_optional(raw, "temperature", float),
                top_k=_optional(raw, "top_k", int),
                top_p=_optional(raw, "top_p", float),
                eos_token_id=tuple(int(i) for i in eos_ids),
                max_new_tokens=_optional(raw, "max_new_tokens", int),
            )
        except (TypeError, ValueError) as exc:
            raise ShardError(f"{where}: {exc}") from exc

    def resolve(
        self,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> Sampling:
        """The sampling to use: each given option wins over the file; the file over the
        greedy/transformers defaults described in the module docstring."""
        sampling = bool(self.do_sample)
        if temperature is None:
            temperature = _or(self.temperature, _HF_TEMPERATURE) if sampling else 0.0
        if top_k is None:
            top_k = (_HF_TOP_K if self.top_k is None else self.top_k) if sampling else 0
        if top_p is None:
            top_p = _or(self.top_p, _HF_TOP_P) if sampling else 1.0
        return Sampling(float(temperature), int(top_k), float(top_p))


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _optional(raw: dict[str, Any], name: str, kind: type[int] | type[float]) -> Any:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}={value!r} is not a number")
    if value < 0:
        raise ValueError(f"{name}={value!r} is negative")
    return kind(value)
