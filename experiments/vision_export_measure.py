"""Measure the vision export at LLaVA-1.5-7B shapes with random weights (a script, not a test).

    OMP_NUM_THREADS=1 python experiments/vision_export_measure.py [--work DIR] [--threads 1 2] [--runs N]
                                                            [--torchscript] [--skip-static]

Random ViT-L/14-336 + mlp2x_gelu 1024 -> 4096, feature layer -2, CLS dropped (576 image tokens).
Each stage runs in its own process so that its peak RSS is its own:
  export shipped  torch model -> fp32 ONNX as `llava-edge export` makes it (dynamo, no offline fusion)
  export fused    the same with ONNX Runtime's offline transformer fusions (fuse=True)
  export ts       (--torchscript) the shipped settings with torch's legacy TorchScript exporter
  variant X       fp16 and int8 dynamic from the shipped graph, int8 from the fused graph, int8 static QDQ
  latency T       all graphs in one process with T intra-op threads, runs interleaved across graphs so
                  that a noisy neighbour hits them alike: min/median ms per image at batch 1, session
                  load time and RSS, cosine vs the reference
Results: a JSON object on the last stdout line and <work>/vision_export_measure.json.
The reference embeddings come from the PyTorch model on real photos (tests/data) preprocessed at 336.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut.jpg", "coffee.jpg", "rocket.jpg", "chelsea_portrait.jpg"]
EXPORTS = {"shipped": "vision.onnx", "fused": "vision.fused.onnx", "ts": "vision.ts.onnx"}
VARIANTS = {  # name: (source graph, output graph)
    "fp16": ("vision.onnx", "vision.fp16.onnx"),
    "int8": ("vision.onnx", "vision.int8.onnx"),
    "int8_from_fused": ("vision.fused.onnx", "vision.fused.int8.onnx"),
    "int8_static_qdq": ("vision.onnx", "vision.int8-static.onnx"),
}
GRAPHS = {"fp32": "vision.onnx", "fp32_fused": "vision.fused.onnx", **{k: v[1] for k, v in VARIANTS.items()}}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_llava_vision():
    """LLaVA-1.5-7B vision shapes; a 1-layer toy decoder (not measured here)."""
    import torch

    from llava_edge.architectures import LlavaConfig, ProjectorConfig, TextConfig, VisionConfig
    from llava_edge.reference.llava import Llava

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision=VisionConfig(),  # defaults are ViT-L/14-336
        projector=ProjectorConfig(type="mlp2x_gelu", in_features=1024, out_features=4096),
        text=TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
        feature_layer=-2,
        select_feature="patch",
    )
    return Llava(cfg).eval()


def calibration_pixels():
    import numpy as np

    from llava_edge.image import load_image, preprocess

    return np.stack([preprocess(load_image(ROOT / "tests" / "data" / name), 336) for name in PHOTOS])


def file_bytes(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ----------------------------------------------------------------------------- stages (child processes)


def stage_export(work: Path, kind: str) -> dict:
    import numpy as np

    from llava_edge.export.onnx_vision import export_vision_onnx_report
    from llava_edge.quant.onnx_run import reference_embeddings

    model = random_llava_vision()
    rss_model = peak_rss_mb()
    result = {}
    if kind == "shipped":
        pixels = calibration_pixels()
        t = time.perf_counter()
        np.save(work / "reference.npy", reference_embeddings(model, pixels))
        result["torch_eager_ms_per_image_batch4"] = round((time.perf_counter() - t) * 1000 / len(pixels))
    out = work / EXPORTS[kind]
    t = time.perf_counter()
    report = export_vision_onnx_report(
        model, out, fuse=kind == "fused", exporter="torchscript" if kind == "ts" else "dynamo"
    )
    return {
        "export_s": round(time.perf_counter() - t, 1), "peak_rss_mb": round(peak_rss_mb()),
        "rss_after_model_build_mb": round(rss_model), "file_mb": round(file_bytes(out) / 2**20, 1),
        "exporter": report.exporter, "fused": report.fused, "fused_cosine_vs_reference": report.fused_cosine, **result,
    }


def stage_variant(work: Path, name: str) -> dict:
    from llava_edge.quant.vision_precision import convert_fp16, quantize_int8_dynamic, quantize_int8_static

    src, dst = (work / p for p in VARIANTS[name])
    t = time.perf_counter()
    if name == "fp16":
        convert_fp16(src, dst)
    elif name == "int8_static_qdq":
        quantize_int8_static(src, dst, calibration_pixels())
    else:
        quantize_int8_dynamic(src, dst)
    return {"convert_s": round(time.perf_counter() - t, 1), "file_mb": round(file_bytes(dst) / 2**20, 1),
            "peak_rss_mb": round(peak_rss_mb())}


def stage_latency(work: Path, threads: int, runs: int, graphs: list[str]) -> dict:
    import numpy as np

    from llava_edge.quant.onnx_run import cpu_session, embeddings_agreement, run_onnx

    pixels = calibration_pixels()
    reference = np.load(work / "reference.npy")
    sessions, rows = {}, {}
    for name in graphs:
        before = current_rss_mb()
        t = time.perf_counter()
        sessions[name] = cpu_session(work / GRAPHS[name], threads=threads)
        load_s = time.perf_counter() - t
        got = np.concatenate([run_onnx(sessions[name], pixels[i : i + 1]) for i in range(len(pixels))])
        rows[name] = {"session_load_s": round(load_s, 1), "session_rss_mb": round(current_rss_mb() - before),
                      **{k: round(v, 7) for k, v in embeddings_agreement(got, reference).items()}}
    times = {name: [] for name in graphs}
    for i in range(runs):
        for name in graphs:
            t = time.perf_counter()
            run_onnx(sessions[name], pixels[i % len(pixels)][None])
            times[name].append((time.perf_counter() - t) * 1000)
    for name in graphs:
        rows[name].update(min_ms=round(min(times[name])), median_ms=round(float(np.median(times[name]))))
    return rows


# ----------------------------------------------------------------------------- driver


def run_stage(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, __file__, "--stage", *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"stage {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/llava-edge-vision-measure"))
    parser.add_argument("--torchscript", action="store_true", help="also time torch's legacy TorchScript exporter")
    parser.add_argument("--skip-static", action="store_true", help="skip the (slow) static QDQ int8 variant")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    if args.stage:
        name, rest = args.stage[0], args.stage[1:]
        if name == "export":
            result = stage_export(args.work, rest[0])
        elif name == "variant":
            result = stage_variant(args.work, rest[0])
        else:
            result = stage_latency(args.work, int(rest[0]), args.runs, rest[1:])
        print(json.dumps(result))
        return

    common = ["--work", str(args.work), "--runs", str(args.runs)]
    results: dict = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": load_average()}}
    steps = [("export", ["export", "shipped"]), ("export_fused", ["export", "fused"])]
    if args.torchscript:
        steps.append(("export_torchscript", ["export", "ts"]))
    variants = [v for v in VARIANTS if not (args.skip_static and v == "int8_static_qdq")]
    steps += [(f"variant_{v}", ["variant", v]) for v in variants]
    for key, stage in steps:
        results[key] = run_stage(*stage, *common)
        print(f"{key}: {results[key]}", flush=True)
    graphs = ["fp32", "fp32_fused", *variants]
    for threads in args.threads:
        load = load_average()
        rows = run_stage("latency", str(threads), *graphs, *common)
        results[f"latency_{threads}t"] = {"load_average_before": load, "load_average_after": load_average(), **rows}
        for name, row in rows.items():
            print(f"{name} {threads} thread(s): {row}", flush=True)
    (args.work / "vision_export_measure.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
