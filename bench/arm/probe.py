"""What the demo computes on this machine, for comparison across machines (torch-free: runs in the aarch64 root).

Writes OUT_DIR/result.json (the demo's greedy answers on examples/ and on the shapes test split, versions, CPU) and
OUT_DIR/arrays.npz (the vision graph's fp32 and int8 outputs on the export's calibration images; the Q4_K_M
decoder's logits at every position of the export's parity sequence, its image given as the same embeddings).

usage: python probe.py INPUTS_DIR EXAMPLES_DIR OUT_DIR [--limit N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from llava_edge.onnx_session import ort_session
from llava_edge.runtime import ChatSession, SamplingConfig
from llava_edge.runtime.bundle import DEMO_BUNDLE, open_bundle
from llava_edge.runtime.decoder import Decoder
from llava_edge.runtime.evaluate import answer_with_bundle
from llava_edge.runtime.executor import Executor, evaluate
from llava_edge.runtime.llama_loader import open_llama
from llava_edge.scoring import load_test_records, score_predictions

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
    decoder = Decoder(llm)
    executor = Executor(llm, llm.n_batch, decoder.n_embd, decoder.n_vocab)
    try:
        return evaluate(executor, parts)
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
    arrays = {
        "vision_fp32": vision_outputs(a.inputs / "vision.fp32.onnx", inputs["calib"]),
        "vision_int8": vision_outputs(bundle.vision_file, inputs["calib"]),
        "logits": decoder_logits(bundle.decoder_file, inputs["parity_ids"], inputs["parity_image"], image_token_id),
    }
    np.savez(a.out / "arrays.npz", **arrays)
    print("probe: vision and decoder done", file=sys.stderr, flush=True)
    records = load_test_records(a.inputs / "shapes" / "test.json", a.limit)
    session = ChatSession.open(None)
    test_answers = answer_with_bundle(session, records, a.inputs / "shapes", progress=False)
    session.close()
    import llama_cpp
    import onnxruntime

    result = {
        "machine": platform.machine(), "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
        "examples": example_answers(a.examples),
        "test": {"ids": [r["id"] for r in records], "answers": test_answers,
                 "accuracy": score_predictions(records, test_answers).overall.accuracy},
    }
    (a.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
