"""Where a quantized KV cache costs prefill time: one image's positions (random embeddings) prefilled into a fresh
context with K and V in f16 or q8_0/q4_0, flash attention on in all (llama.cpp keeps a quantized V only with it),
interleaved round by round. K alone quantized isolates the cost of reading a quantized V.

    python experiments/kv_prefill_paths.py DECODER.gguf [--positions 600] [--rounds 3] [--threads 2]

Prints the median seconds per path and its ratio to f16/f16 (a script, not a test; run it on a quiet machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_edge.runtime.executor import Executor  # noqa: E402
from llava_edge.runtime.llama_construct import construct_llama  # noqa: E402
from llava_edge.runtime.llama_probe import extra_bufts_verdict  # noqa: E402
from llava_edge.runtime.tokenizer import Tokenizer  # noqa: E402

PATHS = {"f16/f16": ("F16", "F16"), "q8_0/f16": ("Q8_0", "F16"), "q8_0/q8_0": ("Q8_0", "Q8_0"),
         "q4_0/q4_0": ("Q4_0", "Q4_0")}


def prefill_seconds(gguf: Path, k: str, v: str, positions: int, threads: int, extra_bufts: bool) -> float:
    llm = construct_llama(gguf, extra_bufts, 4096, 512, threads, getattr(llama_cpp, f"GGML_TYPE_{k}"),
                          type_v=getattr(llama_cpp, f"GGML_TYPE_{v}"), flash_attn=True)
    tok = Tokenizer(llm)
    ex = Executor(llm, 512, tok.n_embd, tok.n_vocab)
    embeds = np.random.default_rng(0).standard_normal((positions, tok.n_embd)).astype(np.float32) * 0.02
    try:
        t0 = time.perf_counter()
        for start in range(0, positions, 512):
            chunk = embeds[start:start + 512]
            ex.decode_embeddings(0, start, chunk, start + len(chunk) == positions)
        return time.perf_counter() - t0
    finally:
        ex.close()
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--positions", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    extra = extra_bufts_verdict().extra_bufts
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    names = list(PATHS)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(prefill_seconds(a.gguf, *PATHS[name], a.positions, a.threads, extra))
            print(f"round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    base = statistics.median(times["f16/f16"])
    print(f"\n{a.positions} positions prefilled, flash attention on, {a.threads} threads, {a.rounds} rounds")
    print("| K/V | prefill (median s) | vs f16/f16 |\n|---|---:|---:|")
    for name, v in times.items():
        print(f"| {name} | {statistics.median(v):.2f} | {statistics.median(v) / base:.3f}x |")


if __name__ == "__main__":
    main()
