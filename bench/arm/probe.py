"""What the demo computes on this machine, for comparison across machines (torch-free: runs in the aarch64 root).

Writes OUT_DIR/result.json (the demo's greedy answers on examples/ and on the shapes test split, versions, CPU) and
OUT_DIR/arrays.npz (the vision graph's fp32 and int8 outputs on the export's calibration images; the Q4_K_M
decoder's logits at every position of the export's parity sequence, its image given as the same embeddings).
The split's answers go to OUT_DIR/test_answers.jsonl as they come, so an interrupted probe resumes where it stopped.

usage: python probe.py INPUTS_DIR EXAMPLES_DIR OUT_DIR [--limit N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from llava_edge.eval import shapes_questions
from llava_edge.eval.engine_runner import answer_with_engine, open_engine
from llava_edge.onnx_session import ort_session
from llava_edge.runtime import ChatSession, Model, SamplingConfig
from llava_edge.paths import DEMO_BUNDLE
from llava_edge.runtime.bundle import open_bundle
from llava_edge.runtime.executor import Executor, sequence_logits
from llava_edge.runtime.llama_loader import open_llama
from llava_edge.runtime.tokenizer import Tokenizer

SUFFIX = "\nAnswer the question using a single word or phrase."
QUESTIONS = ["Describe the image.", "How many shapes are there?" + SUFFIX, "What color is the triangle?" + SUFFIX,
             "What shape is the blue object?" + SUFFIX]


def vision_outputs(graph: Path, pixels: np.ndarray) -> np.ndarray:
    session = ort_session(graph, threads=None, quiet=True)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: pixels[i:i + 1]})[0] for i in range(len(pixels))])


def decoder_logits(gguf: Path, ids: np.ndarray, image: np.ndarray, image_token_id: int) -> np.ndarray:
    """Logits at every position, as the export's parity measures them (f32 KV), with llama.cpp's CPU buffer types
    chosen as the runtime chooses them (on ARM: the repacked Q4 layouts)."""
    parts: list = []
    for i in ids.tolist():
        if i == image_token_id:
            parts.append(image)
        elif parts and isinstance(parts[-1], list):
            parts[-1].append(i)
        else:
            parts.append([i])
    n_positions = sum(len(p) for p in parts)
    llm = open_llama(gguf, n_ctx=n_positions, kv_type="f32")
    tokenizer = Tokenizer(llm)
    executor = Executor(llm, llm.n_batch, tokenizer.n_embd, tokenizer.n_vocab)
    try:
        return sequence_logits(executor, parts)
    finally:
        executor.close()
        llm.close()


def example_answers(examples: Path) -> dict:
    session = ChatSession.open(None)
    sampling = SamplingConfig(max_tokens=48, temperature=0.0)
    out = {}
    for image in sorted(examples.glob("*.png")):
        for q in QUESTIONS:
            session.set_image(image)
            out[f"{image.name} | {q.splitlines()[0]}"] = session.answer(q, sampling).text
    session.close()
    return out


def test_answers(test_dir: Path, limit: int | None, out: Path) -> tuple[list, dict[str, str]]:
    """The demo's greedy answers (24 tokens at most) to the shapes split's first `limit` questions, through the
    engine as `llava-edge eval shapes` asks them (4 slots); answers already in `out` are kept."""
    questions = shapes_questions.load(test_dir)[:limit]
    answers: dict[str, str] = {}
    if out.exists():
        answers = {r["key"]: r["answer"] for r in map(json.loads, out.read_text().splitlines()) if r}
    todo = [q for q in questions if q.key not in answers]
    print(f"probe: {len(questions) - len(todo)} of {len(questions)} split answers already in {out}", file=sys.stderr)
    if todo:
        model = Model.open(None)
        engine = open_engine(model, todo, parallel=4, max_tokens=24)
        with out.open("a") as f:
            def keep(q, text: str, _ttft: float) -> None:
                answers[q.key] = text
                f.write(json.dumps({"key": q.key, "answer": text}) + "\n")
                f.flush()
                if len(answers) % 50 == 0:
                    print(f"probe: {len(answers)} of {len(questions)} split answers", file=sys.stderr, flush=True)
            try:
                failed = answer_with_engine(engine, todo, model.image_budget(None), 24, keep)
            finally:
                engine.close()
                model.close()
        if failed:
            raise SystemExit(f"probe: {failed} answers failed in the engine; run again to ask them again")
    return questions, answers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", type=Path)
    ap.add_argument("examples", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    inputs = np.load(a.inputs / "inputs.npz")
    image_token_id = json.loads((a.inputs / "inputs.json").read_text())["image_token_id"]
    bundle = open_bundle(DEMO_BUNDLE)
    if not (a.out / "arrays.npz").exists():
        arrays = {
            "vision_fp32": vision_outputs(a.inputs / "vision.fp32.onnx", inputs["calib"]),
            "vision_int8": vision_outputs(bundle.vision_file, inputs["calib"]),
            "logits": decoder_logits(bundle.decoder_file, inputs["parity_ids"], inputs["parity_image"],
                                     image_token_id),
        }
        np.savez(a.out / "arrays.npz", **arrays)
    print("probe: vision and decoder done", file=sys.stderr, flush=True)
    questions, answers = test_answers(a.inputs / "shapes", a.limit, a.out / "test_answers.jsonl")
    import llama_cpp
    import onnxruntime

    result = {
        "machine": platform.machine(), "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
        "examples": example_answers(a.examples),
        "test": {"ids": [q.key for q in questions], "answers": [answers[q.key] for q in questions],
                 "accuracy": shapes_questions.score(questions, answers)["accuracy"]},
    }
    (a.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
