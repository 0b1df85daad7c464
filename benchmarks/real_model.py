"""The real model and real-size files (issues 12 item 4, 15): model-id cost, GGUF load.

    python benchmarks/real_model.py model-id [--gib 2.2] [--dir /tmp]
    python benchmarks/real_model.py load [--layers 10:20]
    python benchmarks/real_model.py chat [--turns 3]

``model-id``: writes a Llama-7B-shaped bfloat16 safetensors checkpoint of about ``--gib`` GiB
(hidden 4096, intermediate 11008, as many layers as fit) with a streaming writer, then times
``model_id`` with the file evicted from the page cache (``posix_fadvise(DONTNEED)``, this
file only) and warm, against a SHA-256 of every byte, and deletes the checkpoint.

``load``: one server's range of SmolLM2-135M-Instruct (the default model), each in a fresh
process: from the Q4_1 GGUF file as it is, and from a float32 safetensors folder converted
from it (written to a temporary folder first). Prints load seconds and peak RSS (``VmHWM``).

``chat``: SmolLM2 on an in-process 3-hop swarm (0:10 / 10:20 / 20:30, loopback, greedy): a
``Chat`` of ``--turns`` questions keeping its session, then the last turn again as one
generation over the whole rendered history on a fresh session (what a chat without a kept
session does); prints each turn's time to first token and tokens sent, and per-token
latency against the same model in one process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 4096, 11008, 32, 32, 32000


def _layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
    }


def write_big_checkpoint(folder: Path, gib: float) -> Path:
    """A bfloat16 Llama-shaped checkpoint of about ``gib`` GiB, written 64 MiB at a time."""
    per_layer = sum(int(np.prod(s)) for s in _layer_shapes(0).values()) * 2
    head = 2 * VOCAB * HIDDEN * 2 + HIDDEN * 2
    layers = max(1, round((gib * 2**30 - head) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update(_layer_shapes(i))
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    chunk = 64 * 2**20
    with (folder / "model.safetensors").open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        left = offset
        while left > 0:
            n = min(chunk, left)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return folder


def _evict(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_model_id(gib: float, root: Path) -> None:
    from swarm.shards import model_id
    from swarm.shards.checkpoint import tensor_layout
    from swarm.shards.fingerprint import SAMPLES, WINDOW

    with tempfile.TemporaryDirectory(dir=root, prefix="swarm-model-id-") as tmp:
        started = time.perf_counter()
        folder = write_big_checkpoint(Path(tmp) / "big", gib)
        file = folder / "model.safetensors"
        size = file.stat().st_size
        print(f"wrote {size / 2**30:.2f} GiB in {time.perf_counter() - started:.1f} s")
        layout = tensor_layout(folder)
        sampled = sum(min(t.nbytes, SAMPLES * WINDOW) for t in layout.values())
        print(
            f"{len(layout)} tensors, {sampled / 2**20:.1f} MiB sampled "
            f"({100 * sampled / size:.2f} % of the file)"
        )
        for label in ("cold", "warm"):
            if label == "cold":
                _evict(file)
            started = time.perf_counter()
            mid = model_id(folder)
            print(f"model_id {label}: {time.perf_counter() - started:.3f} s -> {mid}")
        _evict(file)
        started = time.perf_counter()
        digest = hashlib.sha256()
        with file.open("rb") as f:
            while block := f.read(2**24):
                digest.update(block)
        print(f"sha256 of every byte (cold): {time.perf_counter() - started:.1f} s")
    print("checkpoint deleted")


def _child_load(path: str, layers: str) -> None:
    import torch

    from swarm.shards import load_span
    from swarm.types import LayerRange

    torch.set_num_threads(1)
    started = time.perf_counter()
    span = load_span(path, LayerRange.parse(layers))
    seconds = time.perf_counter() - started
    for p in span.parameters():
        float(p.sum())  # every weight resident, as serving would have it
    peak = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024}))


def _convert_to_folder(gguf_file: Path, folder: Path) -> Path:
    """A float32 Hugging Face folder with the GGUF file's dequantized weights."""
    import torch
    from safetensors.torch import save_file

    from swarm.shards import ModelConfig, load_head, load_span
    from swarm.shards.checkpoint import checkpoint_names
    from swarm.types import LayerRange

    config = ModelConfig.from_pretrained(gguf_file)
    span = load_span(gguf_file, LayerRange(0, config.num_hidden_layers))
    head = load_head(gguf_file)
    everything = LayerRange(0, config.num_hidden_layers)
    tensors = {
        name: span.state_dict()[key].contiguous()
        for key, name in checkpoint_names(list(span.state_dict()), layers=everything).items()
    }
    heads = {k: v for k, v in head.state_dict().items() if k != "lm_head.weight"}
    tensors.update({checkpoint_names([k])[k]: v.contiguous() for k, v in heads.items()})
    folder.mkdir(parents=True)
    save_file(
        {k: v.to(torch.float32) for k, v in tensors.items()}, str(folder / "model.safetensors")
    )
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def bench_load(layers: str) -> None:
    from swarm.shards.bundled import default_model_path

    gguf_file = default_model_path()
    with tempfile.TemporaryDirectory(prefix="swarm-smollm2-") as tmp:
        folder = _convert_to_folder(gguf_file, Path(tmp) / "smollm2-f32")
        for label, path in (("GGUF Q4_1", gguf_file), ("safetensors f32", folder)):
            out = subprocess.run(
                [sys.executable, __file__, "_child", str(path), layers],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            )
            got = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"layers {layers} from {label}: {got['seconds']:.2f} s, "
                f"peak RSS {got['peak_mib']:.0f} MiB"
            )


QUESTIONS = (
    "What is the capital of France?",
    "And what is it famous for?",
    "Name one museum there.",
    "How old is it?",
)


async def _chat_run(turns: int) -> None:
    import statistics

    from swarm.lab.reference import LocalModel
    from swarm.shards.bundled import default_model_path
    from swarm.types import LayerRange

    path = default_model_path()
    ranges = [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)]
    with tempfile.TemporaryDirectory(prefix="swarm-chat-bench-") as tmp_name:
        ids, per_token = await _chat_turns(path, ranges, Path(tmp_name), turns)
    one = LocalModel(path).generate(ids, 32).timings
    print(
        f"per token after the first: swarm 3 hops {statistics.median(per_token) * 1e3:.1f} ms, "
        f"one process {statistics.median(one[1:]) * 1e3:.1f} ms"
    )


async def _chat_turns(
    path: Path, ranges: list[Any], tmp: Path, turns: int
) -> tuple[list[int], list[float]]:
    """The chat's turns (printing each), then the last one re-prefilled; returns the ids of
    the history before the last answer and the chat's per-token seconds."""
    from swarm.client.chat import Chat
    from swarm.client.config import ClientConfig, RecordsConfig
    from swarm.client.generation import Token
    from swarm.client.model import AsyncRemoteModel
    from swarm.shards import load_chat_template
    from swarm.testing.swarm import open_local_swarm

    async with open_local_swarm(path, ranges) as local:
        config = ClientConfig(
            initial_peers=(local.dht_address,),
            records=RecordsConfig(
                reputation_path=str(tmp / "reputation.json"), evidence_dir=str(tmp / "evidence")
            ),
        )
        async with AsyncRemoteModel.open(path, config) as model:
            per_token: list[float] = []
            async with Chat.open(model, max_length=2048) as chat:
                for i, question in enumerate(QUESTIONS[:turns]):
                    seconds = [
                        t.seconds async for t in chat.send(question, 48) if isinstance(t, Token)
                    ]
                    per_token += seconds[1:]
                    turn = chat.statistics().turns[-1]
                    sent, made = len(turn.sent), len(turn.answer)
                    print(
                        f"turn {i + 1} (kept session): TTFT {seconds[0] * 1e3:.0f} ms, "
                        f"{sent} tokens sent, {made} generated"
                    )
                messages = chat.messages[:-1]
            template = load_chat_template(path)
            assert template is not None and model.tokenizer is not None
            history = template.render(messages)
            ids = model.tokenizer.encode(history, add_special_tokens=False).ids
            result = await model.generate_detailed(ids, 48)
            print(
                f"turn {turns} re-prefilled on a fresh session: TTFT {result.ttft * 1e3:.0f} "
                f"ms, {len(ids)} tokens sent"
            )
    return list(ids), per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    mid = sub.add_parser("model-id")
    mid.add_argument("--gib", type=float, default=2.2)
    mid.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    load = sub.add_parser("load")
    load.add_argument("--layers", default="10:20")
    chat = sub.add_parser("chat")
    chat.add_argument("--turns", type=int, default=3)
    child = sub.add_parser("_child")
    child.add_argument("path")
    child.add_argument("layers")
    args = parser.parse_args()
    if args.part == "model-id":
        bench_model_id(args.gib, args.dir)
    elif args.part == "load":
        bench_load(args.layers)
    elif args.part == "chat":
        import torch
        import trio

        torch.set_num_threads(1)
        trio.run(_chat_run, args.turns)
    else:
        _child_load(args.path, args.layers)


if __name__ == "__main__":
    main()
