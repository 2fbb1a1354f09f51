"""`llava-edge bench` / `python -m bench`: every path of every case measured in one run on this device, then
the per-device report (json + md + png). Each path runs in its own process (its own peak RSS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import device, roofline
from .cases import Case, demo_case, llava7b_case
from .report import write_reports

TARGETS = {  # llava-edge / baseline, as the bench issue states them
    "vision_vs_llamacpp": ("<=", 0.12),
    "second_turn_ttft_vs_handler": ("<=", 0.05),
    "decode_vs_llamacpp": (">=", 0.97),
    "peak_rss_vs_llamacpp": ("<=", 1.0),
}


@dataclass
class BenchConfig:
    out_dir: str = "bench/reports"
    work_dir: str = "runs/bench"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    runs: int = 5
    n_decode: int = 32
    quick: bool = False  # 1 decoder block, the bundle's vision graph only, no PyTorch path, one process per path
    shape: str = "small"  # llava7b decoder depth: "small" (2 blocks, 1 when quick) or "7b" (all 32)
    cases: tuple[str, ...] = ("demo", "llava7b")
    torch_baseline: bool = True


def case_paths(case: Case, cfg: BenchConfig) -> list[str]:
    paths = ["edge", "edge_vision", "mtmd_vision", "handler", "plain"]
    return paths + (["torch"] if cfg.torch_baseline and not cfg.quick and _torch_fits(case) else [])


def _torch_fits(case: Case) -> bool:
    weights = sum(f.stat().st_size for f in case.checkpoint.rglob("*.safetensors"))
    return weights * 2.5 < device.ram_bytes()  # fp16 files, fp32 in memory, plus headroom


def run_path(name: str, spec: dict, timeout: float = 1800) -> dict:
    proc = subprocess.run([sys.executable, "-m", "llava_edge.bench.measured_paths", name, json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def run_bench(cfg: BenchConfig) -> dict:
    from tqdm import tqdm

    work = Path(cfg.work_dir)
    started = time.time()
    info = device.describe(cfg.threads)
    print(f"[bench] {info['cpu']}, {info['cores']} cores, {cfg.threads} threads; preparing models in {work}", file=sys.stderr)
    layers = 32 if cfg.shape == "7b" else (1 if cfg.quick else 2)
    cases = []
    for name in cfg.cases:
        cases.append(demo_case(work / "demo") if name == "demo" else llava7b_case(work, layers, cfg.threads, not cfg.quick))
    ceilings = roofline.measure(cfg.threads, quick=cfg.quick)

    # Decode speed varies by a few % from one process to the next (memory placement), more than between the
    # two paths, so edge and plain get a second process each, run after the others, and their medians are pooled.
    jobs = [(case, path) for case in cases for path in case_paths(case, cfg)]
    if not cfg.quick:
        jobs += [(case, path) for case in cases for path in ("edge", "plain")]
    results: dict[str, dict] = {case.name: {"case": case.to_dict(), "paths": {}} for case in cases}
    for case, path in tqdm(jobs, desc="bench", unit="path"):
        spec = {"bundle": str(case.bundle), "checkpoint": str(case.checkpoint), "image": str(case.image),
                "reference_embeds": str(case.reference_embeds),
                "vision_graphs": {k: str(v) for k, v in case.vision_graphs.items()},
                "threads": cfg.threads, "runs": cfg.runs, "n_decode": cfg.n_decode,
                "n_ctx": 2048}  # the same context (and KV cache size) for every llama.cpp path
        if path == "plain":  # as many prompt positions as the image prompt the edge path measured
            spec["n_prompt_tokens"] = results[case.name]["paths"].get("edge", {}).get("n_prompt_tokens", 128)
        done = results[case.name]["paths"]
        if path in done:
            pool_second_process(done[path], run_path(path, spec))
        else:
            done[path] = run_path(path, spec)

    report = {
        "device": info, "config": asdict(cfg), "roofline": ceilings, "cases": results,
        "seconds": round(time.time() - started, 1),
    }
    for name, case in zip(results, cases):
        results[name]["ratios"] = ratios(results[name]["paths"])
        results[name]["fidelity"] = fidelity(results[name]["paths"])
        results[name]["roofline"] = roofline_fractions(case, results[name]["paths"], ceilings)
    headline = results.get("llava7b") or next(iter(results.values()))
    report["ratios"] = {k: v for k, v in headline["ratios"].items() if v is not None}
    report["ratios_case"] = "llava7b" if "llava7b" in results else next(iter(results))
    report["fidelity"] = headline["fidelity"]
    report["targets"] = {k: {"op": op, "target": t} for k, (op, t) in TARGETS.items()}
    write_reports(report, Path(cfg.out_dir))
    return report


def pool_second_process(first: dict, second: dict) -> None:
    """Decode tokens/s of a path measured in two processes: the mean of their medians (p90: the higher one)."""
    a, b = first.get("decode_tokens_per_s"), second.get("decode_tokens_per_s")
    if "error" in first or "error" in second or not a or not b:
        return
    first["decode_tokens_per_s"] = {"median": (a["median"] + b["median"]) / 2, "p90": max(a["p90"], b["p90"]),
                                    "n": a["n"] + b["n"], "process_medians": [a["median"], b["median"]]}


def _median(paths: dict, path: str, metric: str) -> float | None:
    value = paths.get(path, {}).get(metric)
    return value.get("median") if isinstance(value, dict) else value


def ratios(paths: dict) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b else None

    return {
        "vision_vs_llamacpp": ratio(_median(paths, "edge", "vision_ms"), _median(paths, "mtmd_vision", "vision_ms")),
        "second_turn_ttft_vs_handler": ratio(_median(paths, "edge", "second_turn_ttft_ms"),
                                             _median(paths, "handler", "second_turn_ttft_ms")),
        "decode_vs_llamacpp": ratio(_median(paths, "edge", "decode_tokens_per_s"), _median(paths, "plain", "decode_tokens_per_s")),
        "peak_rss_vs_llamacpp": ratio(paths.get("edge", {}).get("peak_rss_mb"), paths.get("handler", {}).get("peak_rss_mb")),
    }


def fidelity(paths: dict) -> dict:
    out = {}
    if "embedding_cosine" in paths.get("edge", {}):
        out["edge"] = paths["edge"]["embedding_cosine"]["mean"]
    for precision, g in paths.get("edge_vision", {}).get("graphs", {}).items():
        out[f"onnx_{precision}"] = g["embedding_cosine"]["mean"]
    if "embedding_cosine" in paths.get("mtmd_vision", {}):
        out["llamacpp_mtmd_f16"] = paths["mtmd_vision"]["embedding_cosine"]["mean"]
    return out


def roofline_fractions(case: Case, paths: dict, ceilings: dict) -> dict:
    """Decode tokens/s against bandwidth / bytes read per token; vision against the matmul peak."""
    from ..reference.checkpoint import read_llava_config

    cfg, _ = read_llava_config(case.checkpoint)
    decoder_bytes = _decoder_bytes_per_token(case)
    bound = ceilings["memory_bandwidth_gbs"] * 1e9 / decoder_bytes
    out = {"decoder_bytes_per_token_mb": decoder_bytes / 2**20, "decode_bound_tokens_per_s": bound}
    decode = _median(paths, "edge", "decode_tokens_per_s")
    if decode:
        out["decode_fraction_of_bandwidth_bound"] = decode / bound
    v = cfg.vision
    layers_used = v.num_hidden_layers + 1 + cfg.feature_layer if cfg.feature_layer < 0 else cfg.feature_layer
    n_out = (v.image_size // v.patch_size) ** 2
    flops = roofline.vit_flops(v.image_size, v.patch_size, v.hidden_size, v.intermediate_size, layers_used,
                               cfg.projector.in_features, cfg.projector.out_features, cfg.projector.out_features, n_out)
    out["vision_gflops_per_image"] = flops / 1e9
    precision = open_precision(case)
    ms = _median(paths, "edge", "vision_ms")
    if ms:
        peak = ceilings["matmul_int8_gops"] if precision == "int8" else ceilings["matmul_fp32_gflops"]
        out["vision_fraction_of_matmul_peak"] = flops / (ms / 1000) / 1e9 / peak
        out["vision_peak_used"] = "int8" if precision == "int8" else "fp32"
    return out


def open_precision(case: Case) -> str:
    from ..runtime.bundle import open_bundle

    return open_bundle(case.bundle, verify=False).vision.precision


def _decoder_bytes_per_token(case: Case) -> int:
    """Every weight of the GGUF is read once per generated token, except the token embedding (one row)."""
    from gguf import GGUFReader

    from ..runtime.bundle import open_bundle

    reader = GGUFReader(str(open_bundle(case.bundle, verify=False).decoder_file))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
