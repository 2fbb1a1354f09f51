"""Demo model: the edge runtime's answers against the reference's on the held-out split (a script, not a test).

    python experiments/demo_parity.py --data DIR/test.json [--quants F16 Q8_0 Q4_K_M] [--threads 1] [--work DIR]

Exports the shipped demo checkpoint at each quant (vision precision auto, as `llava-edge export` does),
answers every held-out question greedily with the reference (PyTorch) and with each bundle (ONNX Runtime +
llama.cpp), and prints a markdown table: accuracy per question type, and the share of answers identical to
the reference's. Results also go to <work>/demo_parity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llava_edge.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from llava_edge.paths import DEMO_CHECKPOINT  # noqa: E402
from llava_edge.eval.benchmarks import load_benchmark  # noqa: E402
from llava_edge.eval.engine_runner import answers_of_bundle  # noqa: E402
from llava_edge.scoring import score_predictions  # noqa: E402
from llava_edge.train.reference_answers import evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="the shapes world's test.json")
    ap.add_argument("--quants", nargs="+", default=["F16", "Q8_0", "Q4_K_M"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/demo_parity")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    reference = evaluate(DEMO_CHECKPOINT, args.data, progress=False)
    rows = {"reference": {"result": reference.summary(), "seconds": time.perf_counter() - t0, "identical": 1.0}}
    ref_answers = [s.prediction for s in reference.samples]
    for quant in args.quants:
        bundle = work / f"bundle-{quant}"
        if not (bundle / "manifest.json").exists():
            export_bundle(ExportOptions(str(DEMO_CHECKPOINT), str(bundle), quant, "auto", None, False, True, args.threads))
        t0 = time.perf_counter()
        result = bundle_result(bundle, args.data, args.threads)
        same = sum(a == s.prediction for a, s in zip(ref_answers, result.samples)) / len(ref_answers)
        manifest = json.loads((bundle / "manifest.json").read_text())
        rows[quant] = {"result": result.summary(), "seconds": time.perf_counter() - t0, "identical": same,
                       "vision_precision": manifest["vision"]["precision"]}
    (work / "demo_parity.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


def bundle_result(bundle: Path, data: str, threads: int):
    """The bundle's answers to every question (24 tokens at most, as the reference's evaluate), scored."""
    questions = load_benchmark("shapes", data).questions
    answers = answers_of_bundle(str(bundle), questions, parallel=1, max_tokens=24, threads=threads)
    return score_predictions([q.meta["record"] for q in questions], [answers[q.key] for q in questions])


def table(rows: dict) -> str:
    types = list(rows["reference"]["result"]["per_type"])
    head = "| path | " + " | ".join(types) + " | overall | identical to reference | seconds |"
    lines = [head, "|---|" + "---:|" * (len(types) + 3)]
    for name, row in rows.items():
        r = row["result"]
        label = name if name == "reference" else f"bundle {name} (vision {row['vision_precision']})"
        cells = [f"{100 * r['per_type'][t]['accuracy']:.1f}%" for t in types]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * r['accuracy']:.1f}% | "
                     f"{100 * row['identical']:.1f}% | {row['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
