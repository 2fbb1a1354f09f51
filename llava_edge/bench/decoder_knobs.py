"""Prefill and decode speed of a 7B-width llama GGUF against llama.cpp's knobs (issue 18: a fast first answer).

    python -m llava_edge.bench.decoder_knobs sweep --layers 4 --rounds 3 [--python PY ...] [--out FILE.json]

The model: Vicuna-7B's width (4096, ffn 11008, 32 heads, vocab 32000) with `--layers` blocks of random F16
weights (the values do not change the compute), written with numpy and quantized with the project's quantizer
(llama.cpp's) to Q4_0, Q4_K_M and Q8_0. Prefill and decode time scale with the block count (the output head
runs once per prefill), so a few blocks rank the knobs; 32 blocks give the absolute figures.

Each configuration (quant, n_batch/n_ubatch, flash attention, threads, KV type, extra buffer types, and the
Python of a llama-cpp-python build) is one worker process, loaded and warmed up once; the timed runs are
interleaved round by round (A B C ..., B C ... A) so that the machine's load reaches every configuration alike.
A run: prefill `n_prompt` positions (576: one LLaVA-1.5 image) into an empty KV cache, then decode `n_decode`
tokens one at a time after them.
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

import numpy as np

N_EMBD, N_FF, N_HEAD, N_VOCAB = 4096, 11008, 32, 32000
MARK = "@knobs "
QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")


def write_width7b_gguf(path: Path, n_layer: int) -> Path:
    """An F16 llama GGUF of Vicuna-7B's width with n_layer blocks, streamed to disk (one tensor in memory)."""
    from ..runtime import gguf_file as gg
    from ..runtime.probe_model import llama_metadata, llama_tensors

    # One pool of N(0, 0.02) values, each tensor a differently offset window of it (values do not change the speed).
    pool = (np.random.default_rng(0).standard_normal(N_FF * N_EMBD + 4099, dtype=np.float32) * 0.02).astype(np.float16)

    def values(k: int, spec) -> np.ndarray:
        n = int(np.prod(spec.shape))
        if spec.ggml_type == gg.F32:
            return np.ones(n, np.float32)
        if n <= N_FF * N_EMBD:
            start = (k * 997) % 4099
            return pool[start:start + n]
        return np.resize(pool, n)

    return gg.write_gguf(path, llama_metadata(N_VOCAB, N_EMBD, N_FF, N_HEAD, n_layer, 4096, file_type=1),
                         llama_tensors(N_VOCAB, N_EMBD, N_FF, n_layer, gg.F16), values)


def models(work: Path, n_layer: int, quants=QUANTS) -> dict[str, Path]:
    """The width-7B GGUF at each quant, made once in `work`."""
    from ..quant.gguf import quantize_gguf

    work.mkdir(parents=True, exist_ok=True)
    out = {q: work / f"width7b-L{n_layer}-{q}.gguf" for q in quants}
    missing = [q for q, p in out.items() if not p.exists()]
    if missing:
        f16 = work / f"width7b-L{n_layer}-F16.gguf"
        if not f16.exists():
            write_width7b_gguf(f16, n_layer)
        for q in missing:
            quantize_gguf(f16, out[q], q, progress=True)
    return out


# ----------------------------------------------------------------------------- one configuration's process


def _open(path: str, k: dict):
    """A Llama with the knobs in k, extra buffer types set on the model parameters (Llama has no argument)."""
    import llama_cpp
    import llama_cpp.llama_cpp as native

    defaults = native.llama_model_default_params

    def with_bufts():
        params = defaults()
        params.use_extra_bufts = bool(k.get("extra_bufts", False))
        return params

    kv = {"f16": None, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[k.get("kv", "f16")]
    native.llama_model_default_params = with_bufts
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=k.get("n_ctx", 1024), n_batch=k["n_batch"],
                               n_ubatch=k.get("n_ubatch", k["n_batch"]), n_threads=k["threads"],
                               n_threads_batch=k["threads"], flash_attn=bool(k.get("flash_attn")), type_k=kv, type_v=kv,
                               verbose=bool(k.get("verbose")))
    finally:
        native.llama_model_default_params = defaults


def worker(path: str, k: dict) -> None:
    import llama_cpp

    t0 = time.perf_counter()
    llm = _open(path, k)
    load_s = time.perf_counter() - t0
    memory = llama_cpp.llama_get_memory(llm.ctx)
    n_prompt, n_decode = k.get("n_prompt", 576), k.get("n_decode", 16)
    prompt = [3 + (i * 7919) % 31000 for i in range(n_prompt)]

    def clear():
        llama_cpp.llama_memory_seq_rm(memory, -1, 0, -1)
        llm.n_tokens = 0

    def run() -> dict:
        clear()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill = n_prompt / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n_decode):
            llm.eval([5 + i])
        return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": n_decode / (time.perf_counter() - t)}

    run()  # warm-up: pages in the weights, sizes the buffers
    print(MARK + json.dumps({"ready": True, "load_s": load_s, "llama_cpp": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(MARK + json.dumps(run()), flush=True)


# ----------------------------------------------------------------------------- the sweep


def configurations(quants=QUANTS) -> list[dict]:
    """One knob at a time away from the runtime's settings (Q4_K_M, batch 512, 2 threads, f16 KV, no flash)."""
    base = {"quant": "Q4_K_M", "n_batch": 512, "threads": os.cpu_count() or 1, "kv": "f16", "flash_attn": False}
    out = [dict(base)]
    out += [{**base, "n_batch": b} for b in (128, 256, 1024)]
    out += [{**base, "n_batch": 1024, "n_ubatch": 256}]
    out += [{**base, "flash_attn": True}, {**base, "flash_attn": True, "kv": "q8_0"}]
    if base["threads"] > 1:
        out += [{**base, "threads": 1}]
    out += [{**base, "quant": q} for q in quants if q != "Q4_K_M"]
    return out


def label(c: dict) -> str:
    parts = [c["quant"], f"b{c['n_batch']}" + (f"/u{c['n_ubatch']}" if "n_ubatch" in c else ""), f"t{c['threads']}",
             f"kv {c['kv']}", "fa" if c["flash_attn"] else "no-fa"]
    if c.get("extra_bufts"):
        parts.append("extra-bufts")
    if c.get("python"):
        parts.append(Path(c["python"]).parents[1].name)
    return " ".join(parts)


class Config:
    def __init__(self, c: dict, path: Path):
        self.c = c
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([c.get("python") or sys.executable, "-m", "llava_edge.bench.decoder_knobs", "worker",
                                      str(path), json.dumps(c)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        self.ready = self.receive()

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        return {"error": f"exit {self.proc.wait()}"}

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


def sweep(configs: list[dict], paths: dict[str, Path], rounds: int) -> list[dict]:
    """Interleaved medians per configuration. Workers are started one at a time (their warm-ups do not overlap)."""
    from .harness import round_order

    live = []
    results = []
    for c in configs:
        w = Config(c, paths[c["quant"]])
        if "error" in w.ready:
            results.append({**c, "label": label(c), "error": w.ready["error"]})
            w.close()
        else:
            live.append(w)
    runs = {id(w): [] for w in live}
    for r in range(rounds):
        for w in round_order(live, r):
            got = w.run()
            if "error" not in got:
                runs[id(w)].append(got)
    for w in live:
        w.close()
        rs = runs[id(w)]
        med = {k: statistics.median(x[k] for x in rs) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")} if rs else {}
        results.append({**w.c, "label": label(w.c), "rounds": len(rs), **med, "load_s": w.ready.get("load_s"),
                        "runs": rs})
    return results


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        return worker(sys.argv[2], json.loads(sys.argv[3]))
    ap = argparse.ArgumentParser(prog="python -m llava_edge.bench.decoder_knobs")
    ap.add_argument("command", choices=["sweep"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="runs/decoder-knobs")
    ap.add_argument("--only", default="", help="comma-separated labels' substrings to keep (e.g. 'Q4_0,b512 t2')")
    ap.add_argument("--python", action="append", default=[],
                    help="another llama-cpp-python build's Python: the base configuration and every quant again, "
                         "with extra buffer types on (repeatable)")
    ap.add_argument("--n-decode", type=int, default=16)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    paths = models(Path(a.work), a.layers)
    configs = configurations()
    for py in a.python:
        configs += [{**configs[0], "quant": q, "python": py, "extra_bufts": True} for q in QUANTS]
    configs = [dict(c, n_decode=a.n_decode) for c in configs]
    if a.only:
        keep = [s.strip() for s in a.only.split(",") if s.strip()]
        configs = [c for c in configs if any(s in label(c) for s in keep)]
    results = sweep(configs, paths, a.rounds)
    for r in results:
        print(f"{r['label']:<48} prefill {r.get('prefill_tokens_per_s', 0):7.1f} tok/s   decode {r.get('decode_tokens_per_s', 0):6.2f} tok/s"
              + (f"   {r['error']}" if "error" in r else ""))
    if a.out:
        Path(a.out).write_text(json.dumps({"layers": a.layers, "rounds": a.rounds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
