"""The default model in one process: our int4 path against llama.cpp on the same GGUF file,
one thread each (issue 24), and where our time per token goes.

    pip install llama-cpp-python     # builds llama.cpp from source (minutes); not a dependency
    python benchmarks/vs_llama_cpp.py [--tokens 32] [--rounds 3] [--llama-python PATH]

Both decode the same greedy chat answer: the same prompt token ids (our chat template,
rendered once), the same file (SmolLM2-135M-Instruct, Q4_1 layers, Q8_0 embeddings),
``--tokens`` new tokens, one thread. Per token = median over decode steps after the first,
in wall time and in the decoding thread's CPU time (on a shared machine the CPU time moves
less with the other processes).
With ``--llama-python`` llama.cpp runs in that interpreter (one where llama-cpp-python is
installed, e.g. a venv of its own: `benchmarks/llama_cpp_decode.py`), else in this process.

Ours runs the whole model as one span (`load_span(quant=None)`: the file's Q4_1 kept int4),
once with the float32 head, once with the float32 head's greedy screen (the client's and
`swarm.lab.reference.LocalModel`'s default: the float head's tokens, `swarm.shards.screen`)
and once with the head kept in int8 (``head_quant="int8"``), alternating with llama.cpp in
every round. The breakdown (float head) times, per token: the 30 layers and the head (final norm
and the 49,152 x 576 lm_head) in wall time, and in CPU time inside the decoding loop what the
int4 matmuls, attention and the RMS norms cost (each replaced by a stub in turn: see
`_in_loop_costs`); the rest is the head and everything else a layer does in Python and small
ops (casts, RoPE, the cache, views).
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

from swarm.shards import (
    Head,
    KVCache,
    Quantization,
    load_chat_template,
    load_head,
    load_span,
    load_tokenizer,
)
from swarm.shards.blocks import RMSNorm
from swarm.shards.bundled import default_model_path
from swarm.shards.quant import Int4Linear
from swarm.shards.span import Span
from swarm.types import LayerRange

sys.path.insert(0, str(Path(__file__).parent))
from llama_cpp_decode import decode as llama_cpp_in_process

QUESTION = "Explain in two sentences why the sky is blue."


def ours(
    span: Span, head: Head, prompt: list[int], tokens: int
) -> tuple[list[int], list[float], list[float], dict[str, float]]:
    """Our greedy tokens, each step's wall and CPU seconds (this thread's, less moved by
    other processes on a shared machine), and the median wall seconds of the layers and of
    the head per decode step."""
    cache = KVCache.allocate(span.config, span.layers, 1, len(prompt) + tokens + 1)
    ids, timings, cpu = torch.tensor([prompt]), [], []
    out: list[int] = []
    layer_times, head_times = [], []
    position = 0
    with torch.inference_mode():
        for _ in range(tokens):
            began, cpu_began = time.perf_counter(), time.thread_time()
            n = ids.shape[1]
            positions = torch.arange(position, position + n)[None]
            hidden = span(head.embed(ids), positions, cache)
            mid = time.perf_counter()
            token = int(head.greedy_logits(hidden[:, -1:])[0, -1].argmax())
            end = time.perf_counter()
            timings.append(end - began)
            cpu.append(time.thread_time() - cpu_began)
            layer_times.append(mid - began)
            head_times.append(end - mid)
            out.append(token)
            position += n
            ids = torch.tensor([[token]])
        parts = {
            "layers": statistics.median(layer_times[1:]),
            "head": statistics.median(head_times[1:]),
        }
    return out, timings, cpu, parts


def _in_loop_costs(
    span: Span, head: Head, prompt: list[int], tokens: int, rounds: int
) -> dict[str, float]:
    """CPU seconds per decode step that the int4 matmuls, attention (SDPA) and the RMS norms
    take inside the loop (cold caches, as decoding runs them): each replaced in turn by a
    stub that returns a tensor of the right shape (the tokens then differ: the step's work
    does not), alternated with the real step; a part's cost is the difference of medians."""
    zeros: dict[tuple[int, ...], torch.Tensor] = {}

    def no_matmul(self: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], self.out_features)
        return zeros.setdefault(shape, torch.zeros(shape, dtype=x.dtype))

    def no_attention(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.zeros_like(q)

    def no_norm(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return x

    stubs: list[tuple[str, object, str, object]] = [
        ("int4 matmuls", Int4Linear, "matmul", no_matmul),
        ("attention", torch.nn.functional, "scaled_dot_product_attention", no_attention),
        ("RMS norms", RMSNorm, "forward", no_norm),
    ]
    cpu: dict[str, list[float]] = {name: [] for name in ["step", *(s[0] for s in stubs)]}
    for _ in range(rounds):
        cpu["step"].append(statistics.median(ours(span, head, prompt, tokens)[2][1:]))
        for name, owner, attribute, stub in stubs:
            real = getattr(owner, attribute)
            setattr(owner, attribute, stub)
            try:
                cpu[name].append(statistics.median(ours(span, head, prompt, tokens)[2][1:]))
            finally:
                setattr(owner, attribute, real)
    step = statistics.median(cpu["step"])
    costs = {"step": step}
    costs.update({name: step - statistics.median(cpu[name]) for name, *_ in stubs})
    return costs


def _head_error(
    span: Span, float_head: Head, int8_head: Head, prompt: list[int], tokens: int
) -> str:
    """The int8 head against the float head along the float head's greedy answer: the
    largest logit difference, the first step whose greedy token differs, and the smallest
    gap between the float head's two best tokens (a difference larger than that gap can
    flip a greedy choice)."""
    cache = KVCache.allocate(span.config, span.layers, 1, len(prompt) + tokens + 1)
    ids, position = torch.tensor([prompt]), 0
    diffs, gaps, first = [], [], None
    with torch.inference_mode():
        for step in range(tokens):
            n = ids.shape[1]
            hidden = span(float_head.embed(ids), torch.arange(position, position + n)[None], cache)
            exact = float_head.logits(hidden[:, -1:])[0, -1]  # (vocab,)
            approx = int8_head.logits(hidden[:, -1:])[0, -1]
            diffs.append(float((approx - exact).abs().max()))
            top = exact.topk(2).values
            gaps.append(float(top[0] - top[1]))
            token = int(exact.argmax())
            if first is None and int(approx.argmax()) != token:
                first = step
            position += n
            ids = torch.tensor([[token]])
    return (f"int8 head against float32 head over {tokens} greedy steps: logits differ by "
            f"{statistics.median(diffs):.3f} (median of the steps' largest) up to "
            f"{max(diffs):.3f}; the float head's top-2 gap is as small as {min(gaps):.3f}; "
            f"first step whose greedy token differs: {first}")  # fmt: skip


def llama_cpp(
    path: str, prompt: list[int], tokens: int, python: str | None
) -> tuple[list[int], list[float], list[float]]:
    """llama.cpp's greedy tokens and per-step wall and CPU seconds: in this process, or with
    ``python`` in that interpreter (`benchmarks/llama_cpp_decode.py`)."""
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
    ids, cpu = [int(i) for i in result["ids"]], [float(t) for t in result["cpu"]]
    return ids, [float(t) for t in result["timings"]], cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--llama-python", help="an interpreter with llama-cpp-python (default: this one)"
    )
    parser.add_argument(
        "--head-check-tokens", type=int, default=64, help="greedy steps of the head check"
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
    heads = {
        "float32": load_head(path),
        "float32 screened": load_head(path, screen=True),
        "int8": load_head(path, quant=Quantization.INT8),
    }
    span = load_span(path, LayerRange(0, heads["float32"].config.num_hidden_layers), quant=None)
    mine: dict[str, list[float]] = {name: [] for name in heads}
    mine_cpu: dict[str, list[float]] = {name: [] for name in heads}
    head_ms: dict[str, list[float]] = {name: [] for name in heads}
    ids_ours: dict[str, list[int]] = {}
    theirs, theirs_cpu, parts_all = [], [], []
    for _ in range(args.rounds):
        for name, head in heads.items():
            ids_ours[name], t_ours, c_ours, parts = ours(span, head, prompt, args.tokens)
            mine[name].append(statistics.median(t_ours[1:]))
            mine_cpu[name].append(statistics.median(c_ours[1:]))
            head_ms[name].append(parts["head"] * 1e3)
            if name == "float32":
                parts_all.append(parts)
        ids_theirs, t_theirs, c_theirs = llama_cpp(path, prompt, args.tokens, args.llama_python)
        theirs.append(statistics.median(t_theirs[1:]))
        theirs_cpu.append(statistics.median(c_theirs[1:]))
    b, b_cpu = statistics.median(theirs), statistics.median(theirs_cpu)
    print(f"llama.cpp: {b * 1e3:.1f} ms/token (CPU time {b_cpu * 1e3:.1f} ms)")
    for name in heads:
        a, a_cpu = statistics.median(mine[name]), statistics.median(mine_cpu[name])
        same = sum(x == y for x, y in zip(ids_ours[name], ids_theirs, strict=True))
        first = _first_difference(ids_ours[name], ids_theirs)
        h = statistics.median(head_ms[name])
        print(f"ours (int4 layers, {name} head): {a * 1e3:.1f} ms/token (head {h:.1f} ms; "
              f"CPU time {a_cpu * 1e3:.1f} ms); ratio {a / b:.2f}x (CPU time "
              f"{a_cpu / b_cpu:.2f}x); "
              f"greedy tokens equal to llama.cpp's at {same} of {args.tokens} positions "
              f"(first difference at {first})")  # fmt: skip
    same = ids_ours["float32 screened"] == ids_ours["float32"]
    print(f"screened head's tokens equal the float32 head's: {same}")
    print(_head_error(span, heads["float32"], heads["int8"], prompt, args.head_check_tokens))
    names = list(parts_all[0])
    medians = {n: statistics.median(p[n] for p in parts_all) for n in names}
    print("ours per token (float32 head, wall): "
          + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in medians.items()))  # fmt: skip
    costs = _in_loop_costs(span, heads["float32"], prompt, args.tokens, args.rounds)
    rest = costs["step"] - sum(v for n, v in costs.items() if n != "step")
    print("ours per token (float32 head, CPU time, in the loop): "
          + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in costs.items())
          + f"; the rest (head, casts, RoPE, cache, views) {rest * 1e3:.1f} ms")  # fmt: skip


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


if __name__ == "__main__":
    main()
