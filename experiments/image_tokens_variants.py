"""Token reduction's choices, tried on the demo model through the PyTorch reference (a script, not a test).

    python experiments/image_tokens_variants.py [--budgets 32 16] [--data runs/image_tokens/data/test.json]

Variants of reference/token_reduction.py's `_reduce_one`, on the demo's held-out split (as
llava_edge/bench/image_tokens_case.py writes it), each against the all-token answers:
- chosen: the project's definition (dominant by CLS attention, contextual = mean of each group);
- visionzip_merge: a contextual token as target + mean(others), as VisionZip's public code makes it;
- raster: the same K tokens, all in raster order (a contextual token at its target's place);
- dominant_only: the K most attended patches, no contextual tokens;
- uniform: K evenly spaced patches (no attention at all), a baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llava_edge.paths import DEMO_CHECKPOINT  # noqa: E402
from llava_edge.reference import token_reduction  # noqa: E402
from llava_edge.train.reference_answers import evaluate  # noqa: E402

CHOSEN = token_reduction._reduce_one


def _groups(score, metric, budget):
    """(dominant patches, targets, each target's other members), by the definition's steps."""
    n_contextual = token_reduction.contextual_count(budget)
    dominant = torch.sort(torch.argsort(score, descending=True, stable=True)[: budget - n_contextual]).values
    keep = torch.ones(len(score), dtype=torch.bool)
    keep[dominant] = False
    remaining = keep.nonzero().flatten()
    if n_contextual == 0:
        return dominant, remaining[:0], []
    at = torch.arange(0, len(remaining), max(1, len(remaining) // n_contextual))[:n_contextual]
    is_target = torch.zeros(len(remaining), dtype=torch.bool)
    is_target[at] = True
    targets, others = remaining[at], remaining[~is_target]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    group = (unit[others] @ unit[targets].T).argmax(dim=1)
    return dominant, targets, [others[group == j] for j in range(len(targets))]


def visionzip_merge(features, score, metric, budget):
    dominant, targets, members = _groups(score, metric, budget)
    contextual = [features[t] + (features[m].mean(0) if len(m) else 0) for t, m in zip(targets, members)]
    return torch.cat([features[dominant], *[c[None] for c in contextual]]), torch.cat([dominant, targets])


def raster(features, score, metric, budget):
    tokens, patches = CHOSEN(features, score, metric, budget)
    order = torch.argsort(patches)
    return tokens[order], patches[order]


def dominant_only(features, score, metric, budget):
    kept = torch.sort(torch.argsort(score, descending=True, stable=True)[:budget]).values
    return features[kept], kept


def uniform(features, score, metric, budget):
    kept = torch.linspace(0, len(score) - 1, budget).round().long()
    return features[kept], kept


VARIANTS = {"chosen": CHOSEN, "visionzip_merge": visionzip_merge, "raster": raster, "dominant_only": dominant_only,
            "uniform": uniform}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="runs/image_tokens/data/test.json")
    ap.add_argument("--budgets", type=int, nargs="+", default=[32, 16])
    ap.add_argument("--out", default="runs/image_tokens/variants.json")
    args = ap.parse_args()
    base = [s.prediction for s in evaluate(DEMO_CHECKPOINT, args.data, progress=False).samples]
    rows = {}
    for k in args.budgets:
        for name, fn in VARIANTS.items():
            token_reduction._reduce_one = fn
            result = evaluate(DEMO_CHECKPOINT, args.data, progress=False, image_tokens=k)
            same = sum(s.prediction == b for s, b in zip(result.samples, base)) / len(base)
            summary = result.summary()
            rows[f"{name} K={k}"] = {"accuracy": summary["accuracy"], "identical_to_all": same,
                                     "per_type": {t: v["accuracy"] for t, v in summary["per_type"].items()}}
            print(f"| {name} | {k} | " + " | ".join(f"{100 * v:.1f}%" for v in rows[f'{name} K={k}']['per_type'].values())
                  + f" | {100 * summary['accuracy']:.1f}% | {100 * same:.1f}% |", flush=True)
    token_reduction._reduce_one = CHOSEN
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
