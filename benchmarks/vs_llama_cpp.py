"""The default model in one process: our int4 path against llama.cpp on the same GGUF file,
one thread each (issue 24), and where our time per token goes.

    pip install llama-cpp-python     # builds llama.cpp from source (minutes); not a dependency
    python benchmarks/vs_llama_cpp.py [--tokens 32] [--rounds 3] [--llama-python PATH]

Both decode the same greedy chat answer: the same prompt token ids (our chat template,
rendered once), the same file (SmolLM2-135M-Instruct, Q4_1 layers, Q8_0 embeddings),
``--tokens`` new tokens, one thread. Per token = median over decode steps after the first.
With ``--llama-python`` llama.cpp runs in that interpreter (one where llama-cpp-python is
installed, e.g. a venv of its own: `benchmarks/llama_cpp_decode.py`), else in this process.

Ours runs the whole model as one span (`load_span(quant=None)`: the file's Q4_1 kept int4),
once with the client's float32 head (as `swarm.lab.reference.LocalModel` does by default) and
once with the head kept in int8 (``head_quant="int8"``), alternating with llama.cpp in every
round. The breakdown (float head) times, per token: the 30 layers, the head (final norm and
the 49,152 x 576 lm_head), and within the layers the quantized matmuls alone (each layer's
kernels called on their own with one row) and attention alone (SDPA over the same cache
length); the rest of the layers' time is everything else a layer does in Python and small ops
(norms, RoPE, casts, the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swarm.shards import (
    Head,
    KVCache,
    Quantization,
    load_chat_template,
    load_head,
    load_span,
    load_tokenizer,
)
from swarm.shards.bundled import default_model_path
from swarm.shards.quant import QuantLinear
from swarm.shards.span import Span
from swarm.types import LayerRange

sys.path.insert(0, str(Path(__file__).parent))
from llama_cpp_decode import decode as llama_cpp_in_process

QUESTION = "Explain in two sentences why the sky is blue."


def ours(
    span: Span, head: Head, prompt: list[int], tokens: int
) -> tuple[list[int], list[float], dict[str, float]]:
    cache = KVCache.allocate(span.config, span.layers, 1, len(prompt) + tokens + 1)
    ids, timings = torch.tensor([prompt]), []
    out: list[int] = []
    layer_times, head_times = [], []
    position = 0
    with torch.inference_mode():
        for _ in range(tokens):
            began = time.perf_counter()
            n = ids.shape[1]
            positions = torch.arange(position, position + n)[None]
            hidden = span(head.embed(ids), positions, cache)
            mid = time.perf_counter()
            token = int(head.logits(hidden[:, -1:])[0, -1].argmax())
            end = time.perf_counter()
            timings.append(end - began)
            layer_times.append(mid - began)
            head_times.append(end - mid)
            out.append(token)
            position += n
            ids = torch.tensor([[token]])
        parts = {
            "layers": statistics.median(layer_times[1:]),
            "head": statistics.median(head_times[1:]),
        }
    return out, timings, parts


def _kernels_and_attention(span: Span, length: int) -> dict[str, float]:
    """Seconds per token of the layers' quantized matmuls alone (one row) and attention alone
    (one query against ``length`` keys), each called as the decode step calls it."""
    linears = [m for m in span.modules() if isinstance(m, QuantLinear)]
    config = span.config
    inputs = {m.in_features: torch.randn(1, m.in_features).to(torch.bfloat16) for m in linears}
    q = torch.randn(1, config.num_attention_heads, 1, config.head_dim)
    k = torch.randn(1, config.num_key_value_heads, length, config.head_dim)
    gqa = config.num_key_value_heads != config.num_attention_heads
    layers = config.num_hidden_layers

    def kernels() -> None:
        for m in linears:
            m.matmul(inputs[m.in_features])

    def attention() -> None:
        for _ in range(layers):
            F.scaled_dot_product_attention(q, k, k, enable_gqa=gqa)

    return {"int4 matmuls": _median_seconds(kernels), "attention": _median_seconds(attention)}


def _median_seconds(fn: object, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def llama_cpp(
    path: str, prompt: list[int], tokens: int, python: str | None
) -> tuple[list[int], list[float]]:
    """llama.cpp's greedy tokens and per-step seconds: in this process, or with ``python``
    in that interpreter (`benchmarks/llama_cpp_decode.py`)."""
    if python is None:
        return llama_cpp_in_process(path, prompt, tokens)
    script = Path(__file__).with_name("llama_cpp_decode.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [python, str(script), path, str(tokens)],
        input=json.dumps(prompt),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env=env,
    )
    result = json.loads(done.stdout)
    return [int(i) for i in result["ids"]], [float(t) for t in result["timings"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--llama-python", help="an interpreter with llama-cpp-python (default: this one)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = str(default_model_path())
    template = load_chat_template(path)
    tokenizer = load_tokenizer(path)
    assert template is not None and tokenizer is not None
    text = template.render([{"role": "user", "content": QUESTION}])
    prompt = list(tokenizer.encode(text, add_special_tokens=False).ids)
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF, 1 thread, prompt {len(prompt)} tokens, "
          f"{args.tokens} new, {args.rounds} rounds (median per token after the 1st)")  # fmt: skip
    heads = {"float32": load_head(path), "int8": load_head(path, quant=Quantization.INT8)}
    span = load_span(path, LayerRange(0, heads["float32"].config.num_hidden_layers), quant=None)
    mine: dict[str, list[float]] = {name: [] for name in heads}
    head_ms: dict[str, list[float]] = {name: [] for name in heads}
    ids_ours: dict[str, list[int]] = {}
    theirs, parts_all = [], []
    for _ in range(args.rounds):
        for name, head in heads.items():
            ids_ours[name], t_ours, parts = ours(span, head, prompt, args.tokens)
            mine[name].append(statistics.median(t_ours[1:]))
            head_ms[name].append(parts["head"] * 1e3)
            if name == "float32":
                parts_all.append(parts)
        ids_theirs, t_theirs = llama_cpp(path, prompt, args.tokens, args.llama_python)
        theirs.append(statistics.median(t_theirs[1:]))
    b = statistics.median(theirs)
    print(f"llama.cpp: {b * 1e3:.1f} ms/token")
    for name in heads:
        a = statistics.median(mine[name])
        same = sum(x == y for x, y in zip(ids_ours[name], ids_theirs, strict=True))
        first = _first_difference(ids_ours[name], ids_theirs)
        h = statistics.median(head_ms[name])
        print(f"ours (int4 layers, {name} head): {a * 1e3:.1f} ms/token (head {h:.1f} ms); "
              f"ratio {a / b:.2f}x; "
              f"greedy tokens equal to llama.cpp's at {same} of {args.tokens} positions "
              f"(first difference at {first})")  # fmt: skip
    first = _first_difference(ids_ours["float32"], ids_ours["int8"])
    print(f"int8 head against float32 head: first different greedy token at {first}")
    names = list(parts_all[0])
    medians = {n: statistics.median(p[n] for p in parts_all) for n in names}
    medians.update(_kernels_and_attention(span, len(prompt) + args.tokens))
    other = medians["layers"] - medians["int4 matmuls"] - medians["attention"]
    print("ours per token (float32 head): "
          + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in medians.items())
          + f"; the layers' other ops and Python {other * 1e3:.1f} ms")  # fmt: skip


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


if __name__ == "__main__":
    main()
