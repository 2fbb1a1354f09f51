"""A bench run on disk: reports/<device-id>.json (everything), .md (the tables), .png (latency and memory)."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {
    "edge": "llava-edge (ONNX Runtime + llama.cpp)",
    "edge_kv": "llava-edge, new process, image-prefix KV from disk",
    "edge_kv_fill": "llava-edge, cold, saving the image-prefix KV (1 run)",
    "edge_vision": "llava-edge vision graphs alone",
    "mtmd_vision": "llama.cpp mtmd, f16 mmproj (vision only)",
    "handler": "llama-cpp-python Llava15ChatHandler",
    "plain": "plain llama-cpp-python generate (text)",
    "torch": "PyTorch eager reference (fp32)",
}


def write_reports(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / report["device"]["id"]
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"), "png": stem.with_suffix(".png")}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report, paths["png"].name))
    try:
        plot(report, paths["png"])
    except ImportError:
        paths.pop("png")  # matplotlib is optional
    return paths


def _cell(metric) -> str:
    if metric is None:
        return "–"
    if isinstance(metric, dict):
        if metric.get("median") is None:
            return "–"
        return f"{metric['median']:.1f} / {metric['p90']:.1f}"
    return f"{metric:.1f}" if isinstance(metric, float) else str(metric)


def _memory_cell(r: dict) -> str:
    """VmHWM, and the sampled peaks of anonymous and file-backed (page cache of mapped files) memory."""
    if "peak_rss_anon_mb" not in r:
        return f"{r.get('peak_rss_mb', 0):.0f}"
    return f"{r.get('peak_rss_mb', 0):.0f} ({r['peak_rss_anon_mb']:.0f} + {r['peak_rss_file_mb']:.0f})"


def markdown(report: dict, png_name: str) -> str:
    d = report["device"]
    lines = [
        f"# llava-edge bench: {d['cpu']}",
        "",
        f"{d['cores']} cores ({d['threads_used']} threads used), {d['ram_gb']} GB RAM, {d['os']} {d['machine']}"
        + (f", GPU: {', '.join(d['gpus'])}" if d["gpus"] else ", no GPU") + f"; {report['seconds']:.0f} s for the run.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()) + ".",
        f"Median / p90 over {report['config']['runs']} runs after a warm-up; {report['config']['n_decode']} decoded tokens per answer; "
        f"n_ctx {report.get('n_ctx', '–')} on every llama.cpp path.",
        "Each path runs in its own process; " + report.get("method", "paths measured one after another").split("; ", 1)[-1] + ".",
        "",
    ]
    for name, case in report["cases"].items():
        c = case["case"]
        lines += [f"## {name}: {c['description']}", "",
                  f"Bundle: vision {c['vision_precision']}, decoder {c['decoder_quant']}; files (MB): "
                  + ", ".join(f"{k} {v}" for k, v in c["files_mb"].items()) + ".", "",
                  "| path | vision ms | TTFT ms | prefill tok/s | decode tok/s | 2nd-question TTFT ms | peak RSS MB "
                  "(anon + file) | embedding cosine |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for path, r in case["paths"].items():
            if path == "edge_vision":
                continue
            if "error" in r:
                lines.append(f"| {LABELS[path]} | failed: {r['error']} |||||||")
                continue
            cos = r.get("embedding_cosine", {}).get("mean")
            lines.append(f"| {LABELS[path]} | {_cell(r.get('vision_ms'))} | {_cell(r.get('ttft_ms'))} | "
                         f"{_cell(r.get('prefill_tokens_per_s'))} | {_cell(r.get('decode_tokens_per_s'))} | "
                         f"{_cell(r.get('second_turn_ttft_ms'))} | {_memory_cell(r)} | "
                         f"{'–' if cos is None else f'{cos:.5f}'} |")
        graphs = case["paths"].get("edge_vision", {}).get("graphs", {})
        if graphs:
            lines += ["", "| vision graph (ONNX Runtime) | ms median / p90 | file MB | cosine vs reference |", "|---|---:|---:|---:|"]
            for precision, g in graphs.items():
                lines.append(f"| {precision} | {_cell(g['vision_ms'])} | {g['file_mb']:.0f} | {g['embedding_cosine']['mean']:.5f} |")
        lines += ["", "| ratio (llava-edge ÷ baseline) | measured | target |", "|---|---:|---:|"]
        for key, value in case["ratios"].items():
            t = report["targets"][key]
            verdict = "–" if value is None else ("met" if (value <= t["target"] if t["op"] == "<=" else value >= t["target"]) else "missed")
            lines.append(f"| {key} | {'–' if value is None else f'{value:.3f}'} | {t['op']} {t['target']} ({verdict}) |")
        rf = case["roofline"]
        lines += ["", "Roofline: decode reads {:.0f} MB of weights per token, so bandwidth allows {:.1f} tok/s; "
                  "llava-edge decodes at {:.0%} of that. Vision: {:.1f} GFLOP per image at {:.0%} of the {} matmul peak.".format(
                      rf["decoder_bytes_per_token_mb"], rf["decode_bound_tokens_per_s"],
                      rf.get("decode_fraction_of_bandwidth_bound", 0), rf["vision_gflops_per_image"],
                      rf.get("vision_fraction_of_matmul_peak", 0), rf.get("vision_peak_used", "fp32")), ""]
    r = report["roofline"]
    lines += ["## Device ceilings (ONNX Runtime, same threads)", "",
              f"Memory bandwidth {r['memory_bandwidth_gbs']:.1f} GB/s; matmul fp32 {r['matmul_fp32_gflops']:.0f} GFLOP/s; "
              f"int8 {r['matmul_int8_gops']:.0f} GOP/s.", "", f"![latency and memory]({png_name})", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(report["cases"].items())
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 3.6 * len(cases)), squeeze=False)
    for row, (name, case) in enumerate(cases):
        paths = {p: r for p, r in case["paths"].items() if p in ("edge", "handler", "mtmd_vision", "torch", "plain") and "error" not in r}
        metrics = [("vision_ms", "image encode"), ("ttft_ms", "1st-question TTFT"), ("second_turn_ttft_ms", "2nd-question TTFT")]
        ax = axes[row][0]
        width = 0.8 / max(1, len(paths))
        for i, (p, r) in enumerate(paths.items()):
            values = [(r.get(m) or {}).get("median", 0) if isinstance(r.get(m), dict) else 0 for m, _ in metrics]
            ax.bar([j + i * width for j in range(len(metrics))], values, width, label=LABELS[p])
        ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(metrics))], [m for _, m in metrics])
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"{name}: latency (median)")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        rss = {LABELS[p].split(" (")[0]: r["peak_rss_mb"] for p, r in paths.items()}
        ax.barh(list(rss), list(rss.values()), color="tab:gray")
        ax.set_xlabel("peak RSS MB")
        ax.set_title(f"{name}: memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
