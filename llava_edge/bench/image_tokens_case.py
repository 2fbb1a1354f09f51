"""Fewer image tokens on the demo model: held-out accuracy per question type at K = all, 48, 32, 16 (a script,
not a timed test).

    python -m llava_edge.bench.image_tokens_case [--budgets 48 32 16] [--threads 2] [--work runs/image_tokens]

The held-out split is the demo build's (shapes world, seed 0: 300 unseen images, 1445 questions), written to
<work>/data once. Every question is asked greedily as a fresh one-turn conversation, by the PyTorch reference
(fp16 checkpoint, `Llava.encode_images(pixels, K)`) and by the shipped bundle (vision int8 with the budget as
its graph input, decoder Q4_K_M on llama.cpp). "identical" counts answers equal, character for character,
to the same path's all-token answers. Per K it also reports what an image costs the bundle: the vision encode
(cold: the cache is keyed by K) and the first answer's prefill (image + prompt positions). Results also go to <work>/image_tokens.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ..paths import DEMO_CHECKPOINT
from ..runtime import Engine, EngineConfig, Message, Model
from ..runtime.sampling import SamplingConfig
from ..scoring import load_test_records, question_of, score_predictions

BUDGETS = (48, 32, 16)
N_TEST_IMAGES = 300  # the demo build's held-out split (DemoConfig.n_test_images, seed 0)


def heldout_split(work: Path) -> Path:
    from ..train.shapes import build_dataset

    test = work / "data" / "test.json"
    if not test.exists():
        build_dataset(work / "data", 0, N_TEST_IMAGES, seed=0, progress=False)
    return test


def reference_answers(test: Path, budget: int | None, limit: int | None) -> tuple[list[str], float]:
    from ..train.reference_answers import evaluate

    t0 = time.perf_counter()
    result = evaluate(DEMO_CHECKPOINT, test, limit=limit, progress=False, image_tokens=budget)
    return [s.prediction for s in result.samples], time.perf_counter() - t0


def bundle_answers(engine: Engine, test: Path, budget: int | None, limit: int | None) -> dict:
    """The bundle's answers at K = budget and what each image cost (cold encode, first answer's prefill)."""
    records = load_test_records(test, limit)
    by_image: dict[Path, list[int]] = {}
    for i, record in enumerate(records):
        by_image.setdefault(test.parent / record["image"], []).append(i)
    image_budget = engine.budget(budget)  # checked once for the whole split
    sampling = SamplingConfig(max_tokens=24, temperature=0.0)
    answers, vision_ms, first_prefill_ms, first_positions = [""] * len(records), [], [], []
    t0 = time.perf_counter()
    for path, indices in by_image.items():
        image = engine.vision.encode(path, image_budget)
        vision_ms.append(image.vision_ms)
        for n, i in enumerate(indices):
            answer = engine.generate([Message("user", question_of(records[i]), [image])], sampling,
                                     image_budget).wait()
            answers[i] = answer.text
            if n == 0:
                first_prefill_ms.append(answer.timings.prefill_ms)
                first_positions.append(answer.timings.n_prefilled)
    return {"answers": answers, "seconds": time.perf_counter() - t0, "vision_ms": statistics.median(vision_ms),
            "first_prefill_ms": statistics.median(first_prefill_ms),
            "first_prefill_positions": statistics.median(first_positions)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="first N questions only (a quick look)")
    ap.add_argument("--work", default="runs/image_tokens")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    test = heldout_split(work)
    records = load_test_records(test, args.limit)
    budgets = [None, *args.budgets]
    engine = Engine(Model.open(threads=args.threads), EngineConfig(), owns_model=True)
    engine.start()  # the engine steps on its own thread: Generation.wait() then returns the answer
    rows = {}
    try:
        for budget in budgets:
            name = "all" if budget is None else str(budget)
            ref, ref_seconds = reference_answers(test, budget, args.limit)
            edge = bundle_answers(engine, test, budget, args.limit)
            rows[name] = {"reference": {"answers": ref, "seconds": ref_seconds}, "bundle": edge}
            print(f"[image tokens {name}] reference {ref_seconds:.0f} s, bundle {edge['seconds']:.0f} s", flush=True)
    finally:
        engine.close()
    n_all = engine.model.n_image_tokens
    for name, row in rows.items():
        for path in ("reference", "bundle"):
            r = row[path]
            r["result"] = score_predictions(records, r["answers"]).summary()
            base = rows["all"][path]["answers"]
            r["identical_to_all"] = sum(a == b for a, b in zip(r["answers"], base)) / len(base)
        same = zip(row["bundle"]["answers"], row["reference"]["answers"])
        row["bundle"]["identical_to_reference"] = sum(a == b for a, b in same) / len(records)
        row["image_tokens"] = n_all if name == "all" else int(name)
    (work / "image_tokens.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


def table(rows: dict) -> str:
    types = list(rows["all"]["reference"]["result"]["per_type"])
    head = ("| path | image tokens | " + " | ".join(types) + " | overall | identical to all tokens | "
            "bundle = reference | vision ms | first prefill: positions | ms |")
    lines = [head, "|---|---:|" + "---:|" * (len(types) + 6)]
    for path in ("reference", "bundle"):
        for name, row in rows.items():
            r = row[path]
            cells = [f"{100 * r['result']['per_type'][t]['accuracy']:.1f}%" for t in types]
            extra = (f"{100 * r['identical_to_reference']:.1f}% | {r['vision_ms']:.1f} | "
                     f"{r['first_prefill_positions']:.0f} | {r['first_prefill_ms']:.1f}" if path == "bundle" else "– | – | – | –")
            label = "reference (PyTorch, fp16)" if path == "reference" else "bundle (int8 vision, Q4_K_M)"
            lines.append(f"| {label} | {row['image_tokens']}{' (all)' if name == 'all' else ''} | " + " | ".join(cells)
                         + f" | {100 * r['result']['accuracy']:.1f}% | {100 * r['identical_to_all']:.1f}% | {extra} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
