"""KV-type memory case: what `--kv-type f16|q8_0|q4_0` costs and saves, one image and a 64-token answer.

Each run is a NEW process (chat's path: ChatSession, n_ctx 4096, one image, 64 answer tokens drawn past EOS) whose
peak anonymous and file-backed RSS is sampled by `peak_memory.PeakMemory`; the first-answer time (encode + prefill
+ first token) and the decode speed come from the answer's own timings. Rounds run the KV types interleaved, the
order rotated each round; times are reported as ratios to f16 from the same run (they depend on the machine's
load, peak RSS does not). Greedy answers on examples/ with the demo bundle are compared for equality across the
types: the 7B's random weights are chaotic, so the demo is the fidelity measure.

    python -m llava_edge.bench.kv_memory_case [--shape 7b|small] [--rounds 3] [--threads N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .device import describe
from .harness import round_order

KV_TYPES = ("f16", "q8_0", "q4_0")
N_CTX, N_ANSWER = 4096, 64
QUESTION = "Describe the image."


def child(bundle: str | None, image: str, kv_type: str, threads: int, n_ctx: int, n_answer: int) -> dict:
    """One run in this process: load, answer, report peaks and timings (the parent starts a process per run)."""
    from ..peak_memory import PeakMemory
    from ..runtime import ChatSession, SamplingConfig

    with PeakMemory() as memory:
        session = ChatSession.open(bundle or None, threads=threads, n_ctx=n_ctx, kv_type=kv_type)
        session.set_image(image)
        answer = session.answer(QUESTION, SamplingConfig(max_tokens=n_answer, ignore_eos=n_answer > 1))
        session.close()
        peaks = memory.result()
    t = answer.timings
    return {"kv_type": kv_type, "text": answer.text, "ttft_ms": t.ttft_ms, "decode_tokens_per_s": t.decode_tokens_per_s,
            "n_generated": t.n_generated, "n_prompt_tokens": t.n_prompt_tokens, **peaks}


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "llava_edge.bench.kv_memory_case", "--child", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def demo_answers(kv_type: str) -> list[str]:
    """Greedy answers of the demo bundle on examples/ (every image, one question), each in this KV type."""
    from ..runtime import ChatSession, SamplingConfig

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.png"))
    session = ChatSession.open(None, kv_type=kv_type)
    out = []
    for image in examples:
        session.set_image(image)
        out.append(session.answer(QUESTION, SamplingConfig(max_tokens=48)).text)
    session.close()
    return out


def bundle_for(shape: str, work: Path, threads: int) -> tuple[Path, Path, str]:
    """The 7B-shaped random bundle (32 decoder blocks; `small`: 2, for a smoke run) as `llava-edge bench` builds
    it, and its image."""
    from .cases import llava7b_case

    case = llava7b_case(work, 32 if shape == "7b" else 2, threads, all_precisions=False)
    return case.bundle, case.image, case.description


def run_case(shape: str, rounds: int, threads: int, work: Path) -> dict:
    bundle, image, description = bundle_for(shape, work, threads)
    runs: dict[str, list[dict]] = {k: [] for k in KV_TYPES}
    for r in range(rounds):
        for kv_type in round_order(list(KV_TYPES), r):
            runs[kv_type].append(run_child([str(bundle), str(image), kv_type, str(threads), str(N_CTX),
                                            str(N_ANSWER)]))
            print(f"[kv_memory] round {r + 1}/{rounds} {kv_type}: {json.dumps(runs[kv_type][-1])[:300]}",
                  file=sys.stderr, flush=True)
    results = {k: summarize(v) for k, v in runs.items()}
    for k, res in results.items():
        res["ttft_vs_f16"] = res["ttft_ms"] / results["f16"]["ttft_ms"]
        res["decode_vs_f16"] = res["decode_tokens_per_s"] / results["f16"]["decode_tokens_per_s"]
    demo = {k: demo_answers(k) for k in KV_TYPES}
    return {"shape": shape, "description": description, "device": describe(threads), "n_ctx": N_CTX,
            "n_answer": N_ANSWER, "rounds": rounds, "threads": threads, "results": results,
            "demo_answers": demo, "demo_equal": all(demo[k] == demo["f16"] for k in KV_TYPES)}


def summarize(runs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "decode_tokens_per_s")}
    peaks = {k: max(r[k] for r in runs) for k in ("peak_rss_anon_mb", "peak_rss_file_mb", "vm_hwm_mb")}
    return {**med, **peaks, "peak_rss_mb": peaks["peak_rss_anon_mb"] + peaks["peak_rss_file_mb"],
            "n_generated": runs[0]["n_generated"], "runs": len(runs)}


def markdown(report: dict) -> str:
    d = report["device"]
    lines = [
        f"# KV cache type: memory, first answer, decode ({report['shape']}, {d['cpu']}, {d['cores']} cores)", "",
        f"{report['description']}; bundle Q4_K_M; n_ctx {report['n_ctx']}; one image, a {report['n_answer']}-token "
        f"answer; {report['threads']} threads; {report['rounds']} interleaved rounds (a new process per run, order "
        "rotated each round). Peak RSS: the largest over the runs, sampled every 20 ms (anonymous + file-backed; "
        "file-backed is the memory-mapped GGUF and ONNX, page cache the kernel can drop). Times: medians; compare "
        "them only as ratios to f16 from this run (the machine is shared and its load changes).", "",
        "| KV type | peak RSS (MiB) | anonymous | file-backed | first answer (ms) | vs f16 | decode (tok/s) | vs f16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, r in report["results"].items():
        lines.append(f"| {k} | {r['peak_rss_mb']} | {r['peak_rss_anon_mb']} | {r['peak_rss_file_mb']} | "
                     f"{r['ttft_ms']:.0f} | {r['ttft_vs_f16']:.2f}x | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['decode_vs_f16']:.2f}x |")
    demo = report["demo_answers"]
    lines += ["", f"Demo bundle, greedy, examples/ (\"{QUESTION}\"): answers "
              + ("equal across f16, q8_0 and q4_0." if report["demo_equal"] else "differ:"), ""]
    if not report["demo_equal"]:
        lines += [f"- {k}: {v}" for k, v in demo.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        bundle, image, kv_type, threads, n_ctx, n_answer = argv[1:7]
        print(json.dumps(child(bundle, image, kv_type, int(threads), int(n_ctx), int(n_answer))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("7b", "small"), default="7b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=Path("bench/work"))
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    a = parser.parse_args(argv)
    report = run_case(a.shape, a.rounds, a.threads, a.work)
    name = f"kv_memory_{a.shape}-{report['device']['id']}"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (a.out / f"{name}.md").write_text(markdown(report))
    print(f"wrote {a.out / name}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
