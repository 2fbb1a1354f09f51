"""The table of docs/eval.md: the demo bundle against its own reference on POPE/MME/MMBench/SEED-Bench files built
from the shapes world, at K = all, 48, 32 and 16 (a script, not a test).

    python experiments/eval_demo.py [--images 60] [--out runs/eval_demo] [--parallel 4]

Writes each benchmark's report (markdown + the K-sweep PNG) under --out/reports and prints one markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llava_edge.eval.sweep_report import write_report  # noqa: E402
from llava_edge.eval.eval_config import EvalConfig  # noqa: E402
from llava_edge.eval.run import run_eval  # noqa: E402
from llava_edge.eval.table import markdown_table, rows_of  # noqa: E402
from llava_edge.paths import DEMO_BUNDLE, DEMO_CHECKPOINT  # noqa: E402
from llava_edge.train.reference_answers import answer_prompts  # noqa: E402
from llava_edge.train.shapes_benchmarks import build_all  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--out", default="runs/eval_demo")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    out = Path(args.out)
    sets = build_all(out / "data", args.images, seed=2026)

    def reference(items, k):
        return answer_prompts(DEMO_CHECKPOINT, items, image_tokens=k)

    rows = []
    for name, data in sets.items():
        cfg = EvalConfig(name, str(data), bundle=str(DEMO_BUNDLE), ckpt=str(DEMO_CHECKPOINT),
                         image_tokens=[None, 48, 32, 16], parallel=args.parallel, threads=args.threads,
                         predictions=str(out / "predictions.jsonl"))
        run = run_eval(cfg, reference)
        write_report(run, out / "reports")
        timing = {r.image_tokens: r.ttft_ms for r in run.results if r.side == "bundle"}
        print(f"{name}: {run.questions} questions; median first-answer ms by K: {timing}", file=sys.stderr)
        rows += rows_of(run)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
