"""llama.cpp's greedy decode of given prompt ids, one thread: the half of
`benchmarks/vs_llama_cpp.py` that needs only ``llama_cpp`` (no torch, no swarm), so that it
can run under another interpreter, one where llama-cpp-python is installed:

    python benchmarks/llama_cpp_decode.py MODEL.gguf TOKENS < prompt.json > result.json

reads the prompt ids (a JSON list) on stdin and writes ``{"ids": [...], "timings": [...],
"cpu": [...]}`` (the new token ids, the wall seconds each decode step took, and the CPU
seconds of this thread, where llama.cpp computes with one thread).
"""

from __future__ import annotations

import json
import sys
import time


def decode(path: str, prompt: list[int], tokens: int) -> tuple[list[int], list[float], list[float]]:
    """Greedy-decode ``tokens`` new ids after ``prompt`` with llama.cpp (one thread); return
    them and each step's wall and CPU seconds (the first includes the prompt's
    evaluation)."""
    from llama_cpp import Llama  # type: ignore[import-not-found]

    llm = Llama(model_path=path, n_threads=1, n_threads_batch=1, n_ctx=1024, verbose=False)
    llm.reset()
    out, timings, cpu = [], [], []
    began, cpu_began = time.perf_counter(), time.thread_time()
    llm.eval(prompt)
    for _ in range(tokens):
        token = int(llm.sample(temp=0.0))
        out.append(token)
        llm.eval([token])
        end, cpu_end = time.perf_counter(), time.thread_time()
        timings.append(end - began)
        cpu.append(cpu_end - cpu_began)
        began, cpu_began = end, cpu_end
    return out, timings, cpu


def main() -> None:
    path, tokens = sys.argv[1], int(sys.argv[2])
    ids, timings, cpu = decode(path, json.load(sys.stdin), tokens)
    json.dump({"ids": ids, "timings": timings, "cpu": cpu}, sys.stdout)


if __name__ == "__main__":
    main()
