"""How long llguidance takes per token to mask LLaMA's 32k vocabulary (Vicuna's), for a key-heavy schema and a
free string field, as the engine calls it (runtime/constraint.py): compute the allowed row, accept the token.

    python experiments/mask_time.py VOCAB.gguf    # e.g. llama.cpp's models/ggml-vocab-llama-spm.gguf

The tokens are drawn at random among the allowed ones (a model's choice does not change the mask's cost much);
prints the median and p90 microseconds per token of mask + accept, and of the forced-token lookup.
"""

from __future__ import annotations

import statistics
import sys
import time

import llama_cpp
import numpy as np

from llava_edge.bench.structured_case import KEY_HEAVY, ONE_STRING
from llava_edge.runtime.constraint import FormatCompiler
from llava_edge.runtime.tokenizer import Tokenizer


def measure(compiler: FormatCompiler, schema, runs: int = 20) -> dict:
    rng = np.random.default_rng(0)
    mask_us, forced_us, n_tokens = [], [], 0
    for _ in range(runs):
        c = compiler.open(schema)
        while not c.finished and n_tokens < 10_000:
            t0 = time.perf_counter()
            allowed = np.flatnonzero(c.allowed())
            if len(allowed) == 0 or (len(allowed) == 1 and allowed[0] == compiler.eos_id):
                break
            choices = allowed[allowed != compiler.eos_id]
            token = int(rng.choice(choices))
            c.accept(token)
            t1 = time.perf_counter()
            c.forced(32)
            forced_us.append(1e6 * (time.perf_counter() - t1))
            mask_us.append(1e6 * (t1 - t0))
            n_tokens += 1
    q = statistics.quantiles(mask_us, n=10)
    return {"tokens": n_tokens, "mask_accept_us_median": round(statistics.median(mask_us), 1),
            "mask_accept_us_p90": round(q[-1], 1), "forced_us_median": round(statistics.median(forced_us), 1)}


def main(path: str) -> None:
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    decoder = Tokenizer(llm)
    compiler = FormatCompiler(decoder, eos_id=llama_cpp.llama_vocab_eos(decoder.vocab))
    t0 = time.perf_counter()
    compiler.tokenizer
    print(f"vocab {decoder.n_vocab}: llguidance tokenizer built in {time.perf_counter() - t0:.2f} s")
    for name, schema in [("key_heavy", KEY_HEAVY), ("one_string", ONE_STRING), ("json_mode", "json")]:
        t0 = time.perf_counter()
        compiler.open(schema)
        compile_ms = 1000 * (time.perf_counter() - t0)
        print(name, {"compile_ms": round(compile_ms, 1), **measure(compiler, schema)})


if __name__ == "__main__":
    main(sys.argv[1])
