"""Measure the decoder export at >= 1 B parameters with random weights (a script, not a test).

    OMP_NUM_THREADS=1 python experiments/gguf_export_measure.py [--work DIR] [--threads N] [--keep]

TinyLlama shapes (hidden 2048, 22 layers, ffn 5632, 32 heads / 4 KV heads, vocab 32000: 1.10 B parameters)
written as a liuhaotian-layout checkpoint in fp16 safetensors (2 shards + index), then
  export    checkpoint -> F16 GGUF, streamed tensor by tensor (time, peak RSS, file size)
  quantize  F16 GGUF -> Q4_K_M with llama.cpp's quantizer (time, peak RSS, file size)
  run       the Q4_K_M file through the runtime loader: 64-token prefill, 16 decode steps (sanity + timings)
Each stage runs in its own process, so each peak RSS is its own; `baseline_rss_mb` is the same process
after its imports, before any tensor work. Results: a JSON object on the last stdout line and
<work>/gguf_export_measure.json. The multi-GB files are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
          "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stage_make(work: Path) -> dict:
    """The checkpoint: fp16 safetensors in 2 shards, one shard in memory at a time."""
    import numpy as np
    from safetensors.numpy import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from spm_fixture import train_tiny_spm

    from llava_edge.architectures import TextConfig
    from llava_edge.export.decoder_source import expected_shapes

    ckpt = work / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    text = TextConfig(**SHAPES)
    names = {name: ("model." + name if name != "lm_head.weight" else name) for name in expected_shapes(text)}
    shards = [[], []]
    for i, name in enumerate(expected_shapes(text)):
        shards[0 if i < len(names) // 2 else 1].append(name)
    rng = np.random.default_rng(0)
    weight_map, n_params = {}, 0
    for s, shard in enumerate(shards):
        tensors = {}
        for name in shard:
            shape = expected_shapes(text)[name]
            if len(shape) == 1:
                tensors[names[name]] = np.ones(shape, np.float16)
            else:
                tensors[names[name]] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            n_params += int(np.prod(shape))
        file = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file(tensors, str(ckpt / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
        del tensors
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", **SHAPES,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float16",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 1024,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "image_aspect_ratio": "pad",
    }
    (ckpt / "config.json").write_text(json.dumps(config, indent=1))
    train_tiny_spm(ckpt)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    return {"n_params": n_params, "checkpoint_bytes": ckpt_bytes, "make_s": round(time.perf_counter() - start, 1)}


def stage_export(work: Path) -> dict:
    import numpy as np

    from llava_edge.export.decoder_source import expected_shapes, source_from_checkpoint
    from llava_edge.export.gguf_decoder import write_decoder_gguf

    start = time.perf_counter()
    source = source_from_checkpoint(work / "checkpoint")  # reads headers; imports torch (checkpoint key maps)
    baseline = current_rss_mb()
    out = write_decoder_gguf(source, work / "decoder-F16.gguf", "F16")
    largest = max(int(np.prod(s)) for s in expected_shapes(source.text).values()) * 2
    return {"export_s": round(time.perf_counter() - start, 1), "export_peak_rss_mb": round(peak_rss_mb()),
            "export_baseline_rss_mb": round(baseline), "largest_tensor_f16_mb": round(largest / 2**20),
            "f16_bytes": out.stat().st_size}


def stage_quantize(work: Path, threads: int) -> dict:
    from llava_edge.quant.gguf import quantize_gguf

    baseline = current_rss_mb()
    start = time.perf_counter()
    out = quantize_gguf(work / "decoder-F16.gguf", work / "decoder-Q4_K_M.gguf", "Q4_K_M", n_threads=threads)
    return {"quantize_s": round(time.perf_counter() - start, 1), "quantize_peak_rss_mb": round(peak_rss_mb()),
            "quantize_baseline_rss_mb": round(baseline), "q4_k_m_bytes": out.stat().st_size,
            "quantize_threads": threads}


def stage_run(work: Path, threads: int) -> dict:
    import numpy as np

    from llava_edge.runtime.tokenizer import Tokenizer
    from llava_edge.runtime.llama_loader import open_llama
    from llava_edge.runtime.llama_probe import extra_bufts_verdict

    verdict = extra_bufts_verdict()  # probed (once per machine) before the clock starts
    start = time.perf_counter()
    decoder = Tokenizer(open_llama(work / "decoder-Q4_K_M.gguf", n_ctx=256, n_batch=64, n_threads=threads))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    decoder.eval_tokens(list(range(3, 3 + 64)))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(16):
        token = int(decoder.logits_last().argmax())
        decoder.eval_tokens([token])
    decode_s = time.perf_counter() - start
    assert np.isfinite(decoder.logits_last()).all()
    return {"run_load_s": round(load_s, 2), "prefill_tokens_per_s": round(64 / prefill_s, 1),
            "decode_tokens_per_s": round(16 / decode_s, 2), "run_threads": threads,
            "extra_bufts": verdict.extra_bufts, "run_peak_rss_mb": round(peak_rss_mb())}


def run_stage(stage: str, work: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--work", str(work), "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/llava-edge-gguf-measure"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--stage", choices=["make", "export", "quantize", "run"])
    args = parser.parse_args()
    if args.stage:
        stages = {
            "make": lambda: stage_make(args.work),
            "export": lambda: stage_export(args.work),
            "quantize": lambda: stage_quantize(args.work, args.threads),
            "run": lambda: stage_run(args.work, args.threads),
        }
        print(json.dumps(stages[args.stage]()))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"shapes": SHAPES}
    try:
        for stage in ("make", "export", "quantize", "run"):
            results.update(run_stage(stage, args.work, args.threads))
            print(stage, "done", file=sys.stderr)
        for stage in ("export", "quantize"):
            ratio = results[f"{stage}_peak_rss_mb"] * 2**20 / results["checkpoint_bytes"]
            results[f"{stage}_peak_rss_vs_checkpoint"] = round(ratio, 3)
        (args.work / "gguf_export_measure.json").write_text(json.dumps(results, indent=1))
    finally:
        if not args.keep:
            for path in (args.work / "checkpoint", args.work / "decoder-F16.gguf", args.work / "decoder-Q4_K_M.gguf"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
